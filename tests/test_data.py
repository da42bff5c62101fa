"""wb.data.corpus_sample: domain samples from the corpus shipped as package data."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import workbench as wb
from workbench import data

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def tok():
    return wb.Tokenizer.from_pretrained(ROOT / "data" / "scout-mini")


def test_shipped_corpus_is_the_repository_split():
    shipped = gzip.decompress((ROOT / "workbench" / "data" / data.CORPUS_FILE).read_bytes())
    assert shipped == (ROOT / "data" / "corpus" / "val.jsonl").read_bytes(), \
        "re-ship it: gzip -9 -n -c data/corpus/val.jsonl > workbench/data/" + data.CORPUS_FILE
    assert '"workbench.data" = ["*.jsonl.gz"]' in (ROOT / "pyproject.toml").read_text()


def test_default_sample_has_thousands_of_tokens(tok, capsys):
    s = wb.data.corpus_sample(tokenizer=tok)
    assert sorted(s) == data.domains() == ["code", "legal", "numeric", "prose"]
    assert all(a.shape == (16, 128) and a.dtype == np.int64 for a in s.values())
    assert s.tokens == 4 * 16 * 128
    assert all((a[:, 0] == tok.bos_id).all() for a in s.values())
    # rows are real text of the domain: the first row is the first long document's start
    first = next(d for d in data.documents() if d["domain"] == "legal"
                 and len(tok.encode(d["text"])) >= 128)
    assert s["legal"][0].tolist() == tok.encode(first["text"])[:128]
    assert s.sources["legal"][0] == first["source"] and len(s.sources["code"]) == 16
    assert len(set(map(tuple, s["code"].tolist()))) == 16  # windows, never repeated
    assert "encoding corpus" in capsys.readouterr().err  # the progress bar


def test_sample_choices_and_refusals(tok):
    s = data.corpus_sample(3, ["code", "prose"], tokenizer=tok, length=32, progress=False)
    assert sorted(s) == ["code", "prose"] and s["code"].shape == (3, 32)
    assert list(data.corpus_sample(2, "numeric", tokenizer=tok, progress=False)) == ["numeric"]
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['poetry'\]"):
        data.corpus_sample(2, ["poetry"], tokenizer=tok)
    with pytest.raises(ValueError, match="domain 'code' gives only"):
        data.corpus_sample(10_000, ["code"], tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        data.corpus_sample(2)
    with pytest.raises(ValueError, match="length must be an int >= 2"):
        data.corpus_sample(2, tokenizer=tok, length=1)


def test_works_without_a_source_checkout(tmp_path):
    """Only the package is needed: run from elsewhere with the package copied on its own."""
    import shutil
    shutil.copytree(ROOT / "workbench", tmp_path / "pkg" / "workbench",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import workbench as wb; from pathlib import Path; "
            "print(len(wb.data.documents()), wb.data.domains(), "
            "Path(wb.__file__).parent.parent.name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True,
                         capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path / "pkg"), "PATH": "/usr/bin:/bin"})
    assert out.stdout.split()[0] == "86" and out.stdout.strip().endswith("pkg")
