"""Cross-checks between two models on the same weights: PyTorch vs JAX, or fp32 vs bf16.

``compare`` runs both on the same ids with every hook captured and reports, per hook, the
largest absolute and relative error (relative = max|a-b| / max|b|, the quantity the tolerance
bounds: ``FP32_TOL`` when both models run in float32, ``BF16_TOL`` otherwise), per MoE
layer the routing agreement, and every token whose expert choice differs, with its top-1/top-2
router margin in both models. Top-k routing is discontinuous: a flip at a near-tie is expected
rounding, a flip at a wide margin is a bug. Positions downstream of a flip (same row, later or
equal position, later hooks) are excluded from the error of later hooks and counted separately,
so one flip does not hide or fake an error elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .hooks import HookName, parse, relative, seq_axis
from .model import Model

FP32_TOL = 2e-4
BF16_TOL = 5e-2
FP32_NEAR_TIE = 1e-3
BF16_NEAR_TIE = 5e-2


@dataclass
class HookDiff:
    """How far one hook differs between the two models."""

    name: str
    layer: int | None
    max_abs: float
    rel: float
    excluded: int  # values excluded as downstream of a routing flip (all: max_abs/rel are NaN)
    ok: bool


@dataclass
class Flip:
    layer: int
    batch: int
    position: int
    token: int
    experts_a: list[int]
    experts_b: list[int]
    margin_a: float  # top-1 minus top-2 router logit in model a
    margin_b: float
    logit_error: float  # max |router_logits_a - router_logits_b| at this token
    near_tie: bool
    downstream: bool = False  # at/after an earlier layer's flip in the same row: a consequence


@dataclass
class LayerRouting:
    layer: int
    tokens: int
    top1_agreement: float
    set_agreement: float
    flips: int
    near_tie_flips: int


@dataclass
class FlipStats:
    """What changing a model (e.g. quantising it) does to its routing, token by token.

    Per MoE layer (``layers``): the fraction of tokens whose top-1 expert changed
    (``flip_fraction``), model a's top-1/top-2 router margins at those tokens
    (``flip_margins``) and at every token (``margins``). ``downstream[i][j]`` (j > i) is the
    probability that a token flipped at layer j given it flipped at layer i, against the
    base rate ``flip_fraction[j]``: ``lift[i][j]`` > 1 means a flip at layer i predicts flips
    downstream. ``kl``: per token KL(a || b) of the next-token distributions (nats).
    """

    layers: list[int]
    flip_fraction: list[float]
    flip_margins: list[list[float]]
    margins: list[list[float]]
    downstream: list[list[float]]
    kl: list[float]

    @property
    def lift(self) -> list[list[float]]:
        """downstream[i][j] / flip_fraction[j] (NaN where undefined)."""
        return [[d / f if f > 0 and d == d else float("nan")
                 for d, f in zip(row, self.flip_fraction)] for row in self.downstream]

    def summary(self) -> str:
        """A text table: per layer flip fraction, median margins, downstream lift; KL."""
        lines = [f"{'MoE layer':>9s} {'top-1 flips':>11s} {'median margin flipped':>22s} "
                 f"{'all':>8s} {'next-layer lift':>15s}"]
        lift = self.lift
        for r, layer in enumerate(self.layers):
            fm = np.median(self.flip_margins[r]) if self.flip_margins[r] else float("nan")
            nxt = lift[r][r + 1] if r + 1 < len(self.layers) else float("nan")
            lines.append(f"{layer:9d} {self.flip_fraction[r]:11.2%} {fm:22.3e} "
                         f"{np.median(self.margins[r]):8.3e} {nxt:15.2f}")
        kl = np.asarray(self.kl)
        lines.append(f"next-token KL: mean {kl.mean():.3e}, p95 {np.quantile(kl, 0.95):.3e}, "
                     f"max {kl.max():.3e} nats")
        return "\n".join(lines)


def flip_stats(trace_a: Any, trace_b: Any, logits_a: np.ndarray,
               logits_b: np.ndarray, kl: np.ndarray | None = None) -> FlipStats:
    """Routing flips between two traces of the same ids holding ``*.moe.router_logits`` and
    ``*.moe.topk_indices``, and the KL of their logits (B, T, V) (``kl``: already computed
    by :func:`next_token_kl`). Numpy only."""
    layers = sorted({int(n.split(".")[1]) for n in trace_a
                     if n.endswith(".moe.topk_indices") and n in trace_b})
    flips, frac, fmar, mar = [], [], [], []
    for layer in layers:
        ia = trace_a[f"layers.{layer}.moe.topk_indices"][..., 0]
        ib = trace_b[f"layers.{layer}.moe.topk_indices"][..., 0]
        m = margins(trace_a[f"layers.{layer}.moe.router_logits"]).reshape(-1)
        f = (ia != ib).reshape(-1)
        flips.append(f)
        frac.append(float(f.mean()))
        fmar.append(m[f].tolist())
        mar.append(m.tolist())
    nan = float("nan")
    down = [[float(flips[j][flips[i]].mean()) if j > i and flips[i].any() else nan
             for j in range(len(layers))] for i in range(len(layers))]
    if kl is None:
        kl = next_token_kl(logits_a, logits_b)
    return FlipStats(layers, frac, fmar, mar, down, np.asarray(kl).reshape(-1).tolist())


def next_token_kl(logits_a: np.ndarray, logits_b: np.ndarray, rows: int = 1024) -> np.ndarray:
    """Per-token KL(a || b) of the next-token distributions of two logits arrays (..., V),
    in float64 from log-softmaxes, ``rows`` tokens at a time (bounded memory); shape (...)."""
    a = np.asarray(logits_a)
    b = np.asarray(logits_b)
    if a.shape != b.shape:
        raise ValueError(f"next_token_kl: logits of shapes {a.shape} and {b.shape}")
    fa, fb = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    out = np.empty(fa.shape[0], np.float64)
    for i in range(0, fa.shape[0], rows):
        la = _log_softmax(fa[i:i + rows].astype(np.float64))
        lb = _log_softmax(fb[i:i + rows].astype(np.float64))
        out[i:i + rows] = np.sum(np.exp(la) * (la - lb), -1)
    return out.reshape(a.shape[:-1])


@dataclass
class ParityReport:
    label_a: str
    label_b: str
    tol: float
    near_tie: float
    hooks: list[HookDiff] = field(default_factory=list)
    routing: list[LayerRouting] = field(default_factory=list)
    flips: list[Flip] = field(default_factory=list)
    logits_kl: float = 0.0  # mean per-token KL(a || b) of next-token distributions
    next_token_agreement: float = 1.0
    flip_stats: FlipStats | None = None  # top-1 flips, margins, downstream lift, KL per token

    @property
    def all_flips_near_ties(self) -> bool:
        """Every flip not caused by an earlier flip sits at a near-tie."""
        return all(f.near_tie or f.downstream for f in self.flips)

    @property
    def ok(self) -> bool:
        """Every hook within tolerance (flip-downstream values excluded), every flip a near-tie."""
        return all(h.ok for h in self.hooks) and self.all_flips_near_ties

    @property
    def worst(self) -> HookDiff | None:
        return max((h for h in self.hooks if h.rel == h.rel), key=lambda h: h.rel, default=None)

    def summary(self, max_rows: int = 60) -> str:
        """A text table: hooks (worst first when long), routing per layer, flips."""
        lines = [f"parity: {self.label_a}  vs  {self.label_b}   (tolerance {self.tol:g} relative, "
                 f"near-tie margin {self.near_tie:g})"]
        hooks = self.hooks
        if len(hooks) > max_rows:
            hooks = sorted(hooks, key=lambda h: -h.rel if h.rel == h.rel else 0.0)[:max_rows]
            lines.append(f"{len(self.hooks)} hooks; the {max_rows} worst:")
        lines.append(f"{'hook':40s} {'max |Δ|':>10s} {'rel':>10s} {'excluded':>8s}  ok")
        for h in hooks:
            if h.rel != h.rel:
                lines.append(f"{h.name:40s} {'—':>10s} {'—':>10s} {h.excluded:8d}  all values "
                             "downstream of a flip")
                continue
            lines.append(f"{h.name:40s} {h.max_abs:10.3e} {h.rel:10.3e} {h.excluded:8d}  "
                         f"{'yes' if h.ok else 'NO'}")
        if self.routing:
            lines.append("")
            lines.append(f"{'MoE layer':>9s} {'tokens':>7s} {'top-1 agree':>11s} "
                         f"{'set agree':>9s} {'flips':>5s} {'near-tie':>8s}")
            for r in self.routing:
                lines.append(f"{r.layer:9d} {r.tokens:7d} {r.top1_agreement:11.2%} "
                             f"{r.set_agreement:9.2%} {r.flips:5d} {r.near_tie_flips:8d}")
        if self.flips:
            lines.append("")
            lines.append("routing flips (layer, batch, position, token: experts a -> b, margins)")
            for f in self.flips[:20]:
                lines.append(f"  L{f.layer} b{f.batch} t{f.position} id {f.token}: "
                             f"{f.experts_a} -> {f.experts_b}  margin {f.margin_a:.2e} / "
                             f"{f.margin_b:.2e}  " + ("near-tie" if f.near_tie else
                                                      "downstream of a flip" if f.downstream
                                                      else "WIDE MARGIN"))
            if len(self.flips) > 20:
                lines.append(f"  ... {len(self.flips) - 20} more")
        lines.append("")
        lines.append(f"next-token agreement {self.next_token_agreement:.2%}, mean KL "
                     f"{self.logits_kl:.3e}")
        verdict = "OK" if self.ok else "OUT OF TOLERANCE"
        if self.flips and self.ok:
            verdict += f" ({len(self.flips)} flip(s), all at near-ties)"
        lines.append(f"verdict: {verdict}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["all_flips_near_ties"] = self.all_flips_near_ties
        return d

    def records(self) -> list[dict[str, Any]]:
        """One row per hook (name, layer, kind, max_abs, rel, ok) for plots."""
        out = []
        for h in self.hooks:
            out.append({"name": h.name, "layer": h.layer, "kind": relative(h.name),
                        "max_abs": h.max_abs,
                        "rel": h.rel, "ok": h.ok})
        return out


def margins(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 router logit per token: (..., E) -> (...)."""
    s = np.sort(logits.astype(np.float64), axis=-1)
    return s[..., -1] - s[..., -2]


