"""Images and prompts for the vision path, as transformers' Llama 4 processor prepares them.

``ImageProcessor`` follows ``Llama4ImageProcessor``: choose the canvas of up to ``max_patches``
tiles that needs the least resizing (never upscaling beyond one tile unless the image is
smaller), resize without distortion (bilinear), pad right/bottom with zeros, rescale by 1/255
and normalise with mean = std = 0.5 (rounded through bfloat16, as the original does), split
into ``size`` x ``size`` tiles and, when there is more than one, append the whole image resized
to one tile (the global tile). PIL or numpy images; no torchvision.

``Processor`` expands each ``<|image|>`` in the text as ``Llama4Processor`` does:
``<|image_start|>``, per tile row the tiles' ``<|patch|>`` runs separated by
``<|tile_x_separator|>`` and ended by ``<|tile_y_separator|>``, then ``<|image|>`` and the
global tile's patches, then ``<|image_end|>`` (a single tile gets only the last part).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ..config import ModelConfig, VisionConfig
from .forward import VisionError

IMAGE_TOKENS = ("<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
                "<|tile_x_separator|>", "<|tile_y_separator|>")


def supported_resolutions(max_tiles: int, size: int) -> list[tuple[int, int]]:
    """Canvases (height, width) of at most ``max_tiles`` tiles of ``size``, in transformers'
    order (grouped by aspect ratio)."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for n in range(max_tiles, 0, -1):
        for f in sorted({i for i in range(1, n + 1) if n % i == 0}):
            by_ratio[f / (n // f)].append((f, n // f))
    return [(h * size, w * size) for v in by_ratio.values() for h, w in v]


def best_fit(image_hw: tuple[int, int], canvases: list[tuple[int, int]]) -> tuple[int, int]:
    """The canvas needing the smallest upscale (else the smallest downscale); ties go to the
    smallest area, as ``get_best_fit``."""
    h, w = image_hw
    res = np.array(canvases, dtype=np.float64)
    scales = np.minimum(res[:, 1] / w, res[:, 0] / h)
    up = scales[scales >= 1]
    chosen = up.min() if len(up) else scales[scales < 1].max()
    cand = res[scales == chosen]
    best = cand[np.argmin(cand[:, 0] * cand[:, 1])]
    return int(best[0]), int(best[1])


def fit_without_distortion(image_hw: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The largest (height, width) inside ``target`` with the image's aspect ratio."""
    h, w = image_hw
    th, tw = target
    sw, sh = tw / w, th / h
    if sw < sh:
        return max(min(math.floor(h * sw), th), 1), max(tw, 1)
    return max(th, 1), max(min(math.floor(w * sh), tw), 1)


def _as_hwc_uint8(image: Any) -> np.ndarray:
    """A PIL image or an (H, W[, C]) array as (H, W, 3) uint8 RGB; VisionError otherwise."""
    if hasattr(image, "convert") and hasattr(image, "size"):
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or min(a.shape[:2]) < 1:
        raise VisionError(f"an image must be a PIL image or an (H, W), (H, W, 3) or (H, W, 4) "
                          f"array, got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    a = a[..., :3]
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise VisionError("a float image must hold values in [0, 1]")
        a = np.round(a * 255)
    elif a.dtype.kind not in "ui":
        raise VisionError(f"an image must hold numbers, got dtype {a.dtype}")
    return np.clip(a, 0, 255).astype(np.uint8)


def _resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image
    if img.shape[:2] == hw:
        return img
    return np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), Image.BILINEAR))


class ImageProcessor:
    """``Llama4ImageProcessor`` in numpy + PIL: ``processor(images)`` returns
    ``{"pixel_values": (tiles, 3, size, size) float32, "aspect_ratios": (n_images, 2)}``."""

    def __init__(self, size: int = 336, max_patches: int = 16, image_mean: float = 0.5,
                 image_std: float = 0.5):
        if size < 1 or max_patches < 1:
            raise VisionError(f"size={size} and max_patches={max_patches} must be positive")
        self.size = int(size)
        self.max_patches = int(max_patches)
        self.mean = float(image_mean)
        self.std = float(image_std)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ImageProcessor:
        """From a checkpoint directory: ``preprocessor_config.json`` when present, else the
        tile size of ``config.json``'s vision_config."""
        p = Path(path)
        pre = p / "preprocessor_config.json"
        if pre.is_file():
            raw = json.loads(pre.read_text())
            size = raw.get("size", {}).get("height", 336)
            mean = raw.get("image_mean", [0.5])[0]
            std = raw.get("image_std", [0.5])[0]
            return cls(size, raw.get("max_patches", 16), mean, std)
        vc = ModelConfig.from_pretrained(p).vision
        if vc is None:
            raise VisionError(f"{p}: no preprocessor_config.json and no vision_config: not a "
                              "multimodal checkpoint")
        return cls(vc.image_size)

    def _normalise(self, img: np.ndarray) -> np.ndarray:
        bf16 = np.dtype(ml_dtypes.bfloat16)
        x = (img.astype(bf16).astype(np.float32) * np.float32(1 / 255)).astype(bf16)
        x = ((x.astype(np.float32) - self.mean) / self.std).astype(bf16)
        return x.astype(np.float32).transpose(2, 0, 1)

    def tiles(self, image: Any) -> tuple[np.ndarray, tuple[int, int]]:
        """One image's tiles (n, 3, size, size) and its (rows, columns) of tiles."""
        img = _as_hwc_uint8(image)
        s = self.size
        hw = img.shape[:2]
        target = best_fit(hw, supported_resolutions(self.max_patches, s))
        capped = (min(max(hw[0], s), target[0]), min(max(hw[1], s), target[1]))
        resized = _resize(img, fit_without_distortion(hw, capped))
        canvas = np.zeros((*target, 3), np.uint8)
        canvas[: resized.shape[0], : resized.shape[1]] = resized
        x = self._normalise(canvas)
        rows, cols = target[0] // s, target[1] // s
        tiles = x.reshape(3, rows, s, cols, s).transpose(1, 3, 0, 2, 4).reshape(-1, 3, s, s)
        if rows * cols > 1:
            tiles = np.concatenate([tiles, self._normalise(_resize(img, (s, s)))[None]])
        return tiles, (rows, cols)

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        if not isinstance(images, list | tuple):
            images = [images]
        if not images:
            raise VisionError("no images given")
        out = [self.tiles(im) for im in images]
        return {"pixel_values": np.concatenate([t for t, _ in out]).astype(np.float32),
                "aspect_ratios": np.array([r for _, r in out], np.int64)}


def image_prompt(aspect: tuple[int, int], per_tile: int) -> list[str]:
    """The token strings one image becomes (``Llama4Processor._prompt_split_image``)."""
    rows, cols = aspect
    out = ["<|image_start|>"]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                out += ["<|patch|>"] * per_tile
                if x < cols - 1:
                    out.append("<|tile_x_separator|>")
            out.append("<|tile_y_separator|>")
    out += ["<|image|>"] + ["<|patch|>"] * per_tile + ["<|image_end|>"]
    return out


class Processor:
    """Text with ``<|image|>`` markers plus images -> (input_ids (1, T), pixel_values).

    ``tokenizer`` is a ``wb.Tokenizer`` (or anything with ``encode`` and ``token_to_id``)
    whose vocabulary holds the image tokens; ``config`` the model's (its vision_config gives
    the placeholder count per tile).
    """

    def __init__(self, tokenizer: Any, image_processor: ImageProcessor, config: ModelConfig):
        vc = config.vision
        if vc is None:
            raise VisionError("the config has no vision_config: not a multimodal model")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.vision: VisionConfig = vc
        backend = getattr(tokenizer, "backend", tokenizer)
        self.ids = {}
        for t in IMAGE_TOKENS:
            i = backend.token_to_id(t)
            if i is None:
                raise VisionError(f"the tokenizer has no {t!r} token; a multimodal tokenizer "
                                  f"holds all of {', '.join(IMAGE_TOKENS)}")
            self.ids[t] = int(i)
        if self.ids["<|patch|>"] != vc.image_token_index:
            raise VisionError(f"the tokenizer's <|patch|> is id {self.ids['<|patch|>']} but the "
                              f"config's image_token_index is {vc.image_token_index}")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Processor:
        from ..tokenizer import Tokenizer
        return cls(Tokenizer.from_pretrained(path), ImageProcessor.from_pretrained(path),
                   ModelConfig.from_pretrained(path))

    def __call__(self, text: str, images: Any = None,
                 bos: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        images = [] if images is None else images if isinstance(images, list | tuple) \
            else [images]
        parts = text.split("<|image|>")
        if len(parts) - 1 != len(images):
            raise VisionError(f"the text holds {len(parts) - 1} <|image|> marker(s) but "
                              f"{len(images)} image(s) were given")
        processed = self.image_processor(images) if images else None
        backend = getattr(self.tokenizer, "backend", self.tokenizer)
        ids: list[int] = []
        if bos and getattr(self.tokenizer, "bos_id", None) is not None:
            ids.append(int(self.tokenizer.bos_id))
        for k, part in enumerate(parts):
            if part:
                ids += list(backend.encode(part, add_special_tokens=False).ids)
            if k < len(images):
                aspect = tuple(int(v) for v in processed["aspect_ratios"][k])
                ids += [self.ids[t] for t in image_prompt(aspect, self.vision.tokens_per_tile)]
        pv = None if processed is None else processed["pixel_values"]
        return np.array([ids], np.int64), pv
