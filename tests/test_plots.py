"""Every figure renders on real traces of a tiny random checkpoint, with the expected artists."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import PathPatch, Rectangle

import workbench as wb
from workbench import analysis as an
from workbench import plots as P
from workbench.plots import style
from workbench.random_weights import write_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "data" / "tokenizer" / "tokenizer.json"
TEXTS = {"code": ["def f(x):\n    return x + 1\n", "s = '$5 or $6'\nfor i in range(3):\n"],
         "prose": ["The quick brown fox jumps over the lazy dog.",
                   "A licence grants permission to copy the work."]}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny random checkpoint (chunk 8, NoPE at layer 3), its model, tokenizer and traces."""
    path = tmp_path_factory.mktemp("plots") / "ckpt"
    write_random_checkpoint(path, wb.ModelConfig.tiny(vocab_size=4096), router_std=0.5)
    shutil.copy(TOKENIZER, path / "tokenizer.json")
    model = wb.load(path)
    tok = wb.Tokenizer.from_pretrained(path)
    traces = []
    for dom, texts in TEXTS.items():
        for text in texts:
            ids = np.array([tok.encode(text)[:20]])
            tr = model.run(ids, capture=["*.moe.*", "layers.0.attn.pattern",
                                         "layers.3.attn.pattern"]).trace
            tr.meta["domain"] = dom
            traces.append(tr)
    return {"path": path, "model": model, "tok": tok, "traces": traces,
            "cfg": model.config}


def _images(fig: Figure) -> list[AxesImage]:
    return [im for ax in fig.axes for im in ax.images]


def test_load_heatmap_shape_and_uniform_centre(env):
    fig = P.load_heatmap(env["traces"])
    assert isinstance(fig, Figure)
    (im,) = _images(fig)
    E = env["cfg"].num_local_experts
    assert im.get_array().shape == (len(env["cfg"].moe_layers), E)
    ratio = np.asarray(im.get_array())
    np.testing.assert_allclose(ratio.sum(axis=1), E)          # f·E sums to E per layer
    assert im.norm(1.0) == pytest.approx(0.5)                   # centred at uniform (log2)
    assert "1/E" in fig.axes[0].get_title()


def test_imbalance_three_panels_each_with_its_own_balanced_reference(env):
    fig = P.imbalance_bars(env["traces"])
    cv_ax, mm_ax, ent_ax = fig.axes
    n = len(env["cfg"].moe_layers)
    assert all(len(a.patches) == n for a in fig.axes)
    load = an.load_matrix(env["traces"])
    cvs = sorted(p.get_height() for p in cv_ax.containers[0])
    np.testing.assert_allclose(cvs, sorted(an.load_cv(load)), rtol=1e-9)
    # balanced CV is 0, balanced max/mean and entropy are 1: one reference line per panel
    refs = [[ln.get_ydata()[0] for ln in a.lines] for a in fig.axes]
    assert refs == [[0.0], [1.0], [1.0]]
    assert [a.get_ylabel() for a in fig.axes] == ["CV", "max / mean", "entropy / log E"]


def test_token_text_one_text_per_token_coloured_by_expert(env):
    tr = env["traces"][0]
    fig = P.token_routing_text(tr, layer=1, tokenizer=env["tok"], width=12)
    ax = fig.axes[0]
    T = tr.input_ids.shape[1]
    strings = env["tok"].token_strings(tr.input_ids[0])
    assert [t.get_text() for t in ax.texts] == strings
    rects = [p for p in ax.patches if isinstance(p, Rectangle)]
    top1 = tr.routing(1).indices[0, :, 0]
    assert len(rects) == T
    for r, e in zip(rects, top1):
        assert r.get_facecolor() == pytest.approx(style.expert_color(int(e)))
    lines = {round(t.get_position()[1], 3) for t in ax.texts}
    assert len(lines) > 1                                       # wrapped at 12 characters
    assert fig.legends and fig.legends[0].get_texts()


