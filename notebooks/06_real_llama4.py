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
# # 06 · A real Llama 4 checkpoint
#
# The workbench reads the HF layout of Llama-4-Scout and Maverick directly — text-only
# (`model.*`) or the multimodal wrapper (`language_model.model.*`), sharded with
# `model.safetensors.index.json` — and the HF `tokenizer.json`. What you can *run* depends on
# memory: Scout is about 217 GB in bf16, Maverick about 800 GB. This notebook says what fits
# where, plans a run with `workbench plan`, and runs a streamed model (`offload="disk"`), which
# reads each layer from disk just before use and only the experts the router chose.
#
# Set `WORKBENCH_LLAMA4_PATH` to a checkpoint directory before starting Jupyter; that path is the
# only thing to change. Without it, every cell runs on the bundled model.

# %%
# %matplotlib inline
import os
from pathlib import Path

import numpy as np

import workbench as wb
from workbench import plots
from workbench.widgets import bundled_path

MODEL = bundled_path()  # data/scout-mini, or the checkpoint named by $WORKBENCH_MODEL
print("model:", MODEL)

# %%
PATH = Path(os.environ.get("WORKBENCH_LLAMA4_PATH") or MODEL)
REAL = PATH != MODEL
print("checkpoint:", PATH, "(real Llama 4)" if REAL else "(bundled stand-in)")

# %% [markdown]
# ## What fits where
#
# Weights of the language model by dtype, and the memory each way of running needs: resident
# (every weight in memory) or streamed (two layers' dense weights, the experts held at once, the
# lm_head; the torch backend holds one expert at a time, the jax backend the experts a layer
# chose). A decode step streams the *active* parameters (about 17B for both models); a 512-token
# prefill touches nearly every expert. FP8 halves the bytes of Meta's Maverick-FP8 release, but
# the workbench cannot read FP8 checkpoints yet, so that column is for planning only.

# %%
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
          f"{human_bytes(t.decode_read):>13s}")

# %% [markdown]
# ## Plan a run
#
# `workbench plan CKPT|scout|maverick --memory 24GB` prints the mode that fits and the I/O floor
# of a prefill and of a decode step, from a quick measurement of how fast this machine reads the
# checkpoint (or, for a preset, memory). Here: Scout on a 24 GB workstation, then your checkpoint.

# %%
import subprocess
import sys

print(subprocess.run([sys.executable, "-m", "workbench.cli", "plan", "scout", "--memory", "24GB"],
                     capture_output=True, text=True, check=True).stdout)
cfg = wb.ModelConfig.from_pretrained(PATH)
print(plan_text(make_plan(cfg, "24GB", path=PATH), cfg, str(PATH)))

# %% [markdown]
# ## Inspect your checkpoint
#
# `workbench inspect PATH` validates every tensor's name and shape against the config, and
# reports the dtypes and the layer map. `Checkpoint.open(path, layers=[...])` indexes only some
# layers, so reading the router weights of a 400B-parameter model costs megabytes.

# %%
from workbench.describe import inspect_text

print(inspect_text(str(PATH), check_values=not REAL))
ck = wb.Checkpoint.open(PATH, layers=[0, 1])
moe = [i for i in ck.config.moe_layers if i in (0, 1)]
router = ck.get(f"layers.{moe[0]}.feed_forward.router.weight", dtype="float32")
print("router weight", router.shape)
plots.router_similarity(router, layer=moe[0])

# %% [markdown]
# ## Run streamed
#
# `offload="disk"` runs any checkpoint whatever its size: hooks, interventions, `generate` and
# `wb.compare` work unchanged, and every hook equals the resident run exactly. `max_memory` is the
# byte budget of an LRU cache of experts, which decode steps hit. `model.io_stats()` shows what
# was read, per layer: bytes, expert cache hits and misses, and the seconds spent waiting on I/O.
# `stop_at_layer=k` runs — and reads — only the first k layers.

# %%
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
          f"/ {s['expert_misses']} misses")

# %%
early = model.run(ids, capture="layers.1.moe.*", stop_at_layer=2)
print("logits:", early.logits, "| layers read:", sorted(model.io_stats(reset=True)["layers"]))
plots.load_heatmap(early.trace)

# %% [markdown]
# ## How much will a capture cost?
#
# Captured hooks are kept in host memory. `model.estimate_capture_bytes` gives the size before
# running; for Scout at 8k tokens routing is cheap, attention patterns are not.

# %%
from workbench.hooks import estimate_capture_bytes

scout, f16 = presets["scout"], np.dtype("float16")
for capture in (["*.moe.topk_indices"], ["*.moe.*"], ["layers.3.attn.pattern"], ["*.attn.pattern"]):
    size = estimate_capture_bytes(scout, capture, 1, 8192, f16)
    print(f"scout, 8192 tokens, float16 capture: {str(capture):28s} {human_bytes(size)}")

# %% [markdown]
# From here the tools of notebooks 02–05 apply to the streamed model: `plots.load_heatmap`,
# `wb.compare`, interventions. On a real model, capture only the layers you study
# (`capture=["layers.12.moe.*"]`, `positions=`), and expect a decode step to cost about the
# I/O floor `workbench plan` printed.
