"""``workbench train --multimodal``: its loss, the expert kernel's gradients it relies on, its
argument checks, a quick end-to-end run, and images on disk-offloaded models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_ckpt import TINY_VISION

import workbench as wb
from workbench.checkpoint import Checkpoint
from workbench.cli import main
from workbench.config import ModelConfig
from workbench.random_weights import random_tensors
from workbench.torch.model import TorchModel
from workbench.torch.moe import expert_matmul
from workbench.vision.train import caption_logits, init_tensors

REPO = Path(__file__).resolve().parent.parent
BOI, EOI, PATCH = 500, 501, 502
CFG = ModelConfig.tiny(multimodal=True, extra={
    "vision_config": dict(TINY_VISION), "image_token_index": PATCH, "boi_token_index": BOI,
    "eoi_token_index": EOI})


def tiny_vlm_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """The tiny text model's random weights plus a random tower (as the trainer starts)."""
    text = random_tensors(ModelConfig.tiny(), seed)
    return init_tensors(CFG, text, seed)


def prompt(rng: np.random.Generator, caption: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Two rows of bos, one tile's image tokens, a caption; pixel values for two tiles."""
    per_tile = CFG.vision.tokens_per_tile
    rows = [[1, BOI] + [PATCH] * per_tile + [EOI] + list(rng.integers(3, 400, caption))
            for _ in range(2)]
    px = rng.normal(0, 1, (2, 3, TINY_VISION["image_size"], TINY_VISION["image_size"]))
    return np.array(rows, np.int64), px.astype(np.float32)


def test_expert_matmul_gradients_match_a_per_row_reference():
    """The grouped expert product under autograd (the training path) against each row times
    its own expert's matrix; experts with no rows get zero gradient."""
    g = torch.Generator().manual_seed(0)
    counts_list = [3, 0, 5, 1, 0, 2]
    experts = np.repeat(np.arange(6), counts_list)
    x = torch.randn(len(experts), 8, generator=g, requires_grad=True)
    w = torch.randn(6, 8, 4, generator=g, requires_grad=True)
    y = expert_matmul(x, w, torch.tensor(counts_list), counts_list)
    up = torch.randn(y.shape, generator=g)
    gx, gw = torch.autograd.grad((y * up).sum(), (x, w))
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.stack([xr[j] @ wr[e] for j, e in enumerate(experts)])
    rx, rw = torch.autograd.grad((ref * up).sum(), (xr, wr))
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    assert float(gw[1].abs().sum()) == 0 and float(gw[4].abs().sum()) == 0


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
def test_caption_logits_are_the_full_forwards_at_the_caption(with_image):
    """The trainer's head-at-the-targets-only logits equal the full forward's there, and
    carry gradients to the tower."""
    model = TorchModel(CFG, tiny_vlm_tensors(), "float32")
    ids, px = prompt(np.random.default_rng(1))
    if not with_image:
        ids = ids[:, ~np.isin(ids[0], [BOI, EOI, PATCH])]
    mask = np.zeros((2, ids.shape[1] - 1), bool)
    mask[:, -5:] = True
    mask[1, -1] = False  # rows may end earlier (padding)
    pixels = px if with_image else None
    images = None if pixels is None else model.check_images(ids[:, :-1], pixels)
    with torch.no_grad():
        full, _ = model.forward_train(torch.from_numpy(ids[:, :-1]), images=images)
        got = caption_logits(model, ids, mask, pixels)
    assert got.shape == (int(mask.sum()), CFG.vocab_size)
    torch.testing.assert_close(got, full[torch.from_numpy(mask)], rtol=1e-5, atol=1e-5)
    if with_image:
        tower = model.params.as_dict()["vision_model.patch_embedding.linear.weight"]
        tower.requires_grad_(True)
        caption_logits(model, ids, mask, pixels).logsumexp(-1).sum().backward()
        assert tower.grad is not None and float(tower.grad.abs().sum()) > 0
        tower.requires_grad_(False)


BAD_MULTIMODAL = {
    "bundled_out": (["--out", str(REPO / "data" / "scout-mini"), "--overwrite"], "bundled"),
    "zero_steps": (["--steps", "0"], "--steps"),
    "zero_batch": (["--batch", "0"], "--batch"),
    "zero_threads": (["--threads", "0"], "--threads"),
    "negative_seed": (["--seed", "-1"], "--seed"),
}


@pytest.mark.parametrize("case", sorted(BAD_MULTIMODAL))
def test_multimodal_training_refuses_bad_arguments_before_writing(tmp_path, capsys, case):
    extra, fragment = BAD_MULTIMODAL[case]
    out = ["--out", str(tmp_path / "m")] if "--out" not in extra else []
    assert main(["train", "--multimodal", *out, *extra]) == 2
    assert fragment in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_multimodal_training_refuses_a_non_empty_out(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "README.md").write_text("mine")
    assert main(["train", "--multimodal", "--quick", "--out", str(tmp_path / "m")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert (tmp_path / "m" / "README.md").read_text() == "mine"


@pytest.mark.slow
def test_quick_multimodal_run_writes_a_model_that_runs_images(tmp_path, capsys):
    out = tmp_path / "vision"
    out.mkdir()
    (out / "README.md").write_text("card")
    threads = torch.get_num_threads()
    assert main(["train", "--multimodal", "--quick", "--out", str(out), "--overwrite"]) == 0
    assert "caption loss" in capsys.readouterr().out
    assert torch.get_num_threads() == threads, "the run must restore the thread setting"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json",
        "tokenizer.json", "training_results.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision"], "no staging dir left"
    res = json.loads((out / "training_results.json").read_text())
    assert res["args"]["steps"] == 20 and res["args"]["threads"] == 1
    assert res["multimodal"]["caption_loss_with_image"] < \
        res["untrained"]["caption_loss_with_image"]
    assert set(res["routing_by_modality"]["trained"]) == {"0", "1", "2", "3"}
    model = wb.load(out)
    ids, px = wb.Processor.from_pretrained(out)("<|image|> a red", [np.zeros((40, 60, 3))])
    run = model.run(ids, pixel_values=px, capture="token_modality")
    assert np.isfinite(run.logits).all() and (run.trace["token_modality"] == 1).sum() == 16


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_images_run_on_disk_offloaded_models(tmp_path, backend):
    """``offload="disk"`` streams the text layers and keeps the tower: the same logits and
    vision hooks as the resident torch model, with pixel values, in both backends (jax within
    the torch/jax bound)."""
    if backend == "jax":
        pytest.importorskip("jax")
    Checkpoint.save(tmp_path, tiny_vlm_tensors(3), CFG, multimodal=True)
    ids, px = prompt(np.random.default_rng(2))
    ids, px = ids[:1], px[:1]
    cap = ["vision.projected", "vision.layers.0.resid_post", "*.moe.topk_indices"]
    resident = wb.load(tmp_path, backend="torch").run(ids, pixel_values=px, capture=cap)
    streamed_model = wb.load(tmp_path, backend=backend, offload="disk")
    assert streamed_model.offload == "disk"
    streamed = streamed_model.run(ids, pixel_values=px, capture=cap)
    tol = 1e-6 if backend == "torch" else 2e-4
    for name in resident.trace:
        np.testing.assert_allclose(streamed.trace[name], resident.trace[name], rtol=tol,
                                   atol=tol * float(np.abs(resident.trace[name]).max()),
                                   err_msg=name)
    scale = float(np.abs(resident.logits).max())
    np.testing.assert_allclose(streamed.logits, resident.logits, rtol=tol, atol=tol * scale)
    with pytest.raises(wb.InputError, match="placeholder"):
        streamed_model.run(ids, pixel_values=np.concatenate([px, px]))


def test_image_runs_follow_the_thread_choice(monkeypatch):
    """With images the tower's positions count towards the small-call rule, and an explicit
    ``threads`` is kept (it used to be ignored whenever pixel values were given)."""
    from workbench.torch.model import SMALL_CALL_TOKENS
    model = TorchModel(CFG, tiny_vlm_tensors(), "float32")
    seen = []
    inner = model._forward_inner

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return inner(*a, **k)

    monkeypatch.setattr(model, "_forward_inner", spy)
    ids, px = prompt(np.random.default_rng(4))
    before = torch.get_num_threads()
    tower = CFG.vision.grid ** 2 + 1
    assert ids.shape[1] + tower < SMALL_CALL_TOKENS  # small: one thread
    model.run(ids[:1], pixel_values=px[:1])
    model.threads = 3
    model.run(ids[:1], pixel_values=px[:1])
    assert seen == [1, 3] and torch.get_num_threads() == before
