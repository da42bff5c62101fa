"""``workbench train --multimodal``: a small Llama 4 vision tower on the bundled text model.

The data is generated: images of coloured shapes (circles, squares, triangles) in a position
or in a counted group, each with its caption ("a red circle at the top left.", "three blue
squares."). The model is the bundled ``data/scout-mini`` text model with the six Llama 4
image tokens added to its vocabulary, plus a fresh vision tower, adapter and projector; all of
it is trained on next-token loss over the caption after the image. A text-only baseline (the
same text model fine-tuned on the captions alone, same steps) measures what the image adds,
and the routing by modality (NMI between top-1 expert and modality, share of image tokens per
expert) is measured before and after training.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig
from .processor import IMAGE_TOKENS, image_prompt

COLOURS = {"red": (0.85, 0.15, 0.15), "green": (0.15, 0.65, 0.2), "blue": (0.15, 0.3, 0.85),
           "yellow": (0.95, 0.8, 0.1), "purple": (0.55, 0.2, 0.7), "orange": (0.95, 0.5, 0.1)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"top left": (0.25, 0.25), "top right": (0.25, 0.75), "bottom left": (0.75, 0.25),
          "bottom right": (0.75, 0.75), "centre": (0.5, 0.5)}
COUNTS = {1: "one", 2: "two", 3: "three", 4: "four"}
VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
              image_size=112, patch_size=14, num_channels=3, pixel_shuffle_ratio=0.5,
              projector_input_dim=128, projector_output_dim=128, vision_output_dim=128,
              norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
              model_type="llama4_vision_model")


def _draw(img: np.ndarray, shape: str, cy: float, cx: float, r: float,
          colour: tuple[float, float, float]) -> None:
    n = img.shape[0]
    y, x = np.mgrid[0:n, 0:n] / n
    if shape == "circle":
        m = (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    elif shape == "square":
        m = (np.abs(y - cy) <= r * 0.85) & (np.abs(x - cx) <= r * 0.85)
    else:
        m = (y >= cy - r) & (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) / 2)
    img[m] = colour


def sample(rng: np.random.Generator, size: int = 112) -> tuple[np.ndarray, str]:
    """One (H, W, 3) float image in [0, 1] and its caption."""
    img = np.full((size, size, 3), 0.96)
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    if rng.random() < 0.5:
        place = list(PLACES)[rng.integers(len(PLACES))]
        cy, cx = PLACES[place]
        _draw(img, shape, cy + rng.normal(0, 0.03), cx + rng.normal(0, 0.03), 0.14,
              COLOURS[colour])
        return img, f"a {colour} {shape} at the {place}." if place != "centre" else \
            f"a {colour} {shape} in the centre."
    n = int(rng.integers(1, 5))
    cells = rng.permutation(9)[:n]
    for c in cells:
        _draw(img, shape, (c // 3 + 0.5) / 3, (c % 3 + 0.5) / 3, 0.11, COLOURS[colour])
    return img, f"{COUNTS[n]} {colour} {shape}{'s' if n > 1 else ''}."


@dataclass
class MultimodalArgs:
    out: Path
    base: Path
    steps: int = 800  # the shipped run: workbench train --multimodal --steps 800
    batch: int = 16
    lr_vision: float = 2e-3
    lr_text: float = 3e-4
    seed: int = 0
    eval_images: int = 128
    train_images: int = 2000
    dtype: str = "bfloat16"
    threads: int = 1  # torch intra-op threads; see train_multimodal
    progress: bool = True


def _tokenizer(base: Path) -> Any:
    from ..tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(base)
    tok.backend.add_special_tokens(list(IMAGE_TOKENS))
    return Tokenizer(tok.backend)


def model_config(base_cfg: ModelConfig, tok: Any) -> ModelConfig:
    """The bundled text config grown by the image tokens, wrapped with ``VISION``."""
    ids = {t: tok.backend.token_to_id(t) for t in IMAGE_TOKENS}
    return base_cfg.replace(vocab_size=tok.vocab_size, multimodal=True, extra={
        "vision_config": dict(VISION), "image_token_index": ids["<|patch|>"],
        "boi_token_index": ids["<|image_start|>"], "eoi_token_index": ids["<|image_end|>"]})


def init_tensors(cfg: ModelConfig, base: dict[str, np.ndarray], seed: int) -> dict:
    """The bundled weights (embedding and head grown by the new tokens) plus a random tower."""
    from ..checkpoint import vision_expected_shapes
    rng = np.random.default_rng(seed)
    out = {n: np.asarray(a, np.float32) for n, a in base.items()}
    for n in ("embed_tokens.weight", "lm_head.weight"):
        a = out[n]
        extra = rng.normal(0, float(a.std()), (cfg.vocab_size - a.shape[0], a.shape[1]))
        out[n] = np.concatenate([a, extra.astype(np.float32)])
    for n, shape in vision_expected_shapes(cfg.vision, cfg.hidden_size).items():
        if n.endswith(("norm_pre.weight", "norm_post.weight", "layernorm.weight")):
            out[n] = np.ones(shape, np.float32)
        elif n.endswith("bias") and len(shape) == 1:
            out[n] = np.zeros(shape, np.float32)
        else:
            fan_in = shape[-1] if len(shape) > 1 else shape[0]
            out[n] = rng.normal(0, fan_in ** -0.5, shape).astype(np.float32)
    return out


class CaptionSet:
    """Rendered images with their captions as token ids (fixed for a seed)."""

    def __init__(self, tok: Any, cfg: ModelConfig, ip: Any, n: int, seed: int):
        rng = np.random.default_rng(seed)
        self.images, self.captions = zip(*(sample(rng, cfg.vision.image_size)
                                           for _ in range(n)))
        self.pixels = np.concatenate([ip(im)["pixel_values"] for im in self.images])
        ids = {t: tok.backend.token_to_id(t) for t in IMAGE_TOKENS}
        self.prefix = [tok.bos_id] + [ids[t] for t in image_prompt(
            (1, 1), cfg.vision.tokens_per_tile)]
        self.text = [tok.encode(" " + c) + [tok.eos_id] for c in self.captions]
        self.pad = tok.pad_id

    def batch(self, which: np.ndarray, with_image: bool = True
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(ids (B, T), loss mask over the targets (B, T-1), pixels or None)."""
        prefix = self.prefix if with_image else self.prefix[:1]
        rows = [prefix + self.text[i] for i in which]
        T = max(map(len, rows))
        ids = np.full((len(rows), T), self.pad, np.int64)
        mask = np.zeros((len(rows), T - 1), bool)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
            mask[b, len(prefix) - 1: len(r) - 1] = True
        return ids, mask, (self.pixels[which] if with_image else None)


