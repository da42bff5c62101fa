"""Trace: what a run captured, as plain numpy, plus the context that produced it.

Framework-free: analysis, plots and widgets take Traces and never import torch or jax.
Saved as one safetensors file whose metadata holds the JSON context (never pickle).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import read_safetensors, write_safetensors
from .hooks import HookError, HookName, layer_of, parse
from .jsonio import dumps


class TraceError(ValueError):
    """A file that cannot be read as a workbench trace; the message names the file."""


# types of the metadata entries the workbench writes (others are free-form JSON)
_META_TYPES: dict[str, tuple[type, ...]] = {
    "config": (dict,), "capture": (list,), "interventions": (list,),
    "backend": (str, type(None)), "dtype": (str, type(None)), "path": (str, type(None)),
    "positions": (list,)}


class ByLayer(Mapping[int, np.ndarray]):
    """Per-layer arrays indexed by layer id (not by position in the list of captured layers):
    ``by[3]`` is layer 3, ``by[3, 0, 5]`` indexes into it, ``np.asarray(by)`` stacks them
    (n_layers, ...) in ``layers`` order. Interleaved models (dense layers between MoE ones)
    thus index the same way as the config numbers their layers."""

    def __init__(self, arrays: Mapping[int, np.ndarray], what: str = "value"):
        self._by = {int(i): arrays[i] for i in sorted(arrays)}
        self.what = what

    @property
    def layers(self) -> list[int]:
        """Layer ids held, ascending."""
        return list(self._by)

    @property
    def array(self) -> np.ndarray:
        """The arrays stacked along a new first axis, in ``layers`` order."""
        if not self._by:
            raise ValueError(f"no layers hold a {self.what}: nothing to stack")
        return np.stack(list(self._by.values()))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.array
        return a if dtype is None else a.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            if not key:
                raise KeyError("index with a layer id first, e.g. by[3] or by[3, 0, 5]")
            key, rest = key[0], key[1:]
        if isinstance(key, bool | np.bool_) or not isinstance(key, int | np.integer):
            raise KeyError(f"index by layer id (an int), got {type(key).__name__} {key!r}; "
                           f"layers held: {self.layers}")
        if int(key) not in self._by:
            raise KeyError(f"layer {int(key)} has no {self.what} here (layers are indexed by "
                           f"their id, not by position); layers held: {self.layers}")
        a = self._by[int(key)]
        return a[rest] if rest else a

    def __iter__(self) -> Iterator[int]:
        return iter(self._by)

    def __len__(self) -> int:
        return len(self._by)

    def __repr__(self) -> str:
        shapes = {tuple(a.shape) for a in self._by.values()}
        shape = shapes.pop() if len(shapes) == 1 else "mixed"
        return f"ByLayer({self.what}, layers={self.layers}, shape={shape})"


class LayerArray(np.ndarray):
    """A per-layer stack (n_layers, ...) whose first index is a layer id, like :class:`ByLayer`:
    ``a[3]`` is layer 3's row and ``a[3, 5]`` an entry of it, whatever the layers' order or
    gaps (Maverick's MoE layers are every other one). ``layers`` names the rows in order.

    Everything else is plain numpy: slices and arrays as the first index (``a[:, e]``),
    iteration (rows in ``layers`` order), arithmetic, reductions and reshapes give ordinary
    ndarrays, which index by position again.
    """

    layers: list[int] | None

    def __new__(cls, array: Any, layers: Any) -> LayerArray:
        obj = np.asarray(array).view(cls)
        ids = [int(i) for i in layers]
        if obj.ndim == 0 or obj.shape[0] != len(ids):
            raise ValueError(f"LayerArray: {len(ids)} layer ids {ids} for an array of shape "
                             f"{obj.shape}; the first axis must hold one row per layer")
        if len(set(ids)) != len(ids):
            raise ValueError(f"LayerArray: repeated layer ids {ids}")
        obj.layers = ids
        return obj

    def __array_finalize__(self, obj: Any) -> None:
        self.layers = None  # a view or result: positional, like any ndarray

    def __getitem__(self, key: Any) -> Any:
        if self.layers is None:
            return super().__getitem__(key)
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        if isinstance(first, int | np.integer) and not isinstance(first, bool | np.bool_):
            if int(first) not in self.layers:
                raise IndexError(f"layer {int(first)} is not in this per-layer array (its rows "
                                 f"are layers {self.layers}; index by layer id, not position)")
            key = (self.layers.index(int(first)), *rest)
        return np.asarray(self)[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(np.asarray(self))

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        def plain(x: Any) -> Any:
            return x.view(np.ndarray) if isinstance(x, LayerArray) else x
        if "out" in kwargs:
            kwargs["out"] = tuple(plain(x) for x in kwargs["out"])
        return getattr(ufunc, method)(*map(plain, inputs), **kwargs)

    def __repr__(self) -> str:
        if self.layers is None:
            return repr(self.view(np.ndarray))
        return f"LayerArray(layers={self.layers}, {self.view(np.ndarray)!r})"


@dataclass(frozen=True)
class Routing:
    """One MoE layer's routing for every token: arrays of shape (batch, seq, ...)."""

    indices: np.ndarray  # (B, T, k) int32
    scores: np.ndarray | None  # (B, T, k) sigmoid gates
    logits: np.ndarray | None  # (B, T, E) raw router logits


class Trace(Mapping[str, np.ndarray]):
    """Hook name -> numpy array, with the input ids and run context.

    ``meta`` holds: ``config`` (summary dict), ``capture`` (patterns), ``interventions``
    (records), ``backend``, ``dtype``, ``positions`` (the sequence positions the arrays hold,
    when a run kept only some), and anything a caller adds (e.g. ``domain``).
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], input_ids: np.ndarray,
                 meta: Mapping[str, Any] | None = None,
                 attention_mask: np.ndarray | None = None):
        self._arrays = dict(arrays)
        self.input_ids = np.asarray(input_ids)
        self.meta: dict[str, Any] = dict(meta or {})
        if attention_mask is not None:
            m = np.asarray(attention_mask)
            if m.shape != self.input_ids.shape:
                raise ValueError(f"attention_mask shape {m.shape} does not match input_ids "
                                 f"{self.input_ids.shape}")
            attention_mask = m.astype(bool)
        self.attention_mask: np.ndarray | None = attention_mask
        """(B, T) bool, True at real tokens, when the run was padded; None: no padding."""

    # Mapping protocol
    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self._arrays[name]
        except KeyError:
            import difflib
            close = difflib.get_close_matches(name, list(self._arrays), n=3)
            hint = f"; closest captured: {close}" if close else ""
            raise KeyError(f"{name!r} was not captured in this trace{hint}. Captured: "
                           f"{len(self._arrays)} hooks (see trace.keys()); pass it in "
                           "capture=[...]") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        return (f"Trace({len(self)} hooks, input {tuple(self.input_ids.shape)}, "
                f"backend={self.meta.get('backend')}, dtype={self.meta.get('dtype')})")

    # helpers
    @property
    def config(self) -> dict[str, Any]:
        return self.meta.get("config", {})

    @property
    def layers(self) -> list[int]:
        """Layer indices with at least one captured hook."""
        return sorted({i for n in self._arrays if (i := layer_of(n)) is not None})

    @property
    def moe_layers(self) -> list[int]:
        """MoE layers whose routing (topk_indices) was captured."""
        return sorted(h.layer for h in map(_parsed, self._arrays)
                      if h is not None and (h.block, h.site) == ("moe", "topk_indices"))

    @property
    def num_experts(self) -> int:
        return int(self.config.get("experts", 0))

    def routing(self, layer: int) -> Routing:
        """Expert indices, gates and router logits of one MoE layer."""
        p = f"layers.{layer}.moe."
        if p + "topk_indices" not in self._arrays:
            raise KeyError(f"layer {layer}: routing not captured (capture "
                           f"'layers.{layer}.moe.*'); captured MoE layers: {self.moe_layers}")
        return Routing(self._arrays[p + "topk_indices"], self._arrays.get(p + "topk_scores"),
                       self._arrays.get(p + "router_logits"))

    def top1(self) -> ByLayer:
        """First-choice experts (B, T) of every captured MoE layer, indexed by layer id:
        ``trace.top1()[3]`` is layer 3's; ``np.asarray(trace.top1())`` stacks them."""
        return ByLayer({i: self.routing(i).indices[..., 0] for i in self.moe_layers},
                       "captured routing")

    def token_mask(self) -> np.ndarray:
        """(B, T') bool: True at real tokens, False at padding, aligned with the captured
        arrays' sequence axis (the kept ``positions`` when the run kept only some)."""
        m = self.attention_mask
        if m is None:
            m = np.ones(self.input_ids.shape if self.input_ids.ndim == 2
                        else (1, self.input_ids.size), bool)
        pos = self.meta.get("positions")
        return m[:, pos] if pos is not None else m

    def to_frame(self, layers: list[int] | None = None) -> Any:
        """The routing as a pandas DataFrame, one row per (batch row, position, MoE layer,
        top-k slot): batch, position, token_id, layer, slot, expert, gate (when topk_scores
        were captured) and margin (top-1 − top-2 router logit, when router_logits were).
        Needs pandas (``pip install 'workbench[frames]'``)."""
        from .analysis.frames import pandas
        pd = pandas()
        layers = self.moe_layers if layers is None else [int(i) for i in layers]
        if not layers:
            raise ValueError("to_frame: no MoE routing captured; capture '*.moe.*'")
        parts = []
        for i in layers:
            r = self.routing(i)
            idx = np.asarray(r.indices)
            if idx.ndim == 2:
                idx = idx[None]
            B, T, k = idx.shape
            ids = self.input_ids.reshape(-1, self.input_ids.shape[-1])
            pos = list(self.meta.get("positions") or range(T))
            cols: dict[str, Any] = {
                "batch": np.repeat(np.arange(B), T * k),
                "position": np.tile(np.repeat(np.asarray(pos[:T]), k), B),
                "token_id": np.repeat(ids[:, np.asarray(pos[:T])].ravel(), k)
                if ids.shape[0] == B else -1,
                "layer": i, "slot": np.tile(np.arange(k), B * T),
                "expert": idx.ravel().astype(np.int64)}
            if r.scores is not None:
                cols["gate"] = np.asarray(r.scores, dtype=np.float64).ravel()
            if r.logits is not None:
                z = np.sort(np.asarray(r.logits, dtype=np.float64).reshape(B, T, -1), axis=-1)
                cols["margin"] = np.repeat((z[..., -1] - z[..., -2]).ravel(), k)
            parts.append(pd.DataFrame(cols))
        return pd.concat(parts, ignore_index=True)

    def select(self, pattern: str) -> dict[str, np.ndarray]:
        import fnmatch
        return {k: v for k, v in self._arrays.items() if fnmatch.fnmatchcase(k, pattern)}

    # persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write as safetensors (arrays + input ids) with JSON metadata; no pickle."""
        p = Path(path)
        if p.suffix != ".safetensors":
            p = p.with_suffix(p.suffix + ".safetensors") if p.suffix else \
                p.with_suffix(".safetensors")
        p.parent.mkdir(parents=True, exist_ok=True)
        arrays = dict(self._arrays)
        arrays["__input_ids__"] = self.input_ids.astype(np.int64)
        if self.attention_mask is not None:
            arrays["__attention_mask__"] = self.attention_mask.astype(np.uint8)
        write_safetensors(p, arrays, {"workbench_trace": dumps(self.meta)})
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        """Read a trace written by :meth:`save`.

        A missing file is FileNotFoundError; a file that is not a readable workbench trace
        (empty, truncated, not safetensors, metadata that is not a JSON object of the expected
        types, input ids that are not integers) is one TraceError naming the file and the
        problem.
        """
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such trace file")
        if p.is_dir():
            raise TraceError(f"{p}: is a directory, not a trace file (.safetensors)")
        try:
            arrays, meta = read_safetensors(p)
        except Exception as e:  # noqa: BLE001 - every way a file can be unreadable
            raise TraceError(f"{p}: not a readable workbench trace: {e}") from e
        if not isinstance(meta, dict) or "workbench_trace" not in meta \
                or "__input_ids__" not in arrays:
            raise TraceError(f"{p}: not a workbench trace (no workbench_trace metadata or no "
                             "input ids); traces are written by Trace.save")
        raw = meta["workbench_trace"]
        if not isinstance(raw, str):
            raise TraceError(f"{p}: workbench_trace metadata must be a JSON string, got "
                             f"{type(raw).__name__}")
        try:
            info = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as e:
            raise TraceError(f"{p}: workbench_trace metadata is not valid JSON ({e})") from None
        if not isinstance(info, dict):
            raise TraceError(f"{p}: workbench_trace metadata must be a JSON object, got "
                             f"{type(info).__name__}")
        for key, types in _META_TYPES.items():
            if key in info and not isinstance(info[key], types):
                want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise TraceError(f"{p}: metadata {key!r} must be {want}, got "
                                 f"{type(info[key]).__name__} {info[key]!r:.60}")
        experts = info.get("config", {}).get("experts")
        if experts is not None and (isinstance(experts, bool) or not isinstance(experts, int)
                                    or experts < 0):
            raise TraceError(f"{p}: metadata config.experts must be a non-negative int, got "
                             f"{experts!r}")
        ids = arrays.pop("__input_ids__")
        mask = arrays.pop("__attention_mask__", None)
        if mask is not None and (mask.shape != ids.shape or mask.dtype.kind not in "iub"):
            raise TraceError(f"{p}: attention mask of {mask.dtype} shape {mask.shape} does not "
                             f"match the input ids {ids.shape}")
        if ids.dtype.kind not in "iu" or ids.ndim not in (1, 2):
            raise TraceError(f"{p}: input ids must be a 1-D or 2-D integer array, got "
                             f"{ids.dtype} of shape {ids.shape}")
        return cls({k: np.array(v) for k, v in arrays.items()}, np.array(ids), info,
                   None if mask is None else np.array(mask))


def _parsed(name: str) -> HookName | None:
    """The parsed hook name, or None for an array whose name is not a hook name."""
    try:
        return parse(name)
    except HookError:
        return None
