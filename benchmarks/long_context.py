"""Long-context benchmark: prefill, decode and captures at 16k-256k tokens on the bundled model.

The bundled architecture (``data/scout-mini``: hidden 256, 4 layers: 3 chunked RoPE layers with
``attention_chunk_size`` 64 and one global NoPE layer; 4 query / 2 KV heads of 64; 8 experts
top-1) is loaded with ``wb.load(path, backend=..., max_position_embeddings=T + new)`` in fp32
and fed seeded random ids (batch 1). Every run is a fresh subprocess that samples its own
RssAnon (``/proc/self/status``) every 10 ms and reports ``ru_maxrss``; the parent samples it
too and kills it when its RssAnon passes ``--max-gb`` (default 18, or the machine's available
memory less 2 GB) or MemAvailable falls under 1.5 GB; every run has a timeout. In order:

1. ``torch`` / ``jax`` at each of ``--lengths`` (16k, 64k, 256k): ``model.generate(ids,
   max_new_tokens, temperature=0)``, called twice up to ``--warm-up-to`` tokens (jax 64k: its
   first call compiles, the second is warm; torch 16k: its first call pays one-off costs) and
   once above. Wrapping ``model._forward`` times the prefill forward and each decode step
   apart (jax: the seconds spent compiling, from ``jax.monitoring``). At ``--decode-at`` (64k)
   generate makes ``--new`` tokens: the decode rate is the steps after the first (which, in
   jax, compiles the step for the doubled KV buffer) over their time, from the last call;
   elsewhere it makes one token (the prefill alone). The prefill's last-position logits are
   kept (``benchmarks/.cache/long-context/``) to compare the backends and transformers.
2. ``capture`` at ``--capture-at`` (64k), one subprocess per backend: ``model.run(ids)``, then
   ``model.run(ids, capture="*.attn.summary")`` (``summary``) and ``model.run(ids,
   capture="layers.3.attn.pattern", positions=slice(-64, None))`` (``pattern``): time (jax:
   less its compile seconds, reported) and peak RssAnon of each captured call against the plain
   one, and the trace's bytes.
3. ``hf``: ``transformers.Llama4ForCausalLM.from_pretrained("data/scout-mini",
   dtype=torch.float32, attn_implementation=... (sdpa, eager), max_position_embeddings=T)``
   and one ``model(ids, use_cache=False)`` forward under ``torch.inference_mode()`` at each of
   ``--hf-lengths`` (16k, 64k); its time and peak memory, or the error / kill.

Derived: jax / torch speed (torch's warm prefill seconds / jax's) per length; the targets
(64k prefill within 3 GB peak RSS, jax at least 0.7x torch, 256k completes); the largest
difference of last-position logits against torch at the same length.

    python benchmarks/long_context.py [--only torch,jax,capture,hf] [--lengths 16k,64k,256k]
        [--decode-at 64k] [--new 33] [--capture-at 64k] [--capture summary,pattern]
        [--hf-lengths 16k,64k] [--hf-attn sdpa,eager] [--warm-up-to jax=64k,torch=16k]
        [--capture-calls 1] [--timeout 1500]
        [--hf-timeout 600] [--max-gb 18] [--seed 0] [--json benchmarks/results-long-context.json]
    python benchmarks/long_context.py --report-only   # the tables again, from the JSON

k means 1024 tokens; GB means 10^9 bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
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
    error_record,
    mem_available,
    memory_record,
    proc_status,
    run_sampled,
)

MODEL = ROOT / "data" / "scout-mini"
OUT = CACHE_ROOT / "long-context"  # last-position logits per run (git-ignored)
KINDS = ("torch", "jax", "capture", "hf")
CAPTURES = {"summary": {"capture": "*.attn.summary"},
            "pattern": {"capture": "layers.3.attn.pattern", "positions": [-64, None]}}
SAMPLE_S = 0.01
TARGET_RSS_64K = 3 * GB
TARGET_SPEED = 0.7


def tokens(text: str | int) -> int:
    """'16k' -> 16384, '1M' -> 1048576, '4096' -> 4096."""
    s = str(text).strip().lower()
    mult = {"k": 1024, "m": 1024**2}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


# ----------------------------------------------------------------------------- children


def _start(backend: str) -> tuple[dict[str, Any], list[tuple[float, float]]]:
    """Import the backend; its versions and (jax) the list compile events are appended to."""
    events: list[tuple[float, float]] = []
    if backend == "jax":
        import jax
        import jax.monitoring

        import workbench.jax  # noqa: F401

        def on_event(event: str, duration: float, **_: Any) -> None:
            if event.startswith("/jax/core/compile/"):  # trace, lower, compile
                events.append((time.monotonic(), duration))

        jax.monitoring.register_event_duration_secs_listener(on_event)
        jax.devices()
        return {"jax": jax.__version__}, events
    import torch

    import workbench.torch  # noqa: F401
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}, events


def _compile_s(events: list[tuple[float, float]], t0: float, t1: float) -> float:
    return sum(d for t, d in events if t0 <= t <= t1)


def child_wb(backend: str, T: int, new: int, calls: int, seed: int, name: str) -> dict[str, Any]:
    t_imp = time.perf_counter()
    versions, events = _start(backend)
    import workbench as wb
    import_s = time.perf_counter() - t_imp
    sampler = Sampler(interval=SAMPLE_S)
    sampler.start()
    t = time.monotonic()
    model = wb.load(MODEL, backend=backend, dtype="float32", max_position_embeddings=T + new)
    load_s = time.monotonic() - t
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, (1, T))
    rss_loaded = proc_status()["RssAnon"]
    forwards: list[dict[str, Any]] = []
    last_logits: list[np.ndarray] = []
    inner = model._forward

    def timed(x: Any, *args: Any, **kw: Any) -> Any:
        t0 = time.monotonic()
        out = inner(x, *args, **kw)
        t1 = time.monotonic()
        forwards.append({"tokens": int(np.shape(x)[1]), "t0": t0, "t1": t1, "wall_s": t1 - t0,
                         "compile_s": _compile_s(events, t0, t1),
                         "peak_rss_anon": sampler.peak(t0, t1)[0]})
        if len(last_logits) == 0 and out[0] is not None:
            last_logits.append(np.array(out[0][0, -1], np.float32))
        return out

    model._forward = timed
    results = []
    tail: list[int] = []
    for c in range(calls):
        forwards.clear()
        gc.collect()
        t0 = time.monotonic()
        g = model.generate(ids, new, temperature=0)
        t1 = time.monotonic()
        tail = g.new_tokens[0].tolist()
        del g
        pre, steps = forwards[0], forwards[1:]
        row = {"call": c + 1, "generate_s": t1 - t0, "prefill_s": pre["wall_s"],
               "prefill_compile_s": pre["compile_s"], "prefill_peak_rss_anon":
               pre["peak_rss_anon"], "peak_rss_anon": sampler.peak(t0, t1)[0],
               "decode_steps": len(steps), "step_s": [s["wall_s"] for s in steps],
               "step_compile_s": [s["compile_s"] for s in steps], "new_tokens": tail}
        if len(steps) >= 2:
            rest = steps[1:]
            row["decode_tokens_per_s"] = len(rest) / sum(s["wall_s"] for s in rest)
            row["decode_median_s"] = float(np.median([s["wall_s"] for s in rest]))
            row["decode_peak_rss_anon"] = max(s["peak_rss_anon"] for s in steps)
        results.append(row)
    sampler.stop()
    OUT.mkdir(parents=True, exist_ok=True)
    np.save(OUT / f"{name}.npy", last_logits[0])
    return {"kind": backend, "backend": backend, "tokens": T, "new": new, "calls": results,
            "versions": versions, "import_s": import_s, "load_s": load_s,
            "rss_anon_loaded": rss_loaded, "new_tokens": tail,
            "peak_rss_anon": max(sampler.peak()[0], proc_status()["RssAnon"]),
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "samples": len(sampler.samples)}


def child_capture(backend: str, T: int, whats: list[str], calls: int,
                  seed: int) -> dict[str, Any]:
    versions, events = _start(backend)
    import workbench as wb
    sampler = Sampler(interval=SAMPLE_S)
    sampler.start()
    model = wb.load(MODEL, backend=backend, dtype="float32", max_position_embeddings=T)
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, (1, T))
    out: dict[str, Any] = {"kind": "capture", "backend": backend, "tokens": T, "modes": {},
                           "versions": versions, "rss_anon_loaded": proc_status()["RssAnon"]}
    for mode in ["plain", *whats]:
        kw = dict(CAPTURES.get(mode, {}))
        if "positions" in kw:
            kw["positions"] = slice(*kw["positions"])
        rows = []
        for c in range(calls):
            gc.collect()
            t0 = time.monotonic()
            res = model.run(ids, **kw)
            t1 = time.monotonic()
            trace = res.trace
            rows.append({"call": c + 1, "wall_s": t1 - t0, "compile_s": _compile_s(events, t0, t1),
                         "peak_rss_anon": sampler.peak(t0, t1)[0],
                         "trace_bytes": int(sum(trace[n].nbytes for n in trace)),
                         "shapes": {n: list(trace[n].shape) for n in trace}})
            del res, trace
        args = {k: str(v) for k, v in kw.items()}
        if "positions" in kw:
            args["positions"] = "slice({}, {})".format(*CAPTURES[mode]["positions"])
        out["modes"][mode] = {"args": args, "calls": rows}
    sampler.stop()
    out.update(memory_record(sampler))
    return out


def child_hf(T: int, attn: str, calls: int, seed: int, name: str) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import Llama4ForCausalLM
    out: dict[str, Any] = {"kind": "hf", "backend": f"hf-{attn}", "attn": attn, "tokens": T,
                           "versions": {"torch": torch.__version__,
                                        "transformers": transformers.__version__}}
    sampler = Sampler(interval=SAMPLE_S)
    sampler.start()
    t0 = time.monotonic()
    try:
        model = Llama4ForCausalLM.from_pretrained(MODEL, dtype=torch.float32,
                                                  attn_implementation=attn,
                                                  max_position_embeddings=T)
        model.eval()
        out["load_s"] = time.monotonic() - t0
        out["rss_anon_loaded"] = proc_status()["RssAnon"]
        ids = torch.from_numpy(np.random.default_rng(seed).integers(
            0, model.config.vocab_size, (1, T)))
        rows = []
        for c in range(calls):
            gc.collect()
            t1 = time.monotonic()
            with torch.inference_mode():
                logits = model(ids, use_cache=False).logits
            t2 = time.monotonic()
            if c == 0:
                OUT.mkdir(parents=True, exist_ok=True)
                np.save(OUT / f"{name}.npy", logits[0, -1].float().numpy())
            del logits
            rows.append({"call": c + 1, "wall_s": t2 - t1, "peak_rss_anon":
                         sampler.peak(t1, t2)[0]})
            out["calls"] = rows
    except Exception as e:  # reported, not raised: the outcome is the measurement
        out.update(error_record(e, t0))
    sampler.stop()
    out.update(memory_record(sampler))
    return out


# ----------------------------------------------------------------------------- parent


def run_child(args: list[str], timeout: float, limit: int, min_avail: int) -> dict[str, Any]:
    """A fresh subprocess, sampled from here too; its RESULT line, or why it has none."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    return child_row(run_sampled(cmd, timeout, limit, min_avail, interval=0.02))


