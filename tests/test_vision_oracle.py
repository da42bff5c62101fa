"""The vision path against transformers' Llama4ForConditionalGeneration, in both backends.

A small random vision + text model is saved with ``save_pretrained``; its image path is run
through transformers' own submodules (``vision_model`` -> ``multi_modal_projector`` ->
``masked_scatter`` -> ``language_model``, since the 5.x wrapper's forward raises), and
compared to each backend's ``run(ids, pixel_values=...)`` and to each other.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import hf_text_config, rel

import workbench as wb
from workbench.config import ModelConfig
from workbench.hooks import MODALITY_IMAGE, MODALITY_IMAGE_SPECIAL, MODALITY_TEXT

TOL = 2e-4
IMAGE, BOI, EOI, SEP = 500, 498, 499, 497  # token ids inside the tiny vocabulary
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
              image_size=56, patch_size=14, vision_output_dim=48, projector_input_dim=48,
              projector_output_dim=48, pixel_shuffle_ratio=0.5,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
TILES = 3
PER_TILE = 4  # (56 / 14)^2 patches, pixel-shuffled by 0.5 in each direction


def build_vlm(seed: int = 0):
    import transformers
    from transformers import Llama4Config, Llama4VisionConfig
    torch.manual_seed(seed)
    cfg = ModelConfig.tiny()
    full = Llama4Config(text_config=hf_text_config(cfg).to_dict(),
                        vision_config=Llama4VisionConfig(**VISION).to_dict(),
                        image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI)
    full._attn_implementation = "eager"
    model = transformers.Llama4ForConditionalGeneration(full)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "norm" in name and prm.ndim == 1:
                prm.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(prm))
            elif "router" in name:
                prm.normal_(0, 0.5)
            else:
                prm.normal_(0, 0.08)
    return model.eval()


def prompt(rng: np.random.Generator) -> np.ndarray:
    """Two rows: text, an image of 2 tiles (with a separator), text; then text, 1 tile, text."""
    def text(n):
        return list(rng.integers(3, 400, n))
    row0 = text(3) + [BOI] + [IMAGE] * PER_TILE + [SEP] + [IMAGE] * PER_TILE + [EOI] + text(4)
    row1 = text(5) + [BOI] + [IMAGE] * PER_TILE + [EOI] + text(3)
    row1 += text(len(row0) - len(row1))
    return np.array([row0, row1], np.int64)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    model = build_vlm()
    d = tmp_path_factory.mktemp("vlm")
    model.save_pretrained(d, max_shard_size="300KB")
    rng = np.random.default_rng(3)
    ids = prompt(rng)
    px = rng.normal(0, 1, (TILES, 3, 56, 56)).astype(np.float32)
    with torch.no_grad():
        vo = model.vision_model(torch.from_numpy(px), output_attentions=True,
                                output_hidden_states=True, return_dict=True)
        adapter = vo.last_hidden_state
        proj = model.multi_modal_projector(adapter.reshape(-1, adapter.shape[-1]))
        lm = model.language_model
        emb = lm.get_input_embeddings()(torch.from_numpy(ids))
        mask = torch.from_numpy(ids == IMAGE)[..., None].expand_as(emb)
        emb = emb.masked_scatter(mask, proj)
        out = lm(inputs_embeds=emb, output_router_logits=True, output_attentions=True)
    B, S = ids.shape
    ref = {"logits": out.logits.numpy(), "vision.adapter_out": adapter.numpy(),
           "vision.projected": proj.reshape(TILES, PER_TILE, -1).numpy(), "embed": emb.numpy(),
           "vision.embed": vo.hidden_states[0].numpy()}
    for j in range(VISION["num_hidden_layers"]):
        ref[f"vision.layers.{j}.resid_post"] = vo.hidden_states[j + 1].numpy()
        ref[f"vision.layers.{j}.attn.pattern"] = vo.attentions[j].numpy()
    for i, r in enumerate(out.router_logits):
        ref[f"layers.{i}.moe.router_logits"] = r.view(B, S, -1).numpy()
    return d, ids, px, ref


@pytest.fixture(scope="module")
def runs(case):
    d, ids, px, _ = case
    out = {}
    for backend in ("torch", "jax"):
        model = wb.load(d, backend=backend)
        assert model.has_vision
        out[backend] = model.run(ids, pixel_values=px, capture=["vision.*", "embed",
                                                                "*.moe.router_logits",
                                                                "token_modality"])
    return out


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_logits_router_logits_and_vision_hooks_match_transformers(case, runs, backend):
    _, _, _, ref = case
    out = runs[backend]
    assert rel(out.logits, ref["logits"]) <= TOL
    for name, want in ref.items():
        if name == "logits":
            continue
        got = out.trace[name]
        assert got.shape == want.shape, name
        assert rel(got, want) <= TOL, (backend, name, rel(got, want))
    for i in range(4):
        got = out.trace[f"layers.{i}.moe.router_logits"].argmax(-1)
        np.testing.assert_array_equal(got, ref[f"layers.{i}.moe.router_logits"].argmax(-1))


def test_torch_and_jax_agree_on_every_vision_hook(runs):
    t, j = runs["torch"].trace, runs["jax"].trace
    vision = [n for n in t if n.startswith("vision.")]
    assert len(vision) == 3 + 2 * VISION["num_hidden_layers"]
    for name in vision:
        assert rel(j[name], t[name]) <= TOL, name
    assert rel(runs["jax"].logits, runs["torch"].logits) <= TOL


def test_token_modality(case, runs):
    _, ids, _, _ = case
    m = runs["torch"].trace["token_modality"]
    assert m.shape == ids.shape and m.dtype == np.int32
    assert ((m == MODALITY_IMAGE) == (ids == IMAGE)).all()
    special = np.isin(ids, [BOI, EOI, SEP])
    assert ((m == MODALITY_IMAGE_SPECIAL) == special).all()
    assert ((m == MODALITY_TEXT) == ~(special | (ids == IMAGE))).all()
    np.testing.assert_array_equal(runs["jax"].trace["token_modality"], m)


def test_image_features_change_the_text_that_follows(case):
    """Different pixels -> different logits after the image, identical ones before it."""
    d, ids, px, _ = case
    model = wb.load(d, backend="torch")
    a = model.run(ids, pixel_values=px).logits
    b = model.run(ids, pixel_values=px[::-1].copy()).logits
    first = int(np.flatnonzero(ids[0] == IMAGE)[0])
    np.testing.assert_allclose(a[0, :first], b[0, :first], atol=1e-5)  # causal: unchanged
    assert np.abs(a[0, -1] - b[0, -1]).max() > 1e-3


def test_generate_with_pixel_values_continues_the_image_prompt(case):
    d, ids, px, _ = case
    model = wb.load(d, backend="torch")
    gen = model.generate(ids, 3, temperature=0, pixel_values=px,
                         capture=["vision.projected", "token_modality", "layers.0.moe.*"])
    full = model.run(gen.sequences[:, :-1], pixel_values=px).logits
    np.testing.assert_array_equal(gen.new_tokens[:, 0], full[:, ids.shape[1] - 1].argmax(-1))
    np.testing.assert_array_equal(gen.new_tokens[:, 1], full[:, ids.shape[1]].argmax(-1))
    assert gen.trace["vision.projected"].shape == (TILES, PER_TILE, 64)
    assert gen.trace["token_modality"].shape == gen.trace["layers.0.moe.topk_indices"].shape[:2]


def test_bad_images_get_one_clear_error(case):
    d, ids, px, _ = case
    model = wb.load(d, backend="torch")
    with pytest.raises(wb.InputError, match=r"3 tile\(s\) give 12 features .* hold 8"):
        model.run(ids[:1], pixel_values=px)
    with pytest.raises(wb.InputError, match=r"pixel_values must have shape \(tiles, 3, 56, 56\)"):
        model.run(ids, pixel_values=px[:, :, :28])
    with pytest.raises(wb.InputError, match="without pixel_values"):
        model.run(ids, capture="vision.projected")


def test_pixel_values_on_a_text_only_checkpoint(tmp_path):
    from workbench.checkpoint import Checkpoint
    from workbench.random_weights import random_tensors
    cfg = ModelConfig.tiny()
    d = Checkpoint.save(tmp_path / "text", random_tensors(cfg, seed=0), cfg)
    model = wb.load(d, backend="torch")
    assert not model.has_vision and not any(n.startswith("vision.") for n in model.hook_names())
    with pytest.raises(wb.InputError, match="cannot run images: its config has no vision_config"):
        model.run([[1, 2, 3]], pixel_values=np.zeros((1, 3, 56, 56), np.float32))
