/* Few-row products that stream their weights, for the CPU (x86-64 with AVX2 and FMA; the
 * expert kernel's products use AVX-512 where the CPU has it, with the same results).
 *
 * A decode step, or an expert that receives a handful of tokens, multiplies 1-8 rows by a
 * weight read once from memory. Library GEMMs pack the weight into panels first (fine when
 * many rows reuse it, a second pass over memory when few do), so they read it at a fraction
 * of the machine's bandwidth. These kernels read each weight element once, in address order,
 * and apply it to every row while it is in a register.
 *
 * Weights are fp32 or bf16 (converted to fp32 in registers: exact); activations and sums are
 * fp32. Every output element's sum runs in the same order whatever the thread count, so
 * results do not depend on threads.
 *
 *   wb_linear:     y = x @ W.T with W (O, K) (nn.Linear layout): dot products along W's rows,
 *                  the output rows split between the calling thread and one worker thread.
 *   wb_experts:    per expert e, out = (silu(x @ Wg) * (x @ Wu)) @ Wd, with [Wg | Wu] = GU[e]
 *                  (D, 2I) and Wd = DN[e] (I, D) (the checkpoint's (in, out) layout): rows of
 *                  W are added into the outputs four at a time (eight with AVX-512), each
 *                  product as two partial sums over the two halves of W's rows, added in a
 *                  fixed order, the rows ahead prefetched into L2 in address order. With several
 *                  experts the two threads take whole experts (two weight streams; one
 *                  thread from the most rows down, the other from the fewest up); with one,
 *                  each thread computes one half (the torch backend).
 *   wb_experts_oi: the same SwiGLU with per-expert nn.Linear-layout weights, dot products
 *                  (the jax backend's custom call); with several experts the two threads take
 *                  whole experts in turn, with one each computes half of its outputs.
 *   wb_rms_norm, wb_rope: the model's RMSNorm and RoPE in one call each (the torch backend:
 *                  a decode step otherwise spends more time issuing their small ops than
 *                  computing them).
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- loads, rounding, silu */

static inline __m256 load8(const void *w, long off, int bf16) {
    if (bf16) {
        __m128i v = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + off));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    }
    return _mm256_loadu_ps((const float *)w + off);
}

static inline float load1(const void *w, long off, int bf16) {
    if (bf16) {
        uint32_t u = (uint32_t)((const uint16_t *)w)[off] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return ((const float *)w)[off];
}

/* fp32 -> nearest bf16 (ties to even), returned as fp32; NaN stays NaN */
static inline float round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) {
        u |= 0x00400000u;
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
    }
    u &= 0xffff0000u;
    memcpy(&f, &u, 4);
    return f;
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* silu(g) * u; bf16: as the model computes it in bf16, each result rounded */
static inline float swiglu1(float g, float u, int bf16) {
    return bf16 ? round_bf16(round_bf16(silu(round_bf16(g))) * round_bf16(u)) : silu(g) * u;
}

/* ---------------------------------------------------------------- y = x @ W.T, W (O, K) */

static inline float hsum(__m256 v) {
    float s[8];
    _mm256_storeu_ps(s, v);
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

/* One row of x against bf16 W[o0:o1] without x's split copy (jax's one-row bf16 experts),
 * one output at a time over the outputs that come in fours from o0 (W's rows read in address
 * order, as dot_row reads them), the rest one by one: per output two sums over 16 weights,
 * added, then eight weights at a time, then one by one */
static void dot_bf16_plain(const float *x, long K, const void *w, long o0, long o1, float *y) {
    long o = o0, o4 = o0 + ((o1 - o0) & ~3L);
    for (; o < o4; o++) {
        __m256 a = _mm256_setzero_ps(), b = a;
        long k = 0;
        for (; k + 16 <= K; k += 16) {
            a = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(w, o * K + k, 1), a);
            b = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), load8(w, o * K + k + 8, 1), b);
        }
        a = _mm256_add_ps(a, b);
        for (; k + 8 <= K; k += 8)
            a = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(w, o * K + k, 1), a);
        float t = hsum(a);
        for (long kk = k; kk < K; kk++) t += x[kk] * load1(w, o * K + kk, 1);
        y[o] = t;
    }
    for (; o < o1; o++) {
        float t = 0.0f;
        for (long kk = 0; kk < K; kk++) t += x[kk] * load1(w, o * K + kk, 1);
        y[o] = t;
    }
}

/* 16 weights of a row from w + off: bf16 as eight 32-bit pairs, whose shifted and masked
 * halves are the even and the odd weights as fp32 (no shuffle; x split the same way); fp32 as
 * the first and the last eight */
static inline __attribute__((always_inline)) void load16x2(const void *w, long off, int bf16,
                                                           __m256 *lo, __m256 *hi) {
    if (bf16) {
        __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + off));
        *lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        *hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
    } else {
        *lo = _mm256_loadu_ps((const float *)w + off);
        *hi = _mm256_loadu_ps((const float *)w + off + 8);
    }
}

/* One row (a decode step's products): y[o0:o1] = W[o0:o1] x, one output at a time over the
 * outputs that come in fours from o0, the rest one by one (each output summed as when four
 * were taken at a time: the same bits). Per output two sums over 16 weights at a time, xs
 * being x split as load16x2 splits the weights (bf16: even and odd; fp32: x itself), added; in
 * fp32 then eight weights at a time; then one by one. W's rows are read in address order, one
 * after the other, and left to the hardware prefetcher: one core reads them at a plain read's
 * rate, where two rows read side by side with a software prefetch ahead ran a fifth slower
 * (and did not rise with a plain read's rate when both cores read) */
static inline __attribute__((always_inline)) void dot_row(const float *xs, const float *x,
                                                          long K, const void *w, int bf16,
                                                          long o0, long o1, float *y) {
    long K16 = K & ~15L, o = o0, o4 = o0 + ((o1 - o0) & ~3L);
    for (; o < o4; o++) {
        __m256 a = _mm256_setzero_ps(), b = a, l, h;
        for (long k = 0; k < K16; k += 16) {
            load16x2(w, o * K + k, bf16, &l, &h);
            a = _mm256_fmadd_ps(_mm256_loadu_ps(xs + k), l, a);
            b = _mm256_fmadd_ps(_mm256_loadu_ps(xs + k + 8), h, b);
        }
        a = _mm256_add_ps(a, b);
        long k = K16;
        for (; !bf16 && k + 8 <= K; k += 8)
            a = _mm256_fmadd_ps(_mm256_loadu_ps(x + k),
                                _mm256_loadu_ps((const float *)w + o * K + k), a);
        float t = hsum(a);
        for (; k < K; k++) t += x[k] * load1(w, o * K + k, bf16);
        y[o] = t;
    }
    for (; o < o1; o++) {
        float t = 0.0f;
        for (long k = 0; k < K; k++) t += x[k] * load1(w, o * K + k, bf16);
        y[o] = t;
    }
}

/* Two rows (x rows K apart), fp32 W: per output one sum over eight weights at a time, then
 * one by one (the sums of the four-outputs-at-a-time kernel this replaced), one output at a
 * time over the outputs that come in fours from o0, each of W's rows read once, in address
 * order, for both rows of x (as dot_row reads them); the rest one by one */
static void dot_rows2(const float *x, long K, const float *w, long o0, long o1, float *y,
                      long ldy) {
    const float *x1 = x + K;
    long o = o0, o4 = o0 + ((o1 - o0) & ~3L);
    for (; o < o4; o++) {
        __m256 a = _mm256_setzero_ps(), b = a;
        const float *w0 = w + o * K;
        long k = 0;
        for (; k + 8 <= K; k += 8) {
            __m256 v = _mm256_loadu_ps(w0 + k);
            a = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), v, a);
            b = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k), v, b);
        }
        float s0 = hsum(a), s1 = hsum(b);
        for (long kk = k; kk < K; kk++) s0 += x[kk] * w0[kk];
        for (long kk = k; kk < K; kk++) s1 += x1[kk] * w0[kk];
        y[o] = s0;
        y[ldy + o] = s1;
    }
    for (; o < o1; o++)
        for (int r = 0; r < 2; r++) {
            const float *xr = r ? x1 : x;
            float t = 0.0f;
            for (long kk = 0; kk < K; kk++) t += xr[kk] * w[o * K + kk];
            y[r * ldy + o] = t;
        }
}

/* a row's dot product from its eight partial sums a, then x[k:K] against W's row at off one
 * by one: one compiled copy for dot_group and dot_quad, so their sums round the same */
__attribute__((noinline)) static float sum_tail(__m256 a, const float *x, long k, long K,
                                                const void *w, long off, int bf16) {
    float t = hsum(a);
    for (; k < K; k++) t += x[k] * load1(w, off + k, bf16);
    return t;
}

