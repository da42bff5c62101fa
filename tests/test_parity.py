"""wb.compare / ParityReport and the `workbench parity` command."""

from __future__ import annotations

import json

import numpy as np
import pytest

import workbench as wb
from workbench.cli import main
from workbench.config import ModelConfig
from workbench.random_weights import random_tensors, write_random_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = ModelConfig.tiny()
    return write_random_checkpoint(tmp_path_factory.mktemp("p"), cfg, std=0.08, router_std=0.5)


@pytest.fixture(scope="module")
def near_tie_ckpt(tmp_path_factory):
    """Router rows 0 and 1 of every layer differ by 1e-6 x a random direction: near-ties."""
    cfg = ModelConfig.tiny()
    t = random_tensors(cfg, seed=3, std=0.08, router_std=0.02)
    rng = np.random.default_rng(0)
    for i in cfg.moe_layers:
        w = t[f"layers.{i}.feed_forward.router.weight"]
        w[0] = rng.normal(0, 1.0, cfg.hidden_size)
        w[1] = w[0] + 1e-6 * rng.normal(0, 1.0, cfg.hidden_size)
    return wb.Checkpoint.save(tmp_path_factory.mktemp("tie"), t, cfg)


def ids_for(cfg, seq=24, batch=2, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq))


def test_same_model_is_exact(ckpt):
    m = wb.load(ckpt)
    ids = ids_for(m.config)
    rep = wb.compare(m, m, ids)
    assert rep.ok and not rep.flips
    assert all(h.max_abs == 0.0 for h in rep.hooks)
    assert {r.layer for r in rep.routing} == set(m.config.moe_layers)
    assert "verdict: OK" in rep.summary()
    d = rep.to_dict()
    assert d["ok"] and json.dumps(d)
    assert {r["name"] for r in rep.records()} == set(m.hook_names()) - {
        n for n in m.hook_names() if n.endswith("topk_indices")}


def test_bf16_near_ties_are_reported_as_such(near_tie_ckpt):
    a = wb.load(near_tie_ckpt)
    b = wb.load(near_tie_ckpt, dtype="bfloat16")
    ids = ids_for(a.config, seq=40, batch=2, seed=1)
    rep = wb.compare(a, b, ids)
    assert rep.flips, "rows 0 and 1 tie to within bf16 rounding: some tokens must flip"
    first = [f for f in rep.flips if not f.downstream]
    assert first and all(f.near_tie for f in first)
    assert all({f.experts_a[0], f.experts_b[0]} == {0, 1} for f in first)
    assert all(min(f.margin_a, f.margin_b) < 1e-2 for f in first)
    assert rep.all_flips_near_ties and rep.ok
    assert any(h.excluded > 0 for h in rep.hooks), "positions after a flip are set aside"
    text = rep.summary()
    assert "routing flips" in text and "near-tie" in text


def test_wide_margin_flip_fails(ckpt, tmp_path):
    """Different router weights: flips at wide margins are bugs, and the report says so."""
    m = wb.load(ckpt)
    ck = wb.Checkpoint.open(ckpt)
    t = {n: ck[n].copy() for n in ck}
    t["layers.1.feed_forward.router.weight"] = t["layers.1.feed_forward.router.weight"][::-1]
    other = wb.load(wb.Checkpoint.save(tmp_path / "other", t, m.config))
    rep = wb.compare(m, other, ids_for(m.config))
    assert not rep.ok and not rep.all_flips_near_ties
    assert any(not f.near_tie for f in rep.flips)
    assert "WIDE MARGIN" in rep.summary() and "OUT OF TOLERANCE" in rep.summary()


def test_parity_cli_exit_codes(ckpt, capsys, tmp_path):
    args = ["parity", str(ckpt), "--length", "16", "--backend-b", "torch"]
    assert main(args) == 0
    assert "verdict: OK" in capsys.readouterr().out
    out = tmp_path / "r.json"
    assert main(args + ["--dtype", "bfloat16", "--tol", "1e-9", "--json", str(out)]) == 1
    assert "OUT OF TOLERANCE" in capsys.readouterr().out
    assert json.loads(out.read_text())["ok"] is False
    assert main(["parity", str(ckpt), "--ids", "1 2 3 4 5", "--backend-b", "torch"]) == 0


def test_parity_cli_torch_vs_jax(ckpt, capsys):
    pytest.importorskip("jax")
    assert main(["parity", str(ckpt), "--length", "12"]) == 0
    assert "torch/float32  vs  jax/float32" in capsys.readouterr().out
