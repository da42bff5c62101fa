"""The streaming CPU kernels (workbench.torch.cpukernels): values against torch, any shape,
one or two threads, bf16 rounding, the forward's use of them, and how they step aside."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch

from workbench import cpukernels as kernels
from workbench.config import ModelConfig
from workbench.random_weights import random_tensors
from workbench.torch import cpukernels as ck
from workbench.torch import moe
from workbench.torch.model import TorchModel

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"no CPU kernels: "
                                f"{kernels.why_unavailable()}")

SHAPES = [(1, 1024, 1024), (1, 1000, 520), (2, 7, 100), (3, 40, 72), (4, 1000, 13),
          (1, 17, 3), (2, 2048, 256), (4, 96, 384)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,K,O", SHAPES)
def test_linear_matches_torch(n, K, O, threads):
    g = torch.Generator().manual_seed(n * K + O)
    x = torch.randn(n, K, generator=g)
    w = torch.randn(O, K, generator=g)
    with kernels.using(threads), torch.inference_mode():
        y = ck.linear(x, w)
        yb = ck.linear(x.bfloat16(), w.bfloat16())
    assert y.shape == (n, O) and y.dtype == torch.float32 and yb.dtype == torch.bfloat16
    assert _rel(y, x @ w.T) < 1e-6
    # bf16: fp32 sums rounded once, as torch's bf16 product; the order of the sums differs,
    # which can move a result across a rounding boundary (one bf16 ulp)
    exact = (x.bfloat16().float() @ w.bfloat16().float().T).bfloat16()
    assert _rel(yb, exact) <= 2 ** -8


def test_linear_keeps_leading_dims_and_is_thread_independent():
    x = torch.randn(1, 1, 1536)
    w = torch.randn(4096, 1536)
    with torch.inference_mode():
        with kernels.using(1):
            one = ck.linear(x, w)
        with kernels.using(2):
            two = ck.linear(x, w)
    assert one.shape == (1, 1, 4096)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1024, 1000, 37])
def test_linear_row_does_not_depend_on_the_rows_beside_it(K, dtype):
    """From two rows on, a row's outputs are summed in the same order whatever the number of
    rows in the call (two rows and the first two of three or four: the same bits)."""
    g = torch.Generator().manual_seed(K)
    w = torch.randn(520, K, generator=g).to(dtype)
    x = torch.randn(4, K, generator=g).to(dtype)
    with torch.inference_mode():
        two = ck.linear(x[:2].contiguous(), w)
        assert torch.equal(two, ck.linear(x[:3].contiguous(), w)[:2])
        assert torch.equal(two, ck.linear(x, w)[:2])


@pytest.mark.parametrize("block_bytes", [None, 4096 * 3])
def test_bf16_products_beyond_the_kernels_rows_run_in_fp32(monkeypatch, block_bytes):
    """More rows than the kernel takes, bf16 on the CPU: an exact upcast, fp32 products and one
    rounding (whole, or a block of the weight's rows at a time), any leading dims."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 96, generator=g).to(torch.bfloat16)
    w = torch.randn(130, 96, generator=g).to(torch.bfloat16)
    if block_bytes:
        monkeypatch.setattr(moe, "UPCAST_BLOCK_BYTES", block_bytes)  # 7 rows: 19 blocks
    with torch.inference_mode():
        got = moe.linear(x, w)
        want = (x.float() @ w.float().T).to(torch.bfloat16)
    assert got.shape == (2, 9, 130) and got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    exact = x.double() @ w.double().T  # as accurate as torch's bf16 product
    assert _rel(got, exact) <= 2 ** -8 and _rel(x @ w.T, exact) <= 2 ** -8
    assert torch.equal(moe.linear(x.float(), w.float()), x.float() @ w.float().T)  # fp32: torch


def _experts_case(E, D, inter, counts, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    used = sorted((7 * j + 3) % E for j in range(len(counts)))  # distinct: len(counts) <= E
    sorted_e = torch.tensor(used).repeat_interleave(torch.tensor(counts))
    xin = torch.randn(sum(counts), D, generator=g).to(dtype)
    gate_up = (torch.randn(E, D, 2 * inter, generator=g) / D ** 0.5).to(dtype)
    down = (torch.randn(E, inter, D, generator=g) / inter ** 0.5).to(dtype)
    return xin, sorted_e, gate_up, down, used


CASES = [(8, 64, 16, [1, 3, 5, 9]),  # D > 2I: the partial sums hold D columns
         (16, 256, 192, [1, 2, 4, 33, 40, 70]),  # passes of 32 rows; 70 rows: torch's GEMM
         (4, 40, 24, [2, 2]),  # tails: D, I not multiples of 8
         (3, 40, 24, [6, 7, 8]),  # 5-8 rows in one AVX-512 group, column tails of 8 rows
         (3, 20, 12, [1, 2, 9]),  # D = 20: four output columns one by one in every path
         (6, 512, 512, [1])]  # a decode step, large enough for the worker thread


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,D,inter,counts", CASES)
def test_experts_match_torch_and_threads(E, D, inter, counts, dtype):
    xin, sorted_e, gate_up, down, used = _experts_case(E, D, inter, counts, dtype)
    with torch.inference_mode():
        with kernels.using(2):
            two = moe.kernel_expert_rows(xin, sorted_e, gate_up, down)
        with kernels.using(1):
            one = moe.kernel_expert_rows(xin, sorted_e, gate_up, down)
        kernels.library().wb_set_by_expert(0)  # two threads on halves of every expert
        try:
            with kernels.using(2):
                halves = moe.kernel_expert_rows(xin, sorted_e, gate_up, down)
        finally:
            kernels.library().wb_set_by_expert(1)
        ref = torch.cat([moe.expert_swiglu(p, gate_up[e], down[e])
                         for e, p in zip(used, xin.split(counts))])
    assert two.dtype == dtype and two.shape == xin.shape
    assert torch.equal(one, two) and torch.equal(one, halves)
    # bf16: each intermediate is rounded to bf16 as in torch, so a result differs from
    # torch's by the effect of a one-ulp difference in the gate or up value at most
    assert _rel(two, ref) < (1e-6 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("E,D,inter,counts", CASES)
def test_experts_same_bits_with_avx512_and_avx2(E, D, inter, counts, dtype):
    """The expert kernel's AVX-512 products (eight weight rows a step, sixteen columns a
    vector, column tails by the AVX2 block) run every output's FMA chain in the AVX2 order."""
    lib = kernels.library()
    if not lib.wb_set_avx512(1):
        pytest.skip("this CPU has no AVX-512")
    xin, sorted_e, gate_up, down, _ = _experts_case(E, D, inter, counts, dtype)
    got = {}
    try:
        for wide in (1, 0):
            lib.wb_set_avx512(wide)
            with torch.inference_mode(), kernels.using(2):
                got[wide] = moe.kernel_expert_rows(xin, sorted_e, gate_up, down)
    finally:
        lib.wb_set_avx512(1)
    assert torch.equal(got[1], got[0])


def test_expert_rows_uses_the_kernel_on_cpu_inference(monkeypatch):
    xin, sorted_e, gate_up, down, _ = _experts_case(8, 64, 32, [3, 4], torch.float32)
    calls = []
    real = ck.experts
    monkeypatch.setattr(ck, "experts", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        a = moe.expert_rows(xin, sorted_e, (gate_up, down))
    assert calls == [1]
    b = moe.expert_rows(xin, sorted_e, (gate_up, down))  # autograd on: torch's products
    assert calls == [1]
    torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_forward_and_decode_same_with_and_without_kernels(monkeypatch, dtype):
    cfg = ModelConfig.mini(num_local_experts=8).replace(
        hidden_size=128, intermediate_size=96, intermediate_size_mlp=192, head_dim=32,
        vocab_size=512, num_hidden_layers=4)
    tensors = random_tensors(cfg, seed=0, router_std=0.5)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    used = {"linear": 0, "experts": 0}
    real_lin, real_exp = ck.linear, ck.experts

    def lin(*a):
        used["linear"] += 1
        return real_lin(*a)

    def exp(*a):
        used["experts"] += 1
        return real_exp(*a)

    def att(*a):
        used["attention"] += 1
        return real_att(*a)

    real_att, used["attention"] = ck.attention, 0
    monkeypatch.setattr(ck, "linear", lin)
    monkeypatch.setattr(ck, "experts", exp)
    monkeypatch.setattr(ck, "attention", att)
    monkeypatch.setattr(ck, "MIN_LINEAR_BYTES", 0)  # the test model's weights are small
    m = TorchModel(cfg, tensors, dtype)
    fast = m.run(ids, capture=["*.moe.routed_out", "logits"]).trace
    gen = m.generate(ids[:1, :5], 6, temperature=0).sequences
    assert used["experts"] > 0 and used["linear"] > 0  # decode steps: few-row linears
    assert used["attention"] == 5 * cfg.num_hidden_layers  # each decode step's attention
    monkeypatch.setattr(ck, "serves", lambda x, w: False)
    monkeypatch.setattr(ck, "serves_rope", lambda x, c, s: False)
    monkeypatch.setattr(ck, "serves_attention", lambda q, k, v: False)
    slow = m.run(ids, capture=["*.moe.routed_out", "logits"]).trace
    tol = 1e-5 if dtype == "float32" else 3e-2
    for name, v in slow.items():
        np.testing.assert_allclose(fast[name], v, rtol=tol, atol=tol, err_msg=name)
    if dtype == "float32":
        np.testing.assert_array_equal(gen, m.generate(ids[:1, :5], 6, temperature=0).sequences)


def _eager_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if w is None else y * w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1024), (1, 8, 1, 128), (3, 37, 1003), (2, 5, 16)])
def test_rms_norm_matches_the_eager_norm(shape, dtype):
    from workbench.torch.attention import rms_norm
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    x.view(-1)[1] = float("nan")  # a NaN row stays NaN, the others are unaffected
    w = torch.randn(shape[-1], generator=g).to(dtype)
    with torch.inference_mode():
        for weight in (w, None):
            assert ck.serves_norm(x, weight)
            got, want = rms_norm(x, weight, 1e-5), _eager_norm(x, weight, 1e-5)
            assert got.dtype == x.dtype and got.shape == x.shape
            assert torch.equal(got.isnan(), want.isnan())
            got, want = got.nan_to_num().float(), want.nan_to_num().float()
            if dtype == torch.float32:  # the fp32 mean may differ in its last bit
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            else:  # a bf16 rounding flipped by that last bit: one bf16 step, rarely
                assert (got != want).float().mean() < 0.01
                torch.testing.assert_close(got, want, rtol=2 ** -7, atol=0)
        assert not ck.serves_norm(x, w.float() if dtype == torch.bfloat16 else w.bfloat16())
        assert not ck.serves_norm(x, torch.ones(shape[-1] + 1, dtype=dtype))
        assert not ck.serves_norm(x[..., :0], None)  # nothing to normalise: torch's ops
    assert not ck.serves_norm(x, w)  # autograd on: torch's ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,N,S,d,per_row", [(1, 8, 1, 128, False), (2, 8, 37, 128, False),
                                             (3, 4, 5, 64, True), (1, 2, 300, 8, False)])
