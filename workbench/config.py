"""ModelConfig: every Llama4TextConfig field, read from an HF ``config.json``.

Shared by both backends. Reads the text-only form (``Llama4ForCausalLM``, model_type
``llama4_text``) and the multimodal wrapper (``Llama4ForConditionalGeneration``, ``text_config``),
including the legacy forms (``rope_theta``/``rope_scaling`` instead of ``rope_parameters``;
``attn_temperature_tuning`` stored as an int).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class ConfigError(ValueError):
    """A config.json that is missing, malformed or self-contradictory."""


_ROPE_TYPES = ("default", "llama3")
_MAX_CONFIG_BYTES = 16 * 1024 * 1024  # a real config.json is a few kB
_MAX_CONFIG_DEPTH = 32

# ----------------------------------------------------------------------------- strict JSON

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


class _DuplicateKey(ValueError):
    pass


def json_depth(raw: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in JSON text (brackets inside strings ignored)."""
    b = np.frombuffer(_JSON_STRING.sub(b'""', raw), np.uint8)
    step = ((b == 0x7B) | (b == 0x5B)).astype(np.int8) - ((b == 0x7D) | (b == 0x5D))
    return int(np.cumsum(step, dtype=np.int64).max(initial=0))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(f"duplicate key {k!r}")
        out[k] = v
    return out


def load_strict_json(raw: bytes, max_depth: int) -> Any:
    """Parse UTF-8 JSON that has no duplicate keys and nests at most ``max_depth`` levels.

    Raises ValueError with a one-line reason (not UTF-8, too deep, duplicate key, not JSON).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte {e.start}: {e.reason})") from None
    depth = json_depth(raw)
    if depth > max_depth:
        raise ValueError(f"JSON nested {depth} levels deep (at most {max_depth} allowed)")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise ValueError(f"{e} (a key may appear only once in a JSON object)") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, or an integer literal beyond Python's limit
        raise ValueError(f"not valid JSON ({e})") from None


def regular_file_stat(path: Path, error: type[Exception]) -> os.stat_result:
    """stat ``path``; ``error`` naming it unless it is a regular file (checked before anything
    opens it: a FIFO would block, /dev/zero never ends, a directory is not a file)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: is {file_kind(st.st_mode)}, not a regular file")
    return st


def read_regular_file(path: Path, limit: int, error: type[Exception]) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes; else ``error``
    naming it (checked with stat before opening: a FIFO would block, /dev/zero never ends)."""
    st = regular_file_stat(path, error)
    if st.st_size > limit:
        raise error(f"{path}: {st.st_size} bytes, more than the {limit} bytes such a file may "
                    "have")
    with open(path, "rb") as fh:
        return fh.read(limit + 1)


def file_kind(mode: int) -> str:
    """'a directory', 'a FIFO (named pipe)', ... for a stat mode."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


# ----------------------------------------------------------------------------- field checks


def _r(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _desc(v: Any) -> str:
    return f"{type(v).__name__} {_r(v)}"


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_)


def _int(name: str, v: Any, minimum: int | None = None) -> int:
    if not _is_int(v):
        raise ConfigError(f"{name} must be an integer, got {_desc(v)}")
    v = int(v)
    if minimum is not None and v < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name} must be {what}, got {_r(v)}")
    return v


def _real(name: str, v: Any, *, positive: bool = False, upper: float | None = None
          ) -> int | float:
    """A finite number (>= 0, or > 0 when ``positive``), also finite and, when positive,
    non-zero in float32: the precision the RoPE tables, norms and temperatures use."""
    if not _is_real(v):
        raise ConfigError(f"{name} must be a number, got {_desc(v)}")
    v = v if isinstance(v, int) else int(v) if _is_int(v) else float(v)
    try:
        finite = math.isfinite(v)
    except OverflowError:  # an int beyond any float
        finite = False
    if finite:
        with np.errstate(over="ignore"):
            f32 = np.float32(v)
        finite = bool(np.isfinite(f32))
    if not finite:
        raise ConfigError(f"{name} must be finite (at most 3.4e38 in magnitude), got {_r(v)}")
    if positive and not (v > 0 and f32 > 0):
        raise ConfigError(f"{name} must be > 0 (and at least 1.4e-45), got {_r(v)}")
    if not positive and v < 0:
        raise ConfigError(f"{name} must be >= 0, got {_r(v)}")
    if upper is not None and v > upper:
        raise ConfigError(f"{name} must be <= {upper}, got {_r(v)}")
    return v


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool | np.bool_):
        raise ConfigError(f"{name} must be true or false, got {_desc(v)}")
    return bool(v)


