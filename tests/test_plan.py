"""`workbench plan`: memory per mode and bytes per step, checked against a streamed run."""

from __future__ import annotations

import numpy as np
import pytest

import workbench as wb
from workbench.config import ModelConfig
from workbench.plan import expected_experts, make_plan, plan_text
from workbench.random_weights import write_random_checkpoint


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("maverick", [False, True])
def test_decode_bytes_equal_what_a_streamed_decode_step_reads(tmp_path, backend, maverick):
    cfg = (ModelConfig.tiny_maverick() if maverick else ModelConfig.tiny())
    path = write_random_checkpoint(tmp_path, cfg, seed=2)
    p = make_plan(cfg, "1GB", dtype="float32", read_rate=1e9, backend=backend)
    m = wb.load(path, backend=backend, offload="disk")
    cache = m.new_cache(1)
    from workbench.interventions import Plan
    from workbench.model import CaptureSpec
    m._forward(np.array([[5, 6, 7]]), Plan(), CaptureSpec(frozenset()), cache)
    m.io_stats(reset=True)
    m._forward(np.array([[9]]), Plan(), CaptureSpec(frozenset()), cache)
    assert m.io_stats()["total"]["bytes_read"] == p.decode_read
    assert p.decode_s == pytest.approx(p.decode_read / 1e9)


def test_scout_and_maverick_modes():
    scout, maverick = ModelConfig.scout(), ModelConfig.maverick()
    p = make_plan(scout, "24GB", read_rate=2e9)
    assert p.mode == "disk" and p.weights == scout.param_counts()["total"] * 2
    assert p.streamed_need < 24e9 < p.resident_need
    assert make_plan(scout, "300GB", read_rate=2e9).mode == "resident"
    # a decode step streams the active parameters: about 17B in bf16
    assert 30e9 < p.decode_read < 36e9
    # torch holds one expert at a time; jax the experts a layer chose (up to all 128)
    assert make_plan(maverick, "24GB", read_rate=2e9).mode == "disk"
    assert make_plan(maverick, "24GB", read_rate=2e9, backend="jax").mode == "does not fit"
    text = plan_text(p, scout, "scout")
    assert "mode: disk" in text and "decode" in text
    assert expected_experts(16, 1) == pytest.approx(1.0)
    assert expected_experts(16, 10**6) == pytest.approx(16.0)


def test_read_rate_is_measured_on_the_checkpoint(tmp_path):
    cfg = ModelConfig.tiny()
    path = write_random_checkpoint(tmp_path, cfg)
    p = make_plan(cfg, "1GB", path=path)
    assert p.read_rate > 0 and "model.safetensors" in p.read_rate_source


@pytest.mark.parametrize("kw, match", [
    (dict(memory="lots"), "memory=.lots"), (dict(memory=0), "positive"),
    (dict(dtype="int3"), "dtype"), (dict(prefill_tokens=0), "prefill_tokens"),
    (dict(backend="tf"), "backend"),
])
def test_bad_plan_arguments(kw, match):
    args = dict(memory="24GB", read_rate=1e9) | kw
    with pytest.raises(ValueError, match=match):
        make_plan(ModelConfig.scout(), **args)