def test_rope_gives_torchs_complex_product_bit_for_bit(B, N, S, d, per_row, dtype):
    from workbench.torch.attention import apply_rope
    g = torch.Generator().manual_seed(S * d)
    x = (torch.randn(B, S, N, d, generator=g) * 4).to(dtype).transpose(1, 2)  # split_heads
    pos = torch.arange(S, dtype=torch.float32)[:, None] * torch.rand(d // 2, generator=g) * 100
    if per_row:  # a padded batch: one table per row
        pos = pos[None] + torch.arange(B)[:, None, None] * 3.0
    cos, sin = torch.cos(pos), torch.sin(pos)
    with torch.inference_mode():
        assert ck.serves_rope(x, cos, sin)
        got = apply_rope(x, cos, sin)
        monkey = ck.serves_rope
        try:
            ck.serves_rope = lambda *a: False
            want = apply_rope(x, cos, sin)
        finally:
            ck.serves_rope = monkey
        assert got.dtype == dtype
        if d >= 64:  # the model's head sizes: torch's vector loop, the same bits
            assert torch.equal(got, want)
        else:  # torch may take its scalar loop (FMA-contracted): within an ulp
            torch.testing.assert_close(got, want, rtol=2e-7, atol=1e-6)
        assert not ck.serves_rope(x[..., :6], cos[..., :3], sin[..., :3])  # d % 8: torch
        assert not ck.serves_rope(x, cos.double(), sin.double())
        assert not ck.serves_rope(x, cos[:, :-1], sin[:, :-1])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,K,T,d", [(1, 8, 2, 17, 128), (2, 8, 2, 300, 128), (1, 4, 4, 5, 64),
                                       (1, 8, 1, 1100, 128), (3, 6, 3, 1, 40), (1, 2, 1, 9, 20)])
