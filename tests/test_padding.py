"""Padded batches: ``run(ids, attention_mask=mask)`` and ``generate`` with a mask, in both
backends, against transformers given the same mask (fp32, <= 2e-4 relative), torch <-> jax,
through every attention path (fused, explicit, blockwise, KV cache), plus the mask's
validation, the trace's record of it and analyses ignoring pads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import CASES, build_hf, lm, rel, save_hf

import workbench as wb
from workbench import analysis as an
from workbench.config import ModelConfig

TOL = 2e-4
S = 19


def _mask(B: int = 3) -> np.ndarray:
    """Row 0 right-padded, row 1 left-padded (crossing chunk boundaries), row 2 full."""
    m = np.ones((B, S), np.int64)
    m[0, 13:] = 0
    m[1, :6] = 0
    return m


def _hf_positions(mask: np.ndarray) -> np.ndarray:
    """position_ids as transformers' generate derives them from the mask."""
    return np.where(mask == 1, np.cumsum(mask, 1) - 1, 1)


@pytest.fixture(scope="module", params=["maverick", "long_temp"])
def case(request, tmp_path_factory):
    """maverick: interleaved dense layers, no QK-norm; long_temp: chunk 5 and floor_scale 3
    over 8 layers, so the padding crosses chunks and temperature steps."""
    cfg = ModelConfig.tiny(**CASES[request.param])
    hf = build_hf(cfg, seed=1)
    path = save_hf(hf, tmp_path_factory.mktemp(request.param))
    ids = np.random.default_rng(5).integers(3, cfg.vocab_size, (3, S))
    mask = _mask()
    with torch.no_grad():
        out = lm(hf)(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     position_ids=torch.from_numpy(_hf_positions(mask)),
                     output_attentions=True, output_router_logits=True)
    ref = {"logits": out.logits.float().numpy()}
    for i, r in zip(cfg.moe_layers, out.router_logits):
        ref[f"layers.{i}.moe.router_logits"] = r.view(3, S, -1).float().numpy()
    for i, a in enumerate(out.attentions):
        ref[f"layers.{i}.attn.pattern"] = a.float().numpy()  # (B, H, S, T)
    return request.param, cfg, hf, path, ids, mask, ref


CAPTURE = ["*.moe.*", "*.resid_post", "*.attn.pattern"]


@pytest.fixture(scope="module")
def runs(case):
    """Each backend's model and its padded run (explicit attention: patterns captured)."""
    _, _, _, path, ids, mask, _ = case
    out = {}
    for backend in ("torch", "jax"):
        model = wb.load(path, backend=backend)
        out[backend] = model, model.run(ids, attention_mask=mask, capture=CAPTURE)
    return out