def test_margin_and_gate_histograms_mark_near_ties(env):
    eps = 0.05
    fig = P.margin_histogram(env["traces"], eps=eps)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    eps_lines = [ln for ln in ax.lines if ln.get_gid() == "near-tie-eps"]
    assert eps_lines and eps_lines[0].get_xdata()[0] == pytest.approx(eps)
    assert any(p.get_gid() == "near-tie" for p in ax.patches)
    frac = an.near_tie_fraction(env["traces"], 0, eps)
    assert any(f"{frac:.1%} near-tie" in t.get_text() for t in ax.get_legend().get_texts())
    one = P.margin_histogram(env["traces"], [1], eps=eps).axes[0]
    red = [p for p in one.patches if p.get_gid() != "near-tie"
           and p.get_facecolor()[:3] == pytest.approx(to_rgb(style.WARN))]
    assert red or an.near_tie_fraction(env["traces"], 1, eps) == 0
    g = P.gate_histogram(env["traces"], [1], eps=eps).axes[0]
    assert any("near-tie" in t.get_text() for t in g.get_legend().get_texts())
    g_all = P.gate_histogram(env["traces"], eps=eps).axes[0]
    assert any("near-tie" in t.get_text() for t in g_all.get_legend().get_texts())


def test_same_expert_and_run_lengths(env):
    ts = env["traces"]
    fig = P.same_expert_rate_plot(ts)
    ax = fig.axes[0]
    E = env["cfg"].num_local_experts
    assert any(ln.get_ydata()[0] == pytest.approx(1 / E) for ln in ax.lines)
    heights = [p.get_height() for p in ax.containers[0]]
    assert heights == pytest.approx([an.same_expert_rate(ts, i).top1
                                     for i in env["cfg"].moe_layers])
    assert isinstance(P.run_length_plot(ts, 1), Figure)


def test_transition_heatmap_and_flow(env):
    ts = env["traces"]
    fig = P.transition_heatmap(ts, 0, 1)
    (im,) = _images(fig)
    np.testing.assert_allclose(np.ma.getdata(im.get_array()), an.transition_matrix(ts, 0, 1))
    flow = P.expert_flow(ts)
    ax = flow.axes[0]
    nodes = [p for p in ax.patches if (p.get_gid() or "").startswith("node-")]
    used = sum(int(np.count_nonzero(an.expert_counts(ts, i))) for i in env["cfg"].moe_layers)
    assert len(nodes) == used
    assert any(isinstance(p, PathPatch) for p in ax.patches)


def test_specialisation_figures(env):
    ts = env["traces"]
    fig = P.domain_heatmap(ts, 1)
    (im,) = _images(fig)
    assert im.get_array().shape == (2, env["cfg"].num_local_experts)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0].startswith("code") and "JS" in labels[0]
    ids = np.concatenate([t.input_ids.ravel() for t in ts])
    cats = env["tok"].categories(ids)
    fig = P.category_heatmap(ts, 1, cats)
    assert _images(fig)[0].get_array().shape[0] == len(set(cats))
    assert "NMI" in fig.axes[0].get_title()
    assert isinstance(P.specialisation_by_layer(ts, categories=cats), Figure)
    assert isinstance(P.domain_divergence_plot(ts), Figure)
    assert isinstance(P.routed_share_plot(ts), Figure)
    assert isinstance(P.capacity_plot(ts), Figure)


def test_top_tokens_table_uses_token_strings(env):
    ts = env["traces"]
    fig = P.top_tokens_table(ts, 1, tokenizer=env["tok"], n=3)
    table = fig.axes[0].tables[0]
    E = env["cfg"].num_local_experts
    cells = table.get_celld()
    assert max(r for r, _ in cells) == E                     # header + one row per expert
    top = an.top_tokens_per_expert(ts, 1, n=3)
    e = next(i for i, row in enumerate(top) if row)
    first = env["tok"].token_strings([top[e][0][0]])[0]
    assert first.replace("$", r"\$") in cells[(e + 1, 2)].get_text().get_text()


def test_router_similarity(env):
    W = wb.Checkpoint.open(env["path"])["layers.1.feed_forward.router.weight"]
    fig = P.router_similarity(W, layer=1)
    (im,) = _images(fig)
    E = env["cfg"].num_local_experts
    S = an.router_cosine_similarity(W)
    assert im.get_array().shape == (E, E)
    assert np.ma.getmaskarray(im.get_array()).diagonal().all()
    np.testing.assert_allclose(np.ma.getdata(im.get_array())[0, 1], S[0, 1])
    with pytest.raises(ValueError, match="exactly one"):
        P.router_similarity()


def test_expert_weight_similarity_precision_and_random_band():
    """Near-orthogonal experts (cosines ~0.01): cell texts and title get enough decimals to
    tell values apart (no wall of "0.00"), and the random band uses the flattened length."""
    rng = np.random.default_rng(0)
    gate_up, down = rng.normal(size=(6, 40, 80)), rng.normal(size=(6, 40, 20))
    fig = P.expert_weight_similarity([gate_up, down], layer=2)
    ax = fig.axes[0]
    cells = [t.get_text() for t in ax.texts]
    assert len(cells) == 6 * 5 and len(set(cells)) > 5
    assert not any(c in ("0.00", "-0.00") or c.startswith("-0.000") for c in cells)
    title = ax.get_title()
    band = 2 / np.sqrt(40 * 80 + 40 * 20)
    assert "Expert weight similarity, layer 2" in title
    assert f"random vectors: 0 ± {band:.3f}" in title