/* outputs o, o + 1 (no of them) of rows r0 .. r0 + rn (rn <= 4, x rows K apart) */
static inline __attribute__((always_inline)) void dot_group(
    const float *x, long K, int rn, const void *w, int bf16, long o, int no, float *y,
    long ldy) {
    __m256 a[4][2];
    for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
    long k = 0;
    /* the next two rows of W, as far along as these (read next, by this or the next call),
     * once per cache line, into L2 (into L1 and twice per line, jax's 4-row experts read
     * 1.3x slower) */
    const char *next = (const char *)w + (o + 2) * K * (bf16 ? 2 : 4);
    for (; k + 8 <= K; k += 8) {
        if ((k * (bf16 ? 2 : 4)) % 64 == 0) {
            _mm_prefetch(next + k * (bf16 ? 2 : 4), _MM_HINT_T1);
            _mm_prefetch(next + (K + k) * (bf16 ? 2 : 4), _MM_HINT_T1);
        }
        __m256 w0 = load8(w, o * K + k, bf16);
        __m256 w1 = no > 1 ? load8(w, (o + 1) * K + k, bf16) : _mm256_setzero_ps();
        for (int r = 0; r < rn; r++) {
            __m256 v = _mm256_loadu_ps(x + r * K + k);
            a[r][0] = _mm256_fmadd_ps(v, w0, a[r][0]);
            if (no > 1) a[r][1] = _mm256_fmadd_ps(v, w1, a[r][1]);
        }
    }
    for (int r = 0; r < rn; r++)
        for (int q = 0; q < no; q++)
            y[r * ldy + o + q] = sum_tail(a[r][q], x + r * K, k, K, w, (o + q) * K, bf16);
}

static int avx512_on(void);
static void dot_quad(const float *x, long K, int rn, const void *w, int bf16, long o, float *y,
                     long ldy);

/* y[:, o0:o1] for any number of rows: two of W's rows at a time (four with AVX-512: its 32
 * registers hold four rows' sums for four outputs, half the loads of x per product), read from
 * memory once, against every row of x in groups of four (W's rows stay in L1 meanwhile) */
static void dot_many(const float *x, long n, long K, const void *w, int bf16, long o0, long o1,
                     float *y, long ldy) {
    long o = o0;
    if (n > 4 && avx512_on()) /* (fewer rows: memory-bound, two weight streams read faster) */
        for (; o + 4 <= o1; o += 4)
            for (long r = 0; r < n; r += 4)
                dot_quad(x + r * K, K, n - r < 4 ? (int)(n - r) : 4, w, bf16, o, y + r * ldy, ldy);
    for (; o < o1; o += 2) {
        int no = o + 1 < o1 ? 2 : 1;
        for (long r = 0; r < n; r += 4) {
            long rn = n - r < 4 ? n - r : 4;
            const float *xr = x + r * K;
            float *yr = y + r * ldy;
            if (rn == 1) dot_group(xr, K, 1, w, bf16, o, no, yr, ldy);
            else if (rn == 2) dot_group(xr, K, 2, w, bf16, o, no, yr, ldy);
            else if (rn == 3) dot_group(xr, K, 3, w, bf16, o, no, yr, ldy);
            else dot_group(xr, K, 4, w, bf16, o, no, yr, ldy);
        }
    }
}

/* y[:, o0:o1] = x @ W[o0:o1].T: one or two rows four outputs at a time, more rows by
 * dot_many; xp is x's first row split for dot_row's bf16 loads */
static void dot_mm(const float *x, const float *xp, long n, long K, const void *w, int bf16,
                   long o0, long o1, float *y, long ldy) {
    if (bf16 && n == 1 && xp) {
        dot_row(xp, x, K, w, 1, o0, o1, y);
        return;
    }
    if (!bf16 && n == 1) {
        dot_row(x, x, K, w, 0, o0, o1, y);
        return;
    }
    if (!bf16 && n == 2) {
        dot_rows2(x, K, w, o0, o1, y, ldy);
        return;
    }
    if (n > 2 || (bf16 && n == 2)) { /* bf16 pairs: widening each weight once */
        dot_many(x, n, K, w, bf16, o0, o1, y, ldy);
        return;
    }
    dot_bf16_plain(x, K, w, o0, o1, y); /* bf16, one row, no split copy */
}

/* ---------------------------------------------------------------- y = x @ W, W (K, ldw) */

/* A region of memory prefetched into L2 while a product runs: ps bytes per step of the
 * product (a vector's width of its weight rows), in address order, up to n bytes. With several
 * interleaved weight rows the hardware prefetcher keeps fewer lines in flight than for one
 * stream, and while rows already in L2 are reused nothing fetches the next ones. */
typedef struct {
    const char *p;
    long n, ps, off;
} ahead;

static inline void ahead_step(ahead *a) {
    long end = a->off + a->ps < a->n ? a->off + a->ps : a->n;
    for (long l = a->off; l < end; l += 64) _mm_prefetch(a->p + l, _MM_HINT_T1);
    a->off = end;
}

/* y[r, c0:c1] += sum over k..k+kb (kb <= 4) of x[r, k'] W[k', c0:c1], rows r < rn (rn <= 4) */
static inline __attribute__((always_inline)) void axpy_block(
    const float *x, long ldx, int rn, long k, int kb, const void *w, long ldw, int bf16,
    long c0, long c1, float *y, long ldy, ahead *a) {
    __m256 b[4][4];
    for (int r = 0; r < rn; r++)
        for (int q = 0; q < 4; q++)
            b[r][q] = _mm256_set1_ps(q < kb ? x[r * ldx + k + q] : 0.0f);
    long c = c0;
    for (; c + 8 <= c1; c += 8) {
        ahead_step(a);
        __m256 w0 = load8(w, k * ldw + c, bf16);
        __m256 w1 = kb > 1 ? load8(w, (k + 1) * ldw + c, bf16) : _mm256_setzero_ps();
        __m256 w2 = kb > 2 ? load8(w, (k + 2) * ldw + c, bf16) : _mm256_setzero_ps();
        __m256 w3 = kb > 3 ? load8(w, (k + 3) * ldw + c, bf16) : _mm256_setzero_ps();
        for (int r = 0; r < rn; r++) {
            float *yr = y + r * ldy + c;
            __m256 acc = _mm256_loadu_ps(yr);
            acc = _mm256_fmadd_ps(b[r][0], w0, acc);
            if (kb > 1) acc = _mm256_fmadd_ps(b[r][1], w1, acc);
            if (kb > 2) acc = _mm256_fmadd_ps(b[r][2], w2, acc);
            if (kb > 3) acc = _mm256_fmadd_ps(b[r][3], w3, acc);
            _mm256_storeu_ps(yr, acc);
        }
    }
    for (; c < c1; c++)
        for (int r = 0; r < rn; r++) {
            float t = y[r * ldy + c];
            /* fmaf: one FMA per weight as in the vector columns, however the compiler
             * treats this loop in the AVX2 and the AVX-512 functions that inline it */
            for (int q = 0; q < kb; q++)
                t = fmaf(x[r * ldx + k + q], load1(w, (k + q) * ldw + c, bf16), t);
            y[r * ldy + c] = t;
        }
}

#define AXPY_RN(RN)                                                                         \
    static void axpy_rows##RN(const float *x, long ldx, long k0, long k1, const void *w,    \
                              long ldw, int bf16, long c0, long c1, float *y, long ldy,     \
                              ahead *a) {                                                   \
        long k = k0;                                                                        \
        for (; k + 4 <= k1; k += 4) axpy_block(x, ldx, RN, k, 4, w, ldw, bf16, c0, c1, y, ldy, a); \
        if (k < k1) axpy_block(x, ldx, RN, k, (int)(k1 - k), w, ldw, bf16, c0, c1, y, ldy, a); \
    }
AXPY_RN(1)
AXPY_RN(2)
AXPY_RN(3)
AXPY_RN(4)

/* ---------------------------------------------------------------- the same, AVX-512 */

#define AVX512 __attribute__((target("avx512f")))

static atomic_int avx512_mode = -1; /* -1: not yet asked; 0: the AVX2 kernels; 1: AVX-512 */

static int avx512_on(void) {
    int m = atomic_load_explicit(&avx512_mode, memory_order_relaxed);
    if (m < 0) {
        __builtin_cpu_init();
        m = __builtin_cpu_supports("avx512f") ? 1 : 0;
        atomic_store(&avx512_mode, m);
    }
    return m;
}

/* 0: the AVX2 kernels even where the CPU has AVX-512 (for measurements and tests); 1: AVX-512
 * where the CPU has it. Returns whether AVX-512 is now used. */
int wb_set_avx512(int on) {
    __builtin_cpu_init();
    int m = on && __builtin_cpu_supports("avx512f") ? 1 : 0;
    atomic_store(&avx512_mode, m);
    return m;
}

/* dot_group for four outputs o .. o + 3 (AVX-512's registers, 256-bit arithmetic): each
 * output's sums as dot_group's, so the same bits */
