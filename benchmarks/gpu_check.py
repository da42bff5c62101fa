"""GPU check: correctness and prefill speed of both backends on an accelerator, in one short run.

Sections (each in its own try/except, so one failure does not stop the rest):

1. ``env``: python, torch (``torch.cuda.is_available()``, device name, CUDA version), jax
   (``jax.devices()``, default backend), ``nvidia-smi`` if present.
2. ``parity``: the transformers oracle cases of ``tests/oracle.py`` (Scout-like, Maverick-like,
   top-2, chunk 5 with temperature tuning; ``--quick``: the first two), built and saved with
   ``save_pretrained`` (sharded safetensors), loaded with
   ``wb.load(path, backend="torch", dtype="float32", device=DEVICE_TORCH)`` and
   ``wb.load(path, backend="jax", dtype="float32", device=DEVICE_JAX)`` and compared with the
   fp32 CPU transformers output: max relative error (max |d| / max |ref|) of the logits (with
   nothing captured, the fused path; and with hooks captured), router logits and attention
   patterns, and whether the top-k experts are identical. Tolerance 2e-4 (the tests').
3. ``throughput``: prefill tokens/s (``--seq`` 512 tokens, batch 1) on the benchmark configs of
   ``benchmarks/moe_forward.py`` (``ModelConfig.mini`` with E=16 and E=128; ``--quick``: its
   small shapes), fp32 and bf16, on both backends (and transformers on the torch device unless
   ``--skip-hf``), loaded from a checkpoint written with ``Checkpoint.save``. ``Model.run`` returns
   numpy, so each timed call ends synchronised (the torch device is also synchronised
   explicitly); the time includes copying the ids in and the logits out. Best and median of
   ``--repeats`` calls after a first call (whose extra time is JAX's compile). Also: load time,
   host RssAnon and device memory in use after the load (one copy of the weights?), and the
   logits of the two backends and transformers against each other.

A JSON summary is printed at the end and written (also after every section, so a run cut short
keeps what it measured) to ``$OUT/gpu_check.json`` if ``$OUT`` is set, else
``benchmarks/results-gpu.json`` (``--json`` overrides). ``--budget-s`` skips the remaining
work once that many seconds have passed.

    python benchmarks/gpu_check.py [--quick] [--device-torch cuda] [--device-jax gpu]
                                   [--sections env,parity,throughput] [--experts 16 128]
                                   [--dtypes float32 bfloat16] [--seq 512] [--repeats 5]
                                   [--skip-hf] [--budget-s 480] [--json FILE]

Check the harness on a CPU machine with ``--device-torch cpu --device-jax cpu --quick`` (on a
busy shared CPU, torch's OpenMP threads can run tens of times slower: ``OMP_NUM_THREADS=1``).
Needs torch, jax and transformers installed (CUDA builds on the GPU machine).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))
# jax must not grab 75% of the GPU up front: torch and transformers share the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import workbench as wb  # noqa: E402
from workbench.checkpoint import Checkpoint  # noqa: E402
from workbench.config import ModelConfig  # noqa: E402
from workbench.random_weights import random_tensors  # noqa: E402

TOL = 2e-4
ALL_CASES = ("scout", "maverick", "top2", "long_temp")
QUICK_CASES = ("scout", "maverick")
T_START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T_START


def log(msg: str) -> None:
    print(f"[{elapsed():7.1f} s] {msg}", flush=True)


def error_record(e: BaseException) -> dict[str, str]:
    return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| in float64."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a64 - b64).max() / max(np.abs(b64).max(), 1e-30))


def rss_anon() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------- loading


def load_model(path: Path, backend: str, dtype: str, device: str) -> tuple[Any, str]:
    """``wb.load(path, backend=, dtype=, device=)``; (model, where its weights live)."""
    model = wb.load(path, backend=backend, dtype=dtype, device=device)
    return model, placement(model)


def placement(model: Any) -> str:
    """The device(s) of the model's first weight, as the backend names them."""
    mod = getattr(model, "module", None)
    if hasattr(mod, "parameters"):
        leaves: Any = mod.parameters()
    elif isinstance(mod, dict):
        leaves = mod.values()
    else:
        return "unknown"
    for x in leaves:
        if hasattr(x, "devices"):  # jax.Array
            return ",".join(sorted(str(d) for d in x.devices()))
        if hasattr(x, "device"):  # torch.Tensor
            return str(x.device)
    return "unknown"


