"""``benchmarks/gpu_check.py`` runs on the CPU (its harness check): every variant it measures
loads, runs, decodes and lands in the JSON summary and the report table, so a lent GPU's
minutes are not spent finding a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_harness_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device-torch", "cpu",
           "--device-jax", "cpu", "--quick", "--sections", "env,roofline,throughput:bfloat16",
           "--experts", "16", "--seqs", "16", "--new", "2", "--repeats", "1",
           "--variants", "torch", "torch_loop", "jax", "jax_tiles", "hf", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["roofline"]["skipped"].startswith("torch device cpu")
    per = summary["throughput:bfloat16"]["configs"]["E16"]["bfloat16"]
    for name in ("torch", "torch_loop", "jax", "jax_tiles", "hf"):
        row = per[name]
        assert "error" not in row, (name, row.get("error"))
        assert row["prefill_16"]["tok_s"] > 0 and row["layers_16"]["tok_s"] > 0
        assert row["decode_tok_s"] > 0
    assert per["logits_rel_jax_vs_torch"] < 0.1 and per["decode_bytes_per_step"] > 0
    assert per["torch"]["prefill_16"]["speed_over_hf"] > 0
    assert "| mini E16 | bfloat16 | jax_tiles |" in run.stdout
