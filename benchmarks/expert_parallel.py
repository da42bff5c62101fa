"""Expert-parallel benchmark: what the all-to-all dispatch moves and costs, on 1, 2 and 4 CPU
devices (jax, virtual devices of one host) and processes (torch, gloo on 127.0.0.1).

Writes, once, a seeded random fp32 checkpoint into ``benchmarks/.cache/ep-bench/`` (git-ignored;
hidden 512, expert width 512, 16 experts top-1 plus the shared expert, 2 MoE layers, 8 / 2
heads of 64, vocab 2048) and, per engine and device/process count, in a fresh subprocess:

* ``torch``: N gloo processes each load it with ``expert_parallel=True`` and run a prefill of
  ``--tokens`` tokens ``--repeat`` times after one warm-up; the dispatch's own counters
  (``ExpertParallelOps.stats``) give, per MoE layer call and rank, the bytes sent through
  ``all_to_all_single`` (counts, rows out and back) and ``all_gather_single``, the seconds in
  those collectives and the seconds computing experts.
* ``jax``: ``XLA_FLAGS=--xla_force_host_platform_device_count=N``; the model is loaded with
  ``expert_parallel=True`` and timed the same way. Per MoE layer, the dispatch alone
  (``parallel.dispatch`` jitted on the layer's real token count) is timed against the same three
  ``all_to_all`` exchanges on buffers of its shapes alone; their difference is the compute
  (routing bookkeeping and experts). The bytes are those of the buffers
  (``parallel.exchange_bytes``): sized for every assignment of a shard, the capacity no routing
  can overflow, while ``payload`` is what the tokens fill.

Per-device expert memory is measured from what each device or rank holds. Virtual CPU devices
and local processes share this machine's cores, so the timings show the mechanism's overhead,
not a speed-up. Finally the projection for Maverick bf16 on 8 x 80 GB GPUs from its config:
memory per GPU and bytes exchanged per token.

    python benchmarks/expert_parallel.py [--tokens 256] [--repeat 3] [--counts 1,2,4]
        [--only torch,jax] [--json benchmarks/results-expert-parallel.json] [--keep]
    python benchmarks/expert_parallel.py --device-check gpu --json ep-gpu.json

``--device-check gpu`` is the check for a machine with one GPU: torch's dispatch through a
1-rank NCCL group and jax's on a 1-GPU mesh, each against the single-device model (fp32 and
bf16, logits and every hook; one GPU cannot host two NCCL ranks, so the exchange between ranks
is what the CPU tests cover).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache" / "ep-bench"
GB = 1e9


def bench_config():
    from workbench.config import ModelConfig
    return ModelConfig.tiny(vocab_size=2048, hidden_size=512, intermediate_size=512,
                            intermediate_size_mlp=1024, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                            num_local_experts=16, attention_chunk_size=128)


def ensure_checkpoint() -> Path:
    from workbench.random_weights import write_random_checkpoint
    if not (CACHE / "config.json").exists():
        write_random_checkpoint(CACHE, bench_config(), seed=0, router_std=0.5)
    return CACHE


# ----------------------------------------------------------------------------- torch worker
def torch_worker(rank: int, world: int, port: int, tokens: int, repeat: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    import workbench as wb
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        model = wb.load(CACHE, backend="torch", expert_parallel=True)
        ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (1, tokens))
        model.run(ids)
        model.ops.stats.__init__()
        dist.barrier()
        t = time.perf_counter()
        for _ in range(repeat):
            model.run(ids)
        wall = (time.perf_counter() - t) / repeat
        s = model.ops.stats
        calls = s.calls
        held = sum(p.numel() * p.element_size() for n, p in model.params.as_dict().items()
                   if ".experts." in n)
        res = {"rank": rank, "forward_s": wall, "expert_bytes_held": held,
               "per_moe_layer": {"count_bytes": s.count_bytes / calls,
                                 "row_bytes_sent": s.row_bytes / calls,
                                 "gather_bytes_sent": s.gather_bytes / calls,
                                 "collective_s": s.collective_s / calls,
                                 "compute_s": s.compute_s / calls}}
        gathered = [None] * world
        dist.all_gather_object(gathered, res)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def run_torch(n: int, tokens: int, repeat: int, timeout: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = CACHE.parent / f"ep-torch-{n}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, __file__, "torch-worker", str(r), str(n),
                               str(port), str(tokens), str(repeat), str(out)], env=env)
             for r in range(n)]
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"torch with {n} processes failed")
    ranks = json.loads(out.read_text())
    out.unlink()
    layer = {k: float(np.mean([r["per_moe_layer"][k] for r in ranks]))
             for k in ranks[0]["per_moe_layer"]}
    return {"processes": n, "forward_s": max(r["forward_s"] for r in ranks),
            "expert_bytes_per_rank": [r["expert_bytes_held"] for r in ranks],
            "per_moe_layer_mean_over_ranks": layer}


# ----------------------------------------------------------------------------- jax worker
def jax_worker(tokens: int, repeat: int, out: str) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import workbench as wb
    from workbench.jax import parallel as par
    model = wb.load(CACHE, backend="jax", expert_parallel=True)
    cfg = model.config
    mesh = model.mesh
    n = mesh.shape[par.EXPERT_AXIS]
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, tokens))
    model.run(ids)
    t = time.perf_counter()
    for _ in range(repeat):
        model.run(ids)
    wall = (time.perf_counter() - t) / repeat

    # one MoE layer's dispatch alone, on its real inputs, against its exchanges alone
    layer = cfg.moe_layers[0]
    tr = model.run(ids, capture=[f"layers.{layer}.resid_mid",
                                 f"layers.{layer}.moe.topk_indices",
                                 f"layers.{layer}.moe.topk_scores"]).trace
    D, k = cfg.hidden_size, cfg.num_experts_per_tok
    rep = NamedSharding(mesh, P())
    x = jax.device_put(tr[f"layers.{layer}.resid_mid"].reshape(-1, D), rep)
    idx = jax.device_put(tr[f"layers.{layer}.moe.topk_indices"].reshape(-1, k), rep)
    gates = jax.device_put(tr[f"layers.{layer}.moe.topk_scores"].reshape(-1, k), rep)
    slots = model.expert_slots[layer]
    dispatch = jax.jit(lambda x, i, g, w: par.dispatch(mesh, x, i, g, w))
    per = len(slots)
    A = -(-tokens // n) * k

    def exchanges(c, rows):
        def body(c, rows):
            c = jax.lax.all_to_all(c, par.EXPERT_AXIS, 0, 0, tiled=True)
            r = jax.lax.all_to_all(rows, par.EXPERT_AXIS, 0, 0, tiled=True)
            r = jax.lax.all_to_all(r + 1, par.EXPERT_AXIS, 0, 0, tiled=True)
            return c, r
        return jax.shard_map(body, mesh=mesh, in_specs=(P(par.EXPERT_AXIS),) * 2,
                             out_specs=(P(par.EXPERT_AXIS),) * 2, check_vma=False)(c, rows)

    shard = NamedSharding(mesh, P(par.EXPERT_AXIS))
    c = jax.device_put(jnp.zeros((n * n, per), jnp.int32), shard)
    rows = jax.device_put(jnp.zeros((n * n, A, D), jnp.float32), shard)
    ex = jax.jit(exchanges)

    def timed(fn, *args) -> float:
        jax.block_until_ready(fn(*args))
        best = []
        for _ in range(max(repeat, 5)):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best.append(time.perf_counter() - t)
        return float(np.median(best))

    d_s = timed(dispatch, x, idx, gates, slots)
    c_s = timed(ex, c, rows)
    res = {"devices": n, "forward_s": wall,
           "expert_bytes_per_device": list(par.expert_bytes_per_device(
               model.expert_slots).values()),
           "per_moe_layer": {**par.exchange_bytes(mesh, tokens, k, D, 4,
                                                  cfg.num_local_experts),
                             "dispatch_s": d_s, "collective_s": c_s if n > 1 else 0.0,
                             "compute_s": d_s - (c_s if n > 1 else 0.0)}}
    Path(out).write_text(json.dumps(res))


def run_jax(n: int, tokens: int, repeat: int, timeout: int) -> dict:
    out = CACHE.parent / f"ep-jax-{n}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
    subprocess.run([sys.executable, __file__, "jax-worker", str(tokens), str(repeat),
                    str(out)], env=env, check=True, timeout=timeout)
    res = json.loads(out.read_text())
    out.unlink()
    return res


# ----------------------------------------------------------------------------- device check
def device_check(platform: str, tokens: int, out: str) -> None:
    """One process on one accelerator (or the CPU): the expert-parallel model against the
    single-device one, logits and every hook. torch: a 1-rank process group (NCCL on CUDA,
    gloo on the CPU); jax: a 1-device "expert" mesh on the platform."""
    import jax
    import torch
    import torch.distributed as dist

    import workbench as wb
    ids = np.random.default_rng(1).integers(0, bench_config().vocab_size, (2, tokens // 2))

    def worst(a, b) -> float:
        errs = [np.abs(a.logits - b.logits).max() / np.abs(a.logits).max()]
        errs += [np.abs(a.trace[n] - b.trace[n]).max() / max(np.abs(a.trace[n]).max(), 1e-30)
                 for n in a.trace if a.trace[n].dtype.kind == "f"]
        return float(max(errs))

    res: dict = {"platform": platform}
    cuda = platform != "cpu"
    dev = "cuda:0" if cuda else "cpu"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        for dtype in ("float32", "bfloat16"):
            ref = wb.load(CACHE, backend="torch", dtype=dtype, device=dev)
            ep = wb.load(CACHE, backend="torch", dtype=dtype, device=dev, expert_parallel=True)
            a, b = (m.run(ids, capture="*", interventions=[wb.set_top_k(2)]) for m in (ref, ep))
            res[f"torch_{dtype}"] = {"backend": dist.get_backend(), "worst_rel": worst(a, b)}
            del ref, ep
            if cuda:
                torch.cuda.empty_cache()
    finally:
        dist.destroy_process_group()
    jdev = jax.devices("gpu" if cuda else "cpu")[0]
    mesh = jax.sharding.Mesh(np.array([jdev]), ("expert",))
    for dtype in ("float32", "bfloat16"):
        ref = wb.load(CACHE, backend="jax", dtype=dtype, device=jdev)
        ep = wb.load(CACHE, backend="jax", dtype=dtype, mesh=mesh)
        a, b = (m.run(ids, capture="*", interventions=[wb.set_top_k(2)]) for m in (ref, ep))
        res[f"jax_{dtype}"] = {"device": str(jdev), "worst_rel": worst(a, b)}
    print(json.dumps(res, indent=1))
    Path(out).write_text(json.dumps(res, indent=1) + "\n")


# ----------------------------------------------------------------------------- projection
def maverick_projection(gpus: int = 8, gpu_gb: float = 80.0, expert_bytes: float = 2.0
                        ) -> dict:
    """Maverick (text model) expert-parallel over ``gpus``, bf16 except the routed experts
    (``expert_bytes`` per parameter: 2 for bf16, about 1 for FP8): bytes per GPU (every
    weight but the routed experts is replicated), and the bytes one token's hidden state moves
    through the dispatch."""
    from workbench.config import ModelConfig
    cfg = ModelConfig.maverick()
    pc = cfg.param_counts()
    b = 2  # bf16
    experts = pc["experts"] * expert_bytes
    replicated = (pc["total"] - pc["experts"]) * b
    per_gpu = replicated + experts / gpus
    D, k, L = cfg.hidden_size, cfg.num_experts_per_tok, len(cfg.moe_layers)
    row = k * D * b  # one token's gate-scaled rows to its experts, and as many back
    return {
        "config": {"experts": cfg.num_local_experts, "moe_layers": L, "hidden": D, "top_k": k,
                   "expert_width": cfg.intermediate_size},
        "gpus": gpus, "gpu_gb": gpu_gb,
        "expert_bytes_per_param": expert_bytes,
        "total_gb": (replicated + experts) / GB, "experts_gb": experts / GB,
        "replicated_gb": replicated / GB, "experts_per_gpu": cfg.num_local_experts // gpus,
        "expert_gb_per_gpu": experts / gpus / GB, "weights_gb_per_gpu": per_gpu / GB,
        "free_gb_per_gpu": gpu_gb - per_gpu / GB, "fits": per_gpu / GB < gpu_gb,
        "exchange_bytes_per_token_per_moe_layer": 2 * row,
        "exchange_bytes_per_token": 2 * row * L,
        "leaves_gpu_fraction_balanced": (gpus - 1) / gpus,
        "jax_buffer_factor": gpus,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--counts", default="1,2,4")
    ap.add_argument("--only", default="torch,jax")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" /
                                          "results-expert-parallel.json"))
    ap.add_argument("--keep", action="store_true", help="keep the cached checkpoint")
    ap.add_argument("--device-check", choices=("cpu", "gpu"),
                    help="only compare expert-parallel and single-device runs on one device "
                         "(torch NCCL / jax GPU with 'gpu'), writing --json")
    a = ap.parse_args()
    counts = [int(c) for c in a.counts.split(",")]
    ensure_checkpoint()
    if a.device_check:
        try:
            device_check(a.device_check, a.tokens, a.json)
        finally:
            if not a.keep:
                shutil.rmtree(CACHE, ignore_errors=True)
        return
    cfg = bench_config()
    results: dict = {"date": datetime.date.today().isoformat(), "tokens": a.tokens,
                     "config": {"hidden": cfg.hidden_size, "expert_width": cfg.intermediate_size,
                                "experts": cfg.num_local_experts,
                                "moe_layers": len(cfg.moe_layers), "dtype": "float32"},
                     "cpu_cores": os.cpu_count(), "torch": [], "jax": []}
    try:
        for n in counts:
            if "torch" in a.only:
                r = run_torch(n, a.tokens, a.repeat, a.timeout)
                results["torch"].append(r)
                lay = r["per_moe_layer_mean_over_ranks"]
                print(f"torch {n} proc: forward {r['forward_s'] * 1e3:.1f} ms; per MoE layer "
                      f"rows sent {lay['row_bytes_sent'] / 1e6:.2f} MB, gather "
                      f"{lay['gather_bytes_sent'] / 1e6:.2f} MB, collectives "
                      f"{lay['collective_s'] * 1e3:.2f} ms, experts "
                      f"{lay['compute_s'] * 1e3:.2f} ms; experts/rank "
                      f"{r['expert_bytes_per_rank'][0] / 1e6:.1f} MB", flush=True)
            if "jax" in a.only:
                r = run_jax(n, a.tokens, a.repeat, a.timeout)
                results["jax"].append(r)
                lay = r["per_moe_layer"]
                print(f"jax   {n} dev : forward {r['forward_s'] * 1e3:.1f} ms; per MoE layer "
                      f"exchanged {lay['total'] / 1e6:.2f} MB/device (payload "
                      f"{lay['payload'] / 1e6:.2f} MB), dispatch {lay['dispatch_s'] * 1e3:.2f} "
                      f"ms of which collectives {lay['collective_s'] * 1e3:.2f} ms; "
                      f"experts/device {r['expert_bytes_per_device'][0] / 1e6:.1f} MB",
                      flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(CACHE, ignore_errors=True)
    proj = maverick_projection()
    results["maverick_bf16_8x80GB"] = proj
    results["maverick_alternatives"] = {
        "bf16_16x80GB": maverick_projection(16, 80.0),
        "bf16_32x80GB": maverick_projection(32, 80.0),
        "bf16_8x141GB": maverick_projection(8, 141.0),
        "fp8_experts_8x80GB": maverick_projection(8, 80.0, 1.0)}
    for name, p in [("bf16_8x80GB", proj), *results["maverick_alternatives"].items()]:
        print(f"Maverick {name}: {p['total_gb']:.0f} GB of weights, {p['experts_gb']:.0f} GB "
              f"of experts ({p['experts_per_gpu']} of {p['config']['experts']} per GPU per MoE "
              f"layer: {p['expert_gb_per_gpu']:.1f} GB) + {p['replicated_gb']:.1f} GB "
              f"replicated = {p['weights_gb_per_gpu']:.1f} GB per GPU: "
              + (f"fits, {p['free_gb_per_gpu']:.1f} GB left" if p["fits"] else
                 f"does not fit ({-p['free_gb_per_gpu']:.1f} GB over)"))
    print(f"per token: {proj['exchange_bytes_per_token_per_moe_layer'] / 1e3:.1f} kB per MoE "
          f"layer out and back, {proj['exchange_bytes_per_token'] / 1e6:.2f} MB over "
          f"{proj['config']['moe_layers']} MoE layers (jax's dropless buffers: "
          f"x{proj['jax_buffer_factor']})")
    Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "torch-worker":
        torch_worker(*(int(v) for v in sys.argv[2:7]), sys.argv[7])
    elif len(sys.argv) > 1 and sys.argv[1] == "jax-worker":
        jax_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        main()
