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
# # 04 · Interventions
#
# An intervention changes the forward pass; the intervened run is traced like any other, so its
# effect can be measured. Both backends implement the same set with the same results:
#
# | intervention | effect |
# |---|---|
# | `ban_expert(layer, expert)` | its router logit is −∞ for selection; its tokens re-route |
# | `zero_expert(layer, expert)` | routing is kept, the expert contributes nothing |
# | `force_expert(layer, expert, positions=None)` | the expert becomes the first choice |
# | `set_top_k(k, layer=None)` | route each token to k experts |
# | `ablate_head(layer, head)` | the head's output is zeroed before `o_proj` |
# | `patch(name, value)` | a hook's value is replaced (activation patching) |

# %%
# %matplotlib inline

import numpy as np

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
text = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this "
        "software and associated documentation files, to deal in the Software without "
        "restriction.")
ids = np.array([tok.encode(text)])
base = model.run(ids, capture=["*.moe.topk_indices"])
print(f"clean loss {an.next_token_loss(base.logits, ids):.3f} nats on {ids.shape[1]} tokens")

# %% [markdown]
# ## Ban vs zero
#
# Take the expert that layer 1 uses most on this text. **Banning** it sends its tokens to their
# second choice; **zeroing** keeps the routing but drops its output. The difference between the
# two separates "this expert's computation matters" from "having *some* expert matters".

# %%
top = int(np.bincount(base.trace["layers.1.moe.topk_indices"].ravel()).argmax())
for make in (wb.ban_expert, wb.zero_expert):
    out = model.run(ids, capture=["*.moe.topk_indices"], interventions=[make(1, top)])
    moved = [(out.trace[f"layers.{i}.moe.topk_indices"] !=
              base.trace[f"layers.{i}.moe.topk_indices"]).mean() for i in range(4)]
    print(f"{make.__name__}(1, {top}): loss {an.next_token_loss(out.logits, ids):.3f}, "
          f"re-routed per layer {np.round(moved, 2)}")

# %% [markdown]
# ## Which experts matter, per domain?
#
# `analysis.expert_ablation` bans each expert in turn on each domain's tokens and compares Δloss
# with a random-expert null; `plots.ablation_bars` draws it (★: z > 2, the expert matters more to
# that domain than a random one).

# %%
batches = wb.data.corpus_sample(n_docs=2, length=64, tokenizer=tok)
ablation = an.expert_ablation(model, batches, layer=1, mode="ban")
plots.ablation_bars(ablation)

# %% [markdown]
# ## Activation patching
#
# `patch(name, value)` replaces a hook's value with an array. The classic use compares two runs
# that differ in **one token**: here a list opened with `[` (clean) and the same line opened with
# `(` (corrupted). Whether the next token should close a list or a tuple depends only on that
# one token, so the clean run's *logit difference* between `],` and `)` is larger than the
# corrupted run's. Copy the clean residual stream at one (layer, position) into the corrupted
# run and measure how much of that difference comes back: 1 = all of it, 0 = none. The map
# shows where the model carries the bracket type from the `[` to the end of the line.

# %%
import matplotlib.pyplot as plt

clean = np.array([tok.encode("values = [1, 2, 3, 4")])
corrupt = np.array([tok.encode("values = (1, 2, 3, 4")])
changed = np.flatnonzero(clean[0] != corrupt[0])
assert clean.shape == corrupt.shape and len(changed) == 1, "the pair must differ in one token"
(close_list,), (close_tuple,) = tok.encode("],", add_bos=False), tok.encode(")", add_bos=False)


def logit_diff(logits):
    """How much more the last position expects `],` than `)`."""
    return float(logits[0, -1, close_list] - logits[0, -1, close_tuple])


L = model.config.num_hidden_layers
names = [f"layers.{i}.resid_post" for i in range(L)]
run_clean, run_corrupt = model.run(clean, capture=names), model.run(corrupt, capture=names)
lo, hi = logit_diff(run_corrupt.logits), logit_diff(run_clean.logits)
print(f"logit diff ], vs ): clean {hi:.3f}, corrupted {lo:.3f} (changed position {changed[0]})")
T = clean.shape[1]
recovered = np.zeros((L, T))
for i, name in enumerate(names):
    for t in range(T):
        value = run_corrupt.trace[name].copy()
        value[:, t] = run_clean.trace[name][:, t]
        out = model.run(corrupt, interventions=[wb.patch(name, value)])
        recovered[i, t] = (logit_diff(out.logits) - lo) / (hi - lo)

fig, ax = plt.subplots(figsize=(8, 2.6))
im = ax.imshow(recovered, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
labels = [repr(s)[1:-1] for s in tok.token_strings(clean[0])]
ax.set_xticks(range(T), [f"{a}/{b}" if t == changed[0] else a for t, (a, b) in enumerate(
    zip(labels, [repr(s)[1:-1] for s in tok.token_strings(corrupt[0])]))], rotation=60,
    fontsize=8)
ax.set_yticks(range(L), [f"after L{i}" for i in range(L)])
ax.set_title("share of the clean logit difference restored by patching one position")
fig.colorbar(im, ax=ax, pad=0.01)
fig.tight_layout()

# %% [markdown]
# On the bundled model the map has two bright cells: the `[` position after layer 0 (all of the
# difference comes back: nothing has read the bracket yet) and the last position from layer 1
# on (about 0.7 after L1, all of it after the last layer). Layer 1's attention moves the
# bracket type from its token to the end of the line; after that, patching the `[` position no
# longer matters. Positions in between carry almost nothing.

# %% [markdown]
# ## The explorer
#
# Choose a layer and a mode (**ban**, **zero** or **force**), then toggle experts; toggle heads
# to ablate them. Each change re-runs the model and shows Δ loss, the share of tokens re-routed
# per layer, the change in log-probability of each true next token (red: the predicted next
# token changed), the tokens coloured by their new experts (black outline: re-routed), and a table
# of changed predictions.

# %%
from workbench.widgets import InterventionExplorer

explorer = InterventionExplorer(model, tok, text=text)
explorer

# %% [markdown]
# **Try:** force every token of layer 0 to one expert. Does the loss rise as much as banning the
# most used expert? Which is worse for the `numeric` domain?
