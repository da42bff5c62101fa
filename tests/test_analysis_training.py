"""Training-log schema and curves; routing stability between runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from workbench import analysis as an
from workbench.trace import Trace


def test_log_round_trip_and_curves(tmp_path):
    log = an.new_training_log({"model": "tiny"})
    log["steps"].append(an.training_log_entry(
        0, 5.0, {0: [0.25, 0.25, 0.25, 0.25], 1: [1.0, 0, 0, 0]}, {0: 1.3, 1: 0.2}))
    log["steps"].append(an.training_log_entry(
        10, 4.0, {0: np.array([0.5, 0.5, 0, 0]), 1: [0.25] * 4}, val_loss=4.5))
    path = tmp_path / "log.json"
    path.write_text(json.dumps(log))
    raw = json.loads(path.read_text())
    assert raw["schema"] == an.TRAINING_LOG_SCHEMA
    assert set(raw["steps"][0]) == {"step", "loss", "val_loss", "expert_load", "router_entropy"}
    assert raw["steps"][0]["expert_load"]["0"] == [0.25] * 4
    c = an.training_curves(path)
    np.testing.assert_array_equal(c.steps, [0, 10])
    np.testing.assert_array_equal(c.loss, [5.0, 4.0])
    assert math.isnan(c.val_loss[0]) and c.val_loss[1] == 4.5
    assert c.layers == [0, 1] and c.load.shape == (2, 2, 4)
    np.testing.assert_allclose(c.cv, [[0, math.sqrt(3)], [1, 0]])
    np.testing.assert_allclose(c.max_over_mean, [[1, 4], [2, 1]])
    np.testing.assert_allclose(c.effective_experts, [[4, 1], [2, 4]])
    np.testing.assert_allclose(c.entropy_norm, [[1, 0], [0.5, 1]])
    np.testing.assert_allclose(c.router_entropy[0], [1.3, 0.2])
    assert np.isnan(c.router_entropy[1]).all()
    # a plain dict with int-like string keys, no schema key, also loads
    c2 = an.training_curves({"steps": [{"step": 1, "loss": 2.0, "val_loss": None,
                                        "expert_load": {"3": [0.5, 0.5]}}]})
    assert c2.layers == [3] and c2.cv[0, 0] == 0


def test_log_validation_errors():
    with pytest.raises(ValueError, match="sums to"):
        an.training_log_entry(0, 1.0, {0: [3, 1]})
    with pytest.raises(ValueError, match="missing 'loss'"):
        an.validate_training_log({"steps": [{"step": 0, "expert_load": {}}]})
    bad = {"steps": [{"step": 5, "loss": 1, "expert_load": {}},
                     {"step": 5, "loss": 1, "expert_load": {}}]}
    with pytest.raises(ValueError, match="increase"):
        an.validate_training_log(bad)
    with pytest.raises(ValueError, match="schema"):
        an.validate_training_log({"schema": "other/2", "steps": []})


def routing_trace(idx, logits=None, ids=None) -> Trace:
    idx = np.asarray(idx, dtype=np.int32)
    if idx.ndim == 2:
        idx = idx[..., None]
    arrays = {"layers.0.moe.topk_indices": idx}
    if logits is not None:
        arrays["layers.0.moe.router_logits"] = np.asarray(logits, dtype=np.float32)
    ids = np.arange(idx.shape[1])[None].repeat(idx.shape[0], 0) if ids is None else ids
    return Trace(arrays, ids, meta={"config": {"experts": 4, "moe_layers": [0]}})


def test_entry_from_trace():
    z = np.zeros((1, 4, 4))
    t = routing_trace([[0, 1, 2, 3]], z)
    e = an.training_log_entry_from_trace(t, 3, 2.5)
    assert e["expert_load"] == {"0": [0.25] * 4}
    assert e["router_entropy"]["0"] == pytest.approx(math.log(4))


def test_routing_stability_identical_flip_and_near_tie():
    z = np.zeros((1, 4, 4))
    z[0, :, 0] = 2.0
    z[0, 1, 1] = 2.0 - 1e-4  # token 1 is a near-tie between experts 0 and 1
    z[0, 3, :] = [0.0, 0.0, 3.0, 0.0]
    a = routing_trace([[0, 0, 0, 2]], z)
    b = routing_trace([[0, 1, 0, 3]], z)  # flips at token 1 (near-tie) and token 3 (not)
    same = an.routing_stability(a, a)[0]
    assert same["jaccard"] == 1.0 and same["top1_agreement"] == 1.0
    assert same["top1_disagreements"] == 0
    r = an.routing_stability(a, b, eps=1e-2)[0]
    assert r["top1_agreement"] == pytest.approx(0.5)
    assert r["jaccard"] == pytest.approx(0.5) and r["saturation"] == pytest.approx(0.5)
    assert r["top1_disagreements"] == 2 and r["near_tie_disagreements"] == 1
    np.testing.assert_array_equal(an.routing_disagreement(a, b, 0), [False, True, False, True])
    # no logits -> near-tie count unknown
    assert an.routing_stability(routing_trace([[0]]), routing_trace([[1]]))[0][
        "near_tie_disagreements"] is None
    with pytest.raises(ValueError, match="different input_ids"):
        an.routing_stability(a, routing_trace([[0, 0, 0, 2]], z, ids=np.zeros((1, 4), int)))


def test_jaccard_top2():
    a = routing_trace(np.array([[[0, 1], [2, 3]]]))
    b = routing_trace(np.array([[[1, 2], [3, 2]]]))
    np.testing.assert_allclose(an.routing_jaccard(a, b, 0), [1 / 3, 1.0])
    r = an.routing_stability(a, b)[0]
    assert r["saturation"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert r["top1_agreement"] == 0.0
