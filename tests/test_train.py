"""`workbench train --quick`: a real (short) training run end to end."""

from __future__ import annotations

import json

import numpy as np

import workbench as wb
from workbench.analysis.training import load_training_log, training_curves
from workbench.cli import main
from workbench.train import TrainArgs, lr_at, unigram_loss


def test_quick_training_writes_a_loadable_llama4_checkpoint(tmp_path, capsys):
    out = tmp_path / "quick"
    assert main(["train", "--quick", "--out", str(out), "--snapshots", "10"]) == 0
    assert "done: val loss" in capsys.readouterr().out
    for f in ("config.json", "model.safetensors", "tokenizer.json", "training_log.json"):
        assert (out / f).exists(), f
    assert (out / "checkpoints" / "step-00010" / "model.safetensors").exists()
    log = load_training_log(out / "training_log.json")
    steps = log["steps"]
    assert len(steps) == 30 and steps[-1]["val_loss"] is not None
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5, "the loss must go down"
    meta = json.loads((out / "training_log.json").read_text())["meta"]
    assert meta["final_val_loss"] < 8.0 and meta["unigram_val_loss"] > 0
    curves = training_curves(out / "training_log.json")
    assert curves.load.shape[0] == 30
    cfg = wb.ModelConfig.from_pretrained(out)
    assert cfg.moe_layers and cfg.nope_layers == [3]
    tok = wb.Tokenizer.from_pretrained(out)
    model = wb.load(out)
    ids = np.array([tok.encode("def f(x):\n    return x")])
    assert model.run(ids).logits.shape == (1, ids.shape[1], cfg.vocab_size)
    from transformers import Llama4ForCausalLM
    Llama4ForCausalLM.from_pretrained(out)
    # a second run into the same directory needs --overwrite, and is refused before it starts
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["train", "--quick", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_schedule_and_baseline():
    a = TrainArgs(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, a) == 0.1 and lr_at(9, a) == 1.0
    assert abs(lr_at(99, a) - 0.1) < 1e-3
    assert all(lr_at(i, a) >= lr_at(i + 1, a) for i in range(10, 99))
    stream = np.array([0, 0, 0, 1])
    assert abs(unigram_loss(stream, np.array([0]), 2) - -np.log(4 / 6)) < 1e-12
