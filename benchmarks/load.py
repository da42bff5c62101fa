"""Load-memory benchmark ("one copy of the weights"): peak memory and time of loading a checkpoint.

Writes, once, a Scout-sized ONE-layer bf16 checkpoint (hidden 5120, vocab 202048, 40 / 8 heads
of 128, 16 experts of width 8192, one MoE layer, untied lm_head: about 8.5 GB; seeded normal
weights * 0.02, norms 1) into ``benchmarks/.cache/scout-1layer/`` (git-ignored), tensor chunk by
tensor chunk (never more than ~50 MB of weights in memory), in the layout ``Checkpoint.save``
writes (HF names, <= 2 GiB shards, ``model.safetensors.index.json``, text-only ``config.json``),
so that both ``wb.load`` and transformers' ``from_pretrained`` read it. A marker written last
says the cache is complete; later runs reuse it. (The writer and the memory sampler live in
``benchmarks/_synth.py``, shared with ``streaming.py``.)

Then each loader runs in its own fresh subprocess (so peaks do not mix), after the checkpoint's
files have been read once so that every loader starts from the same warm page cache:

- ``torch``: ``wb.load(path, backend="torch", dtype="bfloat16")``
- ``jax``: ``wb.load(path, backend="jax", dtype="bfloat16")``
- ``hf``: ``transformers.Llama4ForCausalLM.from_pretrained(path, dtype=torch.bfloat16)``
- ``torch-fp32`` (not run by default): ``wb.load(path, backend="torch", dtype="float32")``, the
  conversion path; a full copy in fp32 is 2x the tensor bytes by itself.

For each: load wall time; peak RssAnon during the load, sampled every ~5 ms both by a thread in
the loader process and by this (parent) process reading ``/proc/PID/status`` (the parent is not
blocked by the child's GIL; the larger of the two is reported); ``ru_maxrss`` (peak RSS including
file-backed pages); RssAnon / RssFile after the load; and the ratio of the peak RssAnon to the
checkpoint's tensor bytes (the sum of the safetensors data). Each loaded model then runs a
4-token forward twice (the first one pays for pages a lazy, memory-mapped loader has not touched
yet: transformers 5.x returns weights that are views of the mmap'd shards, so its "load" reads
nothing and RssFile grows during the first forward): its logits must be finite, and are
compared with the first loader's.
The parent kills a loader whose RssAnon passes ``--max-gb`` (default: the memory available at
the start less 1.5 GB), so a regression cannot take the shared machine down.

    python benchmarks/load.py [--only torch,jax,hf[,torch-fp32]] [--keep | --delete] [--seed 0]
                              [--timeout 1200] [--max-gb GB] [--json benchmarks/results-load.json]

GB below means 10^9 bytes.
"""

from __future__ import annotations

import argparse
import json
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

from _synth import (  # noqa: E402  (the writer, sampler and child runner)
    GB,
    Sampler,
    code_version,
    ensure_checkpoint,
    mem_available,
    proc_status,
    run_sampled,
    warm_page_cache,
)

from workbench.checkpoint import Checkpoint  # noqa: E402
from workbench.config import ModelConfig  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache" / "scout-1layer"
LOADERS = ("torch", "jax", "hf", "torch-fp32")
DEFAULT_LOADERS = ("torch", "jax", "hf")
IDS = [[1, 450, 1000, 200000]]  # the 4-token forward (ids < vocab 202048)


# ----------------------------------------------------------------------------- the checkpoint


def scout_one_layer() -> ModelConfig:
    """Scout's real text dimensions with one (MoE, chunked-RoPE, QK-norm) layer, text-only."""
    cfg = ModelConfig.scout().replace(num_hidden_layers=1, multimodal=False)
    assert cfg.moe_layers == [0] and not cfg.tie_word_embeddings, cfg.moe_layers
    return cfg


# ----------------------------------------------------------------------------- one loader


