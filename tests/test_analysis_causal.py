"""Causal expert ablation against a numpy fake model that honours ban/zero interventions."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from workbench import analysis as an
from workbench.trace import Trace

V, E, M = 16, 3, 5.0


class FakeModel:
    """One MoE layer over a toy vocabulary, in numpy.

    Router: ids 0..7 prefer experts (0, 1, 2) in that order, ids 8..15 prefer (1, 0, 2). Expert
    e puts logit M on token (id + 1 + e) % V; other logits are 0. Top-1 routing; ``ban``
    removes the expert from the choice (tokens take their next preference), ``zero`` keeps the
    choice and drops the expert's output.
    """

    def __init__(self) -> None:
        self.config = SimpleNamespace(moe_layers=[0], num_local_experts=E,
                                      num_attention_heads=1)
        self.calls = 0

    def run(self, input_ids, capture=None, interventions=None):
        self.calls += 1
        ids = np.asarray(input_ids)
        z = np.where(ids[..., None] < 8, np.array([2.0, 1.0, 0.0]), np.array([1.0, 2.0, 0.0]))
        banned = [iv.expert for iv in interventions or () if iv.kind == "ban_expert"]
        zeroed = [iv.expert for iv in interventions or () if iv.kind == "zero_expert"]
        assert all(iv.layer == 0 for iv in interventions or ())
        zsel = z.copy()
        zsel[..., banned] = -np.inf
        choice = zsel.argmax(axis=-1)
        logits = np.zeros((*ids.shape, V), dtype=np.float32)
        b, t = np.indices(ids.shape)
        live = ~np.isin(choice, zeroed)
        logits[b[live], t[live], ((ids + 1 + choice) % V)[live]] = M
        arrays = {"layers.0.moe.topk_indices": choice[..., None].astype(np.int32),
                  "layers.0.moe.router_logits": z.astype(np.float32)}
        trace = Trace({k: v for k, v in arrays.items() if k in (capture or [])}, ids,
                      meta={"config": {"experts": E, "moe_layers": [0]}})
        return SimpleNamespace(logits=logits, trace=trace)


DOMAINS = {"a": np.array([[0, 1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7]]),  # next = id + 1
           "b": np.array([[8, 10, 12, 14]])}                                # next = id + 2

CE_RIGHT = math.log(1 + (V - 1) * math.exp(-M))   # target has logit M
CE_WRONG = math.log(math.exp(M) + V - 1)          # another token has logit M, target 0
CE_FLAT = math.log(V)                             # all logits 0


def test_ban_expert_per_domain_with_exact_null():
    model = FakeModel()
    r = an.expert_ablation(model, DOMAINS, layer=0, mode="ban")
    assert r.domains == ["a", "b"] and r.experts == [0, 1, 2]
    np.testing.assert_allclose(r.base_loss, [CE_RIGHT, CE_RIGHT], rtol=1e-6)
    np.testing.assert_allclose(r.base_accuracy, [1, 1])
    d = CE_WRONG - CE_RIGHT
    np.testing.assert_allclose(r.delta_loss, [[d, 0, 0], [0, d, 0]], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(r.flip_rate, [[1, 0, 0], [0, 1, 0]])
    np.testing.assert_allclose(r.delta_accuracy, [[-1, 0, 0], [0, -1, 0]])
    np.testing.assert_allclose(r.load, [[1, 0, 0], [0, 1, 0]])
    # exact null over all experts: mean d/3, std d·√2/3 -> z = √2 for the used expert
    np.testing.assert_allclose(r.null_mean, [d / 3, d / 3], rtol=1e-6)
    np.testing.assert_allclose(r.z, [[math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2)],
                                     [-1 / math.sqrt(2), math.sqrt(2), -1 / math.sqrt(2)]],
                               rtol=1e-6)
    assert model.calls == 2 * (1 + E)
    rows = r.rows()
    assert len(rows) == 6 and rows[0]["domain"] == "a" and rows[0]["expert"] == 0
    assert rows[0]["load"] == 1.0 and rows[0]["delta_loss"] == pytest.approx(d)


def test_zero_expert_and_batching_and_sampled_null():
    model = FakeModel()
    r = an.expert_ablation(model, DOMAINS["a"], layer=0, mode="zero", experts=[0, 2],
                           n_random=5, seed=1, batch_size=1)
    assert r.domains == ["all"]
    np.testing.assert_allclose(r.delta_loss, [[CE_FLAT - CE_RIGHT, 0]], rtol=1e-6, atol=1e-9)
    # flat logits predict token 0, which is never the base prediction
    np.testing.assert_allclose(r.flip_rate, [[1, 0]])
    assert r.null_experts.shape == (5,)
    want = [CE_FLAT - CE_RIGHT if e == 0 else 0.0 for e in r.null_experts]
    np.testing.assert_allclose(r.null_delta_loss[0], want, rtol=1e-6, atol=1e-9)


def test_next_token_loss_and_errors():
    logits = np.zeros((1, 3, 4))
    assert an.next_token_loss(logits, np.array([[0, 1, 2]])) == pytest.approx(math.log(4))
    model = FakeModel()
    with pytest.raises(ValueError, match="not an MoE layer"):
        an.expert_ablation(model, DOMAINS, layer=1)
    with pytest.raises(ValueError, match="mode"):
        an.expert_ablation(model, DOMAINS, layer=0, mode="force")
    with pytest.raises(ValueError, match="experts"):
        an.expert_ablation(model, DOMAINS, layer=0, experts=[7])
    with pytest.raises(ValueError, match="seq >= 2"):
        an.expert_ablation(model, {"x": np.array([[1]])}, layer=0)
