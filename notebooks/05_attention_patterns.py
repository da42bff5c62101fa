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
# # 05 · Attention patterns: iRoPE, chunked vs global layers
#
# Llama 4 interleaves two kinds of attention layer (*iRoPE*):
#
# - **chunked RoPE layers** (three of every four): rotary position encoding, QK-norm, and
#   attention restricted to the token's own chunk (8192 tokens in Scout, 64 in the bundled
#   model) — a block-diagonal causal mask;
# - **global NoPE layers** (every fourth): *no* position encoding, full causal attention over the
#   whole context, and attention-temperature tuning that sharpens the softmax at long range.
#
# The chunked layers give local, position-aware processing; the global layers mix information
# across the whole sequence.

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
for i, desc in enumerate(model.config.layer_map()):
    print(i, desc)

# %% [markdown]
# A text longer than one chunk (64 tokens) makes the difference visible: capture the patterns of
# every layer with `capture=["*.attn.pattern"]`.

# %%
text = (open(wb.__file__).read()[:1200])
ids = np.array([tok.encode(text)[:160]])
trace = model.run(ids, capture=["*.attn.pattern"]).trace
print(ids.shape, trace["layers.0.attn.pattern"].shape)

# %% [markdown]
# Layer 0 (chunked): queries past position 64 cannot see the first chunk — the dashed lines are
# the chunk boundaries, grey cells are masked.

# %%
plots.attention_pattern(trace, layer=0)

# %% [markdown]
# Layer 3 (global NoPE): the full causal triangle. The dashed lines still mark where the chunked
# layers' chunks start — the global layer attends straight across them.

# %%
plots.attention_pattern(trace, layer=3)

# %% [markdown]
# ## Numbers: entropy, distance, sink, cross-chunk mass
#
# `analysis.attention_summary` gives per layer the mean attention entropy, the mean query–key
# distance, the mass on the first token (the "attention sink"), and the mass that crosses a chunk
# boundary (exactly zero on chunked layers, by construction).

# %%
for row in an.attention_summary(trace):
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})

# %%
plots.attention_by_layer_type(trace)

# %% [markdown]
# ## The explorer
#
# Pick a layer (its type is shown: chunked RoPE or global NoPE), a head or the mean of heads,
# and a query token: the bars show where that token looks, with the chunk boundaries dashed and
# the most attended tokens named.

# %%
from workbench.widgets import AttentionExplorer

explorer = AttentionExplorer(model, tok)
explorer

# %% [markdown]
# **Try:** focus a query just after a chunk boundary on layer 0, then switch to layer 3. On the
# chunked layer its context starts over; on the global layer it can reach back to the start.

# %% [markdown]
# ## Long context: 8,192 tokens without a T × T pattern
#
# Attention patterns cost T² per head, so beyond a few thousand tokens they are out of reach.
# The hook `layers.{i}.attn.summary` (batch, heads, positions, features) is computed
# blockwise, never materialising the pattern: per query and head it keeps the entropy, the
# mass in the query's own chunk, the sink mass (position 0), the expected distance, the
# largest weight, and the mass in 25 log-spaced distance buckets
# (`wb.numerics.SUMMARY_FEATURES`). `analysis.longcontext` turns it into tables and
# `plots.plot_*` into figures.
#
# The sequence is the bundled validation corpus (all domains, document after document)
# concatenated until it is 8,192 tokens long. The section was meant for 32k
# tokens; it is shrunk to 8k so the notebook runs in CI time. On two
# CPU cores a forward pass with every summary took about 30 s at 8k and 70 s at 16k, and the
# global layer's cost grows as T², so 32k takes roughly four times as long as 16k, and this
# section runs the model three times. Set `N = 32768` below to run the full length. `wb.load(...,
# max_position_embeddings=N)` lifts the config's limit of 4096 positions. The model was
# trained on 256-token windows, so everything past position 256 shows how it extrapolates.

# %%
import time

N = 8192  # tokens; 32768 works the same way, about 10x slower on a CPU
long_ids = []
for doc in wb.data.documents():  # every domain, one document after the other, one BOS first
    long_ids += tok.encode(doc["text"], add_bos=not long_ids)
    if len(long_ids) >= N:
        break
long_ids = np.array([long_ids[:N]])
long_model = wb.load(MODEL, backend="torch", max_position_embeddings=N)
GLOBAL = long_model.config.nope_layers[0]  # the global NoPE layer
FLOOR = long_model.config.floor_scale
print(long_ids.shape, "tokens; global NoPE layer", GLOBAL, "; floor_scale", FLOOR)

