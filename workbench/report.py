"""``workbench report``: every routing and attention figure, plus metrics.json, for a checkpoint
or a saved trace.

Given a checkpoint directory the model is loaded (torch by default), run on ``--text`` inputs or
on a corpus sample (``wb.data.corpus_sample``: ``--corpus-sample N`` sequences of
``--max-tokens`` tokens per domain from the held-out corpus, thousands of tokens by default), with
``*.moe.*`` and the attention patterns of one chunked and one global layer captured. The report
then runs the analyses (load, confidence, specialisation by domain / token category /
vocabulary with bootstrap intervals and shuffle baselines, dynamics,
router similarity from the checkpoint's router weights, attention summary,
causal ablation on one layer, routing over training when ``training_log.json`` sits beside the
checkpoint, and routing stability against ``checkpoints/step-*``), writes each figure in the
``--format`` list (PNG, PDF with embedded TrueType fonts, SVG with text as text), a JSON-clean
``metrics.json`` holding the token ids used, and ``index.html``: every figure with its
caption, the specialisation statistics with their intervals and baselines, and a link to
``metrics.json``.

Given a trace file (``.safetensors`` written by ``Trace.save``) it draws the figures that need
only the trace.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .jsonio import dumps

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = Path("data") / "corpus" / "val.jsonl"
DEFAULT_SAMPLE = 8
"""Sequences per domain when neither --text nor --corpus-sample is given."""


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``workbench report``."""
    from .cli import non_negative_int, positive_int
    p.add_argument("target", metavar="CKPT_OR_TRACE",
                   help="checkpoint directory, or a trace .safetensors written by Trace.save")
    p.add_argument("--out", required=True, help="directory for the PNGs and metrics.json")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", action="append", default=None,
                     help="input text (repeat for several); tokenised with the checkpoint's "
                          "tokenizer.json")
    src.add_argument("--corpus-sample", type=positive_int, default=None, metavar="N",
                     help="N sequences of --max-tokens tokens per domain from the held-out "
                          "corpus shipped with the package (wb.data.corpus_sample; default "
                          f"{DEFAULT_SAMPLE} when no --text)")
    p.add_argument("--corpus", default=None,
                   help="a jsonl file (domain, source, text per line) to take the first N "
                        "documents per domain from instead of the shipped corpus")
    p.add_argument("--max-tokens", type=positive_int, default=128,
                   help="cut each input to this many tokens (default 128)")
    p.add_argument("--backend", choices=("torch", "jax"), default="torch")
    p.add_argument("--layer", type=non_negative_int, default=None,
                   help="MoE layer for the single-layer figures (default: the middle one)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (or its dir) for a trace whose checkpoint is elsewhere")
    p.add_argument("--no-causal", action="store_true", help="skip the expert-ablation runs")
    p.add_argument("--dpi", type=positive_int, default=120, help="PNG resolution (default 120)")
    p.add_argument("--format", default="png", metavar="FORMATS",
                   help="comma-separated figure formats among png, pdf, svg (default png)")
    p.add_argument("--n-boot", type=positive_int, default=200, metavar="N",
                   help="bootstrap resamples and label shuffles per statistic (default 200)")
    p.add_argument("--figures", default=None, metavar="GLOBS",
                   help="draw only the figures whose names match these comma-separated globs, "
                        "e.g. 'load_*,attention_*' (metrics are always complete)")


def run_report(args: argparse.Namespace) -> int:
    """Run ``workbench report``; returns the exit status (0 ok, 2 bad input)."""
    target = Path(args.target)
    out = Path(args.out)
    try:
        for opt in ("max_tokens", "corpus_sample", "dpi"):
            v = getattr(args, opt, None)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise _Usage(f"--{opt.replace('_', '-')} must be an integer >= 1, got {v!r}")
        formats = _formats(getattr(args, "format", "png") or "png")
        if out.exists() and not out.is_dir():
            raise _Usage(f"--out {out} is a file; pass a directory (it is created if needed)")
        if target.is_dir():
            rep = _Report(out, args.dpi, args.figures, formats)
            _checkpoint_report(rep, target, args)
        elif target.is_file():
            rep = _Report(out, args.dpi, args.figures, formats)
            _trace_report(rep, target, args)
        else:
            raise _Usage(f"{target}: no such checkpoint directory or trace file")
    except _Usage as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rep.finish()
    return 0


class _Usage(Exception):
    """A problem with the command's inputs (exit status 2)."""


def _formats(text: str) -> list[str]:
    fmts = [f.strip().lower().lstrip(".") for f in str(text).split(",") if f.strip()]
    bad = [f for f in fmts if f not in ("png", "pdf", "svg")]
    if bad or not fmts:
        raise _Usage(f"--format {text!r}: choose among png, pdf, svg (comma-separated), "
                     f"not {', '.join(bad) or 'nothing'}")
    return list(dict.fromkeys(fmts))


