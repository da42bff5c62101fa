"""The backend-independent Model API: input checks, capture resolution, interventions, traces.

A backend subclasses ``Model`` and implements ``_forward`` (one batched forward pass through the
shared ``workbench.forward``, optionally continuing a KV cache) plus ``device``. Everything a
user touches — ``run``, ``hook_names``, ``estimate_capture_bytes``, ``generate`` — is defined
once here so torch and jax behave identically.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np

from . import hooks as hk
from .config import ModelConfig, human_bytes
from .forward import Padding, first_nonfinite
from .interventions import Intervention, Plan, plan
from .trace import Trace

DTYPES = ("float32", "bfloat16")

CAPTURE_MEMORY_FRACTION = 0.5
"""A capture whose estimated size exceeds this fraction of the memory available now
(``MemAvailable`` in /proc/meminfo) is refused before running; ``max_capture_bytes=`` on
``run``/``generate`` overrides the limit per call."""


class InputError(ValueError):
    """Arguments the model cannot take: token ids (wrong rank, empty, out of range, too long)
    and the other arguments of ``run``, ``generate`` and ``estimate_capture_bytes`` (wrong
    type or out of range)."""


class CaptureTooLarge(InputError):
    """A capture whose estimated size exceeds the memory it may use; the message gives the
    estimate and how to narrow the capture."""


class NonFiniteError(ArithmeticError):
    """A ``nan_check=True`` run produced NaN or Inf; the message names the first hook."""


def raise_nonfinite(name: str | None, where: str) -> None:
    """Raise NonFiniteError for the first non-finite hook ``name`` (no-op for None)."""
    if name is None:
        return
    first = "the token embeddings" if name == "embed" else f"hook {name!r}"
    raise NonFiniteError(f"nan_check: {first} is the first value in the forward holding NaN or "
                         f"Inf ({where}); capture it and the hooks before it to look closer")


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
    nan_check: bool = False  # flag the first hook whose value holds NaN or Inf
    tiles: int = 0  # image tiles of the call (sizes the vision path's hooks)


class Model(ABC):
    """A loaded Llama 4 model on one backend (``torch`` or ``jax``)."""

    backend: str = ""
    vision_problem: str | None = "the model was loaded without a vision tower"
    """Why images cannot be run (None when the model holds a complete vision tower)."""

    def __init__(self, config: ModelConfig, dtype: str, path: str | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} not supported; choose one of {DTYPES}")
        self.config = config
        self.dtype = dtype
        self.path = path

    # ----------------------------------------------------------------- to implement
    @abstractmethod
    def _forward(self, ids: np.ndarray, plan: Plan, spec: CaptureSpec, cache: Any = None,
                 stop_at_layer: int | None = None, pad: Padding | None = None,
                 images: tuple[np.ndarray, np.ndarray] | None = None
                 ) -> tuple[np.ndarray | None, dict[str, np.ndarray], Any]:
        """One forward pass over ``ids`` (B, S), continuing ``cache`` when given; ``pad``
        describes a padded batch (key mask over every slot so far, RoPE positions, left
        padding). ``images``: (checked pixel values (N, C, H, W) float32, flat placeholder
        positions (N*P',)) from ``check_images``, run through the vision path and scattered
        into the embeddings.

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
    @property
    def has_vision(self) -> bool:
        """True when the model holds a vision tower and can run images (``pixel_values``)."""
        return self.vision_problem is None

    def _check_finite(self, finite: Mapping[str, Any], where: str) -> None:
        """NonFiniteError naming the first hook (in forward order) whose all-finite flag in
        ``finite`` (a ``nan_check`` run's) is False; nothing to check without ``nan_check``."""
        if finite:  # the hook order is only built when there are flags to order
            raise_nonfinite(first_nonfinite(finite, self.hook_names()), where)

    def hook_names(self) -> list[str]:
        """Every hook point of this model, in forward order (the vision path's first, on a
        model with a vision tower)."""
        return hk.hook_names(self.config, self.has_vision)

    def check_images(self, ids: np.ndarray, pixel_values: Any) -> tuple[np.ndarray, np.ndarray]:
        """Validate ``pixel_values`` for ``ids``: (float32 tiles (N, C, H, W), flat positions of
        the ``<|patch|>`` placeholders). InputError when the model has no vision tower, the
        tiles have the wrong shape, or the placeholders do not match the image features."""
        from .vision.forward import VisionError, check_pixels, image_positions
        if not self.has_vision:
            raise InputError(f"pixel_values given, but this model cannot run images: "
                             f"{self.vision_problem}")
        vc = self.config.vision
        try:
            px = check_pixels(self.config, vc, pixel_values)
            return px, image_positions(ids, vc, px.shape[0])
        except VisionError as e:
            raise InputError(str(e)) from None

    def __repr__(self) -> str:
        c = self.config
        return (f"<workbench {self.backend} model: {c.num_hidden_layers} layers, "
                f"{c.num_local_experts} experts top-{c.num_experts_per_tok}, d={c.hidden_size}, "
                f"{self.dtype} on {self.device}{', ' + str(self.path) if self.path else ''}>")

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's ``wb.Tokenizer`` (its tokenizer.json, read when first asked for),
        or one assigned here; None when the model has neither. ``run`` and ``generate`` use
        it to encode text given in place of token ids."""
        tok = getattr(self, "_tokenizer", None)
        if tok is None and self.path is not None:
            from pathlib import Path
            if (Path(self.path) / "tokenizer.json").is_file():
                from .tokenizer import Tokenizer
                tok = self._tokenizer = Tokenizer.from_pretrained(self.path)
        return tok

    @tokenizer.setter
    def tokenizer(self, tok: Any) -> None:
        self._tokenizer = tok

    def _inputs(self, input_ids: Any, attention_mask: Any, padding_side: str
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """Token ids (B, S) int64 and the attention mask (None when nothing is padded) from
        ids or text: a string is encoded with the model's tokenizer, a list of strings
        encoded and padded on ``padding_side``."""
        texts = None
        if isinstance(input_ids, str):
            texts = [input_ids]
        elif isinstance(input_ids, list | tuple) and input_ids and \
                all(isinstance(t, str) for t in input_ids):
            texts = list(input_ids)
        if texts is None:
            ids = self.check_ids(input_ids)
            return ids, self.check_mask(attention_mask, ids)
        tok = self.tokenizer
        if tok is None:
            raise InputError("this model has no tokenizer (no tokenizer.json next to its "
                             "weights): encode first with wb.Tokenizer, e.g. "
                             "tok = wb.Tokenizer.from_pretrained(path); "
                             "model.run(tok.encode(text)), or set model.tokenizer = tok")
        if attention_mask is not None:
            raise InputError("attention_mask is for token ids; text input is padded here "
                             "(pass token ids with their mask, or text without a mask)")
        if len(texts) == 1:
            ids = self.check_ids(tok.encode(texts[0]))
            return ids, None
        batch = tok.encode_batch(texts, pad=True, padding_side=padding_side)
        ids = self.check_ids(batch.input_ids)
        return ids, self.check_mask(batch.attention_mask, ids)

    def check_mask(self, attention_mask: Any, ids: np.ndarray) -> np.ndarray | None:
        """Validate an attention mask for ids (B, S): 0/1 (or bool) of the same shape, at
        least one token per row, as transformers takes it. Returns it as bool, or None when
        it pads nothing (the unpadded path is then taken, with identical results)."""
        if attention_mask is None:
            return None
        if hasattr(attention_mask, "detach"):
            attention_mask = attention_mask.detach().cpu().numpy()
        try:
            m = np.asarray(attention_mask)
        except Exception as e:  # noqa: BLE001 - anything numpy cannot read is an input error
            raise InputError(f"attention_mask could not be read as an array: {e}") from None
        if m.ndim == 1 and ids.shape[0] == 1:
            m = m[None, :]
        if m.shape != ids.shape:
            raise InputError(f"attention_mask has shape {m.shape}; it must match input_ids "
                             f"{ids.shape} (1 = token, 0 = padding)")
        if m.dtype.kind not in "biu" or not np.isin(m, (0, 1)).all():
            raise InputError(f"attention_mask must hold 0 (padding) and 1 (token) only, got "
                             f"{m.dtype} values {np.unique(m)[:6].tolist()}")
        m = m.astype(bool)
        empty = np.flatnonzero(~m.any(axis=1))
        if len(empty):
            raise InputError(f"attention_mask row {int(empty[0])} has no token (all padding); "
                             "every sequence needs at least one")
        return None if m.all() else m

    def check_ids(self, input_ids: Any, start: int = 0) -> np.ndarray:
        """Validate token ids and return them as int64 (batch, seq); 1-D input gets batch 1."""
        if isinstance(input_ids, str):
            raise InputError("input_ids is a string: run() and generate() encode text with "
                             "the model's tokenizer; elsewhere encode first with wb.Tokenizer")
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

    def set_max_positions(self, n: int) -> None:
        """Accept sequences of up to ``n`` positions (``config.max_position_embeddings``)."""
        n = _int_arg(n, "max_position_embeddings", 1)
        self.config = replace(self.config, max_position_embeddings=n)

    def run(self, input_ids: Any, capture: str | Iterable[str] | None = None,
            interventions: Sequence[Intervention] | None = None,
            hooks: Mapping[str, Callable] | None = None, *, attention_mask: Any = None,
            capture_dtype: Any = None,
            positions: slice | Sequence[int] | None = None,
            stop_at_layer: int | None = None, max_capture_bytes: float | None = None,
            nan_check: bool = False, pixel_values: Any = None) -> Output:
        """Run the model on ``input_ids`` (batch, seq), capturing hooks matching ``capture``.

        ``input_ids`` may also be text (a string, or a list of strings padded on the right)
        when the model knows its tokenizer (``model.tokenizer``). ``attention_mask`` (B, S),
        transformers' convention (1 = token, 0 = padding, left or right), runs a padded batch:
        padded keys are masked, RoPE positions count real tokens only (as transformers'
        ``generate`` derives ``position_ids``) and chunked layers' chunks start at each row's
        first token; real tokens then get what transformers gives them for the same mask.
        Values at pad positions are meaningless; the trace records the mask
        (``trace.attention_mask``) and analyses leave pads out.

        ``pixel_values`` (tiles, C, H, W), as ``wb.Processor`` (or transformers' Llama 4
        processor) returns them, go through the vision tower; their projected features replace
        the embeddings of the ``<|patch|>`` placeholders in ``input_ids`` (transformers'
        ``masked_scatter``). The ``vision.*`` hooks and ``token_modality`` can then be
        captured (they are never cut to ``positions``).

        ``interventions`` (wb.ban_expert, ...) and ``hooks`` ({name: fn}, a function of the
        backend's array type returning a replacement) change the forward pass.
        ``capture_dtype`` stores captured floats in e.g. float16; ``positions`` keeps only those
        sequence positions (a slice, or a contiguous run of positions; negative ones count from
        the end) of every captured hook. ``stop_at_layer=k`` runs only layers 0..k-1 (hooks of
        later layers cannot be captured) and returns no logits. A capture whose estimated size
        exceeds ``max_capture_bytes`` (default: ``CAPTURE_MEMORY_FRACTION`` of the memory
        available now) is refused before running (``CaptureTooLarge``). ``nan_check=True``
        checks every hook's value for NaN/Inf and raises ``NonFiniteError`` naming the first
        hook, in forward order, that held one (for debugging; it syncs at every hook).
        """
        if not isinstance(nan_check, bool | np.bool_):
            raise InputError(f"nan_check must be True or False, got {nan_check!r}")
        ids, mask = self._inputs(input_ids, attention_mask, "right")
        images = None if pixel_values is None else self.check_images(ids, pixel_values)
        names = self._resolve(capture, images)
        self._check_padded_capture(names, mask)
        L = self.config.num_hidden_layers
        dtype = _np_dtype(capture_dtype)
        pos = _as_slice(positions, ids.shape[1])
        if stop_at_layer is not None:
            stop_at_layer = _int_arg(stop_at_layer, "stop_at_layer", 0, L)
            late = [n for n in names if (hk.layer_of(n) is None and n != "embed"
                                         and not _before_layers(n))
                    or (hk.layer_of(n) or 0) >= stop_at_layer]
            if late:
                raise InputError(f"stop_at_layer={stop_at_layer}: cannot capture {late[:3]}, "
                                 "which the shortened forward never reaches")
        p = plan(self.config, interventions, hooks, ids.shape[0], ids.shape[1])
        tiles = 0 if images is None else images[0].shape[0]
        spec = CaptureSpec(frozenset(names), dtype, pos, bool(nan_check), tiles)
        self._check_capture_memory(names, p, ids.shape, spec, max_capture_bytes)
        pad = None if mask is None else Padding.from_mask(mask)
        logits, arrays, _ = self._forward(ids, p, spec, None, stop_at_layer, pad, images)
        self._add_modality(arrays, names, ids, pos)
        self._warn_nonfinite(logits if mask is None else logits[mask] if logits is not None
                             else None)
        meta = self._meta(names, p, capture)
        if pos is not None:  # which sequence positions the captured hooks hold
            meta["positions"] = list(range(*pos.indices(ids.shape[1])))
        if images is not None:
            meta["image_tiles"] = int(images[0].shape[0])
            meta["image_tokens_per_tile"] = self.config.vision.tokens_per_tile
        trace = Trace({n: arrays[n] for n in names if n in arrays}, ids, meta, mask)
        return Output(logits, trace)

    @staticmethod
    def _check_padded_capture(names: Iterable[str], mask: np.ndarray | None) -> None:
        """A padded batch cannot capture ``attn.summary`` (its blockwise statistics take no
        key mask): refuse it, naming what to do."""
        if mask is None:
            return
        bad = [n for n in names if n.endswith(".attn.summary")]
        if bad:
            raise InputError(f"{bad[0]}: attention summaries are computed blockwise without "
                             "a padding mask; run padded rows one at a time (unpadded) to "
                             "capture attn.summary, or capture attn.pattern instead")

    def _resolve(self, capture: Any, images: Any) -> list[str]:
        """Hook names of ``capture``; InputError for vision hooks on a text-only call."""
        names = hk.resolve(self.config, capture, vision=self.has_vision)
        if images is None:
            vision = [n for n in names if n.startswith("vision.")]
            if vision and not (isinstance(capture, str) and "*" in capture
                               or not isinstance(capture, str) and any(
                                   "*" in c for c in capture or [])):
                raise InputError(f"cannot capture {vision[:3]} without pixel_values: the "
                                 "vision path runs only on images")
            names = [n for n in names if not n.startswith("vision.")]
        return names

    def _add_modality(self, arrays: dict[str, np.ndarray], names: list[str], ids: np.ndarray,
                      pos: slice | None) -> None:
        """Put ``token_modality`` (B, T) into the captured arrays when it was asked for."""
        if "token_modality" in names:
            from .vision.forward import token_modality
            m = token_modality(ids, self.config.vision)
            arrays["token_modality"] = np.ascontiguousarray(m if pos is None else m[:, pos])

    def _warn_nonfinite(self, logits: np.ndarray | None) -> None:
        """Warn once per model when a forward gives NaN/Inf logits (a cheap first-use check
        for non-finite weights; ``nan_check=True`` finds where they start)."""
        if logits is None or getattr(self, "_warned_nonfinite", False) \
                or np.isfinite(logits).all():
            return
        self._warned_nonfinite = True
        import warnings
        warnings.warn(f"{self!r}: the logits hold NaN or Inf. If the input and interventions "
                      "are finite, a weight may not be: wb.Checkpoint.open(path, "
                      "check_values=True) names non-finite tensors, and run(..., "
                      "nan_check=True) names the first hook that went non-finite.",
                      RuntimeWarning, stacklevel=3)

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
        batch = _int_arg(batch, "batch", 0)
        seq = _int_arg(seq, "seq", 0)
        return hk.estimate_capture_bytes(self.config, capture, batch, seq,
                                         _np_dtype(capture_dtype))

    def _capture_bytes(self, names: Iterable[str], p: Plan, batch: int, seq: int,
                       spec: CaptureSpec, kept: int | None = None) -> int:
        """Bytes the captured arrays take: ``kept`` positions of a (batch, seq) input, stored
        in the capture dtype (float32 when unset; indices int32)."""
        floats = np.dtype(spec.dtype or np.float32)
        total = 0
        for n in names:
            h = hk.parse(n)
            k = p.k(self.config, h.layer) if h.block == "moe" else None
            shape = list(hk.hook_shape(self.config, n, batch, seq, top_k=k, tiles=spec.tiles))
            if kept is not None and h.block != "vision":
                shape[hk.seq_axis(n)] = kept
            total += int(np.prod(shape, dtype=np.int64)) * hk.hook_dtype(n, floats).itemsize
        return total

    def _check_capture_memory(self, names: list[str], p: Plan, shape: tuple[int, int],
                              spec: CaptureSpec, max_bytes: Any,
                              new_tokens: int | None = None) -> None:
        """Refuse a capture whose estimate exceeds ``max_bytes`` (default: the fraction
        ``CAPTURE_MEMORY_FRACTION`` of the memory available now, when the system says)."""
        if max_bytes is not None:
            if isinstance(max_bytes, bool) or not isinstance(max_bytes, int | float | np.integer
                                                             | np.floating) \
                    or math.isnan(max_bytes) or max_bytes < 0:
                raise InputError(f"max_capture_bytes={max_bytes!r} must be a number of bytes "
                                 ">= 0 (or None for the default limit)")
        if not names:
            return
        B, S = shape
        total = S + (new_tokens or 0)
        kept = None
        if spec.positions is not None:
            kept = len(range(*spec.positions.indices(S)))
        est = self._capture_bytes(names, p, B, total, spec, kept)
        if max_bytes is None:
            avail = available_memory()
            if avail is None:
                return
            limit = CAPTURE_MEMORY_FRACTION * avail
            why = (f"{CAPTURE_MEMORY_FRACTION:.0%} of the {human_bytes(avail)} of memory "
                   "available now")
        else:
            limit, why = max_bytes, f"max_capture_bytes={human_bytes(max_bytes)}"
        if est <= limit:
            return
        biggest = sorted(names, key=lambda n: -self._capture_bytes([n], p, B, total, spec,
                                                                    kept))[:3]
        narrow = ["fewer hooks or layers in capture= (largest: " + ", ".join(biggest) + ")"]
        if new_tokens is None:
            narrow.insert(0, "positions= (keep only the positions you need)")
        if spec.dtype is None or spec.dtype.itemsize > 2:
            narrow.append("capture_dtype='float16' or 'bfloat16' (half the bytes)")
        if new_tokens:
            narrow.append("fewer max_new_tokens")
        raise CaptureTooLarge(
            f"capture refused: {len(names)} hook(s) on input ({B}, {total}) would take about "
            f"{human_bytes(est)} ({est} bytes), more than {why}; narrow it with "
            + "; ".join(narrow) + ", or pass max_capture_bytes= to raise the limit")

    # ----------------------------------------------------------------- generation
    def generate(self, input_ids: Any, max_new_tokens: int, *, attention_mask: Any = None,
                 temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = 0, capture: str | Iterable[str] |
                 None = None, interventions: Sequence[Intervention] | None = None,
                 stop_ids: Iterable[int] | None = None,
                 max_capture_bytes: float | None = None,
                 pixel_values: Any = None) -> Generation:
        """Sample ``max_new_tokens`` with a KV cache (temperature 0 = greedy).

        The prompt is one prefill pass; each new token is one cached step. Captured hooks of
        the prompt and every generated step are concatenated along the sequence axis (attention
        patterns are kept per step, since their key length grows). ``attention_mask`` runs a
        padded batch of prompts (see ``run``; text prompts are padded on the left): each row
        continues from its last real token, new tokens are appended after the padded prompt.
        ``pixel_values`` are the prompt's images (as in ``run``); the vision hooks come from
        the prefill.
        """
        ids, mask = self._inputs(input_ids, attention_mask, "left")
        images = None if pixel_values is None else self.check_images(ids, pixel_values)
        max_new_tokens = _int_arg(max_new_tokens, "max_new_tokens", 0)
        temperature = _real_arg(temperature, "temperature")
        top_p = _real_arg(top_p, "top_p")
        if temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {top_p}")
        if seed is not None:
            seed = _int_arg(seed, "seed", 0)
        eos = self._stop_ids(stop_ids)
        self.check_ids(np.zeros((1, 1), np.int64), start=ids.shape[1] + max_new_tokens - 1)
        names = self._resolve(capture, images)
        self._check_padded_capture(names, mask)
        step_names = frozenset(n for n in names if not hk.is_pattern(n)
                               and not _before_layers(n))
        rng = np.random.default_rng(seed)
        B = ids.shape[0]
        cache = self.new_cache(B)
        p = plan(self.config, interventions, None, B, ids.shape[1])
        if p.patches or p.force and any(pos is not None for v in p.force.values()
                                         for _, pos in v):
            raise InputError("generate: patch and position-specific force_expert need fixed "
                             "positions; use run() on the full sequence instead")
        tiles = 0 if images is None else images[0].shape[0]
        self._check_capture_memory(names, p, ids.shape, CaptureSpec(frozenset(names),
                                                                    tiles=tiles),
                                   max_capture_bytes, new_tokens=max_new_tokens)
        if mask is not None and not mask[:, -1].all():
            import warnings
            warnings.warn("generate: a prompt is right-padded; its new tokens follow the pads, "
                          "so chunked layers see them in other chunks than the prompt alone "
                          "would (as in transformers): pad prompts on the left for generation",
                          UserWarning, stacklevel=2)
        pad = None if mask is None else Padding.from_mask(mask)
        logits, arrays, cache = self._forward(ids, p, CaptureSpec(frozenset(names), tiles=tiles),
                                              cache, None, pad, images)
        once = {n: a for n, a in arrays.items() if n.startswith("vision.")}
        pieces: dict[str, list[np.ndarray]] = {n: [a] for n, a in arrays.items()
                                               if n in step_names}
        patterns = {n: [a] for n, a in arrays.items() if hk.is_pattern(n)}
        new = np.zeros((B, 0), np.int64)
        done = np.zeros(B, bool)
        if mask is None:
            last = logits[:, -1]
        else:  # each row's last real token (right padding: before its pads)
            last_pos = ids.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
            last = logits[np.arange(B), last_pos]
            next_pos = mask.sum(axis=1).astype(np.int64)  # RoPE position of the next token
        for _ in range(max_new_tokens):
            tok = sample(last, temperature, top_p, rng)
            tok = np.where(done, self.config.pad_token_id or 0, tok)
            new = np.concatenate([new, tok[:, None]], axis=1)
            done |= np.isin(tok, sorted(eos))
            if done.all() or new.shape[1] == max_new_tokens:
                break
            if pad is not None:
                pad = Padding(np.concatenate([pad.valid, np.ones((B, 1), bool)], axis=1),
                              next_pos[:, None].copy(), pad.shift)
                next_pos += 1
            logits, arrays, cache = self._forward(tok[:, None], p,
                                                  CaptureSpec(frozenset(names)), cache,
                                                  pad=pad)
            for n, a in arrays.items():
                (patterns if hk.is_pattern(n) else pieces).setdefault(n, []).append(a)
            last = logits[:, -1]
        arrays = {n: np.concatenate(v, axis=hk.seq_axis(n)) for n, v in pieces.items()}
        arrays.update(once)
        full = np.concatenate([ids, new], axis=1)
        fed = full.shape[1] - (1 if new.shape[1] else 0)
        fed_mask = None if mask is None else np.concatenate(
            [mask, np.ones_like(new, bool)], axis=1)[:, :fed]
        self._add_modality(arrays, names, full[:, :fed], None)
        trace = Trace(arrays, full[:, :fed], self._meta(names, p, capture), fed_mask)
        return Generation(full, new, trace, {n: v for n, v in patterns.items()})

    def _stop_ids(self, stop_ids: Any) -> set[int]:
        """``stop_ids`` as a set of token ids: ints (one int alone is one id) in the
        vocabulary."""
        if stop_ids is None:
            return set()
        if _is_int(stop_ids):
            stop_ids = [stop_ids]
        if isinstance(stop_ids, str | bytes) or not isinstance(stop_ids, Iterable) \
                and not hasattr(stop_ids, "__array__"):
            raise InputError(f"stop_ids must be token ids (ints), got {stop_ids!r}")
        items = np.asarray(stop_ids, dtype=object).ravel().tolist() \
            if hasattr(stop_ids, "__array__") else list(stop_ids)
        V = self.config.vocab_size
        out = set()
        for t in items:
            if not _is_int(t):
                raise InputError(f"stop_ids must be ints, got {type(t).__name__} {t!r}")
            if not 0 <= t < V:
                raise InputError(f"stop_ids: token id {t} is outside the vocabulary [0, {V})")
            out.add(int(t))
        return out


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


def _before_layers(name: str) -> bool:
    """True for hooks computed before the decoder layers (the vision path, token_modality)."""
    return name.startswith("vision.") or name == "token_modality"


def available_memory() -> int | None:
    """Bytes of memory available now (``MemAvailable`` of /proc/meminfo), or None where the
    system does not say."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _is_int(x: Any) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def _int_arg(x: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """``x`` as an int in lo..hi (inclusive); InputError for a float, bool or other type."""
    if not _is_int(x):
        raise InputError(f"{name} must be an int, got {type(x).__name__} {x!r}")
    x = int(x)
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        rng = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise InputError(f"{name} must be an int {rng}, got {x}")
    return x


def _real_arg(x: Any, name: str) -> float:
    """``x`` as a finite float; InputError for NaN, inf, bools and non-numbers."""
    if isinstance(x, bool | np.bool_) or not isinstance(x, int | float | np.integer
                                                       | np.floating):
        raise InputError(f"{name} must be a number, got {type(x).__name__} {x!r}")
    x = float(x)
    if not math.isfinite(x):
        raise InputError(f"{name} must be finite, got {x}")
    return x


_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _np_dtype(d: Any) -> np.dtype | None:
    """The storage dtype of captured float hooks (a float dtype: numpy, ml_dtypes' bfloat16,
    a name, or a torch/jax dtype), else InputError."""
    if d is None:
        return None
    text = str(d).removeprefix("torch.")
    if text in ("bfloat16", "bf16") or getattr(d, "__name__", None) == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    try:
        dt = np.dtype(text if str(d).startswith("torch.") else d)
    except (TypeError, ValueError):
        dt = None
    if dt is None or dt.kind != "f":
        raise InputError(f"capture_dtype={d!r} is not a float dtype; captured floats can be "
                         f"stored as one of {', '.join(_FLOAT_DTYPES)} (indices stay int32)")
    return dt


def _as_slice(positions: Any, seq: int) -> slice | None:
    """``positions`` (a slice or a contiguous run of ints, negative ones counting from the
    end) as a slice with non-negative bounds inside a sequence of ``seq``; InputError for
    anything outside it, an empty selection or a non-int position."""
    if positions is None:
        return None
    if isinstance(positions, slice):
        for part in ("start", "stop", "step"):
            v = getattr(positions, part)
            if v is not None and not _is_int(v):
                raise InputError(f"positions: slice {part} must be an int or None, got "
                                 f"{type(v).__name__} {v!r}")
        step = 1 if positions.step is None else int(positions.step)
        if step < 1:
            raise InputError(f"positions: slice step must be >= 1, got {step}")
        for part in ("start", "stop"):
            v = getattr(positions, part)
            if v is not None and not -seq <= v <= seq:
                raise InputError(f"positions: slice {part}={int(v)} is outside the sequence of "
                                 f"length {seq} (valid: {-seq}..{seq})")
        start, stop, step = positions.indices(seq)
        if not len(range(start, stop, step)):
            raise InputError(f"positions={positions} selects no position of a sequence of "
                             f"length {seq}")
        return slice(start, stop, None if step == 1 else step)
    if _is_int(positions):
        positions = [positions]
    if isinstance(positions, str | bytes) or not (isinstance(positions, Iterable)
                                                  or hasattr(positions, "__array__")):
        raise InputError(f"positions must be a slice or a sequence of ints, got {positions!r}")
    pos = list(np.asarray(positions, dtype=object).ravel()) if hasattr(positions, "__array__") \
        else list(positions)
    if not pos:
        raise InputError("positions is empty: pass at least one position (or None for all)")
    for q in pos:
        if not _is_int(q):
            raise InputError(f"positions must be ints, got {type(q).__name__} {q!r}")
    bad = [int(q) for q in pos if not -seq <= q < seq]
    if bad:
        raise InputError(f"positions {bad} are outside the sequence of length {seq} (valid: "
                         f"{-seq}..{seq - 1})")
    pos = [int(q) % seq for q in pos]
    if pos != list(range(pos[0], pos[-1] + 1)):
        raise InputError(f"positions must be a slice or a contiguous, increasing run of "
                         f"positions, got {pos}")
    return slice(pos[0], pos[-1] + 1)


def store(a: np.ndarray, spec: CaptureSpec) -> np.ndarray:
    """A captured array as a trace keeps it: in the capture dtype, contiguous. (The position
    slice was applied where the value was captured.)"""
    if spec.dtype is not None and a.dtype.kind == "f":
        a = a.astype(spec.dtype)
    return np.ascontiguousarray(a)