def code_fingerprint() -> str:
    """sha1 of workbench/**/*.py now (the package is edited between runs while it is measured)."""
    import hashlib
    h = hashlib.sha1()
    for f in sorted((ROOT / "workbench").rglob("*.py")):
        h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def plan_runs(a: argparse.Namespace) -> list[tuple[str, list[str], float]]:
    """(name, child arguments, timeout) of every run, in order."""
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    lengths = [tokens(x) for x in a.lengths.split(",") if x.strip()]
    decode_at, capture_at = tokens(a.decode_at), tokens(a.capture_at)
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    runs = []
    for T in lengths:
        for backend in backends:
            if backend in only:
                new = a.new if T == decode_at else 1
                calls = 2 if T <= tokens(a.warm_up_to[backend]) else 1
                runs.append((f"{backend}-{label(T)}", ["--child", backend, "--T", str(T),
                                                       "--new", str(new), "--calls", str(calls)],
                             a.timeout))
    if "capture" in only:
        for backend in backends:
            runs.append((f"capture-{backend}-{label(capture_at)}",
                         ["--child", "capture", "--backend", backend, "--T", str(capture_at),
                          "--what", a.capture, "--calls", str(a.capture_calls)], a.timeout))
    if "hf" in only:
        for T in [tokens(x) for x in a.hf_lengths.split(",") if x.strip()]:
            for attn in [s.strip() for s in a.hf_attn.split(",") if s.strip()]:
                runs.append((f"hf-{attn}-{label(T)}", ["--child", "hf", "--T", str(T),
                                                       "--attn", attn, "--calls", "1"],
                             a.hf_timeout))
    return runs


