"""Build the small multi-domain training corpus from text that is already on this machine.

Four domains, each document labelled with its domain:

- ``code``: Python source files of the CPython standard library (PSF licence), read from the
  running interpreter's ``stdlib`` directory.
- ``prose``: English technical prose from the same standard library: the Python language
  reference topics shipped in ``pydoc_data/topics.py`` and the module/class/function docstrings
  of stdlib modules that were *not* picked for ``code`` (so the two domains share no text).
- ``legal``: licence texts from ``/usr/share/common-licenses`` and the Debian package copyright
  files ``/usr/share/doc/*/copyright`` (paragraph-level deduplicated, because most of them repeat
  the same licence texts).
- ``numeric``: synthetic numeric/tabular text (CSV measurement tables, ledgers, arithmetic
  drills, number sequences, multiplication tables, matrices) generated here from a fixed seed.

Everything is deterministic for a given seed and a given machine image: file lists are sorted,
then shuffled with ``random.Random(seed)``. Documents are cleaned (newline normalisation, control
characters and very long lines removed), deduplicated, capped per domain so the domains are
roughly balanced, and split into train/validation by source file (every chunk of one file lands
in the same split).

Rebuild with::

    .venv/bin/python scripts/build_corpus.py

which writes ``data/corpus/{train,val}.jsonl`` and ``data/corpus/README.md``.
"""

from __future__ import annotations

import argparse
import ast
import glob
import hashlib
import inspect
import json
import math
import os
import random
import re
import sys
import sysconfig
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

DOMAINS: tuple[str, ...] = ("code", "prose", "legal", "numeric")
DEFAULT_SEED = 1234
DEFAULT_MAX_BYTES_PER_DOMAIN = 2_000_000
HARD_CAP_BYTES = 20_000_000
VAL_FRACTION = 0.05
MAX_LINE_CHARS = 1000
MAX_DOC_CHARS = 32_000
MIN_DOC_CHARS = 200
MAX_CHUNKS_PER_FILE = 3

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "data" / "corpus"
COMMON_LICENSES = Path("/usr/share/common-licenses")
DEBIAN_DOC = Path("/usr/share/doc")

# Stdlib sub-trees left out of ``code``/``prose``: test suites (deliberately odd encodings and
# huge data literals), codec tables (pages of hex constants) and third-party installs.
_EXCLUDED_STDLIB_PARTS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "encodings", "__pycache__", "idle_test"}
)


@dataclass(frozen=True)
class Doc:
    """One corpus document; ``group`` keeps chunks of one file in the same split."""

    domain: str
    source: str
    text: str
    group: str


# --------------------------------------------------------------------------------------------
# Cleaning helpers
# --------------------------------------------------------------------------------------------

_ALLOWED_CONTROL = {"\n", "\t"}


def clean_text(text: str) -> str | None:
    """Normalise newlines, drop control/private/surrogate characters and very long lines.

    Returns ``None`` when the text looks like binary junk (more than 1% of characters had to be
    removed) or is too short after cleaning to be a useful document.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "")
    kept: list[str] = []
    removed = 0
    for ch in text:
        if ch in _ALLOWED_CONTROL:
            kept.append(ch)
            continue
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cs", "Co", "Cn") or ch == "\ufffd":
            removed += 1
            continue
        kept.append(ch)
    if removed > 0.01 * max(len(text), 1):
        return None
    lines = [line.rstrip() for line in "".join(kept).split("\n")]
    lines = [line for line in lines if len(line) <= MAX_LINE_CHARS]
    out = "\n".join(lines)
    out = re.sub(r"\n{4,}", "\n\n\n", out).strip("\n")
    if len(out) < MIN_DOC_CHARS:
        return None
    return out + "\n"


def chunk_text(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Split long text into pieces of at most ``max_chars``, cutting at blank lines if possible.

    Blocks separated by blank lines are packed greedily; a block longer than ``max_chars`` is
    packed line by line instead (lines are at most ``MAX_LINE_CHARS`` long after cleaning).
    """
    if len(text) <= max_chars:
        return [text]
    parts = re.split(r"(\n{2,})", text.strip("\n"))
    units: list[tuple[str, str]] = []  # (separator before the unit, unit text)
    sep = ""
    for i, part in enumerate(parts):
        if i % 2 == 1:
            sep = part
            continue
        if len(part) <= max_chars:
            units.append((sep, part))
        else:
            units.extend(
                (sep if j == 0 else "\n", line[:max_chars])
                for j, line in enumerate(part.split("\n"))
            )
    chunks: list[str] = []
    cur = ""
    for sep, unit in units:
        if cur and len(cur) + len(sep) + len(unit) > max_chars:
            chunks.append(cur)
            cur = unit
        else:
            cur = cur + sep + unit if cur else unit
    if cur:
        chunks.append(cur)
    return [c.strip("\n") + "\n" for c in chunks if c.strip()]


