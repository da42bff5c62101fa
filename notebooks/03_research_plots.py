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
# `$WORKBENCH_FIGURE_DIR` (default `notebooks/figures/`) as PNG and PDF. Everything that claims
# something about domains runs on a **corpus sample** (`wb.data.corpus_sample`: equal-length
# sequences from the held-out corpus, thousands of tokens), and every specialisation number
# comes with its 95% bootstrap interval over documents and the value shuffled labels give.
#
# Load balance, per-domain specialisation (Mixtral-style grouped bars), token categories,
# confidence, temporal locality, cross-layer flow, router and expert-weight geometry, the
# logit lens, a routing diff of two prompts, the loss as the top experts are disabled
# (DeepSeek-MoE style), shared vs routed experts, capacity, and routing **over training**.

# %%
# %matplotlib inline
import os
from pathlib import Path

import numpy as np
from IPython.display import display

import workbench as wb
from workbench import analysis as an
from workbench import plots
from workbench.widgets import bundled_path

MODEL = bundled_path()  # data/scout-mini, or the checkpoint named by $WORKBENCH_MODEL
print("model:", MODEL)

# %%
model = wb.load(MODEL, backend="torch")
tok = wb.Tokenizer.from_pretrained(MODEL)
ckpt = wb.Checkpoint.open(MODEL)
model

# %% [markdown]
# ## The corpus sample
#
# Eight sequences of 128 tokens per domain (4,096 tokens in all), each from a different
# document where the domain has enough. Each batch row is one *document* for the bootstrap.

