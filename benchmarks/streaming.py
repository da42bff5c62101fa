"""Streaming benchmark: a checkpoint bigger than the machine's RAM, run with ``offload="disk"``.

Writes, once, a seeded synthetic bf16 checkpoint with Scout's real text dimensions and 8 layers
(hidden 5120, vocab 202048, 40 / 8 heads of 128, 16 experts of width 8192 plus the shared
expert in every layer, top-1, chunk 8192, NoPE layers 3 and 7, untied lm_head: 39.4 GB in 19
shards) into ``benchmarks/.cache/scout-8layer/`` (git-ignored; ``benchmarks/_synth.py``).

Then, in order, each in a fresh subprocess that samples its own RssAnon every 5 ms (the parent
samples it too and kills the run when its RssAnon passes ``--max-gb`` or the machine's
MemAvailable falls under 1.5 GB; every run has a timeout):

1. the files' sequential read bandwidth (in this process): ``cold``: the shards' page cache is
   dropped (``posix_fadvise(DONTNEED)``, no privileges needed) and ``--cold-gb`` of them are read
   with 64 MiB unbuffered reads, i.e. the disk; ``warm``: one 2 GB shard read twice, the second
   read timed (page cache -> user memory).
2. per backend (``jax``, ``torch``): the shards' page cache is dropped, then
   ``wb.load(path, backend=..., dtype=..., offload="disk", max_memory=...)`` and
   ``model.generate(ids, 33, temperature=0)`` on seeded random ids: a prefill of ``--tokens``
   tokens and up to 32 cached greedy decode steps (fewer if the run's ``--budget`` is spent: it
   stops between two steps and reports what ran). Wrapping the weight source's ``begin``
   (called once per forward) and ``read_expert`` splits the run into forwards: wall time,
   ``io_stats`` (bytes read, expert bytes, hits, misses, seconds waiting on reads), the expert
   cache's keys at the start of each step, the experts the router chose, and (jax) the seconds
   spent compiling (``jax.monitoring`` compile events).
3. ``hf``: ``transformers.Llama4ForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
   device_map="auto", max_memory={"cpu": "6GiB"}, offload_folder=...)`` then ``generate`` of
   ``--hf-new`` tokens after an ``--hf-tokens`` prompt (its MoE runs every expert on every
   token, so the prompt is tiny); whatever happens (time or error) is reported.

Derived, per forward: compute = wall - I/O wait - compile (the seconds the forward was not
blocked on a read; in jax a layer's expert matmuls run asynchronously while the next layer's
dense read is awaited, so this is a lower bound on compute); floor = bytes read / bandwidth +
compute; time / floor. Decode check: each step's bytes read must equal the dense bytes (every
layer's attention, norms, router and shared expert, the final norm, the lm_head and one
embedding row) plus the bytes of the chosen experts that were not in the expert cache when the
step started. Projections to full Scout and Maverick use the byte counts of their configs, the
measured bandwidths and the measured compute rate (FLOPs / compute s).

    python benchmarks/streaming.py [--only jax,torch,hf] [--tokens jax=512,torch=64]
        [--dtype jax=bfloat16,torch=bfloat16] [--max-memory 2GB] [--new 33] [--cold-gb 12]
        [--timeout 1500] [--hf-timeout 900] [--keep | --delete] [--seed 0]
        [--json benchmarks/results-streaming.json]

GB means 10^9 bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _synth import (  # noqa: E402
    CACHE_ROOT,
    GB,
    Sampler,
    child_row,
    code_version,
    drop_page_cache,
    ensure_checkpoint,
    error_record,
    mem_available,
    memory_record,
    proc_status,
    run_sampled,
)

from workbench.checkpoint import Checkpoint, expected_shapes  # noqa: E402
from workbench.config import ModelConfig  # noqa: E402
from workbench.hooks import layer_of  # noqa: E402

CACHE = CACHE_ROOT / "scout-8layer"
RUNS = ("jax", "torch", "hf")
READ = 64 * 2**20


def scout_8() -> ModelConfig:
    cfg = ModelConfig.scout(num_hidden_layers=8, multimodal=False)
    assert cfg.moe_layers == list(range(8)) and cfg.no_rope_layers == [1, 1, 1, 0, 1, 1, 1, 0]
    assert (cfg.hidden_size, cfg.vocab_size, cfg.num_local_experts, cfg.intermediate_size,
            cfg.intermediate_size_mlp, cfg.num_experts_per_tok, cfg.attention_chunk_size) == \
        (5120, 202048, 16, 8192, 16384, 1, 8192)
    return cfg


# ----------------------------------------------------------------------------- bytes & FLOPs


def byte_counts(cfg: ModelConfig, itemsize: int = 2) -> dict[str, float]:
    """Checkpoint bytes by part: dense per layer (sum), experts, one expert, embed, head."""
    shapes = expected_shapes(cfg)
    dense = experts = embed = head = 0
    for n, s in shapes.items():
        b = math.prod(s) * itemsize
        if ".experts." in n:
            experts += b
        elif layer_of(n) is not None:
            dense += b
        elif n.startswith("embed"):
            embed += b
        else:
            head += b  # lm_head + final norm
    E = cfg.num_local_experts
    one = 3 * cfg.hidden_size * cfg.intermediate_size * itemsize
    return {"dense_layers": dense, "experts": experts, "one_expert": one, "embed": embed,
            "head": head, "total": dense + experts + embed + head,
            "moe_layers": len(cfg.moe_layers), "experts_per_layer": E}


def flops(cfg: ModelConfig, tokens: int, past: int = 0) -> float:
    """Matmul FLOPs of one forward over ``tokens`` new tokens after ``past`` cached ones (the
    routed experts at top-k, the attention scores within each layer's window, the lm_head on
    every position as the forward computes it)."""
    D, H, K, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    I, Im, k = cfg.intermediate_size, cfg.intermediate_size_mlp, cfg.num_experts_per_tok
    total = 0.0
    for i in range(cfg.num_hidden_layers):
        attn = D * (H * d) * 2 + D * (K * d) * 2
        ffn = (3 * D * I * (k + 1) + D * cfg.num_local_experts) if cfg.is_moe(i) else 3 * D * Im
        chunk = cfg.chunk_size(i)
        keys = sum(min(past + t + 1, chunk or 10**12) for t in range(tokens))
        total += 2 * tokens * (attn + ffn) + 2 * 2 * H * d * keys
    return total + 2 * tokens * cfg.vocab_size * D


# ----------------------------------------------------------------------------- bandwidth


def read_file(f: Path, limit: int | None = None) -> int:
    """Bytes read from f (at most about ``limit``) with 64 MiB reads into one reused buffer."""
    n = 0
    buf = memoryview(bytearray(READ))
    with open(f, "rb", buffering=0) as fh:
        while limit is None or n < limit:
            k = fh.readinto(buf)
            if not k:
                break
            n += k
    return n


def bandwidth(path: Path, cold_gb: float) -> dict[str, Any]:
    """Cold (page cache dropped) sequential read of ``cold_gb`` of the shards; a 2 GB shard read
    twice (first read, then warm page cache)."""
    shards = sorted(path.glob("*.safetensors"))
    drop_page_cache(path)
    want, got = int(cold_gb * GB), 0
    t0 = time.perf_counter()
    for f in shards:
        got += read_file(f, want - got)
        if got >= want:
            break
    cold_s = time.perf_counter() - t0
    big = max(shards, key=lambda f: f.stat().st_size)
    drop_page_cache(path)
    t0 = time.perf_counter()
    n1 = read_file(big)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n2 = read_file(big)
    warm_s = time.perf_counter() - t0
    drop_page_cache(path)
    return {"cold_bytes": got, "cold_s": cold_s, "cold_Bps": got / cold_s,
            "file": big.name, "first_bytes": n1, "first_s": first_s, "first_Bps": n1 / first_s,
            "warm_bytes": n2, "warm_s": warm_s, "warm_Bps": n2 / warm_s}


# ----------------------------------------------------------------------------- one run (child)


class _OutOfTime(Exception):
    """Raised between two forwards once a run's time budget is spent."""


