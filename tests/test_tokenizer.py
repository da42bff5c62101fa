"""Tests for workbench.tokenizer and the committed data/tokenizer/tokenizer.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    TOKEN_CATEGORIES,
    Tokenizer,
    token_category,
)

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / "data" / "tokenizer"
VAL = REPO / "data" / "corpus" / "val.jsonl"
DOMAINS = ("code", "prose", "legal", "numeric")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def val_docs() -> list[dict[str, str]]:
    with VAL.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("domain", DOMAINS)
def test_round_trip_val_domain(tok: Tokenizer, val_docs: list[dict[str, str]], domain: str) -> None:
    docs = [d["text"] for d in val_docs if d["domain"] == domain]
    assert docs, f"no {domain} documents in val split"
    for text in docs[:10]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id
        assert tok.decode(ids) == text
        assert tok.decode(tok.encode(text, add_bos=False)) == text
        assert len(ids) < len(text)  # BPE compresses every domain


@pytest.mark.parametrize(
    "text",
    ["", " ", "\n\n\t  x", "naïve café — ünïcödé ✓ 😀 日本語", "a\r\nb", "x = 1_000_000.25e-3"],
)
def test_round_trip_edge_cases(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_compression_per_domain(tok: Tokenizer, val_docs: list[dict[str, str]]) -> None:
    for domain in DOMAINS:
        texts = [d["text"] for d in val_docs if d["domain"] == domain]
        n_chars = sum(map(len, texts))
        n_tokens = sum(map(len, tok.encode_batch(texts, add_bos=False)))
        assert n_chars / n_tokens > 1.4, domain


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    texts = ["def f(x):\n    return x", "GNU General Public License", "12,34.5\n"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, add_bos=False) == [tok.encode(t, add_bos=False) for t in texts]


# -------------------------------------------------------------------------------- specials


def test_special_tokens(tok: Tokenizer) -> None:
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.token_to_id(BOS_TOKEN) == tok.bos_id
    assert tok.token_to_id(EOS_TOKEN) == tok.eos_id
    assert tok.token_to_id(PAD_TOKEN) == tok.pad_id
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    assert tok.vocab_size == len(tok) == 4096
    assert max(tok.encode("hello world " * 50)) < tok.vocab_size


def test_decode_specials(tok: Tokenizer) -> None:
    ids = [*tok.encode("hi there"), tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "hi there"
    full = tok.decode(ids, skip_special_tokens=False)
    assert full.startswith(BOS_TOKEN) and full.endswith(EOS_TOKEN + PAD_TOKEN)


# ------------------------------------------------------------------------------------- io


def test_from_pretrained_dir_and_file(tok: Tokenizer) -> None:
    from_file = Tokenizer.from_pretrained(TOKENIZER_DIR / "tokenizer.json")
    from_str = Tokenizer.from_pretrained(str(TOKENIZER_DIR))
    text = "import os\nprint(os.getcwd())  # 42\n"
    assert from_file.encode(text) == tok.encode(text) == from_str.encode(text)


def test_missing_tokenizer_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_pretrained(tmp_path)  # directory without tokenizer.json
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_pretrained(missing)


@pytest.mark.parametrize("content", ["{not json", '{"version": "1.0"}', ""])
def test_corrupt_tokenizer_raises(tmp_path: Path, content: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_save_and_reload(tok: Tokenizer, tmp_path: Path) -> None:
    written = tok.save(tmp_path / "ckpt")
    assert written == tmp_path / "ckpt" / "tokenizer.json"
    as_file = tok.save(tmp_path / "other.json")
    text = "Copyright (C) 2024 Example Org.\n"
    for path in (tmp_path / "ckpt", as_file):
        assert Tokenizer.from_pretrained(path).encode(text) == tok.encode(text)


# ----------------------------------------------------------------------------------- train

_TRAIN_TEXTS = [
    "def add(a, b):\n    return a + b\n" * 20,
    "The licence permits copying and distribution of verbatim copies.\n" * 20,
    "\n".join(f"{i},{i * i},{i * 0.5}" for i in range(200)),
]


def test_train_is_deterministic() -> None:
    a = Tokenizer.train(_TRAIN_TEXTS, vocab_size=400)
    b = Tokenizer.train(list(_TRAIN_TEXTS), vocab_size=400)
    assert a.backend.to_str() == b.backend.to_str()
    assert (a.bos_id, a.eos_id, a.pad_id) == (0, 1, 2)
    assert 259 < a.vocab_size <= 400
    text = "def add(x, y):\n    return x + y  # ünïcode\n"
    assert a.decode(a.encode(text)) == text


def test_train_rejects_tiny_vocab() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(_TRAIN_TEXTS, vocab_size=100)


# ---------------------------------------------------------------------- labels / categories


def test_token_strings_readable(tok: Tokenizer) -> None:
    text = "def f(x):\n\treturn x  + 1\n"
    ids = tok.encode(text)
    labels = tok.token_strings(ids)
    assert len(labels) == len(ids)
    assert labels[0] == BOS_TOKEN
    for label in labels:
        assert label  # never an empty label
        assert not any(c in label for c in " \n\t\r"), label
    visible = text.replace(" ", "·").replace("\n", "↵").replace("\t", "→")
    assert "".join(labels[1:]) == visible


def test_token_strings_partial_utf8(tok: Tokenizer) -> None:
    ids = tok.encode("😀", add_bos=False)  # rare 4-byte char: split into byte tokens
    labels = tok.token_strings(ids)
    assert len(ids) > 1
    assert all("\\x" in label for label in labels)
    assert set(tok.categories(ids)) == {"other"}


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        ("<|begin_of_text|>", "special"),
        ("<|pad|>", "special"),
        (" ", "whitespace"),
        ("\n\n", "whitespace"),
        ("\t", "whitespace"),
        ("42", "digit"),
        (" 123", "digit"),
        ("def", "keyword"),
        (" return", "keyword"),
        ("None", "keyword"),
        ("len", "keyword"),
        ("the", "word"),
        (" Licence", "word"),
        ("_name", "word"),
        (".append", "word"),
        ("é", "word"),
        ("):", "punctuation"),
        (" ==", "punctuation"),
        (",", "punctuation"),
        ("-4", "other"),
        ("", "other"),
        ("\ufffd", "other"),
        ("license", "word"),  # site-added builtins are not keywords
    ],
)
def test_token_category(s: str, expected: str) -> None:
    assert expected in TOKEN_CATEGORIES
    assert token_category(s) == expected


def test_categories_cover_vocab(tok: Tokenizer) -> None:
    cats = tok.categories(range(len(tok)))
    assert len(cats) == len(tok)
    assert set(cats) <= set(TOKEN_CATEGORIES)
    assert cats[tok.bos_id] == cats[tok.eos_id] == cats[tok.pad_id] == "special"
    assert cats.count("special") == 3
    for category in ("whitespace", "digit", "punctuation", "keyword", "word"):
        assert category in cats


def test_categories_of_code(tok: Tokenizer) -> None:
    ids = tok.encode("def f(x):\n    return x + 12\n")
    cats = tok.categories(ids)
    labels = tok.token_strings(ids)
    got = dict(zip(labels, cats, strict=True))
    assert cats[0] == "special"
    assert got["def"] == "keyword"
    assert got["·return"] == "keyword"
    assert got["12"] == "digit"


def test_no_framework_imports() -> None:
    code = (
        "import sys, workbench.tokenizer; "
        "bad = [m for m in ('torch', 'jax') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ---------------------------------------------------------------------- refused ids


@pytest.mark.parametrize("ids, fragments", [
    ([5, 4096], ("4096", "position 1", "[0, 4096)")),
    ([-1], ("-1", "position 0")),
    ([3, 10**12], (str(10**12),)),
    ([1.0], ("int", "float")),
    ([True], ("int", "bool")),
    (["5"], ("int", "str")),
    ("hello", ("string",)),
    (5, ("sequence",)),
])
def test_decode_refuses_ids_outside_the_vocabulary(tok: Tokenizer, ids, fragments) -> None:
    import numpy as np

    from workbench.tokenizer import TokenIdError
    assert len(tok) == 4096
    with pytest.raises(TokenIdError) as info:
        tok.decode(ids)
    msg = str(info.value)
    assert all(f in msg for f in fragments), msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, IndexError)
    with pytest.raises(TokenIdError, match="one-dimensional"):
        tok.decode(np.array([[1, 2]]))
    assert tok.decode(np.array([72, 101], np.int32)) == tok.decode([72, 101])


def test_per_token_views_refuse_bad_ids(tok: Tokenizer) -> None:
    from workbench.tokenizer import TokenIdError
    for bad in ([4096], [-3], [2.5]):
        with pytest.raises(TokenIdError):
            tok.token_strings(bad)
        with pytest.raises(TokenIdError):
            tok.categories(bad)
    assert tok.id_to_token(-1) is None and tok.id_to_token(4096) is None