#: What each report figure shows (index.html captions); keys are name prefixes.
CAPTIONS = {
    "load_heatmap": "Expert load per MoE layer as a ratio to uniform (f·E, log2 scale; 1 = "
                    "1/E); right axis: each layer's coefficient of variation.",
    "imbalance": "Load balance per layer in three panels, each against its own balanced "
                 "value: CV (0), max/mean (1), entropy/log E (1).",
    "token_routing_layers": "The first input's tokens across several MoE layers, coloured by "
                            "top-1 expert (busiest experts in colour, others grey).",
    "token_routing": "Input text coloured by top-1 expert at the report layer; dashed black "
                     "outline = near-tie (router margin below ε).",
    "margins": "Top-1/top-2 router-logit margin; tokens below ε could flip between backends.",
    "gates": "First-choice gate values σ(z) per layer; near-ties in red.",
    "same_expert": "Consecutive tokens on the same top-1 expert, against chance 1/E and "
                   "chance given the load.",
    "run_lengths": "Lengths of runs of tokens on one expert, against the geometric "
                   "distribution of load-matched random routing.",
    "transitions": "P(expert at the next layer | expert at this layer); read rows for "
                   "peakedness: expert ids in different layers are unrelated labels.",
    "expert_flow": "Top-1 flow of tokens between experts of successive layers (busiest "
                   "experts and largest transitions).",
    "top_tokens": "Each expert's most frequent input tokens and their share routed there.",
    "category_specialisation": "Token category × expert (ratio to uniform); title: NMI with "
                               "its bootstrap interval and the shuffled-label baseline.",
    "routed_share": "Per-token share of the routed expert in the MoE output norm.",
    "capacity": "Simulated Switch-style token drops against capacity factor.",
    "load_by_position": "Expert shares by position in the input and by token frequency "
                        "(ratio to uniform).",
    "attention_L": "Mean-over-heads attention pattern of one layer, chunk boundaries dashed; "
                   "document named in the title.",
    "attention_by_type": "Chunked (RoPE) vs global (NoPE) layers: entropy, distance, first-"
                         "token mass and attention by distance.",
    "domain_specialisation": "Domain × expert load (ratio to uniform); title: mean JS with its "
                             "bootstrap interval over documents and the domain-shuffle "
                             "baseline.",
    "domain_share": "Each expert's share per domain at the first, middle and last MoE layer, "
                    "with bootstrap intervals; dashed = 1/E.",
    "domain_divergence": "JS divergence of each domain's load from the pooled load, against "
                         "the shuffled-domain baseline (dashed, 95% range shaded).",
    "specialisation_by_layer": "Domain JS, category NMI and vocabulary specialisation per "
                               "layer with 95% bootstrap intervals; dashed = the same "
                               "statistic with shuffled labels.",
    "router_similarity": "Cosine similarity of router rows (range fitted to the data; random "
                         "vectors give 0 ± 2/√D).",
    "expert_weight_similarity": "Cosine similarity of the experts' own weights (gate_up and "
                                "down projections flattened); the title gives the band "
                                "random vectors of that length fall in.",
    "logit_lens": "Logit lens on the first input: each layer's residual stream through the "
                  "final norm and unembedding; colour = probability of the model's "
                  "prediction.",
    "knockout": "Next-token loss as the busiest experts of every MoE layer are banned, "
                "against as many random experts.",
    "ablation": "Δ loss when each expert of the report layer is banned, against the "
                "random-expert null.",
    "training": "Loss, load CV and router entropy over training.",
    "stability": "Routing agreement with intermediate checkpoints.",
}


def caption_for(name: str) -> str:
    """The index.html caption of a report figure (longest matching name prefix)."""
    keys = [k for k in CAPTIONS if name.startswith(k)]
    return CAPTIONS[max(keys, key=len)] if keys else ""


