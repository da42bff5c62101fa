"""jax decoding steps: consecutive layers as one compiled program (``decode_group``) and
routed experts by address equal a program per layer with expert arrays, captures and
interventions included; groups alike share one program."""

from __future__ import annotations

import numpy as np
import pytest

import workbench as wb
from workbench.config import ModelConfig
from workbench.random_weights import random_tensors

jm = pytest.importorskip("workbench.jax.model")


def _model(layers: int, dtype: str = "float32", **kw) -> jm.JaxModel:
    cfg = ModelConfig.mini(num_local_experts=8).replace(
        hidden_size=128, intermediate_size=96, intermediate_size_mlp=192, head_dim=32,
        vocab_size=512, num_hidden_layers=layers, **kw)
    return jm.JaxModel(cfg, random_tensors(cfg, seed=3, router_std=0.5), dtype)


def _per_layer(m: jm.JaxModel, monkeypatch) -> None:
    """The model as before groups: a program per layer, its experts as arrays."""
    m.decode_group = 1
    monkeypatch.setattr(m, "expert_table", lambda i, experts: experts)


@pytest.mark.parametrize("dtype,group", [("float32", 4), ("bfloat16", 4), ("float32", 8)])
def test_groups_equal_a_program_per_layer_with_captures_and_interventions(monkeypatch, dtype,
                                                                          group):
    """Groups of 4 (layers 0-3, 4-5) or one program of every layer, the embedding and the
    head (8): the tokens and captures of a program per layer with expert arrays."""
    ids = np.random.default_rng(4).integers(0, 512, (2, 7))
    capture = ["*.moe.topk_indices", "layers.5.attn.out", "layers.1.resid_post",
               "layers.3.moe.routed_out", "logits", "embed", "final_norm"]
    ivs = [wb.ablate_head(5, 1), wb.zero_expert(4, 2), wb.ban_expert(1, 3),
           wb.set_top_k(2, layer=4), wb.force_expert(2, 6)]
    grouped = _model(6, dtype)
    grouped.decode_group = group
    a = grouped.generate(ids, 6, temperature=0, capture=capture, interventions=ivs)
    plain = _model(6, dtype)
    _per_layer(plain, monkeypatch)
    b = plain.generate(ids, 6, temperature=0, capture=capture, interventions=ivs)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    assert sorted(a.trace) == sorted(b.trace) and len(a.trace) == len(capture) + 5
    for n in a.trace:
        np.testing.assert_allclose(a.trace[n], b.trace[n], rtol=1e-6, atol=1e-6, err_msg=n)
    assert not (a.trace["layers.1.moe.topk_indices"] == 3).any()
    assert (a.trace["layers.2.moe.topk_indices"] == 6).all()
    assert a.trace["layers.4.moe.topk_indices"].shape[-1] == 2
    keys = [k for k in grouped._steps if k[0] == "layers"]
    # the decoding steps ran as groups: with 8, one program (embedding and head inside)
    assert {len(k[1]) for k in keys} >= ({4, 2} if group == 4 else {6})
    whole = [k for k in keys if k[5] and k[6]]
    assert len(whole) == (group == 8) and len({k[0] for k in grouped._steps}) == 3
    assert all(len(k[1]) == 1 for k in plain._steps if k[0] == "layers")


def test_groups_alike_share_one_program_and_prefill_stays_per_layer():
    m = _model(8)
    m.decode_group = 4
    g = m.generate(np.arange(5)[None], 4, temperature=0)
    decode = [k for k in m._steps if k[0] == "layers" and k[3][0] == "continue"]
    prefill = [k for k in m._steps if k[0] == "layers" and k[3][0] == "fresh"]
    assert len(decode) == 1 and len(decode[0][1]) == 4  # both groups of four: one program
    assert prefill and all(len(k[1]) == 1 for k in prefill)
    tables = [m.expert_table(i, m.weights.layer(i)["experts"]) for i in range(8)]
    assert all(type(t).__name__ == "ExpertTable" for t in tables)
    assert m.expert_table(0, m.weights.layer(0)["experts"]) is tables[0]  # built once
    full = m.run(g.sequences[:, :-1]).logits
    again = m.generate(np.arange(5)[None], 4, temperature=0)
    np.testing.assert_array_equal(again.sequences, g.sequences)
    assert np.array_equal(full[:, 4:].argmax(-1), g.sequences[:, 5:])
