"""Per-layer results index by layer id, not by captured position, on Maverick-like interleaved
layers (MoE on odd layers only): ``trace.top1()``, ``an.load_matrix`` and
``an.domain_js_by_layer``."""

from __future__ import annotations

import numpy as np
import pytest
from oracle import CASES

import workbench as wb
from workbench import analysis as an
from workbench.trace import LayerArray

CFG = wb.ModelConfig.tiny(**CASES["maverick"])  # dense 0, 2; MoE 1, 3


def _trace(seed: int, domain: str) -> wb.Trace:
    rng = np.random.default_rng(seed)
    E, k = CFG.num_local_experts, CFG.num_experts_per_tok
    arrays = {f"layers.{i}.moe.topk_indices":
              rng.integers(0, E if i == 1 else 3, (2, 11, k)).astype(np.int32)
              for i in CFG.moe_layers}
    arrays["layers.0.resid_post"] = rng.normal(size=(2, 11, 4)).astype(np.float32)
    return wb.Trace(arrays, rng.integers(3, 50, (2, 11)),
                    {"config": {"experts": E}, "domain": domain})


def test_maverick_config_interleaves():
    assert CFG.moe_layers == [1, 3]


def test_top1_indexes_by_layer_id():
    t = _trace(0, "a")
    top = t.top1()
    assert top.layers == [1, 3] == t.moe_layers
    np.testing.assert_array_equal(top[3], t.routing(3).indices[..., 0])
    np.testing.assert_array_equal(top[3, 1, 4], t.routing(3).indices[1, 4, 0])
    with pytest.raises(KeyError, match=r"layer 0 has no captured routing.*\[1, 3\]"):
        top[0]


def test_load_matrix_indexes_by_layer_id():
    t = _trace(0, "a")
    m = an.load_matrix(t)
    assert isinstance(m, LayerArray) and m.layers == [1, 3]
    assert m.shape == (2, CFG.num_local_experts)
    np.testing.assert_array_equal(m[1], an.expert_load(t, 1))
    np.testing.assert_array_equal(m[3], an.expert_load(t, 3))
    assert m[3, 2] == an.expert_load(t, 3)[2] and m[np.int64(3), 2] == m[3, 2]
    assert not np.array_equal(m[1], m[3])  # layer 3 uses experts 0-2 only
    with pytest.raises(IndexError, match=r"layer 0 is not in this per-layer array.*\[1, 3\]"):
        m[0]
    # slices, iteration and arithmetic are plain numpy, in ``layers`` order
    np.testing.assert_array_equal(m[:, 0], [m[1][0], m[3][0]])
    np.testing.assert_array_equal(list(m), [m[1], m[3]])
    r = m * CFG.num_local_experts
    assert type(r) is np.ndarray and r.shape == m.shape
    np.testing.assert_array_equal(r[1], m[3] * CFG.num_local_experts)  # position 1 = layer 3
    assert type(m.mean(axis=1)) is np.ndarray and type(np.asarray(m)) is np.ndarray
    assert "layers=[1, 3]" in repr(m)
    # layers given in another order name the rows in that order
    rev = an.load_matrix(t, [3, 1])
    np.testing.assert_array_equal(rev[3], m[3])
    np.testing.assert_array_equal(np.asarray(rev)[0], m[3])


def test_domain_js_by_layer_indexes_by_layer_id():
    traces = [_trace(0, "a"), _trace(1, "a"), _trace(2, "b"), _trace(3, "b")]
    js = an.domain_js_by_layer(traces, [1, 3])
    assert js.layers == [1, 3] and js.shape == (2, 2)
    for i in (1, 3):
        np.testing.assert_array_equal(js[i], an.domain_specialisation(traces, i).js)
    with pytest.raises(IndexError, match="layer 2"):
        js[2]


def test_layer_array_refuses_mismatched_layers():
    with pytest.raises(ValueError, match=r"3 layer ids \[1, 3, 5\] for an array of shape \(2, 4\)"):
        LayerArray(np.zeros((2, 4)), [1, 3, 5])
    with pytest.raises(ValueError, match="repeated layer ids"):
        LayerArray(np.zeros((2, 4)), [1, 1])
