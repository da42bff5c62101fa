"""JAX compile time against depth: the first call of a forward at 4, 16 and 48 layers.

The jax backend compiles one function per distinct step kind (embedding, each layer kind, head)
and reuses it for every layer of that kind, so the first call should cost about the same at
any depth, plus the per-layer run time. For each depth this prints the first call (compile +
run), the steady-state call, their difference (compile), and how many step functions were
compiled. Weights are random (seeded), built in memory.

    python benchmarks/compile_depth.py [--depths 4 16 48] [--experts 16 128] [--seq 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.config import ModelConfig  # noqa: E402
from workbench.random_weights import random_tensors  # noqa: E402


def measure(layers: int, experts: int, seq: int, interleave: int) -> dict:
    """Time the first and a steady-state jax forward of a small config with ``layers`` layers."""
    from workbench.jax.model import JaxModel
    cfg = ModelConfig.tiny(num_hidden_layers=layers, num_local_experts=experts,
                           hidden_size=256, intermediate_size=256, intermediate_size_mlp=512,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                           vocab_size=2048, attention_chunk_size=32,
                           interleave_moe_layer_step=interleave)
    model = JaxModel(cfg, random_tensors(cfg, seed=0))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, seq))
    t = time.perf_counter()
    model.run(ids)
    first = time.perf_counter() - t
    steady = min(_timed(lambda: model.run(ids)) for _ in range(3))
    return {"layers": layers, "experts": experts, "moe_every": interleave,
            "kinds": len({(cfg.is_moe(i), cfg.uses_rope(i), cfg.chunk_size(i))
                          for i in range(layers)}),
            "first_call_s": first, "steady_s": steady, "compile_s": max(0.0, first - steady),
            "compiled_steps": model.compiled_steps}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 16, 48])
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name(
        "results-compile-depth.json"))
    a = ap.parse_args(argv)
    rows = []
    for E in a.experts:
        interleave = 1 if E <= 16 else 2  # Scout-like: MoE everywhere; Maverick-like: every 2nd
        for L in a.depths:
            r = measure(L, E, a.seq, interleave)
            rows.append(r)
            print(f"E={E:3d} layers={L:2d}: first call {r['first_call_s']:6.2f} s, steady "
                  f"{r['steady_s']:6.3f} s, compile {r['compile_s']:6.2f} s, "
                  f"{r['compiled_steps']} compiled steps", flush=True)
    a.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "seq": a.seq,
                                 "rows": rows}, indent=1) + "\n")
    print("\n| experts | layers | first call (s) | steady (s) | compile (s) | compiled steps |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['experts']} | {r['layers']} | {r['first_call_s']:.2f} | "
              f"{r['steady_s']:.3f} | {r['compile_s']:.2f} | {r['compiled_steps']} |")


if __name__ == "__main__":
    main()