def child_wb(backend: str, path: Path, tokens: int, new: int, dtype: str, max_memory: str,
             seed: int, budget_s: float) -> dict[str, Any]:
    t_imp = time.perf_counter()
    import workbench as wb
    compile_events: list[tuple[float, float]] = []
    if backend == "jax":
        import jax
        import jax.monitoring

        import workbench.jax  # noqa: F401

        def on_event(event: str, duration: float, **_: Any) -> None:
            if event.startswith("/jax/core/compile/"):  # trace, lower, compile
                compile_events.append((time.monotonic(), duration))

        jax.monitoring.register_event_duration_secs_listener(on_event)
        jax.devices()
        versions = {"jax": jax.__version__}
    else:
        import torch

        import workbench.torch  # noqa: F401
        versions = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    import_s = time.perf_counter() - t_imp
    sampler = Sampler()
    sampler.start()
    t_load = time.monotonic()
    model = wb.load(path, backend=backend, dtype=dtype, offload="disk", max_memory=max_memory)
    load_s = time.monotonic() - t_load
    cfg = model.config
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, tokens))
    src = model.weights
    marks: list[dict[str, Any]] = []
    requested: list[set[tuple[int, int]]] = []  # per forward: the experts the router chose
    orig_begin, orig_read = src.begin, src.read_expert
    deadline = time.monotonic() + budget_s

    def begin(n: int) -> None:  # one call per forward: close the previous one, open the next
        marks.append({"t": time.monotonic(), "io": model.io_stats(reset=True),
                      "cached": sorted(list(k) for k in src.cache._items)})
        if len(marks) > 1 and time.monotonic() > deadline:
            raise _OutOfTime
        requested.append(set())
        orig_begin(n)

    def read_expert(layer: int, e: int) -> Any:
        requested[-1].add((layer, e))
        return orig_read(layer, e)

    src.begin, src.read_expert = begin, read_expert
    model.io_stats(reset=True)
    stopped = False
    try:
        g = model.generate(ids, new, temperature=0)
        tail = g.sequences[0, tokens:].tolist()
        marks.append({"t": time.monotonic(), "io": model.io_stats(reset=True), "cached": []})
    except _OutOfTime:
        stopped, tail = True, []
    sampler.stop()
    forwards = []
    for j in range(len(marks) - 1):
        t0, t1 = marks[j]["t"], marks[j + 1]["t"]
        io = marks[j + 1]["io"]
        comp = sum(d for t, d in compile_events if t0 <= t <= t1)
        peak, _ = sampler.peak(t0, t1)
        f = {"t0": t0, "t1": t1, "wall_s": t1 - t0, "compile_s": comp, "peak_rss_anon": peak,
             "io": io["total"], "cached_at_start": marks[j]["cached"],
             "chosen": sorted(list(k) for k in requested[j]),
             "tokens": tokens if j == 0 else 1}
        if j == 0:
            f["layers"] = io["layers"]
        forwards.append(f)
    return {
        "backend": backend, "dtype": dtype, "max_memory": max_memory, "versions": versions,
        "import_s": import_s, "load_s": load_s, "tokens": tokens, "new_tokens": new,
        "forwards": forwards, "sequence_tail": tail, "budget_s": budget_s,
        "stopped_at_budget": stopped, "decode_steps_done": len(forwards) - 1,
        "peak_rss_anon_load": sampler.peak(t_load, t_load + load_s)[0],
        "peak_rss_anon": max(sampler.peak()[0], proc_status()["RssAnon"]),
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "samples": len(sampler.samples),
    }


