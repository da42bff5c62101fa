"""Plain-text descriptions of a model: what ``workbench inspect`` prints.

Used by the command line, the demo and the notebooks; it needs no backend (numpy only).
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import Checkpoint, format_nonfinite
from .config import ModelConfig, human_bytes, human_count

PRESETS = {"scout": ModelConfig.scout, "maverick": ModelConfig.maverick}

# `inspect` reads every weight to count NaN/Inf up to this many bytes unless told otherwise.
CHECK_VALUES_UP_TO = 8 * 1024**3


def inspect_text(target: str, check_values: bool | None = None) -> str:
    """The `workbench inspect` report for a checkpoint directory, a config.json or a preset.

    ``check_values``: read every weight and report each tensor holding NaN or Inf with its
    counts; None (default) does so for checkpoints up to 8 GiB and says so otherwise.
    """
    lines: list[str] = []
    ck = None
    if target in PRESETS:
        cfg = PRESETS[target]()
        lines.append(f"preset: {target} (no weights; counts from the config)")
    else:
        p = Path(target)
        cfg = ModelConfig.from_pretrained(p)
        has_weights = p.is_dir() and any(p.glob("*.safetensors"))
        if has_weights:
            ck = Checkpoint.open(p)
        lines.append(f"checkpoint: {p}" + ("" if has_weights else " (config only)"))
    kind = "Llama4ForConditionalGeneration (multimodal wrapper)" if cfg.multimodal \
        else "Llama4ForCausalLM (text only)"
    lines.append(f"architecture: {kind}")
    lines.append(
        f"layers {cfg.num_hidden_layers}, hidden {cfg.hidden_size}, heads "
        f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} kv x {cfg.head_dim}, vocab "
        f"{cfg.vocab_size}")
    lines.append(
        f"experts {cfg.num_local_experts} (top-{cfg.num_experts_per_tok}) + shared, expert "
        f"width {cfg.intermediate_size}, dense width {cfg.intermediate_size_mlp}")
    rope = cfg.rope_type + (f" factor {cfg.rope_scaling['factor']}" if cfg.rope_scaling else "")
    lines.append(
        f"rope theta {cfg.rope_theta:g} ({rope}), chunk {cfg.attention_chunk_size}, qk-norm "
        f"{cfg.use_qk_norm}, temperature tuning {cfg.attn_temperature_tuning} (floor "
        f"{cfg.floor_scale}, scale {cfg.attn_scale}), max positions "
        f"{cfg.max_position_embeddings}")
    pc = cfg.param_counts()
    lines.append(f"parameters: language model {human_count(pc['total'])} total, "
                 f"{human_count(pc['active'])} active per token "
                 f"(experts {human_count(pc['experts'])})")
    if "vision" in pc:
        lines.append(f"            with vision encoder + projector: "
                     f"{human_count(pc['total_with_vision'])} total "
                     f"(vision {human_count(pc['vision'])})")
    if ck is not None:
        by = ck.bytes_by_dtype()
        lines.append(f"tensors: {len(ck)} in {len(ck.files())} file(s), "
                     f"{human_bytes(ck.nbytes)}; by dtype: "
                     + ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(by.items())))
        if ck.quant is not None:
            q = ck.quantized_names()
            layers = sorted({int(n.split(".")[1]) for n in q if n.startswith("layers.")})
            experts = sum(".experts." in n for n in q)
            lines.append(f"quantisation: {ck.quant.describe()}")
            lines.append(f"  FP8 tensors: {len(q)} ({experts} routed-expert tensors"
                         + (f" of layers {layers[0]}..{layers[-1]}" if layers else "")
                         + f", {len(q) - experts} others); kept unquantised by ignore: "
                         + ", ".join(ck.quant.ignore[:8])
                         + (" ..." if len(ck.quant.ignore) > 8 else ""))
            fp8 = by.get("F8_E4M3", 0)
            lines.append(f"  FP8 bytes {human_bytes(fp8)} of {human_bytes(ck.nbytes)} "
                         f"({fp8 / max(1, ck.nbytes):.0%})")
        if ck.ignored:
            lines.append(f"ignored (vision/projector): {len(ck.ignored)} tensors")
        if check_values or (check_values is None and ck.nbytes <= CHECK_VALUES_UP_TO):
            bad = ck.nonfinite()
            if bad:
                lines.append(f"values: NaN/Inf in {len(bad)} of {len(ck)} tensors: "
                             + format_nonfinite(ck, bad, limit=len(bad)))
            else:
                lines.append(f"values: all {len(ck)} tensors finite (no NaN or Inf)")
        else:
            lines.append(f"values: not checked ({human_bytes(ck.nbytes)}; "
                         "Checkpoint.open(path, check_values=True) reads them all)")
    lines.append("layer map:")
    for i, desc in enumerate(cfg.layer_map()):
        lines.append(f"  {i:3d}  {desc}")
    return "\n".join(lines)
