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
# # 01 · Quickstart: load, run, capture, plot
#
# The workbench runs Llama-4-style Mixture-of-Experts (MoE) models in **PyTorch or JAX** from the
# same safetensors weights, and lets you *capture* what happens inside: router logits, chosen
# experts, gates, attention patterns, the residual stream. Everything you capture comes back as
# plain numpy in a `Trace`, which the `analysis` and `plots` modules understand.
#
# This notebook uses the small model bundled with the repository, `data/scout-mini`: a
# Scout-shaped model trained on a four-domain corpus (Python code, English prose, licence texts,
# numeric tables). It has 4 layers, every one an MoE layer with 8 routed experts (top-1) plus a
# shared expert; layers 0–2 use RoPE with chunked attention (64-token chunks), layer 3 is a
# global **NoPE** layer — the iRoPE pattern of Llama 4.

# %%
# %matplotlib inline
from pathlib import Path

import numpy as np

import workbench as wb
from workbench import analysis as an
from workbench import plots
from workbench.widgets import bundled_path

MODEL = bundled_path()  # data/scout-mini, or the checkpoint named by $WORKBENCH_MODEL
print("model:", MODEL)

# %% [markdown]
# ## The configuration
#
# `ModelConfig` reads the Hugging Face `config.json`. `layer_map()` summarises each layer: MoE or
# dense, RoPE (chunked) or NoPE (global), QK-norm.

# %%
cfg = wb.ModelConfig.from_pretrained(MODEL)
for i, desc in enumerate(cfg.layer_map()):
    print(i, desc)
print(cfg.param_counts())

# %% [markdown]
# ## Load the model and the tokenizer
#
# `wb.load(path, backend="torch" | "jax", dtype="float32" | "bfloat16")` returns a `Model`;
# `wb.Tokenizer` reads `tokenizer.json`.

# %%
model = wb.load(MODEL, backend="torch")
tok = wb.Tokenizer.from_pretrained(MODEL)
model

# %% [markdown]
# ## Run
#
# `model.run(ids)` takes token ids of shape (batch, seq) and returns `Output(logits, trace)`.
# Logits are numpy float32 whatever the backend.

# %%
text = "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n"
ids = np.array([tok.encode(text)])
out = model.run(ids)
print(ids.shape, out.logits.shape)
next_id = int(out.logits[0, -1].argmax())
print("next token:", repr(tok.decode([next_id])))

# %% [markdown]
# ## Capture
#
# Every hook point has a name (`layers.{i}.moe.router_logits`, `layers.{i}.attn.pattern`, ...);
# `capture=` takes glob patterns. Only what you ask for is kept — attention patterns cost
# O(T²) per head, so they are computed only for the layers you capture.

# %%
names = model.hook_names()
print(len(names), "hook points, e.g.", names[:8])
out = model.run(ids, capture=["*.moe.*", "layers.3.attn.pattern"])
trace = out.trace
print(trace)
print("router logits", trace["layers.0.moe.router_logits"].shape,
      "chosen experts", trace["layers.0.moe.topk_indices"].shape)

# %% [markdown]
# `analysis` turns a trace into numbers. The routing table gives, per MoE layer, the load
# balance (CV, max/mean), the router's confidence and how often adjacent tokens share an expert.

# %%
print(an.format_routing_table(an.routing_table(trace)))

# %% [markdown]
# ## First plots
#
# Every function in `plots` returns a matplotlib `Figure`. Expert *e* has the same colour in every
# figure. Here: the text with each token coloured by the expert that layer 0 sent it to.

# %%
plots.token_routing_text(trace, layer=0, tokenizer=tok)

# %%
plots.load_heatmap(trace)

# %% [markdown]
# Layer 3 is the global NoPE layer: every token may attend to every earlier token, with no
# position encoding at all (causality alone tells it about order).

# %%
plots.attention_pattern(trace, layer=3, tokenizer=tok)

# %% [markdown]
# ## Generate, keeping the routing
#
# `generate` samples with a KV cache; captured hooks of the prompt and of every new token are
# concatenated, so you can follow routing through a continuation.

# %%
g = model.generate(ids, 12, temperature=0, capture=["*.moe.topk_indices"])
print(repr(tok.decode(g.new_tokens[0].tolist())))
print(g.trace["layers.0.moe.topk_indices"].shape)

# %% [markdown]
# ## Change the computation
#
# Interventions are small records passed to `run`. Banning an expert makes the router pick the
# next best one; the traced run shows where tokens went and the loss shows what it cost.

# %%
clean = an.next_token_loss(out.logits, ids)
banned = model.run(ids, capture=["layers.0.moe.topk_indices"],
                   interventions=[wb.ban_expert(layer=0, expert=int(trace.top1()[0, 0, 1]))])
moved = (banned.trace["layers.0.moe.topk_indices"] != trace["layers.0.moe.topk_indices"]).mean()
print(f"loss {clean:.3f} -> {an.next_token_loss(banned.logits, ids):.3f} nats; "
      f"{moved:.0%} of tokens re-routed at layer 0")

# %% [markdown]
# ## Save a trace
#
# Traces are safetensors files with JSON metadata (no pickle), so they can be shared and reloaded
# without the model.

# %%
import tempfile

path = trace.save(Path(tempfile.mkdtemp()) / "quickstart")
again = wb.Trace.load(path)
print(path.name, again, np.array_equal(again["layers.1.moe.topk_indices"],
                                       trace["layers.1.moe.topk_indices"]))

# %% [markdown]
# **Next:** `02_routing_explorer` (interactive routing), `03_research_plots` (the figure set),
# `04_interventions` (ban, force, zero, patch), `05_attention_patterns` (iRoPE), `06_real_llama4`
# (pointing all of this at a real Scout or Maverick checkpoint); the appendix
# `90_appendix_pytorch_vs_jax` checks that both frameworks compute the same model.