def _file_docs(domain: str, rel: str, text: str) -> Iterator[Doc]:
    """Chunk one cleaned file into documents, keeping at most ``MAX_CHUNKS_PER_FILE`` chunks.

    The cap stops a few huge files (e.g. 2 MB machine-generated copyright listings) from
    dominating a domain; chunks shorter than ``MIN_DOC_CHARS`` are dropped.
    """
    chunks = [c for c in chunk_text(text) if len(c) >= MIN_DOC_CHARS][:MAX_CHUNKS_PER_FILE]
    for i, chunk in enumerate(chunks):
        source = rel if len(chunks) == 1 else f"{rel}#part{i}"
        yield Doc(domain, source, chunk, rel)


def _stable_hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def stdlib_dir() -> Path:
    """The running interpreter's standard-library directory (PSF-licensed source)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[Path]:
    """All stdlib ``.py`` files outside test suites, codec tables and third-party installs."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_STDLIB_PARTS)
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_"):
                files.append(Path(dirpath) / name)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def partition_stdlib(files: list[Path], root: Path, seed: int) -> tuple[list[Path], list[Path]]:
    """Split stdlib files into disjoint code / docstring-prose pools by seeded hash.

    The prose pool gets ~70% of files because docstrings are a small part of each file.
    """
    code, prose = [], []
    for path in files:
        rel = path.relative_to(root).as_posix()
        bucket = int(_stable_hash(str(seed), "pool", rel)[:8], 16) % 10
        (code if bucket < 3 else prose).append(path)
    return code, prose


def iter_code_docs(root: Path, files: list[Path], rng: random.Random) -> Iterator[Doc]:
    """Whole stdlib source files (chunked when long), in seeded random order."""
    order = list(files)
    rng.shuffle(order)
    for path in order:
        raw = _read_text(path)
        if raw is None:
            continue
        text = clean_text(raw)
        if text is None:
            continue
        rel = "stdlib:" + path.relative_to(root).as_posix()
        yield from _file_docs("code", rel, text)


