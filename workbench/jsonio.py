"""One JSON cleaner for everything the workbench writes as JSON (trace metadata, demo summary,
report metrics): :func:`to_json` turns a value into plain Python that ``json.dumps`` accepts
with ``allow_nan=False``, so the output is valid JSON for any strict reader."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

import numpy as np


def to_json(x: Any) -> Any:
    """``x`` as JSON-ready Python values.

    Mappings become dicts with string keys; lists, tuples and sets become lists (sets sorted
    when their items allow it); dataclass instances become dicts of their fields; numpy arrays
    become nested lists and numpy scalars Python numbers or bools; paths become strings; NaN
    and ±inf become None (JSON has no such numbers). Other values are returned unchanged, so
    anything ``json`` cannot encode still fails loudly in ``json.dumps``.
    """
    if is_dataclass(x) and not isinstance(x, type):
        return to_json(asdict(x))
    if isinstance(x, Mapping):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, set | frozenset):
        try:
            x = sorted(x)
        except TypeError:
            x = list(x)
    if isinstance(x, list | tuple):
        return [to_json(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_json(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return x


def dumps(x: Any, **kwargs: Any) -> str:
    """``json.dumps(to_json(x), allow_nan=False, **kwargs)``: strict JSON text."""
    return json.dumps(to_json(x), allow_nan=False, **kwargs)