def test_decode_attention_matches_sdpa(B, H, K, T, d, dtype, threads):
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(T * d + B)
    q = torch.randn(B, 1, H, d, generator=g).to(dtype).transpose(1, 2)  # split_heads' layout
    # keys and values: the first T positions of larger cache buffers (strided views)
    k = (torch.randn(B, K, T + 7, d, generator=g) * 3).to(dtype)[:, :, :T]
    v = torch.randn(B, K, T + 7, d, generator=g).to(dtype)[:, :, 2:T + 2]
    scale = d ** -0.5
    with torch.inference_mode(), kernels.using(threads):
        assert ck.serves_attention(q, k, v)
        got = ck.attention(q, k, v, scale)
        want = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    if dtype == torch.float32:  # the same sums in another order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:  # the weights and the output rounded to bf16 as SDPA rounds them: within an ulp
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=4e-3)
        assert (got != want).float().mean() < 0.35
    with torch.inference_mode():
        assert not ck.serves_attention(q.expand(B, H, 2, d), k, v)  # one query only
        assert not ck.serves_attention(q, k.float() if dtype == torch.bfloat16 else k.double(),
                                       v)
        assert not ck.serves_attention(q, k.transpose(-1, -2), v)  # d not contiguous
        if H % (K + 1):
            kk = torch.zeros(B, K + 1, T, d, dtype=dtype)
            assert not ck.serves_attention(q, kk, kk)  # heads not a multiple of kv heads
    assert not ck.serves_attention(q, k, v)  # autograd on: torch's own


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,K,T,d", [(8, 2, 77, 128), (10, 2, 300, 64), (6, 3, 33, 40),
                                     (4, 1, 5, 32), (64, 1, 70, 128)])
