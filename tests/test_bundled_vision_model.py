"""The shipped multimodal model data/scout-mini-vision: its card's numbers recomputed from the
shipped files, transformers parity with an image, and the routing explorer's image pane."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from oracle import rel

import workbench as wb
from workbench.checkpoint import Checkpoint
from workbench.hooks import MODALITY_IMAGE
from workbench.torch.model import TorchModel
from workbench.train import BUNDLED_MODEL, BUNDLED_VISION_MODEL
from workbench.vision.processor import IMAGE_TOKENS, ImageProcessor
from workbench.vision.train import (
    CaptionSet,
    caption_loss,
    init_tensors,
    routing_by_modality,
    sample,
)

MODEL = BUNDLED_VISION_MODEL
pytestmark = pytest.mark.skipif(not (MODEL / "config.json").exists(),
                                reason=f"no multimodal model at {MODEL}")


@pytest.fixture(scope="module")
def shipped():
    results = json.loads((MODEL / "training_results.json").read_text())
    tok = wb.Tokenizer.from_pretrained(MODEL)
    model = wb.load(MODEL, threads=1)  # many small runs: one thread is quickest
    val = CaptionSet(tok, model.config, ImageProcessor.from_pretrained(MODEL),
                     int(results["args"]["eval_images"]), int(results["args"]["seed"]) + 1)
    return model, tok, val, results


def test_files_size_and_config():
    size = sum(f.stat().st_size for f in MODEL.glob("*.safetensors"))
    assert size <= 30 * 2**20
    for name in ("README.md", "tokenizer.json", "preprocessor_config.json",
                 "training_results.json"):
        assert (MODEL / name).is_file(), name
    cfg = wb.ModelConfig.from_pretrained(MODEL)
    text = wb.ModelConfig.from_pretrained(BUNDLED_MODEL)
    assert cfg.multimodal and cfg.vision is not None
    assert cfg.vision.image_size == ImageProcessor.from_pretrained(MODEL).size
    assert (cfg.num_hidden_layers, cfg.num_local_experts, cfg.hidden_size) == \
        (text.num_hidden_layers, text.num_local_experts, text.hidden_size)
    tok = wb.Tokenizer.from_pretrained(MODEL)
    assert tok.token_to_id("<|patch|>") == cfg.vision.image_token_index
    assert all(tok.token_to_id(t) is not None for t in IMAGE_TOKENS)


def test_model_card_numbers_recomputed(shipped):
    model, tok, val, res = shipped
    loss = caption_loss(model, val, True)
    assert abs(loss - res["multimodal"]["caption_loss_with_image"]) < 2e-3
    now = routing_by_modality(model, val)
    for layer, v in res["routing_by_modality"]["trained"].items():
        assert abs(now[layer]["nmi"] - v["nmi"]) < 2e-3, layer
        np.testing.assert_allclose(now[layer]["image_share"], v["image_share"], atol=0.02)
    # the untrained model of the card: the bundled text weights with the seed's random tower
    base = Checkpoint.open(BUNDLED_MODEL)
    init = init_tensors(model.config, base.model_tensors(), int(res["args"]["seed"]))
    init_model = TorchModel(model.config, init)
    init_model.threads = 1
    untrained = routing_by_modality(init_model, val)
    for layer, v in res["routing_by_modality"]["untrained"].items():
        assert abs(untrained[layer]["nmi"] - v["nmi"]) < 2e-3, layer
    # the image clearly helps: well below the text-only baseline and the untrained model
    assert loss < 0.5 * res["text_only_baseline"]["caption_loss"]
    assert loss < 0.5 * res["untrained"]["caption_loss_with_image"]


def test_transformers_gives_the_same_logits_with_an_image(shipped):
    import transformers
    model, tok, _, _ = shipped
    image, caption = sample(np.random.default_rng(11))
    ids, px = wb.Processor.from_pretrained(MODEL)("<|image|> " + caption, [image])
    hf = transformers.Llama4ForConditionalGeneration.from_pretrained(MODEL,
                                                                     dtype=torch.float32)
    hf.eval()
    with torch.no_grad():  # the wrapper's forward raises in transformers 5.x: its steps
        feats = hf.vision_model(torch.from_numpy(px)).last_hidden_state
        proj = hf.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))
        lm = hf.language_model
        emb = lm.get_input_embeddings()(torch.from_numpy(ids))
        mask = torch.from_numpy(ids == model.config.vision.image_token_index)[..., None]
        emb = emb.masked_scatter(mask.expand_as(emb), proj)
        ref = lm(inputs_embeds=emb).logits.numpy()
    for backend in ("torch", "jax"):
        m = model if backend == "torch" else wb.load(MODEL, backend="jax")
        assert rel(m.run(ids, pixel_values=px).logits, ref) < 2e-4, backend


def test_routing_explorer_image_pane(shipped):
    pytest.importorskip("ipywidgets")
    from workbench.widgets import RoutingExplorer, RoutingState
    model, tok, _, _ = shipped
    image, caption = sample(np.random.default_rng(3))
    ex = RoutingExplorer(model, tok, image=image, text="<|image|> " + caption)
    s = ex.state
    patches = np.flatnonzero(s.trace["token_modality"][0] == MODALITY_IMAGE)
    assert len(patches) == model.config.vision.tokens_per_tile
    assert [s.tokens[p] for p in patches] == ["<|patch|>"] * len(patches)
    assert len(ex.token_buttons) == len(s.tokens)
    assert ex.patch_image.layout.display is None and ex.patch_image.value[:4] == b"\x89PNG"
    before = ex.patch_image.value
    ex.layer_slider.value = 2
    assert s.layer == 2 and ex.patch_image.value != before
    colours = {ex.token_buttons[p].style.button_color for p in patches}
    assert len(colours) == len(set(s.experts()[patches].tolist()))  # buttons follow experts
    ex.select(int(patches[0]))
    assert s.position == patches[0]
    ex.text.value = "a red circle at the top left."
    ex.run_button.click()  # plain text: the image pane goes away
    assert s.image is None and ex.patch_image.layout.display == "none"
    assert not ex.errors, ex.errors
    text_only = RoutingState(wb.load(BUNDLED_MODEL), wb.Tokenizer.from_pretrained(BUNDLED_MODEL))
    with pytest.raises(ValueError, match="no vision tower"):
        text_only.set_image(image)