# --------------------------------------------------------------------------- output
class _Report:
    """Collects figures (written at once) and metrics."""

    def __init__(self, out: Path, dpi: int, only: str | None = None,
                 formats: Sequence[str] = ("png",)):
        self.out = out
        self.dpi = dpi
        self.formats = list(formats)
        self.entries: list[dict[str, Any]] = []
        self.estimates: dict[str, Any] = {}
        self.only = [g.strip() for g in only.split(",") if g.strip()] if only else None
        self.files: list[str] = []
        self.skipped: dict[str, str] = {}
        self.metrics: dict[str, Any] = {}
        self.summary: list[str] = []
        out.mkdir(parents=True, exist_ok=True)

    def figure(self, name: str, make: Callable[[], Any], stat: str = "") -> None:
        """Draw and write ``name`` in every format; a figure whose data is missing is skipped
        and noted. ``stat``: the statistic and its baseline, for index.html."""
        from .plots import save
        if self.only is not None and not any(fnmatch.fnmatchcase(name, g) for g in self.only):
            return
        try:
            fig = make()
        except (ValueError, KeyError) as e:
            self.skipped[name] = str(e).split("\n")[0]
            return
        names = [save(fig, self.out / f"{name}.{fmt}", dpi=self.dpi).name
                 for fmt in self.formats]
        self.files.extend(names)
        self.entries.append({"name": name, "files": names, "caption": caption_for(name),
                             "stat": stat})

    def finish(self) -> None:
        self.metrics["figures"] = list(self.files)
        self.metrics["skipped"] = dict(self.skipped)
        (self.out / "metrics.json").write_text(
            dumps(self.metrics, indent=1) + "\n",
            encoding="utf-8")
        self.files.append("metrics.json")
        (self.out / "index.html").write_text(_index_html(self), encoding="utf-8")
        self.files.append("index.html")
        for line in self.summary:
            print(line)
        for name, why in self.skipped.items():
            print(f"skipped {name}: {why}")
        print(f"wrote {len(self.files)} files to {self.out}:")
        for f in self.files:
            print(f"  {f}")


