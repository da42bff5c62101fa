"""Temporal locality and cross-layer routing on known sequences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workbench import analysis as an
from workbench.trace import Trace


def make_trace(layers: dict[int, object], experts: int = 4) -> Trace:
    arrays = {}
    shape = None
    for i, idx in layers.items():
        a = np.asarray(idx, dtype=np.int32)
        if a.ndim == 2:
            a = a[..., None]
        arrays[f"layers.{i}.moe.topk_indices"] = a
        shape = a.shape[:2]
    return Trace(arrays, np.zeros(shape, dtype=np.int64),
                 meta={"config": {"experts": experts, "moe_layers": sorted(layers)}})


def test_same_expert_rate_constant_and_alternating():
    same = an.same_expert_rate(make_trace({0: [[2, 2, 2, 2]]}), 0)
    assert same.top1 == 1.0 and same.pairs == 3
    assert same.chance_top1 == pytest.approx(0.25)
    assert same.chance_top1_load == pytest.approx(1.0)  # all load on one expert
    assert same.lift == pytest.approx(4.0)
    alt = an.same_expert_rate(make_trace({0: [[0, 1, 0, 1], [3, 3, 1, 1]]}), 0)
    # row 0: 0 of 3 pairs; row 1: 2 of 3 (pairs never cross rows)
    assert alt.top1 == pytest.approx(2 / 6) and alt.pairs == 6


def test_same_expert_any_overlap_top2_chance():
    t = make_trace({0: np.array([[[0, 1], [1, 2], [3, 4]]])}, experts=8)
    r = an.same_expert_rate(t, 0)
    assert r.top1 == 0.0
    assert r.any == pytest.approx(0.5)  # {0,1}∩{1,2} yes, {1,2}∩{3,4} no
    assert r.chance_any == pytest.approx(13 / 28)  # Mixtral's 46% for E=8, k=2


def test_run_lengths():
    t = make_trace({0: [[1, 1, 2, 2, 2, 0], [3, 3, 3, 3, 3, 3]]})
    np.testing.assert_array_equal(an.run_lengths(t, 0), [2, 3, 1, 6])
    np.testing.assert_array_equal(an.run_length_histogram(t, 0), [0, 1, 1, 1, 0, 0, 1])
    assert an.run_lengths(t, 0).sum() == 12


def test_known_transition_matrix():
    a = [[0, 0, 1, 1, 0, 1, 0, 0]]
    b = [[1, 1, 0, 1, 1, 0, 1, 1]]
    t = make_trace({0: a, 2: b}, experts=2)
    np.testing.assert_array_equal(an.transition_counts(t, 0, 2), [[0, 5], [2, 1]])
    np.testing.assert_allclose(an.transition_matrix(t, 0, 2), [[0, 1], [2 / 3, 1 / 3]])
    h = 3 / 8 * -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert an.conditional_entropy(t, 0, 2) == pytest.approx(h)
    assert an.next_layer_predictability(t, 0, 2) == pytest.approx(7 / 8)
    # determined -> H = 0, predictability 1, NMI 1; independent uniform -> H = log 2, NMI 0
    det = make_trace({0: [[0, 1, 2, 3]], 1: [[1, 2, 3, 0]]})
    assert an.conditional_entropy(det, 0, 1) == pytest.approx(0.0)
    assert an.next_layer_predictability(det, 0, 1) == 1.0
    assert an.layer_nmi(det, 0, 1) == pytest.approx(1.0)
    ind = make_trace({0: [[0, 0, 1, 1]], 1: [[0, 1, 0, 1]]}, experts=2)
    assert an.conditional_entropy(ind, 0, 1) == pytest.approx(math.log(2))
    assert an.layer_nmi(ind, 0, 1) == pytest.approx(0.0, abs=1e-12)
    assert an.next_layer_predictability(ind, 0, 1) == pytest.approx(0.5)
    rows = an.cross_layer_table(det)
    assert rows == [{"layer_from": 0, "layer_to": 1, "conditional_entropy": pytest.approx(0),
                     "predictability": 1.0, "nmi": pytest.approx(1.0)}]


def test_expert_paths_and_entropy():
    t = make_trace({0: [[0, 0, 0, 1]], 1: [[2, 2, 3, 3]], 3: [[1, 1, 1, 1]]})
    paths = an.expert_paths(t, top=2)
    assert paths[0] == ((0, 2, 1), 2, 0.5)
    assert paths[1][1] == 1
    assert an.path_entropy(t) == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert an.expert_paths(t, layers=[3])[0] == ((1,), 4, 1.0)
    t.input_ids[:] = [[10, 11, 12, 13]]
    np.testing.assert_array_equal(an.path_tokens(t, (0, 2, 1)), [10, 11])
    np.testing.assert_array_equal(an.path_tokens(t, (1, 3, 1)), [13])
    # tokens of two traces pool
    assert an.expert_paths([t, t], top=1)[0] == ((0, 2, 1), 4, 0.5)
