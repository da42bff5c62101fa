"""Shared pieces of the explorers: default model, prompts, figure rendering, error handling.

Nothing here imports torch or jax; a model is loaded (``wb.load``) only when an explorer is
built without one.
"""

from __future__ import annotations

import html
import io
import logging
import os
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

logger = logging.getLogger("workbench.widgets")

#: The trained model shipped with the repository.
BUNDLED_MODEL = Path(__file__).resolve().parent.parent.parent / "data" / "scout-mini"

#: Environment variable that points the explorers and notebooks at another checkpoint.
MODEL_ENV = "WORKBENCH_MODEL"

#: One short prompt per corpus domain (the prompt picker's choices).
PROMPTS: dict[str, str] = {
    "code": "def read_config(path):\n    \"\"\"Read a configuration file.\"\"\"\n"
            "    with open(path) as f:\n        return json.load(f)\n",
    "prose": "The interpreter reads the source file and converts each statement into a sequence "
             "of bytecode instructions, which the virtual machine then executes one by one.",
    "legal": "Permission is hereby granted, free of charge, to any person obtaining a copy of "
             "this software and associated documentation files, to deal in the Software without"
             " restriction.",
    "numeric": "date,station,temperature,humidity\n2021-03-01,A7,12.4,0.61\n2021-03-02,A7,13.1,"
               "0.58\n2021-03-03,A7,11.9,0.66\n",
}

#: A callback ``progress(fraction in [0, 1], message)`` for long work.
Progress = Callable[[float, str], None]


def bundled_path() -> Path:
    """The default checkpoint: ``$WORKBENCH_MODEL`` if set, else the bundled ``data/scout-mini``."""
    env = os.environ.get(MODEL_ENV)
    return Path(env) if env else BUNDLED_MODEL


def resolve_model(model: Any = None, backend: str = "torch", dtype: str = "float32") -> Any:
    """``model``, or the default checkpoint loaded on ``backend`` when ``model`` is None."""
    if model is not None:
        return model
    import workbench as wb
    path = bundled_path()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no model given and no checkpoint at {path}; pass model= or set "
                                f"${MODEL_ENV}")
    return wb.load(path, backend=backend, dtype=dtype)


def resolve_tokenizer(tokenizer: Any, model: Any) -> Any:
    """``tokenizer``, or the tokenizer.json beside the model's checkpoint (None if absent:
    text boxes then take token ids)."""
    if tokenizer is not None:
        return tokenizer
    root = getattr(model, "path", None)
    if root is not None and (Path(root) / "tokenizer.json").exists():
        from ..tokenizer import Tokenizer
        return Tokenizer.from_pretrained(root)
    return None


def default_text(tokenizer: Any, vocab_size: int, prompt: str, n_ids: int = 48) -> str:
    """``prompt`` when there is a tokenizer, else ``n_ids`` fixed token ids as text."""
    if tokenizer is not None:
        return prompt
    rng = np.random.default_rng(0)
    return " ".join(str(int(i)) for i in rng.integers(0, vocab_size, n_ids))


def encode(tokenizer: Any, text: str, vocab_size: int, max_tokens: int) -> np.ndarray:
    """Token ids (1, T) of ``text`` (at most ``max_tokens``); without a tokenizer, the text is
    read as whitespace-separated integer ids."""
    if tokenizer is not None:
        ids = list(tokenizer.encode(text))
    else:
        try:
            ids = [int(t) for t in text.replace(",", " ").split()]
        except ValueError:
            raise ValueError("no tokenizer: enter token ids separated by spaces") from None
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens, got {len(ids)} from {text[:40]!r}")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return np.asarray([ids], dtype=np.int64)


def token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Display labels of ``ids`` (visible whitespace), ``#id`` without a tokenizer."""
    ids = [int(i) for i in ids]
    if tokenizer is not None:
        return list(tokenizer.token_strings(ids))
    return [f"#{i}" for i in ids]


def check_choice(value: Any, choices: Sequence[Any], what: str) -> Any:
    """``value`` if it is one of ``choices``, else a ValueError naming the choices."""
    if value not in list(choices):
        raise ValueError(f"{what} {value!r} is not available; choose one of {list(choices)}")
    return value


def check_position(pos: int, n: int, what: str = "position") -> int:
    """A token position in [0, n) (negative counts from the end)."""
    p = int(pos)
    if p < 0:
        p += n
    if not 0 <= p < n:
        raise ValueError(f"{what} {pos} out of range: the text has {n} tokens")
    return p


def figure_png(fig: Figure, dpi: int = 90) -> bytes:
    """A figure as PNG bytes (for an ipywidgets Image)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def error_html(what: str, err: BaseException) -> str:
    """A red box naming what failed and why (the full traceback goes to the log Output)."""
    tb = "".join(traceback.format_exception_only(type(err), err)).strip()
    return ("<div class='workbench-error' style='border:1px solid #d62728;background:#fdecea;"
            "color:#8b1a1a;padding:6px 10px;border-radius:4px;font-family:monospace;"
            f"white-space:pre-wrap'><b>Error while {html.escape(what)}</b>\n{html.escape(tb)}"
            "</div>")


def status_html(text: str, busy: bool = False) -> str:
    """The status line: grey when idle, blue while working."""
    color = "#1f4e99" if busy else "#666666"
    return f"<span style='color:{color};font-size:90%'>{html.escape(text)}</span>"


def table_html(headers: Sequence[str], rows: Sequence[Sequence[Any]], empty: str = "none",
               highlight: Sequence[bool] | None = None) -> str:
    """A small HTML table (cells escaped); ``highlight`` marks rows in red."""
    if not rows:
        return f"<i>{html.escape(empty)}</i>"
    head = "".join(f"<th style='text-align:left;padding:1px 8px'>{html.escape(str(h))}</th>"
                   for h in headers)
    body = []
    for i, r in enumerate(rows):
        style = " style='color:#d62728'" if highlight is not None and highlight[i] else ""
        cells = "".join(f"<td style='padding:1px 8px;font-family:monospace'>"
                        f"{html.escape(str(c))}</td>" for c in r)
        body.append(f"<tr{style}>{cells}</tr>")
    return (f"<table style='border-collapse:collapse;font-size:90%'><tr>{head}</tr>"
            + "".join(body) + "</table>")


def outline(ax: Any, positions: Sequence[int], n_tokens: int, color: str = "black",
            lw: float = 2.4) -> None:
    """Outline tokens of a :func:`workbench.plots.token_routing_text` axes (one background
    rectangle per token, in order)."""
    rects = [p for p in ax.patches if type(p).__name__ == "Rectangle"]
    if len(rects) < n_tokens:
        return
    for p in positions:
        if 0 <= p < len(rects):
            rects[p].set_edgecolor(color)
            rects[p].set_linewidth(lw)
            rects[p].set_linestyle("-")
