"""Router confidence: sigmoid-normalised entropy, gates, margins, near-ties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workbench import analysis as an
from workbench.trace import Trace


def make_trace(z: np.ndarray, k: int = 1, scores: bool = True) -> Trace:
    z = np.asarray(z, dtype=np.float32)
    idx = np.argsort(-z, axis=-1, kind="stable")[..., :k].astype(np.int32)
    arrays = {"layers.0.moe.router_logits": z, "layers.0.moe.topk_indices": idx}
    if scores:
        sel = np.take_along_axis(z.astype(np.float64), idx, axis=-1)
        arrays["layers.0.moe.topk_scores"] = (1 / (1 + np.exp(-sel))).astype(np.float32)
    cfg = {"experts": z.shape[-1], "top_k": k, "moe_layers": [0]}
    return Trace(arrays, np.zeros(z.shape[:2], dtype=np.int64), meta={"config": cfg})


def test_entropy_uniform_and_confident():
    z = np.zeros((2, 3, 8))
    t = make_trace(z)
    h = an.routing_entropy(t, 0)
    assert h.shape == (6,)
    np.testing.assert_allclose(h, math.log(8))
    np.testing.assert_allclose(an.routing_entropy(t, 0, normalised=True), 1.0)
    zc = np.full((1, 2, 8), -60.0)
    zc[..., 3] = 60.0
    np.testing.assert_allclose(an.routing_entropy(make_trace(zc), 0), 0.0, atol=1e-20)


def test_sigmoid_normalisation_differs_from_softmax():
    # z = [0, ln 3]: sigmoid 1/2 and 3/4 -> p = (2/5, 3/5); softmax -> (1/4, 3/4)
    z = np.array([[[0.0, math.log(3)]]])
    t = make_trace(z)
    np.testing.assert_allclose(an.routing_probabilities(t, 0), [[0.4, 0.6]], rtol=1e-6)
    np.testing.assert_allclose(an.routing_probabilities(t, 0, "softmax"), [[0.25, 0.75]],
                               rtol=1e-6)
    hs = -(0.4 * math.log(0.4) + 0.6 * math.log(0.6))
    hx = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert an.routing_entropy(t, 0)[0] == pytest.approx(hs, rel=1e-6)
    assert an.routing_entropy(t, 0, "softmax")[0] == pytest.approx(hx, rel=1e-6)
    with pytest.raises(ValueError, match="normalisation"):
        an.routing_entropy(t, 0, "relu")


def test_margin_near_tie_and_gates():
    z = np.array([[[3.0, 1.0, 0.0, -1.0], [0.5, 0.5 + 1e-3, 0.0, 0.0],
                   [0.0, 0.0, 2.0, 0.0], [4.0, -4.0, 3.0, 1.0]]])
    t = make_trace(z, k=2)
    np.testing.assert_allclose(an.logit_margin(t, 0), [2.0, 1e-3, 2.0, 1.0], rtol=1e-4)
    # rank 2: margin of the top-2 set, z(2) - z(3)
    np.testing.assert_allclose(an.logit_margin(t, 0, rank=2), [1.0, 0.5, 0.0, 2.0], atol=1e-6)
    assert an.near_tie_fraction(t, 0, eps=1e-2) == pytest.approx(0.25)
    np.testing.assert_array_equal(an.near_tie_mask(t, 0, eps=1e-2), [False, True, False, False])
    g = an.gate_values(t, 0)
    assert g.shape == (4, 2)
    assert g[0, 0] == pytest.approx(1 / (1 + math.exp(-3.0)), rel=1e-6)
    # without topk_scores the gates are recomputed from the logits
    g2 = an.gate_values(make_trace(z, k=2, scores=False), 0)
    np.testing.assert_allclose(g, g2, rtol=1e-6)
    counts, edges = an.gate_histogram(t, 0, bins=4)
    assert counts.sum() == 4 and edges[0] == 0 and edges[-1] == 1
    assert an.gate_histogram(t, 0, bins=4, slot=None)[0].sum() == 8
    s = an.confidence_summary(t, 0, eps=1e-2)
    assert s["near_tie_fraction"] == pytest.approx(0.25)


def test_multiple_traces_concatenate():
    a = make_trace(np.zeros((1, 2, 4)))
    z = np.full((2, 1, 4), -100.0)
    z[..., 0] = 100
    b = make_trace(z)
    h = an.routing_entropy([a, b], 0)
    assert h.shape == (4,)
    assert h[0] == pytest.approx(math.log(4)) and h[3] < 1e-6


def test_missing_logits():
    t = make_trace(np.zeros((1, 2, 4)))
    del t._arrays["layers.0.moe.router_logits"]
    with pytest.raises(ValueError, match="router_logits"):
        an.logit_margin(t, 0)
    del t._arrays["layers.0.moe.topk_scores"]
    with pytest.raises(ValueError, match="topk_scores"):
        an.gate_values(t, 0)