__attribute__((target("avx512f,avx512vl"))) static inline __attribute__((always_inline)) void
dot_quad_rows(const float *x, long K, int rn, const void *w, int bf16, long o, float *y,
              long ldy) {
    int es = bf16 ? 2 : 4;
    __m256 a[4][4];
    for (int r = 0; r < 4; r++)
        for (int q = 0; q < 4; q++) a[r][q] = _mm256_setzero_ps();
    const char *next = (const char *)w + (o + 4) * K * es; /* the next four rows, into L2 */
    long k = 0;
    for (; k + 8 <= K; k += 8) {
        if ((k * es) % 64 == 0)
            for (int q = 0; q < 4; q++) _mm_prefetch(next + (q * K + k) * es, _MM_HINT_T1);
        __m256 wq[4];
        for (int q = 0; q < 4; q++) wq[q] = load8(w, (o + q) * K + k, bf16);
        for (int r = 0; r < rn; r++) {
            __m256 v = _mm256_loadu_ps(x + r * K + k);
            for (int q = 0; q < 4; q++) a[r][q] = _mm256_fmadd_ps(v, wq[q], a[r][q]);
        }
    }
    for (int r = 0; r < rn; r++)
        for (int q = 0; q < 4; q++)
            y[r * ldy + o + q] = sum_tail(a[r][q], x + r * K, k, K, w, (o + q) * K, bf16);
}

__attribute__((target("avx512f,avx512vl"))) static void dot_quad(const float *x, long K, int rn,
                                                                 const void *w, int bf16, long o,
                                                                 float *y, long ldy) {
    if (rn == 1) dot_quad_rows(x, K, 1, w, bf16, o, y, ldy);
    else if (rn == 2) dot_quad_rows(x, K, 2, w, bf16, o, y, ldy);
    else if (rn == 3) dot_quad_rows(x, K, 3, w, bf16, o, y, ldy);
    else dot_quad_rows(x, K, 4, w, bf16, o, y, ldy);
}

AVX512 static inline __m512 load16(const void *w, long off, int bf16) {
    if (bf16) {
        __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + off));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    }
    return _mm512_loadu_ps((const float *)w + off);
}

/* axpy_block with sixteen columns per vector, up to eight rows of x (rn <= 8) and of W
 * (kb <= 8), each x value broadcast from memory as its product needs it (registers hold the
 * outputs and one weight vector): half the loads and stores of the outputs per weight of the AVX2 block. Every
 * output's sum is the same chain of FMAs, in the same order, as axpy_block's: the same bits.
 * Columns c0 .. c1, c1 - c0 a multiple of 16. */
AVX512 static inline __attribute__((always_inline)) void axpy512_block(
    const float *x, long ldx, int rn, long k, int kb, const void *w, long ldw, int bf16,
    long c0, long c1, float *y, long ldy, ahead *a) {
    for (long c = c0; c < c1; c += 16) {
        ahead_step(a);
        __m512 acc[8];
        for (int r = 0; r < rn; r++) acc[r] = _mm512_loadu_ps(y + r * ldy + c);
        for (int q = 0; q < kb; q++) {
            __m512 wv = load16(w, (k + q) * ldw + c, bf16);
            const float *xq = x + k + q;
            for (int r = 0; r < rn; r++)
                acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xq[r * ldx]), wv, acc[r]);
        }
        for (int r = 0; r < rn; r++) _mm512_storeu_ps(y + r * ldy + c, acc[r]);
    }
}

/* axpy_rows with axpy512_block; columns past the last multiple of 16 by axpy_block */
#define AXPY512_RN(RN)                                                                      \
    AVX512 static void axpy512_rows##RN(const float *x, long ldx, long k0, long k1,         \
                                        const void *w, long ldw, int bf16, long c0, long c1, \
                                        float *y, long ldy, ahead *a) {                     \
        long c16 = c0 + (c1 - c0) / 16 * 16, k = k0;                                        \
        for (; k + 8 <= k1; k += 8)                                                         \
            axpy512_block(x, ldx, RN, k, 8, w, ldw, bf16, c0, c16, y, ldy, a);              \
        if (k < k1) axpy512_block(x, ldx, RN, k, (int)(k1 - k), w, ldw, bf16, c0, c16, y, ldy, a); \
        ahead none = {NULL, 0, 0, 0};                                                       \
        if (c16 < c1)                                                                       \
            for (k = k0; k < k1; k += 4)                                                    \
                for (int r = 0; r < RN; r += 4)                                             \
                    axpy_block(x + r * ldx, ldx, RN - r < 4 ? RN - r : 4, k,                \
                               k1 - k < 4 ? (int)(k1 - k) : 4, w, ldw, bf16, c16, c1,       \
                               y + r * ldy, ldy, &none);                                    \
    }
AXPY512_RN(1)
AXPY512_RN(2)
AXPY512_RN(3)
AXPY512_RN(4)
AXPY512_RN(5)
AXPY512_RN(6)
AXPY512_RN(7)
AXPY512_RN(8)

#define BLOCK_BYTES (64 * 1024) /* a block of W's rows that stays in L2 for every row group */

/* y[n, :O] = x[n, k0:k1] @ W[k0:k1, :O] (x rows K apart, y rows O apart); more than four
 * rows (eight with AVX-512) go in groups of four over blocks of W's rows, so W is read from
 * memory once. Rows of W are prefetched ahead: in one group, one block step (8 or 4 rows) ahead as they
 * are read; with more, the next block in shares over the second and later row groups (which
 * read the current block from L2), the first block by the first group as it goes. */
static void axpy_mm(const float *x, long n, long K, long k0, long k1, const void *w, long O,
                    int bf16, float *y) {
    memset(y, 0, sizeof(float) * n * O);
    int wide = avx512_on();
    long es = bf16 ? 2 : 4, kstep = wide ? 8 : 4, cstep = wide ? 16 : 8, row = O * es;
    /* rows per group: up to eight with AVX-512 in one pass (their weights read from memory
     * once), more in groups of four over blocks held in L2 (eight per group: slower there) */
    long gr = wide && n <= 8 ? 8 : 4;
    long kblk = n <= gr ? k1 - k0 : BLOCK_BYTES / row, groups = (n + gr - 1) / gr;
    kblk = kblk < kstep ? kstep : kblk / kstep * kstep;
    const char *wc = w;
    for (long kb = k0; kb < k1; kb += kblk) {
        long ke = kb + kblk < k1 ? kb + kblk : k1;
        long steps = (ke - kb + kstep - 1) / kstep * (O / cstep > 0 ? O / cstep : 1);
        long next = (ke + kblk < k1 ? ke + kblk : k1) - ke; /* rows of the next block */
        long share = groups > 1 ? ((next * row + groups - 2) / (groups - 1) + 63) & ~63L : 0;
        for (long r = 0, g = 0; r < n; r += gr, g++) {
            long rn = n - r < gr ? n - r : gr;
            const float *xr = x + r * K;
            float *yr = y + r * O;
            ahead a = {NULL, 0, 0, 0};
            if (g == 0 && kb == k0) { /* this block, one step ahead */
                long rows = ke - kb - kstep;
                a = (ahead){wc + (kb + kstep) * row, rows > 0 ? rows * row : 0, kstep * cstep * es, 0};
            } else if (g > 0) { /* a share of the next block */
                long lo = (g - 1) * share, hi = lo + share < next * row ? lo + share : next * row;
                a = (ahead){wc + ke * row + lo, hi > lo ? hi - lo : 0, 0, 0};
                a.ps = ((a.n + steps - 1) / steps + 63) & ~63L;
            }
            if (wide) {
                if (rn == 1) axpy512_rows1(xr, K, kb, ke, w, O, bf16, 0, O, yr, O, &a);
                else if (rn == 2) axpy512_rows2(xr, K, kb, ke, w, O, bf16, 0, O, yr, O, &a);
                else if (rn == 3) axpy512_rows3(xr, K, kb, ke, w, O, bf16, 0, O, yr, O, &a);
                else if (rn == 4) axpy512_rows4(xr, K, kb, ke, w, O, bf16, 0, O, yr, O, &a);
                else if (rn == 5) axpy512_rows5(xr, K, kb, ke, w, O, bf16, 0, O, yr, O, &a);
                else if (rn == 6) axpy512_rows6(xr, K, kb, ke, w, O, bf16, 0, O, yr, O, &a);
                else if (rn == 7) axpy512_rows7(xr, K, kb, ke, w, O, bf16, 0, O, yr, O, &a);
                else axpy512_rows8(xr, K, kb, ke, w, O, bf16, 0, O, yr, O, &a);
            } else {
                if (rn == 1) axpy_rows1(xr, K, kb, ke, w, O, bf16, 0, O, yr, O, &a);
                else if (rn == 2) axpy_rows2(xr, K, kb, ke, w, O, bf16, 0, O, yr, O, &a);
                else if (rn == 3) axpy_rows3(xr, K, kb, ke, w, O, bf16, 0, O, yr, O, &a);
                else axpy_rows4(xr, K, kb, ke, w, O, bf16, 0, O, yr, O, &a);
            }
        }
    }
}

/* ---------------------------------------------------------------- two threads */

typedef void (*task_fn)(void *arg, int tid, int nthreads);

