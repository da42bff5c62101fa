"""One copy of the weights: loading keeps peak anonymous memory within 1.15x the tensor bytes.

Each load runs in a fresh interpreter that samples RssAnon (/proc/self/status) from a thread
while it loads, so the peak is the process's own and is not mixed with other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import workbench as wb
from workbench.config import ModelConfig
from workbench.random_weights import write_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="needs /proc/self/status (Linux)")


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    # about 100 MB of bf16 weights: large enough that allocator noise is a few percent
    cfg = ModelConfig.tiny(hidden_size=512, intermediate_size=1024, intermediate_size_mlp=1024,
                           vocab_size=16384, num_hidden_layers=2, num_attention_heads=8,
                           num_key_value_heads=2, head_dim=64, num_local_experts=8)
    return write_random_checkpoint(tmp_path_factory.mktemp("mem"), cfg, seed=0,
                                   dtype="bfloat16")


def _load_peak(path: Path, backend: str, dtype: str) -> dict:
    code = textwrap.dedent(f"""
        import json, threading, time
        import numpy as np
        import workbench as wb
        import {backend}  # the framework's own start-up memory is not the load's

        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024

        peak, stop = [0], [False]

        def sample():
            while not stop[0]:
                peak[0] = max(peak[0], anon())
                time.sleep(0.0005)

        ck = wb.Checkpoint.open({str(path)!r})
        nbytes = sum(ck.info(n).nbytes for n in ck.weight_names())
        ck.close()
        base = anon()
        t = threading.Thread(target=sample)
        t.start()
        m = wb.load({str(path)!r}, backend={backend!r}, dtype={dtype!r})
        stop[0] = True
        t.join()
        peak[0] = max(peak[0], anon())
        logits = m.run([[1, 2, 3]]).logits
        assert np.isfinite(logits).all()
        print(json.dumps({{"bytes": nbytes, "peak": peak[0] - base, "after": anon() - base}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_same_dtype_load_is_one_copy(bf16_ckpt, backend):
    m = _load_peak(bf16_ckpt, backend, "bfloat16")
    assert m["peak"] <= 1.15 * m["bytes"], m
    if backend == "torch":
        # on the CPU the weights are views of the mapped file: next to no anonymous memory
        assert m["peak"] <= 0.15 * m["bytes"], m


def test_converting_load_holds_the_converted_model_once(bf16_ckpt):
    m = _load_peak(bf16_ckpt, "torch", "float32")  # bf16 file -> fp32 weights: 2x the bytes
    assert m["peak"] <= 1.15 * 2 * m["bytes"], m


def test_zero_copy_weights_are_private_to_the_process(bf16_ckpt, tmp_path):
    """Writing to a loaded weight changes the model, never the checkpoint file."""
    import numpy as np
    import torch
    m = wb.load(bf16_ckpt, backend="torch", dtype="bfloat16")
    w = m.params.as_dict()["norm.weight"]
    with torch.no_grad():
        w.mul_(0)
    fresh = wb.Checkpoint.open(bf16_ckpt)
    assert np.asarray(fresh.get("norm.weight"), np.float32).min() == 1.0
    # saving over the directory the model is mapped from leaves the loaded model intact
    before = m.run([[1, 2, 3]]).logits
    wb.Checkpoint.save(bf16_ckpt, fresh.model_tensors(), fresh.config, dtype="bfloat16")
    assert np.array_equal(m.run([[1, 2, 3]]).logits, before)
