// The streaming CPU kernels of cpukernels.c as XLA FFI handlers, for the jax backend.
//
//   wb_linear(x (..., K), w (O, K)) -> y (..., O): x @ w.T, fp32 or bf16 throughout,
//   wb_experts(x (A, D), counts (E,) int32, gate_up_0 .. gate_up_{E-1} (2I, D),
//              down_0 .. down_{E-1} (D, I)) -> out (A, D): rows of x sorted by expert, expert e
//              taking the next counts[e] rows through its SwiGLU; the rows past them are zero.
//   wb_experts_at(x (A, D), counts (E,) int32, table (2, 2E) int32) -> out (A, D): the same,
//              the weights given by address (each row E 64-bit addresses as int32 pairs, jax
//              being 32-bit by default: row 0 gate_up_e, row 1 down_e, C order, x's dtype;
//              the attribute inter is I), so a step does not pass 2E arrays.
//   wb_attn1(q (B, H, 1, d), k (B, K, cap, d), v (B, K, cap, d), keys (2,) int32) -> out
//              (B, H, 1, d): one query per head over the keys in slots keys[0] ..
//              keys[0] + keys[1] of the cache (a decoding step), query head h reading kv head
//              h / (H / K); the attribute scale (f32).
//   All take the attribute threads (int32): 1, or 2 to let the kernels' worker thread help,
//   or 0: helper tasks on XLA's intra-op thread pool instead (never competing with its threads;
//   not wb_attn1).
#include <cstdint>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" int wb_linear(const void *x, long n, long K, const void *w, long O, int bf16,
                         void *y, int threads);
extern "C" int wb_linear_pooled(const void *x, long n, long K, const void *w, long O, int bf16,
                                void *y, void (*sched)(void *, void (*)(void *), void *),
                                void *pool);

// runs task(data) on XLA's intra-op thread pool (or at once here, when it has none)
static void schedule_on(void *pool, void (*task)(void *), void *data) {
    static_cast<ffi::ThreadPool *>(pool)->Schedule([task, data] { task(data); });
}
extern "C" int wb_attn1(const void *q, long B, long H, long G, long T, long d, long qb,
                        long qh, const void *k, long kb, long kh, long kt, const void *v,
                        long vb, long vh, long vt, float scale, int bf16, void *out,
                        int threads);
extern "C" int wb_experts_oi(const void *x, long A, const int32_t *count, long nexp,
                             const void *const *gu, const void *const *dn, long D, long I,
                             int bf16, void *out, int threads);
extern "C" int wb_experts_oi_pooled(const void *x, long A, const int32_t *count, long nexp,
                                    const void *const *gu, const void *const *dn, long D,
                                    long I, int bf16, void *out,
                                    void (*sched)(void *, void (*)(void *), void *), void *pool);

