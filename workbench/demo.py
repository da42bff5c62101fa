"""``workbench demo`` (``make demo``): the main job on the bundled model, end to end.

Loads the bundled trained model in PyTorch and (if installed) JAX, runs one prompt per corpus
domain and generates a continuation while capturing routing, prints the per-layer routing table,
measures per-domain specialisation on a corpus sample (``wb.data.corpus_sample``: thousands of
tokens, with bootstrap intervals over documents and a domain-shuffle baseline), runs the
PyTorch↔JAX parity check, and writes figures (PNG), traces (safetensors) and a JSON summary to
the output directory.
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
        g.trace.meta["prompt_len"] = int(ids.shape[1])  # later positions were generated
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
    sample = _domain_sample(tm, tok, traces, SAMPLE_DOCS[quick])
    n_tok = sum(t.input_ids.size for t in sample.values())
    n_docs = sum(t.input_ids.shape[0] for t in sample.values())
    js = an.domain_js_by_layer(sample, layers)
    print()
    print(f"domain specialisation on a corpus sample ({n_docs} documents, {n_tok} tokens): "
          "Jensen-Shannon divergence (bits) of each domain's expert load from the overall load")
    print("  layer " + " ".join(f"{d:>8s}" for d in sample))
    for layer in layers:  # js is indexed by layer id
        print(f"  {layer:5d} " + " ".join(f"{v:8.3f}" for v in js[layer]))
    js_est = {layer: an.domain_js_estimate(sample, layer, n_boot=100, n_shuffle=100)
              for layer in layers}
    if min(t.input_ids.shape[0] for t in sample.values()) < 2:
        print("one document per domain: these JS values have no interval and no baseline "
              "(shuffling one document per domain changes nothing)")
    else:
        print("mean JS over domains [95% bootstrap CI over documents], against shuffled "
              "domains:")
        for layer, e in js_est.items():
            print(f"  {layer:5d} {e.text()}  (p = {e.p_value:.2f}, {e.n_tokens} tokens)")
    prog.step(f"routing analysis ({n_tok} corpus tokens)")

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

    figures = _figures(out_dir, traces, sample, tok, layers, rep, path)
    prog.step(f"wrote {len(figures)} figures")
    tdir = out_dir / "traces"
    saved = [str(t.save(tdir / f"{d}.safetensors")) for d, t in traces.items()]
    prog.step(f"saved {len(saved)} traces to {tdir}")

    summary = {
        "model": str(path), "config": tm.config.summary(), "generations": generations,
        "routing_table": rows,
        "corpus_sample": {d: {"documents": int(t.input_ids.shape[0]),
                              "tokens": int(t.input_ids.size),
                              "sources": list(t.meta.get("sources", []))}
                          for d, t in sample.items()},
        "domain_js_bits": {d: [float(v) for v in js[:, i]] for i, d in enumerate(sample)},
        "domain_js_estimate": {str(i): e.as_dict() for i, e in js_est.items()},
        "parity": parity, "figures": figures, "traces": saved,
        "elapsed_s": round(time.time() - prog.t0, 1),
    }
    (out_dir / "summary.json").write_text(dumps(summary, indent=2) + "\n")
    prog.step(f"summary written to {out_dir / 'summary.json'}")
    return 0 if parity.get("ok", True) else 1


#: Corpus-sample sequences (of 128 tokens) per domain, by ``quick``.
SAMPLE_DOCS = {False: 16, True: 4}


def _domain_sample(model: Any, tok: Any, prompts: dict[str, Any], n_docs: int
                   ) -> dict[str, Any]:
    """``{domain: trace}`` of ``wb.data.corpus_sample(n_docs)`` with every MoE hook captured,
    one batch per domain (``meta["domain"]``, ``meta["sources"]``). Without a tokenizer (a
    random model) the prompt traces stand in."""
    if tok is None:
        return prompts
    from workbench.data import corpus_sample
    sample = corpus_sample(n_docs, tokenizer=tok)
    out = {}
    for domain, ids in sample.items():
        t = model.run(ids, capture=["*.moe.*"]).trace
        t.meta["domain"] = domain
        t.meta["sources"] = list(sample.sources[domain])
        out[domain] = t
    return out


def _figures(out_dir: Path, traces: dict, sample: dict, tok: Any, layers: list[int], rep: Any,
             path: Path) -> list[str]:
    """The demo's figures: routing of the generated prompts, and domain specialisation on the
    corpus ``sample`` (first, middle and last MoE layer)."""
    from workbench import plots
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    all_traces = list(traces.values())
    pooled = list(sample.values())
    made = {
        "load_heatmap": plots.load_heatmap(pooled),
        "imbalance": plots.imbalance_bars(pooled),
        "domain_specialisation": plots.domain_heatmap(sample, layer=layers[-1]),
        "tokens_by_expert_code": plots.token_routing_text(traces["code"], layer=layers[0],
                                                          tokenizer=tok),
        "tokens_by_expert_numeric": plots.token_routing_text(traces["numeric"],
                                                             layer=layers[0], tokenizer=tok),
        "expert_flow": plots.expert_flow(all_traces),
        "tokens_by_layer_code": plots.token_routing_layers(traces["code"], tokenizer=tok),
        "domain_share": plots.domain_share_bars(sample),
        "domain_divergence": plots.domain_divergence_plot(sample),
        "specialisation_by_layer": plots.specialisation_by_layer(sample),
    }
    if rep is not None:
        made["parity_errors"] = plots.parity_errors(rep)
    if (path / "training_log.json").exists():
        made["training"] = plots.training_curves_plot(path / "training_log.json")
    out = []
    for name, fig in made.items():
        out.append(str(plots.save(fig, fig_dir / f"{name}.png")))
    return out



#: Shapes :func:`synthetic_traces` builds: (layers, experts, top-k, MoE layer step, NoPE step).
SHAPES = {"scout": (48, 16, 1, 1, 4), "maverick": (48, 128, 1, 2, 4), "tiny": (4, 8, 1, 1, 4)}


def synthetic_traces(shape: str = "scout", n_docs: int = 8, seq: int = 64,
                     domains: tuple[str, ...] = ("code", "prose", "legal", "numeric"),
                     hidden: int = 16, vocab: int = 2048, patterns: bool = True,
                     seed: int = 0) -> list[Any]:
    """Traces with the routing of a Scout- or Maverick-shaped model, built without weights.

    ``shape``: ``"scout"`` (48 layers, 16 experts in every layer), ``"maverick"`` (48 layers,
    128 experts in every other layer, dense layers between) or ``"tiny"`` (4 × 8). Each of the
    ``n_docs`` documents (one trace of shape (1, ``seq``), ``meta["domain"]`` cycling through
    ``domains``) has Zipf-distributed token ids; router logits mix a per-token, a per-domain and
    a skewed per-expert term, so load is uneven and specialisation measurable. Captured: every
    MoE layer's ``router_logits``, ``topk_indices``, ``topk_scores``, ``routed_out`` and
    ``shared_out`` (width ``hidden``), and with ``patterns`` the attention pattern of one
    chunked and one global layer. For previewing figures at scale and for tests.
    """
    from .trace import Trace
    if shape not in SHAPES:
        raise ValueError(f"synthetic_traces: shape must be one of {sorted(SHAPES)}, got "
                         f"{shape!r}")
    if n_docs < 1 or seq < 2:
        raise ValueError(f"synthetic_traces: need n_docs >= 1 and seq >= 2, got {n_docs}, {seq}")
    L, E, k, step, nope_step = SHAPES[shape]
    moe = list(range(step - 1, L, step))
    nope = list(range(nope_step - 1, L, nope_step))
    chunk = max(8, seq // 2)
    heads = 4
    cfg = {"layers": L, "hidden": hidden, "heads": heads, "kv_heads": 1, "head_dim": 4,
           "experts": E, "top_k": k, "moe_layers": moe, "nope_layers": nope, "chunk": chunk,
           "vocab": vocab, "qk_norm": True}
    rng = np.random.default_rng(seed)
    expert_bias = {i: rng.gumbel(size=E) * 0.6
                   for i in moe}
    token_pref = {i: rng.normal(size=(vocab, E)) for i in moe}
    dom_pref = {d: {i: rng.normal(size=E) * 0.8 for i in moe} for d in domains}
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    zipf = 1.0 / ranks
    zipf /= zipf.sum()
    pat_layers = [i for i in range(L) if i not in nope][:1] + nope[:1] if patterns else []
    out = []
    for doc in range(n_docs):
        dom = domains[doc % len(domains)]
        ids = rng.choice(vocab, size=seq, p=zipf)
        arrays: dict[str, np.ndarray] = {}
        for i in moe:
            z = (token_pref[i][ids] + dom_pref[dom][i] + expert_bias[i]
                 + rng.normal(scale=0.7, size=(seq, E)))
            idx = np.argsort(-z, axis=-1, kind="stable")[:, :k]
            top = np.take_along_axis(z, idx, axis=-1)
            p = f"layers.{i}.moe."
            arrays[p + "router_logits"] = z[None].astype(np.float32)
            arrays[p + "topk_indices"] = idx[None].astype(np.int32)
            arrays[p + "topk_scores"] = (1 / (1 + np.exp(-top)))[None].astype(np.float32)
            arrays[p + "routed_out"] = rng.normal(size=(1, seq, hidden)).astype(np.float32)
            arrays[p + "shared_out"] = rng.normal(scale=1.3, size=(1, seq, hidden)
                                                  ).astype(np.float32)
        for i in pat_layers:
            s = rng.normal(size=(heads, seq, seq))
            q, kk = np.arange(seq)[:, None], np.arange(seq)[None, :]
            allowed = kk <= q
            if i not in nope:
                allowed &= (q // chunk) == (kk // chunk)
            s = np.where(allowed, s, -np.inf)
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            arrays[f"layers.{i}.attn.pattern"] = (s / s.sum(-1, keepdims=True))[None].astype(
                np.float32)
        out.append(Trace(arrays, ids[None].astype(np.int64),
                         {"config": cfg, "domain": dom, "source": f"synthetic {shape} #{doc}",
                          "backend": "synthetic", "dtype": "float32"}))
    return out
