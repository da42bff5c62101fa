"""Attention statistics on known patterns, and chunked vs global layers at chunk boundaries."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workbench import analysis as an
from workbench.trace import Trace

T = 8
CHUNK = 4


def causal_uniform(T: int, chunk: int | None = None) -> np.ndarray:
    """(T, T) uniform attention over the visible keys (causal, optionally chunked)."""
    q = np.arange(T)[:, None]
    k = np.arange(T)[None, :]
    m = k <= q
    if chunk:
        m &= (k // chunk) == (q // chunk)
    return m / m.sum(axis=1, keepdims=True)


def make_trace(patterns: dict[int, np.ndarray], nope: list[int], batch: int = 1) -> Trace:
    arrays = {f"layers.{i}.attn.pattern": np.broadcast_to(p, (batch, *p.shape)).copy()
              for i, p in patterns.items()}
    cfg = {"layers": 4, "nope_layers": nope, "chunk": CHUNK, "experts": 4, "moe_layers": []}
    return Trace(arrays, np.zeros((batch, T), dtype=np.int64), meta={"config": cfg})


def heads(*ps: np.ndarray) -> np.ndarray:
    return np.stack(ps)  # (H, T, T)


def test_known_patterns_entropy_distance_sink():
    uni = causal_uniform(T)
    diag = np.eye(T)
    first = np.zeros((T, T))
    first[:, 0] = 1.0
    t = make_trace({0: heads(uni, diag, first)}, nope=[], batch=2)
    ent = an.attention_entropy(t, 0)
    np.testing.assert_allclose(ent, [np.mean(np.log(np.arange(1, T + 1))), 0.0, 0.0])
    dist = an.mean_attention_distance(t, 0)
    np.testing.assert_allclose(dist, [np.mean(np.arange(T) / 2), 0.0, np.mean(np.arange(T))])
    sink = an.sink_mass(t, 0)
    np.testing.assert_allclose(sink, [np.mean(1 / np.arange(2, T + 1)), 0.0, 1.0])
    assert an.pattern_layers(t) == [0]
    hist, edges = an.distance_histogram(t, 0)
    np.testing.assert_array_equal(edges, [0, 1, 2, 4, 8])
    np.testing.assert_allclose(hist.sum(axis=1), 1.0)
    np.testing.assert_allclose(hist[1], [1, 0, 0, 0])  # self-attention: all at distance 0
    # attend-to-first: distances q = 0 | 1 | 2,3 | 4..7 -> 1/8, 1/8, 2/8, 4/8
    np.testing.assert_allclose(hist[2], [1 / 8, 1 / 8, 2 / 8, 4 / 8])


def test_chunked_vs_global_at_chunk_boundaries():
    chunked = causal_uniform(T, CHUNK)
    glob = causal_uniform(T)
    t = make_trace({0: heads(chunked, chunked), 3: heads(glob, glob)}, nope=[3])
    assert an.layer_type(t, 0) == "chunked" and an.layer_type(t, 3) == "global"
    np.testing.assert_allclose(an.cross_chunk_mass(t, 0), 0.0)
    # global uniform: query q >= 4 puts 4/(q+1) on keys 0..3
    want = np.mean([4 / (q + 1) for q in range(CHUNK, T)])
    np.testing.assert_allclose(an.cross_chunk_mass(t, 3), want)
    # distance resets at the boundary on the chunked layer, keeps growing on the global one
    np.testing.assert_allclose(an.distance_by_chunk_offset(t, 0), np.arange(CHUNK) / 2)
    np.testing.assert_allclose(an.distance_by_chunk_offset(t, 3),
                               [(o / 2 + (o + CHUNK) / 2) / 2 for o in range(CHUNK)])
    rows = an.attention_summary(t)
    assert [(r["layer"], r["type"]) for r in rows] == [(0, "chunked"), (3, "global")]
    assert rows[0]["cross_chunk"] == pytest.approx(0.0)
    assert rows[1]["cross_chunk"] == pytest.approx(want)
    assert rows[1]["distance"] > rows[0]["distance"]
    by = an.by_layer_type(t)
    assert set(by) == {"chunked", "global"}
    assert by["chunked"]["layers"] == [0] and by["global"]["layers"] == [3]
    np.testing.assert_allclose(by["chunked"]["distance_hist"].sum(), 1.0)
    # chunked attention never reaches distance >= CHUNK; global does
    far = by["global"]["edges"][:-1] >= CHUNK
    assert by["chunked"]["distance_hist"][far].sum() == 0
    assert by["global"]["distance_hist"][far].sum() > 0
    with pytest.raises(ValueError, match="chunk boundary"):
        an.cross_chunk_mass(t, 3, chunk=64)


def test_decode_step_queries_are_last_positions():
    # one query at position 7 over 8 keys, uniform
    p = np.full((1, 1, 1, T), 1 / T)
    t = Trace({"layers.0.attn.pattern": p}, np.zeros((1, T), dtype=np.int64),
              meta={"config": {"nope_layers": [0], "chunk": None}})
    assert an.mean_attention_distance(t, 0)[0] == pytest.approx(np.mean(np.arange(T)))
    assert an.attention_entropy(t, 0)[0] == pytest.approx(math.log(T))


def test_missing_pattern():
    t = make_trace({0: heads(np.eye(T))}, nope=[])
    with pytest.raises(ValueError, match=r"layers\.2\.attn\.pattern"):
        an.attention_entropy(t, 2)
