"""Specialisation by domain, token category and vocabulary on known routings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workbench import analysis as an
from workbench.trace import Trace


def make_trace(idx, ids=None, experts: int = 2, domain: str | None = None) -> Trace:
    idx = np.asarray(idx, dtype=np.int32)
    if idx.ndim == 2:
        idx = idx[..., None]
    ids = np.zeros(idx.shape[:2], dtype=np.int64) if ids is None else np.asarray(ids)
    meta = {"config": {"experts": experts, "moe_layers": [0]}}
    if domain is not None:
        meta["domain"] = domain
    return Trace({"layers.0.moe.topk_indices": idx}, ids, meta=meta)


def test_js_divergence_known_values():
    assert an.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert an.js_divergence([0.3, 0.7], [0.3, 0.7]) == pytest.approx(0.0)
    # p = (1, 0), q = (.5, .5), m = (.75, .25): ½log2(4/3) + ½(½log2(2/3) + ½log2(2))
    want = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(2 / 3) + 0.5)
    assert an.js_divergence([1, 0], [0.5, 0.5]) == pytest.approx(want)


def test_domain_specialisation_separated_domains():
    code = make_trace(np.zeros((2, 3)), domain="code")        # 6 tokens -> expert 0
    prose = make_trace(np.ones((1, 6)), domain="prose")       # 6 tokens -> expert 1
    spec = an.domain_specialisation([code, prose], 0)
    assert spec.domains == ["code", "prose"]
    np.testing.assert_allclose(spec.load, [[1, 0], [0, 1]])
    np.testing.assert_allclose(spec.overall, [0.5, 0.5])
    np.testing.assert_allclose(spec.ratio, [[2, 0], [0, 2]])
    want = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(2 / 3) + 0.5)
    np.testing.assert_allclose(spec.js, [want, want])
    np.testing.assert_array_equal(spec.tokens, [6, 6])
    # a mapping works too, and identical domains do not diverge
    same = an.domain_specialisation({"a": make_trace([[0, 1]]), "b": [make_trace([[1, 0]])]}, 0)
    np.testing.assert_allclose(same.js, [0, 0], atol=1e-12)
    assert an.domain_js_by_layer([code, prose], [0]).shape == (1, 2)
    with pytest.raises(ValueError, match="domain"):
        an.domain_specialisation([make_trace([[0]])], 0)


def test_category_nmi_perfect_and_independent():
    # digits -> expert 0, words -> expert 1: NMI = 1
    t = make_trace([[0, 1, 0, 1]])
    spec = an.category_specialisation(t, 0, ["digit", "word", "digit", "word"])
    assert spec.categories == ["digit", "word"]
    np.testing.assert_array_equal(spec.counts, [[2, 0], [0, 2]])
    np.testing.assert_allclose(spec.p_expert, [[1, 0], [0, 1]])
    assert spec.nmi == pytest.approx(1.0)
    # every category split evenly across experts: NMI = 0
    t2 = make_trace([[0, 1, 0, 1]])
    spec2 = an.category_specialisation(t2, 0, np.array([["digit", "digit", "word", "word"]]))
    assert spec2.nmi == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(spec2.ratio, 1.0)
    # one label array per trace
    spec3 = an.category_specialisation([t, t2], 0, [["digit", "word", "digit", "word"],
                                                     ["digit", "digit", "word", "word"]])
    assert spec3.counts.sum() == 8
    with pytest.raises(ValueError, match="labels for 4 tokens"):
        an.category_specialisation(t, 0, ["digit"])
    assert an.normalised_mutual_information([0, 0, 1, 1], ["a", "a", "b", "b"]) == \
        pytest.approx(1.0)


def test_vocabulary_specialisation_and_top_tokens():
    # token 5 always to expert 0 (3x); token 7 half to 0, half to 1 (2x each)
    ids = [[5, 7, 5, 7, 5, 7, 7]]
    idx = [[0, 0, 0, 1, 0, 0, 1]]
    t = make_trace(idx, ids)
    vs = an.vocabulary_specialisation(t, 0)
    np.testing.assert_array_equal(vs.token_ids, [5, 7])
    np.testing.assert_array_equal(vs.counts, [3, 4])
    np.testing.assert_allclose(vs.vs, [1.0, 0.5])
    np.testing.assert_array_equal(vs.top_expert, [0, 0])
    assert vs.score == pytest.approx((3 * 1.0 + 4 * 0.5) / 7)
    assert an.vocabulary_specialisation(t, 0, min_count=4).score == pytest.approx(0.5)
    top = an.top_tokens_per_expert(t, 0, n=5)
    assert top[0] == [(5, 3, 1.0), (7, 2, 0.5)]
    assert top[1] == [(7, 2, 0.5)]
    assert an.top_tokens_per_expert(t, 0, by="share")[0][0] == (5, 3, 1.0)


def test_vocabulary_top2_counts_occurrences():
    # top-2: token 3 always has expert 1 among its two -> VS = 1 (not 1/2)
    idx = np.array([[[1, 0], [2, 1]]])
    t = make_trace(idx, [[3, 3]], experts=3)
    assert an.vocabulary_specialisation(t, 0).vs[0] == pytest.approx(1.0)
