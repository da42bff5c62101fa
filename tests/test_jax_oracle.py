"""The jax backend against transformers' Llama 4 (the numerical oracle), fp32, <= 2e-4 rel.

Each case compiles two variants (attention patterns captured: explicit softmax path; nothing
captured: fused/blockwise path) and reuses them. They are compiled at XLA optimisation level 0,
about twice as fast to compile; it moves fp32 results by ~1e-6 (bf16: not at all). The
multimodal test runs with the default options.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")
from oracle import CASES, build_hf, hf_run, make_case, rel, save_hf  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.config import ModelConfig  # noqa: E402

TOL = 2e-4
CAPTURE = ["*.moe.router_logits", "*.moe.topk_indices", "*.attn.pattern"]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    name = request.param
    cfg, hf, path, ids = make_case(name, tmp_path_factory.mktemp(name))
    model = wb.load(path, backend="jax")
    model.compiler_options["xla_backend_optimization_level"] = 0
    explicit = model.run(ids, capture=CAPTURE)
    plain = model.run(ids)
    return name, cfg, hf_run(hf, ids), model, explicit, plain


def test_logits_router_logits_patterns_match_transformers(case):
    name, cfg, (logits, routers, attns), model, out, _ = case
    assert model.backend == "jax" and model.dtype == "float32"
    assert out.logits.dtype == np.float32 and out.logits.shape == logits.shape
    assert rel(out.logits, logits) <= TOL, name
    assert np.array_equal(out.logits.argmax(-1), logits.argmax(-1)), name
    assert len(routers) == len(cfg.moe_layers)
    k = cfg.num_experts_per_tok
    for layer, r in zip(cfg.moe_layers, routers):
        assert rel(out.trace[f"layers.{layer}.moe.router_logits"], r) <= TOL, (name, layer)
        idx = out.trace[f"layers.{layer}.moe.topk_indices"]
        assert idx.dtype == np.int32 and idx.shape == (*logits.shape[:2], k)
        hf_top = np.argsort(-r, axis=-1, kind="stable")[..., :k]
        assert np.array_equal(np.sort(idx, -1), np.sort(hf_top, -1)), (name, layer)
    assert len(attns) == cfg.num_hidden_layers
    for layer, a in enumerate(attns):
        assert rel(out.trace[f"layers.{layer}.attn.pattern"], a) <= TOL, (name, layer)


def test_fused_blockwise_path_equals_explicit_and_transformers(case):
    """Nothing captured: chunked layers run blockwise (chunk 8 or 5 < seq, several chunks)."""
    name, _, (logits, _, _), model, explicit, plain = case
    assert len(plain.trace) == 0
    assert rel(plain.logits, explicit.logits) <= 1e-5, name
    assert rel(plain.logits, logits) <= TOL, name
    assert np.array_equal(plain.logits.argmax(-1), logits.argmax(-1)), name


def test_multimodal_wrapper_checkpoint(tmp_path):
    cfg = ModelConfig.tiny()
    hf = build_hf(cfg, seed=4, multimodal=True)
    path = save_hf(hf, tmp_path)
    assert wb.Checkpoint.open(path).config.multimodal
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 17))
    logits, routers, _ = hf_run(hf, ids)
    model = wb.load(path, backend="jax")
    assert not model.compiler_options  # the default XLA options
    out = model.run(ids, capture="*.moe.router_logits")
    assert rel(out.logits, logits) <= TOL
    assert np.array_equal(out.logits.argmax(-1), logits.argmax(-1))
    for layer, r in zip(cfg.moe_layers, routers):
        assert rel(out.trace[f"layers.{layer}.moe.router_logits"], r) <= TOL