start = time.perf_counter()
long = long_model.run(long_ids, capture=["*.attn.summary", "*.moe.topk_indices"]).trace
print(f"forward + summaries: {time.perf_counter() - start:.1f} s")
print(long[f"layers.{GLOBAL}.attn.summary"].shape, "= (batch, heads, positions, features)")
print(wb.numerics.SUMMARY_FEATURES[:5], "+", len(an.longcontext.BUCKETS), "distance buckets")

# %% [markdown]
# ### How far back does each layer look?
#
# Mean attention mass per query–key distance bucket (log-spaced; mean over heads and all
# queries). The chunked RoPE layers cannot pass the dashed line (the chunk size): their mass
# stops there by construction. The global NoPE layer is the only one that can use the far
# context — **look at how much of its mass actually sits past the chunk size, and how much
# of that is the sink (position 0)**. The table restricts to queries in the second half of
# the sequence, where a long context is available.

# %%
plots.plot_distance_profile(long)

# %%
edges = wb.numerics.distance_bucket_edges()
for r in an.distance_profile_past(long, N // 2):
    far = sum(r[b] for b, e in zip(an.longcontext.BUCKETS, edges) if e >= 64)
    very_far = sum(r[b] for b, e in zip(an.longcontext.BUCKETS, edges) if e >= 1024)
    print(f"layer {r['layer']} {r['kind']:13s} mass at d>=64: {far:.3f}  d>=1024: "
          f"{very_far:.3f}  sink: {r['sink']:.3f}  mean distance: {r['distance']:8.1f}")

# %% [markdown]
# ### Entropy against position
#
# Per position bin, the mean attention entropy of each layer. The dotted line is log(q+1),
# the entropy of uniform attention over everything before the query. Chunked layers start
# over at every chunk boundary, so past the first chunk (64) their entropy stops growing; a
# global layer that tracked the dotted line would be averaging the whole context — the gap to
# that line is how selective it stays as the context grows.

# %%
plots.plot_summary_by_position(long, "entropy", floor_scale=FLOOR)

# %% [markdown]
# ### The query temperature
#
# On NoPE layers Llama 4 multiplies each query by `1 + attn_scale · log1p(⌊(q+1)/floor_scale⌋)`
# (here `floor_scale` = 64, so it is exactly 1 for the first 63 positions and grows
# logarithmically after). `analysis.temperature_effect` runs the model again with
# `wb.disable_temperature(layer)` and compares the global layer's attention per position bin
# (the first run is reused through `trace=`). The two runs agree up to `floor_scale`; past it,
# the temperature should **lower the entropy and raise the largest weight** — it counters
# the flattening of the softmax as the number of keys grows.

# %%
effect = an.temperature_effect(long_model, long_ids, layer=GLOBAL, bins=14, trace=long)
for r in effect[::3] + effect[-1:]:
    print(f"positions [{r['lo']:>5}, {r['hi']:>5})  temperature {r['temperature']:.3f}  "
          f"entropy {r['entropy_on']:.2f} (off {r['entropy_off']:.2f})  "
          f"max {r['max_on']:.3f} (off {r['max_off']:.3f})")
plots.plot_temperature_effect(effect, floor_scale=FLOOR)

# %% [markdown]
# ### A windowed pattern: the last 64 queries × every key
#
# The full pattern of a long sequence is T² numbers per head (256 MiB at 8k, 4 GiB at 32k,
# in float32).
# `run(..., positions=slice(-64, None))` with `capture=["layers.3.attn.pattern"]` computes only
# the last 64 query rows, against all keys. Top: those rows, keys pooled into bins; bottom: the
# mean mass per key bin on a log scale. Look for the sink at position 0, mass near the
# diagonal (recent tokens), and isolated far keys that stand out of the floor.

# %%
window = long_model.run(long_ids, capture=[f"layers.{GLOBAL}.attn.pattern"],
                        positions=slice(-64, None)).trace
print(window[f"layers.{GLOBAL}.attn.pattern"].shape)
plots.plot_attention_window(window, GLOBAL)

# %% [markdown]
# ### Routing against position
#
# Left: for each MoE layer, the share of tokens whose first-choice expert is each expert, per
# position bin. Right: each bin's Jensen–Shannon divergence from the layer's overall
# distribution, with the divergence that sampling alone gives a bin of that size (dotted).
# A curve on the dotted line means routing does not depend on where a token sits; the text
# changes domain along the sequence, so some drift is expected from content alone.

# %%
plots.plot_routing_by_position(long)

# %% [markdown]
# Does a token that comes back get the expert it got the first time? Solid: the rate for
# repeated tokens, by distance to the first occurrence; dashed: random position pairs at the
# same distances; dotted: two independent tokens. Repeats far above the dashed line mean the
# router keys on the token itself; a solid line that decays with distance means the
# surrounding context (carried by the residual stream) also moves the choice.

# %%
plots.plot_repeat_consistency(long)