def test_decode_attention_grouped_heads_same_bits_as_one_head(H, K, T, d, dtype, threads):
    """The query heads of a kv head share tiles of keys (read in other orders by the heads
    after the first); each head's output has the bits of that head computed alone."""
    g = torch.Generator().manual_seed(H * T + d)
    q = torch.randn(1, H, 1, d, generator=g).to(dtype)
    k = (torch.randn(1, K, T + 5, d, generator=g) * 2).to(dtype)[:, :, 1:T + 1]
    v = torch.randn(1, K, T + 5, d, generator=g).to(dtype)[:, :, 3:T + 3]
    G = H // K
    with torch.inference_mode(), kernels.using(threads):
        together = ck.attention(q, k, v, d ** -0.5)
        for h in range(H):
            alone = ck.attention(q[:, h:h + 1].contiguous(), k[:, h // G:h // G + 1],
                                 v[:, h // G:h // G + 1], d ** -0.5)
            assert torch.equal(together[:, h:h + 1], alone), h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_propagates_nan(dtype):
    q = torch.randn(1, 4, 1, 16).to(dtype)
    k = torch.randn(1, 2, 6, 16).to(dtype)
    v = torch.randn(1, 2, 6, 16).to(dtype)
    k[0, 1, 3, 0] = float("nan")  # kv head 1 feeds query heads 2 and 3
    with torch.inference_mode():
        out = ck.attention(q, k, v, 0.25)
    assert torch.isnan(out[0, 2:]).all() and torch.isfinite(out[0, :2]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_dispatch_skips_the_grouping_and_gives_the_same_row(monkeypatch, dtype):
    g = torch.Generator().manual_seed(3)
    E, D, inter = 6, 64, 48
    gate_up = (torch.randn(E, D, 2 * inter, generator=g) * 0.1).to(dtype)
    down = (torch.randn(E, inter, D, generator=g) * 0.1).to(dtype)
    xf = torch.randn(2, D, generator=g).to(dtype)
    idx, gates = torch.tensor([[4], [1]]), torch.tensor([[0.7], [0.3]]).to(dtype)
    with torch.inference_mode():
        both = moe.dispatch(xf, idx, gates, (gate_up, down))  # the general path

        def no_grouping(*a):
            raise AssertionError("a single assignment went through the expert grouping")

        monkeypatch.setattr(moe, "expert_rows", no_grouping)
        one = moe.dispatch(xf[:1], idx[:1], gates[:1], (gate_up, down))
    assert torch.equal(one[0], both[0])


def test_disabled_by_environment_and_missing_compiler(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_error", "")
    monkeypatch.setenv("WORKBENCH_CPU_KERNELS", "0")
    assert not kernels.available()
    assert "WORKBENCH_CPU_KERNELS=0" in kernels.why_unavailable()
    monkeypatch.delenv("WORKBENCH_CPU_KERNELS")
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", "/bin/false")
    assert not kernels.available()
    assert "could not build" in kernels.why_unavailable()
    x, w = torch.randn(1, 256), torch.randn(256, 256)
    with torch.inference_mode():  # the forward's products fall back to torch
        assert not ck.serves(x, w)
        torch.testing.assert_close(moe.linear(x, w), x @ w.T)


def test_builds_from_source_into_an_empty_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_error", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernels.available(), kernels.why_unavailable()
    assert len(list((tmp_path / "workbench").glob("cpukernels-*.so"))) == 1
    x, w = torch.randn(2, 320), torch.randn(200, 320)
    with torch.inference_mode():
        torch.testing.assert_close(ck.linear(x, w), x @ w.T, rtol=1e-5, atol=1e-4)


def _child(q):
    x, w = torch.randn(1, 1024), torch.randn(1024, 1024)
    with kernels.using(2), torch.inference_mode():
        q.put(float((ck.linear(x, w) - x @ w.T).abs().max()))


def test_works_in_a_forked_child():
    with kernels.using(2), torch.inference_mode():  # the worker thread exists in the parent
        ck.linear(torch.randn(1, 1024), torch.randn(1024, 1024))
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert q.get(timeout=5) < 1e-3


# ---------------------------------------------------------------- jax: the XLA custom calls


def _jax():
    jax = pytest.importorskip("jax")
    from workbench.jax import cpukernels as jk
    if not jk.ready():
        pytest.skip(f"no XLA custom call: {jk.why_not_ready()}")
    return jax, jk


@pytest.mark.parametrize("n,K,O", SHAPES)
def test_jax_linear_matches_xla(n, K, O):
    jax, jk = _jax()
    import jax.numpy as jnp
    rng = np.random.default_rng(n * K + O)
    x = rng.standard_normal((n, K)).astype(np.float32)
    w = rng.standard_normal((O, K)).astype(np.float32)
    y = np.asarray(jax.jit(jk.linear)(jnp.asarray(x), jnp.asarray(w)))
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-4 * np.abs(x @ w.T).max())
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    yb = jax.jit(jk.linear)(xb, wb)
    exact = np.asarray((xb.astype(np.float32) @ wb.astype(np.float32).T).astype(jnp.bfloat16))
    assert yb.dtype == jnp.bfloat16
    assert _rel(torch.from_numpy(np.asarray(yb, np.float32)),
                torch.from_numpy(exact.astype(np.float32))) <= 2 ** -8


def test_jax_linear_in_the_model_path_and_its_bounds():
    jax, jk = _jax()
    import jax.numpy as jnp

    from workbench.jax.attention import linear
    bf = jnp.bfloat16
    big = jnp.ones((512, 256), bf)  # 256 KB: served
    assert jk.serves_linear(jnp.ones((1, 1, 256), bf), big)
    assert jk.serves_linear(jnp.ones((1, 1, 256)), big.astype(jnp.float32))  # fp32 too
    assert not jk.serves_linear(jnp.ones((1, 1, 256)), big)  # mixed dtypes: XLA's dot
    assert not jk.serves_linear(jnp.ones((5, 256), bf), big)  # too many rows: XLA's dot
    assert not jk.serves_linear(jnp.ones((1, 16), bf), jnp.ones((16, 16), bf))  # too small
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, 256)), bf)
    want = np.asarray(x, np.float32) @ np.ones((256, 512), np.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(linear)(x, big), np.float32), want,
                               rtol=2 ** -8)
    w32 = np.random.default_rng(1).standard_normal((512, 256)).astype(np.float32)
    x32 = np.random.default_rng(2).standard_normal((2, 256)).astype(np.float32)
    got = np.asarray(jax.jit(linear)(jnp.asarray(x32), jnp.asarray(w32)))
    np.testing.assert_allclose(got, (x32.astype(np.float64) @ w32.T.astype(np.float64)),
                               rtol=1e-5, atol=1e-5)
    # the expert phase: bf16 always, fp32 with the smallest tiles (one row, or few per expert)
    assert jk.faster_than_xla(bf, 1, 1) and jk.faster_than_xla(bf, 4096, 128)
    assert jk.faster_than_xla(jnp.float32, 512, 8)  # tile 8: E=128, 512 tokens
    assert not jk.faster_than_xla(jnp.float32, 512, 16)  # tile 16: E=16, 512 tokens
    assert jk.faster_than_xla(jnp.float32, 1, 1)  # a decode step


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("H,K,d,cap,start,k_start,chunk", [
    (8, 2, 128, 64, 40, 0, None), (4, 2, 64, 128, 100, 0, 64), (4, 2, 64, 128, 130, 64, 64),
    (6, 3, 40, 16, 0, 0, None), (4, 1, 32, 32, 31, 0, 8)])
