"""The shipped model data/scout-mini: its card's numbers, transformers parity, generation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import rel

import workbench as wb
from workbench.random_weights import random_tensors
from workbench.torch.model import TorchModel
from workbench.train import routing_structure

MODEL = Path(__file__).resolve().parent.parent / "data" / "scout-mini"


@pytest.fixture(scope="module")
def shipped():
    card = json.loads((MODEL / "routing_structure.json").read_text())
    return wb.load(MODEL), wb.Tokenizer.from_pretrained(MODEL), card


def test_has_every_llama4_feature():
    cfg = wb.ModelConfig.from_pretrained(MODEL)
    log = json.loads((MODEL / "training_log.json").read_text())
    context = int(log["meta"]["args"]["context"])
    assert cfg.num_hidden_layers >= 4 and cfg.num_local_experts >= 8
    assert cfg.num_experts_per_tok == 1 and cfg.moe_layers
    assert cfg.nope_layers == [3] and cfg.uses_temperature(3)
    assert cfg.floor_scale < context, "temperature tuning must act inside the training context"
    assert cfg.attention_chunk_size < context
    assert cfg.use_qk_norm and cfg.rope_type == "llama3"
    size = sum(f.stat().st_size for f in MODEL.glob("*.safetensors"))
    assert size <= 50 * 2**20
    assert len(list((MODEL / "checkpoints").glob("step-*"))) >= 2
    assert (MODEL / "README.md").exists() and (MODEL / "tokenizer.json").exists()


def test_model_card_numbers_recomputed(shipped):
    model, tok, card = shipped
    now = routing_structure(model, tok)
    assert now["tokens"] == card["trained"]["tokens"]
    assert abs(now["val_loss"] - card["trained"]["val_loss"]) < 1e-3
    for layer, v in card["trained"]["layers"].items():
        for key, val in v.items():
            assert abs(now["layers"][layer][key] - val) < 1e-6, (layer, key)
    cfg = model.config
    seed = int(json.loads((MODEL / "training_log.json").read_text())["meta"]["args"]["seed"])
    untrained = routing_structure(TorchModel(cfg, random_tensors(cfg, seed)), tok)
    assert abs(untrained["summary"]["nmi_category"]
               - card["untrained"]["summary"]["nmi_category"]) < 1e-6
    # the trained model is clearly better and clearly more structured than its initialisation
    assert now["val_loss"] < card["unigram_val_loss"] - 1.0
    for key in ("nmi_category", "nmi_next_layer"):
        assert now["summary"][key] > 1.5 * untrained["summary"][key], key


def test_transformers_loads_it_with_the_same_logits(shipped):
    from transformers import Llama4ForCausalLM
    model, tok, _ = shipped
    hf, info = Llama4ForCausalLM.from_pretrained(MODEL, dtype=torch.float32,
                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf.config._attn_implementation = "eager"
    text = "def add(a, b):\n    return a + b\n\nThe licence grants permission to 1,234 users."
    ids = np.array([tok.encode(text) * 3])[:, :150]  # > chunk 64 and > floor_scale 64
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    assert rel(model.run(ids).logits, want) <= 2e-4
    jax_model = pytest.importorskip("workbench.jax").load(MODEL)
    assert rel(jax_model.run(ids).logits, want) <= 2e-4


def test_generation_both_backends(shipped):
    model, tok, _ = shipped
    ids = np.array([tok.encode("Permission is hereby granted")])
    g = model.generate(ids, 12, temperature=0, capture="*.moe.topk_indices")
    assert g.new_tokens.shape == (1, 12)
    assert g.trace["layers.0.moe.topk_indices"].shape == (1, ids.shape[1] + 11, 1)
    text = tok.decode(g.sequences[0].tolist())
    assert text.startswith("Permission is hereby granted") and len(text) > 30
    jm = pytest.importorskip("workbench.jax").load(MODEL)
    gj = jm.generate(ids, 12, temperature=0)
    np.testing.assert_array_equal(gj.sequences, g.sequences)