static pthread_mutex_t job_lock = PTHREAD_MUTEX_INITIALIZER; /* one parallel job at a time */
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake_cond = PTHREAD_COND_INITIALIZER;
static atomic_long job_seq = 0;  /* bumped to post a job */
static atomic_long job_done = 0; /* set to job_seq by the worker when it finishes */
static atomic_int sleeping = 0;
static task_fn job_fn;
static void *job_arg;
static int worker_started = 0;
static atomic_int bar_count = 0, bar_sense = 0;

/* cycles the idle worker polls for the next job before it sleeps (a few hundred
 * microseconds: the products of a decode step follow each other closer than that, and waking
 * a sleeping thread costs tens of microseconds; measured faster than 1e5 in both backends) */
#define SPIN_CYCLES 1000000ULL

static void *worker_main(void *unused) {
    (void)unused;
    long seen = 0;
    for (;;) {
        long s;
        unsigned long long t0 = __rdtsc();
        while ((s = atomic_load_explicit(&job_seq, memory_order_acquire)) == seen) {
            if (__rdtsc() - t0 < SPIN_CYCLES) {
                _mm_pause();
                continue;
            }
            pthread_mutex_lock(&wake_lock);
            atomic_store(&sleeping, 1);
            while (atomic_load(&job_seq) == seen) pthread_cond_wait(&wake_cond, &wake_lock);
            atomic_store(&sleeping, 0);
            pthread_mutex_unlock(&wake_lock);
            t0 = __rdtsc();
        }
        seen = s;
        job_fn(job_arg, 1, 2);
        atomic_store_explicit(&job_done, s, memory_order_release);
    }
    return NULL;
}

static void after_fork_child(void) {
    /* the worker thread does not exist in a forked child: start a new one when needed */
    pthread_mutex_init(&job_lock, NULL);
    pthread_mutex_init(&wake_lock, NULL);
    pthread_cond_init(&wake_cond, NULL);
    worker_started = 0;
    atomic_store(&job_seq, 0);
    atomic_store(&job_done, 0);
    atomic_store(&sleeping, 0);
    atomic_store(&bar_count, 0);
    atomic_store(&bar_sense, 0);
}

static int start_worker(void) {
    if (worker_started) return 1;
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int ok = pthread_create(&t, &attr, worker_main, NULL) == 0;
    pthread_attr_destroy(&attr);
    if (ok) {
        static int registered = 0;
        if (!registered) pthread_atfork(NULL, NULL, after_fork_child);
        registered = 1;
        worker_started = 1;
    }
    return ok;
}

/* both threads wait here until both have arrived */
static void barrier2(int nthreads) {
    if (nthreads < 2) return;
    int sense = atomic_load(&bar_sense);
    if (atomic_fetch_add(&bar_count, 1) == 1) {
        atomic_store(&bar_count, 0);
        atomic_store(&bar_sense, !sense);
    } else {
        while (atomic_load(&bar_sense) == sense) _mm_pause();
    }
}

/* fn(arg, tid, n) on the calling thread and, when threads > 1 and the worker is free, on the
 * worker too (n = 2); otherwise on the calling thread alone (n = 1) */
static void run_parallel(task_fn fn, void *arg, int threads) {
    if (threads < 2 || pthread_mutex_trylock(&job_lock) != 0) {
        fn(arg, 0, 1);
        return;
    }
    if (!start_worker()) {
        pthread_mutex_unlock(&job_lock);
        fn(arg, 0, 1);
        return;
    }
    job_fn = fn;
    job_arg = arg;
    long s = atomic_load(&job_seq) + 1;
    atomic_store(&job_seq, s); /* seq_cst: ordered before the load of sleeping */
    if (atomic_load(&sleeping)) {
        pthread_mutex_lock(&wake_lock);
        pthread_cond_signal(&wake_cond);
        pthread_mutex_unlock(&wake_lock);
    }
    fn(arg, 0, 2);
    while (atomic_load_explicit(&job_done, memory_order_acquire) != s) _mm_pause();
    pthread_mutex_unlock(&job_lock);
}

/* a weight smaller than this is read faster than the worker thread can join in */
#define PARALLEL_BYTES (256 * 1024)

/* columns [c0, c1) of n in thread tid's share, in multiples of 8 */
static void share(long n, int tid, int nthreads, long *c0, long *c1) {
    long half = nthreads < 2 ? n : ((n / 2 + 7) / 8) * 8;
    if (half > n) half = n;
    *c0 = tid == 0 ? 0 : half;
    *c1 = tid == 0 ? half : n;
    if (nthreads < 2) *c1 = n;
}

/* ---------------------------------------------------------------- scratch, conversion */

/* the calling thread's scratch (grown on demand, kept for the next call): the worker thread
 * uses the buffers of the job it helps with */
static __thread float *scratch_buf = NULL;
static __thread size_t scratch_len = 0;
static pthread_key_t scratch_key; /* frees a thread's scratch when the thread ends */
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void make_scratch_key(void) { pthread_key_create(&scratch_key, free); }

static float *scratch(size_t floats) {
    if (floats > scratch_len) {
        pthread_once(&scratch_once, make_scratch_key);
        free(scratch_buf);
        size_t bytes = ((floats * sizeof(float) + 63) / 64) * 64;
        scratch_buf = aligned_alloc(64, bytes);
        scratch_len = scratch_buf ? floats : 0;
        pthread_setspecific(scratch_key, scratch_buf);
    }
    return scratch_buf;
}

/* n values of a (fp32, or bf16 when bf16) as fp32 */
static void to_f32(const void *a, long n, int bf16, float *out) {
    if (!bf16) {
        memcpy(out, a, sizeof(float) * n);
        return;
    }
    for (long i = 0; i < n; i++) out[i] = load1(a, i, 1);
}

/* fp32 v into element i of y (fp32, or bf16 rounded to nearest even) */
static inline void store1(void *y, long i, float v, int bf16) {
    if (bf16) {
        uint32_t u;
        v = round_bf16(v);
        memcpy(&u, &v, 4);
        ((uint16_t *)y)[i] = (uint16_t)(u >> 16);
    } else {
        ((float *)y)[i] = v;
    }
}

/* eight fp32 values rounded to the nearest bf16 (ties to even), as fp32; NaN stays NaN */
static inline __m256 round8_bf16(__m256 v) {
    __m256i u = _mm256_castps_si256(v), hi = _mm256_set1_epi32((int)0xffff0000u);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
    __m256i nan = _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)); /* quiet, as round_bf16 */
    __m256 isnan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_and_ps(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(nan), isnan),
                         _mm256_castsi256_ps(hi));
}

/* eight fp32 values into y[i .. i + 8] (fp32, or bf16 rounded to nearest even) */
static inline void store8(void *y, long i, __m256 v, int bf16) {
    if (bf16) {
        __m256i u = _mm256_srli_epi32(_mm256_castps_si256(round8_bf16(v)), 16);
        __m128i p = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)y + i), p);
    } else {
        _mm256_storeu_ps((float *)y + i, v);
    }
}

/* ---------------------------------------------------------------- exported */

typedef struct {
    const float *x, *xp; /* x in fp32; xp: its first row, each 16 as 8 even then 8 odd values */
    long n, K, O;
    const void *w;
    int bf16;
    float *y;            /* (n, O) fp32 */
} linear_job;


/* ---------------------------------------------------------------- parts on a host pool */

/* Work cut into parts that any thread may take, in any order, with the same results: the
 * calling thread and a helper task scheduled on a thread pool the caller does not own (XLA's
 * intra-op pool, in the jax custom call) both take parts until none is left, and the caller
 * waits only for parts the helper has taken. A helper that starts late (the pool busy) finds
 * nothing left and returns, so nothing ever waits on a thread that is not running. */
typedef void (*part_fn)(void *arg, long part, long nparts);
typedef void (*schedule_fn)(void *pool, void (*task)(void *), void *data);

typedef struct {
    part_fn fn;
    void *arg; /* the caller's, alive until every part is done */
    long nparts;
    atomic_long next, done;
    atomic_int refs; /* the caller and the helper: the last one frees this */
} pooled_job;

static void pooled_release(pooled_job *s) {
    if (atomic_fetch_sub(&s->refs, 1) == 1) free(s);
}

static void pooled_take(pooled_job *s) {
    for (long p; (p = atomic_fetch_add(&s->next, 1)) < s->nparts;) {
        s->fn(s->arg, p, s->nparts);
        atomic_fetch_add_explicit(&s->done, 1, memory_order_release);
    }
}

static void pooled_helper(void *data) {
    pooled_take(data);
    pooled_release(data);
}

/* every part of fn, on this thread and (sched given) a helper on pool */
static void run_pooled(part_fn fn, void *arg, long nparts, schedule_fn sched, void *pool) {
    pooled_job *s = sched && nparts > 1 ? malloc(sizeof *s) : NULL;
    if (!s) {
        for (long p = 0; p < nparts; p++) fn(arg, p, nparts);
        return;
    }
    s->fn = fn;
    s->arg = arg;
    s->nparts = nparts;
    atomic_init(&s->next, 0);
    atomic_init(&s->done, 0);
    atomic_init(&s->refs, 2);
    sched(pool, pooled_helper, s);
    pooled_take(s);
    while (atomic_load_explicit(&s->done, memory_order_acquire) < nparts) _mm_pause();
    pooled_release(s);
}