def child(loader: str, path: Path, logits_file: Path) -> dict[str, Any]:
    """Runs in a fresh process: import, then load (sampled), then a 4-token forward."""
    t_imp = time.perf_counter()
    versions: dict[str, str] = {}
    if loader == "hf":
        import torch
        import transformers
        from transformers import Llama4ForCausalLM
        versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    else:
        import workbench as wb
        if loader == "jax":
            import jax

            import workbench.jax  # noqa: F401
            jax.devices()  # start the backend before the clock
            versions = {"jax": jax.__version__}
        else:
            import torch

            import workbench.torch  # noqa: F401
            versions = {"torch": torch.__version__}
    import_s = time.perf_counter() - t_imp
    before = proc_status()
    sampler = Sampler()
    sampler.start()
    t0 = time.monotonic()
    if loader == "hf":
        model = Llama4ForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        model.eval()
    else:
        dtype = "float32" if loader == "torch-fp32" else "bfloat16"
        model = wb.load(path, backend="jax" if loader == "jax" else "torch", dtype=dtype)
    t1 = time.monotonic()
    sampler.stop()
    after = proc_status()
    maxrss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak, n = sampler.peak()
    ids = np.array(IDS)
    tf = time.perf_counter()
    if loader == "hf":
        with torch.inference_mode():
            logits = model(torch.from_numpy(ids)).logits.float().numpy()
    else:
        logits = model.run(ids).logits
    forward_s = time.perf_counter() - tf
    after_fwd = proc_status()
    tf = time.perf_counter()  # a second forward: first-touch (lazy mmap) costs are gone
    if loader == "hf":
        with torch.inference_mode():
            model(torch.from_numpy(ids))
    else:
        model.run(ids)
    forward2_s = time.perf_counter() - tf
    logits = np.asarray(logits, np.float32)
    np.save(logits_file, logits)
    return {
        "loader": loader, "versions": versions, "import_s": import_s,
        "t_load_start": t0, "t_load_end": t1, "load_s": t1 - t0,
        "rss_anon_before": before["RssAnon"], "rss_file_before": before["RssFile"],
        "thread_peak_rss_anon": max(peak, after["RssAnon"]), "thread_samples": n,
        "rss_anon_after": after["RssAnon"], "rss_file_after": after["RssFile"],
        "ru_maxrss_after_load": maxrss_load,
        "ru_maxrss_after_forward": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "forward_s": forward_s, "forward2_s": forward2_s,
        "rss_anon_after_forward": after_fwd["RssAnon"],
        "rss_file_after_forward": after_fwd["RssFile"], "logits_shape": list(logits.shape),
        "logits_first": [float(x) for x in logits[0, -1, :5]],
        "logits_finite": bool(np.isfinite(logits).all()),
    }


def run_loader(loader: str, path: Path, tmp: Path, timeout: float, limit: int
               ) -> dict[str, Any]:
    """One loader in a fresh subprocess, sampled from here too; its result row."""
    logits_file = tmp / f"{loader}.npy"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", loader, "--path", str(path),
           "--logits", str(logits_file)]
    run = run_sampled(cmd, timeout, limit)
    sampler = run.sampler
    row: dict[str, Any] = {"loader": loader}
    if run.result is None:
        row["error"] = run.why
        row["stderr_tail"] = run.err[-3000:]
        row["parent_peak_rss_anon"] = sampler.peak()[0]
        return row
    row.update(run.result)
    # the parent's samples over the load window (a little slack for the stamps' granularity)
    t0, t1 = row["t_load_start"], row["t_load_end"]
    peak, n = sampler.peak(t0 - 0.002, t1 + 0.002)
    row["parent_peak_rss_anon"] = peak
    row["parent_samples"] = n
    row["parent_peak_rss_anon_whole_run"] = sampler.peak()[0]
    row["peak_rss_anon"] = max(peak, row["thread_peak_rss_anon"])
    row["logits"] = str(logits_file)
    return row


# ----------------------------------------------------------------------------- report


