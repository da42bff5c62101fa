"""workbench.jsonio.to_json: the one cleaner behind trace metadata, demo summary, report metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import ml_dtypes
import numpy as np
import pytest

from workbench.jsonio import dumps, to_json
from workbench.parity import HookDiff, ParityReport
from workbench.trace import Trace


def strict(x):
    """Encode as strict JSON (no NaN/Infinity tokens) and decode again."""
    return json.loads(json.dumps(to_json(x), allow_nan=False))


def test_numpy_containers_and_keys():
    x = {1: np.float32(1.5), "a": np.arange(3), "n": float("nan"), "t": (np.int64(2),)}
    assert json.dumps(to_json(x), allow_nan=False) == \
        '{"1": 1.5, "a": [0, 1, 2], "n": null, "t": [2]}'
    assert strict({"b": np.bool_(True), "u": np.uint8(7), "h": np.float16(0.5),
                   "bf": ml_dtypes.bfloat16(2.0), "m": np.eye(2, dtype=np.float32)}) == \
        {"b": True, "u": 7, "h": 0.5, "bf": 2.0, "m": [[1.0, 0.0], [0.0, 1.0]]}
    assert isinstance(to_json(np.int32(3)), int) and isinstance(to_json(np.bool_(0)), bool)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), np.float32("nan"),
                                 np.float64("-inf"), ml_dtypes.bfloat16("inf")])
def test_non_finite_numbers_become_null(bad):
    assert to_json(bad) is None
    assert strict([bad, {"x": bad}, np.array([1.0, bad])]) == [None, {"x": None}, [1.0, None]]


def test_dataclasses_paths_sets():
    @dataclass
    class Row:
        name: str
        where: Path
        rel: float

    assert strict(Row("a", Path("/tmp/x"), float("nan"))) == {"name": "a", "where": "/tmp/x",
                                                              "rel": None}
    assert to_json(PurePosixPath("a/b")) == "a/b"
    assert to_json({3, 1, 2}) == [1, 2, 3]
    assert sorted(to_json({1, "a"}), key=str) == [1, "a"]  # unsortable: any order
    assert to_json(Row) is Row  # a class is not an instance: left for json to reject


def test_unencodable_values_still_fail_loudly():
    with pytest.raises(TypeError):
        dumps({"f": object()})


def test_dumps_is_strict_json_text():
    text = dumps({"x": [np.float64("nan"), 1]}, indent=1)
    assert "NaN" not in text and json.loads(text) == {"x": [None, 1]}


def test_parity_report_with_nan_hooks_is_valid_json():
    rep = ParityReport("torch/float32", "jax/float32", 2e-4, 1e-3,
                       hooks=[HookDiff("layers.1.moe.routed_out", 1, float("nan"), float("nan"),
                                       12, True)])
    d = json.loads(dumps(rep.to_dict()))
    assert d["hooks"][0]["rel"] is None and d["ok"] is True


def test_trace_metadata_is_strict_json(tmp_path):
    meta = {"config": {"experts": np.int64(8)}, "loss": np.float32("nan"), "path": tmp_path,
            "layers": (1, 3)}
    t = Trace({"layers.1.moe.topk_indices": np.zeros((1, 2, 1), np.int32)}, np.zeros((1, 2)),
              meta)
    back = Trace.load(t.save(tmp_path / "t"))
    assert back.meta == {"config": {"experts": 8}, "loss": None, "path": str(tmp_path),
                         "layers": [1, 3]}
    assert back.moe_layers == [1] and back.layers == [1]
