"""`workbench report` on a tiny checkpoint (--text, --corpus-sample) and on a saved trace."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import workbench as wb
from workbench.random_weights import write_random_checkpoint
from workbench.report import add_arguments, run_report

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "data" / "tokenizer" / "tokenizer.json"
CORPUS = ROOT / "data" / "corpus" / "val.jsonl"


def report(*argv: str) -> int:
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    return run_report(ap.parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Tiny random checkpoint (4 experts, chunk 8, NoPE at layer 3) with tokenizer, training
    log and one intermediate checkpoint."""
    path = tmp_path_factory.mktemp("report") / "ckpt"
    cfg = wb.ModelConfig.tiny(vocab_size=4096, num_local_experts=4)
    write_random_checkpoint(path, cfg, seed=0, router_std=0.5)
    shutil.copy(TOKENIZER, path / "tokenizer.json")
    write_random_checkpoint(path / "checkpoints" / "step-00010", cfg, seed=1, router_std=0.5)
    from workbench import analysis as an
    log = an.new_training_log({"note": "synthetic"})
    for step in (5, 10, 15):
        log["steps"].append(an.training_log_entry(
            step, 6.0 - step / 10, {i: [0.4, 0.3, 0.2, 0.1] for i in cfg.moe_layers},
            {i: 1.3 for i in cfg.moe_layers}, val_loss=6.2 if step == 15 else None))
    (path / "training_log.json").write_text(json.dumps(log))
    return path


def _metrics(out: Path) -> dict:
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    return json.loads(text)


