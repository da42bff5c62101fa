"""The jax backend against the torch backend: every hook, bf16, interventions, cached decoding,
and each backend importable without the other framework.

Many variants are compiled here, so the jax models use XLA optimisation level 0 (about twice as
fast to compile; fp32 results move by ~1e-6 against the default level, bf16 ones not at all).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("torch")
from oracle import CASES, build_hf, make_case, rel, save_hf  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.config import ModelConfig  # noqa: E402

TOL = 2e-4
BF16_TOL = 5e-2
BF16_NEAR_TIE = 0.07  # a few bf16 ulps of a router logit of magnitude ~4-16
FAST = {"xla_backend_optimization_level": 0}
ROOT = Path(__file__).resolve().parents[1]


def jax_model(path: Path, dtype: str = "float32") -> wb.Model:
    model = wb.load(path, backend="jax", dtype=dtype)
    model.compiler_options.update(FAST)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    name = request.param
    cfg, _, path, ids = make_case(name, tmp_path_factory.mktemp(name))
    return name, cfg, path, ids


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    cfg = ModelConfig.tiny()
    path = save_hf(build_hf(cfg, seed=1), tmp_path_factory.mktemp("scout_pair"))
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 23))
    tm, jm = wb.load(path, backend="torch"), jax_model(path)
    return cfg, path, ids, tm, jm, tm.run(ids, capture="*").trace


def test_every_hook_matches_torch_fp32(pair):
    name, cfg, path, ids = pair
    a = wb.load(path, backend="torch").run(ids, capture="*")
    b = jax_model(path).run(ids, capture="*")
    assert sorted(a.trace) == sorted(b.trace) == sorted(wb.hook_names(cfg))
    for n in a.trace:
        ta, tb = a.trace[n], b.trace[n]
        assert ta.shape == tb.shape and ta.dtype == tb.dtype, (name, n)
        if n.endswith("topk_indices"):
            assert np.array_equal(ta, tb), (name, n)
        else:
            assert rel(tb, ta) <= TOL, (name, n, rel(tb, ta))
    assert rel(b.logits, a.logits) <= TOL


@pytest.mark.parametrize("pair", ["top2", "long_temp"], indirect=True)
def test_bf16_close_to_torch_flips_only_at_near_ties(pair):
    """bf16: routing may differ only at near-tied router logits; positions downstream of such a
    flip (same row, same or later position, later layers) are excluded from the logit check.

    long_temp is Scout-shaped (top-1, QK-norm) with chunk 5 and temperature tuning; top2 covers
    the fp32 combine of two experts.
    """
    name, cfg, path, ids = pair
    capture = ["*.moe.router_logits", "*.moe.topk_indices"]
    a = wb.load(path, backend="torch", dtype="bfloat16").run(ids, capture=capture)
    jm = jax_model(path, "bfloat16")
    assert all(str(v.dtype) == "bfloat16" for v in jm.params.values())
    b = jm.run(ids, capture=capture)
    B, S = ids.shape
    taint = np.full(B, S)  # first position touched by a routing flip, per row
    for layer in cfg.moe_layers:
        p = f"layers.{layer}.moe."
        ia, ib = np.sort(a.trace[p + "topk_indices"], -1), np.sort(b.trace[p + "topk_indices"], -1)
        assert ib.dtype == np.int32 and b.trace[p + "router_logits"].dtype == np.float32
        r = a.trace[p + "router_logits"]
        k = ia.shape[-1]
        srt = -np.sort(-r, -1)
        margin = srt[..., k - 1] - srt[..., k]  # last chosen vs first rejected (torch)
        flips = (ia != ib).any(-1)
        for row, pos in np.argwhere(flips):
            if pos < taint[row]:  # upstream of every earlier flip: must be a near tie
                assert margin[row, pos] <= BF16_NEAR_TIE, (name, layer, row, pos)
        for row in range(B):
            hit = np.flatnonzero(flips[row])
            if hit.size:
                taint[row] = min(taint[row], hit[0])
    for row in range(B):
        t = taint[row]
        if t:
            assert rel(b.logits[row, :t], a.logits[row, :t]) <= BF16_TOL, (name, row)
    clean = np.concatenate([a.logits[row, : taint[row]].argmax(-1) ==
                            b.logits[row, : taint[row]].argmax(-1) for row in range(B)])
    assert clean.mean() >= 0.9, (name, clean.mean())


def _both(tm, jm, ids, interventions=None, hooks=None, capture=("*.moe.topk_indices",)):
    a = tm.run(ids, capture=list(capture), interventions=interventions,
               hooks=None if hooks is None else hooks[0])
    b = jm.run(ids, capture=list(capture), interventions=interventions,
               hooks=None if hooks is None else hooks[1])
    assert rel(b.logits, a.logits) <= TOL
    for n in a.trace:
        if n.endswith("topk_indices"):
            assert np.array_equal(a.trace[n], b.trace[n]), n
        else:
            assert rel(b.trace[n], a.trace[n]) <= TOL, n
    assert b.trace.meta["interventions"] == a.trace.meta["interventions"]
    return b


def test_ban_zero_force_positions_ablate_match_torch(scout):
    cfg, _, ids, tm, jm, base = scout
    busiest = [int(np.bincount(base[f"layers.{i}.moe.topk_indices"].ravel()).argmax())
               for i in (0, 1)]
    ivs = [wb.ban_expert(0, busiest[0]), wb.zero_expert(1, busiest[1]),
           wb.force_expert(2, 5, positions=[0, 3, -1]), wb.ablate_head(3, 1),
           wb.ablate_head(0, 2)]
    out = _both(tm, jm, ids, ivs, capture=["*.moe.topk_indices", "layers.1.moe.routed_out"])
    top = out.trace
    assert busiest[0] not in top["layers.0.moe.topk_indices"]
    assert (top["layers.2.moe.topk_indices"][:, [0, 3, 22], 0] == 5).all()
    zeroed = top["layers.1.moe.topk_indices"][..., 0] == busiest[1]
    assert zeroed.any() and not np.abs(top["layers.1.moe.routed_out"][zeroed]).any()
    assert rel(out.logits, base["logits"]) > 1e-3


def test_set_top_k_and_force_everywhere_match_torch(scout):
    cfg, _, ids, tm, jm, base = scout
    out = _both(tm, jm, ids, [wb.set_top_k(3), wb.force_expert(1, 2)])
    assert out.trace["layers.0.moe.topk_indices"].shape == (*ids.shape, 3)
    assert (out.trace["layers.1.moe.topk_indices"][..., 0] == 2).all()


def test_patches_and_layer_top_k_match_torch(scout):
    cfg, _, ids, tm, jm, base = scout
    other = tm.run(ids[::-1], capture="layers.1.resid_mid").trace["layers.1.resid_mid"]
    S = ids.shape[1]
    uniform = np.tril(np.ones((S, S))) / np.arange(1, S + 1)[:, None]
    ivs = [wb.set_top_k(2, layer=3), wb.patch("layers.1.resid_mid", other),
           wb.patch("layers.0.moe.topk_indices", np.full((2, S, 1), 4)),
           wb.patch("layers.2.attn.pattern", uniform)]
    out = _both(tm, jm, ids, ivs, capture=["*.moe.topk_indices", "layers.1.resid_mid",
                                           "layers.2.attn.pattern"])
    assert np.array_equal(out.trace["layers.1.resid_mid"], other)
    assert (out.trace["layers.0.moe.topk_indices"] == 4).all()
    assert out.trace["layers.3.moe.topk_indices"].shape == (*ids.shape, 2)
    assert rel(out.trace["layers.2.attn.pattern"], np.broadcast_to(uniform, (2, 4, S, S))) < 1e-6


def test_hook_functions_and_all_tokens_on_one_expert_match_torch(scout):
    """hooks={name: fn}: the same arithmetic on torch tensors and jnp arrays (traced by jit).

    The layer-0 hook sends every token to expert 0: the dispatch holds any load in the one
    compiled graph (no rerun, no recompile) and nothing is dropped.
    """
    import jax.numpy as jnp
    import torch
    cfg, _, ids, tm, jm, base = scout
    E = cfg.num_local_experts
    common = {"layers.1.attn.out": lambda v: v * 0.5, "layers.2.moe.router_logits": lambda r: -r}
    fn_t = {**common, "layers.0.moe.router_logits": lambda r: r + 100.0 * (torch.arange(E) == 0)}
    fn_j = {**common, "layers.0.moe.router_logits": lambda r: r + 100.0 * (jnp.arange(E) == 0)}
    n0 = jm.compiled_variants
    out = _both(tm, jm, ids, hooks=(fn_t, fn_j), capture=["*.moe.topk_indices",
                                                           "layers.0.moe.routed_out"])
    assert jm.compiled_variants == n0 + 1
    assert (out.trace["layers.0.moe.topk_indices"] == 0).all()
    assert np.abs(out.trace["layers.0.moe.routed_out"]).sum(-1).min() > 0  # none dropped
    r = base["layers.2.moe.router_logits"]
    assert not np.array_equal(out.trace["layers.2.moe.topk_indices"], r.argmax(-1)[..., None])
    with pytest.raises(ValueError, match="must return an array of shape"):
        jm.run(ids, hooks={"layers.0.attn.out": lambda v: v[..., :2]})


def test_in_graph_masks_equal_numerics():
    import jax

    from workbench.jax.attention import _mask
    from workbench.numerics import attention_mask
    traced_mask = jax.jit(_mask, static_argnums=(0, 1, 4))  # positions traced, as in decoding
    for S, Tk, start, k_start, chunk in [(7, 7, 0, 0, None), (7, 7, 0, 0, 3), (1, 12, 11, 0, 5),
                                         (3, 9, 13, 10, 5), (4, 20, 30, 16, 16)]:
        want = attention_mask(np.arange(start, start + S), np.arange(k_start, k_start + Tk),
                              chunk)
        assert np.array_equal(np.asarray(traced_mask(S, Tk, start, k_start, chunk)), want)


def test_capture_positions_dtype_and_variant_reuse(scout):
    cfg, _, ids, tm, jm, base = scout
    n0 = jm.compiled_variants
    plain = jm.run(ids)
    assert len(plain.trace) == 0 and jm.compiled_variants == n0 + 1
    assert plain.logits.dtype == np.float32 and plain.logits.flags.writeable
    jm.run(ids[:, ::-1].copy())  # same shapes and plan: the compiled variant is reused
    assert jm.compiled_variants == n0 + 1
    kw = dict(capture=["layers.0.attn.q", "layers.1.moe.*"], capture_dtype="float16",
              positions=slice(3, 9))
    a, b = tm.run(ids, **kw).trace, jm.run(ids, **kw).trace
    for n in a:
        assert a[n].shape == b[n].shape and a[n].dtype == b[n].dtype, n
        assert np.array_equal(a[n], b[n]) if n.endswith("indices") else \
            rel(b[n].astype(np.float32), a[n].astype(np.float32)) <= 1e-3, n


def test_cached_generation_equals_full_forward_and_torch(scout):
    """Greedy decoding through the KV cache (chunk 8 crossed twice, temperature tuning on)."""
    cfg, _, ids, tm, jm, base = scout
    capture = ["*.attn.k", "*.attn.v", "*.moe.topk_indices", "*.resid_post",
               "layers.0.attn.pattern", "layers.3.attn.pattern"]
    gj = jm.generate(ids[:, :9], 12, temperature=0, capture=capture)
    gt = tm.generate(ids[:, :9], 12, temperature=0, capture=capture)
    assert np.array_equal(gj.sequences, gt.sequences)
    full = jm.run(gj.sequences[:, :-1], capture=[c for c in capture if "pattern" not in c])
    assert sorted(full.trace) == sorted(gj.trace)
    for n in full.trace:
        if n.endswith("indices"):
            assert np.array_equal(gj.trace[n], full.trace[n]), n
        else:
            assert rel(gj.trace[n], full.trace[n]) <= 1e-5, n
        assert rel(gj.trace[n], gt.trace[n]) <= TOL, n
    for n, steps in gt.patterns.items():
        assert [s.shape for s in gj.patterns[n]] == [s.shape for s in steps], n
        assert max(rel(x, y) for x, y in zip(gj.patterns[n], steps)) <= TOL, n
    # the last step feeds position 19: chunked layer 0 sees only its chunk [16, 19]
    assert gj.patterns["layers.0.attn.pattern"][-1].shape[-1] == 4


def _subprocess(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    cfg = ModelConfig.tiny(num_hidden_layers=1)
    from workbench.checkpoint import expected_shapes
    rng = np.random.default_rng(0)
    tensors = {n: rng.normal(0, 0.1, s).astype(np.float32) for n, s in
               expected_shapes(cfg).items()}
    return wb.Checkpoint.save(tmp_path_factory.mktemp("tiny1"), tensors, cfg)


def test_jax_backend_runs_without_torch(tiny_ckpt):
    r = _subprocess(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import workbench as wb
        assert "jax" not in sys.modules
        import workbench.jax
        out = wb.load({str(tiny_ckpt)!r}, backend="jax").run([[1, 2, 3]], capture="*.moe.*")
        assert out.logits.shape == (1, 3, 512) and len(out.trace) == 5
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_torch_backend_runs_without_jax(tiny_ckpt):
    r = _subprocess(f"""
        import sys
        for m in ("jax", "jaxlib", "flax"):
            sys.modules[m] = None
        import workbench as wb
        assert "torch" not in sys.modules
        import workbench.torch
        out = wb.load({str(tiny_ckpt)!r}, backend="torch").run([[1, 2, 3]], capture="*.moe.*")
        assert out.logits.shape == (1, 3, 512) and len(out.trace) == 5
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_every_tile_size_matches_torch(scout, monkeypatch):
    """The tiled dispatch equals torch whatever the tile size (one row per tile, tiles that
    span several experts' loads, one tile larger than all assignments), with interventions."""
    import workbench.jax.moe as jmoe
    cfg, path, ids, tm, _, _ = scout
    A = ids.size * cfg.num_experts_per_tok
    assert jmoe.tile_rows(A, cfg.num_local_experts) == 8
    assert jmoe.tile_rows(4096, 16) == 128 and jmoe.tile_rows(512, 16) == 16
    assert jmoe.tile_rows(1, 16) == 1 and jmoe.tile_rows(3, 128) == 4  # capped by A
    for tile in (1, 3, 2 * A):
        monkeypatch.setattr(jmoe, "tile_rows", lambda a, e, t=tile: t)
        jm = jax_model(path)
        _both(tm, jm, ids, capture=["*.moe.*", "logits"])
        _both(tm, jm, ids, [wb.set_top_k(2), wb.zero_expert(1, 3), wb.ban_expert(2, 0)],
              capture=["*.moe.topk_indices", "*.moe.routed_out"])


def test_params_hold_experts_per_expert_and_restack(scout):
    """The jax params keep one nn.Linear-layout array per expert; state_dict_numpy gives the
    checkpoint's stacked layout back exactly."""
    from workbench.checkpoint import Checkpoint
    cfg, path, _, _, jm, _ = scout
    I, D = cfg.intermediate_size, cfg.hidden_size
    assert jm.params["layers.0.feed_forward.experts.3.gate_up_proj"].shape == (2 * I, D)
    assert jm.params["layers.0.feed_forward.experts.3.down_proj"].shape == (D, I)
    assert "layers.0.feed_forward.experts.gate_up_proj" not in jm.params
    ref = Checkpoint.open(path).model_tensors()
    sd = jm.state_dict_numpy()
    assert sd.keys() == ref.keys()
    for n in ref:
        assert np.array_equal(sd[n], np.asarray(ref[n], np.float32)), n