def _tolerance(x: Any, name: str) -> float:
    """A tolerance: a finite number >= 0 (NaN would make every comparison pass or fail)."""
    if isinstance(x, bool | np.bool_) or not isinstance(x, int | float | np.integer | np.floating):
        raise ValueError(f"compare: {name} must be a number, got {type(x).__name__} {x!r}")
    x = float(x)
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"compare: {name} must be a finite number >= 0, got {x}")
    return x


def compare(model_a: Model, model_b: Model, input_ids: Any, capture: Any = "*",
            tol: float | None = None, near_tie: float | None = None,
            interventions: Any = None) -> ParityReport:
    """Run both models on ``input_ids`` and report where and why they differ."""
    if model_a.config.summary() != model_b.config.summary():
        raise ValueError("compare: the two models have different configs")
    both32 = model_a.dtype == "float32" and model_b.dtype == "float32"
    tol = (FP32_TOL if both32 else BF16_TOL) if tol is None else _tolerance(tol, "tol")
    near_tie = (FP32_NEAR_TIE if both32 else BF16_NEAR_TIE) if near_tie is None \
        else _tolerance(near_tie, "near_tie")
    cap = [capture] if isinstance(capture, str) else list(capture)
    needed = ["*.moe.router_logits", "*.moe.topk_indices"]
    ids = model_a.check_ids(input_ids)
    out_a = model_a.run(ids, capture=cap + needed, interventions=interventions)
    out_b = model_b.run(ids, capture=cap + needed, interventions=interventions)
    ta, tb = out_a.trace, out_b.trace
    rep = ParityReport(_label(model_a), _label(model_b), tol, near_tie)
    B, T = ids.shape
    # routing and the first flip per row: taint[(layer)] -> per row, first tainted position
    first_flip = np.full((model_a.config.num_hidden_layers + 1, B), T, dtype=np.int64)
    seen = np.full(B, T, dtype=np.int64)  # first flipped position per row, earlier layers
    for layer in model_a.config.moe_layers:
        ia = ta[f"layers.{layer}.moe.topk_indices"]
        ib = tb[f"layers.{layer}.moe.topk_indices"]
        la = ta[f"layers.{layer}.moe.router_logits"]
        lb = tb[f"layers.{layer}.moe.router_logits"]
        same_set = np.sort(ia, -1) == np.sort(ib, -1)
        set_ok = same_set.all(-1)
        top1_ok = ia[..., 0] == ib[..., 0]
        ma, mb = margins(la), margins(lb)
        flips = 0
        near = 0
        for b, t in np.argwhere(~set_ok):
            err = float(np.abs(la[b, t].astype(np.float64) - lb[b, t]).max())
            # a flip is a near-tie if, in either model, the choice was within eps
            nt = _near_tie(la[b, t], lb[b, t], ia.shape[-1], near_tie)
            rep.flips.append(Flip(layer, int(b), int(t), int(ids[b, t]), ia[b, t].tolist(),
                                  ib[b, t].tolist(), float(ma[b, t]), float(mb[b, t]), err, nt,
                                  bool(t >= seen[b])))
            flips += 1
            near += nt
            first_flip[layer, b] = min(first_flip[layer, b], t)
        seen = np.minimum(seen, first_flip[layer])
        rep.routing.append(LayerRouting(layer, B * T, float(top1_ok.mean()),
                                        float(set_ok.mean()), flips, near))
    # a flip at layer i taints later layers too
    taint = np.minimum.accumulate(first_flip, axis=0)
    for name in ta:
        if name not in tb:
            continue
        hook = parse(name)
        if (hook.block, hook.site) == ("moe", "topk_indices"):
            continue
        a, b = ta[name].astype(np.float64), tb[name].astype(np.float64)
        layer = hook.layer
        row = taint[layer if layer is not None else -1]
        if name == "embed":
            row = np.full(B, T)
        elif layer is not None and not _after_routing(hook):
            row = taint[layer - 1] if layer > 0 else np.full(B, T)
        ax = seq_axis(name)
        pos = np.arange(a.shape[ax])
        shape = [1] * a.ndim
        shape[0], shape[ax] = B, a.shape[ax]
        keep = (pos[None, :] < row[:, None]).reshape(shape)
        keep = np.broadcast_to(keep, a.shape)
        excluded = int((~keep).sum())
        if excluded == a.size:
            # every value sits downstream of a flip: nothing comparable, say so (NaN, not 0)
            rep.hooks.append(HookDiff(name, layer, float("nan"), float("nan"), excluded, True))
            continue
        diff = np.where(keep, np.abs(a - b), 0.0)
        ref = np.where(keep, np.abs(b), 0.0)
        max_abs = float(diff.max()) if diff.size else 0.0
        denom = float(ref.max()) if ref.size else 0.0
        rel = max_abs / denom if denom > 0 else max_abs
        rep.hooks.append(HookDiff(name, layer, max_abs, rel, excluded, rel <= tol))
    la, lb = out_a.logits, out_b.logits
    kl = next_token_kl(la, lb)
    rep.logits_kl = float(np.mean(kl))
    rep.next_token_agreement = float(np.mean(la.argmax(-1) == lb.argmax(-1)))
    rep.flip_stats = flip_stats(ta, tb, la, lb, kl)
    return rep


def _label(model: Model) -> str:
    """backend/dtype, plus the FP8 mode of a quantised checkpoint (``+fp8-w8a8``)."""
    quant = getattr(model, "quant", None)
    return f"{model.backend}/{model.dtype}" + (f"+fp8-{quant}" if quant else "")


def _after_routing(hook: HookName) -> bool:
    """Hooks of a layer that a routing flip in the same layer can change."""
    return (hook.block, hook.site) in (("moe", "routed_out"), ("moe", "topk_scores"),
                                       (None, "resid_post"))


def _near_tie(la: np.ndarray, lb: np.ndarray, k: int, eps: float) -> bool:
    """True if, in either model, the k-th and (k+1)-th best logits are within eps.

    For k = 1 that is the top-1/top-2 margin; for k > 1 the set changes only at the boundary.
    """
    for lg in (la, lb):
        s = np.sort(lg.astype(np.float64))[::-1]
        if len(s) > k and s[k - 1] - s[k] <= eps:
            return True
    return False


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
