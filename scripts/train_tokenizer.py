"""Train the byte-level BPE tokenizer on the corpus train split and save ``tokenizer.json``.

Reads ``data/corpus/train.jsonl`` (built by ``scripts/build_corpus.py``), trains a 4096-entry
vocabulary with :meth:`workbench.tokenizer.Tokenizer.train`, writes
``data/tokenizer/tokenizer.json`` and prints characters per token for each domain of the
validation split, so compression differences between domains are visible.

Rebuild with::

    .venv/bin/python scripts/train_tokenizer.py
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from workbench.tokenizer import Tokenizer  # noqa: E402

DEFAULT_CORPUS = REPO_ROOT / "data" / "corpus"
DEFAULT_OUT = REPO_ROOT / "data" / "tokenizer"
DEFAULT_VOCAB_SIZE = 4096


def iter_texts(path: Path) -> Iterator[str]:
    """The ``text`` field of every record of a corpus jsonl file, in file order."""
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)["text"]


def chars_per_token(tok: Tokenizer, path: Path) -> dict[str, float]:
    """Average characters per token (without bos) for each domain of a corpus jsonl file."""
    chars: dict[str, int] = {}
    tokens: dict[str, int] = {}
    with path.open(encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    ids = tok.encode_batch([r["text"] for r in records], add_bos=False)
    for record, seq in zip(records, ids, strict=True):
        domain = record["domain"]
        chars[domain] = chars.get(domain, 0) + len(record["text"])
        tokens[domain] = tokens.get(domain, 0) + len(seq)
    return {d: chars[d] / max(tokens[d], 1) for d in sorted(chars)}


def main(argv: list[str] | None = None) -> None:
    """Train, save and report; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)

    train_file = args.corpus / "train.jsonl"
    if not train_file.is_file():
        raise SystemExit(f"{train_file} not found; run scripts/build_corpus.py first")
    tok = Tokenizer.train(iter_texts(train_file), vocab_size=args.vocab_size)
    out_file = tok.save(args.out)
    print(f"wrote {out_file}: {tok!r}")
    val_file = args.corpus / "val.jsonl"
    if val_file.is_file():
        for domain, cpt in chars_per_token(tok, val_file).items():
            print(f"val {domain:8s} chars/token = {cpt:.2f}")


if __name__ == "__main__":
    main()
