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
# # Appendix · PyTorch vs JAX
#
# The workbench implements the model twice — `workbench/torch` and `workbench/jax` mirror each
# other file for file — and both read the same safetensors weights. `wb.compare` runs both on the
# same tokens with every hook captured and reports, per hook, the relative error
# max|Δ| / max|ref|. In float32 the bound is 2e-4.
#
# Routing is discontinuous: when the router's best two logits are within rounding of each other
# (a **near-tie**), the two frameworks may pick different experts. The report lists every such
# **flip** with its margin: a flip at a near-tie is expected rounding, a flip at a wide margin
# is a bug. Positions downstream of a flip are excluded from later hooks' errors (and counted).

# %%
# %matplotlib inline

import numpy as np

import workbench as wb
from workbench import plots
from workbench.widgets import bundled_path

MODEL = bundled_path()  # data/scout-mini, or the checkpoint named by $WORKBENCH_MODEL
print("model:", MODEL)

# %%
tm = wb.load(MODEL, backend="torch")
jm = wb.load(MODEL, backend="jax")
tok = wb.Tokenizer.from_pretrained(MODEL)
text = "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n"
ids = np.array([tok.encode(text)])
tm, jm

# %%
report = wb.compare(tm, jm, ids)
print(report.summary(max_rows=10))

# %%
plots.parity_errors(report)

# %% [markdown]
# ## bfloat16
#
# Production checkpoints run in bf16, with 8 bits of mantissa: errors grow to ~1e-2 and near-ties
# flip. Compare the float32 PyTorch model with the bf16 JAX model; the tolerance and the
# near-tie threshold widen accordingly.

# %%
jm16 = wb.load(MODEL, backend="jax", dtype="bfloat16")
report16 = wb.compare(tm, jm16, ids)
print(report16.summary(max_rows=6))

# %% [markdown]
# Every flip should sit at a small margin. The margin histogram of the float32 run shows how many
# tokens are that close to a tie in the first place.

# %%
trace = tm.run(ids, capture=["*.moe.router_logits", "*.moe.topk_indices"]).trace
for f in report16.flips:
    print(f"layer {f.layer} position {f.position} {tok.token_strings([f.token])[0]!r}: "
          f"{f.experts_a} -> {f.experts_b}, margin {f.margin_a:.2e} "
          f"({'near-tie' if f.near_tie else 'WIDE'})")
plots.margin_histogram(trace, eps=report16.near_tie)

# %% [markdown]
# ## The explorer
#
# Per-hook errors by layer, then per MoE layer the router margin of every token with the flipped
# tokens in red. The **model b** switch compares against float32 or bfloat16 JAX (the other
# precision is loaded from the checkpoint on demand; here we hand over the one already loaded).

# %%
from workbench.widgets import ParityExplorer

explorer = ParityExplorer(tm, jm, tok, text=text, variants=[jm16])
explorer

# %% [markdown]
# **Try:** switch to bfloat16 and step through the layers: are the flipped tokens the ones with
# the smallest margins?
