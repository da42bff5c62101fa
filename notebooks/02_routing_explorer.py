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
# # 02 · Routing explorer
#
# In a Llama 4 MoE layer, the router scores every expert with one logit per token; the top-k
# experts (k = 1 here and in Scout) process the token, each weighted by a **sigmoid** gate
# σ(z) — not a softmax — and a shared expert processes every token. Two numbers describe how sure
# the router was: the **gate** of the chosen expert and the **margin** z(1) − z(2) between the
# best and second-best logits. Small margins are *near-ties*: tiny numerical differences (bf16,
# another framework) can flip them.

# %%
# %matplotlib inline
import workbench as wb
from workbench import plots
from workbench.widgets import bundled_path

MODEL = bundled_path()  # data/scout-mini, or the checkpoint named by $WORKBENCH_MODEL
print("model:", MODEL)

# %%
model = wb.load(MODEL, backend="torch")
tok = wb.Tokenizer.from_pretrained(MODEL)
model

# %% [markdown]
# ## The explorer
#
# - pick a prompt (one per corpus domain) or type your own text and press **Run**;
# - the tokens are buttons coloured by the expert chosen at the selected layer (dashed red
#   frame: near-tie); the **layer** slider recolours them;
# - **click a token** (black frame) to see its *path*: the expert it visits in every layer with
#   gate `g` and margin `Δ`, over the router's σ(z) for all experts;
# - the bars give each layer's expert load on this text (hatched: the selected token's expert).

# %%
from workbench.widgets import RoutingExplorer

explorer = RoutingExplorer(model, tok)
explorer

# %% [markdown]
# ## The same without widgets
#
# The explorer is a thin front end over `RoutingState`, which you can drive from code — useful
# for scripted figures or when a widget front end is not available. (`explorer.state` is the
# explorer's own; after changing it from code, call `explorer.refresh()`.)

# %%
from workbench.widgets import RoutingState

state = RoutingState(model, tok)
state.set_text("for i in range(10):\n    total += values[i] * 2\n")
state.set_layer(1)
state.select_token(4)
for row in state.path():
    print(row)
state.render_path()

# %% [markdown]
# ## Beyond one text: routing on the corpus
#
# One prompt shows individual decisions; patterns need many tokens. Run a few validation
# documents per domain and ask which tokens each expert takes, and how experts chain across
# layers.

# %%
batches = wb.data.corpus_sample(n_docs=16, length=128, tokenizer=tok)  # 8,192 tokens
traces = []
for domain, ids in batches.items():
    t = model.run(ids, capture=["*.moe.*"]).trace
    t.meta["domain"] = domain
    traces.append(t)
print({d: b.shape for d, b in batches.items()}, batches.tokens, "tokens")
plots.top_tokens_table(traces, layer=1, tokenizer=tok)

# %% [markdown]
# `transition_heatmap` shows P(expert at the next layer | expert at this layer); `expert_flow`
# draws the same as a flow across all layers.
#
# **How to read it.** Expert ids in different layers are unrelated labels: E3 at layer 0 and E3
# at layer 1 are different networks that happen to share a number, so the *diagonal* means
# nothing. What matters is how **peaked each row** is: a row with one dark cell says that the
# tokens sent to that expert at this layer go on to one expert at the next (routing decisions
# are correlated across depth); a flat row says the next layer re-sorts them. Compare the
# rows' peak against the uniform 1/E, not against the diagonal.

# %%
plots.transition_heatmap(traces, layer_from=0, layer_to=1)

# %%
plots.expert_flow(traces)

# %% [markdown]
# **Try:** pick the `numeric` prompt and move the layer slider — do digits and separators go to
# different experts? Which layer has the most near-ties (`plots.margin_histogram(traces)`)?