def test_attention_pattern_chunk_lines_and_layer_type(env):
    tr = env["traces"][0]
    T = tr.input_ids.shape[1]
    chunk = env["cfg"].attention_chunk_size
    expected = [b - 0.5 for b in range(chunk, T, chunk)]
    assert expected                                                # the input crosses a chunk
    for layer, kind, want in ((0, "chunked RoPE", expected), (3, "global NoPE", [])):
        fig = P.attention_pattern(tr, layer, tokenizer=env["tok"])
        ax = fig.axes[0]
        assert kind in ax.get_title()
        bounds = [ln for ln in ax.lines if ln.get_gid() == "chunk-boundary"]
        xs = sorted(ln.get_xdata()[0] for ln in bounds if ln.get_xdata()[0] == ln.get_xdata()[1]
                    and ln.get_transform() == ax.get_xaxis_transform())
        ys = sorted(ln.get_ydata()[0] for ln in bounds if ln.get_transform()
                    == ax.get_yaxis_transform())
        assert xs == pytest.approx(want) and ys == pytest.approx(want)
        assert _images(fig)[0].get_array().shape == (T, T)
        assert len(ax.get_xticklabels()) == T                     # token labels
    head = P.attention_pattern(tr, 0, head=1)
    assert "head 1" in head.axes[0].get_title()
    fig = P.attention_by_layer_type(env["traces"])
    # two pattern layers: a table of their numbers and the distance profile, not 3 × 2 bars
    assert len(fig.axes) == 2 and "NoPE" in fig.get_suptitle()
    cells = fig.axes[0].tables[0].get_celld()
    assert {cells[(r, 0)].get_text().get_text() for r in (1, 2)} == {"L0", "L3"}
    # on a global layer, boundaries can still be drawn as a reference when asked for
    ref = P.attention_pattern(tr, 3, chunk=chunk)
    assert any(ln.get_gid() == "chunk-boundary" for ln in ref.axes[0].lines)


def test_parity_one_point_per_hook(env):
    bf = wb.load(env["path"], dtype="bfloat16")
    rep = wb.compare(env["model"], bf, env["traces"][0].input_ids,
                     capture=["*.moe.router_logits", "*.attn.out", "logits"])
    fig = P.parity_errors(rep)
    ax = fig.axes[0]
    n = sum(len(c.get_offsets()) for c in ax.collections)
    assert n == len(rep.records())
    assert any(ln.get_ydata()[0] == pytest.approx(rep.tol) for ln in ax.lines)
    assert isinstance(P.parity_errors(rep.records(), tol=1e-3), Figure)


def test_ablation_bars(env):
    ids = np.concatenate([t.input_ids[:, :8] for t in env["traces"][:2]])
    res = an.expert_ablation(env["model"], {"code": ids}, 1, experts=[0, 1], n_random=1)
    fig = P.ablation_bars(res)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.containers[0]]
    assert heights == pytest.approx(res.delta_loss[0].tolist())
    assert isinstance(P.ablation_bars(res, metric="flip_rate"), Figure)


def test_training_and_stability(env):
    E = env["cfg"].num_local_experts
    log = an.new_training_log()
    rng = np.random.default_rng(0)
    for step in (10, 20, 30):
        loads = {i: rng.dirichlet(np.ones(E)) for i in env["cfg"].moe_layers}
        log["steps"].append(an.training_log_entry(step, 5.0 - step / 10, loads,
                                                  {i: 2.0 for i in loads},
                                                  val_loss=5.1 if step == 30 else None))
    fig = P.training_curves_plot(log)
    assert len(fig.axes) == 3
    assert len(fig.axes[1].lines) == len(env["cfg"].moe_layers) + 1  # layers + zero line
    ts = env["traces"]
    rows = an.routing_stability(ts, ts)
    fig = P.routing_stability_plot({"self": rows}, experts=E)
    assert fig.axes[0].lines[0].get_ydata() == pytest.approx([1.0] * len(rows))