def caption_sets(tok: Any, cfg: ModelConfig, a: MultimodalArgs) -> tuple[CaptionSet, CaptionSet]:
    """The training and validation sets of a run (seeds ``a.seed`` and ``a.seed + 1``)."""
    from .processor import ImageProcessor
    ip = ImageProcessor(size=cfg.vision.image_size, max_patches=1)
    return (CaptionSet(tok, cfg, ip, a.train_images, a.seed),
            CaptionSet(tok, cfg, ip, a.eval_images, a.seed + 1))


def caption_logits(model: Any, ids: np.ndarray, mask: np.ndarray,
                   pixel_values: np.ndarray | None) -> Any:
    """Differentiable logits (n, V) predicting the ``mask``-ed targets of ``ids`` (B, T)
    (``mask`` (B, T-1) over the inputs ``ids[:, :-1]``). The forward runs to the final
    residual stream and the final norm and lm_head are applied at those positions only: the
    image prefix has no targets, and the head over the whole vocabulary is the largest
    product of the step."""
    import torch

    from ..forward import Recorder, head_step
    from ..interventions import Plan
    x = ids[:, :-1]
    images = None if pixel_values is None else model.check_images(x, pixel_values)
    plan = Plan()
    rec = Recorder(model.ops, frozenset(), plan)
    _, h = model._run(torch.from_numpy(x).to(model.device), plan, rec,
                      stop_at_layer=model.config.num_hidden_layers, images=images)
    norm, head = model.weights.head()
    rows = h[torch.from_numpy(mask).to(h.device)]
    return head_step(model.ops, model.config, norm, head, rows[None], rec)[0]


def _loss(model: Any, ids: np.ndarray, mask: np.ndarray, px: np.ndarray | None,
          reduction: str = "mean") -> Any:
    import torch
    logits = caption_logits(model, ids, mask, px)
    return torch.nn.functional.cross_entropy(
        logits, torch.from_numpy(ids[:, 1:][mask]).to(logits.device), reduction=reduction)


def caption_loss(model: Any, data: CaptionSet, with_image: bool, bs: int = 32) -> float:
    """Mean next-token loss (nats) over the caption tokens of ``data``."""
    import torch
    tot, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(data.captions), bs):
            ids, mask, px = data.batch(np.arange(s, min(s + bs, len(data.captions))),
                                       with_image)
            tot += float(_loss(model, ids, mask, px, "sum"))
            n += int(mask.sum())
    return tot / n


