"""ModelConfig: every Llama4TextConfig field, read from an HF ``config.json``.

Shared by both backends. Reads the text-only form (``Llama4ForCausalLM``, model_type
``llama4_text``) and the multimodal wrapper (``Llama4ForConditionalGeneration``, ``text_config``),
including the legacy forms (``rope_theta``/``rope_scaling`` instead of ``rope_parameters``;
``attn_temperature_tuning`` stored as an int).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that is missing, malformed or self-contradictory."""


_ROPE_TYPES = ("default", "llama3")


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
        for name in ("num_hidden_layers", "no_rope_layer_interval", "interleave_moe_layer_step",
                     "num_attention_heads", "hidden_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.attention_bias:
            raise ConfigError("attention_bias=true: Llama 4 has no attention biases and the "
                              "workbench does not model them")
        if self.head_dim is None:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"head_dim is not set and hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if isinstance(self.attn_temperature_tuning, int | float):
            # Legacy checkpoints store e.g. 4 here; HF 5.x wants a bool. Non-zero means on.
            self.attn_temperature_tuning = bool(self.attn_temperature_tuning)
        L = self.num_hidden_layers
        if not self.no_rope_layers:
            self.no_rope_layers = [
                int((i + 1) % self.no_rope_layer_interval != 0) for i in range(L)
            ]
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            if step < 1:
                raise ConfigError(f"interleave_moe_layer_step must be >= 1, got {step}")
            self.moe_layers = list(range(step - 1, L, step))
        if self.layer_types is None:
            self.layer_types = [
                "chunked_attention"
                if use_rope and self.attention_chunk_size is not None
                else "full_attention"
                for use_rope in self.no_rope_layers
            ]
        self.moe_layers = [int(i) for i in self.moe_layers]
        self.no_rope_layers = [int(i) for i in self.no_rope_layers]
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError naming the field when the config contradicts itself."""
        L, H, K = self.num_hidden_layers, self.num_attention_heads, self.num_key_value_heads
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
            "num_experts_per_tok", "max_position_embeddings", "no_rope_layer_interval",
        )
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
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
        if self.attention_chunk_size is not None and self.attention_chunk_size <= 0:
            raise ConfigError(f"attention_chunk_size must be positive or null, got "
                              f"{self.attention_chunk_size}")
        if self.floor_scale <= 0:
            raise ConfigError(f"floor_scale must be positive, got {self.floor_scale}")
        bad = [i for i in self.moe_layers if not 0 <= i < L]
        if bad:
            raise ConfigError(f"moe_layers {bad} out of range for num_hidden_layers={L}")
        if self.moe_layers and len(self.moe_layers) < L and self.intermediate_size_mlp <= 0:
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
            if rtype not in _ROPE_TYPES:
                raise ConfigError(f"unknown rope type {rtype!r} in rope_parameters/rope_scaling; "
                                  f"supported: "
                                  f"{', '.join(_ROPE_TYPES)}")
            if rtype == "llama3":
                for key in ("factor", "low_freq_factor", "high_freq_factor",
                            "original_max_position_embeddings"):
                    if key not in rs:
                        raise ConfigError(f"llama3 rope_scaling lacks {key!r}")
                if rs["factor"] <= 0 or rs["low_freq_factor"] <= 0 or rs["high_freq_factor"] <= 0:
                    raise ConfigError(f"llama3 rope_scaling factors must be positive: {rs}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
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
        if isinstance(rp, dict):
            kwargs["rope_theta"] = float(rp.get("rope_theta", kwargs.get("rope_theta", 500000.0)))
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
        try:
            raw = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{f}: not valid JSON ({e})") from None
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


__all__ = ["ModelConfig", "ConfigError", "human_count", "human_bytes"]
