# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · The research figure set
#
# The figures for a routing study of an MoE model, each one call in `plots`, all saved to
# `$WORKBENCH_FIGURE_DIR` (default `notebooks/figures/`) as PNG and PDF: load balance,
# per-domain specialisation, token categories, confidence, temporal locality, cross-layer flow,
# router geometry, shared vs routed experts, capacity, and routing **over training** from the
# training log and the intermediate checkpoints.

# %%
# %matplotlib inline
import os
from pathlib import Path

import workbench as wb
from workbench import analysis as an
from workbench import plots
from workbench.widgets import bundled_path

MODEL = bundled_path()  # data/scout-mini, or the checkpoint named by $WORKBENCH_MODEL
print("model:", MODEL)

# %%
model = wb.load(MODEL, backend="torch")
tok = wb.Tokenizer.from_pretrained(MODEL)
model

# %%
batches = wb.data.corpus_sample(tokenizer=tok)  # 16 x 128 tokens per domain


def domain_traces(m):
    """One trace per domain with the routing of every MoE layer, tagged with its domain."""
    out = {}
    for domain, ids in batches.items():
        t = m.run(ids, capture=["*.moe.*"]).trace
        t.meta["domain"] = domain
        out[domain] = t
    return out


traces = domain_traces(model)
pooled = list(traces.values())
FIG_DIR = Path(os.environ.get("WORKBENCH_FIGURE_DIR", "figures"))
FIG_DIR.mkdir(parents=True, exist_ok=True)
figures = {}


def keep(name, fig):
    figures[name] = fig
    return fig


print({d: b.shape for d, b in batches.items()})

# %% [markdown]
# ## Load balance
#
# Load as a ratio to uniform (1 = 1/E) per layer and expert, and three imbalance measures per
# layer (CV, max/mean, normalised entropy).

# %%
keep("load_heatmap", plots.load_heatmap(pooled))

# %%
keep("imbalance", plots.imbalance_bars(pooled))

# %% [markdown]
# ## Specialisation by domain and token category
#
# Each domain's expert load against the pooled load (Jensen–Shannon divergence in bits), and the
# same split by token category (word, digit, punctuation, keyword, whitespace...).

# %%
last = model.config.moe_layers[-1]
keep("domain_heatmap", plots.domain_heatmap(traces, layer=last))

# %%
categories = [c for t in pooled for c in tok.categories(t.input_ids.ravel().tolist())]
keep("category_heatmap", plots.category_heatmap(pooled, layer=last, categories=categories))

# %%
keep("specialisation_by_layer",
     plots.specialisation_by_layer(traces, categories=categories))

# %%
keep("top_tokens", plots.top_tokens_table(pooled, layer=last, tokenizer=tok))

# %% [markdown]
# ## Router confidence
#
# Margins (flip risk below ε) and gates.

# %%
keep("margins", plots.margin_histogram(pooled))

# %%
keep("gates", plots.gate_histogram(pooled))

# %% [markdown]
# ## Locality in time and depth
#
# How often consecutive tokens share an expert (against chance), and how experts chain across
# layers.

# %%
keep("same_expert_rate", plots.same_expert_rate_plot(pooled))

# %%
keep("expert_flow", plots.expert_flow(pooled))

# %% [markdown]
# ## Router geometry, shared vs routed, capacity
#
# Router rows are read straight from the checkpoint (no forward pass needed).

# %%
ckpt = wb.Checkpoint.open(MODEL)
keep("router_similarity",
     plots.router_similarity(ckpt.get(f"layers.{last}.feed_forward.router.weight",
                                      dtype="float32"), layer=last))

# %%
share = model.run(batches["prose"], capture=["*.moe.routed_out", "*.moe.shared_out",
                                              "*.moe.topk_indices"]).trace
keep("routed_share", plots.routed_share_plot(share))

# %%
keep("capacity", plots.capacity_plot(pooled))

# %% [markdown]
# ## Routing over training
#
# The training script logs the expert load and router entropy per layer at every evaluation
# step (`training_log.json`), and keeps intermediate checkpoints under `checkpoints/`.

# %%
from IPython.display import display

log = MODEL / "training_log.json"
if log.exists():
    display(keep("training", plots.training_curves_plot(log)))
else:
    print("no training log beside", MODEL)

# %% [markdown]
# Re-running the same documents through the intermediate checkpoints shows how the routing
# settled: the share of tokens whose expert at a checkpoint is the one the final model picks
# (routing stability; chance is 1/E), and how domain specialisation evolved. With a
# load-balancing loss pushing every expert towards 1/E of the tokens, specialisation by domain
# need not grow: watch which way it goes.

# %%
steps = sorted((MODEL / "checkpoints").glob("step-*")) if (MODEL / "checkpoints").exists() \
    else []
stability, js = {}, {}
layers = model.config.moe_layers
for ck in steps:
    traces_ck = domain_traces(wb.load(ck))
    stability[ck.name] = an.routing_stability(list(traces_ck.values()), pooled)
    js[ck.name] = an.domain_js_by_layer(traces_ck, layers).mean(axis=1)
js["final"] = an.domain_js_by_layer(traces, layers).mean(axis=1)
if stability:
    display(keep("routing_stability", plots.routing_stability_plot(
        stability, experts=model.config.num_local_experts)))
else:
    print("no intermediate checkpoints under", MODEL / "checkpoints")

# %%
from workbench.plots.style import layer_colors, new_figure

with plots.use_style():  # the look of every workbench figure
    fig = new_figure((5.5, 3.4))
    ax = fig.add_subplot()
    names = list(js)
    for li, (layer, color) in enumerate(zip(layers, layer_colors(len(layers)))):
        ax.plot(range(len(names)), [js[n][li] for n in names], "o-", color=color,
                label=f"L{layer}")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("mean domain JS (bits)")
    ax.set_title("Domain specialisation over training")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
keep("specialisation_over_training", fig)

# %% [markdown]
# ## Save the set
#
# `plots.save` picks the format from the suffix (PNG, PDF or SVG; fonts stay text in SVG/PDF).

# %%
saved = [plots.save(fig, FIG_DIR / f"{name}.{ext}") for name, fig in figures.items()
         for ext in ("png", "pdf")]
print(len(saved), "files in", FIG_DIR.resolve())