# %%
batches = wb.data.corpus_sample(8, tokenizer=tok)


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
layers = model.config.moe_layers
first, middle, last = layers[0], layers[len(layers) // 2], layers[-1]
FIG_DIR = Path(os.environ.get("WORKBENCH_FIGURE_DIR", "figures"))
FIG_DIR.mkdir(parents=True, exist_ok=True)
figures = {}


def keep(name, fig):
    figures[name] = fig
    return fig


print({d: b.shape for d, b in batches.items()}, batches.tokens, "tokens")

# %% [markdown]
# ## Load balance
#
# Load as a ratio to uniform (1 = 1/E) per layer and expert on a log scale, and three
# imbalance measures per layer, each against its own balanced value.

# %%
keep("load_heatmap", plots.load_heatmap(pooled))

# %%
keep("imbalance", plots.imbalance_bars(pooled))

# %% [markdown]
# ## Specialisation by domain
#
# Each expert's share of a domain's tokens at the first, middle and last MoE layer, with 95%
# bootstrap intervals over documents; the dashed line is the uniform share 1/E. Overlapping
# intervals mean the sample cannot tell those domains apart on that expert.

# %%
keep("domain_share", plots.domain_share_bars(traces))

# %% [markdown]
# The same loads as a domain × expert heatmap at the last layer. The title gives the mean
# Jensen–Shannon divergence of each domain's load from the pooled load, its bootstrap
# interval and the value with domain labels shuffled: finite samples show *some* divergence
# even with no domain effect, so read the value against that baseline.

# %%
keep("domain_heatmap", plots.domain_heatmap(traces, layer=last))

# %%
js = {i: an.domain_js_estimate(traces, i) for i in layers}
for i, e in js.items():
    print(f"layer {i}: mean JS {e.text()} bits, p = {e.p_value:.3f}, "
          f"{e.n_tokens} tokens in {e.n_docs} documents")

# %% [markdown]
# Token categories (word, digit, punctuation, keyword, whitespace...) and the per-layer
# summary: domain JS, category NMI and vocabulary specialisation with their intervals, each
# against its shuffled-label baseline (dashed, 95% range shaded).

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
# How often consecutive tokens share an expert (against chance), and how tokens move between
# experts of successive layers. Expert ids in different layers are unrelated labels.

# %%
keep("same_expert_rate", plots.same_expert_rate_plot(pooled))

# %%
keep("expert_flow", plots.expert_flow(pooled))

# %% [markdown]
# ## Router and expert geometry
#
# Read straight from the checkpoint (no forward pass): the cosine similarity of the router
# rows, and of the experts' own weights (gate_up and down projections flattened). The title
# gives the band random vectors of the same length fall in.

# %%
keep("router_similarity",
     plots.router_similarity(ckpt.get(f"layers.{middle}.feed_forward.router.weight",
                                      dtype="float32"), layer=middle))

# %%
experts = [ckpt.get(f"layers.{middle}.feed_forward.experts.{w}", dtype="float32")
           for w in ("gate_up_proj", "down_proj")]
keep("expert_weight_similarity", plots.expert_weight_similarity(experts, layer=middle))

# %% [markdown]
# ## Logit lens
#
# Each layer's residual stream through the final norm and the unembedding: the lens's top
# token in every cell, coloured by the probability it gives the model's own prediction
# (heading each column).

# %%
doc = batches["code"][:1, :40]
lens_run = model.run(doc, capture=["*.resid_post", "logits"])
head = "lm_head.weight" if "lm_head.weight" in ckpt else "embed_tokens.weight"
lens = an.logit_lens(lens_run.trace, ckpt["norm.weight"], ckpt[head],
                     eps=model.config.rms_norm_eps)
keep("logit_lens", plots.logit_lens_plot(lens, tok, input_ids=doc))

# %% [markdown]
# ## Routing diff of two prompts
#
# The same sentence with one word changed: which tokens keep their expert at each layer (the
# aligned tokens), and how far the two loads diverge. Changes after the edit show how far an
# edit's effect on routing travels along the sequence.

# %%
text_a = "Permission is hereby granted to copy the software, subject to these conditions."
text_b = "Permission is hereby granted to sell the software, subject to these conditions."
run_a = model.run(np.array([tok.encode(text_a)]), capture=["*.moe.topk_indices"]).trace
run_b = model.run(np.array([tok.encode(text_b)]), capture=["*.moe.topk_indices"]).trace
diff = an.routing_diff(run_a, run_b)
print("top-1 agreement per layer:", dict(zip(diff.layers, diff.agreement.round(2))))
keep("routing_diff", plots.routing_diff_plot((run_a, run_b), tokenizer=tok,
                                             labels=("copy", "sell")))

# %% [markdown]
# ## Disabling the top experts
#
# The next-token loss as the busiest experts of every MoE layer are banned (tokens re-route
# to their next choice), against banning as many random experts (± one std over draws), on
# the first 64 tokens of one document per domain. A model whose busiest experts matter more
# than random ones shows the solid line above the dashed one.

# %%
ko_ids = np.concatenate([b[:1, :64] for b in batches.values()])
ko = an.top_expert_knockout(model, ko_ids, fractions=(0.0, 1 / 4, 1 / 2), n_random=2)
keep("knockout", plots.knockout_plot(ko))

# %% [markdown]
# ## Shared vs routed, capacity

# %%
keep("routed_share", plots.routed_share_plot(pooled))

# %%
keep("capacity", plots.capacity_plot(pooled))

# %% [markdown]
# ## Routing over training
#
# The training script logs the expert load and router entropy per layer at every evaluation
# step (`training_log.json`), and keeps intermediate checkpoints under `checkpoints/`.

# %%
log = MODEL / "training_log.json"
if log.exists():
    display(keep("training", plots.training_curves_plot(log)))
else:
    print("no training log beside", MODEL)

# %% [markdown]
# Re-running the same documents through the intermediate checkpoints shows how the routing
# settled: the share of tokens whose expert at a checkpoint is the one the final model picks
# (routing stability; chance is 1/E), and how domain specialisation evolved, against the
# shuffled-domain baseline. With a load-balancing loss pushing every expert towards 1/E of the
# tokens, specialisation by domain need not grow: watch which way it goes.

# %%
steps = sorted((MODEL / "checkpoints").glob("step-*")) if (MODEL / "checkpoints").exists() \
    else []
stability, js_mean, js_base = {}, {}, {}
for ck in steps:
    traces_ck = domain_traces(wb.load(ck))
    stability[ck.name] = an.routing_stability(list(traces_ck.values()), pooled)
    est = [an.domain_js_estimate(traces_ck, i, n_boot=50, n_shuffle=50) for i in layers]
    js_mean[ck.name] = [e.value for e in est]
    js_base[ck.name] = [e.baseline for e in est]
js_mean["final"] = [js[i].value for i in layers]
js_base["final"] = [js[i].baseline for i in layers]
if stability:
    display(keep("routing_stability", plots.routing_stability_plot(
        stability, experts=model.config.num_local_experts)))
else:
    print("no intermediate checkpoints under", MODEL / "checkpoints")

# %%
from workbench.plots.style import layer_colors, new_figure

with plots.use_style():  # the look of every workbench figure
    fig = new_figure((5.8, 3.4))
    ax = fig.add_subplot()
    names = list(js_mean)
    for li, (layer, color) in enumerate(zip(layers, layer_colors(len(layers)))):
        ax.plot(range(len(names)), [js_mean[n][li] for n in names], "o-", color=color,
                label=f"L{layer}")
        ax.plot(range(len(names)), [js_base[n][li] for n in names], ":", color=color)
    ax.plot([], [], ":", color="grey", label="shuffled domains")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("mean domain JS (bits)")
    ax.set_title("Domain specialisation over training")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
keep("specialisation_over_training", fig)

# %% [markdown]
# ## Save the set
#
# `plots.save` picks the format from the suffix: PNG for the screen, PDF and SVG for a paper
# (TrueType fonts embedded in the PDF, text kept as text in the SVG).

# %%
FORMATS = ("png", "pdf")
saved = [plots.save(fig, FIG_DIR / f"{name}.{ext}") for name, fig in figures.items()
         for ext in FORMATS]
print(len(saved), "files in", FIG_DIR.resolve())
