"""The torch backend against transformers' Llama 4 (the numerical oracle), fp32, <= 2e-4 rel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import CASES, build_hf, hf_run, make_case, rel, save_hf

import workbench as wb
from workbench.config import ModelConfig

TOL = 2e-4


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    name = request.param
    return (name, *make_case(name, tmp_path_factory.mktemp(name)))


def test_sharded_save_is_what_we_read(case):
    _, _, _, path, _ = case
    assert (path / "model.safetensors.index.json").exists(), "oracle must be sharded"
    assert len(list(path.glob("model-*.safetensors"))) > 1


def test_logits_router_logits_patterns_match_transformers(case):
    name, cfg, hf, path, ids = case
    logits, routers, attns = hf_run(hf, ids)
    model = wb.load(path, backend="torch")
    out = model.run(ids, capture=["*.moe.router_logits", "*.moe.topk_indices", "*.attn.pattern"])
    assert rel(out.logits, logits) <= TOL, name
    assert len(routers) == len(cfg.moe_layers)
    for layer, r in zip(cfg.moe_layers, routers):
        ours = out.trace[f"layers.{layer}.moe.router_logits"]
        assert rel(ours, r) <= TOL, (name, layer)
        k = cfg.num_experts_per_tok
        hf_top = np.argsort(-r, axis=-1, kind="stable")[..., :k]
        assert np.array_equal(np.sort(out.trace[f"layers.{layer}.moe.topk_indices"], -1),
                              np.sort(hf_top, -1)), (name, layer)
    for layer, a in enumerate(attns):
        assert rel(out.trace[f"layers.{layer}.attn.pattern"], a) <= TOL, (name, layer)


def test_fused_attention_path_equals_explicit(case):
    _, _, _, path, ids = case
    model = wb.load(path)
    plain = model.run(ids).logits
    explicit = model.run(ids, capture="*.attn.pattern").logits
    assert rel(plain, explicit) <= 1e-5


def test_long_sequence_blockwise_chunks(tmp_path):
    """Many chunks (chunk 8, 70 tokens): fused blockwise path == transformers."""
    cfg = ModelConfig.tiny()
    hf = build_hf(cfg, seed=3)
    path = save_hf(hf, tmp_path)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 70))
    logits, _, _ = hf_run(hf, ids)
    assert rel(wb.load(path).run(ids).logits, logits) <= TOL


def test_multimodal_wrapper_checkpoint(tmp_path):
    cfg = ModelConfig.tiny()
    hf = build_hf(cfg, seed=4, multimodal=True)
    path = save_hf(hf, tmp_path)
    ck = wb.Checkpoint.open(path)
    assert ck.config.multimodal
    assert ck.ignored and all(n.startswith(("vision_model", "multi_modal_projector",
                                            "model.vision_model", "model.multi_modal"))
                              for n in ck.ignored)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 17))
    logits, routers, _ = hf_run(hf, ids)
    out = wb.load(path).run(ids, capture="*.moe.router_logits")
    assert rel(out.logits, logits) <= TOL
    assert rel(out.trace["layers.0.moe.router_logits"], routers[0]) <= TOL


def test_round_trip_we_save_transformers_loads(tmp_path, case):
    name, cfg, hf, path, ids = case
    from transformers import Llama4ForCausalLM
    ck = wb.Checkpoint.open(path)
    out_dir = wb.Checkpoint.save(tmp_path / "ours", {n: ck[n] for n in ck}, cfg,
                                 max_shard_bytes=100_000)
    reloaded, info = Llama4ForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reloaded.config._attn_implementation = "eager"
    with torch.no_grad():
        theirs = reloaded(torch.from_numpy(ids)).logits.numpy()
    assert rel(wb.load(out_dir).run(ids).logits, theirs) <= TOL
    assert rel(theirs, hf_run(hf, ids)[0]) <= 1e-6


def test_bf16_error_no_worse_than_transformers_bf16(case):
    """bf16 rounding: our bf16 logits are as close to the fp32 truth as transformers' bf16."""
    name, cfg, hf, path, ids = case
    from transformers import Llama4ForCausalLM
    truth, _, _ = hf_run(hf, ids)
    ours = wb.load(path, dtype="bfloat16").run(ids).logits
    # from_pretrained(dtype=bf16) keeps RoPE's inv_freq in fp32; `.to(bf16)` would round it too
    hf16 = Llama4ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    hf16.config._attn_implementation = "eager"
    with torch.no_grad():
        theirs = hf16(torch.from_numpy(ids)).logits.float().numpy()
    err_ours = np.abs(ours - truth).mean()
    err_theirs = np.abs(theirs - truth).mean()
    assert err_ours <= 1.5 * err_theirs + 1e-3, (name, err_ours, err_theirs)


def test_sparse_dispatch_equals_dense_reference(case):
    """Our grouped dispatch vs a dense all-experts formulation on the same layer input."""
    name, cfg, _, path, ids = case
    model = wb.load(path)
    layer = cfg.moe_layers[0]
    tr = model.run(ids, capture=[f"layers.{layer}.resid_mid", f"layers.{layer}.moe.*"]).trace
    ck = wb.Checkpoint.open(path)
    p = f"layers.{layer}."
    h = tr[p + "resid_mid"].reshape(-1, cfg.hidden_size).astype(np.float64)
    w = ck[p + "post_attention_layernorm.weight"].astype(np.float64)
    x = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps) * w
    gu = ck[p + "feed_forward.experts.gate_up_proj"].astype(np.float64)
    down = ck[p + "feed_forward.experts.down_proj"].astype(np.float64)
    logits = x @ ck[p + "feed_forward.router.weight"].astype(np.float64).T
    top = np.argsort(-logits, -1)[:, : cfg.num_experts_per_tok]
    dense = np.zeros_like(x)
    for e in range(cfg.num_local_experts):
        s = np.where((top == e).any(-1), 1 / (1 + np.exp(-logits[:, e])), 0.0)
        g = (x * s[:, None]) @ gu[e]
        inter = g.shape[1] // 2
        a = g[:, :inter] / (1 + np.exp(-g[:, :inter])) * g[:, inter:]
        dense += a @ down[e]
    assert rel(tr[p + "moe.routed_out"].reshape(dense.shape), dense) <= TOL