def _real(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A (B, S, ...) value, or a (B, H, S, T) pattern, at the real query positions only."""
    if a.ndim == 4 and a.shape[1] != mask.shape[1]:
        a = a.transpose(0, 2, 1, 3)
    return a[mask.astype(bool)]


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_padded_batch_matches_transformers(case, runs, backend):
    name, cfg, _, path, ids, mask, ref = case
    model, out = runs[backend]
    assert rel(_real(out.logits, mask), _real(ref["logits"], mask)) <= TOL, name
    for hook, r in ref.items():
        if hook != "logits":
            assert rel(_real(out.trace[hook], mask), _real(r, mask)) <= TOL, (name, hook)
    for i in cfg.moe_layers:  # identical top-k choices at real tokens
        k = cfg.num_experts_per_tok
        hf_top = np.argsort(-ref[f"layers.{i}.moe.router_logits"], -1, kind="stable")[..., :k]
        ours = out.trace[f"layers.{i}.moe.topk_indices"]
        assert np.array_equal(np.sort(_real(ours, mask), -1), np.sort(_real(hf_top, mask), -1))
    # padded keys get exactly no attention from real queries; rows still sum to 1
    p = out.trace["layers.0.attn.pattern"][1]  # the left-padded row (H, S, T)
    real = mask[1].astype(bool)
    assert np.all(p[:, real][..., ~real] == 0)
    np.testing.assert_allclose(p[:, real].sum(-1), 1, rtol=1e-5)
    # the fused path (no pattern captured) agrees with the explicit one, pad rows stay finite
    plain = model.run(ids, attention_mask=mask)
    assert rel(_real(plain.logits, mask), _real(out.logits, mask)) <= 1e-5
    assert np.isfinite(plain.logits).all()


def test_torch_and_jax_agree_on_padded_batch(case, runs):
    mask = case[5]
    a, b = runs["torch"][1], runs["jax"][1]
    assert rel(_real(a.logits, mask), _real(b.logits, mask)) <= TOL
    for hook in a.trace:
        x, y = _real(a.trace[hook], mask), _real(b.trace[hook], mask)
        if x.dtype.kind in "iu":
            assert np.array_equal(np.sort(x, -1), np.sort(y, -1)), hook
        else:
            assert rel(x, y) <= TOL, hook


def test_blockwise_paths_take_the_mask(case, monkeypatch):
    """The blocked kernels (torch query blocks, jax flash) give what transformers gives."""
    _, cfg, _, path, ids, mask, ref = case
    from workbench.jax import attention as jatt
    from workbench.torch import attention as tatt
    want = _real(ref["logits"], mask)
    monkeypatch.setattr(tatt, "MASK_ELEMS", 3 * 4)  # blocks of 4 query rows
    out = wb.load(path, backend="torch").run(ids, attention_mask=mask)
    assert rel(_real(out.logits, mask), want) <= TOL
    if case[0] != "long_temp":  # jax's flash path: once, on the chunked, temperature case
        return
    monkeypatch.setattr(jatt, "BLOCKWISE_MIN", 0)
    monkeypatch.setattr(jatt, "BLOCK_Q", 4)
    monkeypatch.setattr(jatt, "BLOCK_K", 4)
    out = wb.load(path, backend="jax").run(ids, attention_mask=mask)
    assert rel(_real(out.logits, mask), want) <= TOL


def test_generate_with_mask_matches_transformers(case, runs):
    """Left-padded prompts decoded greedily with the KV cache: the tokens transformers'
    generate picks for the same mask (chunked caches keep keys per shifted row); jax on the
    chunked, temperature case."""
    name, cfg, hf, path, ids, _, _ = case
    prompt = ids[:2, :9].copy()
    mask = np.ones_like(prompt)
    mask[0, :4] = 0
    prompt[0, :4] = 0
    want = lm(hf).generate(torch.from_numpy(prompt), attention_mask=torch.from_numpy(mask),
                           max_new_tokens=6, do_sample=False, pad_token_id=0)[:, 9:].numpy()
    for backend in ("torch", "jax") if name == "long_temp" else ("torch",):
        got = runs[backend][0].generate(prompt, 6, attention_mask=mask, temperature=0,
                                        capture="*.moe.topk_indices")
        assert np.array_equal(got.new_tokens, want), (name, backend)
        m = got.trace.attention_mask
        assert m.shape == got.trace.input_ids.shape
        assert not m[0, :4].any() and m[:, 4:].all()


def test_padded_rows_equal_unpadded_runs(tmp_path):
    """Without query temperature (which transformers computes from the slot), a padded row
    gives what the row alone gives, left or right padded, in run and (left) in generate."""
    cfg = ModelConfig.tiny(attn_temperature_tuning=False, attention_chunk_size=5)
    path = save_hf(build_hf(cfg, seed=2), tmp_path)
    ids = np.random.default_rng(1).integers(3, cfg.vocab_size, (3, S))
    mask = _mask()
    model = wb.load(path)
    out = model.run(ids, attention_mask=mask, capture="layers.0.moe.router_logits")
    for b in range(3):
        m = mask[b].astype(bool)
        alone = model.run(ids[b][m], capture="layers.0.moe.router_logits")
        assert rel(out.logits[b][m], alone.logits[0]) <= TOL, b
        assert rel(out.trace["layers.0.moe.router_logits"][b][m],
                   alone.trace["layers.0.moe.router_logits"][0]) <= TOL
    left = np.ones((2, 12), np.int64)
    left[0, :5] = 0
    gen = model.generate(ids[:2, :12], 5, attention_mask=left, temperature=0).new_tokens
    alone = model.generate(ids[0, 5:12], 5, temperature=0).new_tokens
    assert np.array_equal(gen[0], alone[0])
    with pytest.warns(UserWarning, match="right-padded"):
        model.generate(ids, 1, attention_mask=mask, temperature=0)


def test_mask_refusals(case, runs):
    _, cfg, _, path, ids, mask, _ = case
    model = runs["torch"][0]
    with pytest.raises(wb.InputError, match=r"attention_mask has shape \(3, 18\)"):
        model.run(ids, attention_mask=mask[:, :-1])
    with pytest.raises(wb.InputError, match="0 \\(padding\\) and 1 \\(token\\)"):
        model.run(ids, attention_mask=mask * 2)
    empty = mask.copy()
    empty[2] = 0
    with pytest.raises(wb.InputError, match="row 2 has no token"):
        model.run(ids, attention_mask=empty)
    with pytest.raises(wb.InputError, match="attn.summary"):
        model.run(ids, attention_mask=mask, capture="layers.0.attn.summary")


def test_full_mask_is_the_unpadded_run(case, runs):
    _, cfg, _, path, ids, _, _ = case
    model = runs["torch"][0]
    a = model.run(ids, attention_mask=np.ones_like(ids), capture="*.moe.topk_indices")
    b = model.run(ids, capture="*.moe.topk_indices")
    assert np.array_equal(a.logits, b.logits)
    assert a.trace.attention_mask is None


def test_trace_records_mask_and_analyses_skip_pads(case, runs, tmp_path):
    _, cfg, _, path, ids, mask, _ = case
    model = runs["torch"][0]
    out = model.run(ids, attention_mask=mask, capture="*.moe.*")
    t = out.trace
    assert np.array_equal(t.attention_mask, mask.astype(bool))
    back = wb.Trace.load(t.save(tmp_path / "padded"))
    assert np.array_equal(back.attention_mask, t.attention_mask)
    layer = cfg.moe_layers[0]
    # the load of the padded batch is the load of its real tokens, run one row at a time
    rows = [model.run(ids[b][mask[b].astype(bool)], capture="*.moe.*").trace for b in range(3)]
    np.testing.assert_array_equal(an.expert_counts(t, layer), an.expert_counts(rows, layer))
    assert an.expert_counts(t, layer).sum() == int(mask.sum()) * cfg.num_experts_per_tok
    # token-aligned labels given for every slot (pads included) drop the pads too
    labels = np.where(mask == 1, "real", "pad")
    spec = an.category_specialisation(t, layer, labels)
    assert spec.categories == ["real"]
    assert spec.counts.sum() == int(mask.sum()) * cfg.num_experts_per_tok
