"""Tests for scripts/build_corpus.py and the committed data/corpus files."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "corpus"
DOMAINS = ("code", "prose", "legal", "numeric")
HARD_CAP_BYTES = 20_000_000


def _load_builder() -> ModuleType:
    name = "build_corpus"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "build_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def builder() -> ModuleType:
    return _load_builder()


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict[str, str]]]:
    return {split: _read(CORPUS / f"{split}.jsonl") for split in ("train", "val")}


def _group(source: str) -> str:
    return source.split("#part")[0]


# ------------------------------------------------------------------------ committed corpus


def test_splits_exist_and_are_well_formed(splits: dict[str, list[dict[str, str]]]) -> None:
    for split, docs in splits.items():
        assert docs, split
        for doc in docs:
            assert set(doc) == {"domain", "source", "text"}
            assert all(isinstance(v, str) and v for v in doc.values())
            assert doc["domain"] in DOMAINS


def test_all_domains_in_both_splits(splits: dict[str, list[dict[str, str]]]) -> None:
    for split, docs in splits.items():
        assert {d["domain"] for d in docs} == set(DOMAINS), split


def test_no_document_shared_between_splits(splits: dict[str, list[dict[str, str]]]) -> None:
    train, val = splits["train"], splits["val"]
    assert not {d["text"] for d in train} & {d["text"] for d in val}
    assert not {d["source"] for d in train} & {d["source"] for d in val}
    # chunks of one file stay in one split
    assert not {_group(d["source"]) for d in train} & {_group(d["source"]) for d in val}


def test_no_duplicate_documents(splits: dict[str, list[dict[str, str]]]) -> None:
    texts = [d["text"] for docs in splits.values() for d in docs]
    assert len(texts) == len(set(texts))


def test_size_caps_and_balance(
    builder: ModuleType, splits: dict[str, list[dict[str, str]]]
) -> None:
    total_file_bytes = sum((CORPUS / f"{s}.jsonl").stat().st_size for s in ("train", "val"))
    assert total_file_bytes < HARD_CAP_BYTES
    per_domain = {d: 0 for d in DOMAINS}
    for docs in splits.values():
        for doc in docs:
            per_domain[doc["domain"]] += len(doc["text"].encode("utf-8"))
    assert max(per_domain.values()) <= builder.DEFAULT_MAX_BYTES_PER_DOMAIN
    assert min(per_domain.values()) >= 0.6 * max(per_domain.values()), per_domain
    assert sum(per_domain.values()) >= 4_000_000  # enough text for the CPU training run


def test_val_fraction(splits: dict[str, list[dict[str, str]]]) -> None:
    for domain in DOMAINS:
        n_val = sum(len(d["text"]) for d in splits["val"] if d["domain"] == domain)
        n_train = sum(len(d["text"]) for d in splits["train"] if d["domain"] == domain)
        assert 0.02 <= n_val / (n_val + n_train) <= 0.12, domain


def test_documents_are_clean(splits: dict[str, list[dict[str, str]]]) -> None:
    control = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\r\ufffd]")
    for docs in splits.values():
        for doc in docs:
            text = doc["text"]
            assert not control.search(text), doc["source"]
            assert max(len(line) for line in text.split("\n")) <= 1000, doc["source"]


def test_sources_match_domains(splits: dict[str, list[dict[str, str]]]) -> None:
    prefixes = {
        "code": ("stdlib:",),
        "prose": ("stdlib:pydoc_data/topics.py#", "stdlib-docstrings:"),
        "legal": ("/usr/share/common-licenses/", "/usr/share/doc/"),
        "numeric": ("synthetic:",),
    }
    for docs in splits.values():
        for doc in docs:
            assert doc["source"].startswith(prefixes[doc["domain"]]), doc["source"]
    code_files = {_group(d["source"]) for s in splits.values() for d in s if d["domain"] == "code"}
    prose_files = {
        "stdlib:" + _group(d["source"]).removeprefix("stdlib-docstrings:")
        for s in splits.values()
        for d in s
        if d["source"].startswith("stdlib-docstrings:")
    }
    assert not code_files & prose_files  # docstring prose never comes from a code file


def test_readme_documents_domains_and_counts(splits: dict[str, list[dict[str, str]]]) -> None:
    readme = (CORPUS / "README.md").read_text(encoding="utf-8")
    assert "scripts/build_corpus.py" in readme
    assert "synthetic" in readme.lower()
    for domain in DOMAINS:
        assert f"`{domain}`" in readme
        n_train = sum(d["domain"] == domain for d in splits["train"])
        n_val = sum(d["domain"] == domain for d in splits["val"])
        row = re.search(rf"^\| {domain} \| (\d+) \| [\d,]+ \| (\d+) \| [\d,]+ \|$", readme, re.M)
        assert row is not None, domain
        assert (int(row.group(1)), int(row.group(2))) == (n_train, n_val)
    for licence in ("PSF", "common-licenses", "copyright"):
        assert licence in readme


# ------------------------------------------------------------------------------- builder


def test_build_is_deterministic(builder: ModuleType, tmp_path: Path) -> None:
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / name
        stats = builder.build(out, max_bytes_per_domain=20_000, seed=3)
        files = ("train.jsonl", "val.jsonl", "README.md")
        outputs.append({f: (out / f).read_bytes() for f in files})
        for split in ("train", "val"):
            for domain in DOMAINS:
                n_docs, _chars, n_bytes = stats[split][domain]
                assert n_docs >= 1, (split, domain)
                assert n_bytes <= 20_000
    assert outputs[0] == outputs[1]
    builder.build(tmp_path / "c", max_bytes_per_domain=20_000, seed=4)
    assert (tmp_path / "c" / "train.jsonl").read_bytes() != outputs[0]["train.jsonl"]


def test_build_respects_hard_cap(builder: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hard cap"):
        builder.build(tmp_path, max_bytes_per_domain=HARD_CAP_BYTES)


def test_clean_text_drops_junk(builder: ModuleType) -> None:
    assert builder.clean_text("\x00\x01\x02binary" * 100) is None
    assert builder.clean_text("short") is None
    text = "ok line\r\n" * 40 + "x" * 5000 + "\n" + "tail line\n" * 10
    cleaned = builder.clean_text(text)
    assert cleaned is not None
    assert "\r" not in cleaned and "x" * 5000 not in cleaned and "tail line" in cleaned


def test_chunk_text_keeps_all_lines(builder: ModuleType) -> None:
    blocks = [
        f"block {i}\n" + "\n".join(f"line {i}.{j}" for j in range(i % 7 + 1)) for i in range(400)
    ]
    text = "\n\n".join(blocks) + "\n"
    chunks = builder.chunk_text(text, max_chars=500)
    assert len(chunks) > 1
    assert all(len(c) <= 501 for c in chunks)
    lines = [ln for c in chunks for ln in c.split("\n") if ln]
    assert lines == [ln for ln in text.split("\n") if ln]
