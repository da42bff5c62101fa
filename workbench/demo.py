"""``workbench demo`` (``make demo``): the main job on the bundled model, end to end.

Loads the bundled trained model in PyTorch and (if installed) JAX, runs one prompt per corpus
domain and generates a continuation while capturing routing, prints the per-layer routing table
and per-domain specialisation, runs the PyTorch↔JAX parity check, and writes figures (PNG),
traces (safetensors) and a JSON summary to the output directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .jsonio import dumps

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "data" / "scout-mini"

PROMPTS = {
    "code": "def read_config(path):\n    \"\"\"Read a configuration file.\"\"\"\n    with open(",
    "prose": "The interpreter reads the source file and converts each statement into",
    "legal": "Permission is hereby granted, free of charge, to any person obtaining a copy of",
    "numeric": "date,station,temperature,humidity\n2021-03-01,A7,12.4,0.61\n2021-03-02,A7,",
}


class _Progress:
    def __init__(self, total: int):
        self.total, self.n, self.t0 = total, 0, time.time()

    def step(self, what: str) -> None:
        self.n += 1
        print(f"[{self.n}/{self.total}] {what} ({time.time() - self.t0:.1f} s)", flush=True)


def run_demo(out_dir: Path = Path("demo-output"), model: str | None = None,
             quick: bool = False, new_tokens: int = 24) -> int:
    """Run the demo; returns a process exit code (0 on success, 1 if parity failed)."""
    import workbench as wb
    from workbench import analysis as an

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"demo output {out_dir} is a file; pass a directory (it is created if "
                         "needed)")
    out_dir.mkdir(parents=True, exist_ok=True)
    prog = _Progress(7)
    path = Path(model) if model else BUNDLED
    if not (path / "config.json").exists():
        if model:
            raise FileNotFoundError(f"no checkpoint at {path}")
        from workbench.random_weights import write_random_checkpoint
        path = write_random_checkpoint(out_dir / "random-model", wb.ModelConfig.tiny(), seed=0,
                                       std=0.08, router_std=0.5)
        print(f"bundled model not found at {BUNDLED}; using a random checkpoint at {path}")
    from workbench.describe import inspect_text
    print(inspect_text(str(path)))
    print()
    tok = wb.Tokenizer.from_pretrained(path) if (path / "tokenizer.json").exists() else None
    tm = wb.load(path, backend="torch")
    prog.step(f"loaded {path.name} in PyTorch: {tm}")

    n_new = 8 if quick else new_tokens
    traces: dict[str, wb.Trace] = {}
    generations: dict[str, dict[str, Any]] = {}
    for domain, text in PROMPTS.items():
        ids = np.array([tok.encode(text)]) if tok else \
            np.random.default_rng(len(domain)).integers(0, tm.config.vocab_size, (1, 24))
        g = tm.generate(ids, n_new, temperature=0.7, top_p=0.9, seed=0,
                        capture=["*.moe.*"], stop_ids=[tok.eos_id] if tok else None)
        g.trace.meta["domain"] = domain
        traces[domain] = g.trace
        cont = tok.decode(g.new_tokens[0].tolist()) if tok else str(g.new_tokens[0].tolist())
        generations[domain] = {"prompt": text, "continuation": cont,
                               "prompt_ids": ids[0].tolist(),
                               "new_ids": g.new_tokens[0].tolist()}
    prog.step(f"generated {n_new} tokens for each of {len(PROMPTS)} domains, routing captured")
    for domain, gen in generations.items():
        print(f"  {domain:8s} {gen['prompt'][-40:]!r} -> {gen['continuation'][:60]!r}")

    all_traces = list(traces.values())
    rows = an.routing_table(all_traces)
    print()
    print("per-layer routing (all prompts and generated tokens):")
    print(an.format_routing_table(rows))
    layers = tm.config.moe_layers
    js = an.domain_js_by_layer(traces, layers)
    print()
    print("domain specialisation: Jensen-Shannon divergence (bits) of each domain's expert load "
          "from the overall load")
    print("  layer " + " ".join(f"{d:>8s}" for d in traces))
    for li, layer in enumerate(layers):
        print(f"  {layer:5d} " + " ".join(f"{v:8.3f}" for v in js[li]))
    prog.step("routing analysis")

    parity: dict[str, Any] = {"ran": False}
    try:
        jm = wb.load(path, backend="jax")
    except ImportError as e:
        print(f"JAX not installed ({e}); skipping the PyTorch<->JAX check")
        jm = None
    if jm is not None:
        ids = np.array([generations["code"]["prompt_ids"] + generations["code"]["new_ids"]])
        rep = wb.compare(tm, jm, ids)
        print()
        print(rep.summary(max_rows=12))
        worst = rep.worst
        parity = {"ran": True, "ok": rep.ok, "worst_hook": worst.name if worst else None,
                  "worst_rel": worst.rel if worst else 0.0, "flips": len(rep.flips),
                  "all_flips_near_ties": rep.all_flips_near_ties,
                  "next_token_agreement": rep.next_token_agreement}
        prog.step("PyTorch <-> JAX parity")
    else:
        rep = None
        prog.step("PyTorch <-> JAX parity skipped")

    figures = _figures(out_dir, traces, tok, layers, rep, path)
    prog.step(f"wrote {len(figures)} figures")
    tdir = out_dir / "traces"
    saved = [str(t.save(tdir / f"{d}.safetensors")) for d, t in traces.items()]
    prog.step(f"saved {len(saved)} traces to {tdir}")

    summary = {
        "model": str(path), "config": tm.config.summary(), "generations": generations,
        "routing_table": rows, "domain_js_bits": {d: [float(v) for v in js[:, i]]
                                                  for i, d in enumerate(traces)},
        "parity": parity, "figures": figures, "traces": saved,
        "elapsed_s": round(time.time() - prog.t0, 1),
    }
    (out_dir / "summary.json").write_text(dumps(summary, indent=2) + "\n")
    prog.step(f"summary written to {out_dir / 'summary.json'}")
    return 0 if parity.get("ok", True) else 1


def _figures(out_dir: Path, traces: dict, tok: Any, layers: list[int], rep: Any,
             path: Path) -> list[str]:
    from workbench import plots
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    all_traces = list(traces.values())
    made = {
        "load_heatmap": plots.load_heatmap(all_traces),
        "imbalance": plots.imbalance_bars(all_traces),
        "domain_specialisation": plots.domain_heatmap(traces, layer=layers[-1]),
        "tokens_by_expert_code": plots.token_routing_text(traces["code"], layer=layers[0],
                                                          tokenizer=tok),
        "tokens_by_expert_numeric": plots.token_routing_text(traces["numeric"],
                                                             layer=layers[0], tokenizer=tok),
        "expert_flow": plots.expert_flow(all_traces),
    }
    if rep is not None:
        made["parity_errors"] = plots.parity_errors(rep)
    if (path / "training_log.json").exists():
        made["training"] = plots.training_curves_plot(path / "training_log.json")
    out = []
    for name, fig in made.items():
        out.append(str(plots.save(fig, fig_dir / f"{name}.png")))
    return out