def table(rows: list[dict[str, Any]], tensor_bytes: int) -> str:
    lines = ["| loader | load s | peak RssAnon GB | ×tensor bytes | ru_maxrss GB "
             "| RssFile after GB | RssAnon before GB | forward s (1st / 2nd) "
             "| RssAnon / RssFile after forward GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            peak = r.get("parent_peak_rss_anon", 0)
            lines.append(f"| {r['loader']} | failed: {r['error']} | ≥ {peak / GB:.2f} | "
                         f"≥ {peak / tensor_bytes:.2f}× | | | | | |")
            continue
        lines.append(
            f"| {r['loader']} | {r['load_s']:.1f} | {r['peak_rss_anon'] / GB:.2f} | "
            f"{r['peak_rss_anon'] / tensor_bytes:.2f}× | {r['ru_maxrss_after_load'] / GB:.2f} | "
            f"{r['rss_file_after'] / GB:.2f} | {r['rss_anon_before'] / GB:.2f} | "
            f"{r['forward_s']:.1f} / {r['forward2_s']:.1f} | "
            f"{r['rss_anon_after_forward'] / GB:.2f} / {r['rss_file_after_forward'] / GB:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(DEFAULT_LOADERS),
                    help=f"comma-separated loaders among {','.join(LOADERS)}")
    keep = ap.add_mutually_exclusive_group()
    keep.add_argument("--keep", dest="delete", action="store_false", default=False,
                      help="keep the cached checkpoint (default)")
    keep.add_argument("--delete", dest="delete", action="store_true",
                      help="delete the cached checkpoint afterwards")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per loader")
    ap.add_argument("--max-gb", type=float, default=None,
                    help="kill a loader whose RssAnon passes this (default: available - 1.5)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results-load.json")
    ap.add_argument("--child", choices=LOADERS, help=argparse.SUPPRESS)
    ap.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--logits", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.path, a.logits)), flush=True)
        return 0

    loaders = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = [s for s in loaders if s not in LOADERS]
    if bad:
        ap.error(f"unknown loader(s) {bad}; choose from {LOADERS}")
    cfg = scout_one_layer()
    written = ensure_checkpoint(a.cache, cfg, a.seed)
    ck = Checkpoint.open(a.cache)
    tensor_bytes = ck.nbytes
    n_tensors = len(ck)
    ck.close()
    files = sorted(a.cache.glob("*.safetensors"))
    print(f"checkpoint {a.cache}: {n_tensors} tensors, {tensor_bytes / GB:.3f} GB of tensor data "
          f"in {len(files)} shards ({'written now' if written else 'cached'})", flush=True)

    avail = mem_available()
    limit = int(a.max_gb * GB) if a.max_gb else int(avail - 1.5 * GB)
    print(f"memory available {avail / GB:.1f} GB; a loader is killed above {limit / GB:.1f} GB "
          "RssAnon", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wb-load-") as tmpdir:
        tmp = Path(tmpdir)
        for loader in loaders:
            warm = warm_page_cache(a.cache)
            print(f"[{loader}] page cache warmed ({warm:.1f} s); loading in a fresh process ...",
                  flush=True)
            row = run_loader(loader, a.cache, tmp, a.timeout, limit)
            row["page_cache_warm_s"] = warm
            row["mem_available_before"] = mem_available()
            rows.append(row)
            if "error" in row:
                print(f"[{loader}] FAILED: {row['error']}\n{row['stderr_tail']}", flush=True)
                continue
            print(f"[{loader}] load {row['load_s']:.1f} s, peak RssAnon "
                  f"{row['peak_rss_anon'] / GB:.2f} GB ({row['peak_rss_anon'] / tensor_bytes:.2f}"
                  f"x tensor bytes; thread {row['thread_peak_rss_anon'] / GB:.2f} GB over "
                  f"{row['thread_samples']} samples, parent {row['parent_peak_rss_anon'] / GB:.2f}"
                  f" GB over {row['parent_samples']}), forward {row['forward_s']:.1f} s, logits "
                  f"{row['logits_shape']} finite={row['logits_finite']} first "
                  f"{[round(x, 5) for x in row['logits_first']]}", flush=True)
        ok = [r for r in rows if "error" not in r]
        if ok:
            ref = np.load(ok[0]["logits"])
            for r in ok:
                lg = np.load(r["logits"])
                r["max_rel_err_vs_" + ok[0]["loader"]] = float(
                    np.abs(lg - ref).max() / max(np.abs(ref).max(), 1e-30))
                r["next_token_agrees_with_" + ok[0]["loader"]] = bool(
                    (lg.argmax(-1) == ref.argmax(-1)).all())
                del r["logits"]

    print()
    print(table(rows, tensor_bytes))
    print()
    for r in ok:
        key = "max_rel_err_vs_" + ok[0]["loader"]
        print(f"{r['loader']}: logits max rel err vs {ok[0]['loader']} {r[key]:.2e}, "
              f"next tokens agree: {r['next_token_agrees_with_' + ok[0]['loader']]}; "
              f"peak RssAnon minus RssAnon before the load = "
              f"{(r['peak_rss_anon'] - r['rss_anon_before']) / tensor_bytes:.2f}x tensor bytes")
    versions: dict[str, str] = {}
    for pkg in ("torch", "jax", "jaxlib", "transformers", "numpy", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    report = {
        "what": "peak memory and time of loading a Scout-sized one-layer bf16 checkpoint",
        "code": code_version(),
        "units": "bytes, seconds",
        "checkpoint": {"path": str(a.cache), "tensor_bytes": tensor_bytes,
                       "tensors": n_tensors, "shards": len(files), "seed": a.seed,
                       "config": cfg.summary()},
        "machine": {"cpus": os.cpu_count(), "mem_available_at_start": avail,
                    "kill_limit": limit, "versions": versions},
        "rows": rows,
    }
    a.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {a.json}")
    if a.delete:
        shutil.rmtree(a.cache)
        print(f"deleted {a.cache}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
