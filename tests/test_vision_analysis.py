"""Routing by modality: the analysis, its figures, and the multimodal training's pieces."""

from __future__ import annotations

import numpy as np
import pytest

from workbench.analysis.modality import modality_specialisation, patch_experts
from workbench.hooks import MODALITY_IMAGE, MODALITY_IMAGE_SPECIAL, MODALITY_TEXT
from workbench.trace import Trace


def _trace(separate: bool, seed: int = 0) -> Trace:
    """2 rows of 40 tokens: 16 image patches (one 4x4 tile) framed by specials, then text.
    ``separate``: layer 0 sends image tokens to experts 0-1 and text to 2-7; else random."""
    rng = np.random.default_rng(seed)
    mod = np.full((2, 40), MODALITY_TEXT, np.int32)
    mod[:, 1] = mod[:, 18] = MODALITY_IMAGE_SPECIAL
    mod[:, 2:18] = MODALITY_IMAGE
    idx = rng.integers(0, 8, (2, 40, 1)).astype(np.int32)
    if separate:
        idx[mod == MODALITY_IMAGE, 0] = rng.integers(0, 2, (mod == MODALITY_IMAGE).sum())
        idx[mod == MODALITY_TEXT, 0] = rng.integers(2, 8, (mod == MODALITY_TEXT).sum())
    arrays = {"token_modality": mod, "layers.0.moe.topk_indices": idx}
    return Trace(arrays, np.zeros((2, 40), np.int64),
                 {"config": {"experts": 8}, "image_tokens_per_tile": 16})


def test_separated_routing_scores_high_and_random_routing_scores_chance():
    sep = modality_specialisation(_trace(True), shuffles=50)[0]
    rnd = modality_specialisation(_trace(False), shuffles=50)[0]
    assert sep.image_share[:2].sum() == pytest.approx(1.0)
    assert sep.text_share[:2].sum() == 0.0
    assert sep.js == pytest.approx(1.0) and sep.nmi > 0.5
    assert sep.js > 5 * sep.js_shuffled_p95
    assert rnd.js < 3 * rnd.js_shuffled_p95 and rnd.nmi < 0.2
    np.testing.assert_allclose(sep.image_fraction[:2], 1.0)


def test_patch_experts_grid_and_errors():
    t = _trace(True)
    grid = patch_experts(t, 0, row=1)
    assert grid.shape == (1, 4, 4)
    np.testing.assert_array_equal(grid.ravel(), t["layers.0.moe.topk_indices"][1, 2:18, 0])
    with pytest.raises(ValueError, match="needs both image and text"):
        t2 = Trace({"token_modality": np.zeros((1, 4), np.int32),
                    "layers.0.moe.topk_indices": np.zeros((1, 4, 1), np.int32)},
                   np.zeros((1, 4), np.int64), {"config": {"experts": 8}})
        modality_specialisation(t2)


def test_figures():
    from workbench.plots import modality_specialisation_plot, patch_expert_overlay
    res = modality_specialisation(_trace(True), shuffles=10)
    fig = modality_specialisation_plot(res)
    assert len(fig.axes) >= 2
    fig = patch_expert_overlay(_trace(True), np.ones((112, 112, 3)) * 0.5, [0])
    assert fig.axes[0].get_title() == "layer 0"
    with pytest.raises(ValueError, match="tile 3 out of range"):
        patch_expert_overlay(_trace(True), np.ones((8, 8, 3)), [0], tile=3)


def test_synthetic_captions_describe_their_images():
    from workbench.vision.train import COLOURS, sample
    rng = np.random.default_rng(0)
    for _ in range(20):
        img, cap = sample(rng, 56)
        assert img.shape == (56, 56, 3) and 0 <= img.min() and img.max() <= 1
        colour = next(c for c in COLOURS if c in cap)
        # the named colour is drawn
        assert (np.abs(img - np.array(COLOURS[colour])).sum(-1) < 1e-6).sum() > 20
