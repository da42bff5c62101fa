"""Load and balance metrics on hand-computed synthetic routings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workbench import analysis as an
from workbench.trace import Trace

E = 4


def make_trace(layers: dict[int, np.ndarray], logits: dict[int, np.ndarray] | None = None,
               experts: int = E) -> Trace:
    """A trace from routing indices (B, T, k) per layer (and optional logits (B, T, E))."""
    arrays = {}
    ids = None
    for i, idx in layers.items():
        idx = np.asarray(idx, dtype=np.int32)
        arrays[f"layers.{i}.moe.topk_indices"] = idx
        ids = np.zeros(idx.shape[:2], dtype=np.int64)
    for i, z in (logits or {}).items():
        arrays[f"layers.{i}.moe.router_logits"] = np.asarray(z, dtype=np.float32)
    cfg = {"layers": max(layers) + 1, "experts": experts, "top_k": 1,
           "moe_layers": sorted(layers), "nope_layers": [], "chunk": None}
    return Trace(arrays, ids, meta={"config": cfg})


UNIFORM = np.arange(8).reshape(1, 8, 1) % E  # each expert twice
COLLAPSE = np.zeros((1, 8, 1), dtype=np.int32)  # everything to expert 0


def test_uniform_and_collapse_statistics():
    t = make_trace({0: UNIFORM, 1: COLLAPSE})
    np.testing.assert_allclose(an.expert_load(t, 0), [0.25] * 4)
    np.testing.assert_allclose(an.expert_load(t, 1), [1, 0, 0, 0])
    np.testing.assert_array_equal(an.expert_counts(t, 1), [8, 0, 0, 0])
    u, c = an.expert_load(t, 0), an.expert_load(t, 1)
    assert an.load_cv(u) == pytest.approx(0.0)
    assert an.load_cv(c) == pytest.approx(math.sqrt(E - 1))
    assert an.max_over_mean(u) == pytest.approx(1.0)
    assert an.max_over_mean(c) == pytest.approx(E)
    assert an.max_vio(c) == pytest.approx(E - 1)
    assert an.load_entropy(u) == pytest.approx(math.log(E))
    assert an.load_entropy(u, normalised=True) == pytest.approx(1.0)
    assert an.load_entropy(c) == pytest.approx(0.0)
    assert an.effective_experts(u) == pytest.approx(E)
    assert an.effective_experts(c) == pytest.approx(1.0)
    np.testing.assert_allclose(an.load_matrix(t), np.stack([u, c]))
    # stacked loads give one value per row
    np.testing.assert_allclose(an.load_cv(np.stack([u, c])), [0, math.sqrt(3)])
    st = an.load_stats(c)
    assert st["top_expert"] == 0 and st["top_share"] == 1.0


def test_topk_counts_every_assignment_and_pools_batches_and_traces():
    idx = np.array([[[0, 1], [0, 2]], [[0, 3], [1, 2]]])  # (B=2, T=2, k=2)
    t = make_trace({0: idx})
    np.testing.assert_array_equal(an.expert_counts(t, 0), [3, 2, 2, 1])
    np.testing.assert_allclose(an.expert_load(t, 0), np.array([3, 2, 2, 1]) / 8)
    # two traces pool their tokens
    t2 = make_trace({0: np.full((1, 4, 2), 3)})
    np.testing.assert_array_equal(an.expert_counts([t, t2], 0), [3, 2, 2, 9])


def test_partial_load_example():
    f = np.array([0.5, 0.5, 0.0, 0.0])
    assert an.load_cv(f) == pytest.approx(1.0)  # std 0.25 / mean 0.25
    assert an.max_over_mean(f) == pytest.approx(2.0)
    assert an.load_entropy(f) == pytest.approx(math.log(2))
    assert an.effective_experts(f) == pytest.approx(2.0)


def test_switch_aux_and_z_loss():
    z0 = np.zeros((1, 8, E))
    zc = np.full((1, 8, E), -1e4)
    zc[..., 0] = 0.0
    t = make_trace({0: UNIFORM, 1: COLLAPSE}, logits={0: z0, 1: zc})
    assert an.switch_aux_loss(t, 0) == pytest.approx(1.0)
    assert an.switch_aux_loss(t, 1) == pytest.approx(E)
    assert an.switch_aux_loss(t, 0, coef=0.01) == pytest.approx(0.01)
    assert an.router_z_loss(t, 0) == pytest.approx(math.log(E) ** 2)
    assert an.router_z_loss(t, 1) == pytest.approx(0.0, abs=1e-9)


def test_capacity_drops_collapse_drops_towards_the_end():
    t = make_trace({0: COLLAPSE, 1: UNIFORM})
    d = an.capacity_drops(t, 0, capacity_factor=1.0)  # C = ceil(1 * 1 * 8 / 4) = 2
    assert list(d.capacity) == [2]
    assert d.drop_rate == pytest.approx(6 / 8)
    assert d.token_drop_rate == pytest.approx(6 / 8)
    np.testing.assert_array_equal(d.by_position, [0, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(d.per_expert, [0.75, 0, 0, 0])
    assert an.capacity_drops(t, 1).drop_rate == 0.0
    # cf = 2: C = 4, drops 4 of 8
    np.testing.assert_allclose(an.drop_rate_curve(t, 0, [1.0, 2.0, 4.0]), [0.75, 0.5, 0.0])


def test_capacity_drops_top2_prefers_first_choices():
    # T=2, k=2, E=4, cf=1 -> C = ceil(2*2/4) = 1. Expert 0 is 1st choice of token 1 and 2nd
    # choice of token 0: the first choice wins, token 0's second slot is dropped.
    idx = np.array([[[1, 0], [0, 2]]])
    d = an.capacity_drops(make_trace({0: idx}), 0, 1.0)
    assert d.drop_rate == pytest.approx(1 / 4)
    np.testing.assert_allclose(d.by_position, [0.5, 0.0])
    assert d.token_drop_rate == 0.0


def test_missing_hook_is_a_clear_value_error():
    t = make_trace({0: UNIFORM})
    with pytest.raises(ValueError, match=r"layers\.0\.moe\.router_logits.*capture"):
        an.router_z_loss(t, 0)
    with pytest.raises(ValueError, match=r"layers\.5\.moe\.topk_indices"):
        an.expert_load(t, 5)


def test_routing_table_and_format():
    z = np.zeros((1, 8, E))
    z[..., 0] = 1.0
    z[0, :2, 1] = 1.0 - 1e-4  # two near-ties
    t = make_trace({0: UNIFORM, 1: COLLAPSE}, logits={1: z})
    rows = an.routing_table(t)
    assert [r["layer"] for r in rows] == [0, 1]
    r0, r1 = rows
    assert r0["tokens"] == 8 and r0["load_cv"] == pytest.approx(0)
    assert r0["entropy"] == pytest.approx(1.0) and r0["near_tie"] is None
    assert r1["max_over_mean"] == pytest.approx(4) and r1["effective_experts"] == pytest.approx(1)
    assert r1["top_expert"] == 0 and r1["top_share"] == 1.0
    assert r1["near_tie"] == pytest.approx(2 / 8)
    text = an.format_routing_table(rows)
    lines = text.splitlines()
    assert len(lines) == 4 and "max/mean" in lines[0] and "near-tie" in lines[0]
    assert len({len(line) for line in lines}) == 1  # fixed width
    assert lines[2].rstrip().endswith("-")  # no logits -> dash
    assert "0.250" in lines[3]