def _index_html(rep: _Report) -> str:
    """One page: summary, statistics with intervals and baselines, every figure with its
    caption and all its formats, and a link to metrics.json."""
    from html import escape
    src = rep.metrics.get("source", {})
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>workbench report"
             "</title><style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;"
             "color:#222}figure{margin:2em 0;border-top:1px solid #ddd;padding-top:1em}"
             "img{max-width:100%}table{border-collapse:collapse;font-size:0.9em}"
             "td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}"
             "figcaption{color:#444}.stat{font-family:monospace}</style></head><body>",
             f"<h1>workbench report</h1><p>{escape(str(src.get('kind', '')))} "
             f"<code>{escape(str(src.get('path', '')))}</code> · backend "
             f"{escape(str(src.get('backend')))} · {escape(str(src.get('dtype')))}</p>",
             "<p>All numbers: <a href='metrics.json'>metrics.json</a></p>"]
    if rep.summary:
        parts.append("<pre>" + escape("\n".join(rep.summary)) + "</pre>")
    est = rep.metrics.get("specialisation", {}).get("estimates", {})
    if est:
        parts.append("<h2>Specialisation with uncertainty</h2><p>value [95% bootstrap "
                     "interval over documents] against the same statistic with shuffled "
                     "labels (mean [95% range]) and the permutation p-value.</p><table><tr>"
                     "<th>statistic</th><th>layer</th><th>value</th><th>95% CI</th>"
                     "<th>shuffled baseline</th><th>p</th><th>tokens</th><th>docs</th></tr>")
        for metric, per in est.items():
            for layer, e in per.items():
                parts.append(
                    f"<tr><td style='text-align:left'>{escape(metric)}</td><td>{layer}</td>"
                    f"<td>{e['value']:.3f}</td><td>[{e['ci_low']:.3f}, {e['ci_high']:.3f}]"
                    f"</td><td>{e['baseline']:.3f} [{e['baseline_low']:.3f}, "
                    f"{e['baseline_high']:.3f}]</td><td>{e['p_value']:.3f}</td>"
                    f"<td>{e['n_tokens']}</td><td>{e['n_docs']}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Figures</h2>")
    for e in rep.entries:
        shown = next((f for f in e["files"] if f.endswith((".png", ".svg"))), None)
        links = " · ".join(f"<a href='{escape(f)}'>{escape(f.rsplit('.', 1)[1])}</a>"
                           for f in e["files"])
        img = f"<img src='{escape(shown)}' alt='{escape(e['name'])}'>" if shown else ""
        stat = f"<br><span class='stat'>{escape(e['stat'])}</span>" if e["stat"] else ""
        parts.append(f"<figure id='{escape(e['name'])}'>{img}<figcaption><b>"
                     f"{escape(e['name'])}</b>: {escape(e['caption'])}{stat}<br>{links}"
                     "</figcaption></figure>")
    if rep.skipped:
        parts.append("<h2>Skipped</h2><ul>" + "".join(
            f"<li>{escape(k)}: {escape(v)}</li>" for k, v in rep.skipped.items()) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- inputs
def _find_corpus(arg: str | None, target: Path) -> Path:
    if arg is not None:
        p = Path(arg)
        if not p.is_file():
            raise _Usage(f"--corpus {p}: file not found")
        return p
    for p in (DEFAULT_CORPUS, target.parent / "corpus" / "val.jsonl", REPO_ROOT / DEFAULT_CORPUS):
        if p.is_file():
            return p
    raise _Usage(f"no validation corpus found ({DEFAULT_CORPUS}); pass --corpus PATH or --text")


def _corpus_inputs(path: Path, n: int, tok: Any, max_tokens: int) -> list[dict[str, Any]]:
    """The first ``n`` documents of each domain (file order), tokenised and cut."""
    if n < 1:
        raise _Usage(f"--corpus-sample must be >= 1, got {n}")
    taken: dict[str, int] = {}
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            doc = json.loads(line)
            dom = str(doc.get("domain", "all"))
            if taken.get(dom, 0) >= n:
                continue
            ids = tok.encode(doc["text"])[:max_tokens]
            if len(ids) < 4:
                continue
            taken[dom] = taken.get(dom, 0) + 1
            out.append({"domain": dom, "source": doc.get("source"), "ids": ids})
    if not out:
        raise _Usage(f"{path}: no documents of 4 or more tokens")
    return sorted(out, key=lambda r: r["domain"])


def _sample_inputs(n: int, tok: Any, max_tokens: int) -> list[dict[str, Any]]:
    """``wb.data.corpus_sample``: ``n`` sequences of ``max_tokens`` tokens per domain from the
    held-out corpus shipped with the package, one input per sequence."""
    from .data import corpus_sample
    try:
        sample = corpus_sample(n, tokenizer=tok, length=max_tokens)
    except ValueError as e:
        raise _Usage(f"--corpus-sample {n} with --max-tokens {max_tokens}: {e}") from None
    return [{"domain": dom, "source": src, "ids": row.tolist()}
            for dom, rows in sorted(sample.items())
            for row, src in zip(rows, sample.sources[dom])]


def _text_inputs(texts: Sequence[str], tok: Any, max_tokens: int) -> list[dict[str, Any]]:
    out = []
    for n, text in enumerate(texts):
        ids = tok.encode(text)[:max_tokens]
        if len(ids) < 2:
            raise _Usage(f"--text #{n + 1} has fewer than 2 tokens")
        out.append({"domain": "text", "source": f"--text #{n + 1}", "ids": ids})
    return out


def _pattern_layers(cfg: Any) -> list[int]:
    """One chunked (RoPE) layer and one global (NoPE) layer, where the model has them."""
    nope = list(cfg.nope_layers)
    rope = [i for i in range(cfg.num_hidden_layers) if i not in nope]
    return sorted(set(rope[:1] + nope[:1]))


def _run_all(model: Any, inputs: list[dict[str, Any]], capture: list[str]) -> list[Any]:
    traces = []
    for inp in inputs:
        tr = model.run(np.asarray([inp["ids"]], dtype=np.int64), capture=capture).trace
        tr.meta["domain"] = inp["domain"]
        tr.meta["source"] = inp["source"]
        traces.append(tr)
    return traces


def _stacked_by_domain(inputs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """{domain: (B, T) ids}, each domain's inputs cut to its shortest one."""
    groups: dict[str, list[list[int]]] = {}
    for inp in inputs:
        groups.setdefault(inp["domain"], []).append(inp["ids"])
    out = {}
    for dom, seqs in groups.items():
        T = min(len(s) for s in seqs)
        out[dom] = np.asarray([s[:T] for s in seqs], dtype=np.int64)
    return out


# --------------------------------------------------------------------------- the report
def _checkpoint_report(rep: _Report, path: Path, args: argparse.Namespace) -> None:
    import workbench as wb

    from . import analysis as an
    from . import plots as P
    from .tokenizer import Tokenizer

    if not (path / "config.json").is_file():
        raise _Usage(f"{path}: not a checkpoint directory (no config.json)")
    tok_path = Path(args.tokenizer) if args.tokenizer else path
    try:
        tok = Tokenizer.from_pretrained(tok_path)
    except FileNotFoundError:
        raise _Usage(f"{tok_path}: no tokenizer.json; the report tokenises its inputs with "
                     "the checkpoint's tokenizer") from None
    n_docs = DEFAULT_SAMPLE if args.corpus_sample is None else args.corpus_sample
    if args.text:
        inputs = _text_inputs(args.text, tok, args.max_tokens)
    elif args.corpus is not None:
        inputs = _corpus_inputs(_find_corpus(args.corpus, path), n_docs, tok, args.max_tokens)
    else:
        inputs = _sample_inputs(n_docs, tok, args.max_tokens)
    model = wb.load(path, backend=args.backend)
    cfg = model.config
    moe = list(cfg.moe_layers)
    if not moe:
        raise _Usage(f"{path}: the model has no MoE layers")
    if args.layer is not None and args.layer not in moe:
        raise _Usage(f"--layer {args.layer} is not an MoE layer; MoE layers: {moe}")
    layer = args.layer if args.layer is not None else moe[len(moe) // 2]
    top_id = max(max(i["ids"]) for i in inputs)
    if top_id >= cfg.vocab_size:
        raise _Usage(f"the tokenizer produced id {top_id}, outside the model's vocabulary of "
                     f"{cfg.vocab_size}; pass the model's own --tokenizer")
    attn = _pattern_layers(cfg)
    capture = ["*.moe.*"] + [f"layers.{i}.attn.pattern" for i in attn]
    traces = _run_all(model, inputs, capture)
    n_tokens = sum(len(i["ids"]) for i in inputs)
    domains = sorted({i["domain"] for i in inputs})
    rep.metrics["source"] = {"kind": "checkpoint", "path": str(path), "backend": model.backend,
                             "dtype": model.dtype, "config": cfg.summary()}
    rep.metrics["inputs"] = [{"domain": i["domain"], "source": i["source"],
                              "n_tokens": len(i["ids"]), "ids": list(i["ids"])} for i in inputs]
    rep.metrics["layer"] = layer
    rep.summary.append(f"report: {path} ({model.backend}, {model.dtype}) on {len(inputs)} "
                       f"input(s), {n_tokens} tokens, domains {', '.join(domains)}; "
                       f"single-layer figures at layer {layer}")

    ids = np.concatenate([t.input_ids.reshape(-1) for t in traces])
    categories = tok.categories(ids.tolist())
    _trace_sections(rep, traces, layer, tok, categories, args.n_boot)

    # specialisation by domain
    if len(domains) > 1:
        rep.metrics["specialisation"]["domain"] = {
            str(i): _domain_metrics(an.domain_specialisation(traces, i)) for i in moe}
        e = rep.estimates.get("domain_js", {}).get(layer)
        rep.figure("domain_specialisation", lambda: P.domain_heatmap(
            traces, layer, n_boot=args.n_boot, n_shuffle=args.n_boot),
            f"layer {layer} mean JS {e.text()} bits (domains shuffled)" if e else "")
        rep.figure("domain_share", lambda: P.domain_share_bars(traces, n_boot=args.n_boot))
        rep.figure("domain_divergence", lambda: P.domain_divergence_plot(traces))
    if rep.estimates:
        rep.figure("specialisation_by_layer", lambda: P.specialisation_by_layer(
            traces, moe, categories=categories, estimates=rep.estimates),
            "; ".join(f"{k} L{layer}: {v[layer].text()}" for k, v in rep.estimates.items()
                      if layer in v))

    # router similarity from the checkpoint
    W = wb.Checkpoint.open(path)[f"layers.{layer}.feed_forward.router.weight"]
    S = an.router_cosine_similarity(np.asarray(W, dtype=np.float32))
    rep.metrics["experts"]["router_similarity"] = {
        "layer": layer, "most_similar": [{"experts": [i, j], "cosine": c}
                                         for i, j, c in an.most_similar_experts(S, 5)],
        "mean_offdiagonal": float(S[~np.eye(S.shape[0], dtype=bool)].mean())}
    rep.figure("router_similarity", lambda: P.router_similarity(similarity=S, layer=layer,
                                                                dim=int(np.shape(W)[-1])),
               f"mean off-diagonal cosine "
               f"{rep.metrics['experts']['router_similarity']['mean_offdiagonal']:.3f}")
    ck = wb.Checkpoint.open(path)
    ex = [f"layers.{layer}.feed_forward.experts.{w}" for w in ("gate_up_proj", "down_proj")]
    if all(n in list(ck) for n in ex):
        EW = [np.asarray(ck[n], dtype=np.float32) for n in ex]
        SW = an.expert_weight_similarity(EW)
        off = SW[~np.eye(SW.shape[0], dtype=bool)]
        rep.metrics["experts"]["expert_weight_similarity"] = {
            "layer": layer, "mean_offdiagonal": float(off.mean()),
            "most_similar": [{"experts": [i, j], "cosine": c}
                             for i, j, c in an.most_similar_experts(SW, 5)]}
        rep.figure("expert_weight_similarity", lambda: P.expert_weight_similarity(
            EW, layer=layer),
            f"mean off-diagonal cosine {off.mean():.3f}")

    # logit lens on the first input
    first = np.asarray([inputs[0]["ids"]], dtype=np.int64)
    lens_run = model.run(first, capture=["*.resid_post", "logits"])
    head = "lm_head.weight" if "lm_head.weight" in list(ck) else "embed_tokens.weight"
    lens = an.logit_lens(lens_run.trace, ck["norm.weight"], ck[head], eps=cfg.rms_norm_eps)
    rep.metrics["logit_lens"] = {
        "input": 0, "layers": lens.layers,
        "mean_p_final": dict(zip(map(str, lens.layers), lens.p_final.mean(axis=1))),
        "mean_kl_nats": dict(zip(map(str, lens.layers), lens.kl.mean(axis=1)))}
    rep.figure("logit_lens", lambda: P.logit_lens_plot(lens, tok, input_ids=first))

    # causal ablation on one layer
    if not args.no_causal:
        by_dom = _stacked_by_domain(inputs)
        if min(a.shape[1] for a in by_dom.values()) >= 2:
            print(f"ablating each of {cfg.num_local_experts} experts at layer {layer} "
                  f"({len(by_dom)} domain(s)) ...", flush=True)
            res = an.expert_ablation(model, by_dom, layer, mode="ban")
            rep.metrics["causal"] = {"layer": layer, "mode": res.mode,
                                     "base_loss": dict(zip(res.domains, res.base_loss)),
                                     "rows": res.rows()}
            rep.figure("ablation", lambda: P.ablation_bars(res))
            k = int(cfg.num_experts_per_tok)
            E = int(cfg.num_local_experts)
            fr = [f for f in (0.0, 1 / 16, 1 / 8, 1 / 4, 1 / 2) if E - round(f * E) >= k
                  and (f == 0 or round(f * E) >= 1)]
            ids_all = np.concatenate([a[:, :min(x.shape[1] for x in by_dom.values())]
                                      for a in by_dom.values()])
            ko = an.top_expert_knockout(model, ids_all, fractions=sorted(set(fr)), n_random=2)
            rep.metrics["knockout"] = {"layers": ko.layers, "fractions": ko.fractions,
                                       "experts_banned": ko.counts, "base_loss": ko.base_loss,
                                       "top_loss": ko.top_loss, "random_loss": ko.random_loss,
                                       "random_std": ko.random_std}
            rep.figure("knockout", lambda: P.knockout_plot(ko),
                       f"loss {ko.base_loss:.3f} → {ko.top_loss[-1]:.3f} with the busiest "
                       f"{ko.fractions[-1]:.0%} banned; random: {ko.random_loss[-1]:.3f}")

    # routing over training
    log = path / "training_log.json"
    if log.is_file():
        try:
            curves = an.training_curves(log)
        except ValueError as e:
            rep.skipped["training"] = str(e)
        else:
            last = -1
            rep.metrics["training"] = {
                "steps": int(curves.steps.size), "last_step": int(curves.steps[last]),
                "final_loss": float(curves.loss[last]),
                "final_val_loss": float(curves.val_loss[np.isfinite(curves.val_loss)][-1])
                if np.isfinite(curves.val_loss).any() else None,
                "final_cv": dict(zip(map(str, curves.layers), curves.cv[last])),
                "final_router_entropy": dict(zip(map(str, curves.layers),
                                                 curves.router_entropy[last]))}
            rep.figure("training", lambda: P.training_curves_plot(curves))

    # routing stability against intermediate checkpoints
    steps = sorted(p for p in (path / "checkpoints").glob("step-*")
                   if (p / "config.json").is_file())
    if steps:
        stab: dict[str, list[dict[str, Any]]] = {}
        print(f"routing stability against {len(steps)} intermediate checkpoint(s) ...",
              flush=True)
        for sp in steps:
            m = wb.load(sp, backend=args.backend)
            other = _run_all(m, inputs, ["*.moe.topk_indices", "*.moe.router_logits"])
            num = sp.name.split("-")[-1]
            label = f"step {int(num)}" if num.isdigit() else sp.name
            stab[label] = an.routing_stability(other, traces)
        rep.metrics["stability"] = {"reference": "final", "by_checkpoint": stab}
        rep.figure("stability", lambda: P.routing_stability_plot(
            {f"{k} vs final": v for k, v in stab.items()}, experts=cfg.num_local_experts))

    _summary_table(rep, moe)


def _trace_report(rep: _Report, path: Path, args: argparse.Namespace) -> None:
    from .tokenizer import Tokenizer
    from .trace import Trace

    try:
        trace = Trace.load(path)
    except Exception as e:  # not safetensors, or not a workbench trace
        raise _Usage(f"{path}: cannot read as a workbench trace ({e})") from None
    moe = trace.moe_layers
    if not moe:
        raise _Usage(f"{path}: the trace has no MoE routing; capture '*.moe.*'")
    if args.layer is not None and args.layer not in moe:
        raise _Usage(f"--layer {args.layer}: routing not captured there; captured: {moe}")
    layer = args.layer if args.layer is not None else moe[len(moe) // 2]
    tok = None
    for cand in ([args.tokenizer] if args.tokenizer else []) + \
            ([trace.meta["path"]] if trace.meta.get("path") else []):
        try:
            tok = Tokenizer.from_pretrained(cand)
            break
        except (FileNotFoundError, ValueError):
            continue
    if tok is not None and int(trace.input_ids.max()) >= tok.vocab_size:
        tok = None
    categories = tok.categories(trace.input_ids.reshape(-1).tolist()) if tok else None
    rep.metrics["source"] = {"kind": "trace", "path": str(path),
                             "backend": trace.meta.get("backend"),
                             "dtype": trace.meta.get("dtype"), "config": trace.config}
    ids = np.asarray(trace.input_ids)
    rows = ids.reshape(-1, ids.shape[-1]) if ids.ndim > 1 else ids[None]
    rep.metrics["inputs"] = [{"domain": trace.meta.get("domain"), "source": trace.meta.get(
        "source"), "n_tokens": int(r.size), "ids": r.tolist()} for r in rows]
    rep.metrics["layer"] = layer
    rep.summary.append(f"report: trace {path} ({trace.meta.get('backend')}, "
                       f"{trace.meta.get('dtype')}), input {tuple(ids.shape)}, "
                       f"{len(trace)} hooks; single-layer figures at layer {layer}")
    _trace_sections(rep, [trace], layer, tok, categories, args.n_boot)
    _summary_table(rep, moe)


def _domain_metrics(ds: Any) -> dict[str, Any]:
    return {"domains": ds.domains, "js_bits": ds.js, "tokens": ds.tokens, "ratio": ds.ratio}


def _trace_sections(rep: _Report, traces: list[Any], layer: int, tok: Any,
                    categories: list[str] | None, n_boot: int = 200) -> None:
    """Metrics and figures that need only traces (and optionally a tokenizer)."""
    from . import analysis as an
    from . import plots as P

    moe = an.moe_layers(traces)
    has_logits = all(f"layers.{i}.moe.router_logits" in t for t in traces for i in moe)
    has_outs = all(f"layers.{layer}.moe.routed_out" in t and f"layers.{layer}.moe.shared_out"
                   in t for t in traces)
    m = rep.metrics
    load = an.load_matrix(traces, moe)
    m["load"] = {"layers": moe, "matrix": load,
                 "stats": {str(i): an.load_stats(row) for i, row in zip(moe, load)},
                 "capacity_drop_rate_cf1": {str(i): an.capacity_drops(traces, i).drop_rate
                                            for i in moe}}
    if has_logits:
        m["load"]["switch_aux_loss"] = {str(i): an.switch_aux_loss(traces, i) for i in moe}
        m["load"]["router_z_loss"] = {str(i): an.router_z_loss(traces, i) for i in moe}
        m["confidence"] = {str(i): an.confidence_summary(traces, i) for i in moe}
    same = {i: _try(lambda i=i: an.same_expert_rate(traces, i)) for i in moe}
    vocab = {i: _try(lambda i=i: an.vocabulary_specialisation(traces, i, min_count=2))
             for i in moe}
    m["dynamics"] = {
        "same_expert": {str(i): {**asdict(r), "lift": r.lift} for i, r in same.items()
                        if r is not None},
        "cross_layer": an.cross_layer_table(traces, moe),
        "top_paths": [{"path": p, "count": c, "fraction": f}
                      for p, c, f in an.expert_paths(traces, moe, top=10)],
        "path_entropy": an.path_entropy(traces, moe)}
    m["specialisation"] = {
        "vocabulary": {str(i): v.score for i, v in vocab.items() if v is not None},
        "top_tokens": _top_tokens(traces, layer, tok)}
    est = _try(lambda: an.specialisation_estimates(traces if _tagged(traces) else {"all": traces},
                                                   moe, categories, 2, n_boot, n_boot))
    rep.estimates = est or {}
    if est:
        m["specialisation"]["estimates"] = {
            k: {str(i): e.as_dict() for i, e in per.items()} for k, per in est.items()}
    if categories is not None:
        cs = {i: an.category_specialisation(traces, i, categories) for i in moe}
        m["specialisation"]["category"] = {
            str(i): {"nmi": c.nmi, "categories": c.categories, "counts": c.counts}
            for i, c in cs.items()}
    m["experts"] = {}
    if has_outs:
        m["experts"]["routed_share_mean"] = {
            str(i): float(np.nanmean(an.routed_share(traces, i))) for i in moe
            if all(f"layers.{i}.moe.routed_out" in t for t in traces)}
    pl = an.pattern_layers(traces)
    if pl:
        m["attention"] = {"summary": an.attention_summary(traces),
                          "by_type": an.by_layer_type(traces)}

    # figures
    rep.figure("load_heatmap", lambda: P.load_heatmap(traces))
    rep.figure("imbalance", lambda: P.imbalance_bars(traces))
    rep.figure("token_routing_layers", lambda: P.token_routing_layers(traces[0], tokenizer=tok))
    shown: list[str] = []
    for t in traces:
        dom = str(t.meta.get("domain") or "input")
        if dom in shown or len(shown) >= 4:
            continue
        shown.append(dom)
        name = "token_routing" if len({str(x.meta.get("domain")) for x in traces}) == 1 \
            else f"token_routing_{_slug(dom)}"
        rep.figure(name, lambda t=t: P.token_routing_text(t, layer, tokenizer=tok))
    if has_logits:
        rep.figure("margins", lambda: P.margin_histogram(traces))
        rep.figure("gates", lambda: P.gate_histogram(traces))
    rep.figure("same_expert", lambda: P.same_expert_rate_plot(traces))
    rep.figure("run_lengths", lambda: P.run_length_plot(traces, layer))
    if len(moe) > 1:
        nxt = [i for i in moe if i > layer]
        a, b = (layer, nxt[0]) if nxt else (moe[-2], moe[-1])
        rep.figure("transitions", lambda: P.transition_heatmap(traces, a, b))
        rep.figure("expert_flow", lambda: P.expert_flow(traces))
    rep.figure("top_tokens", lambda: P.top_tokens_table(traces, layer, tokenizer=tok))
    if categories is not None:
        e = (rep.estimates.get("category_nmi") or {}).get(layer)
        rep.figure("category_specialisation",
                   lambda: P.category_heatmap(traces, layer, categories, n_boot=n_boot,
                                              n_shuffle=n_boot),
                   f"layer {layer} NMI {e.text()} (labels shuffled)" if e else "")
    rep.figure("load_by_position", lambda: P.load_by_position_frequency(traces, layer))
    if has_outs:
        rep.figure("routed_share", lambda: P.routed_share_plot(traces))
    rep.figure("capacity", lambda: P.capacity_plot(traces))
    for i in pl:
        rep.figure(f"attention_L{i}", lambda i=i: P.attention_pattern(
            traces[0], i, tokenizer=tok))
    if pl:
        rep.figure("attention_by_type", lambda: P.attention_by_layer_type(traces))


def _tagged(traces: list[Any]) -> bool:
    """Every trace carries meta['domain'] and there are two or more domains."""
    doms = {t.meta.get("domain") for t in traces}
    return None not in doms and len(doms) > 1


def _try(fn: Callable[[], Any]) -> Any:
    """``fn()``, or None when the data does not allow it (ValueError)."""
    try:
        return fn()
    except ValueError:
        return None


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)[:40] or "input"


def _top_tokens(traces: list[Any], layer: int, tok: Any, n: int = 8) -> dict[str, Any]:
    from . import analysis as an
    top = an.top_tokens_per_expert(traces, layer, n=n)
    ids = sorted({t for row in top for t, _, _ in row})
    names = dict(zip(ids, tok.token_strings(ids))) if tok is not None and ids else {}
    return {"layer": layer, "experts": {
        str(e): [{"id": t, "token": names.get(t), "count": c, "share": s} for t, c, s in row]
        for e, row in enumerate(top)}}


def _summary_table(rep: _Report, moe: list[int]) -> None:
    m = rep.metrics
    rep.summary.append(f"{'MoE layer':>9s} {'CV':>6s} {'max/mean':>8s} {'H/logE':>7s} "
                       f"{'near-tie':>8s} {'same-expert':>11s} {'x chance':>8s}")
    for i in moe:
        s = m["load"]["stats"][str(i)]
        c = m.get("confidence", {}).get(str(i))
        d = m["dynamics"]["same_expert"].get(str(i))
        nt = f"{c['near_tie_fraction']:8.1%}" if c else f"{'-':>8s}"
        se = f"{d['top1']:11.1%} {d['lift']:8.2f}" if d else f"{'-':>11s} {'-':>8s}"
        rep.summary.append(f"{i:9d} {s['cv']:6.2f} {s['max_over_mean']:8.2f} "
                           f"{s['entropy_norm']:7.2f} {nt} {se}")
    if "causal" in m:
        rows = m["causal"]["rows"]
        best = max(rows, key=lambda r: r["delta_loss"])
        rep.summary.append(f"ablation at layer {m['causal']['layer']}: largest Δloss "
                           f"{best['delta_loss']:+.3f} nats (expert {best['expert']}, "
                           f"{best['domain']})")
