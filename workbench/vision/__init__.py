"""Llama 4's early-fusion vision path: the tower, adapter and projector (``forward``), the
image processor and prompt expansion (``processor``), for both backends."""

from .forward import VisionError, token_modality

__all__ = ["VisionError", "token_modality"]