def test_jax_decode_attention_is_the_torch_kernel(H, K, d, cap, start, k_start, chunk, dtype):
    """A jax decoding step on the CPU attends through the kernel torch's decode uses: over the
    cache slots its query sees (its chunk's, up to its own slot; never the unwritten slots
    past it), bit for bit torch's output on those keys, and within rounding of the masked
    XLA attention it replaces."""
    jax, jk = _jax()
    import jax.numpy as jnp

    from workbench.jax import attention as jatt
    rng = np.random.default_rng(H * cap + start)
    tdt = getattr(torch, dtype)
    q = torch.from_numpy(rng.standard_normal((1, H, 1, d)).astype(np.float32)).to(tdt)
    k = torch.from_numpy(rng.standard_normal((1, K, cap, d)).astype(np.float32) * 2).to(tdt)
    v = torch.from_numpy(rng.standard_normal((1, K, cap, d)).astype(np.float32)).to(tdt)
    k[:, :, start - k_start + 1:] = float("nan")  # unwritten slots: never read
    v[:, :, start - k_start + 1:] = float("nan")

    def to_jax(t):
        return jnp.asarray(t.float().numpy(), getattr(jnp, dtype))

    qj, kj, vj = to_jax(q), to_jax(k), to_jax(v)
    assert jk.serves_attention(qj, kj, vj)
    step = jax.jit(lambda q, k, v, s: jatt.fused(q, k, v, s, k_start, chunk, d ** -0.5))
    got = step(qj, kj, vj, jnp.int32(start))
    first = 0 if chunk is None else max(0, start // chunk * chunk - k_start)
    with torch.inference_mode():
        want = ck.attention(q, k[:, :, first:start - k_start + 1],
                            v[:, :, first:start - k_start + 1], d ** -0.5)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), want.float().numpy())
    clean = [jnp.where(jnp.isnan(t), 0, t) for t in (kj, vj)]
    xla = jatt._sdpa(qj, *clean, jatt._mask(1, cap, start, k_start, chunk), d ** -0.5)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(xla, np.float32),
                               rtol=1e-5 if dtype == "float32" else 2e-2,
                               atol=1e-6 if dtype == "float32" else 1e-2)
    assert not jk.serves_attention(qj.astype(jnp.float16), kj.astype(jnp.float16),
                                   vj.astype(jnp.float16))
    with pytest.raises(Exception, match="keys must be 1 or more slots of the cache"):
        jax.block_until_ready(jk.attention(qj, kj, vj, cap - 1, 2, 0.1))  # past the cache
    with pytest.raises(Exception, match="keys must be 1 or more slots of the cache"):
        jax.block_until_ready(jk.attention(qj, kj, vj, 0, 0, 0.1))  # no key