/* outputs [o0, o1) of part p of n over O outputs: boundaries at multiples of 8, where the
 * kernels' groups of four outputs start whatever the split (the same sums for every split) */
static void part_range(long O, long p, long n, long *o0, long *o1) {
    *o0 = (O * p / n) / 8 * 8;
    *o1 = p + 1 == n ? O : (O * (p + 1) / n) / 8 * 8;
}

static void linear_part(void *arg, long p, long n) {
    linear_job *j = arg;
    long o0, o1;
    part_range(j->O, p, n, &o0, &o1);
    if (o1 > o0) dot_mm(j->x, j->xp, j->n, j->K, j->w, j->bf16, o0, o1, j->y, j->O);
}

/* the kernels' worker and the calling thread: one part each */
static void linear_task(void *arg, int tid, int nthreads) { linear_part(arg, tid, nthreads); }

/* parts of a product on a host pool: enough that a helper starting late still takes a share */
#define POOLED_PARTS 8

static int linear_run(const void *x, long n, long K, const void *w, long O, int bf16, void *y,
                      int threads, schedule_fn sched, void *pool) {
    float *xf = scratch((size_t)(n * K + K + n * O));
    if (!xf) return -1;
    float *xp = xf + n * K, *yf = xp + K;
    to_f32(x, n * K, bf16, xf);
    for (long k = 0; k + 16 <= K; k += 16)
        for (int i = 0; i < 8; i++) {
            xp[k + i] = xf[k + 2 * i];
            xp[k + 8 + i] = xf[k + 2 * i + 1];
        }
    linear_job j = {xf, xp, n, K, O, w, bf16, yf};
    int big = O * K * (bf16 ? 2 : 4) >= PARALLEL_BYTES;
    if (sched)
        run_pooled(linear_part, &j, big ? POOLED_PARTS : 1, sched, pool);
    else
        run_parallel(linear_task, &j, big ? threads : 1);
    for (long i = 0; i < n * O; i++) store1(y, i, yf[i], bf16);
    return 0;
}

/* y (n, O) = x (n, K) @ W.T for W (O, K); x, W and y all fp32, or all bf16 (sums in fp32,
 * rounded once). Returns 0, or -1 when scratch memory could not be had. */
int wb_linear(const void *x, long n, long K, const void *w, long O, int bf16, void *y,
              int threads) {
    return linear_run(x, n, K, w, O, bf16, y, threads, NULL, NULL);
}

/* wb_linear with a helper task on the caller's thread pool (sched(pool, task, data) runs
 * task(data) there, or at once on this thread) instead of the kernels' worker thread */
int wb_linear_pooled(const void *x, long n, long K, const void *w, long O, int bf16, void *y,
                     schedule_fn sched, void *pool) {
    return linear_run(x, n, K, w, O, bf16, y, 1, sched, pool);
}

/* Whole experts for two threads to take, from both ends of a list ordered by rows (most
 * first): the calling thread takes from the front, the worker from the back. An expert with
 * many rows is arithmetic-bound and one with few is bound by its reads, so one core's
 * arithmetic runs while the other core reads (taken in index order, both cores often computed
 * or both read at once). Which thread runs an expert does not change its values. */
typedef struct {
    long *order;       /* expert slots by rows, most first (ties in slot order) */
    long n;
    atomic_llong ends; /* taken from the front | taken from the back << 32 */
} two_ends;

/* the order of n experts' rows (count64, or count32 when count64 is NULL); 0 without memory */
static int two_ends_init(two_ends *t, long n, const int64_t *count64, const int32_t *count32) {
    t->order = malloc(sizeof(long) * (n > 0 ? n : 1));
    if (!t->order) return 0;
    t->n = n;
    atomic_init(&t->ends, 0);
    for (long e = 0, k; e < n; e++) { /* insertion sort: a few hundred experts at most */
        long c = count64 ? (long)count64[e] : (long)count32[e];
        for (k = e; k > 0; k--) {
            long o = t->order[k - 1];
            if ((count64 ? (long)count64[o] : (long)count32[o]) >= c) break;
            t->order[k] = o;
        }
        t->order[k] = e;
    }
    return 1;
}

/* the next expert slot for thread tid (0: the front, 1: the back), or -1 when none is left */
static long take_expert(two_ends *t, int tid) {
    long long w = atomic_load(&t->ends), f, b;
    do {
        f = w & 0xffffffffLL;
        b = w >> 32;
        if (f + b >= t->n) return -1;
    } while (!atomic_compare_exchange_weak(&t->ends, &w, tid ? w + (1LL << 32) : w + 1));
    return t->order[tid ? t->n - 1 - b : f];
}

typedef struct {
    const void *x;          /* (A, D) rows, each expert's rows contiguous */
    const int64_t *start;   /* nexp: the first row of each expert */
    const int64_t *count;   /* nexp: its number of rows */
    const int64_t *ids;     /* nexp expert ids */
    long nexp, D, I;
    const void *gu, *dn;    /* (E, D, 2I), (E, I, D) */
    int bf16;
    void *out;              /* (A, D), the dtype of x */
    float *xf, *part[2], *h; /* (ROWS, D), two partial sums, (ROWS, I) */
    float *own[2];           /* by_expert: each thread's own xf, part[2] and h */
    int by_expert;           /* the threads take whole experts (from take) */
    two_ends *take;          /* by_expert: the experts left to take */
} experts_job;

#define ROWS 32 /* rows per pass through an expert's weights (more: another pass) */

static int by_expert_mode = 1;
/* 0: two threads always split each expert's product in halves (for measurements) */
void wb_set_by_expert(int on) { by_expert_mode = on; }

/* the first half of 0..K (a multiple of 4): each half of a product's sum is one thread's
 * contiguous part of the weight, and the halves are added the same way on one thread */
static long half_k(long K) { return ((K / 2 + 3) / 4) * 4 < K ? ((K / 2 + 3) / 4) * 4 : K; }

#define AWAY 2048 /* bytes from the weights' page offset: half a page */
#define SLACK 1024 /* floats past each partial-sum buffer, for away_from */

/* p (64-byte aligned, SLACK floats to spare) moved on so that it lies half a page from w
 * modulo a page. A product stores its partial sums at p while it loads W's rows, and a load
 * whose address matches a store still in flight in its low 12 bits waits for that store (4K
 * aliasing): with W's rows a multiple of 4 KB long (every fp32 shape here), sums placed at
 * W's page offset would make every weight load wait. */
static inline float *away_from(float *p, const void *w) {
    uintptr_t d = ((uintptr_t)w + AWAY - (uintptr_t)p) & 4095;
    return (float *)((char *)p + (d & ~(uintptr_t)63));
}

/* rows r0 .. r0 + n of expert slot e, whole, on this thread: the same sums, in the same
 * order, as the two threads' halves of experts_task */
static void expert_alone(experts_job *j, long e, long r0, long n, float *xf, float *p0,
                         float *p1, float *h) {
    long D = j->D, I = j->I, kd = half_k(D), ki = half_k(I);
    int es = j->bf16 ? 2 : 4;
    const char *gu = (const char *)j->gu + j->ids[e] * D * 2 * I * es;
    const char *dn = (const char *)j->dn + j->ids[e] * I * D * es;
    to_f32((const char *)j->x + r0 * D * es, n * D, j->bf16, xf);
    float *g0 = away_from(p0, gu), *g1 = away_from(p1, gu);
    axpy_mm(xf, n, D, 0, kd, gu, 2 * I, j->bf16, g0);
    axpy_mm(xf, n, D, kd, D, gu, 2 * I, j->bf16, g1);
    for (long r = 0; r < n; r++)
        for (long i = 0; i < I; i++) {
            float g = g0[r * 2 * I + i] + g1[r * 2 * I + i];
            float u = g0[r * 2 * I + I + i] + g1[r * 2 * I + I + i];
            h[r * I + i] = swiglu1(g, u, j->bf16);
        }
    float *d0 = away_from(p0, dn), *d1 = away_from(p1, dn);
    axpy_mm(h, n, I, 0, ki, dn, D, j->bf16, d0);
    axpy_mm(h, n, I, ki, I, dn, D, j->bf16, d1);
    for (long r = 0; r < n; r++)
        for (long d = 0; d < D; d++)
            store1(j->out, (r0 + r) * D + d, d0[r * D + d] + d1[r * D + d], j->bf16);
}

