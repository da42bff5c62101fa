"""Blockwise jax attention: ``fused``'s online-softmax kernel (``flash``) equals the unblocked
kernel, ``attention_summary`` equals its definition (``numerics.attention_summary_reference``),
and a long global layer compiles without an S x T buffer. Small blocks (16 queries x 8 keys)
make short inputs span many blocks, so every branch of the block loops runs."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from workbench.jax import attention as att  # noqa: E402
from workbench.jax.ops import JaxOps  # noqa: E402
from workbench.numerics import SUMMARY_FEATURES, attention_mask  # noqa: E402
from workbench.numerics import attention_summary_reference as reference  # noqa: E402

F = {n: i for i, n in enumerate(SUMMARY_FEATURES)}
SCALE = 0.25
D = 16

# (B, H, K, S, T, start, k_start, chunk): fresh prefills (chunk smaller than S and not
# dividing it, dividing it, equal to it, larger than it) and continuations with a cache
# (keys from k_start on; slots past the last query hold stale keys the mask must hide)
CASES = [
    (1, 4, 2, 50, 50, 0, 0, None),
    (2, 4, 2, 50, 50, 0, 0, 7),
    (1, 4, 4, 50, 50, 0, 0, 10),
    (1, 2, 1, 50, 50, 0, 0, 50),
    (1, 4, 2, 37, 37, 0, 0, 64),
    (1, 2, 1, 20, 70, 50, 0, None),
    (1, 4, 1, 33, 96, 47, 0, None),  # 16 stale slots
    (2, 4, 2, 20, 45, 60, 35, 12),
    (1, 4, 2, 21, 60, 59, 33, 16),  # 14 stale slots, queries across a chunk boundary
    (1, 4, 2, 1, 40, 30, 0, None),  # one decoding step
]
IDS = [f"B{c[0]}H{c[1]}K{c[2]}-S{c[3]}T{c[4]}-at{c[5]},{c[6]}-chunk{c[7]}" for c in CASES]
# continuations run with traced positions (as a decoding step), one also with static ones
RUNS = [(c, c[5] != 0 or c[6] != 0) for c in CASES] + [(CASES[8], False)]
RUN_IDS = [IDS[CASES.index(c)] + ("-traced" if t else "") for c, t in RUNS]
FAST = {"xla_backend_optimization_level": 0}  # compile the small cases quickly


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(att, "BLOCK_Q", 16)
    monkeypatch.setattr(att, "BLOCK_K", 8)


def _inputs(B, H, K, S, T, dtype=jnp.float32, seed=0, sharp=2.0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, H, S, D)) * sharp, dtype)
    k = jnp.asarray(rng.standard_normal((B, K, T, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, K, T, D)), dtype)
    return q, k, v


def _jit(fn):
    return jax.jit(fn, compiler_options=FAST)


def _call(fn, start, k_start, traced, *arrays):
    """fn(*arrays, start, k_start) under jit, positions static ints or traced int32."""
    if traced:
        return _jit(fn)(*arrays, jnp.int32(start), jnp.int32(k_start))
    return _jit(lambda *a: fn(*a, start, k_start))(*arrays)


def _unblocked(q, k, v, start, k_start, chunk):
    """The unblocked kernel on the whole (S, T) mask: what ``flash`` must equal."""
    S, T = q.shape[2], k.shape[2]
    return _jit(lambda q, k, v: att._sdpa(q, k, v, att._mask(S, T, start, k_start, chunk),
                                          SCALE))(q, k, v)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _probs(q, k, start, k_start, chunk):
    """The exact (fp64) softmax pattern (B, H, S, T) of fp32-upcast inputs."""
    H, K = q.shape[1], k.shape[1]
    qf, kf = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), H // K, axis=1)
    s = np.einsum("bhsd,bhtd->bhst", qf, kf) * SCALE
    m = attention_mask(np.arange(start, start + q.shape[2]),
                       np.arange(k_start, k_start + k.shape[2]), chunk)
    s = np.where(m, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- fused / flash
@pytest.mark.parametrize("case,traced", RUNS, ids=RUN_IDS)
def test_blockwise_equals_unblocked_fp32(small_blocks, case, traced):
    B, H, K, S, T, start, k_start, chunk = case
    q, k, v = _inputs(B, H, K, S, T)
    got = _call(lambda q, k, v, s, ks: att.flash(q, k, v, s, ks, chunk, SCALE), start, k_start,
                traced, q, k, v)
    want = _unblocked(q, k, v, start, k_start, chunk)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert _rel(got, want) < 2e-6


@pytest.mark.parametrize("case", [CASES[1], CASES[8]], ids=[IDS[1], IDS[8]])
def test_blockwise_bf16_close_to_unblocked(small_blocks, case):
    """bf16: exp(s - running max) is rounded before the value product, so results differ
    from the unblocked kernel by rounding, no more than that kernel differs from fp64."""
    B, H, K, S, T, start, k_start, chunk = case
    q, k, v = _inputs(B, H, K, S, T, jnp.bfloat16, seed=1)
    got = _call(lambda q, k, v, s, ks: att.flash(q, k, v, s, ks, chunk, SCALE), start, k_start,
                start != 0, q, k, v)
    want = _unblocked(q, k, v, start, k_start, chunk)
    exact = np.einsum("bhst,bhtd->bhsd", _probs(q, k, start, k_start, chunk),
                      np.repeat(np.asarray(v, np.float64), H // K, axis=1))
    assert got.dtype == jnp.bfloat16
    assert _rel(got, want) < 2e-2
    assert _rel(got, exact) < 2 * _rel(want, exact) + 4e-3


def test_growing_maximum_rescales_exactly(small_blocks):
    """Scores that grow along the keys make every block raise the running max."""
    q, k, v = _inputs(1, 2, 1, 64, 64, sharp=1.0, seed=2)
    k = k * jnp.linspace(0.1, 4.0, 64)[None, None, :, None]
    q = jnp.abs(q) * 3
    k = jnp.abs(k)
    got = _jit(lambda q, k, v: att.flash(q, k, v, 0, 0, None, SCALE))(q, k, v)
    want = _unblocked(q, k, v, 0, 0, None)
    assert _rel(got, want) < 2e-6


@pytest.mark.parametrize("chunk,limit,flash", [(7, 0, False), (7, 2 * 4 * 7 * 7 * 3, False),
                                                (10, 0, False), (20, 0, True)])
def test_long_calls_route(small_blocks, monkeypatch, chunk, limit, flash):
    """Above the limit, a prefill of a chunked layer runs small chunks (<= BLOCK_Q) a group of
    chunks at a time with the per-chunk kernel, larger ones blockwise; both equal the
    unblocked kernel."""
    monkeypatch.setattr(att, "BLOCKWISE_MIN", limit)
    calls = []
    real = att.flash
    monkeypatch.setattr(att, "flash", lambda *a: calls.append(1) or real(*a))
    q, k, v = _inputs(2, 4, 2, 50, 50)
    got = _jit(lambda q, k, v: att.fused(q, k, v, 0, 0, chunk, SCALE))(q, k, v)
    want = _unblocked(q, k, v, 0, 0, chunk)
    assert bool(calls) == flash
    assert _rel(got, want) < 2e-6


def test_short_calls_keep_the_unblocked_kernels(monkeypatch):
    def no_flash(*a, **k):
        raise AssertionError("a short call went blockwise")

    monkeypatch.setattr(att, "flash", no_flash)
    q, k, v = _inputs(1, 4, 2, 40, 40)
    for chunk in (None, 7, 64):
        jax.eval_shape(lambda q, k, v, c=chunk: att.fused(q, k, v, 0, 0, c, SCALE), q, k, v)
        jax.eval_shape(lambda q, k, v, c=chunk: att.fused(q, k, v, 35, 0, c, SCALE),
                       q[:, :, -5:], k, v)


@pytest.mark.parametrize("S,T,start,chunk", [(4096, 4096, 0, None), (4096, 4096, 0, 2048),
                                             (1024, 8192, 7168, None)])
def test_long_calls_go_blockwise(monkeypatch, S, T, start, chunk):
    calls = []

    def spy(q, k, v, start, k_start, chunk, scale):
        calls.append(chunk)
        return q

    monkeypatch.setattr(att, "flash", spy)
    q = jax.ShapeDtypeStruct((1, 2, S, 8), jnp.float32)
    k = jax.ShapeDtypeStruct((1, 1, T, 8), jnp.float32)
    jax.eval_shape(lambda q, k: att.fused(q, k, k, start, 0, chunk, SCALE), q, k)
    assert calls == [chunk]


def _temp_bytes(fn, *shapes) -> tuple[int, str]:
    c = jax.jit(fn).lower(*shapes).compile()
    return c.memory_analysis().temp_size_in_bytes, c.as_text()


@pytest.mark.parametrize("chunk", [None, 8192])
def test_long_layer_compiles_without_a_full_score_buffer(chunk):
    """A 16k-token prefill (defaults: blocks of 512 x 512): compiled only, not run."""
    S = 16384
    q = jax.ShapeDtypeStruct((1, 2, S, 8), jnp.float32)
    k = jax.ShapeDtypeStruct((1, 1, S, 8), jnp.float32)
    full = S * S * 4  # one fp32 score buffer of the whole layer (1 GiB)
    temp, text = _temp_bytes(lambda q, k, v: att.fused(q, k, v, 0, 0, chunk, SCALE), q, k, k)
    assert temp < full // 16, temp
    assert f"{S},{S}]" not in text and "16384,8192]" not in text
    if chunk is None:
        temp, text = _temp_bytes(lambda q, k: att.attention_summary(q, k, 0, 0, None, 8192,
                                                                    SCALE), q, k)
        assert temp < full // 16, temp
        assert f"{S},{S}]" not in text


# ----------------------------------------------------------------------------- summary
@pytest.mark.parametrize("case,traced", RUNS, ids=RUN_IDS)
def test_summary_equals_reference(small_blocks, case, traced):
    B, H, K, S, T, start, k_start, chunk = case
    # own chunk: the layer's chunk, another size, or (global layers, alternately) none
    own = chunk or (None if (start + S + traced) % 2 else 10)
    q, k, _ = _inputs(B, H, K, S, T, seed=3)
    got = _call(lambda q, k, s, ks: att.attention_summary(q, k, s, ks, chunk, own, SCALE),
                start, k_start, traced, q, k)
    assert got.shape == (B, H, S, len(SUMMARY_FEATURES)) and got.dtype == jnp.float32
    want = reference(_probs(q, k, start, k_start, chunk),
                                       np.arange(start, start + S),
                                       np.arange(k_start, k_start + T), own)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_summary_bf16_inputs_score_in_fp32(small_blocks):
    B, H, K, S, T, start, k_start, chunk = CASES[7]
    q, k, _ = _inputs(B, H, K, S, T, jnp.bfloat16, seed=4)
    got = _jit(lambda q, k: att.attention_summary(q, k, start, k_start, chunk, 12,
                                                     SCALE))(q, k)
    want = reference(_probs(q, k, start, k_start, chunk),
                                       np.arange(start, start + S),
                                       np.arange(k_start, k_start + T), 12)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_summary_far_distances_and_the_last_bucket(small_blocks):
    """Queries near 2^23 over keys from 0: distances cross into the open last bucket."""
    start, S, T = (1 << 23) - 30, 40, 64
    q, k, _ = _inputs(1, 2, 1, S, T, seed=5, sharp=0.5)
    qp, kp = np.arange(start, start + S), np.arange(T)
    got = _jit(lambda q, k, s: att.attention_summary(q, k, s, 0, None, 8192, SCALE))(
        q, k, jnp.int32(start))
    want = reference(_probs(q, k, start, 0, None), qp, kp, 8192)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert np.asarray(got)[..., F["d>=8388608"]].max() > 0.1


def test_summary_sanity(small_blocks):
    B, H, K, S, T, chunk = 1, 4, 2, 50, 50, 16
    q, k, _ = _inputs(B, H, K, S, T, seed=6)
    glob = np.asarray(_jit(lambda q, k: att.attention_summary(q, k, 0, 0, None, 16,
                                                                 SCALE))(q, k))
    loc = np.asarray(_jit(lambda q, k: att.attention_summary(q, k, 0, 0, chunk, 16,
                                                                SCALE))(q, k))
    n_glob = np.arange(1, S + 1)  # keys each query sees
    n_loc = np.arange(S) % chunk + 1
    for s, n in ((glob, n_glob), (loc, n_loc)):
        np.testing.assert_allclose(s[..., 5:].sum(-1), 1, atol=1e-6)
        assert np.all(s[..., F["max"]] <= 1 + 1e-6)
        assert np.all(s[..., F["max"]] >= 1 / n - 1e-6)
        assert np.all(s[..., F["entropy"]] >= -1e-6)
        assert np.all(s[..., F["entropy"]] <= np.log(n) + 1e-5)
        assert np.all(s[..., F["distance"]] <= n - 1 + 1e-3)
        # the first query sees only itself
        np.testing.assert_allclose(s[:, :, 0, [F["entropy"], F["distance"]]], 0, atol=1e-6)
        np.testing.assert_allclose(s[:, :, 0, [F["max"], F["sink"], F["d=0"]]], 1, atol=1e-6)
    # a chunked layer sees only its own chunk, and the sink only from the first chunk
    np.testing.assert_allclose(loc[..., F["own_chunk"]], 1, atol=1e-6)
    assert np.all(loc[:, :, chunk:, F["sink"]] == 0) and np.all(loc[:, :, :chunk, F["sink"]] > 0)
    assert np.all(glob[..., F["sink"]] > 0)
    assert np.all(glob[:, :, chunk:, F["own_chunk"]] < 1)
    # keys from a later slot on: position 0 is not among them
    late = np.asarray(_jit(lambda q, k: att.attention_summary(q, k, 40, 30, None, None,
                                                                 SCALE))(q[:, :, :10], k))
    assert np.all(late[..., F["sink"]] == 0)
    np.testing.assert_allclose(late[..., F["own_chunk"]], 1)


def test_ops_entries():
    ops = JaxOps(jax.devices()[0])
    x = jnp.arange(2 * 3 * 10 * 4, dtype=jnp.float32).reshape(2, 3, 10, 4)
    np.testing.assert_array_equal(ops.seq_slice(x, 2, 7), np.asarray(x)[:, :, 2:7])
    q, k, _ = _inputs(1, 4, 2, 12, 12)
    s = _jit(lambda q, k: ops.attention_summary(q, k, 0, 0, None, 4, SCALE))(q, k)
    want = reference(_probs(q, k, 0, 0, None), np.arange(12),
                                       np.arange(12), 4)
    np.testing.assert_allclose(np.asarray(s), want, rtol=1e-5, atol=1e-5)


def test_device_attention_is_causal_gqa_attention():
    """The GPU path (``jax.nn.dot_product_attention``; here its portable "xla" form) computes
    the same causal GQA attention as the unblocked kernel, and ``fused`` routes a long bf16
    global prefill to it only on a GPU platform."""
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((2, 4, 40, D), (2, 2, 40, D), (2, 2, 40, D)))
    ref = att._sdpa(q, k, v, att._mask(40, 40, 0, 0, None), SCALE)
    got = att.device_attention(q, k, v, SCALE, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-6, atol=2e-6)
    S = 1152  # 1 x 4 x S x S > BLOCKWISE_MIN: a long call
    assert 4 * S * S > att.BLOCKWISE_MIN
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
               for s in ((1, 4, S, D), (1, 2, S, D), (1, 2, S, D)))
    gpu = att.fused(q, k, v, 0, 0, None, SCALE, platform="gpu")
    cpu = att.fused(q, k, v, 0, 0, None, SCALE)
    assert float(jnp.max(jnp.abs(gpu.astype(jnp.float32) - cpu.astype(jnp.float32)))) < 0.02

    def text(platform: str) -> str:
        return jax.jit(lambda a, b, c: att.fused(a, b, c, 0, 0, None, SCALE, platform)).lower(
            q, k, v).as_text()

    # off a GPU, dot_product_attention's portable form holds the S x S scores; flash does not
    assert f"{S}x{S}x" in text("gpu") and f"{S}x{S}x" not in text("cpu")


def test_one_query_attention_equals_the_general_kernel():
    """A decoding step (one query) contracts without the unit query axis: the same values as
    the same call with the query repeated (general path), masked cache slots included."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((2, 4, 1, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 2, 40, 8)), jnp.float32) for _ in range(2))
    one = att.fused(q, k, v, np.int32(30), 0, None, 0.3)
    two = att.fused(jnp.concatenate([q, q], axis=2), k, v, np.int32(30), 0, None, 0.3)
    np.testing.assert_allclose(np.asarray(one[:, :, 0]), np.asarray(two[:, :, 0]), rtol=1e-6,
                               atol=1e-7)


def test_long_heads_write_logits_in_blocks(monkeypatch):
    """Above HEAD_BLOCK_BYTES the head runs over position blocks straight into one host array
    (a remainder block too): the same logits, also when the logits hook is captured."""
    import workbench as wb
    from workbench.jax import model as jm
    m = wb.load(wb.widgets.BUNDLED_MODEL, backend="jax")
    ids = np.random.default_rng(0).integers(0, m.config.vocab_size, (2, 11))
    whole = m.run(ids).logits
    monkeypatch.setattr(jm, "HEAD_BLOCK_BYTES", 2 * m.config.vocab_size * 4 * 3)  # 3 rows
    blocked = m.run(ids)
    np.testing.assert_allclose(blocked.logits, whole, rtol=1e-6, atol=1e-6)
    assert blocked.logits.dtype == np.float32 and blocked.logits.flags.writeable
    captured = m.run(ids, capture="logits")
    np.testing.assert_allclose(captured.trace["logits"], whole, rtol=1e-6, atol=1e-6)
