"""Build Llama 4 checkpoints with transformers (the numerical oracle) for the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.config import ModelConfig

# Named oracle cases: keyword overrides on top of ModelConfig.tiny (Scout-shaped, 4 layers).
CASES: dict[str, dict[str, Any]] = {
    "scout": {},
    "maverick": dict(interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None,
                     num_local_experts=16),
    "top2": dict(num_experts_per_tok=2),
    "long_temp": dict(attention_chunk_size=5, floor_scale=3, num_hidden_layers=8),
}


def hf_text_config(cfg: ModelConfig):
    from transformers import Llama4TextConfig
    d = cfg.to_text_dict()
    d.pop("model_type", None)
    return Llama4TextConfig(**d)


def build_hf(cfg: ModelConfig, seed: int = 0, multimodal: bool = False,
             attn: str = "eager"):
    """A transformers Llama 4 model with random weights large enough to route non-trivially."""
    import transformers
    torch.manual_seed(seed)
    tc = hf_text_config(cfg)
    if multimodal:
        from transformers import Llama4Config, Llama4VisionConfig
        vc = Llama4VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=128, image_size=28, patch_size=14,
                                vision_output_dim=32, projector_input_dim=32,
                                projector_output_dim=32, pixel_shuffle_ratio=0.5)
        full = Llama4Config(text_config=tc.to_dict(), vision_config=vc.to_dict())
        full._attn_implementation = attn
        model = transformers.Llama4ForConditionalGeneration(full)
    else:
        tc._attn_implementation = attn
        model = transformers.Llama4ForCausalLM(tc)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "norm" in name and prm.ndim == 1:
                prm.copy_(1.0 + 0.1 * torch.randn_like(prm))
            elif "router" in name:
                prm.normal_(0, 0.5)
            else:
                prm.normal_(0, 0.08)
    return model.eval()


def save_hf(model, path: Path, shard: str = "200KB") -> Path:
    model.save_pretrained(path, max_shard_size=shard, safe_serialization=True)
    return path


def lm(model):
    """The causal LM inside (transformers 5.x: the wrapper's forward raises on text input)."""
    return getattr(model, "language_model", model)


@torch.no_grad()
def hf_run(model, ids: np.ndarray):
    """Logits, per-layer router logits (B,S,E) and attention patterns from transformers."""
    inner = lm(model)
    # router logits from the routers themselves: outputs that carry them differ by version
    # (5.17's CausalLMOutputWithPast has no router_logits); a router returns the logits alone
    # or (scores, logits)
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_hook(
        lambda _m, _i, out: seen.append(out[1] if isinstance(out, tuple) else out))
        for n, m in inner.named_modules() if n.endswith("feed_forward.router")]
    try:
        out = inner(torch.from_numpy(ids), output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    B, S = ids.shape
    routers = [r.view(B, S, -1).float().numpy() for r in seen]
    attns = [a.float().numpy() for a in out.attentions]
    return out.logits.float().numpy(), routers, attns


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|: the relative error that the parity tolerances bound."""
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def make_case(name: str, directory: Path):
    """One named oracle case: (config, transformers model, sharded checkpoint path, batch-2 ids).

    Sequences are longer than the chunk (5 or 8) and than floor_scale (3 or 4), so chunked
    masks and temperature tuning are both exercised.
    """
    cfg = ModelConfig.tiny(**CASES[name])
    hf = build_hf(cfg, seed=1)
    path = save_hf(hf, directory)
    seq = 23 if name != "long_temp" else 31
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, seq))
    return cfg, hf, path, ids