static void experts_task(void *arg, int tid, int nthreads) {
    experts_job *j = arg;
    long D = j->D, I = j->I, kd = half_k(D), ki = half_k(I);
    if (j->by_expert) { /* whole experts, taken in turn (each reads its own weights) */
        long p = 2 * I > D ? 2 * I : D;
        float *xf = j->own[tid], *p0 = xf + ROWS * D, *p1 = p0 + ROWS * p + SLACK;
        float *h = p1 + ROWS * p + SLACK;
        for (long e; (e = take_expert(j->take, tid)) >= 0;)
            for (long r0 = j->start[e], end = r0 + j->count[e]; r0 < end; r0 += ROWS)
                expert_alone(j, e, r0, end - r0 < ROWS ? end - r0 : ROWS, xf, p0, p1, h);
        return;
    }
    int es = j->bf16 ? 2 : 4;
    long i0, i1, d0, d1;
    share(I, tid, nthreads, &i0, &i1);
    share(D, tid, nthreads, &d0, &d1);
    for (long e = 0; e < j->nexp; e++) {
        const char *gu = (const char *)j->gu + j->ids[e] * D * 2 * I * es;
        const char *dn = (const char *)j->dn + j->ids[e] * I * D * es;
        float *g[2] = {away_from(j->part[0], gu), away_from(j->part[1], gu)};
        float *dp[2] = {away_from(j->part[0], dn), away_from(j->part[1], dn)};
        for (long r0 = j->start[e], end = r0 + j->count[e]; r0 < end; r0 += ROWS) {
            long n = end - r0 < ROWS ? end - r0 : ROWS;
            if (tid == 0) to_f32((const char *)j->x + r0 * D * es, n * D, j->bf16, j->xf);
            barrier2(nthreads);
            for (int t = tid; t < 2; t += nthreads) /* [g | u] = x @ GU[e], half of D each */
                axpy_mm(j->xf, n, D, t ? kd : 0, t ? D : kd, gu, 2 * I, j->bf16, g[t]);
            barrier2(nthreads);
            for (long r = 0; r < n; r++) { /* h = silu(g) * u on this thread's columns */
                const float *p0 = g[0] + r * 2 * I, *p1 = g[1] + r * 2 * I;
                float *h = j->h + r * I;
                for (long i = i0; i < i1; i++) {
                    float g = p0[i] + p1[i], u = p0[I + i] + p1[I + i];
                    h[i] = swiglu1(g, u, j->bf16);
                }
            }
            barrier2(nthreads);
            for (int t = tid; t < 2; t += nthreads) /* h @ DN[e], half of I each */
                axpy_mm(j->h, n, I, t ? ki : 0, t ? I : ki, dn, D, j->bf16, dp[t]);
            barrier2(nthreads);
            for (long r = 0; r < n; r++) {
                const float *p0 = dp[0] + r * D, *p1 = dp[1] + r * D;
                for (long d = d0; d < d1; d++)
                    store1(j->out, (r0 + r) * D + d, p0[d] + p1[d], j->bf16);
            }
            barrier2(nthreads); /* the buffers are reused by the next pass */
        }
    }
}

/* Rows of x (A, D) through their experts' SwiGLU into the same rows of out: expert ids[e]
 * takes rows start[e] .. start[e] + count[e]. x, the weights and out are all fp32, or all
 * bf16 (products summed in fp32, each intermediate rounded to bf16 as the model computes it).
 * Returns 0, or -1 when scratch memory could not be had. */
int wb_experts(const void *x, const int64_t *start, const int64_t *count, const int64_t *ids,
               long nexp, const void *gu, const void *dn, long D, long I, int bf16, void *out,
               int threads) {
    long p = 2 * I > D ? 2 * I : D; /* a partial sum: (rows, 2I), then (rows, D) */
    size_t one = (size_t)ROWS * (D + 2 * p + I) + 2 * SLACK;
    float *buf = scratch(2 * one);
    if (!buf) return -1;
    experts_job j = {x, start, count, ids, nexp, D, I, gu, dn, bf16, out,
                     buf, {buf + ROWS * D, buf + ROWS * (D + p) + SLACK},
                     buf + ROWS * (D + 2 * p) + 2 * SLACK,
                     {buf, buf + one}, 0, NULL};
    int t = 3 * D * I * (bf16 ? 2 : 4) >= PARALLEL_BYTES ? threads : 1;
    /* two threads: whole experts each when there are several (two weight streams, no
     * barriers), one expert's halves otherwise; the same values either way */
    j.by_expert = t > 1 && nexp > 1 && by_expert_mode;
    two_ends take;
    if (j.by_expert) {
        if (!two_ends_init(&take, nexp, count, NULL)) return -1;
        j.take = &take;
    }
    run_parallel(experts_task, &j, t);
    if (j.by_expert) free(take.order);
    return 0;
}

typedef struct {
    const void *x;            /* (A, D) rows sorted by expert */
    const int32_t *count;     /* nexp: rows of each expert, in order */
    long nexp, A, D, I;
    const void *const *gu;    /* nexp pointers to (2I, D): [gate; up], nn.Linear layout */
    const void *const *dn;    /* nexp pointers to (D, I) */
    int bf16;
    void *out;                /* (A, D) */
    float *xf, *g, *h;        /* (ROWS, D), (ROWS, 2I), (ROWS, I) */
    const long *start;        /* by expert: each expert's first row (else NULL) */
    float *own[2];            /* by expert: each thread's xf, g and h */
    two_ends *take;           /* by expert: the experts left to take */
} experts_oi_job;

/* gate and up outputs [i0, i1) of n rows x through expert slot e, then their h columns */
static void oi_up(experts_oi_job *j, long e, const float *x, long n, long i0, long i1) {
    long I = j->I;
    dot_mm(x, NULL, n, j->D, j->gu[e], j->bf16, i0, i1, j->g, 2 * I);
    dot_mm(x, NULL, n, j->D, j->gu[e], j->bf16, I + i0, I + i1, j->g, 2 * I);
    for (long r = 0; r < n; r++) {
        const float *g = j->g + r * 2 * I, *u = g + I;
        float *h = j->h + r * I;
        for (long i = i0; i < i1; i++) h[i] = swiglu1(g[i], u[i], j->bf16);
    }
}

/* the down product's outputs [d0, d1) of n rows of h through expert slot e, stored into
 * rows r0 .. r0 + n of out (its (n, D) results in the gate/up buffer, no longer needed) */
static void oi_down(experts_oi_job *j, long e, long r0, long n, long d0, long d1) {
    long D = j->D;
    float *o = j->g;
    dot_mm(j->h, NULL, n, j->I, j->dn[e], j->bf16, d0, d1, o, D);
    for (long r = 0; r < n; r++)
        for (long d = d0; d < d1; d++) store1(j->out, (r0 + r) * D + d, o[r * D + d], j->bf16);
}

/* rows of whole experts on this thread, the experts taken from j->take (two weight streams,
 * no barriers): the same sums as the threads' column shares of experts_oi_task */
static void experts_oi_alone(experts_oi_job *j, int tid) {
    experts_oi_job t = *j; /* this thread's buffers */
    long D = j->D, I = j->I, g = 2 * I > D ? 2 * I : D;
    t.xf = j->own[tid];
    t.g = t.xf + ROWS * D;
    t.h = t.g + ROWS * g;
    for (long e; (e = take_expert(j->take, tid)) >= 0;) {
        long end = j->start[e] + j->count[e];
        if (end > j->A) end = j->A;
        for (long r0 = j->start[e]; r0 < end; r0 += ROWS) {
            long n = end - r0 < ROWS ? end - r0 : ROWS;
            const float *x = (const float *)j->x + r0 * D;
            if (j->bf16) {
                to_f32((const char *)j->x + r0 * D * 2, n * D, 1, t.xf);
                x = t.xf;
            }
            oi_up(&t, e, x, n, 0, I);
            oi_down(&t, e, r0, n, 0, D);
        }
    }
}

static void experts_oi_task(void *arg, int tid, int nthreads) {
    experts_oi_job *j = arg;
    long D = j->D, I = j->I, done = 0;
    int es = j->bf16 ? 2 : 4;
    long i0, i1, d0, d1;
    if (j->start && nthreads > 1) {
        experts_oi_alone(j, tid);
        long total = j->start[j->nexp - 1] + j->count[j->nexp - 1];
        if (tid == 0) /* rows past the experts' counts are zero */
            for (long r = total < j->A ? total : j->A; r < j->A; r++)
                for (long d = 0; d < D; d++) store1(j->out, r * D + d, 0.0f, j->bf16);
        return;
    }
    share(I, tid, nthreads, &i0, &i1);
    share(D, tid, nthreads, &d0, &d1);
    for (long e = 0; e < j->nexp; e++) {
        long end = done + j->count[e];
        if (end > j->A) end = j->A;
        for (long r0 = done; r0 < end; r0 += ROWS) {
            long n = end - r0 < ROWS ? end - r0 : ROWS;
            const float *x;
            if (j->bf16) {
                if (tid == 0) to_f32((const char *)j->x + r0 * D * es, n * D, 1, j->xf);
                barrier2(nthreads);
                x = j->xf;
            } else {
                x = (const float *)j->x + r0 * D;
            }
            oi_up(j, e, x, n, i0, i1); /* this thread's gate, up and h columns */
            barrier2(nthreads);        /* the down product needs every h column */
            oi_down(j, e, r0, n, d0, d1);
            barrier2(nthreads); /* the buffers are reused by the next pass */
        }
        done = end;
    }
    /* rows past the experts' counts (assignments outside this group of experts) are zero */
    for (long r = done; r < j->A; r++)
        for (long d = d0; d < d1; d++) store1(j->out, r * D + d, 0.0f, j->bf16);
}

