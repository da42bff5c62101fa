"""The backend-independent Model API: input checks, capture resolution, interventions, traces.

A backend subclasses ``Model`` and implements ``_forward`` (one batched forward pass through the
shared ``workbench.forward``, optionally continuing a KV cache) plus ``device``. Everything a
user touches — ``run``, ``hook_names``, ``estimate_capture_bytes``, ``generate`` — is defined
once here so torch and jax behave identically.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import hooks as hk
from .config import ModelConfig
from .interventions import Intervention, Plan, plan
from .trace import Trace

DTYPES = ("float32", "bfloat16")


class InputError(ValueError):
    """Token ids the model cannot take: wrong rank, empty, out of range, too long."""


class DeviceError(ValueError):
    """A device that does not exist, is not available, or that the backend cannot use."""


class Output(NamedTuple):
    logits: np.ndarray | None  # (B, T, V) float32; None when run with stop_at_layer
    trace: Trace


@dataclass(frozen=True)
class CaptureSpec:
    """What to keep from a forward pass: hook names, storage dtype and a position slice."""

    names: frozenset[str]
    dtype: np.dtype | None = None
    positions: slice | None = None


class Model(ABC):
    """A loaded Llama 4 model on one backend (``torch`` or ``jax``)."""

    backend: str = ""

    def __init__(self, config: ModelConfig, dtype: str, path: str | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} not supported; choose one of {DTYPES}")
        self.config = config
        self.dtype = dtype
        self.path = path

    # ----------------------------------------------------------------- to implement
    @abstractmethod
    def _forward(self, ids: np.ndarray, plan: Plan, spec: CaptureSpec, cache: Any = None,
                 stop_at_layer: int | None = None
                 ) -> tuple[np.ndarray | None, dict[str, np.ndarray], Any]:
        """One forward pass over ``ids`` (B, S), continuing ``cache`` when given.

        Returns float32 logits (B, S, V) (None with ``stop_at_layer``), the captured arrays
        (numpy, after the capture spec), and the updated cache.
        """

    @property
    @abstractmethod
    def device(self) -> Any:
        """Where the weights live and the forward runs (the backend's device object)."""

    @abstractmethod
    def new_cache(self, batch: int) -> Any:
        """An empty KV cache for ``batch`` sequences."""

    # ----------------------------------------------------------------- public API
    def hook_names(self) -> list[str]:
        """Every hook point of this model, in forward order."""
        return hk.hook_names(self.config)

    def __repr__(self) -> str:
        c = self.config
        return (f"<workbench {self.backend} model: {c.num_hidden_layers} layers, "
                f"{c.num_local_experts} experts top-{c.num_experts_per_tok}, d={c.hidden_size}, "
                f"{self.dtype} on {self.device}{', ' + str(self.path) if self.path else ''}>")

    def check_ids(self, input_ids: Any, start: int = 0) -> np.ndarray:
        """Validate token ids and return them as int64 (batch, seq); 1-D input gets batch 1."""
        if hasattr(input_ids, "detach"):  # a torch tensor, possibly on a GPU or with grad
            input_ids = input_ids.detach().cpu().numpy()
        try:
            ids = np.asarray(input_ids)
        except Exception as e:  # noqa: BLE001 - anything numpy cannot read is an input error
            raise InputError(f"input_ids could not be read as an array: {e}") from None
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2:
            raise InputError(f"input_ids must have shape (batch, seq) or (seq,), got shape "
                             f"{ids.shape}")
        if ids.size == 0:
            raise InputError(f"input_ids is empty (shape {ids.shape})")
        if ids.dtype.kind not in "iu":
            raise InputError(f"input_ids must be integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        V = self.config.vocab_size
        bad = np.argwhere((ids < 0) | (ids >= V))
        if len(bad):
            b, t = bad[0]
            raise InputError(f"token id {ids[b, t]} at (batch {b}, position {t}) is outside the "
                             f"vocabulary [0, {V}); {len(bad)} id(s) out of range")
        limit = self.config.max_position_embeddings
        if start + ids.shape[1] > limit:
            raise InputError(f"sequence of {start + ids.shape[1]} tokens exceeds "
                             f"max_position_embeddings={limit}")
        return ids

    def run(self, input_ids: Any, capture: str | Iterable[str] | None = None,
            interventions: Sequence[Intervention] | None = None,
            hooks: Mapping[str, Callable] | None = None, *, capture_dtype: Any = None,
            positions: slice | Sequence[int] | None = None,
            stop_at_layer: int | None = None) -> Output:
        """Run the model on ``input_ids`` (batch, seq), capturing hooks matching ``capture``.

        ``interventions`` (wb.ban_expert, ...) and ``hooks`` ({name: fn}, a function of the
        backend's array type returning a replacement) change the forward pass.
        ``capture_dtype`` stores captured floats in e.g. float16; ``positions`` keeps only those
        sequence positions (a slice) of every captured hook. ``stop_at_layer=k`` runs only
        layers 0..k-1 (hooks of later layers cannot be captured) and returns no logits.
        """
        ids = self.check_ids(input_ids)
        names = hk.resolve(self.config, capture)
        L = self.config.num_hidden_layers
        if stop_at_layer is not None:
            if isinstance(stop_at_layer, bool) or not isinstance(stop_at_layer, int | np.integer) \
                    or not 0 <= stop_at_layer <= L:
                raise InputError(f"stop_at_layer={stop_at_layer!r} must be an int in 0..{L}")
            stop_at_layer = int(stop_at_layer)
            late = [n for n in names if (hk.layer_of(n) is None and n != "embed")
                    or (hk.layer_of(n) or 0) >= stop_at_layer]
            if late:
                raise InputError(f"stop_at_layer={stop_at_layer}: cannot capture {late[:3]}, "
                                 "which the shortened forward never reaches")
        p = plan(self.config, interventions, hooks, ids.shape[0], ids.shape[1])
        spec = CaptureSpec(frozenset(names), _np_dtype(capture_dtype), _as_slice(positions))
        logits, arrays, _ = self._forward(ids, p, spec, None, stop_at_layer)
        trace = Trace({n: arrays[n] for n in names if n in arrays}, ids,
                      self._meta(names, p, capture))
        return Output(logits, trace)

    def _meta(self, names: list[str], p: Plan, capture: Any) -> dict[str, Any]:
        return {"config": self.config.summary(), "backend": self.backend, "dtype": self.dtype,
                "capture": [capture] if isinstance(capture, str) else list(capture or []),
                "interventions": p.records, "path": None if self.path is None else str(self.path)}

    @property
    def offload(self) -> str | None:
        """"disk" when weights are streamed from the checkpoint, None when resident."""
        return "disk" if hasattr(getattr(self, "weights", None), "stats") else None

    def io_stats(self, reset: bool = False) -> dict[str, Any]:
        """Reads from the checkpoint since loading (or the last reset): per layer ("embed",
        "0", ..., "head") and in total, bytes read, expert bytes, expert cache hits and misses,
        and seconds spent waiting on reads. Resident models read nothing while running."""
        stats = getattr(getattr(self, "weights", None), "stats", None)
        if stats is None:
            return {"mode": "resident", "total": {}, "layers": {}}
        out = {"mode": "disk", **stats.as_dict()}
        if reset:
            stats.reset()
        return out

    def estimate_capture_bytes(self, capture: str | Iterable[str] | None, batch: int, seq: int,
                               capture_dtype: Any = None) -> int:
        """Bytes a trace of these hooks would take for a (batch, seq) input, before running."""
        return hk.estimate_capture_bytes(self.config, capture, batch, seq,
                                         _np_dtype(capture_dtype))

    # ----------------------------------------------------------------- generation
    def generate(self, input_ids: Any, max_new_tokens: int, *, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = 0, capture: str | Iterable[str] |
                 None = None, interventions: Sequence[Intervention] | None = None,
                 stop_ids: Iterable[int] | None = None) -> Generation:
        """Sample ``max_new_tokens`` with a KV cache (temperature 0 = greedy).

        The prompt is one prefill pass; each new token is one cached step. Captured hooks of
        the prompt and every generated step are concatenated along the sequence axis (attention
        patterns are kept per step, since their key length grows).
        """
        ids = self.check_ids(input_ids)
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise InputError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, "
                             f"{top_p})")
        self.check_ids(np.zeros((1, 1), np.int64), start=ids.shape[1] + max_new_tokens - 1)
        names = hk.resolve(self.config, capture)
        step_names = frozenset(n for n in names if not hk.is_pattern(n))
        rng = np.random.default_rng(seed)
        B = ids.shape[0]
        cache = self.new_cache(B)
        p = plan(self.config, interventions, None, B, ids.shape[1])
        if p.patches or p.force and any(pos is not None for v in p.force.values()
                                         for _, pos in v):
            raise InputError("generate: patch and position-specific force_expert need fixed "
                             "positions; use run() on the full sequence instead")
        logits, arrays, cache = self._forward(ids, p, CaptureSpec(frozenset(names)), cache)
        pieces: dict[str, list[np.ndarray]] = {n: [a] for n, a in arrays.items()
                                               if n in step_names}
        patterns = {n: [a] for n, a in arrays.items() if hk.is_pattern(n)}
        new = np.zeros((B, 0), np.int64)
        eos = set(stop_ids or ())
        done = np.zeros(B, bool)
        last = logits[:, -1]
        for _ in range(max_new_tokens):
            tok = sample(last, temperature, top_p, rng)
            tok = np.where(done, self.config.pad_token_id or 0, tok)
            new = np.concatenate([new, tok[:, None]], axis=1)
            done |= np.isin(tok, list(eos))
            if done.all() or new.shape[1] == max_new_tokens:
                break
            logits, arrays, cache = self._forward(tok[:, None], p,
                                                  CaptureSpec(frozenset(names)), cache)
            for n, a in arrays.items():
                (patterns if hk.is_pattern(n) else pieces).setdefault(n, []).append(a)
            last = logits[:, -1]
        arrays = {n: np.concatenate(v, axis=hk.seq_axis(n)) for n, v in pieces.items()}
        full = np.concatenate([ids, new], axis=1)
        trace = Trace(arrays, full[:, : full.shape[1] - (1 if new.shape[1] else 0)],
                      self._meta(names, p, capture))
        return Generation(full, new, trace, {n: v for n, v in patterns.items()})


class Generation(NamedTuple):
    sequences: np.ndarray  # (B, prompt + new) int64
    new_tokens: np.ndarray  # (B, new)
    trace: Trace  # hooks over every position that was fed to the model
    patterns: dict[str, list[np.ndarray]]  # per-step attention patterns, if captured


def sample(logits: np.ndarray, temperature: float, top_p: float,
           rng: np.random.Generator) -> np.ndarray:
    """Sample one token per row from float logits (B, V): greedy at temperature 0, nucleus."""
    if temperature == 0:
        return logits.argmax(-1).astype(np.int64)
    z = logits.astype(np.float64) / temperature
    z -= z.max(-1, keepdims=True)
    prob = np.exp(z)
    prob /= prob.sum(-1, keepdims=True)
    out = np.empty(len(prob), np.int64)
    for b, pr in enumerate(prob):
        if top_p < 1:
            order = np.argsort(-pr, kind="stable")
            keep = np.cumsum(pr[order]) - pr[order] < top_p
            mask = np.zeros_like(pr, bool)
            mask[order[keep]] = True
            pr = np.where(mask, pr, 0)
            pr /= pr.sum()
        out[b] = rng.choice(len(pr), p=pr)
    return out


def _np_dtype(d: Any) -> np.dtype | None:
    if d is None:
        return None
    if str(d) in ("bfloat16", "bf16"):
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(d)


def _as_slice(positions: Any) -> slice | None:
    if positions is None or isinstance(positions, slice):
        return positions
    pos = list(positions)
    if pos and pos == list(range(pos[0], pos[-1] + 1)):
        return slice(pos[0], pos[-1] + 1)
    raise ValueError("positions must be a slice or a contiguous range of positions")


def store(a: np.ndarray, spec: CaptureSpec) -> np.ndarray:
    """A captured array as a trace keeps it: in the capture dtype, contiguous. (The position
    slice was applied where the value was captured.)"""
    if spec.dtype is not None and a.dtype.kind == "f":
        a = a.astype(spec.dtype)
    return np.ascontiguousarray(a)
