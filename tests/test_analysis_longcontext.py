"""Long-context analysis and figures: attention summaries of known patterns (built with the
reference definition of ``attn.summary``), routing by position and for repeated tokens, the
query temperature's effect on the bundled model, and the figures' artists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

import workbench as wb
from workbench import analysis as an
from workbench import plots as P
from workbench.analysis.longcontext import BUCKETS
from workbench.numerics import attention_mask, attention_summary_reference, distance_bucket_edges
from workbench.trace import Trace

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "data" / "scout-mini"
T = 300
CHUNK = 64
CFG = {"layers": 4, "nope_layers": [3], "chunk": CHUNK, "experts": 8, "moe_layers": [0, 1, 2, 3]}


# --------------------------------------------------------------------------- synthetic traces
def causal(T: int, chunk: int | None = None) -> np.ndarray:
    """(T, T) visibility mask: causal, within the chunk when given."""
    q = np.arange(T)
    return attention_mask(q, q, chunk).astype(np.float64)


def heads_summary(*patterns: np.ndarray, rows: int | None = None, own_chunk: int = CHUNK
                  ) -> np.ndarray:
    """``attn.summary`` (1, H, S, F) float32 of full (T, T) patterns, one per head; ``rows``
    keeps only the last rows (a windowed capture)."""
    p = np.stack(patterns)[None]
    n = p.shape[-1]
    q = np.arange(n)
    s = attention_summary_reference(p, q, q, own_chunk).astype(np.float32)
    return s if rows is None else s[:, :, n - rows:]


def sink_pattern(T: int) -> np.ndarray:
    p = np.zeros((T, T))
    p[:, 0] = 1.0
    return p


def uniform(T: int, chunk: int | None = None) -> np.ndarray:
    m = causal(T, chunk)
    return m / m.sum(axis=1, keepdims=True)


def trace_of(arrays: dict[str, np.ndarray], ids: np.ndarray | None = None,
             length: int = T) -> Trace:
    ids = np.zeros((1, length), np.int64) if ids is None else ids
    return Trace(arrays, ids, meta={"config": dict(CFG)})


@pytest.fixture(scope="module")
def synthetic() -> Trace:
    """Layer 0: chunked uniform on both heads; layer 3: head 0 all on the sink, head 1 on
    itself."""
    return trace_of({"layers.0.attn.summary": heads_summary(uniform(T, CHUNK), uniform(T, CHUNK)),
                     "layers.3.attn.summary": heads_summary(sink_pattern(T), np.eye(T))})


def bucket_of(d: np.ndarray) -> np.ndarray:
    return np.searchsorted(distance_bucket_edges(), d, side="right") - 1


# --------------------------------------------------------------------------- distances
def test_sink_pattern_puts_all_mass_in_the_bucket_of_q(synthetic):
    rows = an.distance_profile(synthetic, per_head=True)
    assert [(r["layer"], r["head"]) for r in rows] == [(0, 0), (0, 1), (3, 0), (3, 1)]
    sink, self_ = rows[2], rows[3]
    assert sink["type"] == "global" and sink["kind"] == "global NoPE"
    assert rows[0]["kind"] == "chunked RoPE"
    assert sink["queries"] == T and sink["sink"] == pytest.approx(1.0)
    assert sink["distance"] == pytest.approx(np.mean(np.arange(T)))
    # query q puts its whole mass at distance q: bucket masses = share of queries per bucket
    want = np.bincount(bucket_of(np.arange(T)), minlength=len(BUCKETS)) / T
    np.testing.assert_allclose([sink[b] for b in BUCKETS], want, atol=1e-6)
    assert self_["d=0"] == pytest.approx(1.0) and self_["distance"] == pytest.approx(0.0)
    for r in rows:
        assert sum(r[b] for b in BUCKETS) == pytest.approx(1.0, abs=1e-5)
    # chunked layer: nothing at distance >= chunk
    assert all(rows[0][b] == 0 for b, e in zip(BUCKETS, distance_bucket_edges()) if e >= CHUNK)
    mean = an.distance_profile(synthetic, layers=[3])
    assert len(mean) == 1 and "head" not in mean[0]
    assert mean[0]["d=0"] == pytest.approx((want[0] + 1.0) / 2, abs=1e-6)


def test_restricting_to_late_queries(synthetic):
    (row,) = an.distance_profile_past(synthetic, 128, layers=[3], per_head=True)[:1]
    assert row["queries"] == T - 128
    assert row["d[128,256)"] == pytest.approx(128 / (T - 128), abs=1e-6)
    assert row["d[256,512)"] == pytest.approx((T - 256) / (T - 128), abs=1e-6)
    vals, pos = an.summary_past(synthetic, 3, 290)
    assert vals.shape == (10, 2, len(wb.numerics.SUMMARY_FEATURES))
    np.testing.assert_array_equal(pos, np.arange(290, T))
    with pytest.raises(ValueError, match="no query at position"):
        an.distance_profile(synthetic, min_position=T)


def test_summary_by_position_known_features(synthetic):
    edges = [0, 1, 64, 128, 300]
    rows = an.summary_by_position(synthetic, "distance", layers=[3], bins=edges, per_head=True)
    sink = [r for r in rows if r["head"] == 0]
    assert [(r["lo"], r["hi"]) for r in sink] == list(zip(edges[:-1], edges[1:]))
    for r in sink:
        assert r["distance"] == pytest.approx((r["lo"] + r["hi"] - 1) / 2)
        assert r["position"] == pytest.approx((r["lo"] + r["hi"] - 1) / 2)
        assert r["queries"] == r["hi"] - r["lo"]
    ent = an.summary_by_position(synthetic, "entropy", layers=[0], bins=edges)
    for r in ent:  # uniform over the chunk: log(q mod chunk + 1)
        q = np.arange(r["lo"], r["hi"])
        assert r["entropy"] == pytest.approx(np.mean(np.log(q % CHUNK + 1)), rel=1e-5)
    own = an.summary_by_position(synthetic, "own_chunk", layers=[0], bins=4, scale="linear")
    assert [r["own_chunk"] for r in own] == pytest.approx([1.0] * 4)
    assert an.summary_by_position(synthetic, "d=0", layers=[3])[0]["d=0"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown feature 'perplexity'"):
        an.summary_by_position(synthetic, "perplexity")
    with pytest.raises(ValueError, match="strictly increasing"):
        an.summary_by_position(synthetic, "sink", bins=[0, 10, 10])


def test_windowed_summary_rows_are_the_last_positions():
    t = trace_of({"layers.3.attn.summary": heads_summary(sink_pattern(T), rows=16)})
    rows = an.summary_by_position(t, "distance", bins=[0, T - 16, T])
    assert len(rows) == 1 and rows[0]["lo"] == T - 16 and rows[0]["queries"] == 16
    assert rows[0]["distance"] == pytest.approx(T - 16 + 7.5)


def test_position_bins():
    e = an.position_bins(32768, 16)
    assert e[0] == 0 and e[-1] == 32768 and np.all(np.diff(e) > 0)
    assert e[1] == 1 and len(e) <= 17
    np.testing.assert_array_equal(an.position_bins(100, 4, "linear"), [0, 25, 50, 75, 100])
    wide = an.position_bins(32768, 16, min_width=64)
    assert np.all(np.diff(wide) >= 64)
    assert an.position_bins(1, 8).tolist() == [0, 1]
    with pytest.raises(ValueError, match="scale"):
        an.position_bins(100, 4, "cubic")


def test_missing_hooks_name_what_to_capture(synthetic):
    empty = trace_of({"layers.0.moe.topk_indices": np.zeros((1, T, 1), np.int32)})
    with pytest.raises(ValueError, match=r"attn\.summary"):
        an.distance_profile(empty)
    with pytest.raises(ValueError, match=r"layers\.3\.attn\.summary"):
        an.summary_by_position(empty, "entropy", layers=[3])
    with pytest.raises(ValueError, match=r"moe\.topk_indices"):
        an.routing_by_position(synthetic)
    with pytest.raises(ValueError, match=r"layers\.2\.moe\.topk_indices"):
        an.repeat_consistency(empty, layers=[2])
    with pytest.raises(ValueError, match=r"layers\.3\.attn\.pattern"):
        P.plot_attention_window(synthetic, 3)


# --------------------------------------------------------------------------- routing
def routing_trace(top: np.ndarray, ids: np.ndarray, layer: int = 0) -> Trace:
    return trace_of({f"layers.{layer}.moe.topk_indices": top[None, :, None].astype(np.int32)},
                    ids[None], length=ids.size)


def test_routing_by_position_divergence():
    n = 256
    top = np.where(np.arange(n) < n // 2, 0, 1)
    t = routing_trace(top, np.arange(n))
    rows = an.routing_by_position(t, bins=[0, 128, 256])
    assert [r["top_expert"] for r in rows] == [0, 1]
    assert rows[0]["fractions"].shape == (8,) and rows[0]["fractions"].sum() == pytest.approx(1)
    # each half, p = (1, 0), against the overall q = (1/2, 1/2): m = (3/4, 1/4)
    want = 0.5 * np.log2(4 / 3) + 0.5 * (0.5 * np.log2(2 / 3) + 0.5 * np.log2(2))
    assert rows[0]["js"] == pytest.approx(want) and rows[1]["js"] == pytest.approx(want)
    assert rows[0]["tokens"] == 128
    flat = an.routing_by_position(routing_trace(np.arange(n) % 8, np.arange(n)), bins=4,
                                  scale="linear")
    assert [r["js"] for r in flat] == pytest.approx([0.0] * 4, abs=1e-12)
    assert [r["position"] for r in flat] == pytest.approx([31.5, 95.5, 159.5, 223.5])


def test_repeat_consistency_known_routing():
    # token 5 at 0, 1, 3 and 9; token 7 at 2 and 10; expert = token id, except position 9
    ids = np.array([5, 5, 7, 5, 1, 2, 3, 4, 6, 5, 7, 0])
    top = ids % 8
    top[9] = 3
    rows = an.repeat_consistency(routing_trace(top, ids), seed=1)
    got = {(r["lo"], r["hi"]): r for r in rows}
    # pairs (distance): 5@1 (1), 5@3 (3), 5@9 (9, differs), 7@10 (8)
    assert got[(1, 2)]["pairs"] == 1 and got[(1, 2)]["same"] == 1.0
    assert got[(2, 4)]["pairs"] == 1 and got[(2, 4)]["same"] == 1.0
    assert got[(8, 16)]["pairs"] == 2 and got[(8, 16)]["same"] == 0.5
    assert sum(r["pairs"] for r in rows) == 4
    load = np.bincount(top, minlength=8) / top.size
    assert rows[0]["chance"] == pytest.approx(np.sum(load ** 2))
    assert all(0 <= r["control"] <= 1 for r in rows)
    with pytest.raises(ValueError, match="no token id occurs twice"):
        an.repeat_consistency(routing_trace(np.arange(8), np.arange(8)))
    with pytest.raises(ValueError, match="do not match"):
        an.repeat_consistency(routing_trace(top, ids), np.arange(5))


# --------------------------------------------------------------------------- bundled model
@pytest.fixture(scope="module")
def bundled():
    if not (MODEL / "config.json").exists():
        pytest.skip(f"bundled model missing at {MODEL}")
    model = wb.load(MODEL)
    tok = wb.Tokenizer.from_pretrained(MODEL)
    ids: list[int] = []
    with open(ROOT / "data" / "corpus" / "val.jsonl") as f:
        for line in f:
            ids += tok.encode(json.loads(line)["text"], add_bos=not ids)
            if len(ids) >= T:
                break
    return model, np.array([ids[:T]])


def test_temperature_effect_on_the_bundled_model(bundled):
    model, ids = bundled
    fs = model.config.floor_scale
    assert fs < T and model.config.uses_temperature(3)
    rows = an.temperature_effect(model, ids, bins=[0, fs - 1, 128, T])
    assert [(r["layer"], r["lo"], r["hi"]) for r in rows] == [(3, 0, fs - 1), (3, fs - 1, 128),
                                                               (3, 128, T)]
    early, mid, late = rows
    assert early["temperature"] == 1.0 and late["temperature"] > mid["temperature"] > 1.0
    for f in ("entropy", "distance", "max"):  # no temperature below floor_scale - 1: same run
        assert early[f"{f}_diff"] == pytest.approx(0.0, abs=1e-5)
        assert early[f"{f}_on"] == pytest.approx(early[f"{f}_off"], abs=1e-5)
    # a temperature > 1 sharpens every softmax row: less entropy, a larger top weight
    assert late["entropy_diff"] < 0 and late["max_diff"] > 0
    assert mid["entropy_diff"] <= 1e-6 and mid["max_diff"] >= -1e-6
    assert late["uniform_entropy"] == pytest.approx(np.mean(np.log(np.arange(128, T) + 1)))
    # a plain trace of the same run stands in for the "on" run
    trace = model.run(ids, capture=["layers.3.attn.summary"]).trace
    again = an.temperature_effect(model, ids, layer=3, bins=[0, fs - 1, 128, T], trace=trace)
    assert [r["entropy_on"] for r in again] == pytest.approx([r["entropy_on"] for r in rows])
    with pytest.raises(ValueError, match="plain run"):
        an.temperature_effect(model, ids[:, :100], trace=trace)
    with pytest.raises(ValueError, match="layer 0 has no query temperature"):
        an.temperature_effect(model, ids, layer=0)
    fig = P.plot_temperature_effect(rows, floor_scale=fs)
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    assert {ln.get_gid() for ln in fig.axes[0].lines} >= {"on-3", "off-3", "uniform",
                                                          "floor-scale"}


def test_routing_on_the_bundled_model(bundled):
    model, ids = bundled
    trace = model.run(ids, capture=["*.moe.topk_indices"]).trace
    rows = an.routing_by_position(trace, bins=[0, 64, 128, T])
    assert sorted({r["layer"] for r in rows}) == model.config.moe_layers
    assert all(0 <= r["js"] <= 1 for r in rows)
    assert sum(r["tokens"] for r in rows if r["layer"] == 0) == T
    rep = an.repeat_consistency(trace, ids)
    assert rep and all(0 <= r["same"] <= 1 for r in rep)
    fig = P.plot_routing_by_position(trace, bins=[0, 64, 128, T])
    js = [ln for ax in fig.axes for ln in ax.lines if str(ln.get_gid()).startswith("js-")]
    assert len(js) == len(model.config.moe_layers)
    assert any(ln.get_gid() == "noise-floor" for ln in fig.axes[len(js)].lines)
    assert len([im for ax in fig.axes for im in ax.images]) == len(model.config.moe_layers)
    fig = P.plot_repeat_consistency(trace)
    gids = {ln.get_gid() for ln in fig.axes[0].lines}
    assert {"same-0", "control-3", "chance-2"} <= gids


# --------------------------------------------------------------------------- figures
def test_distance_and_position_figures(synthetic):
    fig = P.plot_distance_profile(synthetic)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    gids = [ln.get_gid() for ln in ax.lines]
    assert gids.count("layer-0") == 1 and gids.count("layer-3") == 1 and "chunk-size" in gids
    n = len(ax.lines[0].get_xdata())
    assert n == int(np.searchsorted(distance_bucket_edges(), T - 1, side="right"))
    assert "distance" in ax.get_xlabel()
    fig = P.plot_summary_by_position(synthetic, "entropy", floor_scale=64)
    gids = {ln.get_gid() for ln in fig.axes[0].lines}
    assert {"layer-0", "layer-3", "uniform", "chunk-size", "floor-scale"} <= gids
    assert fig.axes[0].get_xscale() == "symlog"
    fig = P.plot_summary_by_position(synthetic, "sink", layers=[3], scale="linear")
    assert "sink" in fig.axes[0].get_ylabel()


def test_attention_window_figure():
    Tq, Tk = 8, 3000
    p = np.zeros((1, 2, Tq, Tk), np.float32)
    p[..., 0] = 0.5
    p[..., -1] = 0.5
    t = trace_of({"layers.3.attn.pattern": p}, length=Tk)
    fig = P.plot_attention_window(t, 3, max_columns=500)
    (im,) = fig.axes[0].images
    assert im.get_array().shape == (Tq, 500)
    np.testing.assert_allclose(np.ma.getdata(im.get_array()).sum(axis=1), 1.0, rtol=1e-6)
    assert "global NoPE" in fig.get_suptitle()
    with pytest.raises(ValueError, match="head 5 out of range"):
        P.plot_attention_window(t, 3, head=5)