def device_bytes(backend: str, device: str) -> int | None:
    """Device memory in use (torch: allocated by the caching allocator; jax: bytes_in_use)."""
    try:
        if backend == "torch":
            import torch
            if device.startswith("cuda") and torch.cuda.is_available():
                torch.cuda.synchronize()
                return int(torch.cuda.memory_allocated())
            return None
        import jax
        platform_name, _, index = device.partition(":")
        platform_name = "gpu" if platform_name == "cuda" else platform_name
        dev = jax.devices(platform_name)[int(index or 0)]
        stats = dev.memory_stats()
        return None if not stats else int(stats.get("bytes_in_use", 0))
    except Exception:
        return None


def torch_sync(device: str) -> Callable[[], None]:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.synchronize
    return lambda: None


def free_device_memory() -> None:
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def timed(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """First call (compile included), then best and median of ``repeats`` calls, each synced."""
    t = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return {"first_call_s": first, "best_s": min(times), "median_s": statistics.median(times)}


# ----------------------------------------------------------------------------- sections


def section_env(args: argparse.Namespace, tmp: Path, out: dict[str, Any],
                save: Callable[[], None]) -> None:
    out.update({"python": sys.version.split()[0], "platform": platform.platform(),
                "cpus": os.cpu_count(), "device_torch": args.device_torch,
                "device_jax": args.device_jax,
                "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")})
    try:
        import torch
        t: dict[str, Any] = {"version": torch.__version__,
                             "cuda_available": torch.cuda.is_available(),
                             "cuda_version": torch.version.cuda,
                             "threads": torch.get_num_threads()}
        if torch.cuda.is_available():
            t["device_count"] = torch.cuda.device_count()
            t["device_name"] = torch.cuda.get_device_name(0)
            t["bf16_supported"] = torch.cuda.is_bf16_supported()
            t["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
            free, total = torch.cuda.mem_get_info()
            t["memory_free_total_gib"] = [free / 2**30, total / 2**30]
        out["torch"] = t
    except Exception as e:
        out["torch"] = error_record(e)
    try:
        import jax
        out["jax"] = {"version": jax.__version__, "devices": [str(d) for d in jax.devices()],
                      "default_backend": jax.default_backend(),
                      "default_matmul_precision": str(jax.config.jax_default_matmul_precision)}
    except Exception as e:
        out["jax"] = error_record(e)
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except Exception as e:
        out["transformers"] = error_record(e)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30)
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        out["nvidia_smi"] = f"not available ({type(e).__name__})"
    log(f"env: torch {out['torch'].get('version')} cuda_available="
        f"{out['torch'].get('cuda_available')} {out['torch'].get('device_name', '')}; jax "
        f"{out['jax'].get('version')} devices={out['jax'].get('devices')}")