def _int_list(name: str, v: Any) -> list[int]:
    if not isinstance(v, list | tuple):
        raise ConfigError(f"{name} must be a list of integers, got {_desc(v)}")
    return [_int(f"{name}[{i}]", x) for i, x in enumerate(v)]


_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_local_experts", "num_experts_per_tok",
                  "max_position_embeddings", "no_rope_layer_interval",
                  "interleave_moe_layer_step")
_OPTIONAL_POSITIVE_INTS = ("head_dim", "num_key_value_heads", "attention_chunk_size")
_BOOLS = ("use_cache", "tie_word_embeddings", "use_qk_norm", "output_router_logits",
          "attention_bias", "multimodal")
_POSITIVE_REALS = ("rms_norm_eps", "rope_theta", "attn_scale", "floor_scale")
_NONNEGATIVE_REALS = ("initializer_range", "router_aux_loss_coef", "router_jitter_noise")
_VISION_INTS = ("hidden_size", "num_hidden_layers", "intermediate_size", "patch_size",
                "num_channels", "image_size", "projector_input_dim", "projector_output_dim",
                "vision_output_dim")


@dataclass
class ModelConfig:
    """The Llama 4 text model's hyper-parameters (HF ``Llama4TextConfig`` field names)."""

    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192
    intermediate_size_mlp: int = 16384
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int | None = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    num_experts_per_tok: int = 1
    num_local_experts: int = 16
    moe_layers: list[int] | None = None
    interleave_moe_layer_step: int = 1
    use_qk_norm: bool = True
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    rope_theta: float = 500000.0
    rope_scaling: dict[str, Any] | None = None
    no_rope_layers: list[int] | None = None
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192
    layer_types: list[str] | None = None
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    attention_bias: bool = False
    # Not a text-config field: True when the checkpoint is the multimodal wrapper
    # (tensors under ``language_model.``; vision tower alongside).
    multimodal: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._check_types()
        if self.attention_bias:
            raise ConfigError("attention_bias=true: Llama 4 has no attention biases and the "
                              "workbench does not model them")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"head_dim is not set and hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        L = self.num_hidden_layers
        if not self.no_rope_layers:
            self.no_rope_layers = [
                int((i + 1) % self.no_rope_layer_interval != 0) for i in range(L)
            ]
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            self.moe_layers = list(range(step - 1, L, step))
        if self.layer_types is None:
            self.layer_types = [
                "chunked_attention"
                if use_rope and self.attention_chunk_size is not None
                else "full_attention"
                for use_rope in self.no_rope_layers
            ]
        self.validate()

    # ------------------------------------------------------------------ validation
    def _check_types(self) -> None:
        """Check every field's type (and the sign of counts), normalising numpy scalars to
        Python ones; ConfigError names the field."""
        for name in _POSITIVE_INTS:
            setattr(self, name, _int(name, getattr(self, name), 1))
        for name in _OPTIONAL_POSITIVE_INTS:
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, _int(name, v, 1))
        self.intermediate_size_mlp = _int("intermediate_size_mlp", self.intermediate_size_mlp,
                                          0)
        for name in _BOOLS:
            setattr(self, name, _bool(name, getattr(self, name)))
        att = self.attn_temperature_tuning
        if not isinstance(att, bool | np.bool_):
            # Legacy checkpoints store e.g. 4 here; HF 5.x wants a bool. Non-zero means on.
            if not _is_int(att) or att < 0:
                raise ConfigError("attn_temperature_tuning must be true or false (or a "
                                  f"non-negative integer in legacy configs), got {_desc(att)}")
        self.attn_temperature_tuning = bool(att)
        for name in _POSITIVE_REALS:
            setattr(self, name, _real(name, getattr(self, name), positive=True))
        for name in _NONNEGATIVE_REALS:
            setattr(self, name, _real(name, getattr(self, name)))
        self.attention_dropout = _real("attention_dropout", self.attention_dropout, upper=1.0)
        if not isinstance(self.hidden_act, str):
            raise ConfigError(f"hidden_act must be a string, got {_desc(self.hidden_act)}")
        for name in ("pad_token_id", "bos_token_id"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, _int(name, v))
        eos = self.eos_token_id
        if eos is not None:
            self.eos_token_id = _int_list("eos_token_id", eos) if isinstance(
                eos, list | tuple) else _int("eos_token_id", eos)
        if self.moe_layers is not None:
            self.moe_layers = _int_list("moe_layers", self.moe_layers)
        if self.no_rope_layers is not None:
            self.no_rope_layers = _int_list("no_rope_layers", self.no_rope_layers)
        if self.layer_types is not None:
            if not isinstance(self.layer_types, list | tuple) or not all(
                    isinstance(t, str) for t in self.layer_types):
                raise ConfigError(f"layer_types must be a list of strings, got "
                                  f"{_desc(self.layer_types)}")
            self.layer_types = list(self.layer_types)
        rs = self.rope_scaling
        if rs is not None and not isinstance(rs, dict):
            raise ConfigError(f"rope_scaling / rope_parameters must be an object or null, got "
                              f"{_desc(rs)}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a dict, got {_desc(self.extra)}")
        vc = self.extra.get("vision_config")
        if vc is not None:
            if not isinstance(vc, dict):
                raise ConfigError(f"vision_config must be an object, got {_desc(vc)}")
            for key in _VISION_INTS:
                if key in vc:
                    _int(f"vision_config.{key}", vc[key], 1)

    def validate(self) -> None:
        """Raise ConfigError naming the field when a field has the wrong type or range, or the
        config contradicts itself."""
        self._check_types()
        L, H, K = self.num_hidden_layers, self.num_attention_heads, self.num_key_value_heads
        for name in ("head_dim", "num_key_value_heads"):
            if getattr(self, name) is None:
                raise ConfigError(f"{name} must be a positive integer, got None")
        if H % K:
            raise ConfigError(
                f"num_key_value_heads={K} does not divide num_attention_heads={H} (GQA needs "
                "whole groups)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_local_experts="
                f"{self.num_local_experts}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r}: Llama 4 uses 'silu' only")
        if self.moe_layers is None or self.no_rope_layers is None or self.layer_types is None:
            raise ConfigError("moe_layers, no_rope_layers and layer_types must be lists")
        bad = [i for i in self.moe_layers if not 0 <= i < L]
        if bad:
            raise ConfigError(f"moe_layers {bad} out of range for num_hidden_layers={L}")
        if len(set(self.moe_layers)) < L and self.intermediate_size_mlp <= 0:
            raise ConfigError("dense layers present but intermediate_size_mlp is not positive")
        if len(self.no_rope_layers) != L:
            raise ConfigError(
                f"no_rope_layers has {len(self.no_rope_layers)} entries, num_hidden_layers={L}"
            )
        if any(v not in (0, 1) for v in self.no_rope_layers):
            raise ConfigError(f"no_rope_layers must hold 0/1 flags, got {self.no_rope_layers}")
        if len(self.layer_types) != L:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries, "
                              f"num_hidden_layers={L}")
        for i, t in enumerate(self.layer_types):
            if t not in ("chunked_attention", "full_attention"):
                raise ConfigError(f"layer_types[{i}]={t!r}: expected chunked_attention or "
                                  "full_attention")
            if t == "chunked_attention" and self.attention_chunk_size is None:
                raise ConfigError(f"layer_types[{i}] is chunked_attention but "
                                  "attention_chunk_size is null")
        rs = self.rope_scaling
        if rs is not None:
            rtype = rs.get("rope_type", rs.get("type", "default"))
            if not isinstance(rtype, str) or rtype not in _ROPE_TYPES:
                raise ConfigError(f"unknown rope type {rtype!r} in rope_parameters/rope_scaling; "
                                  f"supported: "
                                  f"{', '.join(_ROPE_TYPES)}")
            if rtype == "llama3":
                for key in ("factor", "low_freq_factor", "high_freq_factor",
                            "original_max_position_embeddings"):
                    if key not in rs:
                        raise ConfigError(f"llama3 rope_scaling lacks {key!r}")
                rs = dict(rs)
                for key in ("factor", "low_freq_factor", "high_freq_factor"):
                    rs[key] = _real(f"rope_scaling.{key}", rs[key], positive=True)
                rs["original_max_position_embeddings"] = _int(
                    "rope_scaling.original_max_position_embeddings",
                    rs["original_max_position_embeddings"], 1)
                self.rope_scaling = rs
                if rs["low_freq_factor"] > rs["high_freq_factor"]:
                    raise ConfigError(
                        f"rope_scaling.low_freq_factor={rs['low_freq_factor']} is greater than "
                        f"rope_scaling.high_freq_factor={rs['high_freq_factor']} (inverted "
                        "llama3 factors; equal factors are allowed)")
        eos = self.eos_token_id
        for tok_name, tok in (("bos_token_id", self.bos_token_id), ("pad_token_id",
                                                                    self.pad_token_id)):
            if tok is not None and not 0 <= tok < self.vocab_size:
                raise ConfigError(f"{tok_name}={tok} outside vocab_size={self.vocab_size}")
        for tok in eos if isinstance(eos, list) else ([] if eos is None else [eos]):
            if not 0 <= tok < self.vocab_size:
                raise ConfigError(f"eos_token_id={tok} outside vocab_size={self.vocab_size}")

    # ------------------------------------------------------------------ derived views
    @property
    def rope_type(self) -> str:
        if self.rope_scaling is None:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def uses_rope(self, layer: int) -> bool:
        """True on RoPE (chunked, QK-normed) layers; False on NoPE (global) layers."""
        return bool(self.no_rope_layers[layer])

    def uses_qk_norm(self, layer: int) -> bool:
        return bool(self.use_qk_norm and self.uses_rope(layer))

    def chunk_size(self, layer: int) -> int | None:
        """The local attention chunk for the layer, or None for global causal attention."""
        if self.layer_types[layer] == "chunked_attention":
            return self.attention_chunk_size
        return None

    def uses_temperature(self, layer: int) -> bool:
        return bool(self.attn_temperature_tuning and not self.uses_rope(layer))

    @property
    def vision(self) -> VisionConfig | None:
        """The vision tower's config (None for text-only models); see :func:`vision_config`."""
        return vision_config(self)

    @property
    def dense_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if i not in self.moe_layers]

    @property
    def nope_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if not self.uses_rope(i)]

    def layer_map(self) -> list[str]:
        """One short label per layer, e.g. ``'MoE  RoPE chunk=8192 qk-norm'``."""
        out = []
        for i in range(self.num_hidden_layers):
            ffn = "MoE  " if self.is_moe(i) else "dense"
            if self.uses_rope(i):
                c = self.chunk_size(i)
                att = f"RoPE {'chunk=' + str(c) if c else 'global'}"
                att += " qk-norm" if self.uses_qk_norm(i) else ""
            else:
                att = "NoPE global" + (" temp-tuned" if self.uses_temperature(i) else "")
            out.append(f"{ffn} {att}")
        return out

    # ------------------------------------------------------------------ parameter counts
    def param_counts(self) -> dict[str, int]:
        """Parameter counts: language model total and active per token (top-k experts)."""
        D, V, I, Im = self.hidden_size, self.vocab_size, self.intermediate_size, \
            self.intermediate_size_mlp
        H, K, d, E = self.num_attention_heads, self.num_key_value_heads, self.head_dim, \
            self.num_local_experts
        attn = D * H * d * 2 + D * K * d * 2 + 2 * D
        expert = 3 * D * I
        moe_total = E * expert + expert + E * D
        moe_active = self.num_experts_per_tok * expert + expert + E * D
        dense = 3 * D * Im
        n_moe = len(self.moe_layers)
        n_dense = self.num_hidden_layers - n_moe
        embed = V * D
        head = 0 if self.tie_word_embeddings else V * D
        base = embed + head + D + self.num_hidden_layers * attn + n_dense * dense
        total = base + n_moe * moe_total
        active = base + n_moe * moe_active
        out = {"total": total, "active": active, "embedding": embed + head,
               "experts": n_moe * E * expert}
        if self.multimodal:
            out["vision"] = vision_param_count(self.extra.get("vision_config") or {}, D)
            out["total_with_vision"] = total + out["vision"]
        return out

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config") -> ModelConfig:
        """Build from an HF config dict (text config or multimodal wrapper)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        multimodal = False
        extra: dict[str, Any] = {}
        text = raw
        if "text_config" in raw and raw.get("model_type") not in (None, "llama4"):
            raise ConfigError(f"{source}: model_type={raw.get('model_type')!r} is not a Llama 4 "
                              "model (expected 'llama4' for the multimodal wrapper)")
        if "text_config" in raw or raw.get("model_type") == "llama4":
            if not isinstance(raw.get("text_config"), dict):
                raise ConfigError(f"{source}: multimodal Llama 4 config without a text_config")
            multimodal = True
            text = dict(raw["text_config"])
            extra["vision_config"] = raw.get("vision_config") or {}
            for key in ("boi_token_index", "eoi_token_index", "image_token_index"):
                if key in raw:
                    extra[key] = raw[key]
        mt = text.get("model_type")
        if mt not in (None, "llama4_text", "llama4"):
            raise ConfigError(f"{source}: model_type={mt!r} is not a Llama 4 text model")
        fields = {f.name for f in dataclasses.fields(cls)} - {"multimodal", "extra"}
        kwargs: dict[str, Any] = {}
        for k, v in text.items():
            if k in fields:
                kwargs[k] = v
        # rope: 5.x rope_parameters dict, or legacy rope_theta + rope_scaling
        rp = text.get("rope_parameters")
        if rp is not None and not isinstance(rp, dict):
            raise ConfigError(f"{source}: rope_parameters must be an object or null, got "
                              f"{_desc(rp)}")
        if isinstance(rp, dict):
            kwargs["rope_theta"] = rp.get("rope_theta", kwargs.get("rope_theta", 500000.0))
            rtype = rp.get("rope_type", rp.get("type", "default"))
            kwargs["rope_scaling"] = None if rtype == "default" else \
                {k: v for k, v in rp.items() if k != "rope_theta"}
        rs = kwargs.get("rope_scaling")
        if isinstance(rs, dict):
            rs = dict(rs)
            if "type" in rs and "rope_type" not in rs:
                rs["rope_type"] = rs.pop("type")
            kwargs["rope_scaling"] = None if rs.get("rope_type") == "default" else rs
        for k in ("torch_dtype", "dtype", "architectures", "transformers_version"):
            if k in text:
                extra[k] = text[k]
            elif k in raw:
                extra[k] = raw[k]
        try:
            return cls(**kwargs, multimodal=multimodal, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` from a checkpoint directory (or the file itself)."""
        p = Path(path)
        f = p / "config.json" if p.is_dir() else p
        if not f.exists():
            raise FileNotFoundError(f"no config.json at {f}")
        data = read_regular_file(f, _MAX_CONFIG_BYTES, ConfigError)
        try:
            raw = load_strict_json(data, _MAX_CONFIG_DEPTH)
        except ValueError as e:
            raise ConfigError(f"{f}: {e}") from None
        return cls.from_dict(raw, source=str(f))

    def to_text_dict(self) -> dict[str, Any]:
        """The ``Llama4TextConfig`` JSON form (transformers 5.x ``rope_parameters``)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("multimodal", "extra", "rope_theta", "rope_scaling")}
        rp: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": float(self.rope_theta)}
        if self.rope_scaling:
            rp.update({k: v for k, v in self.rope_scaling.items() if k not in ("type",)})
        d["rope_parameters"] = rp
        d["model_type"] = "llama4_text"
        return d

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json this checkpoint should carry (text-only or multimodal wrapper)."""
        text = self.to_text_dict()
        dtype = self.extra.get("dtype") or self.extra.get("torch_dtype") or "float32"
        if not self.multimodal:
            return {**text, "architectures": ["Llama4ForCausalLM"], "dtype": dtype}
        vc = dict(self.extra.get("vision_config") or {})
        out = {
            "architectures": ["Llama4ForConditionalGeneration"],
            "model_type": "llama4",
            "text_config": text,
            "vision_config": vc,
            "dtype": dtype,
            "tie_word_embeddings": False,
        }
        for key in ("boi_token_index", "eoi_token_index", "image_token_index"):
            if key in self.extra:
                out[key] = self.extra[key]
        return out

    def summary(self) -> dict[str, Any]:
        """A compact, JSON-able description (stored in traces)."""
        return {
            "layers": self.num_hidden_layers, "hidden": self.hidden_size,
            "heads": self.num_attention_heads, "kv_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "experts": self.num_local_experts,
            "top_k": self.num_experts_per_tok, "moe_layers": list(self.moe_layers),
            "nope_layers": self.nope_layers, "chunk": self.attention_chunk_size,
            "vocab": self.vocab_size, "qk_norm": self.use_qk_norm,
        }

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed; derived layer lists are recomputed if not given."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if "num_hidden_layers" in changes or "interleave_moe_layer_step" in changes:
            d.setdefault("moe_layers", None)
            d["moe_layers"] = None
            d["no_rope_layers"] = None
            d["layer_types"] = None
        if "attention_chunk_size" in changes or "no_rope_layer_interval" in changes:
            d["layer_types"] = None
            if "no_rope_layer_interval" in changes:
                d["no_rope_layers"] = None
        d.update(changes)
        return ModelConfig(**d)

    # ------------------------------------------------------------------ presets
    @classmethod
    def scout(cls, **overrides: Any) -> ModelConfig:
        """Llama-4-Scout-17B-16E-Instruct as its multimodal checkpoint ships: 16 experts in every
        layer, QK-norm on RoPE layers, llama3 RoPE scaling (factor 16)."""
        base = dict(
            num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True,
            rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
            max_position_embeddings=10485760, bos_token_id=200000,
            eos_token_id=[200001, 200007, 200008], pad_token_id=200018, multimodal=True,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def maverick(cls, **overrides: Any) -> ModelConfig:
        """Llama-4-Maverick-17B-128E-Instruct as its multimodal checkpoint ships: 128 experts on
        every other layer (dense layers between), no QK-norm, unscaled RoPE."""
        base = dict(
            num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
            rope_scaling=None, max_position_embeddings=1048576, bos_token_id=200000,
            eos_token_id=[200001, 200007, 200008], pad_token_id=200018, multimodal=True,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """A Scout-shaped model small enough for unit tests (4 layers, NoPE at layer 3)."""
        base = dict(
            vocab_size=512, hidden_size=64, intermediate_size=96, intermediate_size_mlp=160,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_local_experts=8, num_experts_per_tok=1, attention_chunk_size=8,
            max_position_embeddings=4096, floor_scale=4, bos_token_id=1, eos_token_id=2,
            rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 1.0, "original_max_position_embeddings": 32},
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def tiny_maverick(cls, **overrides: Any) -> ModelConfig:
        """A Maverick-shaped tiny model: interleaved dense/MoE, no QK-norm, plain RoPE."""
        base = dict(interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None,
                    num_local_experts=16)
        base.update(overrides)
        return cls.tiny(**base)

    @classmethod
    def mini(cls, num_local_experts: int = 16, **overrides: Any) -> ModelConfig:
        """The benchmark configuration: hidden 1024, 4 layers, 8/2 heads of 128, width 1024."""
        base = dict(
            vocab_size=8192, hidden_size=1024, intermediate_size=1024, intermediate_size_mlp=2048,
            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
            num_local_experts=num_local_experts, attention_chunk_size=256,
            max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
        )
        base.update(overrides)
        return cls(**base)


@dataclass(frozen=True)
class VisionConfig:
    """The Llama 4 vision tower's hyper-parameters (HF ``Llama4VisionConfig`` field names) and
    the wrapper's image token ids, as :meth:`ModelConfig.vision` reads them."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    num_channels: int
    pixel_shuffle_ratio: float
    projector_input_dim: int
    projector_output_dim: int
    vision_output_dim: int
    rope_theta: float
    norm_eps: float
    image_token_index: int
    boi_token_index: int
    eoi_token_index: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> int:
        """Patches per side of a tile (image_size // patch_size)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Encoder positions per tile: the patch grid plus the class token."""
        return self.grid ** 2 + 1

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens (``<|patch|>`` placeholders) each tile becomes after pixel shuffle."""
        return int(round(self.grid ** 2 * self.pixel_shuffle_ratio ** 2))

    @property
    def shuffled_grid(self) -> int:
        """Side of the patch grid after pixel shuffle (``grid * ratio``)."""
        return int(round(self.grid * self.pixel_shuffle_ratio))


_VISION_DEFAULTS: dict[str, Any] = dict(  # transformers' Llama4VisionConfig defaults
    hidden_size=768, num_hidden_layers=34, num_attention_heads=16, intermediate_size=5632,
    image_size=448, patch_size=14, num_channels=3, pixel_shuffle_ratio=0.5,
    projector_input_dim=4096, projector_output_dim=4096, vision_output_dim=7680,
    norm_eps=1e-5)


def vision_config(cfg: ModelConfig) -> VisionConfig | None:
    """The vision tower's config of a multimodal ``cfg`` (None for a text-only config or an
    empty ``vision_config``); ConfigError naming the field when the sizes cannot form the
    Llama 4 vision path (patch grid, heads, pixel shuffle, adapter and projector widths)."""
    vc = cfg.extra.get("vision_config") if cfg.multimodal else None
    if not vc:
        return None
    v = {**_VISION_DEFAULTS, **{k: vc[k] for k in _VISION_DEFAULTS if k in vc}}
    for key in _VISION_INTS + ("num_attention_heads",):
        v[key] = _int(f"vision_config.{key}", v[key], 1)
    v["pixel_shuffle_ratio"] = float(_real("vision_config.pixel_shuffle_ratio",
                                           v["pixel_shuffle_ratio"], positive=True, upper=1.0))
    v["norm_eps"] = float(_real("vision_config.norm_eps", v["norm_eps"], positive=True))
    rp = vc.get("rope_parameters") or {}
    if not isinstance(rp, dict):
        raise ConfigError(f"vision_config.rope_parameters must be an object, got {_desc(rp)}")
    theta = float(_real("vision_config.rope_parameters.rope_theta",
                        rp.get("rope_theta", vc.get("rope_theta", 10000.0)), positive=True))
    ids = {}
    for key, default in (("image_token_index", 200092), ("boi_token_index", 200080),
                         ("eoi_token_index", 200081)):
        ids[key] = _int(key, cfg.extra.get(key, default), 0)
    out = VisionConfig(**v, rope_theta=theta, **ids)
    h, heads, g, r = out.hidden_size, out.num_attention_heads, out.grid, out.pixel_shuffle_ratio
    if out.image_size % out.patch_size:
        raise ConfigError(f"vision_config.image_size={out.image_size} is not a multiple of "
                          f"patch_size={out.patch_size}")
    if h % heads or (h // heads) % 4:
        raise ConfigError(f"vision_config.hidden_size={h} must split into "
                          f"num_attention_heads={heads} heads whose size is a multiple of 4 "
                          "(2-D RoPE rotates pairs along x and y)")
    if abs(g * r - round(g * r)) > 1e-9 or abs(h / r ** 2 - round(h / r ** 2)) > 1e-9:
        raise ConfigError(f"vision_config.pixel_shuffle_ratio={r} must divide the {g}x{g} patch "
                          f"grid and hidden_size={h} evenly")
    if round(h / r ** 2) != out.intermediate_size:
        raise ConfigError(f"vision_config.intermediate_size={out.intermediate_size} must equal "
                          f"hidden_size / pixel_shuffle_ratio**2 = {round(h / r ** 2)}: the "
                          "vision adapter's fc1 reads the pixel-shuffled patches")
    if out.projector_output_dim != out.vision_output_dim:
        raise ConfigError(f"vision_config.projector_output_dim={out.projector_output_dim} must "
                          f"equal vision_output_dim={out.vision_output_dim} (the projector reads "
                          "the adapter's output)")
    for key, tok in ids.items():
        if tok >= cfg.vocab_size:
            raise ConfigError(f"{key}={tok} outside vocab_size={cfg.vocab_size}")
    return out


def vision_param_count(vc: dict[str, Any], text_hidden: int) -> int:
    """Parameters of the Llama 4 vision encoder, its adapter and the projector into the text
    model, counted from the ``vision_config`` dict (absent fields take the sizes of the
    released Scout/Maverick tower)."""
    h = vc.get("hidden_size", 1408)
    layers = vc.get("num_hidden_layers", 34)
    inter = vc.get("intermediate_size", 5632)
    patch = vc.get("patch_size", 14)
    channels = vc.get("num_channels", 3)
    image = vc.get("image_size", 336)
    proj_in = vc.get("projector_input_dim", 4096)
    proj_out = vc.get("projector_output_dim", 4096)
    vout = vc.get("vision_output_dim", 4096)
    n_patches = (image // patch) ** 2 + 1
    total = channels * patch * patch * h + h + n_patches * h + 4 * h
    per_layer = 4 * h + 4 * (h * h + h) + (inter * h + inter) + (h * inter + h)
    total += layers * per_layer
    # vision_adapter fc1 takes intermediate_size inputs (HF's quirk: it equals h / ratio^2 on the
    # released towers), fc2 is square at the projector output width.
    total += inter * proj_in + proj_out * proj_out  # vision_adapter.mlp fc1, fc2
    total += text_hidden * vout  # multi_modal_projector.linear_1
    return total


def human_count(n: float) -> str:
    """``108640000000 -> '108.64B'``."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


__all__ = ["ModelConfig", "VisionConfig", "ConfigError", "human_count", "human_bytes",
           "load_strict_json", "vision_config"]