/* one pass of wb_experts_oi_pooled: rows r0 .. r0 + n (x: them in fp32) of expert slot e */
typedef struct {
    experts_oi_job *j;
    long e, r0, n;
    const float *x;
} oi_pass;

/* part p of a pass's gate/up columns, then of its down product (as experts_oi_task) */
static void oi_up_part(void *arg, long p, long np) {
    oi_pass *b = arg;
    long i0, i1;
    part_range(b->j->I, p, np, &i0, &i1);
    if (i1 > i0) oi_up(b->j, b->e, b->x, b->n, i0, i1);
}

static void oi_down_part(void *arg, long p, long np) {
    oi_pass *b = arg;
    long d0, d1;
    part_range(b->j->D, p, np, &d0, &d1);
    if (d1 > d0) oi_down(b->j, b->e, b->r0, b->n, d0, d1);
}

static int experts_oi_run(const void *x, long A, const int32_t *count, long nexp,
                          const void *const *gu, const void *const *dn, long D, long I,
                          int bf16, void *out, int threads, schedule_fn sched, void *pool) {
    long g = 2 * I > D ? 2 * I : D, one = ROWS * (D + g + I);
    int big = 3 * D * I * (bf16 ? 2 : 4) >= PARALLEL_BYTES;
    /* two threads and several experts with rows: whole experts each (as wb_experts) */
    long used = 0;
    for (long e = 0; e < nexp; e++) used += count[e] > 0;
    int alone = !sched && big && threads > 1 && used > 1 && by_expert_mode;
    float *buf = scratch((size_t)(alone ? 2 * one + 2 * nexp : one));
    if (!buf) return -1;
    experts_oi_job j = {x, count, nexp, A, D, I, gu, dn, bf16, out,
                        buf, buf + ROWS * D, buf + ROWS * (D + g), NULL, {buf, buf + one}, NULL};
    two_ends take;
    if (alone) {
        long *start = (long *)(buf + 2 * one); /* nexp longs in the 2 * nexp floats past */
        for (long e = 0, r = 0; e < nexp; r += count[e], e++) start[e] = r;
        if (!two_ends_init(&take, nexp, NULL, count)) return -1;
        j.start = start;
        j.take = &take;
    }
    if (!sched) {
        run_parallel(experts_oi_task, &j, big ? threads : 1);
        if (alone) free(take.order);
        return 0;
    }
    /* on a host pool: each pass's two products in parts, the same sums as experts_oi_task */
    long done = 0, parts = big ? POOLED_PARTS : 1;
    for (long e = 0; e < nexp; e++) {
        long end = done + count[e];
        if (end > A) end = A;
        for (long r0 = done; r0 < end; r0 += ROWS) {
            oi_pass b = {&j, e, r0, end - r0 < ROWS ? end - r0 : ROWS,
                         (const float *)x + r0 * D};
            if (bf16) {
                to_f32((const char *)x + r0 * D * 2, b.n * D, 1, j.xf);
                b.x = j.xf;
            }
            run_pooled(oi_up_part, &b, parts, sched, pool);
            run_pooled(oi_down_part, &b, parts, sched, pool);
        }
        done = end;
    }
    for (long r = done; r < A; r++)
        for (long d = 0; d < D; d++) store1(out, r * D + d, 0.0f, bf16);
    return 0;
}

/* out (A, D): rows of x (A, D), sorted by expert, through their experts' SwiGLU, expert e
 * (weights gu[e] (2I, D), dn[e] (D, I), nn.Linear layout) taking the next count[e] rows; rows
 * past them are zero. fp32 or bf16 throughout as wb_experts. Returns 0, or -1 when scratch
 * memory could not be had. */
int wb_experts_oi(const void *x, long A, const int32_t *count, long nexp,
                  const void *const *gu, const void *const *dn, long D, long I, int bf16,
                  void *out, int threads) {
    return experts_oi_run(x, A, count, nexp, gu, dn, D, I, bf16, out, threads, NULL, NULL);
}

/* wb_experts_oi with helper tasks on the caller's thread pool, as wb_linear_pooled */
int wb_experts_oi_pooled(const void *x, long A, const int32_t *count, long nexp,
                         const void *const *gu, const void *const *dn, long D, long I,
                         int bf16, void *out, schedule_fn sched, void *pool) {
    return experts_oi_run(x, A, count, nexp, gu, dn, D, I, bf16, out, 1, sched, pool);
}

/* out (n, D) = RMSNorm of each row of x (fp32, or bf16 when bf16), as transformers' Llama 4
 * norm: r = 1 / sqrt(mean(x^2) + eps) in fp32 (squares summed in a fixed order), y = x * r
 * rounded to x's dtype, then y * w (w (D), x's dtype, rounded again) when w is given. One
 * call replaces the seven small ops of the eager norm (a decode step runs 15 of them). */
void wb_rms_norm(const void *x, long n, long D, const void *w, float eps, int bf16, void *out) {
    for (long r = 0; r < n; r++) {
        long off = r * D, k = 0;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (; k + 16 <= D; k += 16) {
            __m256 v0 = load8(x, off + k, bf16), v1 = load8(x, off + k + 8, bf16);
            a0 = _mm256_fmadd_ps(v0, v0, a0);
            a1 = _mm256_fmadd_ps(v1, v1, a1);
        }
        float s = hsum(_mm256_add_ps(a0, a1));
        for (; k < D; k++) {
            float v = load1(x, off + k, bf16);
            s += v * v;
        }
        float inv = 1.0f / sqrtf(s / (float)D + eps);
        __m256 vinv = _mm256_set1_ps(inv);
        for (k = 0; k + 8 <= D; k += 8) {
            __m256 y = _mm256_mul_ps(load8(x, off + k, bf16), vinv);
            if (w) {
                if (bf16) y = round8_bf16(y);
                y = _mm256_mul_ps(y, load8(w, k, bf16));
            }
            store8(out, off + k, y, bf16);
        }
        for (; k < D; k++) {
            float y = load1(x, off + k, bf16) * inv;
            if (w) {
                if (bf16) y = round_bf16(y);
                y *= load1(w, k, bf16);
            }
            store1(out, off + k, y, bf16);
        }
    }
}

/* out (B, N, S, d), contiguous = x (B, N, S, d) (element strides sb, sn, ss; the last dimension
 * contiguous; fp32, or bf16 when bf16) with its interleaved pairs rotated as transformers'
 * complex RoPE: out[2i] = x[2i] c - x[2i+1] s, out[2i+1] = x[2i] s + x[2i+1] c, with c, s the
 * fp32 tables (S, d/2) (cb: their batch stride, 0 when shared). Each product and each sum is
 * rounded to fp32 on its own (no FMA), as torch's complex multiply rounds. */
__attribute__((optimize("fp-contract=off")))
void wb_rope(const void *x, long B, long N, long S, long d, long sb, long sn, long ss,
             const float *cos, const float *sin, long cb, int bf16, void *out) {
    const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    long h = d / 2;
    for (long b = 0; b < B; b++)
        for (long n = 0; n < N; n++)
            for (long t = 0; t < S; t++) {
                long xo = b * sb + n * sn + t * ss, oo = ((b * N + n) * S + t) * d;
                const float *c = cos + b * cb + t * h, *s = sin + b * cb + t * h;
                long i = 0;
                for (; i + 4 <= h; i += 4) {
                    __m256 v = load8(x, xo + 2 * i, bf16);
                    __m256 cc = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(c + i)), dup);
                    __m256 sc = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s + i)), dup);
                    __m256 ac = _mm256_mul_ps(v, cc);                            /* a c, b c */
                    __m256 bs = _mm256_mul_ps(_mm256_permute_ps(v, 0xB1), sc);   /* b s, a s */
                    store8(out, oo + 2 * i, _mm256_addsub_ps(ac, bs), bf16);     /* ac - bs, bc + as */
                }
                for (; i < h; i++) {
                    float a = load1(x, xo + 2 * i, bf16), bb = load1(x, xo + 2 * i + 1, bf16);
                    float ac = a * c[i], bs = bb * s[i], as = a * s[i], bc = bb * c[i];
                    store1(out, oo + 2 * i, ac - bs, bf16);
                    store1(out, oo + 2 * i + 1, bc + as, bf16);
                }
            }
}

typedef struct {
    const void *q, *k, *v;
    long B, H, G, T, d, qb, qh, kb, kh, kt, vb, vh, vt;
    float scale;
    int bf16;
    float *p;  /* (B, H, T) fp32 scratch: the scores, then their exponentials */
    void *out; /* (B, H, d) */
} attn1_job;

/* keys a tile: the query heads of a kv head take turns over a tile of keys (or values), which
 * stays in L1 meanwhile, so the cache is read from memory once per kv head, not once per query
 * head. The first head reads the tile key by key, in address order (as the memory streams
 * fastest); the others four keys at a time (scores) or with 32 sums in registers over the
 * tile (values), from L1. Each head's sums run in the same order throughout: the same bits
 * as one head at a time, key by key. */
