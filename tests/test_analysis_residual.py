"""Logit lens, activation patching, top-expert knockout, routing diff and load by position /
frequency on a tiny random checkpoint, with exact expectations."""

from __future__ import annotations

import numpy as np
import pytest

import workbench as wb
from workbench import analysis as an
from workbench import plots as P
from workbench.random_weights import write_random_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("resid") / "ckpt"
    write_random_checkpoint(path, wb.ModelConfig.tiny(vocab_size=512), router_std=0.5)
    model = wb.load(path)
    ids = np.random.default_rng(0).integers(3, 500, (1, 10))
    return {"path": path, "model": model, "ids": ids, "ckpt": wb.Checkpoint.open(path)}


def _unembed(ckpt):
    return ckpt["lm_head.weight"] if "lm_head.weight" in list(ckpt) else \
        ckpt["embed_tokens.weight"]


def test_logit_lens_last_layer_is_the_model(tiny):
    m, ckpt = tiny["model"], tiny["ckpt"]
    out = m.run(tiny["ids"], capture=["*.resid_post", "logits"])
    lens = an.logit_lens(out.trace, ckpt["norm.weight"], _unembed(ckpt),
                         eps=m.config.rms_norm_eps)
    L = m.config.num_hidden_layers
    assert lens.layers == list(range(L)) and lens.p_final.shape == (L, 10)
    # the last layer's lens is the model's own output: same top-1 and ~zero KL
    np.testing.assert_array_equal(lens.top_ids[-1, :, 0], out.logits[0].argmax(-1))
    assert np.abs(lens.kl[-1]).max() < 1e-4
    assert lens.kl[0].mean() > lens.kl[-1].mean()
    assert lens.p_next.shape == (L, 9)
    fig = P.logit_lens_plot(lens, input_ids=tiny["ids"])
    assert fig.axes[0].images[0].get_array().shape == (L, 10)
    with pytest.raises(ValueError, match="resid_post"):
        an.logit_lens(m.run(tiny["ids"], capture=["*.moe.*"]).trace, ckpt["norm.weight"],
                      _unembed(ckpt))


def test_patching_the_changed_token_at_layer_0_restores_everything(tiny):
    m = tiny["model"]
    clean = tiny["ids"].copy()
    bad = clean.copy()
    bad[0, 4] = (clean[0, 4] + 7) % 500
    res = an.activation_patching(m, clean, bad, layers=[0, 2], positions=[2, 4, 9])
    assert res.recovery.shape == (2, 3)
    # at layer 0 the residual stream is the embedding: only the changed position differs
    np.testing.assert_allclose(res.recovery[0], [0.0, 1.0, 0.0], atol=1e-4)
    fig = P.patching_heatmap(res)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert "→" in labels[1]
    with pytest.raises(ValueError, match="same length"):
        an.activation_patching(m, clean, bad[:, :5])


def test_top_expert_knockout(tiny):
    m = tiny["model"]
    k = an.top_expert_knockout(m, tiny["ids"], layers=[1], fractions=(0.0, 0.25, 0.5),
                               n_random=2)
    assert k.counts.tolist() == [0, 2, 4]
    assert k.top_loss[0] == pytest.approx(k.base_loss)
    assert k.top_loss[2] != pytest.approx(k.base_loss)
    assert len(P.knockout_plot(k).axes[0].lines) == 3
    with pytest.raises(ValueError, match="leave at least"):
        an.top_expert_knockout(m, tiny["ids"], fractions=(1.0,))


def test_routing_diff_aligns_around_the_edit(tiny):
    m = tiny["model"]
    a = m.run(tiny["ids"], capture=["*.moe.*"]).trace
    b_ids = tiny["ids"].copy()
    b_ids[0, 4] = (b_ids[0, 4] + 7) % 500
    b = m.run(b_ids, capture=["*.moe.*"]).trace
    same = an.routing_diff(a, a)
    assert np.all(same.agreement == 1.0) and np.allclose(same.js, 0.0)
    d = an.routing_diff(a, b)
    assert d.edited_a.tolist() == [4] and d.edited_b.tolist() == [4]
    assert len(d.pairs) == 9
    # tokens before the edit cannot see it (causal attention): identical routing there
    assert not d.changed[:, d.pairs[:, 0] < 4].any()
    fig = P.routing_diff_plot((a, b))
    assert "edit" in fig.axes[1].get_title(loc="left")


def test_load_by_position_and_frequency(tiny):
    tr = tiny["model"].run(np.tile(tiny["ids"], (2, 3)), capture=["*.moe.*"]).trace
    edges, load = an.load_by_position(tr, 1, bins=5)
    assert edges[0] == 0 and edges[-1] == 30 and np.allclose(load.sum(1), 1)
    fe, fl = an.load_by_frequency(tr, 1, bins=3)
    assert np.allclose(fl.sum(1)[fl.sum(1) > 0], 1)
    fig = P.load_by_position_frequency(tr, 1)
    assert len(fig.axes[0].images) == 1
