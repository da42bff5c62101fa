"""Bootstrap intervals, shuffle baselines and DataFrame export on synthetic traces."""

from __future__ import annotations

import numpy as np
import pytest

from workbench import analysis as an
from workbench.demo import synthetic_traces
from workbench.trace import Trace


@pytest.fixture(scope="module")
def docs():
    return synthetic_traces("tiny", n_docs=16, seq=48, seed=2)


def _relabelled(traces, seed):
    """The same documents with domains assigned at random: no domain effect left."""
    rng = np.random.default_rng(seed)
    doms = rng.permutation([t.meta["domain"] for t in traces])
    return [Trace(dict(t), t.input_ids, {**t.meta, "domain": d}) for t, d in zip(traces, doms)]


def test_domain_effect_clears_its_shuffle_baseline(docs):
    e = an.domain_js_estimate(docs, 1, n_boot=100, n_shuffle=100)
    assert e.ci_low <= e.value <= e.ci_high
    assert e.above_baseline and e.p_value < 0.05
    assert e.baseline > 0                              # plug-in JS is positive on finite data
    assert e.n_docs == 16 and e.n_tokens == 16 * 48
    null = an.domain_js_estimate(_relabelled(docs, 0), 1, n_boot=50, n_shuffle=100)
    assert not null.above_baseline and null.p_value > e.p_value


def test_category_and_vocabulary_estimates(docs):
    ids = np.concatenate([t.input_ids.ravel() for t in docs])
    parity = np.where(ids % 2 == 0, "even", "odd")      # unrelated to routing
    e = an.category_nmi_estimate(docs, 1, parity, n_boot=50, n_shuffle=100)
    assert not e.above_baseline and e.p_value > 0.05
    assert e.value == pytest.approx(an.category_specialisation(docs, 1, parity).nmi)
    v = an.vocabulary_estimate(docs, 1, min_count=2, n_boot=50, n_shuffle=50)
    assert v.value == pytest.approx(an.vocabulary_specialisation(docs, 1, 2).score)
    assert v.above_baseline                             # synthetic routing depends on the id
    allx = an.specialisation_estimates(docs, [0, 1], parity, n_boot=10, n_shuffle=10)
    assert set(allx) == {"domain_js", "category_nmi", "vocabulary"}
    assert set(allx["vocabulary"]) == {0, 1}
    with pytest.raises(ValueError, match="two or more domains"):
        an.domain_js_estimate({"all": docs}, 1)
    with pytest.raises(ValueError, match="n_boot"):
        an.vocabulary_estimate(docs, 1, n_boot=0)


def test_frames(docs):
    pd = pytest.importorskip("pandas")
    tr = docs[0]
    f = tr.to_frame()
    L, T, k = len(tr.moe_layers), tr.input_ids.shape[1], 1
    assert len(f) == L * T * k
    assert list(f.columns) == ["batch", "position", "token_id", "layer", "slot", "expert",
                               "gate", "margin"]
    row = f[(f.layer == 2) & (f.position == 5)].iloc[0]
    z = np.sort(tr["layers.2.moe.router_logits"][0, 5].astype(np.float64))
    assert row.expert == tr["layers.2.moe.topk_indices"][0, 5, 0]
    assert row.token_id == tr.input_ids[0, 5]
    assert row.margin == pytest.approx(z[-1] - z[-2])
    lf = an.load_frame(docs)
    assert np.allclose(lf.groupby("layer")["load"].sum(), 1.0)
    df = an.domain_frame(docs, [1])
    assert set(df.domain) == {t.meta["domain"] for t in docs}
    ef = an.estimates_frame(an.specialisation_estimates(docs, [1], n_boot=5, n_shuffle=5))
    assert isinstance(ef, pd.DataFrame) and set(ef.metric) == {"domain_js", "vocabulary"}