def routing_by_modality(model: Any, data: CaptionSet, n: int = 64) -> dict[str, Any]:
    """NMI (top-1 expert vs image/text), JS divergence of the image and text expert shares
    (and its shuffled-label chance level), and the image share of each expert's tokens, per
    layer, over the first ``n`` images of ``data`` with their captions (one run per image,
    so no padding is counted)."""
    from ..analysis.modality import modality_specialisation
    traces = []
    for i in range(min(n, len(data.captions))):
        ids, _, px = data.batch(np.array([i]))
        traces.append(model.run(ids, pixel_values=px,
                                capture=["*.moe.topk_indices", "token_modality"]).trace)
    res = modality_specialisation(traces, shuffles=50)
    return {str(r.layer): {"nmi": round(r.nmi, 4), "js_bits": round(r.js, 4),
                           "js_shuffled_bits": round(r.js_shuffled, 4),
                           "image_share": [round(float(v), 3) for v in r.image_share],
                           "text_share": [round(float(v), 3) for v in r.text_share],
                           "image_fraction_per_expert": [round(float(v), 3)
                                                         for v in r.image_fraction]}
            for r in res}


def _fit(model: Any, data: CaptionSet, a: MultimodalArgs, with_image: bool,
         log: list[dict]) -> None:
    import torch

    from ..train import _progress
    params = model.params.as_dict()
    for t in params.values():
        t.requires_grad_(True)
    vis = [t for n, t in params.items() if n.startswith(("vision_model.", "multi_modal"))]
    txt = [t for n, t in params.items() if not n.startswith(("vision_model.", "multi_modal"))]
    groups = [{"params": txt, "lr": a.lr_text}]
    if vis and with_image:
        groups.append({"params": vis, "lr": a.lr_vision})
    # fused: one kernel per step over all parameters instead of a handful per tensor
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    base = [g["lr"] for g in opt.param_groups]
    rng = np.random.default_rng(a.seed + 7)
    t0 = time.time()
    bar = _progress(a.steps, a.progress)
    bar.set_description("image + caption" if with_image else "caption only")
    for step in range(a.steps):
        frac = min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step
                                                                         / a.steps)))
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * frac
        ids, mask, px = data.batch(rng.integers(0, len(data.captions), a.batch), with_image)
        loss = _loss(model, ids, mask, px)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if step % 25 == 0 or step + 1 == a.steps:
            log.append({"step": step + 1, "caption_loss": round(float(loss.detach()), 4),
                        "elapsed_s": round(time.time() - t0, 1)})
    bar.close()
    for t in params.values():
        t.requires_grad_(False)


def train_multimodal(a: MultimodalArgs) -> dict[str, Any]:
    """Train, measure and write the multimodal model to ``a.out``; returns the results.

    Runs with ``a.threads`` torch intra-op threads (restored afterwards). One thread is the
    default: a step's products are small (a few hundred tokens, width 256), so splitting them
    gains little, while OpenMP threads that wait on each other on a busy CPU cost several
    times the step itself.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        return _train_multimodal(a)
    finally:
        torch.set_num_threads(before)


def _train_multimodal(a: MultimodalArgs) -> dict[str, Any]:
    import torch

    from ..checkpoint import Checkpoint
    from ..torch.model import TorchModel
    from ..torch.model import load as load_torch

    torch.manual_seed(a.seed)
    base = Checkpoint.open(a.base)
    tok = _tokenizer(a.base)
    cfg = model_config(base.config, tok)
    train, val = caption_sets(tok, cfg, a)
    tensors = init_tensors(cfg, base.model_tensors(), a.seed)
    base.close()
    t0 = time.time()
    model = TorchModel(cfg, {n: t.copy() for n, t in tensors.items()}, "float32")
    results: dict[str, Any] = {"untrained": {
        "caption_loss_with_image": round(caption_loss(model, val, True), 4),
        "caption_loss_without_image": round(caption_loss(model, val, False), 4)}}
    untrained = routing_by_modality(model, val)
    log_mm: list[dict] = []
    _fit(model, train, a, True, log_mm)
    out = Path(a.out)
    Checkpoint.save(out, model.state_dict_numpy(), cfg, dtype=a.dtype, multimodal=True)
    tok.save(out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "size": {"height": cfg.vision.image_size, "width": cfg.vision.image_size},
        "max_patches": 1, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, indent=1) + "\n")
    del model
    shipped = load_torch(out)  # measured as shipped (in --dtype), not as trained
    results["multimodal"] = {
        "caption_loss_with_image": round(caption_loss(shipped, val, True), 4),
        "caption_loss_without_image": round(caption_loss(shipped, val, False), 4)}
    text_model = TorchModel(cfg, {n: t.copy() for n, t in tensors.items()}, "float32")
    log_txt: list[dict] = []
    _fit(text_model, train, a, False, log_txt)
    results["text_only_baseline"] = {"caption_loss": round(caption_loss(text_model, val,
                                                                        False), 4)}
    results["routing_by_modality"] = {"untrained": untrained,
                                      "trained": routing_by_modality(shipped, val)}
    results["args"] = {k: (Path(v).name if k == "base" else v) for k, v in a.__dict__.items()
                       if k != "out"}
    results["elapsed_s"] = round(time.time() - t0, 1)
    results["log"] = {"multimodal": log_mm, "text_only": log_txt}
    (out / "training_results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results
