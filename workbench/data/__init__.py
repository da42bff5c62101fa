"""Text to run analyses on, shipped with the package (no source checkout needed).

``corpus_sample`` cuts equal-length token sequences per domain from the held-out split of the
workbench's multi-domain corpus (code, prose, legal, numeric; provenance and licences in the
repository's ``data/corpus/README.md``), for analyses that claim something about domains and
need thousands of tokens rather than one prompt.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np

CORPUS_FILE = "corpus-val.jsonl.gz"
"""The held-out split of the corpus, as package data (gzipped JSON lines: domain, source,
text)."""


class CorpusSample(dict):
    """``{domain: token ids (n_docs, length) int64}``, plus where each row came from
    (``sources[domain]``: the document label of each row) and the total ``tokens``."""

    sources: dict[str, list[str]]

    @property
    def tokens(self) -> int:
        return int(sum(a.size for a in self.values()))


def documents() -> list[dict[str, str]]:
    """Every document of the shipped corpus split: dicts with ``domain``, ``source``, ``text``."""
    raw = resources.files(__name__).joinpath(CORPUS_FILE).read_bytes()
    return [json.loads(line) for line in gzip.decompress(raw).decode("utf-8").splitlines()
            if line.strip()]


def domains() -> list[str]:
    """The domains of the shipped corpus, sorted."""
    return sorted({d["domain"] for d in documents()})


def corpus_sample(n_docs: int = 16, domains: Sequence[str] | str | None = None, *,
                  tokenizer: Any = None, length: int = 128, progress: bool = True
                  ) -> CorpusSample:
    """``n_docs`` sequences of ``length`` tokens per domain (default: every domain; 16 x 128
    tokens each, 8,192 in all), encoded with ``tokenizer`` (a ``wb.Tokenizer``, or a model
    that knows its tokenizer) and starting with its bos token.

    Sequences are cut from the documents round-robin: the first ``length`` tokens of every
    long-enough document, then the next ``length`` of each, and so on, so they come from as
    many distinct documents as the domain has. A progress bar (tqdm) shows the encoding when
    ``progress`` and tqdm is installed. ValueError names a domain that has too few tokens.
    """
    tok = getattr(tokenizer, "tokenizer", None) if not hasattr(tokenizer, "encode") \
        else tokenizer
    if tok is None:
        raise ValueError("corpus_sample needs a tokenizer: pass tokenizer=wb.Tokenizer."
                         "from_pretrained(path) or a model loaded with its tokenizer.json")
    for name, v, lo in (("n_docs", n_docs, 1), ("length", length, 2)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < lo:
            raise ValueError(f"corpus_sample: {name} must be an int >= {lo}, got {v!r}")
    docs = documents()
    have = sorted({d["domain"] for d in docs})
    want = have if domains is None else [domains] if isinstance(domains, str) else list(domains)
    unknown = [d for d in want if d not in have]
    if unknown or not want:
        raise ValueError(f"corpus_sample: unknown domain(s) {unknown or want}; the corpus has "
                         f"{have}")
    chosen = [d for d in docs if d["domain"] in want]
    bar = _progress(len(chosen), "encoding corpus") if progress else None
    encoded: dict[str, list[tuple[str, list[int]]]] = {d: [] for d in want}
    for doc in chosen:
        ids = tok.encode(doc["text"])
        encoded[doc["domain"]].append((doc["source"], ids))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    out = CorpusSample()
    out.sources = {}
    for domain in want:
        rows, src = _windows(encoded[domain], n_docs, length)
        if len(rows) < n_docs:
            total = sum(len(ids) for _, ids in encoded[domain])
            raise ValueError(f"corpus_sample: domain {domain!r} gives only {len(rows)} "
                             f"sequences of {length} tokens ({total} tokens in "
                             f"{len(encoded[domain])} documents); ask for fewer n_docs or a "
                             "shorter length")
        out[domain] = np.array(rows, dtype=np.int64)
        out.sources[domain] = src
    return out


def _windows(docs: list[tuple[str, list[int]]], n: int, length: int
             ) -> tuple[list[list[int]], list[str]]:
    """Up to ``n`` sequences of ``length`` tokens, round-robin over the documents' windows;
    windows after a document's first keep its first (bos) token in front."""
    rows: list[list[int]] = []
    src: list[str] = []
    k = 0
    while len(rows) < n:
        added = False
        for source, ids in docs:
            body = ids[1:]
            lo = k * (length - 1)
            if lo + length - 1 > len(body):
                continue
            rows.append(ids[:1] + body[lo:lo + length - 1])
            src.append(source if k == 0 else f"{source}@{lo}")
            added = True
            if len(rows) == n:
                break
        if not added:
            break
        k += 1
    return rows, src


def _progress(total: int, desc: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="doc", leave=False)


__all__ = ["CorpusSample", "corpus_sample", "documents", "domains"]