def parity_one(backend: str, device: str, path: Path, cfg: ModelConfig, ids: np.ndarray,
               ref: tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]) -> dict[str, Any]:
    logits, routers, attns = ref
    t = time.perf_counter()
    model, where = load_model(path, backend, "float32", device)
    row: dict[str, Any] = {"placed_on": where, "load_s": time.perf_counter() - t}
    t = time.perf_counter()
    plain = model.run(ids).logits
    row["first_run_s"] = time.perf_counter() - t
    out = model.run(ids, capture=["*.moe.router_logits", "*.moe.topk_indices",
                                  "*.attn.pattern"])
    row["logits_rel"] = rel(plain, logits)
    row["logits_rel_captured"] = rel(out.logits, logits)
    row["argmax_equal"] = bool(np.array_equal(plain.argmax(-1), logits.argmax(-1)))
    k = cfg.num_experts_per_tok
    router_rel, topk_equal = [], True
    for layer, r in zip(cfg.moe_layers, routers):
        router_rel.append(rel(out.trace[f"layers.{layer}.moe.router_logits"], r))
        hf_top = np.sort(np.argsort(-r, axis=-1, kind="stable")[..., :k], -1)
        mine = np.sort(np.asarray(out.trace[f"layers.{layer}.moe.topk_indices"]), -1)
        topk_equal &= bool(np.array_equal(mine, hf_top))
    row["router_rel"] = max(router_rel) if router_rel else None
    row["topk_equal"] = topk_equal
    row["pattern_rel"] = max(rel(out.trace[f"layers.{i}.attn.pattern"], a)
                             for i, a in enumerate(attns))
    row["ok"] = bool(max(row["logits_rel"], row["logits_rel_captured"], row["router_rel"] or 0,
                         row["pattern_rel"]) <= TOL and topk_equal and row["argmax_equal"])
    del model
    free_device_memory()
    return row


def section_parity(args: argparse.Namespace, tmp: Path, out: dict[str, Any],
                   save: Callable[[], None]) -> None:
    from oracle import hf_run, make_case
    cases = QUICK_CASES if args.quick else ALL_CASES
    out.update({"tolerance": TOL, "cases": {}})
    for name in cases:
        if elapsed() > args.budget_s:
            out["cases"][name] = {"skipped": "time budget"}
            continue
        case: dict[str, Any] = {}
        out["cases"][name] = case
        try:
            cfg, hf, path, ids = make_case(name, tmp / f"oracle-{name}")
            ref = hf_run(hf, ids)  # fp32, CPU
            del hf
        except Exception as e:
            case.update(error_record(e))
            log(f"parity {name}: building the oracle failed: {e}")
            continue
        for backend, device in (("torch", args.device_torch), ("jax", args.device_jax)):
            try:
                row = parity_one(backend, device, path, cfg, ids, ref)
                log(f"parity {name} {backend} on {row['placed_on']}: logits "
                    f"{row['logits_rel']:.1e} (captured {row['logits_rel_captured']:.1e}), "
                    f"router {row['router_rel']:.1e}, patterns {row['pattern_rel']:.1e}, "
                    f"top-k equal {row['topk_equal']} -> {'ok' if row['ok'] else 'FAIL'}")
            except Exception as e:
                row = error_record(e)
                log(f"parity {name} {backend}: {row['error']}")
            case[backend] = row
            save()
    rows = [r for c in out["cases"].values() for b, r in c.items()
            if b in ("torch", "jax") and isinstance(r, dict)]
    out["all_ok"] = bool(rows) and all(r.get("ok") is True for r in rows)
    for backend in ("torch", "jax"):
        vals = [c[backend][key] for c in out["cases"].values()
                if isinstance(c.get(backend), dict) and "logits_rel" in c[backend]
                for key in ("logits_rel", "logits_rel_captured", "router_rel", "pattern_rel")
                if c[backend][key] is not None]
        out[f"worst_rel_{backend}"] = max(vals) if vals else None


def throughput_cfg(E: int, quick: bool) -> ModelConfig:
    """``benchmarks/moe_forward.py``'s configuration (and its --quick shapes)."""
    cfg = ModelConfig.mini(num_local_experts=E)
    if quick:
        cfg = cfg.replace(hidden_size=256, intermediate_size=256, head_dim=32, vocab_size=1024,
                          attention_chunk_size=64)
    return cfg