static ffi::Error Linear(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                         ffi::Result<ffi::AnyBuffer> y, int32_t threads) {
    auto wd = w.dimensions();
    if (wd.size() != 2) return ffi::Error::InvalidArgument("wb_linear: the weight must be 2-D");
    long O = wd[0], K = wd[1];
    auto xt = x.element_type();
    if (xt != w.element_type() || xt != y->element_type() ||
        (xt != ffi::DataType::F32 && xt != ffi::DataType::BF16))
        return ffi::Error::InvalidArgument("wb_linear: x, w and y must all be f32 or all bf16");
    auto xd = x.dimensions();
    if (xd.size() < 1 || xd[xd.size() - 1] != K)
        return ffi::Error::InvalidArgument("wb_linear: x's last axis must match w's");
    long n = K ? (long)(x.element_count() / K) : 0;
    if ((long)y->element_count() != n * O)
        return ffi::Error::InvalidArgument("wb_linear: y must hold (..., O) values");
    int bf16 = xt == ffi::DataType::BF16;
    // threads 0: a helper task on XLA's own pool (it never competes with XLA's threads)
    if (threads == 0 ? wb_linear_pooled(x.untyped_data(), n, K, w.untyped_data(), O, bf16,
                                        y->untyped_data(), schedule_on, &pool)
                     : wb_linear(x.untyped_data(), n, K, w.untyped_data(), O, bf16,
                                 y->untyped_data(), threads))
        return ffi::Error::Internal("wb_linear: no memory for the kernel's scratch");
    return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(WbLinear, Linear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("threads"));

// whether x and out are both (A, D), one dtype, f32 or bf16 (A and D then set)
static bool ExpertRows(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> &out, long *A,
                       long *D) {
    auto xd = x.dimensions();
    auto xt = x.element_type();
    if (xd.size() != 2 || (xt != ffi::DataType::F32 && xt != ffi::DataType::BF16) ||
        out->element_type() != xt || out->element_count() != x.element_count())
        return false;
    *A = xd[0];
    *D = xd[1];
    return true;
}

// the expert kernel on the weights gu[e], dn[e], on XLA's pool (threads 0) or threads
static ffi::Error RunExperts(const char *name, ffi::ThreadPool &pool, ffi::AnyBuffer x,
                            ffi::Buffer<ffi::S32> counts, const void *const *gu,
                            const void *const *dn, long I, ffi::Result<ffi::AnyBuffer> &out,
                            int32_t threads) {
    long A = x.dimensions()[0], D = x.dimensions()[1], E = (long)counts.element_count();
    int bf16 = x.element_type() == ffi::DataType::BF16;
    if (threads == 0 ? wb_experts_oi_pooled(x.untyped_data(), A, counts.typed_data(), E, gu, dn,
                                            D, I, bf16, out->untyped_data(), schedule_on, &pool)
                     : wb_experts_oi(x.untyped_data(), A, counts.typed_data(), E, gu, dn, D, I,
                                     bf16, out->untyped_data(), threads))
        return ffi::Error::Internal(std::string(name) + ": no memory for the kernel's scratch");
    return ffi::Error::Success();
}

static ffi::Error Experts(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> counts,
                          ffi::RemainingArgs ws, ffi::Result<ffi::AnyBuffer> out,
                          int32_t threads) {
    long A, D;
    if (!ExpertRows(x, out, &A, &D))
        return ffi::Error::InvalidArgument("wb_experts: x and out must be (A, D), f32 or bf16");
    auto xt = x.element_type();
    long E = (long)counts.element_count();
    if ((long)ws.size() != 2 * E)
        return ffi::Error::InvalidArgument("wb_experts: need a gate_up and a down per expert");
    std::vector<const void *> gu(E), dn(E);
    long I = 0;
    for (long e = 0; e < 2 * E; e++) {
        auto w = ws.get<ffi::AnyBuffer>(e);
        if (!w.has_value()) return ffi::Error::InvalidArgument("wb_experts: a weight is not a buffer");
        auto wd = w->dimensions();
        if (wd.size() != 2 || w->element_type() != xt)
            return ffi::Error::InvalidArgument("wb_experts: weights must be 2-D, x's dtype");
        if (e == 0) I = wd[0] / 2;
        bool ok = e < E ? (wd[0] == 2 * I && wd[1] == D) : (wd[0] == D && wd[1] == I);
        if (!ok) return ffi::Error::InvalidArgument("wb_experts: weights must be (2I, D), (D, I)");
        (e < E ? gu[e] : dn[e - E]) = w->untyped_data();
    }
    return RunExperts("wb_experts", pool, x, counts, gu.data(), dn.data(), I, out, threads);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(WbExperts, Experts,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("threads"));

// the caller guarantees the addresses: live, C-order (2I, D) and (D, I) arrays in x's dtype
static ffi::Error ExpertsAt(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> counts,
                            ffi::Buffer<ffi::S32> table, ffi::Result<ffi::AnyBuffer> out,
                            int64_t inter, int32_t threads) {
    long A, D;
    if (!ExpertRows(x, out, &A, &D))
        return ffi::Error::InvalidArgument("wb_experts_at: x and out must be (A, D), f32 or bf16");
    long E = (long)counts.element_count();
    auto td = table.dimensions();
    if (td.size() != 2 || td[0] != 2 || td[1] != 2 * E || inter <= 0)
        return ffi::Error::InvalidArgument("wb_experts_at: the table must be (2, 2E), inter > 0");
    auto *ptr = reinterpret_cast<const void *const *>(table.typed_data());
    return RunExperts("wb_experts_at", pool, x, counts, ptr, ptr + E, inter, out, threads);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(WbExpertsAt, ExpertsAt,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("inter")
                                  .Attr<int32_t>("threads"));

static ffi::Error Attn1(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::Buffer<ffi::S32> keys, ffi::Result<ffi::AnyBuffer> out, float scale,
                        int32_t threads) {
    auto qd = q.dimensions(), kd = k.dimensions();
    auto qt = q.element_type();
    if (qd.size() != 4 || kd.size() != 4 || qd[2] != 1 || qd[0] != kd[0] || qd[3] != kd[3] ||
        kd[1] <= 0 || qd[1] % kd[1] != 0)
        return ffi::Error::InvalidArgument(
            "wb_attn1: q must be (B, H, 1, d), k and v (B, K, cap, d) with K dividing H");
    if ((qt != ffi::DataType::F32 && qt != ffi::DataType::BF16) || k.element_type() != qt ||
        v.element_type() != qt || out->element_type() != qt ||
        v.element_count() != k.element_count() || out->element_count() != q.element_count())
        return ffi::Error::InvalidArgument("wb_attn1: q, k, v and out must be one of f32, bf16");
    if (keys.element_count() != 2)
        return ffi::Error::InvalidArgument("wb_attn1: keys must be (first slot, count)");
    long B = qd[0], H = qd[1], d = qd[3], K = kd[1], cap = kd[2];
    long t0 = keys.typed_data()[0], T = keys.typed_data()[1];
    if (t0 < 0 || T < 1 || t0 + T > cap)
        return ffi::Error::InvalidArgument("wb_attn1: keys must be 1 or more slots of the cache");
    long el = qt == ffi::DataType::BF16 ? 2 : 4;
    const char *k0 = static_cast<const char *>(k.untyped_data()) + t0 * d * el;
    const char *v0 = static_cast<const char *>(v.untyped_data()) + t0 * d * el;
    if (wb_attn1(q.untyped_data(), B, H, H / K, T, d, H * d, d, k0, K * cap * d, cap * d, d, v0,
                 K * cap * d, cap * d, d, scale, qt == ffi::DataType::BF16,
                 out->untyped_data(), threads > 1 ? 2 : 1))
        return ffi::Error::Internal("wb_attn1: no memory for the scores");
    return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(WbAttn1, Attn1,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("threads"));