def test_jax_decode_size_calls_share_xlas_pool():
    """A decode-size custom call (at most MAX_LINEAR_ROWS rows) asks for helper tasks on XLA's
    own pool (threads=POOL); more rows take the kernels' worker; one thread allowed, one."""
    jax, jk = _jax()
    import jax.numpy as jnp
    with kernels.using(2):
        assert jk.call_threads(1) == jk.call_threads(kernels.MAX_LINEAR_ROWS) == jk.POOL == 0
        assert jk.call_threads(kernels.MAX_LINEAR_ROWS + 1) == 2
        x, w = jnp.ones((1, 256), jnp.bfloat16), jnp.ones((512, 256), jnp.bfloat16)
        assert "threads = 0 : i32" in jax.jit(jk.linear).lower(x, w).as_text()
    with kernels.using(1):
        assert jk.call_threads(1) == jk.call_threads(64) == 1


def _jax_experts(rng: np.random.Generator, E: int, D: int, inter: int, dt) -> list:
    """E random (gate_up (2I, D), down (D, I)) pairs as jax arrays of dtype dt."""
    import jax.numpy as jnp
    return [(jnp.asarray(rng.standard_normal((2 * inter, D)) / D ** 0.5, dt),
             jnp.asarray(rng.standard_normal((D, inter)) / inter ** 0.5, dt))
            for _ in range(E)]


def _ffi(name: str, out, *args, threads: int):
    import jax
    return jax.ffi.ffi_call(name, out, vmap_method="sequential")(*args, threads=np.int32(threads))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n,K,O", [(1, 1000, 520), (2, 512, 1003), (4, 256, 4096), (3, 40, 72)])
def test_jax_linear_on_xlas_pool_same_as_one_thread(n, K, O, dtype):
    """Parts taken by the calling thread and a helper on XLA's pool, in any order: the same
    values as one thread and the kernels' worker, bit for bit."""
    jax, jk = _jax()
    import jax.numpy as jnp
    rng = np.random.default_rng(n * K + O)
    x = jnp.asarray(rng.standard_normal((n, K)), dtype)
    w = jnp.asarray(rng.standard_normal((O, K)) / K ** 0.5, dtype)
    out = jax.ShapeDtypeStruct((n, O), x.dtype)
    got = {t: np.asarray(jax.jit(lambda a, b, t=t: _ffi("workbench_linear", out, a, b,
                                                         threads=t))(x, w), np.float32)
           for t in (0, 1, 2)}
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_array_equal(got[2], got[1])
    want = np.asarray(x, np.float32) @ np.asarray(w, np.float32).T
    np.testing.assert_allclose(got[0], want, rtol=1e-4 if dtype == "float32" else 2 ** -7,
                               atol=1e-4 if dtype == "float32" else 2e-2)


