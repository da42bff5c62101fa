"""Write the tutorial notebooks in notebooks/ from the cell sources below.

The notebooks are generated, never edited by hand: they are stored without outputs or widget
state, with stable cell ids, so a re-run reproduces them byte for byte.

    python scripts/make_notebooks.py            # (re)write notebooks/*.ipynb
    python scripts/make_notebooks.py --check    # exit 1 if a notebook differs from this script
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

OUT = Path(__file__).resolve().parent.parent / "notebooks"

SETUP = '''\
%matplotlib inline
import os
from pathlib import Path

import numpy as np

import workbench as wb
from workbench import analysis as an
from workbench import plots
from workbench.widgets import bundled_path

MODEL = bundled_path()  # data/scout-mini, or the checkpoint named by $WORKBENCH_MODEL
print("model:", MODEL)'''

CORPUS = '''\
import json

ROOT = Path(wb.__file__).resolve().parent.parent


def corpus_batches(tok, n_docs=4, length=96, split="val"):
    """{domain: token ids (n_docs, length)}: the first documents of each domain that are at
    least `length` tokens long, cut to `length`."""
    rows = {}
    with open(ROOT / "data" / "corpus" / f"{split}.jsonl") as f:
        for line in f:
            doc = json.loads(line)
            keep = rows.setdefault(doc["domain"], [])
            if len(keep) < n_docs:
                ids = tok.encode(doc["text"])
                if len(ids) >= length:
                    keep.append(ids[:length])
    return {d: np.array(r) for d, r in sorted(rows.items()) if r}'''

LOAD = '''\
model = wb.load(MODEL, backend="torch")
tok = wb.Tokenizer.from_pretrained(MODEL)
model'''


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(text.strip("\n"))


def code(text: str) -> nbformat.NotebookNode:
    return new_code_cell(text.strip("\n"))


# --------------------------------------------------------------------------- 01
def quickstart() -> list:
    return [
        md('''
# 01 · Quickstart: load, run, capture, plot

The workbench runs Llama-4-style Mixture-of-Experts (MoE) models in **PyTorch or JAX** from the
same safetensors weights, and lets you *capture* what happens inside: router logits, chosen
experts, gates, attention patterns, the residual stream. Everything you capture comes back as
plain numpy in a `Trace`, which the `analysis` and `plots` modules understand.

This notebook uses the small model bundled with the repository, `data/scout-mini`: a
Scout-shaped model trained on a four-domain corpus (Python code, English prose, licence texts,
numeric tables). It has 4 layers, every one an MoE layer with 8 routed experts (top-1) plus a
shared expert; layers 0–2 use RoPE with chunked attention (64-token chunks), layer 3 is a
global **NoPE** layer — the iRoPE pattern of Llama 4.
'''),
        code(SETUP),
        md('''
## The configuration

`ModelConfig` reads the Hugging Face `config.json`. `layer_map()` summarises each layer: MoE or
dense, RoPE (chunked) or NoPE (global), QK-norm.
'''),
        code('''
cfg = wb.ModelConfig.from_pretrained(MODEL)
for i, desc in enumerate(cfg.layer_map()):
    print(i, desc)
print(cfg.param_counts())'''),
        md('''
## Load the model and the tokenizer

`wb.load(path, backend="torch" | "jax", dtype="float32" | "bfloat16")` returns a `Model`;
`wb.Tokenizer` reads `tokenizer.json`.
'''),
        code(LOAD),
        md('''
## Run

`model.run(ids)` takes token ids of shape (batch, seq) and returns `Output(logits, trace)`.
Logits are numpy float32 whatever the backend.
'''),
        code('''
text = "def read_config(path):\\n    with open(path) as f:\\n        return json.load(f)\\n"
ids = np.array([tok.encode(text)])
out = model.run(ids)
print(ids.shape, out.logits.shape)
next_id = int(out.logits[0, -1].argmax())
print("next token:", repr(tok.decode([next_id])))'''),
        md('''
## Capture

Every hook point has a name (`layers.{i}.moe.router_logits`, `layers.{i}.attn.pattern`, ...);
`capture=` takes glob patterns. Only what you ask for is kept — attention patterns cost
O(T²) per head, so they are computed only for the layers you capture.
'''),
        code('''
names = model.hook_names()
print(len(names), "hook points, e.g.", names[:8])
out = model.run(ids, capture=["*.moe.*", "layers.3.attn.pattern"])
trace = out.trace
print(trace)
print("router logits", trace["layers.0.moe.router_logits"].shape,
      "chosen experts", trace["layers.0.moe.topk_indices"].shape)'''),
        md('''
`analysis` turns a trace into numbers. The routing table gives, per MoE layer, the load
balance (CV, max/mean), the router's confidence and how often adjacent tokens share an expert.
'''),
        code('''
print(an.format_routing_table(an.routing_table(trace)))'''),
        md('''
## First plots

Every function in `plots` returns a matplotlib `Figure`. Expert *e* has the same colour in every
figure. Here: the text with each token coloured by the expert that layer 0 sent it to.
'''),
        code('''
plots.token_routing_text(trace, layer=0, tokenizer=tok)'''),
        code('''
plots.load_heatmap(trace)'''),
        md('''
Layer 3 is the global NoPE layer: every token may attend to every earlier token, with no
position encoding at all (causality alone tells it about order).
'''),
        code('''
plots.attention_pattern(trace, layer=3, tokenizer=tok)'''),
        md('''
## Generate, keeping the routing

`generate` samples with a KV cache; captured hooks of the prompt and of every new token are
concatenated, so you can follow routing through a continuation.
'''),
        code('''
g = model.generate(ids, 12, temperature=0, capture=["*.moe.topk_indices"])
print(repr(tok.decode(g.new_tokens[0].tolist())))
print(g.trace["layers.0.moe.topk_indices"].shape)'''),
        md('''
## Change the computation

Interventions are small records passed to `run`. Banning an expert makes the router pick the
next best one; the traced run shows where tokens went and the loss shows what it cost.
'''),
        code('''
clean = an.next_token_loss(out.logits, ids)
banned = model.run(ids, capture=["layers.0.moe.topk_indices"],
                   interventions=[wb.ban_expert(layer=0, expert=int(trace.top1()[0, 0, 1]))])
moved = (banned.trace["layers.0.moe.topk_indices"] != trace["layers.0.moe.topk_indices"]).mean()
print(f"loss {clean:.3f} -> {an.next_token_loss(banned.logits, ids):.3f} nats; "
      f"{moved:.0%} of tokens re-routed at layer 0")'''),
        md('''
## Save a trace

Traces are safetensors files with JSON metadata (no pickle), so they can be shared and reloaded
without the model.
'''),
        code('''
import tempfile

path = trace.save(Path(tempfile.mkdtemp()) / "quickstart")
again = wb.Trace.load(path)
print(path.name, again, np.array_equal(again["layers.1.moe.topk_indices"],
                                       trace["layers.1.moe.topk_indices"]))'''),
        md('''
**Next:** `02_routing_explorer` (interactive routing), `03_attention_patterns` (iRoPE),
`04_pytorch_vs_jax` (parity), `05_interventions`, `06_research_plots` (the figure set),
`07_real_llama4` (pointing all of this at a real Scout or Maverick checkpoint).
'''),
    ]


# --------------------------------------------------------------------------- 02
def routing() -> list:
    return [
        md('''
# 02 · Routing explorer

In a Llama 4 MoE layer, the router scores every expert with one logit per token; the top-k
experts (k = 1 here and in Scout) process the token, each weighted by a **sigmoid** gate
σ(z) — not a softmax — and a shared expert processes every token. Two numbers describe how sure
the router was: the **gate** of the chosen expert and the **margin** z(1) − z(2) between the
best and second-best logits. Small margins are *near-ties*: tiny numerical differences (bf16,
another framework) can flip them.
'''),
        code(SETUP),
        code(LOAD),
        md('''
## The explorer

- pick a prompt (one per corpus domain) or type your own text and press **Run**;
- the **layer** slider recolours the tokens by the expert chosen at that layer (dashed red
  outline: near-tie);
- the **token** picker selects one token (black outline) and shows its *path*: the expert it
  visits in every layer with gate `g` and margin `Δ`, over the router's σ(z) for all experts;
- the bars give each layer's expert load on this text (hatched: the selected token's expert).
'''),
        code('''
from workbench.widgets import RoutingExplorer

explorer = RoutingExplorer(model, tok)
explorer'''),
        md('''
## The same without widgets

The explorer is a thin front end over `RoutingState`, which you can drive from code — useful
for scripted figures or when a widget front end is not available. (`explorer.state` is the
explorer's own; after changing it from code, call `explorer.refresh()`.)
'''),
        code('''
from workbench.widgets import RoutingState

state = RoutingState(model, tok)
state.set_text("for i in range(10):\\n    total += values[i] * 2\\n")
state.set_layer(1)
state.select_token(4)
for row in state.path():
    print(row)
state.render_path()'''),
        md('''
## Beyond one text: routing on the corpus

One prompt shows individual decisions; patterns need many tokens. Run a few validation
documents per domain and ask which tokens each expert takes, and how experts chain across
layers.
'''),
        code(CORPUS),
        code('''
batches = corpus_batches(tok, n_docs=3, length=96)
traces = []
for domain, ids in batches.items():
    t = model.run(ids, capture=["*.moe.*"]).trace
    t.meta["domain"] = domain
    traces.append(t)
print({d: b.shape for d, b in batches.items()})
plots.top_tokens_table(traces, layer=1, tokenizer=tok)'''),
        md('''
`transition_heatmap` shows P(expert at the next layer | expert at this layer); `expert_flow`
draws the same as a flow across all layers. Strong diagonal-like structure means routing
decisions are correlated across depth.
'''),
        code('''
plots.transition_heatmap(traces, layer_from=0, layer_to=1)'''),
        code('''
plots.expert_flow(traces)'''),
        md('''
**Try:** pick the `numeric` prompt and move the layer slider — do digits and separators go to
different experts? Which layer has the most near-ties (`plots.margin_histogram(traces)`)?
'''),
    ]


# --------------------------------------------------------------------------- 03
def attention() -> list:
    return [
        md('''
# 03 · Attention patterns: iRoPE, chunked vs global layers

Llama 4 interleaves two kinds of attention layer (*iRoPE*):

- **chunked RoPE layers** (three of every four): rotary position encoding, QK-norm, and
  attention restricted to the token's own chunk (8192 tokens in Scout, 64 in the bundled
  model) — a block-diagonal causal mask;
- **global NoPE layers** (every fourth): *no* position encoding, full causal attention over the
  whole context, and attention-temperature tuning that sharpens the softmax at long range.

The chunked layers give local, position-aware processing; the global layers mix information
across the whole sequence.
'''),
        code(SETUP),
        code(LOAD),
        code('''
for i, desc in enumerate(model.config.layer_map()):
    print(i, desc)'''),
        md('''
A text longer than one chunk (64 tokens) makes the difference visible: capture the patterns of
every layer with `capture=["*.attn.pattern"]`.
'''),
        code('''
text = (open(wb.__file__).read()[:1200])
ids = np.array([tok.encode(text)[:160]])
trace = model.run(ids, capture=["*.attn.pattern"]).trace
print(ids.shape, trace["layers.0.attn.pattern"].shape)'''),
        md('''
Layer 0 (chunked): queries past position 64 cannot see the first chunk — the dashed lines are
the chunk boundaries, grey cells are masked.
'''),
        code('''
plots.attention_pattern(trace, layer=0)'''),
        md('''
Layer 3 (global NoPE): the full causal triangle. The dashed lines still mark where the chunked
layers' chunks start — the global layer attends straight across them.
'''),
        code('''
plots.attention_pattern(trace, layer=3)'''),
        md('''
## Numbers: entropy, distance, sink, cross-chunk mass

`analysis.attention_summary` gives per layer the mean attention entropy, the mean query–key
distance, the mass on the first token (the "attention sink"), and the mass that crosses a chunk
boundary (exactly zero on chunked layers, by construction).
'''),
        code('''
for row in an.attention_summary(trace):
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})'''),
        code('''
plots.attention_by_layer_type(trace)'''),
        md('''
## The explorer

Pick a layer (its type is shown: chunked RoPE or global NoPE), a head or the mean of heads,
and a query token: the bars show where that token looks, with the chunk boundaries dashed and
the most attended tokens named.
'''),
        code('''
from workbench.widgets import AttentionExplorer

explorer = AttentionExplorer(model, tok)
explorer'''),
        md('''
**Try:** focus a query just after a chunk boundary on layer 0, then switch to layer 3. On the
chunked layer its context starts over; on the global layer it can reach back to the start.
'''),
        md(LONG_CONTEXT_INTRO),
        code('''
import json
import time

N = LONG_CONTEXT_TOKENS  # tokens; 32768 works the same way, about 10x slower on a CPU
ROOT = Path(wb.__file__).resolve().parent.parent
long_ids = []
with open(ROOT / "data" / "corpus" / "val.jsonl") as f:
    for line in f:  # documents of every domain, one after the other, one BOS at the start
        long_ids += tok.encode(json.loads(line)["text"], add_bos=not long_ids)
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
print(wb.numerics.SUMMARY_FEATURES[:5], "+", len(an.longcontext.BUCKETS), "distance buckets")'''
             .replace("LONG_CONTEXT_TOKENS", str(LONG_CONTEXT_TOKENS))),
        md('''
### How far back does each layer look?

Mean attention mass per query–key distance bucket (log-spaced; mean over heads and all
queries). The chunked RoPE layers cannot pass the dashed line (the chunk size): their mass
stops there by construction. The global NoPE layer is the only one that can use the far
context — **look at how much of its mass actually sits past the chunk size, and how much
of that is the sink (position 0)**. The table restricts to queries in the second half of
the sequence, where a long context is available.
'''),
        code('''
plots.plot_distance_profile(long)'''),
        code('''
edges = wb.numerics.distance_bucket_edges()
for r in an.distance_profile_past(long, N // 2):
    far = sum(r[b] for b, e in zip(an.longcontext.BUCKETS, edges) if e >= 64)
    very_far = sum(r[b] for b, e in zip(an.longcontext.BUCKETS, edges) if e >= 1024)
    print(f"layer {r['layer']} {r['kind']:13s} mass at d>=64: {far:.3f}  d>=1024: "
          f"{very_far:.3f}  sink: {r['sink']:.3f}  mean distance: {r['distance']:8.1f}")'''),
        md('''
### Entropy against position

Per position bin, the mean attention entropy of each layer. The dotted line is log(q+1),
the entropy of uniform attention over everything before the query. Chunked layers start
over at every chunk boundary, so past the first chunk (64) their entropy stops growing; a
global layer that tracked the dotted line would be averaging the whole context — the gap to
that line is how selective it stays as the context grows.
'''),
        code('''
plots.plot_summary_by_position(long, "entropy", floor_scale=FLOOR)'''),
        md('''
### The query temperature

On NoPE layers Llama 4 multiplies each query by `1 + attn_scale · log1p(⌊(q+1)/floor_scale⌋)`
(here `floor_scale` = 64, so it is exactly 1 for the first 63 positions and grows
logarithmically after). `analysis.temperature_effect` runs the model again with
`wb.disable_temperature(layer)` and compares the global layer's attention per position bin
(the first run is reused through `trace=`). The two runs agree up to `floor_scale`; past it,
the temperature should **lower the entropy and raise the largest weight** — it counters
the flattening of the softmax as the number of keys grows.
'''),
        code('''
effect = an.temperature_effect(long_model, long_ids, layer=GLOBAL, bins=14, trace=long)
for r in effect[::3] + effect[-1:]:
    print(f"positions [{r['lo']:>5}, {r['hi']:>5})  temperature {r['temperature']:.3f}  "
          f"entropy {r['entropy_on']:.2f} (off {r['entropy_off']:.2f})  "
          f"max {r['max_on']:.3f} (off {r['max_off']:.3f})")
plots.plot_temperature_effect(effect, floor_scale=FLOOR)'''),
        md('''
### A windowed pattern: the last 64 queries × every key

The full pattern of a long sequence is T² numbers per head (256 MiB at 8k, 4 GiB at 32k,
in float32).
`run(..., positions=slice(-64, None))` with `capture=["layers.3.attn.pattern"]` computes only
the last 64 query rows, against all keys. Top: those rows, keys pooled into bins; bottom: the
mean mass per key bin on a log scale. Look for the sink at position 0, mass near the
diagonal (recent tokens), and isolated far keys that stand out of the floor.
'''),
        code('''
window = long_model.run(long_ids, capture=[f"layers.{GLOBAL}.attn.pattern"],
                        positions=slice(-64, None)).trace
print(window[f"layers.{GLOBAL}.attn.pattern"].shape)
plots.plot_attention_window(window, GLOBAL)'''),
        md('''
### Routing against position

Left: for each MoE layer, the share of tokens whose first-choice expert is each expert, per
position bin. Right: each bin's Jensen–Shannon divergence from the layer's overall
distribution, with the divergence that sampling alone gives a bin of that size (dotted).
A curve on the dotted line means routing does not depend on where a token sits; the text
changes domain along the sequence, so some drift is expected from content alone.
'''),
        code('''
plots.plot_routing_by_position(long)'''),
        md('''
Does a token that comes back get the expert it got the first time? Solid: the rate for
repeated tokens, by distance to the first occurrence; dashed: random position pairs at the
same distances; dotted: two independent tokens. Repeats far above the dashed line mean the
router keys on the token itself; a solid line that decays with distance means the
surrounding context (carried by the residual stream) also moves the choice.
'''),
        code('''
plots.plot_repeat_consistency(long)'''),
    ]


LONG_CONTEXT_TOKENS = 8192
LONG_CONTEXT_INTRO = f'''
## Long context: {LONG_CONTEXT_TOKENS:,} tokens without a T × T pattern

Attention patterns cost T² per head, so beyond a few thousand tokens they are out of reach.
The hook `layers.{{i}}.attn.summary` (batch, heads, positions, features) is computed
blockwise, never materialising the pattern: per query and head it keeps the entropy, the
mass in the query's own chunk, the sink mass (position 0), the expected distance, the
largest weight, and the mass in 25 log-spaced distance buckets
(`wb.numerics.SUMMARY_FEATURES`). `analysis.longcontext` turns it into tables and
`plots.plot_*` into figures.

The sequence is the bundled validation corpus (all domains, document after document)
concatenated until it is {LONG_CONTEXT_TOKENS:,} tokens long. The section was meant for 32k
tokens; it is shrunk to {LONG_CONTEXT_TOKENS // 1024}k so the notebook runs in CI time. On two
CPU cores a forward pass with every summary took about 30 s at 8k and 70 s at 16k, and the
global layer's cost grows as T², so 32k takes roughly four times as long as 16k, and this
section runs the model three times. Set `N = 32768` below to run the full length. `wb.load(...,
max_position_embeddings=N)` lifts the config's limit of 4096 positions. The model was
trained on 256-token windows, so everything past position 256 shows how it extrapolates.
'''


# --------------------------------------------------------------------------- 04
def parity() -> list:
    return [
        md('''
# 04 · PyTorch vs JAX

The workbench implements the model twice — `workbench/torch` and `workbench/jax` mirror each
other file for file — and both read the same safetensors weights. `wb.compare` runs both on the
same tokens with every hook captured and reports, per hook, the relative error
max|Δ| / max|ref|. In float32 the bound is 2e-4.

Routing is discontinuous: when the router's best two logits are within rounding of each other
(a **near-tie**), the two frameworks may pick different experts. The report lists every such
**flip** with its margin: a flip at a near-tie is expected rounding, a flip at a wide margin
is a bug. Positions downstream of a flip are excluded from later hooks' errors (and counted).
'''),
        code(SETUP),
        code('''
tm = wb.load(MODEL, backend="torch")
jm = wb.load(MODEL, backend="jax")
tok = wb.Tokenizer.from_pretrained(MODEL)
text = "def read_config(path):\\n    with open(path) as f:\\n        return json.load(f)\\n"
ids = np.array([tok.encode(text)])
tm, jm'''),
        code('''
report = wb.compare(tm, jm, ids)
print(report.summary(max_rows=10))'''),
        code('''
plots.parity_errors(report)'''),
        md('''
## bfloat16

Production checkpoints run in bf16, with 8 bits of mantissa: errors grow to ~1e-2 and near-ties
flip. Compare the float32 PyTorch model with the bf16 JAX model; the tolerance and the
near-tie threshold widen accordingly.
'''),
        code('''
jm16 = wb.load(MODEL, backend="jax", dtype="bfloat16")
report16 = wb.compare(tm, jm16, ids)
print(report16.summary(max_rows=6))'''),
        md('''
Every flip should sit at a small margin. The margin histogram of the float32 run shows how many
tokens are that close to a tie in the first place.
'''),
        code('''
trace = tm.run(ids, capture=["*.moe.router_logits", "*.moe.topk_indices"]).trace
for f in report16.flips:
    print(f"layer {f.layer} position {f.position} {tok.token_strings([f.token])[0]!r}: "
          f"{f.experts_a} -> {f.experts_b}, margin {f.margin_a:.2e} "
          f"({'near-tie' if f.near_tie else 'WIDE'})")
plots.margin_histogram(trace, eps=report16.near_tie)'''),
        md('''
## The explorer

Per-hook errors by layer, then per MoE layer the router margin of every token with the flipped
tokens in red. The **model b** switch compares against float32 or bfloat16 JAX (the other
precision is loaded from the checkpoint on demand; here we hand over the one already loaded).
'''),
        code('''
from workbench.widgets import ParityExplorer

explorer = ParityExplorer(tm, jm, tok, text=text, variants=[jm16])
explorer'''),
        md('''
**Try:** switch to bfloat16 and step through the layers: are the flipped tokens the ones with
the smallest margins?
'''),
    ]


# --------------------------------------------------------------------------- 05
def interventions() -> list:
    return [
        md('''
# 05 · Interventions

An intervention changes the forward pass; the intervened run is traced like any other, so its
effect can be measured. Both backends implement the same set with the same results:

| intervention | effect |
|---|---|
| `ban_expert(layer, expert)` | the expert's router logit is −∞ for selection; its tokens re-route |
| `zero_expert(layer, expert)` | routing is kept, the expert contributes nothing |
| `force_expert(layer, expert, positions=None)` | the expert becomes the first choice |
| `set_top_k(k, layer=None)` | route each token to k experts |
| `ablate_head(layer, head)` | the head's output is zeroed before `o_proj` |
| `patch(name, value)` | a hook's value is replaced (activation patching) |
'''),
        code(SETUP),
        code(LOAD),
        code('''
text = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this "
        "software and associated documentation files, to deal in the Software without "
        "restriction.")
ids = np.array([tok.encode(text)])
base = model.run(ids, capture=["*.moe.topk_indices"])
print(f"clean loss {an.next_token_loss(base.logits, ids):.3f} nats on {ids.shape[1]} tokens")'''),
        md('''
## Ban vs zero

Take the expert that layer 1 uses most on this text. **Banning** it sends its tokens to their
second choice; **zeroing** keeps the routing but drops its output. The difference between the
two separates "this expert's computation matters" from "having *some* expert matters".
'''),
        code('''
top = int(np.bincount(base.trace["layers.1.moe.topk_indices"].ravel()).argmax())
for make in (wb.ban_expert, wb.zero_expert):
    out = model.run(ids, capture=["*.moe.topk_indices"], interventions=[make(1, top)])
    moved = [(out.trace[f"layers.{i}.moe.topk_indices"] !=
              base.trace[f"layers.{i}.moe.topk_indices"]).mean() for i in range(4)]
    print(f"{make.__name__}(1, {top}): loss {an.next_token_loss(out.logits, ids):.3f}, "
          f"re-routed per layer {np.round(moved, 2)}")'''),
        md('''
## Which experts matter, per domain?

`analysis.expert_ablation` bans each expert in turn on each domain's tokens and compares Δloss
with a random-expert null; `plots.ablation_bars` draws it (★: z > 2, the expert matters more to
that domain than a random one).
'''),
        code(CORPUS),
        code('''
batches = corpus_batches(tok, n_docs=2, length=64)
ablation = an.expert_ablation(model, batches, layer=1, mode="ban")
plots.ablation_bars(ablation)'''),
        md('''
## Activation patching

`patch(name, value)` replaces a hook's value with an array. Take two prompts of the same
length, and copy the residual stream of the *last position only* from the second (donor) run
into the first, after each layer in turn: where does the information that decides the next
token live? Patching after the last layer reproduces the donor's prediction exactly; patching
early, the later layers still read the recipient's context.
'''),
        code('''
other = np.array([tok.encode("date,station,temperature\\n2021-03-01,A7,12.4\\n2021-03-02,A7,")])
n = min(ids.shape[1], other.shape[1])
a, b = ids[:, :n], other[:, :n]
names = [f"layers.{i}.resid_post" for i in range(model.config.num_hidden_layers)]
run_a, run_b = model.run(a, capture=names), model.run(b, capture=names)


def p_next(logits, token):
    z = logits[0, -1].astype(np.float64)
    p = np.exp(z - z.max())
    return p[token] / p.sum()


target = int(run_b.logits[0, -1].argmax())
print(f"donor predicts {tok.decode([target])!r} with p = {p_next(run_b.logits, target):.3f}; "
      f"recipient gives it p = {p_next(run_a.logits, target):.3f}")
for name in names:
    value = run_a.trace[name].copy()
    value[:, -1] = run_b.trace[name][:, -1]
    patched = model.run(a, interventions=[wb.patch(name, value)])
    print(f"patch the last position of {name:18s}: p = {p_next(patched.logits, target):.3f}")'''),
        md('''
## The explorer

Choose a layer and a mode (**ban**, **zero** or **force**), then toggle experts; toggle heads
to ablate them. Each change re-runs the model and shows Δ loss, the share of tokens re-routed
per layer, the change in log-probability of each true next token (red: the predicted next
token changed), the tokens coloured by their new experts (black outline: re-routed), and a table
of changed predictions.
'''),
        code('''
from workbench.widgets import InterventionExplorer

explorer = InterventionExplorer(model, tok, text=text)
explorer'''),
        md('''
**Try:** force every token of layer 0 to one expert. Does the loss rise as much as banning the
most used expert? Which is worse for the `numeric` domain?
'''),
    ]


# --------------------------------------------------------------------------- 06
def research() -> list:
    return [
        md('''
# 06 · The research figure set

The figures for a routing study of an MoE model, each one call in `plots`, all saved to
`$WORKBENCH_FIGURE_DIR` (default `notebooks/figures/`) as PNG and PDF: load balance,
per-domain specialisation, token categories, confidence, temporal locality, cross-layer flow,
router geometry, shared vs routed experts, capacity, and routing **over training** from the
training log and the intermediate checkpoints.
'''),
        code(SETUP),
        code(LOAD),
        code(CORPUS),
        code('''
batches = corpus_batches(tok, n_docs=4, length=96)


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


print({d: b.shape for d, b in batches.items()})'''),
        md('''
## Load balance

Load as a ratio to uniform (1 = 1/E) per layer and expert, and three imbalance measures per
layer (CV, max/mean, normalised entropy).
'''),
        code('''
keep("load_heatmap", plots.load_heatmap(pooled))'''),
        code('''
keep("imbalance", plots.imbalance_bars(pooled))'''),
        md('''
## Specialisation by domain and token category

Each domain's expert load against the pooled load (Jensen–Shannon divergence in bits), and the
same split by token category (word, digit, punctuation, keyword, whitespace...).
'''),
        code('''
last = model.config.moe_layers[-1]
keep("domain_heatmap", plots.domain_heatmap(traces, layer=last))'''),
        code('''
categories = [c for t in pooled for c in tok.categories(t.input_ids.ravel().tolist())]
keep("category_heatmap", plots.category_heatmap(pooled, layer=last, categories=categories))'''),
        code('''
keep("specialisation_by_layer",
     plots.specialisation_by_layer(traces, categories=categories))'''),
        code('''
keep("top_tokens", plots.top_tokens_table(pooled, layer=last, tokenizer=tok))'''),
        md('''
## Router confidence

Margins (flip risk below ε) and gates.
'''),
        code('''
keep("margins", plots.margin_histogram(pooled))'''),
        code('''
keep("gates", plots.gate_histogram(pooled))'''),
        md('''
## Locality in time and depth

How often consecutive tokens share an expert (against chance), and how experts chain across
layers.
'''),
        code('''
keep("same_expert_rate", plots.same_expert_rate_plot(pooled))'''),
        code('''
keep("expert_flow", plots.expert_flow(pooled))'''),
        md('''
## Router geometry, shared vs routed, capacity

Router rows are read straight from the checkpoint (no forward pass needed).
'''),
        code('''
ckpt = wb.Checkpoint.open(MODEL)
keep("router_similarity",
     plots.router_similarity(ckpt.get(f"layers.{last}.feed_forward.router.weight",
                                      dtype="float32"), layer=last))'''),
        code('''
share = model.run(batches["prose"], capture=["*.moe.routed_out", "*.moe.shared_out",
                                              "*.moe.topk_indices"]).trace
keep("routed_share", plots.routed_share_plot(share))'''),
        code('''
keep("capacity", plots.capacity_plot(pooled))'''),
        md('''
## Routing over training

The training script logs the expert load and router entropy per layer at every evaluation
step (`training_log.json`), and keeps intermediate checkpoints under `checkpoints/`.
'''),
        code('''
from IPython.display import display

log = MODEL / "training_log.json"
if log.exists():
    display(keep("training", plots.training_curves_plot(log)))
else:
    print("no training log beside", MODEL)'''),
        md('''
Re-running the same documents through the intermediate checkpoints shows how the routing
settled: the share of tokens whose expert at a checkpoint is the one the final model picks
(routing stability; chance is 1/E), and how domain specialisation evolved. With a
load-balancing loss pushing every expert towards 1/E of the tokens, specialisation by domain
need not grow: watch which way it goes.
'''),
        code('''
steps = sorted((MODEL / "checkpoints").glob("step-*")) if (MODEL / "checkpoints").exists() \\
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
    print("no intermediate checkpoints under", MODEL / "checkpoints")'''),
        code('''
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
keep("specialisation_over_training", fig)'''),
        md('''
## Save the set

`plots.save` picks the format from the suffix (PNG, PDF or SVG; fonts stay text in SVG/PDF).
'''),
        code('''
saved = [plots.save(fig, FIG_DIR / f"{name}.{ext}") for name, fig in figures.items()
         for ext in ("png", "pdf")]
print(len(saved), "files in", FIG_DIR.resolve())'''),
    ]


# --------------------------------------------------------------------------- 07
def real_llama4() -> list:
    return [
        md('''
# 07 · A real Llama 4 checkpoint

The workbench reads the HF layout of Llama-4-Scout and Maverick directly — text-only
(`model.*`) or the multimodal wrapper (`language_model.model.*`), sharded with
`model.safetensors.index.json` — and the HF `tokenizer.json`. What you can *run* depends on
memory: Scout is about 217 GB in bf16, Maverick about 800 GB. This notebook says what fits
where, plans a run with `workbench plan`, and runs a streamed model (`offload="disk"`), which
reads each layer from disk just before use and only the experts the router chose.

Set `WORKBENCH_LLAMA4_PATH` to a checkpoint directory before starting Jupyter; that path is the
only thing to change. Without it, every cell runs on the bundled model.
'''),
        code(SETUP),
        code('''
PATH = Path(os.environ.get("WORKBENCH_LLAMA4_PATH") or MODEL)
REAL = PATH != MODEL
print("checkpoint:", PATH, "(real Llama 4)" if REAL else "(bundled stand-in)")'''),
        md('''
## What fits where

Weights of the language model by dtype, and the memory each way of running needs: resident
(every weight in memory) or streamed (two layers' dense weights, the experts held at once, the
lm_head; the torch backend holds one expert at a time, the jax backend the experts a layer
chose). A decode step streams the *active* parameters (about 17B for both models); a 512-token
prefill touches nearly every expert. FP8 halves the bytes of Meta's Maverick-FP8 release, but
the workbench cannot read FP8 checkpoints yet, so that column is for planning only.
'''),
        code('''
from workbench.config import human_bytes, human_count
from workbench.plan import make_plan, plan_text

presets = {"scout": wb.ModelConfig.scout(), "maverick": wb.ModelConfig.maverick(),
           "bundled": wb.ModelConfig.from_pretrained(MODEL)}
print(f"{'model':9s} {'total':>7s} {'active':>7s} {'bf16':>10s} {'fp8':>10s} "
      f"{'streamed (torch)':>17s} {'streamed (jax)':>15s} {'decode reads':>13s}")
for name, c in presets.items():
    pc = c.param_counts()
    t = make_plan(c, "1TB", read_rate=1e9, backend="torch")
    j = make_plan(c, "1TB", read_rate=1e9, backend="jax")
    print(f"{name:9s} {human_count(pc['total']):>7s} {human_count(pc['active']):>7s} "
          f"{human_bytes(2 * pc['total']):>10s} {human_bytes(pc['total']):>10s} "
          f"{human_bytes(t.streamed_need):>17s} {human_bytes(j.streamed_need):>15s} "
          f"{human_bytes(t.decode_read):>13s}")'''),
        md('''
## Plan a run

`workbench plan CKPT|scout|maverick --memory 24GB` prints the mode that fits and the I/O floor
of a prefill and of a decode step, from a quick measurement of how fast this machine reads the
checkpoint (or, for a preset, memory). Here: Scout on a 24 GB workstation, then your checkpoint.
'''),
        code('''
import subprocess
import sys

print(subprocess.run([sys.executable, "-m", "workbench.cli", "plan", "scout", "--memory", "24GB"],
                     capture_output=True, text=True, check=True).stdout)
cfg = wb.ModelConfig.from_pretrained(PATH)
print(plan_text(make_plan(cfg, "24GB", path=PATH), cfg, str(PATH)))'''),
        md('''
## Inspect your checkpoint

`workbench inspect PATH` validates every tensor's name and shape against the config, and
reports the dtypes and the layer map. `Checkpoint.open(path, layers=[...])` indexes only some
layers, so reading the router weights of a 400B-parameter model costs megabytes.
'''),
        code('''
from workbench.describe import inspect_text

print(inspect_text(str(PATH), check_values=not REAL))
ck = wb.Checkpoint.open(PATH, layers=[0, 1])
moe = [i for i in ck.config.moe_layers if i in (0, 1)]
router = ck.get(f"layers.{moe[0]}.feed_forward.router.weight", dtype="float32")
print("router weight", router.shape)
plots.router_similarity(router, layer=moe[0])'''),
        md('''
## Run streamed

`offload="disk"` runs any checkpoint whatever its size: hooks, interventions, `generate` and
`wb.compare` work unchanged, and every hook equals the resident run exactly. `max_memory` is the
byte budget of an LRU cache of experts, which decode steps hit. `model.io_stats()` shows what
was read, per layer: bytes, expert cache hits and misses, and the seconds spent waiting on I/O.
`stop_at_layer=k` runs — and reads — only the first k layers.
'''),
        code('''
dtype = "bfloat16" if REAL else "float32"
model = wb.load(PATH, backend="torch", dtype=dtype, offload="disk", max_memory="2GB")
tok = wb.Tokenizer.from_pretrained(PATH)
ids = np.array([tok.encode("The capital of France is")])
gen = model.generate(ids, 8, temperature=0, capture="*.moe.topk_indices")
print(repr(tok.decode(gen.new_tokens[0].tolist())))
stats = model.io_stats(reset=True)
print(f"read {human_bytes(stats['total']['bytes_read'])} in total, expert cache "
      f"{stats['total']['expert_hits']} hits / {stats['total']['expert_misses']} misses, "
      f"waited {stats['total']['wait_s']:.2f} s on reads")
for layer, s in list(stats["layers"].items())[:6]:
    print(f"  {layer:>5s}: {human_bytes(s['bytes_read']):>10s}, experts {s['expert_hits']} hits "
          f"/ {s['expert_misses']} misses")'''),
        code('''
early = model.run(ids, capture="layers.1.moe.*", stop_at_layer=2)
print("logits:", early.logits, "| layers read:", sorted(model.io_stats(reset=True)["layers"]))
plots.load_heatmap(early.trace)'''),
        md('''
## How much will a capture cost?

Captured hooks are kept in host memory. `model.estimate_capture_bytes` gives the size before
running; for Scout at 8k tokens routing is cheap, attention patterns are not.
'''),
        code('''
from workbench.hooks import estimate_capture_bytes

scout, f16 = presets["scout"], np.dtype("float16")
for capture in (["*.moe.topk_indices"], ["*.moe.*"], ["layers.3.attn.pattern"], ["*.attn.pattern"]):
    size = estimate_capture_bytes(scout, capture, 1, 8192, f16)
    print(f"scout, 8192 tokens, float16 capture: {str(capture):28s} {human_bytes(size)}")'''),
        md('''
From here the tools of notebooks 02–06 apply to the streamed model: `plots.load_heatmap`,
`wb.compare`, interventions. On a real model, capture only the layers you study
(`capture=["layers.12.moe.*"]`, `positions=`), and expect a decode step to cost about the
I/O floor `workbench plan` printed.
'''),
    ]


NOTEBOOKS = {
    "01_quickstart": quickstart,
    "02_routing_explorer": routing,
    "03_attention_patterns": attention,
    "04_pytorch_vs_jax": parity,
    "05_interventions": interventions,
    "06_research_plots": research,
    "07_real_llama4": real_llama4,
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` with stable cell ids and no outputs."""
    nb = new_notebook(cells=NOTEBOOKS[name]())
    for i, cell in enumerate(nb.cells):
        cell.id = f"{name[:2]}-{i:02d}"
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                       "name": "python3"},
        "language_info": {"name": "python"},
    }
    nbformat.validate(nb)
    return nb


def text(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true",
                   help="verify that notebooks/ matches this script; write nothing")
    p.add_argument("--out", type=Path, default=OUT, help="output directory")
    a = p.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = a.out / f"{name}.ipynb"
        want = text(build(name))
        if a.check:
            if not path.exists() or path.read_text() != want:
                stale.append(path.name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(want)
            print("wrote", path)
    if stale:
        print("out of date (run python scripts/make_notebooks.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