#define ATT_TILE 32
/* floats of the accumulators of the query heads that share the tiles at a time */
#define ATT_ACC 4096

/* the score of query head h against key t, times the scale */
static inline float attn1_score(const attn1_job *j, long b, long g, long h, long t) {
    long d = j->d, bf = j->bf16, e = 0;
    const long qo = b * j->qb + h * j->qh, ko = b * j->kb + g * j->kh + t * j->kt;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    for (; e + 16 <= d; e += 16) {
        a0 = _mm256_fmadd_ps(load8(j->q, qo + e, bf), load8(j->k, ko + e, bf), a0);
        a1 = _mm256_fmadd_ps(load8(j->q, qo + e + 8, bf), load8(j->k, ko + e + 8, bf), a1);
    }
    float sdot = hsum(_mm256_add_ps(a0, a1));
    for (; e < d; e++) sdot += load1(j->q, qo + e, bf) * load1(j->k, ko + e, bf);
    return sdot * j->scale;
}

/* the scores of query head h against keys t .. t + 3, times the scale, into p[t .. t + 3]:
 * attn1_score's sums (d a multiple of 16), the four horizontal sums by hadd in the same tree */
static inline void attn1_score4(const attn1_job *j, long b, long g, long h, long t, float *p) {
    long d = j->d, bf = j->bf16;
    const long qo = b * j->qb + h * j->qh, ko = b * j->kb + g * j->kh + t * j->kt, kt = j->kt;
    __m256 a0[4], a1[4];
    for (int r = 0; r < 4; r++) a0[r] = a1[r] = _mm256_setzero_ps();
    for (long e = 0; e < d; e += 16) {
        __m256 q0 = load8(j->q, qo + e, bf), q1 = load8(j->q, qo + e + 8, bf);
        for (int r = 0; r < 4; r++) {
            a0[r] = _mm256_fmadd_ps(q0, load8(j->k, ko + r * kt + e, bf), a0[r]);
            a1[r] = _mm256_fmadd_ps(q1, load8(j->k, ko + r * kt + e + 8, bf), a1[r]);
        }
    }
    /* per key u = a0 + a1, then ((u0 + u1) + (u2 + u3)) + ((u4 + u5) + (u6 + u7)) */
    __m256 h01 = _mm256_hadd_ps(_mm256_add_ps(a0[0], a1[0]), _mm256_add_ps(a0[1], a1[1]));
    __m256 h23 = _mm256_hadd_ps(_mm256_add_ps(a0[2], a1[2]), _mm256_add_ps(a0[3], a1[3]));
    __m256 q4 = _mm256_hadd_ps(h01, h23);
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(q4), _mm256_extractf128_ps(q4, 1));
    _mm_storeu_ps(p, _mm_mul_ps(sum, _mm_set1_ps(j->scale)));
}

/* query heads h0 .. h1 of kv head g in batch row b (acc: (h1 - h0) * d floats) */
static void attn1_heads(const attn1_job *j, long b, long g, long h0, long h1, float *acc) {
    long T = j->T, d = j->d, bf = j->bf16, n = h1 - h0;
    float *p0 = j->p + (b * j->H + h0) * T; /* head h0 + i's scores: p0 + i * T */
    for (long t0 = 0; t0 < T; t0 += ATT_TILE) {
        long t1 = t0 + ATT_TILE < T ? t0 + ATT_TILE : T;
        for (long i = 0; i < n; i++) {
            long t = t0;
            if (i > 0 && d % 16 == 0) /* the first head reads the tile in order */
                for (; t + 4 <= t1; t += 4) attn1_score4(j, b, g, h0 + i, t, p0 + i * T + t);
            for (; t < t1; t++) p0[i * T + t] = attn1_score(j, b, g, h0 + i, t);
        }
    }
    float sums[n];
    for (long i = 0; i < n; i++) {
        float *p = p0 + i * T, mx = -INFINITY, sum = 0.0f;
        for (long t = 0; t < T; t++) mx = p[t] > mx ? p[t] : mx;
        for (long t = 0; t < T; t++) {
            /* every score -inf (or NaN): NaN, as softmax gives */
            p[t] = expf(p[t] - mx);
            sum += p[t];
        }
        sums[i] = sum;
    }
    for (long e = 0; e < n * d; e++) acc[e] = 0.0f;
    for (long t0 = 0; t0 < T; t0 += ATT_TILE) {
        long t1 = t0 + ATT_TILE < T ? t0 + ATT_TILE : T;
        for (long i = 0; i < n; i++) {
            float *a = acc + i * d;
            const float *p = p0 + i * T;
            long e = 0;
            /* 32 of the d sums at a time stay in registers over the tile's values (after
             * the first head, which reads the tile in order) */
            for (; i > 0 && e + 32 <= d; e += 32) {
                __m256 c0 = _mm256_loadu_ps(a + e), c1 = _mm256_loadu_ps(a + e + 8);
                __m256 c2 = _mm256_loadu_ps(a + e + 16), c3 = _mm256_loadu_ps(a + e + 24);
                for (long t = t0; t < t1; t++) {
                    long vo = b * j->vb + g * j->vh + t * j->vt + e;
                    /* bf16: the weights are rounded to bf16 before they multiply the values */
                    __m256 w = _mm256_set1_ps(bf ? round_bf16(p[t]) : p[t]);
                    c0 = _mm256_fmadd_ps(w, load8(j->v, vo, bf), c0);
                    c1 = _mm256_fmadd_ps(w, load8(j->v, vo + 8, bf), c1);
                    c2 = _mm256_fmadd_ps(w, load8(j->v, vo + 16, bf), c2);
                    c3 = _mm256_fmadd_ps(w, load8(j->v, vo + 24, bf), c3);
                }
                _mm256_storeu_ps(a + e, c0);
                _mm256_storeu_ps(a + e + 8, c1);
                _mm256_storeu_ps(a + e + 16, c2);
                _mm256_storeu_ps(a + e + 24, c3);
            }
            for (long t = t0; t < t1; t++) {
                long vo = b * j->vb + g * j->vh + t * j->vt, f = e;
                float wt = bf ? round_bf16(p[t]) : p[t];
                __m256 w = _mm256_set1_ps(wt);
                for (; f + 8 <= d; f += 8)
                    _mm256_storeu_ps(a + f, _mm256_fmadd_ps(w, load8(j->v, vo + f, bf),
                                                            _mm256_loadu_ps(a + f)));
                for (; f < d; f++) a[f] += wt * load1(j->v, vo + f, bf);
            }
        }
    }
    for (long i = 0; i < n; i++) {
        float inv = 1.0f / sums[i];
        for (long e = 0; e < d; e++)
            store1(j->out, (b * j->H + h0 + i) * d + e, acc[i * d + e] * inv, bf);
    }
}

static void attn1_task(void *arg, int tid, int nthreads) {
    attn1_job *j = arg;
    long groups = j->B * (j->H / j->G), g0, g1;
    if (nthreads < 2) {
        g0 = 0;
        g1 = groups;
    } else {
        g0 = tid == 0 ? 0 : groups / 2;
        g1 = tid == 0 ? groups / 2 : groups;
    }
    long G = j->G, step = ATT_ACC / j->d > 0 ? ATT_ACC / j->d : 1;
    if (step > G) step = G;
    float acc[step * j->d];
    for (long x = g0; x < g1; x++) {
        long b = x / (j->H / G), g = x % (j->H / G);
        for (long i = 0; i < G; i += step)
            attn1_heads(j, b, g, g * G + i, g * G + (i + step < G ? i + step : G), acc);
    }
}

/* out (B, H, 1, d), contiguous = softmax(q k^T * scale) v for one query per head over all T
 * keys (a decode step that sees every key in its cache): q (B, H, 1, d), k and v (B, H / G,
 * T, d) with element strides (q: qb, qh; k: kb, kh, kt; v: vb, vh, vt), the last dimension
 * contiguous, query head h reading kv head h / G; fp32, or bf16 when bf16. Scores, softmax
 * and the weighted sum in fp32; in bf16 the softmax weights are rounded to bf16 before they
 * multiply v (as torch's CPU flash attention), the output once at the end. Two threads (by
 * kv head) when the keys and values are large enough to share. Returns 0, or -1 when scratch
 * memory could not be had. */
int wb_attn1(const void *q, long B, long H, long G, long T, long d, long qb, long qh,
             const void *k, long kb, long kh, long kt, const void *v, long vb, long vh, long vt,
             float scale, int bf16, void *out, int threads) {
    float *p = scratch((size_t)(B * H * T));
    if (!p && B * H * T > 0) return -1;
    attn1_job j = {q, k, v, B, H, G, T, d, qb, qh, kb, kh, kt, vb, vh, vt, scale, bf16, p, out};
    long kv_bytes = 2 * B * (H / G) * T * d * (bf16 ? 2 : 4);
    run_parallel(attn1_task, &j, kv_bytes >= PARALLEL_BYTES && B * (H / G) > 1 ? threads : 1);
    return 0;
}

/* 1 when this CPU runs these kernels (AVX2 and FMA) */
int wb_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