JAX_CASES = [(8, 64, 16, 20, 1), (16, 256, 192, 300, 2), (4, 40, 24, 7, 1), (6, 512, 512, 1, 1),
             (5, 128, 64, 9, 2)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("E,D,inter,N,k", JAX_CASES)
def test_jax_expert_phase_matches_the_tile_loop(monkeypatch, E, D, inter, N, k, dtype):
    jax, jk = _jax()
    import jax.numpy as jnp

    from workbench.jax import moe as jmoe
    dt = jnp.dtype(dtype)
    rng = np.random.default_rng(E * D + N)
    experts = _jax_experts(rng, E, D, inter, dt)
    xf = jnp.asarray(rng.standard_normal((N, D)), dt)
    idx = rng.integers(0, E, (N, k)).astype(np.int32)
    if N > 1:
        idx[0, 0] = E + 3  # outside this group of experts (a streamed layer): a zero row
    gates = jnp.asarray(rng.random((N, k)), dt)
    calls = []
    real = jk.experts
    monkeypatch.setattr(jk, "experts", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(jk, "faster_than_xla", lambda *a: True)
    fast = jmoe.dispatch_rows(xf, jnp.asarray(idx), gates, experts, 8)
    assert calls  # traced through the custom call
    monkeypatch.setattr(jk, "serves_experts", lambda xs, ex, tile: False)
    monkeypatch.setattr(jk, "serves_linear", lambda x, w: False)
    slow = jmoe.dispatch_rows(xf, jnp.asarray(idx), gates, experts, 8)
    f, s = np.asarray(fast, np.float32), np.asarray(slow, np.float32)
    if N > 1:
        assert not f[0].any()
    np.testing.assert_allclose(f, s, rtol=0, atol=(1e-6 if dtype == "float32" else 2e-2)
                               * max(np.abs(s).max(), 1e-30))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jax_expert_call_same_on_one_or_two_threads(dtype):
    """Two threads (whole experts each, or halves of each expert's outputs) or one: the same
    values; rows past the experts' counts are zero."""
    jax, jk = _jax()
    import jax.numpy as jnp
    dt = jnp.dtype(dtype)
    rng = np.random.default_rng(7)
    E, D, inter = 5, 256, 192
    experts = _jax_experts(rng, E, D, inter, dt)
    counts = jnp.asarray([3, 0, 9, 1, 40], jnp.int32)
    xs = jnp.asarray(rng.standard_normal((60, D)), dt)  # 7 rows past the counts: zero

    def run(threads: int) -> np.ndarray:
        with kernels.using(threads):  # read when traced: a fresh function each time
            return np.asarray(jax.jit(lambda a, c: jk.experts(a, c, experts))(xs, counts),
                              np.float32)

    two, one = run(2), run(1)
    ffi = kernels.ffi_library(jax.ffi.include_dir())
    ffi.wb_set_by_expert(0)  # two threads on halves of every expert
    try:
        halves = run(2)
    finally:
        ffi.wb_set_by_expert(1)
    np.testing.assert_array_equal(two, one)
    np.testing.assert_array_equal(halves, one)
    assert not two[53:].any() and two[:53].any(axis=1).all()
    # helper tasks on XLA's pool (a decode step's setting), here over several passes
    out = jax.ShapeDtypeStruct(xs.shape, xs.dtype)
    ws = [gu for gu, _ in experts] + [dn for _, dn in experts]
    pooled = jax.jit(lambda a, c: _ffi("workbench_experts", out, a, c, *ws, threads=0))
    np.testing.assert_array_equal(np.asarray(pooled(xs, counts), np.float32), one)


def test_jax_and_torch_models_agree_with_kernels(monkeypatch):
    _jax()
    from workbench.jax.model import JaxModel
    cfg = ModelConfig.mini(num_local_experts=8).replace(
        hidden_size=128, intermediate_size=96, intermediate_size_mlp=192, head_dim=32,
        vocab_size=512, num_hidden_layers=4)
    tensors = random_tensors(cfg, seed=1, router_std=0.5)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 9))
    monkeypatch.setattr(ck, "MIN_LINEAR_BYTES", 0)
    monkeypatch.setattr(kernels, "MIN_LINEAR_BYTES", 0)
    t = TorchModel(cfg, tensors).generate(ids, 5, temperature=0)
    j = JaxModel(cfg, tensors).generate(ids, 5, temperature=0)
    np.testing.assert_array_equal(t.sequences, j.sequences)
    tt = TorchModel(cfg, tensors).run(ids, capture="*.moe.routed_out").trace
    jt = JaxModel(cfg, tensors).run(ids, capture="*.moe.routed_out").trace
    for name in tt:
        np.testing.assert_allclose(jt[name], tt[name], rtol=2e-5, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top1_selection_is_the_stable_sort_s_first(dtype):
    """Top-1 takes argmax: the same id as the stable descending sort, ties to the lower id and
    a NaN first; top-2 keeps the sort."""
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[1., 3., 3., 2.], [nan, 1., nan, 5.], [0., 0., 0., 0.], [-inf] * 4,
                      [1., inf, inf, 0.]])
    x = torch.cat([x, torch.randn(300, 4, generator=torch.Generator().manual_seed(0))]).to(dtype)
    ref = torch.sort(x, dim=-1, descending=True, stable=True).indices
    assert torch.equal(moe.select_experts(x, 1, (), (), x.shape[0]), ref[:, :1])
    assert torch.equal(moe.select_experts(x, 2, (), (), x.shape[0]), ref[:, :2])
    forced = moe.select_experts(x[5:], 1, (1,), ((3, None),), 300)  # finite rows: ban, force
    assert forced.eq(3).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jax_experts_by_address_same_as_the_arrays(monkeypatch, dtype):
    """An ``ExpertTable`` (weights by address, one small operand) gives the arrays' values bit
    for bit, on any threads, through the call and through the dispatch (one row, sorted rows,
    an id outside the experts: a zero row)."""
    jax, jk = _jax()
    import jax.numpy as jnp

    from workbench.jax import moe as jmoe
    dt = jnp.dtype(dtype)
    rng = np.random.default_rng(11)
    E, D, inter = 6, 256, 192
    experts = _jax_experts(rng, E, D, inter, dt)
    table = jk.expert_table(experts)
    assert table is not None and len(table) == E and table.table.size == 4 * E
    assert len(jax.tree_util.tree_leaves(table)) == 1  # what a compiled step is passed
    counts = jnp.asarray([3, 0, 9, 1, 40, 2], jnp.int32)
    xs = jnp.asarray(rng.standard_normal((60, D)), dt)  # 5 rows past the counts: zero
    for threads in (0, 1, 2):
        with kernels.using(max(threads, 1)):
            want = np.asarray(jax.jit(lambda a, c: jk.experts(a, c, experts))(xs, counts),
                              np.float32)
            got = np.asarray(jax.jit(lambda a, c, t: jk.experts_at(a, c, t))(xs, counts,
                                                                               table),
                             np.float32)
        np.testing.assert_array_equal(got, want)
    assert not got[55:].any() and got[:55].any(axis=1).all()
    gates = jnp.asarray(rng.random((5, 2)), dt)
    xf = jnp.asarray(rng.standard_normal((5, D)), dt)
    monkeypatch.setattr(jk, "faster_than_xla", lambda *a: True)  # arrays: the kernel too
    for idx in ([[4]], [[E + 2]], [[1, 3], [0, 0], [5, E], [2, 1], [3, 3]]):
        idx = jnp.asarray(idx, jnp.int32)
        n = idx.shape[0]
        by_array = jmoe.dispatch_rows(xf[:n], idx, gates[:n, :idx.shape[1]], experts, 8)
        by_address = jax.jit(lambda x, i, g, t: jmoe.dispatch_rows(x, i, g, t, 8))(
            xf[:n], idx, gates[:n, :idx.shape[1]], table)
        np.testing.assert_array_equal(np.asarray(by_address, np.float32),
                                      np.asarray(by_array, np.float32))
    assert not np.asarray(by_address, np.float32)[5].any()  # id E: outside, a zero row