def child_hf(path: Path, tokens: int, new: int, seed: int) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import Llama4ForCausalLM
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import accelerate
        versions["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    sampler = Sampler()
    sampler.start()
    out: dict[str, Any] = {"backend": "hf", "versions": versions, "tokens": tokens,
                           "new_tokens": new}
    with tempfile.TemporaryDirectory(prefix="wb-hf-offload-",
                                     dir=str(path.parent)) as offload:
        t0 = time.monotonic()
        try:
            model = Llama4ForCausalLM.from_pretrained(
                path, dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": "6GiB"},
                offload_folder=offload)
            model.eval()
            out["load_s"] = time.monotonic() - t0
            out["hf_device_map_counts"] = {}
            for v in getattr(model, "hf_device_map", {}).values():
                out["hf_device_map_counts"][str(v)] = out["hf_device_map_counts"].get(str(v),
                                                                                       0) + 1
            out["offload_folder_bytes"] = sum(f.stat().st_size for f in Path(offload).rglob("*")
                                              if f.is_file())
            out["peak_rss_anon_load"] = sampler.peak()[0]
            ids = torch.from_numpy(np.random.default_rng(seed).integers(
                0, model.config.vocab_size, (1, tokens)))
            t1 = time.monotonic()
            with torch.inference_mode():
                seq = model.generate(ids, max_new_tokens=new, do_sample=False,
                                     attention_mask=torch.ones_like(ids))
            out["generate_s"] = time.monotonic() - t1
            out["sequence_tail"] = seq[0, tokens:].tolist()
        except Exception as e:  # reported, not raised: the run's outcome is the measurement
            out.update(error_record(e, t0))
    sampler.stop()
    out.update(memory_record(sampler))
    return out


def run_child(args: list[str], timeout: float, limit: int, min_avail: int) -> dict[str, Any]:
    """A fresh subprocess, sampled from here too; its RESULT line, or why it has none."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    return child_row(run_sampled(cmd, timeout, limit, min_avail, interval=0.02))


# ----------------------------------------------------------------------------- analysis


def analyse(row: dict[str, Any], bw: dict[str, Any], cfg: ModelConfig,
            itemsize: int = 2) -> dict[str, Any]:
    """Floors, ratios and the decode-read check of one backend's run (``itemsize``: bytes per
    value in the checkpoint, whatever the compute dtype)."""
    bc = byte_counts(cfg, itemsize)
    one = bc["one_expert"]
    fw = row["forwards"]
    cold, warm = bw["cold_Bps"], bw["warm_Bps"]
    out: dict[str, Any] = {}
    pre = fw[0]
    compute = pre["wall_s"] - pre["io"]["wait_s"] - pre["compile_s"]
    io_cold = pre["io"]["bytes_read"] / cold
    out["prefill"] = {
        "wall_s": pre["wall_s"], "compile_s": pre["compile_s"], "wait_s": pre["io"]["wait_s"],
        "compute_s": compute, "bytes_read": pre["io"]["bytes_read"],
        "expert_bytes": pre["io"]["expert_bytes"], "expert_misses": pre["io"]["expert_misses"],
        "io_floor_cold_s": io_cold, "floor_s": io_cold + compute,
        "ratio": (pre["wall_s"] - pre["compile_s"]) / (io_cold + compute),
        "flops": flops(cfg, row["tokens"]), "peak_rss_anon": pre["peak_rss_anon"],
        "experts_used": len(pre["chosen"]),
    }
    out["prefill"]["gflops_per_s"] = out["prefill"]["flops"] / compute / 1e9
    steps = []
    dense_step = bc["dense_layers"] + bc["head"] + cfg.hidden_size * itemsize
    for j, f in enumerate(fw[1:], 1):
        cached = {tuple(k) for k in f["cached_at_start"]}
        want = {tuple(k) for k in f["chosen"]}
        not_cached = len(want - cached)
        expected = dense_step + not_cached * one
        c = f["wall_s"] - f["io"]["wait_s"] - f["compile_s"]
        steps.append({
            "step": j, "wall_s": f["wall_s"], "compile_s": f["compile_s"],
            "wait_s": f["io"]["wait_s"], "compute_s": c, "bytes_read": f["io"]["bytes_read"],
            "expected_bytes": expected, "misses": f["io"]["expert_misses"],
            "hits": f["io"]["expert_hits"], "chosen_not_cached": not_cached,
            "reads_ok": f["io"]["bytes_read"] <= expected,
            "floor_warm_s": f["io"]["bytes_read"] / warm + c,
            "floor_cold_s": f["io"]["bytes_read"] / cold + c,
            "peak_rss_anon": f["peak_rss_anon"],
            "past": row["tokens"] + j - 1,
        })
    if steps:
        steady = steps[1:] or steps  # step 1 of jax compiles the decode steps
        med = float(np.median([s["wall_s"] for s in steady]))
        out["decode"] = {
            "steps": steps, "n": len(steps), "median_wall_s": med,
            "step1_wall_s": steps[0]["wall_s"], "step1_compile_s": steps[0]["compile_s"],
            "mean_bytes_read": float(np.mean([s["bytes_read"] for s in steps])),
            "dense_bytes_per_step": dense_step,
            "mean_misses": float(np.mean([s["misses"] for s in steps])),
            "mean_hits": float(np.mean([s["hits"] for s in steps])),
            "median_wait_s": float(np.median([s["wait_s"] for s in steady])),
            "median_compute_s": float(np.median([s["compute_s"] for s in steady])),
            "median_floor_warm_s": float(np.median([s["floor_warm_s"] for s in steady])),
            "median_floor_cold_s": float(np.median([s["floor_cold_s"] for s in steady])),
            "all_reads_ok": all(s["reads_ok"] for s in steps),
            "flops": flops(cfg, 1, row["tokens"]),
            "peak_rss_anon": max(s["peak_rss_anon"] for s in steps),
        }
        out["decode"]["gflops_per_s"] = out["decode"]["flops"] / \
            out["decode"]["median_compute_s"] / 1e9
    return out


def projections(bw: dict[str, Any], rates: dict[str, dict[str, float]], tokens: int,
                h2d: float, gpu_flops: float) -> list[dict[str, Any]]:
    """Seconds per prefill of ``tokens`` and per decode token for full Scout and Maverick:
    bytes read / bandwidth + FLOPs / compute rate. Prefill reads every expert used at
    least once (expected count for random top-k routing); decode reads the dense weights, the
    lm_head and k experts per MoE layer (no cache hits: the upper bound)."""
    rows = []
    for name, cfg in (("Scout", ModelConfig.scout(multimodal=False)),
                      ("Maverick", ModelConfig.maverick(multimodal=False))):
        bc = byte_counts(cfg)
        E, k, L = cfg.num_local_experts, cfg.num_experts_per_tok, len(cfg.moe_layers)
        used = E * (1 - (1 - k / E) ** tokens)
        pre_bytes = bc["dense_layers"] + bc["head"] + L * used * bc["one_expert"] + \
            tokens * cfg.hidden_size * 2
        dec_bytes = bc["dense_layers"] + bc["head"] + L * k * bc["one_expert"] + \
            cfg.hidden_size * 2
        fp, fd = flops(cfg, tokens), flops(cfg, 1, tokens)
        r = {"model": name, "checkpoint_bytes": bc["total"], "prefill_bytes": pre_bytes,
             "decode_bytes": dec_bytes, "prefill_flops": fp, "decode_flops": fd}
        for where, rate in rates.items():  # this machine, per backend's measured rate
            r[f"here_{where}_prefill_s_cold"] = pre_bytes / bw["cold_Bps"] + fp / rate["prefill"]
            r[f"here_{where}_decode_s_cold"] = dec_bytes / bw["cold_Bps"] + fd / rate["decode"]
            r[f"here_{where}_decode_s_warm"] = dec_bytes / bw["warm_Bps"] + fd / rate["decode"]
        for label, b in (("disk", bw["cold_Bps"]), ("ram", h2d)):
            bb = min(b, h2d)
            r[f"h100_{label}_prefill_s"] = pre_bytes / bb + fp / gpu_flops
            r[f"h100_{label}_decode_s"] = dec_bytes / bb + fd / gpu_flops
        rows.append(r)
    return rows


def report(rows: dict[str, Any], bw: dict[str, Any], proj: list[dict[str, Any]],
           h2d: float) -> str:
    L = []
    g = lambda b: f"{b / GB:.2f}"  # noqa: E731
    L.append(f"bandwidth: cold {bw['cold_Bps'] / GB:.2f} GB/s ({g(bw['cold_bytes'])} GB), first "
             f"read of {bw['file']} {bw['first_Bps'] / GB:.2f} GB/s, warm "
             f"{bw['warm_Bps'] / GB:.2f} GB/s")
    L.append("")
    L.append("| run | prompt | prefill s (compile) | bytes read GB | I/O floor s | compute s | "
             "floor s | time / floor | decode s/token (median) | bytes/token GB | "
             "misses / hits per token | floor warm–cold s | peak RssAnon GB | ru_maxrss GB |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "error" in r:
            L.append(f"| {name} | | failed: {r['error']} | | | | | | | | | | "
                     f"≥ {g(r.get('peak_rss_anon', r.get('parent_peak_rss_anon', 0)))} | |")
            continue
        if name == "hf":
            L.append(f"| hf | {r['tokens']} + {r['new_tokens']} | generate "
                     f"{r['generate_s']:.1f} s (load {r['load_s']:.1f} s) | | | | | | | | | | "
                     f"{g(r['peak_rss_anon'])} | {g(r['ru_maxrss'])} |")
            continue
        a = r["analysis"]
        p, d = a["prefill"], a.get("decode", {})
        L.append(
            f"| {name} {r['dtype']} | {r['tokens']} | {p['wall_s']:.1f} ({p['compile_s']:.1f}) "
            f"| {g(p['bytes_read'])} | {p['io_floor_cold_s']:.1f} | {p['compute_s']:.1f} | "
            f"{p['floor_s']:.1f} | {p['ratio']:.2f}× | {d.get('median_wall_s', 0):.2f} | "
            f"{g(d.get('mean_bytes_read', 0))} | {d.get('mean_misses', 0):.1f} / "
            f"{d.get('mean_hits', 0):.1f} | {d.get('median_floor_warm_s', 0):.2f}–"
            f"{d.get('median_floor_cold_s', 0):.2f} | {g(r['peak_rss_anon'])} | "
            f"{g(r['ru_maxrss'])} |")
    L.append("")
    L.append("| model | checkpoint GB | prefill GB | decode GB/token | " +
             " | ".join(k for k in proj[0] if k.startswith(("here_", "h100_"))) + " |")
    L.append("|---|---|---|---|" + "---|" * sum(k.startswith(("here_", "h100_"))
                                                  for k in proj[0]))
    for r in proj:
        L.append(f"| {r['model']} | {g(r['checkpoint_bytes'])} | {g(r['prefill_bytes'])} | "
                 f"{g(r['decode_bytes'])} | " +
                 " | ".join(f"{v:.1f}" for k, v in r.items() if k.startswith(("here_", "h100_")))
                 + " |")
    L.append(f"(H100 columns: host->device at {h2d / GB:.0f} GB/s assumed; 'disk' = this "
             "machine's measured cold rate, 'ram' = checkpoint in host page cache)")
    return "\n".join(L)


def per_backend(spec: str, default: str) -> dict[str, str]:
    out = {"jax": default, "torch": default}
    for part in filter(None, (s.strip() for s in spec.split(","))):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
        else:
            out = dict.fromkeys(out, part)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(RUNS))
    ap.add_argument("--tokens", default="jax=512,torch=64",
                    help="prompt length per backend (torch bf16 matmuls are slow on CPUs "
                         "without AVX-512 bf16)")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype, per backend as --tokens")
    ap.add_argument("--max-memory", default="2GB", help="wb.load max_memory (expert cache)")
    ap.add_argument("--new", default="33", help="generate's max_new_tokens, per backend as "
                    "--tokens (33 = the prefill's token + 32 decode steps)")
    ap.add_argument("--budget", default="jax=660,torch=540",
                    help="seconds per backend after which decoding stops at the next step "
                         "(what ran is reported); the hard --timeout kills")
    ap.add_argument("--cold-gb", type=float, default=12.0)
    ap.add_argument("--hf-tokens", type=int, default=8)
    ap.add_argument("--hf-new", type=int, default=3, help="generate's max_new_tokens for hf "
                    "(3 = 2 decode steps)")
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds per workbench run")
    ap.add_argument("--hf-timeout", type=float, default=900.0)
    ap.add_argument("--max-gb", type=float, default=None,
                    help="kill a run above this RssAnon (default: available - 2 GB)")
    ap.add_argument("--h2d-gbps", type=float, default=25.0,
                    help="assumed host->device bandwidth of the H100 host (GB/s)")
    ap.add_argument("--gpu-tflops", type=float, default=400.0,
                    help="assumed sustained bf16 TFLOP/s of an H100")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="processes writing the checkpoint")
    keep = ap.add_mutually_exclusive_group()
    keep.add_argument("--keep", dest="delete", action="store_false", default=False)
    keep.add_argument("--delete", dest="delete", action="store_true",
                      help="delete the cached checkpoint afterwards")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results-streaming.json")
    ap.add_argument("--report-only", action="store_true",
                    help="re-derive the analysis and tables from --json without running")
    ap.add_argument("--remeasure-bandwidth", action="store_true",
                    help="with --report-only: measure the bandwidth again and use it")
    ap.add_argument("--child", choices=RUNS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    tokens = {k: int(v) for k, v in per_backend(a.tokens, "512").items()}
    dtypes = per_backend(a.dtype, "bfloat16")
    news = {k: int(v) for k, v in per_backend(a.new, "33").items()}
    budgets = per_backend(a.budget, "600")

    if a.child:
        if a.child == "hf":
            res = child_hf(a.cache, a.hf_tokens, a.hf_new, a.seed)
        else:
            res = child_wb(a.child, a.cache, tokens[a.child], news[a.child], dtypes[a.child],
                           a.max_memory, a.seed, float(budgets[a.child]))
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    cfg = scout_8()
    if a.report_only:
        report_json = json.loads(a.json.read_text())
        if a.remeasure_bandwidth:
            report_json["bandwidth_first_measurement"] = report_json["bandwidth"]
            report_json["bandwidth"] = bandwidth(a.cache, a.cold_gb)
            report_json["bandwidth"]["load_avg"] = os.getloadavg()
        bw = report_json["bandwidth"]
        itemsize = round(report_json["checkpoint"]["tensor_bytes"] /
                         sum(math.prod(s) for s in expected_shapes(cfg).values()))
        for run, row in report_json["runs"].items():
            if run != "hf" and "error" not in row:
                row["analysis"] = analyse(row, bw, cfg, itemsize)
        return finish(report_json, bw, tokens, a)
    runs = [s.strip() for s in a.only.split(",") if s.strip()]
    written = ensure_checkpoint(a.cache, cfg, a.seed, workers=a.workers)
    ck = Checkpoint.open(a.cache)
    tensor_bytes = ck.nbytes
    ck.close()
    itemsize = round(tensor_bytes / sum(math.prod(s) for s in expected_shapes(cfg).values()))
    print(f"checkpoint {a.cache}: {tensor_bytes / GB:.2f} GB "
          f"({'written now' if written else 'cached'})", flush=True)
    avail = mem_available()
    limit = int(a.max_gb * GB) if a.max_gb else int(avail - 2 * GB)
    report_json: dict[str, Any] = {
        "what": "streamed (offload='disk') prefill + greedy decode of a Scout-dims 8-layer bf16 "
                "checkpoint larger than RAM",
        "code": code_version(), "units": "bytes, seconds",
        "checkpoint": {"path": str(a.cache), "tensor_bytes": tensor_bytes, "seed": a.seed,
                       "config": cfg.summary(), "bytes": byte_counts(cfg)},
        "machine": {"cpus": os.cpu_count(), "mem_total": os.sysconf("SC_PAGE_SIZE") *
                    os.sysconf("SC_PHYS_PAGES"), "mem_available_at_start": avail,
                    "kill_limit": limit, "load_avg_at_start": os.getloadavg()},
        "args": {k: str(v) for k, v in vars(a).items()},
        "runs": {},
    }
    print(f"memory available {avail / GB:.1f} GB; runs killed above {limit / GB:.1f} GB RssAnon "
          "or under 1.5 GB MemAvailable", flush=True)
    t0 = time.perf_counter()
    bw = bandwidth(a.cache, a.cold_gb)
    report_json["bandwidth"] = bw
    print(f"bandwidth ({time.perf_counter() - t0:.0f} s): cold {bw['cold_Bps'] / GB:.2f} GB/s, "
          f"first {bw['first_Bps'] / GB:.2f} GB/s, warm {bw['warm_Bps'] / GB:.2f} GB/s",
          flush=True)

    def save() -> None:
        a.json.write_text(json.dumps(report_json, indent=2) + "\n")

    save()
    common = ["--cache", str(a.cache), "--seed", str(a.seed), "--tokens", a.tokens, "--dtype",
              a.dtype, "--max-memory", a.max_memory, "--new", a.new, "--budget", a.budget,
              "--hf-tokens", str(a.hf_tokens), "--hf-new", str(a.hf_new)]
    for run in runs:
        drop_page_cache(a.cache)
        print(f"[{run}] load avg {os.getloadavg()[0]:.1f}, available "
              f"{mem_available() / GB:.1f} GB; starting ...", flush=True)
        t = time.perf_counter()
        row = run_child(["--child", run, *common], a.hf_timeout if run == "hf" else a.timeout,
                        limit, int(1.5 * GB))
        row["run_wall_s"] = time.perf_counter() - t
        row["load_avg_after"] = os.getloadavg()
        if run != "hf" and "error" not in row:
            row["analysis"] = analyse(row, bw, cfg, itemsize)
            p = row["analysis"]["prefill"]
            d = row["analysis"].get("decode", {})
            print(f"[{run}] prefill {p['wall_s']:.1f} s (compile {p['compile_s']:.1f}, wait "
                  f"{p['wait_s']:.1f}, compute {p['compute_s']:.1f}), {p['bytes_read'] / GB:.2f}"
                  f" GB read, floor {p['floor_s']:.1f} s, ratio {p['ratio']:.2f}; decode median "
                  f"{d.get('median_wall_s', 0):.2f} s/token, reads ok {d.get('all_reads_ok')}; "
                  f"peak RssAnon {row['peak_rss_anon'] / GB:.2f} GB", flush=True)
        else:
            print(f"[{run}] {'FAILED: ' + row['error'] if 'error' in row else 'done'} "
                  f"({row['run_wall_s']:.0f} s)", flush=True)
            if "error" in row:
                print(row.get("stderr_tail", "")[-1500:], flush=True)
        report_json["runs"][run] = row
        save()
    return finish(report_json, bw, tokens, a)


def finish(report_json: dict[str, Any], bw: dict[str, Any], tokens: dict[str, int],
           a: argparse.Namespace) -> int:
    """Projections, versions, the tables; writes the JSON."""
    rates = {}
    for run, row in report_json["runs"].items():
        if run != "hf" and "analysis" in row and "decode" in row["analysis"]:
            an = row["analysis"]
            rates[f"{run}_{row['dtype']}"] = {"prefill": an["prefill"]["gflops_per_s"] * 1e9,
                                              "decode": an["decode"]["gflops_per_s"] * 1e9}
    ptok = max(tokens.values())
    proj = projections(bw, rates, ptok, a.h2d_gbps * GB, a.gpu_tflops * 1e12)
    report_json["projections"] = {"prompt_tokens": ptok, "h2d_Bps": a.h2d_gbps * GB,
                                  "gpu_flops": a.gpu_tflops * 1e12, "rows": proj}
    versions: dict[str, str] = {}
    for pkg in ("torch", "jax", "jaxlib", "transformers", "accelerate", "numpy", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    report_json["machine"]["versions"] = versions
    a.json.write_text(json.dumps(report_json, indent=2) + "\n")
    print()
    print(report({k: v for k, v in report_json["runs"].items()}, bw, proj, a.h2d_gbps * GB))
    print(f"\nwrote {a.json}")
    if a.delete:
        shutil.rmtree(a.cache)
        print(f"deleted {a.cache}")
    return 0 if all("error" not in r for r in report_json["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