def _docstrings(tree: ast.Module, module: str) -> list[tuple[str, str]]:
    """(qualified name, cleaned docstring) pairs for a module and its classes/functions."""
    out: list[tuple[str, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}" if prefix else child.name
                doc = ast.get_docstring(child, clean=True)
                if doc and len(doc) >= 40:
                    out.append((name, doc))
                visit(child, name)

    mod_doc = ast.get_docstring(tree, clean=True)
    if mod_doc and len(mod_doc) >= 40:
        out.append((module, mod_doc))
    visit(tree, "")
    return out


def _pydoc_topics(root: Path) -> dict[str, str]:
    """The language-reference topics dict from ``pydoc_data/topics.py``, parsed without import."""
    path = root / "pydoc_data" / "topics.py"
    raw = _read_text(path)
    if raw is None:
        return {}
    for node in ast.parse(raw).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "topics" for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            if isinstance(value, dict):
                return {str(k): str(v) for k, v in value.items()}
    return {}


def iter_prose_docs(root: Path, files: list[Path], rng: random.Random) -> Iterator[Doc]:
    """Language-reference topics and stdlib docstrings, interleaved in seeded random order."""
    topics = _pydoc_topics(root)
    items: list[tuple[str, Path | str]] = [("topic", name) for name in sorted(topics)]
    items += [("docstrings", path) for path in files]
    rng.shuffle(items)
    for kind, item in items:
        if kind == "topic":
            assert isinstance(item, str)
            rel = f"stdlib:pydoc_data/topics.py#{item}"
            raw: str | None = inspect.cleandoc(topics[item])
        else:
            assert isinstance(item, Path)
            rel_path = item.relative_to(root)
            rel = "stdlib-docstrings:" + rel_path.as_posix()
            src = _read_text(item)
            if src is None:
                continue
            try:
                tree = ast.parse(src)
            except (SyntaxError, ValueError):
                continue
            module = ".".join(rel_path.with_suffix("").parts).removesuffix(".__init__")
            pieces = _docstrings(tree, module)
            raw = "\n\n".join(f"{name}\n{doc}" for name, doc in pieces) if pieces else None
        if raw is None:
            continue
        text = clean_text(raw)
        if text is None:
            continue
        yield from _file_docs("prose", rel, text)


def _paragraph_key(paragraph: str) -> str:
    return _stable_hash(" ".join(paragraph.lower().split()))


def iter_legal_docs(rng: random.Random) -> Iterator[Doc]:
    """Full licence texts first, then Debian copyright files minus paragraphs already seen."""
    seen: set[str] = set()
    licence_files = sorted(
        {p.resolve() for p in COMMON_LICENSES.glob("*") if p.is_file()}, key=lambda p: p.name
    )
    copyright_files = sorted(Path(p) for p in glob.glob(str(DEBIAN_DOC / "*" / "copyright")))
    rng.shuffle(copyright_files)
    for path in [*licence_files, *copyright_files]:
        raw = _read_text(path)
        if raw is None:
            continue
        kept = []
        for paragraph in re.split(r"\n[ \t]*\n", raw.replace("\r\n", "\n")):
            if not paragraph.strip():
                continue
            key = _paragraph_key(paragraph)
            if key in seen:
                continue
            seen.add(key)
            kept.append(paragraph.strip("\n"))
        text = clean_text("\n\n".join(kept))
        if text is None:
            continue
        rel = path.as_posix()
        yield from _file_docs("legal", rel, text)


# --------------------------------------------------------------------------------------------
# Synthetic numeric/tabular generators (all values from the seeded rng)
# --------------------------------------------------------------------------------------------


def _gen_measurements(rng: random.Random) -> str:
    """CSV of weather-station style readings following a random walk."""
    stations = ["north", "south", "harbour", "ridge", "valley", "airport", "lab-a", "lab-b"]
    n = rng.randint(20, 70)
    day, hour = rng.randint(1, 28), rng.randint(0, 23)
    month = rng.randint(1, 12)
    temp, hum, pres = rng.uniform(-5, 30), rng.uniform(20, 95), rng.uniform(985, 1035)
    step = rng.choice([1, 2, 3, 6])
    station = rng.choice(stations)
    lines = ["timestamp,station,temperature_c,humidity_pct,pressure_hpa,wind_ms"]
    for _ in range(n):
        temp += rng.gauss(0, 0.6)
        hum = min(100.0, max(0.0, hum + rng.gauss(0, 2.0)))
        pres += rng.gauss(0, 0.8)
        wind = abs(rng.gauss(3.5, 2.5))
        lines.append(
            f"2023-{month:02d}-{day:02d}T{hour:02d}:00,{station},{temp:.1f},{hum:.0f},"
            f"{pres:.1f},{wind:.2f}"
        )
        hour += step
        if hour >= 24:
            hour -= 24
            day = day % 28 + 1
    return "\n".join(lines)


def _gen_ledger(rng: random.Random) -> str:
    """CSV ledger whose totals are consistent (qty * unit price = total, running balance)."""
    items = ["bolts", "washers", "cable", "resistor", "capacitor", "bearing", "filter", "valve"]
    items += ["sensor", "gasket", "fuse", "relay", "spring", "hinge", "pump", "tape"]
    n = rng.randint(10, 40)
    balance = round(rng.uniform(500, 5000), 2)
    lines = ["date,item,qty,unit_price,total,balance", f"opening,,,,,{balance:.2f}"]
    day = 1
    for _ in range(n):
        day += rng.randint(0, 3)
        qty = rng.randint(1, 250)
        price = round(rng.uniform(0.05, 120), 2)
        total = round(qty * price, 2)
        balance = round(balance - total if rng.random() < 0.7 else balance + total, 2)
        lines.append(
            f"2024-{1 + day // 28:02d}-{1 + day % 28:02d},{rng.choice(items)},{qty},"
            f"{price:.2f},{total:.2f},{balance:.2f}"
        )
    return "\n".join(lines)


def _gen_arithmetic(rng: random.Random) -> str:
    """Lines of correct integer arithmetic with mixed operand sizes."""
    lines = []
    for _ in range(rng.randint(25, 60)):
        digits_a, digits_b = rng.randint(1, 5), rng.randint(1, 4)
        a, b = rng.randint(0, 10**digits_a - 1), rng.randint(1, 10**digits_b - 1)
        op = rng.choice("+-*/%")
        if op == "+":
            lines.append(f"{a} + {b} = {a + b}")
        elif op == "-":
            lines.append(f"{a} - {b} = {a - b}")
        elif op == "*":
            lines.append(f"{a} * {b} = {a * b}")
        elif op == "/":
            lines.append(f"{a} // {b} = {a // b}")
        else:
            lines.append(f"{a} mod {b} = {a % b}")
    return "\n".join(lines)


def _primes(limit: int) -> list[int]:
    sieve = bytearray([1]) * (limit + 1)
    sieve[:2] = b"\x00\x00"
    for i in range(2, int(limit**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(sieve[i * i :: i]))
    return [i for i, v in enumerate(sieve) if v]


def _gen_sequences(rng: random.Random) -> str:
    """Named integer sequences: arithmetic/geometric progressions, squares, primes, Fibonacci."""
    out = []
    for _ in range(rng.randint(4, 9)):
        kind = rng.choice(
            [
                "arithmetic",
                "geometric",
                "squares",
                "cubes",
                "primes",
                "fibonacci",
                "triangular",
                "powers",
            ]
        )
        n = rng.randint(8, 24)
        if kind == "arithmetic":
            a, d = rng.randint(-100, 1000), rng.randint(-50, 50) or 7
            seq = [a + i * d for i in range(n)]
            name = f"arithmetic progression a={a} d={d}"
        elif kind == "geometric":
            a, r = rng.randint(1, 9), rng.randint(2, 5)
            seq = [a * r**i for i in range(min(n, 14))]
            name = f"geometric progression a={a} r={r}"
        elif kind == "squares":
            s = rng.randint(0, 200)
            seq = [(s + i) ** 2 for i in range(n)]
            name = f"squares from {s}"
        elif kind == "cubes":
            s = rng.randint(0, 60)
            seq = [(s + i) ** 3 for i in range(n)]
            name = f"cubes from {s}"
        elif kind == "primes":
            start = rng.randint(0, 5000)
            seq = [p for p in _primes(start + 400) if p >= start][:n]
            name = f"primes from {start}"
        elif kind == "fibonacci":
            a, b = rng.randint(0, 5), rng.randint(1, 8)
            seq = []
            for _i in range(n):
                seq.append(a)
                a, b = b, a + b
            name = f"fibonacci-like start {seq[0]}, {seq[1]}"
        elif kind == "triangular":
            s = rng.randint(1, 300)
            seq = [k * (k + 1) // 2 for k in range(s, s + n)]
            name = f"triangular numbers from T({s})"
        else:
            base = rng.choice([2, 3, 7, 10])
            seq = [base**i for i in range(min(n, 20))]
            name = f"powers of {base}"
        out.append(f"{name}: " + ", ".join(str(x) for x in seq))
    return "\n".join(out)


def _gen_times_table(rng: random.Random) -> str:
    """A multiplication table as aligned text columns."""
    base = rng.randint(2, 99)
    size = rng.randint(6, 12)
    width = len(str(base * size * size)) + 1
    head = "x".rjust(width) + "".join(str(base * j).rjust(width) for j in range(1, size + 1))
    rows = [head]
    for i in range(1, size + 1):
        rows.append(
            str(i).rjust(width)
            + "".join(str(i * base * j).rjust(width) for j in range(1, size + 1))
        )
    return f"multiplication table for multiples of {base}\n" + "\n".join(rows)


def _gen_matrix(rng: random.Random) -> str:
    """Small integer matrices with their correct product."""
    out = []
    for _ in range(rng.randint(2, 5)):
        n, k, m = rng.randint(2, 4), rng.randint(2, 4), rng.randint(2, 4)
        a = [[rng.randint(-9, 9) for _ in range(k)] for _ in range(n)]
        b = [[rng.randint(-9, 9) for _ in range(m)] for _ in range(k)]
        c = [[sum(a[i][t] * b[t][j] for t in range(k)) for j in range(m)] for i in range(n)]
        out.append(f"A = {a}\nB = {b}\nA @ B = {c}")
    return "\n\n".join(out)


def _gen_stats_table(rng: random.Random) -> str:
    """A CSV of samples followed by summary statistics computed from them."""
    cols = rng.sample(["length_mm", "mass_g", "time_s", "voltage_v", "current_ma", "count"], 3)
    n = rng.randint(12, 40)
    data = [[round(rng.lognormvariate(rng.uniform(0, 4), 0.3), 3) for _ in cols] for _ in range(n)]
    lines = ["id," + ",".join(cols)]
    lines += [f"{i + 1}," + ",".join(f"{v:.3f}" for v in row) for i, row in enumerate(data)]
    lines.append("")
    for j, col in enumerate(cols):
        vals = [row[j] for row in data]
        mean = sum(vals) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        lines.append(
            f"{col}: n={n} mean={mean:.3f} std={std:.3f} min={min(vals):.3f} max={max(vals):.3f}"
        )
    return "\n".join(lines)


NUMERIC_GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "csv_measurements": _gen_measurements,
    "csv_ledger": _gen_ledger,
    "arithmetic": _gen_arithmetic,
    "sequences": _gen_sequences,
    "times_table": _gen_times_table,
    "matrices": _gen_matrix,
    "csv_stats": _gen_stats_table,
}


def iter_numeric_docs(rng: random.Random) -> Iterator[Doc]:
    """Endless stream of synthetic numeric documents (each 1-4 generator outputs)."""
    names = sorted(NUMERIC_GENERATORS)
    index = 0
    while True:
        parts, kinds = [], []
        for _ in range(rng.randint(1, 4)):
            name = rng.choice(names)
            kinds.append(name)
            parts.append(NUMERIC_GENERATORS[name](rng))
        source = f"synthetic:{'+'.join(kinds)}/{index:06d}"
        index += 1
        text = clean_text("\n\n".join(parts))
        if text is not None:
            yield Doc("numeric", source, text, source)


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------


def _take(docs: Iterator[Doc], max_bytes: int, seen: set[str]) -> list[Doc]:
    """Collect deduplicated documents until adding the next one would exceed ``max_bytes``."""
    out: list[Doc] = []
    total = 0
    misses = 0  # consecutive documents that did not fit; bounds the endless numeric stream
    for doc in docs:
        key = _stable_hash(doc.text)
        if key in seen:
            continue
        size = len(doc.text.encode("utf-8"))
        if total + size > max_bytes:
            misses += 1
            if total >= 0.98 * max_bytes or misses >= 200:
                break
            continue
        misses = 0
        seen.add(key)
        out.append(doc)
        total += size
    return out


def split_docs(
    docs: list[Doc], seed: int, val_fraction: float = VAL_FRACTION
) -> tuple[list[Doc], list[Doc]]:
    """Deterministic split by source group: groups in hash order fill val up to the fraction.

    Every domain with at least two groups gets at least one val group and one train group.
    """
    groups: dict[str, list[Doc]] = {}
    for doc in docs:
        groups.setdefault(doc.group, []).append(doc)
    order = sorted(groups, key=lambda g: _stable_hash(str(seed), "split", g))
    total = sum(len(d.text) for d in docs)
    val_groups: set[str] = set()
    val_chars = 0
    for g in order[: max(len(order) - 1, 0)]:
        if val_groups and val_chars >= val_fraction * total:
            break
        g_chars = sum(len(d.text) for d in groups[g])
        if val_groups and val_chars + g_chars > 2 * val_fraction * total:
            continue
        val_groups.add(g)
        val_chars += g_chars
    train = [d for d in docs if d.group not in val_groups]
    val = [d for d in docs if d.group in val_groups]
    return train, val


def _write_jsonl(path: Path, docs: list[Doc]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for doc in docs:
            record = {"domain": doc.domain, "source": doc.source, "text": doc.text}
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def _stats(docs: list[Doc]) -> dict[str, tuple[int, int, int]]:
    out = {}
    for domain in DOMAINS:
        sel = [d for d in docs if d.domain == domain]
        out[domain] = (
            len(sel),
            sum(len(d.text) for d in sel),
            sum(len(d.text.encode("utf-8")) for d in sel),
        )
    return out


def _readme(train: list[Doc], val: list[Doc], max_bytes: int, seed: int, root: Path) -> str:
    tr, va = _stats(train), _stats(val)
    rows = []
    for domain in DOMAINS:
        rows.append(
            f"| {domain} | {tr[domain][0]} | {tr[domain][1]:,} | {va[domain][0]} | "
            f"{va[domain][1]:,} |"
        )
    tot = [sum(s[d][i] for d in DOMAINS) for s in (tr, va) for i in (0, 1)]
    rows.append(f"| **total** | {tot[0]} | {tot[1]:,} | {tot[2]} | {tot[3]:,} |")
    table = "\n".join(rows)
    py = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return f"""# Training corpus

Small multi-domain corpus for the CPU training run of the tiny Llama-4-style MoE model. Built
from text that is available offline on the build machine plus deterministic synthetic data.
Each line of `train.jsonl` / `val.jsonl` is one document:
`{{"domain": str, "source": str, "text": str}}`.

## Domains, provenance and licences

### `code` — Python source

- What: source files of the CPython {py} standard library; test suites, `encodings/` codec
  tables and site-packages are excluded. Long files are cut at blank lines into chunks of at
  most {MAX_DOC_CHARS:,} characters, at most {MAX_CHUNKS_PER_FILE} chunks per file.
- Source label: `stdlib:<path relative to {root}>[#partN]`.
- Licence: PSF License Agreement (Python Software Foundation License Version 2), see
  `LICENSE.txt` in the stdlib directory.

### `prose` — English technical prose

- What: the Python language-reference topics shipped in `pydoc_data/topics.py`, and the
  module/class/function docstrings (each headed by its qualified name) of stdlib modules that
  were **not** picked for `code`. Stdlib files are split 30/70 into a code pool and a docstring
  pool by seeded hash, so `code` and `prose` share no text.
- Source label: `stdlib:pydoc_data/topics.py#<topic>`, `stdlib-docstrings:<path>`.
- Licence: PSF License Agreement (documentation and docstrings are part of the Python
  distribution).

### `legal` — licence texts

- What: `/usr/share/common-licenses/*` (GPL, LGPL, GFDL, Apache-2.0, Artistic, BSD, MPL, CC0)
  and the Debian package copyright files `/usr/share/doc/*/copyright`. Paragraphs already seen
  earlier in the domain are dropped, because most copyright files repeat the same licence texts.
- Source label: absolute file path `[#partN]`.
- Licence: the licence texts permit verbatim copying and distribution ("Everyone is permitted
  to copy and distribute verbatim copies of this license document"); Debian copyright files are
  the packages' licence statements, distributed with Debian so they can be read and passed on.

### `numeric` — synthetic numbers and tables

- What: **synthetic** text generated by `scripts/build_corpus.py` from the seed: CSV
  weather-station measurements (random walks), CSV ledgers with consistent totals and running
  balances, correct integer arithmetic lines, named integer sequences (progressions, squares,
  cubes, primes, Fibonacci-like, triangular, powers), multiplication tables, small matrix
  products, CSV samples followed by their summary statistics. 1-4 generator outputs per document.
- Source label: `synthetic:<generator>[+<generator>...]/<index>`.
- Licence: generated here, no third-party content.

## Cleaning

Newlines normalised to `\\n`; control, private-use, surrogate and replacement characters removed
(a document is dropped when more than 1% of its characters had to go); lines longer than
{MAX_LINE_CHARS} characters and trailing whitespace removed; documents shorter than
{MIN_DOC_CHARS} characters dropped; at most {MAX_CHUNKS_PER_FILE} chunks of {MAX_DOC_CHARS:,}
characters kept per file (so a few huge files cannot dominate); exact duplicate documents
dropped across all domains. Each domain is capped at {max_bytes:,} UTF-8 bytes (domains roughly
balanced; hard cap {HARD_CAP_BYTES:,} bytes in total).

## Split

Train/validation split by source file (all chunks of a file go to the same split): source groups
are ordered by `sha256(seed, "split", source)` and the first groups fill validation up to
{VAL_FRACTION:.0%} of each domain's characters. Both files are shuffled with the seed.

## Counts (seed {seed})

| domain | train docs | train chars | val docs | val chars |
|---|---|---|---|---|
{table}

## Rebuild

```
.venv/bin/python scripts/build_corpus.py --seed {seed} --max-bytes-per-domain {max_bytes}
```

The result is deterministic for a given seed and machine image (Python {py} stdlib and the Debian
packages installed under `/usr/share/doc`); on a different image the `code`, `prose` and `legal`
domains change with the installed files, while `numeric` is identical.
"""


def build(
    out_dir: str | os.PathLike[str] = DEFAULT_OUT_DIR,
    max_bytes_per_domain: int = DEFAULT_MAX_BYTES_PER_DOMAIN,
    seed: int = DEFAULT_SEED,
    val_fraction: float = VAL_FRACTION,
) -> dict[str, dict[str, tuple[int, int, int]]]:
    """Build the corpus into ``out_dir`` and return per-split, per-domain (docs, chars, bytes)."""
    if max_bytes_per_domain * len(DOMAINS) > HARD_CAP_BYTES:
        raise ValueError(
            f"max_bytes_per_domain={max_bytes_per_domain} exceeds the {HARD_CAP_BYTES} byte "
            "total hard cap"
        )
    root = stdlib_dir()
    code_pool, prose_pool = partition_stdlib(stdlib_files(root), root, seed)
    seen: set[str] = set()
    streams: dict[str, Iterator[Doc]] = {
        "code": iter_code_docs(root, code_pool, random.Random(f"{seed}:code")),
        "prose": iter_prose_docs(root, prose_pool, random.Random(f"{seed}:prose")),
        "legal": iter_legal_docs(random.Random(f"{seed}:legal")),
        "numeric": iter_numeric_docs(random.Random(f"{seed}:numeric")),
    }
    train: list[Doc] = []
    val: list[Doc] = []
    for domain in DOMAINS:
        docs = _take(streams[domain], max_bytes_per_domain, seen)
        tr, va = split_docs(docs, seed, val_fraction)
        train += tr
        val += va
    random.Random(f"{seed}:shuffle-train").shuffle(train)
    random.Random(f"{seed}:shuffle-val").shuffle(val)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "val.jsonl", val)
    (out / "README.md").write_text(
        _readme(train, val, max_bytes_per_domain, seed, root), encoding="utf-8"
    )
    return {"train": _stats(train), "val": _stats(val)}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: build the corpus and print per-domain counts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--max-bytes-per-domain", type=int, default=DEFAULT_MAX_BYTES_PER_DOMAIN)
    args = parser.parse_args(argv)
    stats = build(args.out_dir, args.max_bytes_per_domain, args.seed)
    for split, per_domain in stats.items():
        for domain, (n, chars, nbytes) in per_domain.items():
            print(f"{split:5s} {domain:8s} docs={n:6d} chars={chars:10,d} bytes={nbytes:10,d}")


if __name__ == "__main__":
    main()
