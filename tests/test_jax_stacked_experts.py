"""jax stacked experts (the GPU layout): experts kept as the checkpoint stacks them and run as
grouped products (``jax.lax.ragged_dot``) or the tile loop on their slices give what the
per-expert layout gives, against transformers too; the kernel is switchable and checked."""

from __future__ import annotations

import numpy as np
import pytest
from oracle import hf_run, make_case, rel

import workbench as wb
from workbench.config import ModelConfig
from workbench.random_weights import random_tensors

jm = pytest.importorskip("workbench.jax.model")
moe = pytest.importorskip("workbench.jax.moe")


def _pair(dtype: str, k: int = 2, **kw) -> tuple[jm.JaxModel, jm.JaxModel]:
    cfg = ModelConfig.mini(num_local_experts=8).replace(
        hidden_size=128, intermediate_size=96, intermediate_size_mlp=192, head_dim=32,
        vocab_size=512, num_hidden_layers=3, num_experts_per_tok=k, **kw)
    tensors = random_tensors(cfg, seed=5, router_std=0.5)
    return (jm.JaxModel(cfg, tensors, dtype, expert_layout="per_expert"),
            jm.JaxModel(cfg, tensors, dtype, expert_layout="stacked"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kernel", ["ragged", "tiles"])
def test_stacked_experts_equal_per_expert_with_captures_and_interventions(dtype, kernel):
    per, stacked = _pair(dtype)
    assert stacked.stacked_experts and not per.stacked_experts
    stacked.expert_kernel = kernel
    assert all(isinstance(stacked.weights.layer(i)["experts"], moe.StackedExperts) and
               stacked.weights.layer(i)["experts"].kernel == kernel
               for i in stacked.config.moe_layers)
    ids = np.random.default_rng(6).integers(0, 512, (2, 40))  # batch 2, top-2
    capture = ["*.moe.topk_indices", "layers.1.moe.routed_out", "layers.2.resid_post"]
    ivs = [wb.ban_expert(0, 3), wb.zero_expert(1, 2), wb.force_expert(2, 5)]
    a = per.run(ids, capture=capture, interventions=ivs)
    b = stacked.run(ids, capture=capture, interventions=ivs)
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert rel(b.logits, a.logits) <= tol
    for n in a.trace:
        if n.endswith("topk_indices"):
            np.testing.assert_array_equal(a.trace[n], b.trace[n], err_msg=n)
        else:
            assert rel(np.asarray(b.trace[n], np.float32),
                       np.asarray(a.trace[n], np.float32)) <= tol, n
    assert (b.trace["layers.2.moe.topk_indices"] == 5).any(axis=-1).all()
    # decoding (one assignment per token: the single-row path) gives the same tokens
    ga = per.generate(ids[:1, :9], 5, temperature=0)
    gb = stacked.generate(ids[:1, :9], 5, temperature=0)
    np.testing.assert_array_equal(ga.sequences, gb.sequences)


def test_stacked_layout_saves_the_checkpoint_it_loaded():
    per, stacked = _pair("float32", k=1)
    sa, sb = per.state_dict_numpy(), stacked.state_dict_numpy()
    assert sorted(sa) == sorted(sb)
    for n in sa:
        np.testing.assert_array_equal(sa[n], sb[n], err_msg=n)
    name = "layers.0.feed_forward.experts.gate_up_proj"
    assert name in stacked.params and stacked.params[name].ndim == 3


def test_stacked_experts_match_transformers(tmp_path):
    cfg, hf, path, ids = make_case("top2", tmp_path / "top2")
    logits, routers, _ = hf_run(hf, ids)
    for kernel in ("ragged", "tiles"):
        m = jm.load(path, expert_layout="stacked")
        m.expert_kernel = kernel
        out = m.run(ids, capture=["*.moe.router_logits"])
        assert rel(out.logits, logits) <= 2e-4, kernel
        for layer, r in zip(cfg.moe_layers, routers):
            assert rel(out.trace[f"layers.{layer}.moe.router_logits"], r) <= 2e-4


def test_ragged_rows_past_the_counts_are_zero():
    """Assignments outside the layer's experts (a streamed group's convention) give zero rows
    and cost nothing; the grouped products read only the rows the counts cover."""
    rng = np.random.default_rng(0)
    E, D, inter = 4, 16, 8
    gu = rng.standard_normal((E, D, 2 * inter)).astype(np.float32)
    dn = rng.standard_normal((E, inter, D)).astype(np.float32)
    x = rng.standard_normal((6, D)).astype(np.float32)
    idx = np.array([[0], [3], [7], [1], [-1], [3]])
    gates = np.ones((6, 1), np.float32)
    st = moe.StackedExperts(gu, dn, "ragged")
    got = np.asarray(moe.dispatch_rows(x, idx, gates, st, tile=8))
    tiles = np.asarray(moe.dispatch_rows(x, idx, gates, moe.StackedExperts(gu, dn, "tiles"),
                                         tile=8))
    np.testing.assert_allclose(got, tiles, rtol=1e-5, atol=1e-5)
    assert not got[[2, 4]].any() and got[[0, 1, 3, 5]].any(axis=1).all()


def test_bad_layout_and_kernel_are_refused():
    per, stacked = _pair("float32", k=1)
    with pytest.raises(ValueError, match="expert_kernel='grouped'"):
        stacked.expert_kernel = "grouped"
    with pytest.raises(ValueError, match="expert kernel 'dense'"):
        moe.StackedExperts(np.zeros((2, 4, 8)), np.zeros((2, 4, 4)), "dense")
    with pytest.raises(ValueError, match="expert_layout='rows'"):
        jm.JaxModel(per.config, random_tensors(per.config, seed=0), expert_layout="rows")
    per.expert_kernel = "tiles"  # per-expert layout: accepted, nothing to rebuild
    assert per.expert_kernel == "tiles" and isinstance(per.weights.layer(0)["experts"], list)
