"""Router-row similarity and shared-vs-routed norm ratio."""

from __future__ import annotations

import numpy as np
import pytest

from workbench import analysis as an
from workbench.trace import Trace


def test_router_cosine_similarity():
    W = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]])
    S = an.router_cosine_similarity(W)
    assert S.shape == (5, 5)
    np.testing.assert_allclose(np.diag(S), 1.0)
    assert S[0, 1] == pytest.approx(1.0)
    assert S[0, 2] == pytest.approx(0.0)
    assert S[0, 3] == pytest.approx(-1.0)
    assert S[0, 4] == pytest.approx(1 / np.sqrt(2))
    np.testing.assert_allclose(S, S.T)
    assert an.most_similar_experts(S, n=1) == [(0, 1, pytest.approx(1.0))]
    with pytest.raises(ValueError, match="experts, hidden"):
        an.router_cosine_similarity(np.zeros(3))


def test_shared_routed_ratio():
    routed = np.array([[[3.0, 4.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 2.0]]])  # norms 5,0 / 1,2
    shared = np.array([[[0.0, 5.0], [1.0, 0.0]], [[0.0, 2.0], [2.0, 0.0]]])  # norms 5,1 / 2,2
    t = Trace({"layers.1.moe.routed_out": routed, "layers.1.moe.shared_out": shared},
              np.zeros((2, 2), dtype=np.int64), meta={"config": {"experts": 2}})
    np.testing.assert_allclose(an.shared_routed_ratio(t, 1), [1.0, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(an.routed_share(t, 1), [0.5, 0.0, 1 / 3, 0.5])
    np.testing.assert_allclose(an.shared_routed_ratio([t, t], 1).shape, (8,))
    with pytest.raises(ValueError, match=r"layers\.0\.moe\.routed_out"):
        an.shared_routed_ratio(t, 0)