def test_report_text(ckpt, tmp_path, capsys):
    out = tmp_path / "rep"
    text = "def add(a, b):\n    return a + b  # sum of $a and $b\n"
    assert report(ckpt, "--out", out, "--text", text, "--max-tokens", "24", "--dpi", "40") == 0
    m = _metrics(out)
    ids = wb.Tokenizer.from_pretrained(ckpt).encode(text)[:24]
    assert [i["ids"] for i in m["inputs"]] == [ids]
    for name in ("load_heatmap", "imbalance", "token_routing", "margins", "gates",
                 "same_expert", "transitions", "expert_flow", "top_tokens", "router_similarity",
                 "attention_L0", "attention_L3", "attention_by_type", "ablation", "training",
                 "stability", "category_specialisation"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
        assert f"{name}.png" in m["figures"]
    assert "domain_specialisation.png" not in m["figures"]          # one domain only
    assert set(m["load"]["stats"]) == {"0", "1", "2", "3"}
    assert m["stability"]["by_checkpoint"]["step 10"][0]["tokens"] == len(ids)
    assert m["causal"]["layer"] == m["layer"] == 2
    assert m["training"]["steps"] == 3
    printed = capsys.readouterr().out
    assert "metrics.json" in printed and "load_heatmap.png" in printed


def test_report_corpus_sample(ckpt, tmp_path):
    out = tmp_path / "rep"
    assert report(ckpt, "--out", out, "--corpus-sample", "1", "--corpus", CORPUS,
                  "--max-tokens", "16", "--layer", "1", "--no-causal", "--dpi", "40",
                  "--figures", "domain_*,token_routing_*,specialisation_by_layer") == 0
    m = _metrics(out)
    domains = sorted({json.loads(line)["domain"] for line in CORPUS.open()})
    assert sorted(i["domain"] for i in m["inputs"]) == domains      # one document per domain
    assert all(1 < len(i["ids"]) <= 16 for i in m["inputs"])
    assert m["layer"] == 1 and "causal" not in m
    assert set(m["specialisation"]["domain"]["1"]["domains"]) == set(domains)
    for name in ["domain_specialisation", "domain_divergence", "specialisation_by_layer"] + \
            [f"token_routing_{d}" for d in domains]:
        assert (out / f"{name}.png").is_file(), name
    assert sorted(p.name for p in out.glob("*.png")) == sorted(m["figures"])
    assert not (out / "load_heatmap.png").exists()                  # --figures filter
    assert m["load"]["stats"] and m["dynamics"]["same_expert"]      # metrics stay complete


def test_report_default_corpus_sample(ckpt, tmp_path):
    """Without --text or --corpus the report rests on wb.data.corpus_sample: N equal-length
    sequences per shipped domain, each row of a domain one document of the statistics."""
    out = tmp_path / "rep"
    assert report(ckpt, "--out", out, "--corpus-sample", "3", "--max-tokens", "12",
                  "--no-causal", "--dpi", "40", "--n-boot", "10",
                  "--figures", "domain_share") == 0
    m = _metrics(out)
    sample = wb.data.corpus_sample(3, tokenizer=wb.Tokenizer.from_pretrained(ckpt), length=12,
                                   progress=False)
    assert [i["ids"] for i in m["inputs"]] == [r.tolist() for d in sorted(sample)
                                              for r in sample[d]]
    assert [i["source"] for i in m["inputs"]] == [s for d in sorted(sample)
                                                 for s in sample.sources[d]]
    js = m["specialisation"]["estimates"]["domain_js"][str(m["layer"])]
    assert js["n_docs"] == 3 * len(sample) and js["n_tokens"] == sample.tokens
    assert m["figures"] == ["domain_share.png"]
    assert report(ckpt, "--out", tmp_path / "big", "--corpus-sample", "100000",
                  "--no-causal") == 2


def test_report_formats_index_and_statistics(ckpt, tmp_path):
    """--format png,pdf,svg writes every figure three times (PDF with TrueType fonts, SVG
    with text), index.html shows each with its caption and the statistics with baselines."""
    import re
    out = tmp_path / "rep"
    assert report(ckpt, "--out", out, "--corpus-sample", "2", "--corpus", CORPUS,
                  "--max-tokens", "16", "--layer", "1", "--no-causal", "--dpi", "40",
                  "--format", "png,pdf,svg", "--n-boot", "20",
                  "--figures", "domain_specialisation,specialisation_by_layer,imbalance") == 0
    m = _metrics(out)
    est = m["specialisation"]["estimates"]
    assert set(est) >= {"domain_js", "category_nmi", "vocabulary"}
    js = est["domain_js"]["1"]
    assert js["ci_low"] <= js["value"] <= js["ci_high"]
    assert js["baseline_low"] <= js["baseline"] <= js["baseline_high"]
    assert js["n_docs"] == 2 * len(m["specialisation"]["domain"]["1"]["domains"])
    names = ["domain_specialisation", "specialisation_by_layer", "imbalance"]
    for name in names:
        for fmt in ("png", "pdf", "svg"):
            assert (out / f"{name}.{fmt}").is_file(), (name, fmt)
        pdf = (out / f"{name}.pdf").read_bytes()
        assert b"/FontFile2" in pdf and b"/Type3" not in pdf      # embedded TrueType
        assert b"<text" in (out / f"{name}.svg").read_bytes()     # text stays text
    html = (out / "index.html").read_text()
    assert "href='metrics.json'" in html
    for name in names:
        assert f"src='{name}.png'" in html and f"href='{name}.pdf'" in html
    assert "shuffled" in html and "bootstrap" in html
    row = re.search(r"<td[^>]*>domain_js</td><td>1</td><td>([0-9.]+)</td>", html)
    assert row and float(row.group(1)) == pytest.approx(js["value"], abs=1e-3)
    assert report(ckpt, "--out", tmp_path / "bad", "--text", "x y z", "--format", "png,gif") == 2


def test_report_trace_file(ckpt, tmp_path):
    model = wb.load(ckpt)
    ids = np.arange(5, 25)[None]
    tr = model.run(ids, capture=["*.moe.*", "layers.3.attn.pattern"]).trace
    path = tr.save(tmp_path / "run.safetensors")
    out = tmp_path / "rep"
    assert report(path, "--out", out, "--dpi", "40", "--figures",
                  "load_heatmap,token_routing,margins,expert_flow,attention_*,top_tokens") == 0
    m = _metrics(out)
    assert m["source"]["kind"] == "trace" and m["inputs"][0]["ids"] == ids[0].tolist()
    for name in ("load_heatmap", "token_routing", "margins", "expert_flow", "attention_L3",
                 "top_tokens"):
        assert (out / f"{name}.png").is_file(), name
    assert not (out / "ablation.png").exists()


def test_report_bad_inputs(ckpt, tmp_path, capsys):
    assert report(tmp_path / "missing", "--out", tmp_path / "o") == 2
    assert report(ckpt, "--out", tmp_path / "o", "--text", "hi there", "--layer", "9") == 2
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a trace")
    assert report(bad, "--out", tmp_path / "o") == 2
    assert "error:" in capsys.readouterr().err