def test_ax_argument_draws_into_given_axes(env):
    fig = style.new_figure((8, 3))
    a, b = fig.subplots(1, 2)
    assert P.load_heatmap(env["traces"], ax=a) is fig
    assert P.margin_histogram(env["traces"], ax=b) is fig
    assert a.images and b.patches
    fig2 = style.new_figure((8, 3))
    c = fig2.subplots()
    tr = env["traces"][0]
    assert P.token_routing_text(tr, 1, ax=c) is fig2
    assert len(c.texts) == tr.input_ids.shape[1] and c.get_legend() is not None


def test_expert_colours_are_stable():
    assert P.expert_color(3) == P.expert_colors(8)[3] == P.expert_colors(128)[3]
    cols = P.expert_colors(128)
    assert len(set(cols)) == 128
    with pytest.raises(ValueError):
        P.expert_color(-1)


def test_token_figures_render_dollar_signs(env):
    """Token text is never read as mathtext: '$5 or $6' draws as written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    tr = env["traces"][1]
    assert any("$" in s for s in env["tok"].token_strings(tr.input_ids[0]))
    for fig in (P.token_routing_text(tr, 1, tokenizer=env["tok"]),
                P.top_tokens_table([tr], 1, tokenizer=env["tok"]),
                P.attention_pattern(tr, 0, tokenizer=env["tok"])):
        FigureCanvasAgg(fig).draw()


def test_save_formats(env, tmp_path):
    fig = P.imbalance_bars(env["traces"])
    for suffix, magic in ((".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<?xml")):
        out = P.save(fig, tmp_path / "sub" / f"fig{suffix}")
        assert out.read_bytes()[:len(magic)] == magic
    assert fig._repr_png_()[:4] == b"\x89PNG"          # shows in Jupyter without pyplot
    with pytest.raises(ValueError, match=".xyz"):
        P.save(fig, tmp_path / "fig.xyz")
    assert not (tmp_path / "fig.xyz").exists()


def test_plots_import_no_framework():
    import subprocess
    import sys
    code = ("import sys, workbench.plots, workbench.report; "
            "print(any(m in sys.modules for m in ('torch', 'jax', 'ipywidgets')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_top_tokens_table_refuses_an_expert_the_model_lacks(env):
    E = env["cfg"].num_local_experts
    for bad in (E, 99, -1, 1.5):
        with pytest.raises(ValueError, match="top_tokens_table: expert"):
            P.top_tokens_table(env["traces"], experts=[bad])


def test_token_text_generated_tokens_legend_order_and_near_tie_colour(env):
    tr = env["traces"][0]
    T = tr.input_ids.shape[1]
    fig = P.token_routing_text(tr, layer=1, tokenizer=env["tok"], prompt_len=T - 3, eps=10.0)
    ax = fig.axes[0]
    gen = [ln for ln in ax.lines if ln.get_gid() == "generated"]
    assert len(gen) == 3                                          # the last three underlined
    assert [t.get_fontstyle() for t in ax.texts][-4:] == ["normal"] + ["italic"] * 3
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert "generated (3)" in labels and any(lab.startswith("near-tie") for lab in labels)
    # expert entries read in expert order along rows: the legend's columns hold them
    # transposed, so the on-screen rows come back sorted
    experts = [int(lab.split()[0][1:]) for lab in labels if lab.startswith("E")]
    ncol = legend._ncols
    rows = int(np.ceil(len(labels) / ncol))
    grid = [[None] * ncol for _ in range(rows)]
    k = 0
    for c in range(ncol):
        for r in range(rows):
            if r * ncol + c < len(labels) and k < len(labels):
                grid[r][c] = labels[k]
                k += 1
    reading = [x for row in grid for x in row if x and x.startswith("E")]
    assert [int(x.split()[0][1:]) for x in reading] == sorted(experts)
    # near-tie outlines are black dashed, never an expert's red (E3)
    ties = [p for p in ax.patches if p.get_linewidth() > 0]
    assert ties and all(to_rgb(p.get_edgecolor()) == (0.0, 0.0, 0.0) for p in ties)


def test_save_pdf_type42_and_svg_text_outside_use_style(env, tmp_path):
    import matplotlib as mpl
    fig = P.load_heatmap(env["traces"])
    with mpl.rc_context({"pdf.fonttype": 3, "svg.fonttype": "path"}):
        pdf = P.save(fig, tmp_path / "x.pdf").read_bytes()
        svg = P.save(fig, tmp_path / "x.svg").read_text()
    assert b"/FontFile2" in pdf and b"/Type3" not in pdf
    assert "<text" in svg and "Expert load" in svg
