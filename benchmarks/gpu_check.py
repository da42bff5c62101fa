"""GPU check: correctness and speed of both backends on an accelerator, in one short run.

Sections (each in its own try/except, so one failure does not stop the rest; ``--budget-s``
skips what is left once that many seconds have passed):

1. ``env``: python, torch (``torch.cuda.is_available()``, device name, CUDA version), jax
   (``jax.devices()``, default backend), ``nvidia-smi`` if present.
2. ``roofline``: the device's measured limits, the denominators of the fractions below: a
   device-to-device copy's bandwidth (bytes read + written per second) and an 8192^3 bf16
   matrix product's FLOP/s (torch, CUDA events).
3. ``parity``: the transformers oracle cases of ``tests/oracle.py`` (Scout-like, Maverick-like,
   top-2, chunk 5 with temperature tuning; ``--quick``: the first two), built and saved with
   ``save_pretrained`` (sharded safetensors), loaded with
   ``wb.load(path, backend="torch", dtype="float32", device=DEVICE_TORCH)`` and
   ``wb.load(path, backend="jax", dtype="float32", device=DEVICE_JAX)`` and compared with the
   fp32 CPU transformers output: max relative error (max |d| / max |ref|) of the logits (with
   nothing captured, the fused path; and with hooks captured), router logits and attention
   patterns, and whether the top-k experts are identical. Tolerance 2e-4 (the tests').
4. ``throughput``: prefill tokens/s (``--seqs``, batch 1) on the benchmark configs of
   ``benchmarks/moe_forward.py`` (``ModelConfig.mini`` with E=16 and E=128; ``--quick``: its
   small shapes), fp32 and bf16, loaded from a seeded bf16 checkpoint (``_synth``):
   torch (bf16 experts: one ``torch._grouped_mm`` per projection) and ``torch_loop`` (a
   product per expert), jax (stacked experts, ``jax.lax.ragged_dot``) and ``jax_tiles`` (the
   tile loop), and transformers on the torch device (unless ``--skip-hf``). ``Model.run``
   returns numpy, so each timed call ends synchronised; the time includes copying the ids in
   and the logits out. Best and median of ``--repeats`` calls after a first call (whose extra
   time is JAX's compile). In bf16 also greedy decode tok/s (``--new`` tokens after a
   16-token prompt; ``torch_compiled``: ``compile=True``, CUDA graphs) against the decode
   floor (the bytes a step must read over the measured copy bandwidth). Also load time, host
   RssAnon and device memory after the load, and the logits of the variants against each
   other.
5. ``scout_layer``: one decoder layer with Scout's dimensions (hidden 5120, 16 experts of
   width 8192, shared expert, 40/8 heads of 128; the vocabulary cut to 8192 so the layer, not
   the head, is measured), bf16, written by ``_synth.ensure_checkpoint``: prefill tok/s and
   the weight bytes read per second (every expert is used at these lengths) against the
   copy bandwidth; greedy decode tok/s and the bytes a step reads per second; torch, jax
   (both expert kernels) and transformers.

A JSON summary is printed at the end and written (also after every measurement, so a run cut
short keeps what it measured) to ``$OUT/gpu_check.json`` if ``$OUT`` is set, else
``benchmarks/results-gpu.json`` (``--json`` overrides).

    python benchmarks/gpu_check.py [--quick] [--device-torch cuda] [--device-jax gpu]
                                   [--sections env,roofline,parity,throughput,scout_layer]
                                   [--experts 16 128] [--dtypes float32 bfloat16]
                                   [--seqs 512 4096] [--new 64] [--repeats 5] [--skip-hf]
                                   [--budget-s 480] [--json FILE]

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
sys.path.insert(2, str(ROOT / "benchmarks"))
# jax must not grab 75% of the GPU up front: torch and transformers share the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import workbench as wb  # noqa: E402
from workbench.checkpoint import expected_shapes  # noqa: E402
from workbench.config import ModelConfig  # noqa: E402

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


def load_model(path: Path, backend: str, dtype: str, device: str, **kw: Any
               ) -> tuple[Any, str]:
    """``wb.load(path, backend=, dtype=, device=, **kw)``; (model, where its weights live)."""
    model = wb.load(path, backend=backend, dtype=dtype, device=device, **kw)
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


def scout_layer_cfg(quick: bool) -> ModelConfig:
    """One decoder layer of Scout's dimensions (MoE, RoPE, chunked, QK-norm), vocab 8192."""
    cfg = ModelConfig.scout(num_hidden_layers=1, vocab_size=8192, multimodal=False,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if quick:  # the harness check: the same structure, small
        cfg = cfg.replace(hidden_size=256, intermediate_size=512, intermediate_size_mlp=1024,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                          vocab_size=1024)
    return cfg


# the variants a config is measured with, in order: ours (default kernels), ours with the
# other expert kernel, transformers, and torch with compile=True (decode only)
VARIANTS = ("torch", "jax", "hf", "torch_loop", "jax_tiles", "torch_compiled")


class Variant:
    """One model variant on the device: ``prefill(ids)`` -> logits (numpy, synchronised) and
    ``generate(ids, n)`` (greedy, synchronised); ``close()`` frees it."""

    def __init__(self, name: str, path: Path, dtype: str, args: argparse.Namespace):
        self.name, self.restore = name, None
        before = rss_anon()
        t = time.perf_counter()
        if name == "hf":
            import torch
            from transformers import Llama4ForCausalLM
            self.device = args.device_torch
            self.hf = Llama4ForCausalLM.from_pretrained(
                path, dtype=getattr(torch, dtype)).to(self.device).eval()
            self.sync = torch_sync(self.device)
            self.sync()
            where = str(next(self.hf.parameters()).device)
            backend = "torch"
        else:
            backend = "torch" if name.startswith("torch") else "jax"
            self.device = args.device_torch if backend == "torch" else args.device_jax
            kw: dict[str, Any] = {"compile": True} if name == "torch_compiled" else {}
            self.model, where = load_model(path, backend, dtype, self.device, **kw)
            self.sync = torch_sync(self.device) if backend == "torch" else (lambda: None)
        self.row: dict[str, Any] = {"placed_on": where, "load_s": time.perf_counter() - t,
                                    "host_rss_anon_delta_after_load": rss_anon() - before,
                                    "device_bytes_after_load": device_bytes(backend,
                                                                            self.device)}
        if name == "jax_tiles":
            self.row["stacked_experts"] = bool(getattr(self.model, "stacked_experts", False))
            self.model.expert_kernel = "tiles"  # per-expert layout (CPU): the tiles anyway
        elif name == "jax":
            self.row["stacked_experts"] = bool(getattr(self.model, "stacked_experts", False))
            self.row["expert_kernel"] = self.model.expert_kernel
        if name == "torch_loop":
            from workbench.torch import moe as tmoe
            tmoe.GROUPED_MM = False
            self.restore = lambda: setattr(tmoe, "GROUPED_MM", True)

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        if self.name != "hf":
            out = self.model.run(ids).logits
            self.sync()
            return out
        import torch
        with torch.inference_mode():
            logits = self.hf(torch.from_numpy(ids).to(self.device)).logits
            return logits.float().cpu().numpy()

    def layers(self, ids: np.ndarray) -> None:
        """The decoder layers alone (no head, so no logits copied to the host), synchronised
        by fetching the last position's residual stream."""
        if self.name != "hf":
            last = f"layers.{self.model.config.num_hidden_layers - 1}.resid_post"
            out = self.model.run(ids, capture=[last], positions=[-1],
                                 stop_at_layer=self.model.config.num_hidden_layers)
            np.asarray(out.trace[last])
            self.sync()
            return
        import torch
        with torch.inference_mode():
            h = self.hf.model(torch.from_numpy(ids).to(self.device)).last_hidden_state
            h[:, -1].float().cpu()

    def generate(self, ids: np.ndarray, n: int) -> None:
        if self.name != "hf":
            self.model.generate(ids, n, temperature=0)
        else:
            import torch
            with torch.inference_mode():
                self.hf.generate(torch.from_numpy(ids).to(self.device), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
        self.sync()

    def close(self) -> None:
        if self.restore is not None:
            self.restore()
        self.model = self.hf = None
        free_device_memory()


def measure(v: Variant, ids_by_seq: dict[int, np.ndarray], prompt: np.ndarray | None,
            new: int, repeats: int, budget_s: float) -> np.ndarray | None:
    """Prefill timings per sequence length and (``prompt`` given) greedy decode tok/s into
    ``v.row``; returns the logits of the first length."""
    first = None
    for seq, ids in ids_by_seq.items():
        if elapsed() > budget_s:
            v.row[f"prefill_{seq}"] = {"skipped": "time budget"}
            continue
        box: list[np.ndarray] = []
        r = timed(lambda ids=ids, box=box: box.append(v.prefill(ids)), repeats,
                  lambda: None)
        r["tok_s"] = ids.size / r["best_s"]
        r["compile_s"] = max(0.0, r["first_call_s"] - r["best_s"])
        v.row[f"prefill_{seq}"] = r
        if first is None:
            first = np.asarray(box[-1], np.float32)
        box.clear()
        r = timed(lambda ids=ids: v.layers(ids), repeats, lambda: None)
        r["tok_s"] = ids.size / r["best_s"]
        v.row[f"layers_{seq}"] = r
    if prompt is not None and new > 0 and elapsed() <= budget_s:
        t = time.perf_counter()
        v.generate(prompt, new + 1)  # compiles the prefill and decode steps
        v.row["decode_first_call_s"] = time.perf_counter() - t
        best = {1: float("inf"), new + 1: float("inf")}
        for _ in range(2):
            for n in best:
                t = time.perf_counter()
                v.generate(prompt, n)
                best[n] = min(best[n], time.perf_counter() - t)
        v.row["decode_tok_s"] = new / max(best[new + 1] - best[1], 1e-9)
        v.row["decode_step_ms"] = 1e3 / v.row["decode_tok_s"]
    return first


def bandwidth(out: dict[str, Any]) -> float | None:
    """The summary's measured copy bandwidth (bytes/s; the roofline section), if any."""
    return out.get("roofline", {}).get("copy_bytes_per_s")


def run_variants(names: tuple[str, ...], path: Path, dtype: str, cfg: ModelConfig,
                 args: argparse.Namespace, res: dict[str, Any], save: Callable[[], None],
                 label: str, bw: float | None) -> None:
    """Every variant of ``names`` on the checkpoint at ``path``, into ``res``: timings,
    the fraction of the bandwidth limits, and the logits compared."""
    from workbench.plan import make_plan
    rng = np.random.default_rng(0)
    ids_by_seq = {s: rng.integers(0, cfg.vocab_size, (1, s)) for s in args.seqs}
    prompt = rng.integers(0, cfg.vocab_size, (1, 16))
    decode_bytes = make_plan(cfg, 1 << 50, dtype, read_rate=1e9).decode_read
    item = 2 if dtype == "bfloat16" else 4
    weight_bytes = sum(int(np.prod(sh)) for sh in expected_shapes(cfg).values()) * item
    res.update({"decode_bytes_per_step": decode_bytes, "weight_bytes": weight_bytes})
    if bw:
        res["decode_floor_tok_s"] = bw / decode_bytes
    logits: dict[str, np.ndarray] = {}
    for name in names:
        if elapsed() > args.budget_s:
            res[name] = {"skipped": "time budget"}
            continue
        if name in ("torch_loop", "torch_compiled") and dtype != "bfloat16":
            continue  # fp32 experts run a product per expert already; compile: decode (bf16)
        v = None
        try:
            v = Variant(name, path, dtype, args)
            res[name] = v.row
            if name == "torch_compiled":  # decode only: compiling prefill shapes costs minutes
                measure(v, {}, prompt, args.new, args.repeats, args.budget_s)
            else:
                got = measure(v, ids_by_seq, prompt if dtype == "bfloat16" else None,
                              args.new, args.repeats, args.budget_s)
                if got is not None:
                    logits[name] = got
            for key, r in v.row.items():
                if key.startswith(("prefill_", "layers_")) and "best_s" in r:
                    r["weight_bytes_per_s"] = weight_bytes / r["best_s"]
                    if bw:
                        r["fraction_of_copy_bw"] = r["weight_bytes_per_s"] / bw
            if "decode_tok_s" in v.row:
                v.row["decode_bytes_per_s"] = v.row["decode_tok_s"] * decode_bytes
                if bw:
                    v.row["decode_over_floor"] = res["decode_floor_tok_s"] / v.row["decode_tok_s"]
            pre = v.row.get(f"prefill_{args.seqs[-1]}", {})
            log(f"{label} {dtype} {name} on {v.row['placed_on']}: "
                f"prefill {args.seqs[-1]} {pre.get('tok_s', float('nan')):.0f} tok/s, decode "
                f"{v.row.get('decode_tok_s', float('nan')):.0f} tok/s "
                f"(load {v.row['load_s']:.1f} s)")
        except Exception as e:
            res[name] = {**(v.row if v is not None else {}), **error_record(e)}
            log(f"{label} {dtype} {name}: {res[name]['error']}")
        finally:
            if v is not None:
                v.close()
        save()
    base = "torch" if "torch" in logits else next(iter(logits), None)
    for name, lg in logits.items():
        if name != base:
            res[f"logits_rel_{name}_vs_{base}"] = rel(lg, logits[base])
            res[f"next_token_agreement_{name}_vs_{base}"] = float(
                (lg.argmax(-1) == logits[base].argmax(-1)).mean())
    for name in logits:
        for seq in args.seqs:
            for kind in ("prefill", "layers"):
                a = res.get(name, {}).get(f"{kind}_{seq}", {})
                h = res.get("hf", {}).get(f"{kind}_{seq}", {})
                if name != "hf" and "tok_s" in a and "tok_s" in h:
                    a["speed_over_hf"] = a["tok_s"] / h["tok_s"]


def checkpoint_for(cfg: ModelConfig, where: Path) -> tuple[Path, float]:
    """A seeded bf16 checkpoint of ``cfg`` (``_synth.ensure_checkpoint``); seconds to write."""
    from _synth import ensure_checkpoint
    t = time.perf_counter()
    ensure_checkpoint(where, cfg, seed=0, workers=max(1, min(8, (os.cpu_count() or 2) - 1)))
    return where, time.perf_counter() - t


def section_throughput(args: argparse.Namespace, tmp: Path, out: dict[str, Any],
                       save: Callable[[], None], dtypes: list[str], summary: dict[str, Any]
                       ) -> None:
    out.update({"seqs": args.seqs, "batch": 1, "repeats": args.repeats, "new": args.new,
                "quick_shapes": args.quick, "configs": {}})
    names = VARIANTS if not args.skip_hf else tuple(v for v in VARIANTS if v != "hf")
    for E in args.experts:
        key = f"E{E}"
        if elapsed() > args.budget_s:
            out["configs"][key] = {"skipped": "time budget"}
            continue
        res: dict[str, Any] = {}
        out["configs"][key] = res
        try:
            cfg = throughput_cfg(E, args.quick)
            path, res["checkpoint_write_s"] = checkpoint_for(cfg, tmp / f"mini-{key}")
            res["config"] = cfg.summary()
            log(f"throughput {key}: bf16 checkpoint in {res['checkpoint_write_s']:.1f} s")
        except Exception as e:
            res.update(error_record(e))
            log(f"throughput {key}: building the checkpoint failed: {e}")
            save()
            continue
        for dtype in dtypes:
            per: dict[str, Any] = {}
            res[dtype] = per
            variants = tuple(v for v in names if (not args.variants or v in args.variants)
                             and (v != "torch_compiled" or E == args.experts[0]))
            run_variants(variants, path, dtype, cfg, args, per, save, f"throughput {key}",
                         bandwidth(summary))
            save()


def section_scout_layer(args: argparse.Namespace, tmp: Path, out: dict[str, Any],
                        save: Callable[[], None], summary: dict[str, Any]) -> None:
    cfg = scout_layer_cfg(args.quick)
    path, write_s = checkpoint_for(cfg, tmp / "scout-layer")
    out.update({"config": cfg.summary(), "checkpoint_write_s": write_s, "dtype": "bfloat16",
                "seqs": args.seqs, "new": args.new})
    log(f"scout_layer: bf16 checkpoint in {write_s:.1f} s")
    names = tuple(v for v in VARIANTS if v != "torch_compiled" and
                  not (args.skip_hf and v == "hf"))
    run_variants(names, path, "bfloat16", cfg, args, out, save, "scout_layer",
                 bandwidth(summary))


def section_roofline(args: argparse.Namespace, tmp: Path, out: dict[str, Any],
                     save: Callable[[], None], summary: dict[str, Any]) -> None:
    """The device's copy bandwidth and bf16 matmul rate, measured with torch."""
    import torch
    dev = torch.device(args.device_torch)
    if dev.type != "cuda":
        out["skipped"] = f"torch device {dev} is not CUDA"
        return

    def events(fn: Callable[[], Any], reps: int) -> float:
        for _ in range(3):
            fn()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(dev)
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        torch.cuda.synchronize(dev)
        return start.elapsed_time(stop) / 1e3 / reps

    n = 2 << 30  # 2 GiB, many times the L2
    bufs = [torch.empty(n, dtype=torch.uint8, device=dev) for _ in range(2)]
    sec = events(lambda: bufs[1].copy_(bufs[0]), 10)
    out["copy_bytes"] = n
    out["copy_bytes_per_s"] = 2 * n / sec  # read + written
    bufs = [torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev) for _ in range(2)]
    sec = events(lambda: bufs[0] @ bufs[1], 10)
    out["bf16_matmul_flop_per_s"] = 2 * 8192**3 / sec
    # a prefill's logits to the host (what Model.run returns): pageable device-to-host copy
    bufs = [torch.empty(128 << 20, dtype=torch.uint8, device=dev)]
    t = time.perf_counter()
    for _ in range(3):
        bufs[0].cpu()
    out["device_to_host_bytes_per_s"] = 3 * (128 << 20) / (time.perf_counter() - t)
    bufs.clear()
    free_device_memory()
    log(f"roofline: copy {out['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
        f"{out['bf16_matmul_flop_per_s'] / 1e12:.0f} TFLOP/s, to the host "
        f"{out['device_to_host_bytes_per_s'] / 1e9:.1f} GB/s")


# ----------------------------------------------------------------------------- main


def short_report(summary: dict[str, Any]) -> str:
    """A few lines for a human: parity verdict, limits, and the tokens/s tables."""
    lines = []

    def f(x: Any, fmt: str) -> str:
        return format(x, fmt) if isinstance(x, int | float) else "-"

    env = summary.get("env", {})
    lines.append(f"torch: {env.get('torch', {}).get('device_name', 'no CUDA device')}; jax: "
                 f"{env.get('jax', {}).get('devices')}")
    roof = summary.get("roofline", {})
    if "copy_bytes_per_s" in roof:
        lines.append(f"copy bandwidth {roof['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
                     f"{roof['bf16_matmul_flop_per_s'] / 1e12:.0f} TFLOP/s")
    par = summary.get("parity", {})
    if par:
        lines.append(f"parity vs transformers (fp32, tol {TOL:g}): all ok = {par.get('all_ok')}; "
                     f"worst rel torch {par.get('worst_rel_torch')}, jax "
                     f"{par.get('worst_rel_jax')}")
    tables = []
    for key, sec in summary.items():
        if key.startswith("throughput") and isinstance(sec.get("configs"), dict):
            for cfg_key, res in sec["configs"].items():
                for dtype in ("bfloat16", "float32"):
                    if isinstance(res.get(dtype), dict):
                        tables.append((f"mini {cfg_key}", dtype, res[dtype], sec["seqs"]))
        if key == "scout_layer" and "seqs" in sec:
            tables.append(("Scout layer", "bfloat16", sec, sec["seqs"]))
    if tables:
        seqs = tables[0][3]
        head = " | ".join(f"{kind} {q} tok/s (× HF, HBM frac)"
                          for kind in ("prefill", "layers") for q in seqs)
        lines.append(f"| model | dtype | variant | {head} | decode tok/s (floor ×) | "
                     "compile s |")
        lines.append("|---" * (5 + 2 * len(seqs)) + "|")
        for label, dtype, per, sq in tables:
            for name in VARIANTS:
                r = per.get(name)
                if not isinstance(r, dict) or "error" in r or "skipped" in r:
                    if isinstance(r, dict) and ("error" in r or "skipped" in r):
                        lines.append(f"| {label} | {dtype} | {name} | "
                                     f"{r.get('error', r.get('skipped'))[:80]} |")
                    continue
                cells = []
                for kind, q in [(kind, q) for kind in ("prefill", "layers") for q in sq]:
                    p = r.get(f"{kind}_{q}", {})
                    cells.append(f"{f(p.get('tok_s'), '.0f')} ({f(p.get('speed_over_hf'), '.1f')}"
                                 f", {f(p.get('fraction_of_copy_bw'), '.2f')})")
                comp = r.get(f"prefill_{sq[0]}", {}).get("compile_s") if sq else None
                if name == "torch_compiled":
                    comp = r.get("decode_first_call_s")
                lines.append(f"| {label} | {dtype} | {name} | {' | '.join(cells)} | "
                             f"{f(r.get('decode_tok_s'), '.0f')} "
                             f"({f(r.get('decode_over_floor'), '.1f')}) | {f(comp, '.1f')} |")
    return "\n".join(lines)


def output_path(args: argparse.Namespace) -> Path:
    if args.json:
        return Path(args.json)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    return ROOT / "benchmarks" / "results-gpu.json"


SECTIONS = ("env", "roofline", "parity", "throughput", "scout_layer")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="two oracle cases, the benchmark's small shapes, 3 repeats")
    ap.add_argument("--device-torch", default="cuda")
    ap.add_argument("--device-jax", default="gpu")
    ap.add_argument("--sections", default="env,roofline,parity,throughput:bfloat16,scout_layer,"
                                          "throughput:float32",
                    help="comma-separated, run in this order; throughput:DTYPE measures one "
                         "dtype of --dtypes (so fp32 can come last)")
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                    choices=["float32", "bfloat16"])
    ap.add_argument("--seqs", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--new", type=int, default=64, help="decoded tokens (bf16 runs)")
    ap.add_argument("--repeats", type=int, default=None, help="default 5 (--quick: 3)")
    ap.add_argument("--skip-hf", action="store_true", help="no transformers in the throughput")
    ap.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                    help="the throughput sections measure only these (default: all)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="skip what is left after this many seconds")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for sec in sections:
        if sec.partition(":")[0] not in SECTIONS:
            ap.error(f"unknown section {sec!r}: choose from {SECTIONS}")
    dest = output_path(args)
    dest.parent.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()},
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def save() -> None:
        summary["elapsed_s"] = elapsed()
        dest.write_text(json.dumps(summary, indent=2, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="wb-gpu-check-") as tmpdir:
        tmp = Path(tmpdir)
        for sec in sections:
            name, _, only = sec.partition(":")
            if name not in ("env", "roofline") and elapsed() > args.budget_s:
                summary[sec] = {"skipped": "time budget"}
                continue
            log(f"--- {sec}")
            summary[sec] = out = {}
            try:
                if name == "env":
                    section_env(args, tmp, out, save)
                elif name == "parity":
                    section_parity(args, tmp, out, save)
                elif name == "roofline":
                    section_roofline(args, tmp, out, save, summary)
                elif name == "throughput":
                    dtypes = [d for d in args.dtypes if not only or d == only]
                    section_throughput(args, tmp, out, save, dtypes, summary)
                else:
                    section_scout_layer(args, tmp, out, save, summary)
            except Exception as e:
                out.update(error_record(e))
                log(f"{sec} failed: {out['error']}")
            save()
    save()
    print(json.dumps(summary, indent=2, default=str))
    print()
    print(short_report(summary))
    log(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
