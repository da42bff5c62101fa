"""Helpers shared by test_config, test_checkpoint, test_inputs and test_cli.

Build checkpoints (random numpy weights through ``Checkpoint.save``, or transformers models
through ``save_pretrained``), damage them in precise ways, and count parameters of transformers
models instantiated on the meta device.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from workbench.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    read_safetensors,
    write_safetensors,
)
from workbench.config import ModelConfig
from workbench.random_weights import random_tensors

# A vision tower small enough to build in milliseconds (the one tests/oracle.py uses).
TINY_VISION: dict[str, Any] = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
    image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
    projector_output_dim=32, pixel_shuffle_ratio=0.5)

# The vision tower of the released Scout / Maverick checkpoints (their config.json).
SCOUT_VISION: dict[str, Any] = dict(
    hidden_size=1408, num_hidden_layers=34, num_attention_heads=16, intermediate_size=5632,
    image_size=336, patch_size=14, vision_output_dim=4096, projector_input_dim=4096,
    projector_output_dim=4096, pixel_shuffle_ratio=0.5)


# ----------------------------------------------------------------------------- building


def save_random(path: Path, cfg: ModelConfig, *, seed: int = 0, std: float | None = None,
                router_std: float | None = None, **save_kw: Any) -> tuple[Path, dict]:
    """Random float32 weights for ``cfg`` written with ``Checkpoint.save``; (dir, tensors)."""
    tensors = random_tensors(cfg, seed=seed, std=std, router_std=router_std)
    return Checkpoint.save(path, tensors, cfg, **save_kw), tensors


def hf_full_config(cfg: ModelConfig, vision: dict[str, Any] | None = None):
    """transformers' Llama4Config (multimodal wrapper) for our text config and a vision dict."""
    from oracle import hf_text_config
    from transformers import Llama4Config, Llama4VisionConfig
    vc = Llama4VisionConfig(**(TINY_VISION if vision is None else vision))
    return Llama4Config(text_config=hf_text_config(cfg).to_dict(), vision_config=vc.to_dict())


def meta_model(cfg: ModelConfig, multimodal: bool = False, vision: dict[str, Any] | None = None):
    """A transformers Llama 4 model on the meta device (shapes only, no memory)."""
    import torch
    import transformers
    from oracle import hf_text_config
    with torch.device("meta"):
        if multimodal:
            return transformers.Llama4ForConditionalGeneration(hf_full_config(cfg, vision))
        return transformers.Llama4ForCausalLM(hf_text_config(cfg))


def numel(model, prefix: str | tuple[str, ...] = "") -> int:
    """Parameters (tied ones once) whose name starts with ``prefix``."""
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    """A transformers model's state dict as float32 numpy, by HF name."""
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- reading


def index_map(ckpt: Path) -> dict[str, str] | None:
    """The index's weight_map (HF name -> shard file name), or None for a single file."""
    f = ckpt / INDEX_FILE
    return json.loads(f.read_text())["weight_map"] if f.exists() else None


def file_of(ckpt: Path, hf_name: str) -> Path:
    """The safetensors file holding ``hf_name``."""
    wm = index_map(ckpt)
    return ckpt / (SINGLE_FILE if wm is None else wm[hf_name])


def raw_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header dict, data start) of a safetensors file, parsed independently of workbench."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n)), 8 + n


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- damaging


def rewrite_file(path: Path, drop: Iterable[str] = (), put: dict[str, np.ndarray] | None = None
                 ) -> None:
    """Rewrite one safetensors file with tensors dropped / added / replaced."""
    tensors, meta = read_safetensors(path)
    tensors = {k: np.array(v) for k, v in tensors.items() if k not in set(drop)}
    tensors.update(put or {})
    write_safetensors(path, tensors, meta)


def write_raw_safetensors(path: Path, header: dict[str, Any], data: bytes) -> None:
    """Write a safetensors file from a hand-made header (any dtype tag) and raw data."""
    raw = json.dumps(header).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_config(ckpt: Path, **changes: Any) -> None:
    """Change text-config fields in a checkpoint's config.json (wrapper-aware)."""
    f = ckpt / "config.json"
    d = json.loads(f.read_text())
    (d["text_config"] if "text_config" in d else d).update(changes)
    f.write_text(json.dumps(d, indent=2))


def raises_with(exc: type[BaseException], fn, *fragments: str) -> str:
    """Call ``fn``; it must raise ``exc`` whose message contains every fragment. The message."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    missing = [f for f in fragments if f not in msg]
    assert not missing, f"message lacks {missing}: {msg}"
    return msg
