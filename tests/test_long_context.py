"""Long-context hooks: ``attn.summary``, windowed patterns, ``disable_temperature`` and the
sequence limit, equal between backends and to the full pattern's statistics."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("torch")
from oracle import build_hf, save_hf  # noqa: E402

import workbench as wb  # noqa: E402
from workbench import hooks as hk  # noqa: E402
from workbench.config import ModelConfig  # noqa: E402
from workbench.numerics import SUMMARY_FEATURES, attention_summary_reference  # noqa: E402

TOL = 2e-4
FAST = {"xla_backend_optimization_level": 0}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    # chunk 5 < seq, floor_scale 3: chunked and global layers, temperature active early
    cfg = ModelConfig.tiny(attention_chunk_size=5, floor_scale=3, num_hidden_layers=4)
    path = save_hf(build_hf(cfg, seed=3), tmp_path_factory.mktemp("long"))
    tm = wb.load(path, backend="torch")
    jm = wb.load(path, backend="jax")
    jm.compiler_options.update(FAST)
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 19))
    return cfg, path, tm, jm, ids


def _positions(S: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + S)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_summary_equals_the_full_patterns_statistics(models, backend):
    cfg, _, tm, jm, ids = models
    m = tm if backend == "torch" else jm
    t = m.run(ids, capture=["*.attn.summary", "*.attn.pattern"]).trace
    for i in range(cfg.num_hidden_layers):
        s = t[f"layers.{i}.attn.summary"]
        assert s.shape == (*ids.shape[:1], cfg.num_attention_heads, ids.shape[1],
                           len(SUMMARY_FEATURES)) and s.dtype == np.float32
        ref = attention_summary_reference(t[f"layers.{i}.attn.pattern"], _positions(19),
                                          _positions(19), cfg.attention_chunk_size)
        assert np.allclose(s, ref, rtol=1e-4, atol=1e-5), (i, np.abs(s - ref).max())
        buckets = s[..., 5:]
        assert np.allclose(buckets.sum(-1), 1, atol=1e-5)
        if cfg.chunk_size(i) is not None:  # a chunked layer sees only its own chunk
            assert np.allclose(s[..., SUMMARY_FEATURES.index("own_chunk")], 1, atol=1e-6)


def test_summary_and_windowed_pattern_agree_between_backends(models):
    cfg, _, tm, jm, ids = models
    cap = ["*.attn.summary", "*.attn.pattern"]
    for positions in (None, slice(-4, None), slice(3, 9)):
        a = tm.run(ids, capture=cap, positions=positions).trace
        b = jm.run(ids, capture=cap, positions=positions).trace
        for n in a:
            assert a[n].shape == b[n].shape, n
            assert rel(b[n], a[n]) <= TOL, (n, positions)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_windowed_pattern_is_the_full_patterns_rows(models, backend):
    cfg, _, tm, jm, ids = models
    m = tm if backend == "torch" else jm
    full = m.run(ids, capture="*.attn.pattern").trace
    win = m.run(ids, capture=["*.attn.pattern", "*.attn.summary", "logits"],
                positions=slice(-4, None))
    plain = m.run(ids, capture="logits")
    assert np.array_equal(win.logits, plain.logits)  # capturing changes nothing downstream
    for n in full:
        assert win.trace[n].shape == (2, cfg.num_attention_heads, 4, 19)
        np.testing.assert_allclose(win.trace[n], full[n][:, :, -4:], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_summary_in_decode_steps_matches_a_full_forward(models, backend):
    cfg, _, tm, jm, ids = models
    m = tm if backend == "torch" else jm
    g = m.generate(ids[:, :12], 4, temperature=0, capture="*.attn.summary")
    fed = g.sequences[:, :-1]  # every position the model saw
    full = m.run(fed, capture="*.attn.summary").trace
    for n in full:
        assert g.trace[n].shape == full[n].shape, n
        np.testing.assert_allclose(g.trace[n], full[n], rtol=1e-4, atol=1e-5)


def test_disable_temperature_changes_only_the_global_layers(models):
    cfg, _, tm, jm, ids = models
    hot = [i for i in range(cfg.num_hidden_layers) if cfg.uses_temperature(i)]
    assert hot
    runs = {}
    for name, m in (("torch", tm), ("jax", jm)):
        on = m.run(ids, capture="*.attn.q").trace
        off = m.run(ids, capture="*.attn.q", interventions=[wb.disable_temperature()]).trace
        runs[name] = off
        for i in range(cfg.num_hidden_layers):
            q_on, q_off = on[f"layers.{i}.attn.q"], off[f"layers.{i}.attn.q"]
            if i == hot[0]:  # upstream of any change: q differs by the temperature exactly
                from workbench.numerics import temperature_scales
                temp = temperature_scales(np.arange(19), cfg)
                assert temp.max() > 1
                np.testing.assert_allclose(q_on, q_off * temp[None, None, :, None], rtol=1e-6)
            elif i < hot[0]:
                assert np.array_equal(q_on, q_off)
    for n in runs["torch"]:
        assert rel(runs["jax"][n], runs["torch"][n]) <= TOL, n


def test_disable_temperature_refuses_layers_without_one(models):
    cfg, _, tm, _, ids = models
    rope = next(i for i in range(cfg.num_hidden_layers) if cfg.uses_rope(i))
    with pytest.raises(wb.InterventionError, match="no query temperature"):
        tm.run(ids, interventions=[wb.disable_temperature(rope)])
    with pytest.raises(wb.InterventionError, match="layer must be an int"):
        wb.disable_temperature(1.0)


def test_max_position_embeddings_at_load(models):
    cfg, path, *_ = models
    m = wb.load(path, max_position_embeddings=cfg.max_position_embeddings + 10)
    ids = np.zeros((1, cfg.max_position_embeddings + 5), np.int64)
    with pytest.raises(wb.InputError, match="max_position_embeddings"):
        wb.load(path).run(ids)
    assert m.config.max_position_embeddings == cfg.max_position_embeddings + 10
    with pytest.raises(wb.InputError, match="max_position_embeddings must be an int"):
        wb.load(path, max_position_embeddings="big")


def test_summary_shape_dtype_and_capture_estimate(models):
    cfg, *_ = models
    name = "layers.3.attn.summary"
    assert hk.hook_shape(cfg, name, 2, 7) == (2, cfg.num_attention_heads, 7,
                                              len(SUMMARY_FEATURES))
    assert hk.hook_dtype(name, np.dtype("float16")) == np.float32
    assert hk.seq_axis(name) == 2 and not hk.is_pattern(name)
    assert wb.load(models[1]).estimate_capture_bytes(name, 2, 7) == \
        2 * cfg.num_attention_heads * 7 * len(SUMMARY_FEATURES) * 4


def test_trace_records_the_positions_it_holds(models, tmp_path):
    cfg, _, tm, _, ids = models
    t = tm.run(ids, capture="layers.3.attn.summary", positions=slice(3, 9)).trace
    assert t.meta["positions"] == list(range(3, 9))
    t.save(tmp_path / "t.safetensors")
    assert wb.Trace.load(tmp_path / "t.safetensors").meta["positions"] == list(range(3, 9))
    assert "positions" not in tm.run(ids, capture="layers.3.attn.summary").trace.meta
