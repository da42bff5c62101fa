"""Large-model mode: every figure stays bounded and readable on Scout- and Maverick-shaped
traces (48 layers; 16 experts everywhere, or 128 experts on every other layer), built
synthetically without weights."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_scale import MAX_LEGEND, figure_makers, legend_sizes

from workbench import plots as P
from workbench.demo import synthetic_traces
from workbench.plots._util import MAX_INCHES, OTHER


@pytest.fixture(scope="module", params=["scout", "maverick"])
def big(request):
    return synthetic_traces(request.param, n_docs=4, seq=48, seed=1)


def test_synthetic_shapes():
    scout = synthetic_traces("scout", n_docs=1, seq=8)[0]
    mav = synthetic_traces("maverick", n_docs=1, seq=8)[0]
    assert scout.moe_layers == list(range(48)) and scout.num_experts == 16
    assert mav.moe_layers == list(range(1, 48, 2)) and mav.num_experts == 128
    with pytest.raises(ValueError, match="shape must be one of"):
        synthetic_traces("gpt")


def test_every_figure_bounded_with_short_legends(big):
    """Pixel size bounded (1,600 × 1,300 px at 100 dpi) and no legend over 20 entries."""
    for name, make in figure_makers(big).items():
        fig = make()
        w, h = fig.get_size_inches()
        assert w <= MAX_INCHES[0] + 1e-6 and h <= MAX_INCHES[1] + 1e-6, (name, w, h)
        assert all(n <= MAX_LEGEND for n in legend_sizes(fig)), (name, legend_sizes(fig))


def test_token_text_top_experts_in_colour_rest_grey():
    tr = synthetic_traces("maverick", n_docs=1, seq=160, seed=3)[0]
    layer = tr.moe_layers[0]
    top1 = tr.routing(layer).indices[0, :, 0]
    assert len(set(top1.tolist())) > 12                     # more experts than colours
    fig = P.token_routing_text(tr, layer, max_experts=8)
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert sum(lab.startswith("E") for lab in labels) == 8
    assert any(lab.startswith("other (") for lab in labels)
    grey = [p for p in fig.axes[0].patches if p.get_facecolor()[:3] == P.style.to_rgb(OTHER)]
    counts = np.bincount(top1)
    kept = np.argsort(-counts, kind="stable")[:8]
    assert len(grey) == int(len(top1) - counts[kept].sum())


def test_expert_flow_aggregates_to_top_experts_and_layers():
    ts = synthetic_traces("maverick", n_docs=2, seq=64)
    fig = P.expert_flow(ts, max_experts=6, max_layers=5, max_bands=10)
    ax = fig.axes[0]
    nodes = [p.get_gid() for p in ax.patches if (p.get_gid() or "").startswith("node-")]
    per_layer: dict[str, int] = {}
    for g in nodes:
        per_layer[g.split("-")[1]] = per_layer.get(g.split("-")[1], 0) + 1
    assert len(per_layer) == 5 and max(per_layer.values()) <= 7     # 6 experts + "other"
    assert any(g.endswith("-other") for g in nodes)
    bands = [p for p in ax.patches if p.get_gid() is None]
    assert len(bands) <= 4 * 10
    assert "5 of 24 MoE layers" in ax.get_title()


def test_many_layer_lines_get_a_colour_bar_not_a_legend():
    ts = synthetic_traces("scout", n_docs=2, seq=32)
    fig = P.capacity_plot(ts, layers=list(range(20)))
    assert legend_sizes(fig) == [1]                              # only "cf = 1"
    assert any(ax.get_ylabel() == "layer" for ax in fig.axes)    # the colour bar


class _Replay:
    """A stand-in model for the explorers at scale: runs return synthetic routing for the
    given ids (Scout or Maverick shaped); no weights."""

    def __init__(self, shape: str):
        t = synthetic_traces(shape, n_docs=1, seq=4)[0]
        self.shape = shape
        self.config = type("Cfg", (), {"moe_layers": t.moe_layers,
                                        "num_local_experts": t.num_experts,
                                        "vocab_size": 2048})()

    def run(self, ids, capture=None, interventions=None):
        from types import SimpleNamespace

        from workbench.trace import Trace
        ids = np.asarray(ids)
        t = synthetic_traces(self.shape, n_docs=1, seq=ids.shape[-1], patterns=False)[0]
        return SimpleNamespace(trace=Trace(dict(t), ids, t.meta), logits=None)


@pytest.mark.parametrize("shape", ["scout", "maverick"])
def test_routing_explorer_figures_at_scale(shape):
    pytest.importorskip("ipywidgets")
    from workbench.widgets.routing import RoutingState
    s = RoutingState(_Replay(shape), tokenizer=None, max_tokens=64)
    s.select_token(5)
    for fig in (s.render_tokens(), s.render_path(), s.render_load()):
        w, h = fig.get_size_inches()
        assert w <= 14.0 + 1e-6 and h <= 8.0 + 1e-6
        assert all(n <= MAX_LEGEND for n in legend_sizes(fig))
    load = s.render_load()
    if shape == "maverick":   # 128 experts: a heatmap, not hairline bars
        assert len(load.axes[0].images) == 1 and not load.axes[0].patches[:-1]
    else:
        assert len(load.axes) <= 8 and load.axes[0].patches