def _warm(row: dict[str, Any]) -> dict[str, Any]:
    return row["calls"][-1]


def derive(report: dict[str, Any]) -> dict[str, Any]:
    """Speed ratios, logits agreement and the targets from the runs."""
    runs = report["runs"]
    ok = {k: v for k, v in runs.items() if "error" not in v}
    lengths = sorted({v["tokens"] for v in ok.values() if v.get("kind") in ("torch", "jax")})
    out: dict[str, Any] = {"ratios": {}, "logits_vs_torch": {}, "targets": {}}
    for T in lengths:
        t, j = ok.get(f"torch-{label(T)}"), ok.get(f"jax-{label(T)}")
        if t and j:  # the last call of each, less jax's compile seconds (0 when warm)
            ts = _warm(t)["prefill_s"]
            js = _warm(j)["prefill_s"] - _warm(j)["prefill_compile_s"]
            out["ratios"][label(T)] = {
                "torch_s": ts, "jax_s": js, "jax_speed_vs_torch": ts / js,
                "torch_calls": len(t["calls"]), "jax_calls": len(j["calls"])}
    OUTD = Path(report.get("logits_dir", OUT))
    for name, row in ok.items():
        if row.get("kind") not in ("jax", "hf") or not (OUTD / f"{name}.npy").exists():
            continue
        ref = OUTD / f"torch-{label(row['tokens'])}.npy"
        if ref.exists():
            a, b = np.load(OUTD / f"{name}.npy"), np.load(ref)
            out["logits_vs_torch"][name] = {
                "max_abs_diff": float(np.abs(a - b).max()), "max_abs_logit": float(np.abs(b).max()),
                "same_argmax": bool(a.argmax() == b.argmax())}
    tg = out["targets"]
    for backend in ("torch", "jax"):
        r = runs.get(f"{backend}-64k")
        if r is not None:
            peak = None if "error" in r else max(r["ru_maxrss"], r["peak_rss_anon"])
            tg[f"{backend}_64k_peak_rss_le_3GB"] = {
                "peak": peak, "met": peak is not None and peak <= TARGET_RSS_64K}
        r = runs.get(f"{backend}-256k")
        if r is not None:
            tg[f"{backend}_256k_completes"] = {"met": "error" not in r,
                                               "error": r.get("error")}
    for lab, rr in out["ratios"].items():
        if lab in ("16k", "64k"):
            tg[f"jax_ge_0.7x_torch_{lab}"] = {"ratio": rr["jax_speed_vs_torch"],
                                              "met": rr["jax_speed_vs_torch"] >= TARGET_SPEED}
    return out