def test_jax_expert_table_only_for_plain_arrays_and_checks_its_shape():
    jax, jk = _jax()
    import jax.numpy as jnp
    f32 = jnp.float32
    pair = (jnp.zeros((8, 4), f32), jnp.zeros((4, 4), f32))
    assert jk.expert_table([pair, pair]) is not None
    assert jk.expert_table([]) is None
    assert jk.expert_table((pair, pair)) is None  # not the list resident weights give
    assert jk.expert_table([pair, (pair[0], jnp.zeros((4, 3), f32))]) is None  # shapes
    assert jk.expert_table([pair, (pair[0].astype(jnp.bfloat16), pair[1])]) is None  # dtypes
    assert jk.expert_table([pair, (pair[0], pair[1], pair[1])]) is None
    assert jk.expert_table([(jnp.zeros((2, 8, 4), f32), jnp.zeros((2, 4, 4), f32))]) is None
    gone = jnp.zeros((8, 4), f32)
    gone.delete()
    assert jk.expert_table([pair, (gone, pair[1])]) is None
    # the custom call refuses a table that does not hold two addresses per expert
    x = jnp.zeros((1, 4), f32)
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    bad = jax.ffi.ffi_call("workbench_experts_at", out, vmap_method="sequential")
    with pytest.raises(Exception, match=r"the table must be \(2, 2E\)"):
        jax.block_until_ready(bad(x, jnp.ones(2, jnp.int32), jnp.zeros((2, 2), jnp.int32),
                                  inter=np.int64(2), threads=np.int32(1)))