def bench_ours(backend: str, device: str, path: Path, dtype: str, ids: np.ndarray,
               repeats: int) -> tuple[dict[str, Any], np.ndarray]:
    before = rss_anon()
    t = time.perf_counter()
    model, where = load_model(path, backend, dtype, device)
    row: dict[str, Any] = {"placed_on": where, "load_s": time.perf_counter() - t,
                           "host_rss_anon_delta_after_load": rss_anon() - before,
                           "device_bytes_after_load": device_bytes(backend, device)}
    sync = torch_sync(device) if backend == "torch" else (lambda: None)
    box: list[np.ndarray] = []
    row.update(timed(lambda: box.append(model.run(ids).logits), repeats, sync))
    row["compile_s"] = max(0.0, row["first_call_s"] - row["best_s"])
    row["tok_s"] = ids.size / row["best_s"]
    row["tok_s_median"] = ids.size / row["median_s"]
    logits = np.asarray(box[-1], np.float32)
    row["logits_finite"] = bool(np.isfinite(logits).all())
    box.clear()
    model = None  # free the weights before the next model
    free_device_memory()
    return row, logits


def bench_hf(device: str, path: Path, dtype: str, ids: np.ndarray, repeats: int
             ) -> tuple[dict[str, Any], np.ndarray]:
    import torch
    from transformers import Llama4ForCausalLM
    t = time.perf_counter()
    hf = Llama4ForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    sync = torch_sync(device)
    sync()
    row: dict[str, Any] = {"placed_on": str(next(hf.parameters()).device),
                           "load_s": time.perf_counter() - t}
    tids = torch.from_numpy(ids).to(device)
    box: list[Any] = []

    def run() -> None:
        with torch.inference_mode():
            box.append(hf(tids).logits)

    row.update(timed(run, repeats, sync))
    row["tok_s"] = ids.size / row["best_s"]
    row["tok_s_median"] = ids.size / row["median_s"]
    logits = box[-1].float().cpu().numpy()
    box.clear()
    hf = tids = None
    free_device_memory()
    return row, logits


def section_throughput(args: argparse.Namespace, tmp: Path, out: dict[str, Any],
                       save: Callable[[], None]) -> None:
    out.update({"seq": args.seq, "batch": 1, "repeats": args.repeats,
                "quick_shapes": args.quick, "configs": {}})
    for E in args.experts:
        key = f"E{E}"
        if elapsed() > args.budget_s:
            out["configs"][key] = {"skipped": "time budget"}
            continue
        res: dict[str, Any] = {}
        out["configs"][key] = res
        try:
            cfg = throughput_cfg(E, args.quick)
            t = time.perf_counter()
            path = Checkpoint.save(tmp / f"mini-{key}",
                                   random_tensors(cfg, seed=0, router_std=0.5), cfg)
            gc.collect()
            res["config"] = cfg.summary()
            res["checkpoint_write_s"] = time.perf_counter() - t
            ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.seq))
            log(f"throughput {key}: fp32 checkpoint written in {res['checkpoint_write_s']:.1f} s")
        except Exception as e:
            res.update(error_record(e))
            log(f"throughput {key}: building the checkpoint failed: {e}")
            save()
            continue
        for dtype in args.dtypes:
            per: dict[str, Any] = {}
            res[dtype] = per
            logits: dict[str, np.ndarray] = {}
            for name in ("torch", "jax") + (() if args.skip_hf else ("hf",)):
                if elapsed() > args.budget_s:
                    per[name] = {"skipped": "time budget"}
                    continue
                try:
                    if name == "hf":
                        row, logits[name] = bench_hf(args.device_torch, path, dtype, ids,
                                                     args.repeats)
                    else:
                        device = args.device_torch if name == "torch" else args.device_jax
                        row, logits[name] = bench_ours(name, device, path, dtype, ids,
                                                       args.repeats)
                    per[name] = row
                    log(f"throughput {key} {dtype} {name} on {row['placed_on']}: "
                        f"{row['tok_s']:.0f} tok/s (best {row['best_s'] * 1e3:.1f} ms, median "
                        f"{row['median_s'] * 1e3:.1f} ms, first call {row['first_call_s']:.1f} "
                        f"s, load {row['load_s']:.1f} s)")
                except Exception as e:
                    per[name] = error_record(e)
                    log(f"throughput {key} {dtype} {name}: {per[name]['error']}")
                save()
            pairs = [("jax", "torch"), ("torch", "hf"), ("jax", "hf")]
            for a, b in pairs:
                if a in logits and b in logits:
                    per[f"logits_rel_{a}_vs_{b}"] = rel(logits[a], logits[b])
                    per[f"next_token_agreement_{a}_vs_{b}"] = float(
                        (logits[a].argmax(-1) == logits[b].argmax(-1)).mean())
                ra, rb = per.get(a, {}), per.get(b, {})
                if "tok_s" in ra and "tok_s" in rb:
                    per[f"speed_{a}_over_{b}"] = ra["tok_s"] / rb["tok_s"]
            save()
        try:
            import shutil
            shutil.rmtree(tmp / f"mini-{key}")
        except OSError:
            pass