def gb(b: float | None) -> str:
    return "" if b is None else f"{b / GB:.2f}"


def tables(report: dict[str, Any]) -> str:
    runs, der = report["runs"], report["derived"]
    L = ["| run | tokens | 1st call prefill s (compile s) | warm prefill s | prefill tokens/s "
         "(warm) | peak RssAnon GB | ru_maxrss GB | RssAnon after load GB |",
         "|---|---|---|---|---|---|---|---|"]
    group = {"torch": (0, 0), "jax": (0, 1), "capture": (1, 0), "hf": (2, 0)}
    runs = dict(sorted(runs.items(), key=lambda kv: (
        group.get(kv[0].split("-")[0], (3, 0))[0],
        kv[1].get("tokens") or tokens(kv[0].split("-")[-1]),
        group.get(kv[0].split("-")[0], (3, 0))[1], kv[0])))
    for name, r in runs.items():
        if not name.startswith(("torch-", "jax-")):
            continue
        if "error" in r:
            L.append(f"| {name} | | failed: {r['error']} | | | ≥ {gb(r['parent_peak_rss_anon'])}"
                     " | | |")
            continue
        c1, w = r["calls"][0], _warm(r)
        warm = f"{w['prefill_s']:.1f}" if len(r["calls"]) > 1 else \
            f"({c1['prefill_s'] - c1['prefill_compile_s']:.1f} without compile)" \
            if c1["prefill_compile_s"] else "(one call)"
        L.append(f"| {name} | {r['tokens']} | {c1['prefill_s']:.1f} "
                 f"({c1['prefill_compile_s']:.1f}) | {warm} | {r['tokens'] / w['prefill_s']:.0f} "
                 f"| {gb(r['peak_rss_anon'])} | {gb(r['ru_maxrss'])} | "
                 f"{gb(r['rss_anon_loaded'])} |")
    if der["ratios"]:
        L += ["", "| tokens | torch prefill s (call) | jax prefill s (call; less compile) | "
              "jax speed / torch |", "|---|---|---|---|"]
        for lab, rr in der["ratios"].items():
            L.append(f"| {lab} | {rr['torch_s']:.1f} ({rr['torch_calls']}) | {rr['jax_s']:.1f} "
                     f"({rr['jax_calls']}) | {rr['jax_speed_vs_torch']:.2f}× |")
    dec = [(n, r) for n, r in runs.items() if n.startswith(("torch-", "jax-"))
           and "error" not in r and "decode_tokens_per_s" in _warm(r)]
    if dec:
        L += ["", "| decode | context | steps timed | tokens/s | median s/token | first step s "
              "(compile s) | peak RssAnon GB while decoding | same tokens as torch |",
              "|---|---|---|---|---|---|---|---|"]
        for _, r in dec:
            w = _warm(r)
            tref = runs.get(f"torch-{label(r['tokens'])}", {}).get("new_tokens")
            L.append(f"| {r['backend']} | {r['tokens']} | {w['decode_steps'] - 1} | "
                     f"{w['decode_tokens_per_s']:.1f} | {w['decode_median_s']:.3f} | "
                     f"{r['calls'][0]['step_s'][0]:.2f} ({r['calls'][0]['step_compile_s'][0]:.1f})"
                     f" | {gb(w['decode_peak_rss_anon'])} | "
                     f"{'' if tref is None else r['new_tokens'] == tref} |")
    caps = [(n, r) for n, r in runs.items() if n.startswith("capture-")]
    if caps:
        L += ["", "| capture | tokens | s per call (compile s) | fastest vs plain | "
              "peak RssAnon GB | memory vs plain GB | trace MB |", "|---|---|---|---|---|---|---|"]
        for n, r in caps:
            if "error" in r:
                L.append(f"| {n} | | failed: {r['error']} | | | | |")
                continue
            base = None
            for mode, m in r["modes"].items():
                c = m["calls"][-1]  # memory: the last (warm) call
                best = min(m["calls"], key=lambda x: x["wall_s"] - x["compile_s"])
                s = best["wall_s"] - best["compile_s"]  # time: the fastest call less compiling
                what = "no capture" if mode == "plain" else f"`{m['args']['capture']}`" + (
                    f", positions={m['args']['positions']}" if "positions" in m["args"] else "")
                vs = "" if base is None else f"{100 * (s / base[0] - 1):+.0f}%"
                mem = "" if base is None else f"{(c['peak_rss_anon'] - base[1]) / GB:+.2f}"
                per_call = " / ".join(f"{x['wall_s']:.1f}" + (f" ({x['compile_s']:.1f})"
                                                                if x["compile_s"] else "")
                                      for x in m["calls"])
                L.append(f"| {r['backend']} {what} | {r['tokens']} | {per_call} | {vs} | "
                         f"{gb(c['peak_rss_anon'])} | {mem} | {c['trace_bytes'] / 1e6:.1f} |")
                if base is None:
                    base = (s, c["peak_rss_anon"])
    hfs = [(n, r) for n, r in runs.items() if n.startswith("hf-")]
    if hfs:
        L += ["", "| transformers | tokens | forward s | peak RssAnon GB | ru_maxrss GB | "
              "last-position logits vs ours (torch) |", "|---|---|---|---|---|---|"]
        for n, r in hfs:
            attn = n.split("-")[1]
            tok = r.get("tokens", tokens(n.split("-")[-1]))
            if "error" in r or "calls" not in r:
                peak = r.get("peak_rss_anon", r.get("parent_peak_rss_anon"))
                L.append(f"| {attn} | {tok} | failed: {r['error']} | ≥ {gb(peak)} | "
                         f"{gb(r.get('ru_maxrss'))} | |")
                continue
            agree = der["logits_vs_torch"].get(n)
            L.append(f"| {attn} | {tok} | {r['calls'][0]['wall_s']:.1f} | "
                     f"{gb(r['peak_rss_anon'])} | {gb(r['ru_maxrss'])} | "
                     + ("" if agree is None else f"max abs diff {agree['max_abs_diff']:.1e} "
                        f"(logits up to {agree['max_abs_logit']:.1f})") + " |")
    jx = {n: v for n, v in der["logits_vs_torch"].items() if n.startswith("jax-")}
    if jx:
        L += ["", "jax vs torch, last-position logits: " + ", ".join(
            f"{n}: max abs diff {v['max_abs_diff']:.1e}" for n, v in jx.items())]
    if der["targets"]:
        L += ["", "targets:"]
        for k, v in der["targets"].items():
            extra = (f" (peak {gb(v['peak'])} GB)" if "peak" in v and v["peak"] is not None
                     else f" ({v['ratio']:.2f}×)" if "ratio" in v
                     else f" ({v['error']})" if v.get("error") else "")
            L.append(f"- {k}: {'met' if v['met'] else 'NOT met'}{extra}")
    return "\n".join(L)


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "jax", "jaxlib", "transformers", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(KINDS), help="which of " + ",".join(KINDS))
    ap.add_argument("--lengths", default="16k,64k,256k")
    ap.add_argument("--backends", default="torch,jax", help="workbench backends to run")
    ap.add_argument("--decode-at", default="64k", help="the length whose runs also decode")
    ap.add_argument("--new", type=int, default=33,
                    help="generate's max_new_tokens at --decode-at (33 = 32 decode steps)")
    ap.add_argument("--warm-up-to", default="jax=64k,torch=16k",
                    help="per backend: call generate twice (first: compile / warm-up, second: "
                    "measured) up to this length, once above it")
    ap.add_argument("--capture-at", default="64k")
    ap.add_argument("--capture", default="summary,pattern",
                    help="after a plain run(): summary, pattern (one subprocess per backend)")
    ap.add_argument("--capture-calls", type=int, default=1,
                    help="calls per capture mode (jax's compile seconds are reported and "
                    "excluded from the comparison)")
    ap.add_argument("--hf-lengths", default="16k,64k")
    ap.add_argument("--hf-attn", default="sdpa,eager")
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds per workbench run")
    ap.add_argument("--hf-timeout", type=float, default=600.0, help="seconds per hf run")
    ap.add_argument("--max-gb", type=float, default=18.0,
                    help="kill a run above this RssAnon (at most available - 2 GB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" /
                    "results-long-context.json")
    ap.add_argument("--report-only", action="store_true",
                    help="re-derive the tables from --json without running")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other runs of an existing --json; replace the ones run now")
    ap.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    ap.add_argument("--T", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--calls", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--what", default="summary", help=argparse.SUPPRESS)
    ap.add_argument("--attn", default="sdpa", help=argparse.SUPPRESS)
    ap.add_argument("--name", default="run", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    warm = {"jax": "64k", "torch": "16k"}
    for part in filter(None, (p.strip() for p in a.warm_up_to.split(","))):
        if "=" in part:
            k, v = part.split("=", 1)
            warm[k.strip()] = v.strip()
        else:
            warm = dict.fromkeys(warm, part)
    a.warm_up_to = warm

    if a.child:
        if a.child in ("torch", "jax"):
            res = child_wb(a.child, a.T, a.new, a.calls, a.seed, a.name)
        elif a.child == "capture":
            res = child_capture(a.backend, a.T, [w.strip() for w in a.what.split(",")
                                                 if w.strip()], a.calls, a.seed)
        else:
            res = child_hf(a.T, a.attn, a.calls, a.seed, a.name)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    if a.report_only:
        report = json.loads(a.json.read_text())
        report["derived"] = derive(report)
        a.json.write_text(json.dumps(report, indent=2) + "\n")
        print(tables(report))
        return 0

    avail = mem_available()
    limit = int(min(a.max_gb * GB, avail - 2 * GB))
    report: dict[str, Any] = {
        "what": "long-context prefill, decode and captures on data/scout-mini (fp32, batch 1, "
                "seeded random ids), torch vs jax vs transformers",
        "code": code_version(), "units": "bytes, seconds",
        "model": str(MODEL.relative_to(ROOT)), "logits_dir": str(OUT),
        "machine": {"cpus": os.cpu_count(), "mem_total": os.sysconf("SC_PAGE_SIZE") *
                    os.sysconf("SC_PHYS_PAGES"), "mem_available_at_start": avail,
                    "kill_limit": limit, "load_avg_at_start": os.getloadavg(),
                    "versions": versions()},
        "args": {k: str(v) for k, v in vars(a).items() if k not in ("child",)},
        "runs": {},
    }
    if a.merge and a.json.exists():
        old = json.loads(a.json.read_text())
        report["runs"] = old.get("runs", {})
        report["earlier"] = old.get("earlier", []) + [
            {k: old.get(k) for k in ("code", "machine", "args", "total_s")}]
    print(f"memory available {avail / GB:.1f} GB; runs killed above {limit / GB:.1f} GB "
          "RssAnon or under 1.5 GB MemAvailable", flush=True)

    def save() -> None:
        report["derived"] = derive(report)
        a.json.write_text(json.dumps(report, indent=2) + "\n")

    t_all = time.perf_counter()
    for name, args, timeout in plan_runs(a):
        print(f"[{name}] load avg {os.getloadavg()[0]:.1f}, available "
              f"{mem_available() / GB:.1f} GB; starting ...", flush=True)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        fingerprint = code_fingerprint()
        row = run_child([*args, "--seed", str(a.seed), "--name", name], timeout, limit,
                        int(1.5 * GB))
        row["started_at"], row["workbench_sha1"] = started, fingerprint
        if code_fingerprint() != fingerprint:
            row["workbench_changed_during_run"] = True
        row["load_avg_after"] = os.getloadavg()
        row["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        report["runs"].pop(name, None)  # re-measured runs go last, in the order run
        report["runs"][name] = row
        if "error" in row:
            print(f"[{name}] FAILED: {row['error']} ({row['wall_s']:.0f} s)\n"
                  f"{row.get('stderr_tail', '')[-1200:]}", flush=True)
        elif "calls" in row and row["kind"] != "hf":
            c = row["calls"]
            print(f"[{name}] prefill " + ", ".join(f"{x['prefill_s']:.1f} s (compile "
                                                   f"{x['prefill_compile_s']:.1f})" for x in c)
                  + (f"; decode {c[-1]['decode_tokens_per_s']:.1f} tokens/s"
                     if "decode_tokens_per_s" in c[-1] else "")
                  + f"; peak RssAnon {gb(row['peak_rss_anon'])} GB, ru_maxrss "
                  f"{gb(row['ru_maxrss'])} GB ({row['wall_s']:.0f} s)", flush=True)
        elif row["kind"] == "capture":
            print(f"[{name}] " + ", ".join(
                f"{mode} {m['calls'][-1]['wall_s']:.1f} s (compile "
                f"{m['calls'][-1]['compile_s']:.1f})" for mode, m in row["modes"].items())
                + f"; peak RssAnon {gb(row['peak_rss_anon'])} GB ({row['wall_s']:.0f} s)",
                flush=True)
        else:
            print(f"[{name}] " + (f"error: {row['error']}" if "error" in row else
                                  f"forward {row['calls'][0]['wall_s']:.1f} s")
                  + f"; peak RssAnon {gb(row['peak_rss_anon'])} GB ({row['wall_s']:.0f} s)",
                  flush=True)
        save()
    report["total_s"] = time.perf_counter() - t_all
    save()
    print()
    print(tables(report))
    print(f"\nwrote {a.json} ({report['total_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
