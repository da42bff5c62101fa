"""Hook points and interventions (torch backend semantics; jax equality is in test_jax_torch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import build_hf, hf_run, rel, save_hf

import workbench as wb
from workbench.config import ModelConfig
from workbench.hooks import hook_shape
from workbench.random_weights import write_random_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = ModelConfig.tiny_maverick(num_experts_per_tok=1)  # dense + MoE layers, NoPE layer 3
    path = write_random_checkpoint(tmp_path_factory.mktemp("m"), cfg, std=0.08, router_std=0.5)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 19))
    return cfg, wb.load(path), ids, path


def test_every_hook_has_its_shape_and_dtype(setup):
    cfg, model, ids, _ = setup
    out = model.run(ids, capture="*")
    names = model.hook_names()
    assert set(out.trace) == set(names)
    B, T = ids.shape
    for n in names:
        a = out.trace[n]
        assert a.shape == hook_shape(cfg, n, B, T), n
        assert a.dtype == (np.int32 if n.endswith("topk_indices") else np.float32), n
    assert any(".mlp.out" in n for n in names) and any(".moe." in n for n in names)
    np.testing.assert_array_equal(out.trace["logits"], out.logits)


def test_internal_consistency(setup):
    cfg, model, ids, _ = setup
    t = model.run(ids, capture="*").trace
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        np.testing.assert_allclose(t[p + "resid_mid"], t[p + "resid_pre"] + t[p + "attn.out"],
                                   rtol=1e-5, atol=1e-6)
        if cfg.is_moe(i):
            want = t[p + "resid_mid"] + t[p + "moe.routed_out"] + t[p + "moe.shared_out"]
            np.testing.assert_allclose(t[p + "resid_post"], want, rtol=1e-5, atol=1e-6)
            lg = t[p + "moe.router_logits"]
            idx = t[p + "moe.topk_indices"]
            np.testing.assert_array_equal(idx[..., 0], lg.argmax(-1))
            chosen = np.take_along_axis(lg, idx.astype(np.int64), -1)
            np.testing.assert_allclose(t[p + "moe.topk_scores"], 1 / (1 + np.exp(-chosen)),
                                       rtol=1e-6)
        else:
            np.testing.assert_allclose(t[p + "resid_post"], t[p + "resid_mid"] + t[p + "mlp.out"],
                                       rtol=1e-5, atol=1e-6)
        if i + 1 < cfg.num_hidden_layers:
            np.testing.assert_array_equal(t[p + "resid_post"], t[f"layers.{i + 1}.resid_pre"])
    pat = t["layers.0.attn.pattern"]
    np.testing.assert_allclose(pat.sum(-1), 1.0, rtol=1e-5)
    # chunked layer: no attention across a chunk boundary; NoPE layer 3: global
    c = cfg.attention_chunk_size
    assert pat[..., c:, :c].max() == 0.0
    assert t["layers.3.attn.pattern"][..., c:, :c].max() > 0.0


def test_glob_capture_and_unknown_names(setup):
    _, model, ids, _ = setup
    t = model.run(ids, capture=["*.moe.topk_*", "layers.3.attn.pattern"]).trace
    assert set(t) == {n for n in model.hook_names()
                      if ".moe.topk_" in n} | {"layers.3.attn.pattern"}
    with pytest.raises(wb.HookError, match="closest valid names.*layers.1.moe.router_logits"):
        model.run(ids, capture="layers.1.moe.router_logit")
    assert model.run(ids).trace.keys() == set()


def test_capture_dtype_positions_and_estimate(setup):
    cfg, model, ids, _ = setup
    full = model.run(ids, capture="layers.3.attn.pattern").trace["layers.3.attn.pattern"]
    t = model.run(ids, capture=["layers.3.attn.pattern", "layers.1.moe.*"],
                  capture_dtype="float16", positions=slice(4, 9)).trace
    assert t["layers.3.attn.pattern"].dtype == np.float16
    assert t["layers.3.attn.pattern"].shape == (2, cfg.num_attention_heads, 5, ids.shape[1])
    np.testing.assert_allclose(t["layers.3.attn.pattern"], full[:, :, 4:9], atol=1e-3)
    assert t["layers.1.moe.topk_indices"].dtype == np.int32
    assert t["layers.1.moe.router_logits"].shape[1] == 5
    est = model.estimate_capture_bytes("*.attn.pattern", batch=2, seq=19)
    got = model.run(ids, capture="*.attn.pattern").trace
    assert est == sum(a.nbytes for a in got.values())
    big = wb.ModelConfig.scout()
    from workbench.hooks import hook_shape as hs
    assert hs(big, "layers.0.attn.pattern", 1, 8192) == (1, 40, 8192, 8192)


def test_ban_expert_reroutes_to_second_choice(setup):
    cfg, model, ids, _ = setup
    layer = cfg.moe_layers[0]
    base = model.run(ids, capture=f"layers.{layer}.moe.*").trace
    lg = base[f"layers.{layer}.moe.router_logits"]
    top = base[f"layers.{layer}.moe.topk_indices"][..., 0]
    e = int(np.bincount(top.ravel()).argmax())
    t = model.run(ids, capture=f"layers.{layer}.moe.*",
                  interventions=[wb.ban_expert(layer, e)]).trace
    new = t[f"layers.{layer}.moe.topk_indices"][..., 0]
    assert (new != e).all()
    second = np.argsort(-lg, -1)[..., 1]
    np.testing.assert_array_equal(new[top == e], second[top == e])
    np.testing.assert_array_equal(new[top != e], top[top != e])
    assert t.meta["interventions"][0]["kind"] == "ban_expert"


def test_force_expert_at_positions(setup):
    cfg, model, ids, _ = setup
    layer = cfg.moe_layers[-1]
    t = model.run(ids, capture=f"layers.{layer}.moe.*",
                  interventions=[wb.force_expert(layer, 3, positions=[0, 5, -1])]).trace
    idx = t[f"layers.{layer}.moe.topk_indices"][..., 0]
    assert (idx[:, [0, 5, ids.shape[1] - 1]] == 3).all()
    lg = t[f"layers.{layer}.moe.router_logits"]
    np.testing.assert_allclose(t[f"layers.{layer}.moe.topk_scores"][:, 5, 0],
                               1 / (1 + np.exp(-lg[:, 5, 3])), rtol=1e-6)
    allpos = model.run(ids, capture=f"layers.{layer}.moe.topk_indices",
                       interventions=[wb.force_expert(layer, 2)]).trace
    assert (allpos[f"layers.{layer}.moe.topk_indices"] == 2).all()


def test_zero_expert(setup):
    cfg, model, ids, _ = setup
    layer = cfg.moe_layers[0]
    base = model.run(ids, capture=f"layers.{layer}.moe.*").trace
    top = base[f"layers.{layer}.moe.topk_indices"][..., 0]
    e = int(top[0, 0])
    t = model.run(ids, capture=f"layers.{layer}.moe.*",
                  interventions=[wb.zero_expert(layer, e)]).trace
    np.testing.assert_array_equal(t[f"layers.{layer}.moe.topk_indices"][..., 0], top)
    routed = t[f"layers.{layer}.moe.routed_out"]
    assert np.abs(routed[top == e]).max() == 0.0
    np.testing.assert_allclose(routed[top != e], base[f"layers.{layer}.moe.routed_out"][top != e],
                               rtol=1e-5, atol=1e-7)


def test_set_top_k_2_equals_transformers_top2(tmp_path):
    cfg = ModelConfig.tiny()
    hf = build_hf(cfg, seed=5)
    path = save_hf(hf, tmp_path / "k1")
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 15))
    hf2 = build_hf(cfg.replace(num_experts_per_tok=2), seed=5)  # same seed -> same weights
    for (n1, p1), (n2, p2) in zip(hf.named_parameters(), hf2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    want, _, _ = hf_run(hf2, ids)
    got = wb.load(path).run(ids, interventions=[wb.set_top_k(2)])
    assert rel(got.logits, want) <= 2e-4
    t = wb.load(path).run(ids, capture="layers.0.moe.topk_indices",
                          interventions=[wb.set_top_k(2, layer=0)]).trace
    assert t["layers.0.moe.topk_indices"].shape == (2, 15, 2)


def test_ablate_head_equals_zeroing_o_proj_input(setup):
    cfg, model, ids, path = setup
    layer, head = 1, 2
    d = cfg.head_dim
    ck = wb.Checkpoint.open(path)
    tensors = {n: ck[n].copy() for n in ck}
    tensors[f"layers.{layer}.self_attn.o_proj.weight"][:, head * d:(head + 1) * d] = 0
    edited = wb.Checkpoint.save(path.parent / "edited", tensors, cfg)
    want = wb.load(edited).run(ids).logits
    got = model.run(ids, interventions=[wb.ablate_head(layer, head)]).logits
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_patch_replaces_value_downstream(setup):
    cfg, model, ids, _ = setup
    other = np.roll(ids, 1, axis=1)
    donor = model.run(other, capture="layers.2.resid_post").trace["layers.2.resid_post"]
    patched = model.run(ids, capture=["layers.2.resid_post", "logits"],
                        interventions=[wb.patch("layers.2.resid_post", donor)])
    np.testing.assert_array_equal(patched.trace["layers.2.resid_post"], donor)
    np.testing.assert_allclose(patched.logits, model.run(other).logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(wb.InterventionError, match="broadcast"):
        model.run(ids, interventions=[wb.patch("layers.2.resid_post", np.zeros((3, 3)))])


def test_custom_hook_function(setup):
    cfg, model, ids, _ = setup
    layer = cfg.moe_layers[0]

    def prefer_expert_0(logits: torch.Tensor) -> torch.Tensor:
        out = logits.clone()
        out[..., 0] += 100.0
        return out

    t = model.run(ids, capture=f"layers.{layer}.moe.topk_indices",
                  hooks={f"layers.{layer}.moe.router_logits": prefer_expert_0}).trace
    assert (t[f"layers.{layer}.moe.topk_indices"] == 0).all()
    with pytest.raises(wb.InterventionError, match="unknown hook"):
        model.run(ids, hooks={"layers.0.moe.nope": prefer_expert_0})


def test_interventions_compose(setup):
    cfg, model, ids, _ = setup
    a, b = cfg.moe_layers
    t = model.run(ids, capture="*.moe.topk_indices",
                  interventions=[wb.ban_expert(a, 0), wb.ban_expert(a, 1),
                                 wb.force_expert(b, 4), wb.ablate_head(0, 0)]).trace
    assert not np.isin(t[f"layers.{a}.moe.topk_indices"], [0, 1]).any()
    assert (t[f"layers.{b}.moe.topk_indices"] == 4).all()
    assert len(t.meta["interventions"]) == 4


@pytest.mark.parametrize("bad, match", [
    (lambda c: wb.ban_expert(99, 0), "layer 99 out of range"),
    (lambda c: wb.ban_expert(0, 0), "dense layer"),
    (lambda c: wb.zero_expert(1, 99), "expert 99 out of range"),
    (lambda c: wb.ablate_head(0, 99), "head 99 out of range"),
    (lambda c: wb.set_top_k(0), "k=0"),
    (lambda c: wb.force_expert(1, 0, positions=[500]), "positions"),
    (lambda c: wb.patch("layers.0.nothing", np.zeros(1)), "unknown hook"),
])
def test_bad_interventions(setup, bad, match):
    cfg, model, ids, _ = setup
    with pytest.raises(wb.InterventionError, match=match):
        model.run(ids, interventions=[bad(cfg)])


def test_trace_save_load_round_trip(setup, tmp_path):
    cfg, model, ids, _ = setup
    out = model.run(ids, capture=["*.moe.*", "layers.0.attn.pattern"],
                    interventions=[wb.ban_expert(1, 2)])
    p = out.trace.save(tmp_path / "trace")
    assert p.suffix == ".safetensors"
    assert b"pickle" not in p.read_bytes()[:64]
    back = wb.Trace.load(p)
    assert set(back) == set(out.trace)
    for n in back:
        np.testing.assert_array_equal(back[n], out.trace[n])
    np.testing.assert_array_equal(back.input_ids, ids)
    assert back.meta["interventions"] == out.trace.meta["interventions"]
    assert back.moe_layers == cfg.moe_layers
    r = back.routing(1)
    assert r.indices.shape == (2, 19, 1) and r.logits.shape[-1] == cfg.num_local_experts
    with pytest.raises(KeyError, match="not captured"):
        back["layers.0.resid_pre"]


def test_generation_cache_equals_full_forward(setup):
    cfg, model, ids, _ = setup
    g = model.generate(ids[:, :6], 10, temperature=0, capture="*.moe.topk_indices")
    full = model.run(g.sequences[:, :-1], capture="*.moe.topk_indices")
    np.testing.assert_array_equal(full.logits.argmax(-1)[:, 5:], g.sequences[:, 6:])
    for n in g.trace:
        np.testing.assert_array_equal(g.trace[n], full.trace[n])
    s1 = model.generate(ids[:, :6], 5, temperature=1.0, top_p=0.9, seed=3).sequences
    s2 = model.generate(ids[:, :6], 5, temperature=1.0, top_p=0.9, seed=3).sequences
    np.testing.assert_array_equal(s1, s2)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_capturing_patterns_never_changes_the_forward(backend):
    """Capturing every hook (attention patterns included) leaves the logits bit-identical,
    also in bf16, where an eager softmax rounds differently from the fused kernel and can flip
    routing; a hook function on the pattern still flows into the output."""
    m = wb.load(wb.widgets.BUNDLED_MODEL, backend=backend, dtype="bfloat16")
    ids = np.random.default_rng(0).integers(0, m.config.vocab_size, (1, 40))
    plain = m.run(ids).logits
    captured = m.run(ids, capture="*")
    np.testing.assert_array_equal(captured.logits, plain)
    assert captured.trace["layers.3.attn.pattern"].shape[-1] == 40
    flat = m.run(ids, hooks={"layers.3.attn.pattern": lambda p: p * 0 + 1 / 40}).logits
    assert np.abs(flat - plain).max() > 0