# ----------------------------------------------------------------------------- main


def short_report(summary: dict[str, Any]) -> str:
    """A few lines for a human: parity verdict and the tokens/s table."""
    lines = []
    env = summary.get("env", {})
    lines.append(f"torch: {env.get('torch', {}).get('device_name', 'no CUDA device')}; jax: "
                 f"{env.get('jax', {}).get('devices')}")
    par = summary.get("parity", {})
    if par:
        lines.append(f"parity vs transformers (fp32, tol {TOL:g}): all ok = {par.get('all_ok')}; "
                     f"worst rel torch {par.get('worst_rel_torch')}, jax "
                     f"{par.get('worst_rel_jax')}")
    thr = summary.get("throughput", {})
    if thr.get("configs"):
        lines.append("| E | dtype | torch tok/s | jax tok/s | HF tok/s | jax/torch | torch/HF | "
                     "jax compile s |")
        lines.append("|---|---|---|---|---|---|---|---|")

        def f(x: Any, fmt: str) -> str:
            return format(x, fmt) if isinstance(x, int | float) else "-"

        for key, res in thr["configs"].items():
            for dtype in ("float32", "bfloat16"):
                per = res.get(dtype)
                if not isinstance(per, dict):
                    continue
                lines.append(
                    f"| {key[1:]} | {dtype} | {f(per.get('torch', {}).get('tok_s'), '.0f')} | "
                    f"{f(per.get('jax', {}).get('tok_s'), '.0f')} | "
                    f"{f(per.get('hf', {}).get('tok_s'), '.0f')} | "
                    f"{f(per.get('speed_jax_over_torch'), '.2f')} | "
                    f"{f(per.get('speed_torch_over_hf'), '.1f')} | "
                    f"{f(per.get('jax', {}).get('compile_s'), '.1f')} |")
    return "\n".join(lines)


def output_path(args: argparse.Namespace) -> Path:
    if args.json:
        return Path(args.json)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    return ROOT / "benchmarks" / "results-gpu.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="two oracle cases, the benchmark's small shapes, 3 repeats")
    ap.add_argument("--device-torch", default="cuda")
    ap.add_argument("--device-jax", default="gpu")
    ap.add_argument("--sections", default="env,parity,throughput")
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                    choices=["float32", "bfloat16"])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=None, help="default 5 (--quick: 3)")
    ap.add_argument("--skip-hf", action="store_true", help="no transformers in the throughput")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="skip what is left after this many seconds")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    dest = output_path(args)
    dest.parent.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()},
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def save() -> None:
        summary["elapsed_s"] = elapsed()
        dest.write_text(json.dumps(summary, indent=2, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="wb-gpu-check-") as tmpdir:
        tmp = Path(tmpdir)
        for name, fn in (("env", section_env), ("parity", section_parity),
                         ("throughput", section_throughput)):
            if name not in sections:
                continue
            log(f"--- {name}")
            summary[name] = {}
            try:
                fn(args, tmp, summary[name], save)
            except Exception as e:
                summary[name].update(error_record(e))
                log(f"{name} failed: {summary[name]['error']}")
            save()
    save()
    print(json.dumps(summary, indent=2, default=str))
    print()
    print(short_report(summary))
    log(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
