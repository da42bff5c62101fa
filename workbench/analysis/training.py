"""Routing over training (from a training log) and routing stability between runs.

Training log schema (``workbench-training-log/1``): one JSON object, written by the training
script and read by :func:`load_training_log`::

    {
      "schema": "workbench-training-log/1",      # optional; this exact string when present
      "meta": {...},                              # optional, free-form (config, corpus, ...)
      "steps": [                                  # in increasing step order
        {
          "step": 100,                            # int, optimiser steps taken
          "loss": 3.21,                           # float, training loss at this step (nats)
          "val_loss": 3.40,                       # float or null (not evaluated this step)
          "expert_load": {                        # MoE layer index (JSON string key) ->
            "0": [0.07, 0.06, ...],               #   load fractions of the E experts, all top-k
            "1": [...]                            #   assignments counted, summing to 1
          },
          "router_entropy": {"0": 2.61, "1": 2.55}  # MoE layer -> mean per-token
        }                                           #   sigmoid-normalised routing entropy (nats)
      ]
    }

``expert_load`` fractions are f_e = c_e / (k·N) over the tokens the step measured (as
:func:`~workbench.analysis.load.expert_load`); ``router_entropy`` is the mean of
:func:`~workbench.analysis.confidence.routing_entropy` (p_e = σ(z_e) / Σ_j σ(z_j)) and may be
``{}`` or absent. Use :func:`training_log_entry` (or :func:`training_log_entry_from_trace`) to
build a step and :func:`new_training_log` for the top-level object, so the file matches exactly.

Stability: :func:`routing_stability` compares the routing of two sets of traces of the same
input (two checkpoints, two backends, two dtypes): per token Jaccard J = |S∩S'| / |S∪S'| of the
chosen expert sets, top-1 agreement, saturation |S∩S'| / k, and how many top-1 disagreements
sit at near-ties (router-logit margin below eps in either run).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ..trace import Trace
from ._common import Traces, as_list, indices, moe_layers
from .confidence import NEAR_TIE_EPS, logit_margin, routing_entropy
from .load import effective_experts, expert_load, load_cv, load_entropy, max_over_mean

SCHEMA = "workbench-training-log/1"


def new_training_log(meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An empty training log: {"schema": SCHEMA, "meta": meta, "steps": []}."""
    return {"schema": SCHEMA, "meta": dict(meta or {}), "steps": []}


def _fraction_list(v: ArrayLike, where: str) -> list[float]:
    f = np.asarray(v, dtype=np.float64)
    if f.ndim != 1 or f.size == 0:
        raise ValueError(f"{where}: expert_load must be a list of E fractions, got shape "
                         f"{f.shape}")
    if not np.all(np.isfinite(f)) or np.any(f < 0):
        raise ValueError(f"{where}: expert_load has negative or non-finite values")
    if abs(f.sum() - 1.0) > 1e-3:
        raise ValueError(f"{where}: expert_load sums to {f.sum():.6g}, not 1 (log fractions "
                         "c_e / (k·N), not counts)")
    return [float(x) for x in f]


def training_log_entry(step: int, loss: float, expert_load: Mapping[int | str, ArrayLike],
                       router_entropy: Mapping[int | str, float] | None = None,
                       val_loss: float | None = None) -> dict[str, Any]:
    """One ``steps`` entry of the schema, validated and JSON-able (layer keys as strings)."""
    where = f"step {step}"
    loads = {str(int(k)): _fraction_list(v, f"{where}, layer {k}")
             for k, v in expert_load.items()}
    ents = {str(int(k)): float(v) for k, v in (router_entropy or {}).items()}
    return {"step": int(step), "loss": float(loss),
            "val_loss": None if val_loss is None else float(val_loss),
            "expert_load": loads, "router_entropy": ents}


def training_log_entry_from_trace(trace: Traces, step: int, loss: float,
                                  val_loss: float | None = None) -> dict[str, Any]:
    """A ``steps`` entry measured on traces: load of every captured MoE layer and, where
    ``router_logits`` were captured, the mean sigmoid-normalised routing entropy."""
    ts = as_list(trace)
    layers = moe_layers(ts)
    if not layers:
        raise ValueError("training_log_entry_from_trace: no MoE routing captured; capture "
                         "'*.moe.topk_indices' and '*.moe.router_logits'")
    loads = {i: expert_load(ts, i) for i in layers}
    ents = {i: float(routing_entropy(ts, i).mean()) for i in layers
            if all(f"layers.{i}.moe.router_logits" in t for t in ts)}
    return training_log_entry(step, loss, loads, ents, val_loss)


def validate_training_log(log: Mapping[str, Any]) -> dict[str, Any]:
    """Check a log against the schema; returns it with layer keys as ints and loads as float64
    arrays. Raises ValueError naming the offending step and field."""
    if not isinstance(log, Mapping) or "steps" not in log:
        raise ValueError("training log must be a JSON object with a 'steps' list")
    if "schema" in log and log["schema"] != SCHEMA:
        raise ValueError(f"training log schema {log['schema']!r} is not {SCHEMA!r}")
    steps = log["steps"]
    if not isinstance(steps, list):
        raise ValueError("training log 'steps' must be a list")
    out = []
    last = -math.inf
    for n, s in enumerate(steps):
        where = f"steps[{n}]"
        if not isinstance(s, Mapping):
            raise ValueError(f"{where}: must be an object")
        for key in ("step", "loss", "expert_load"):
            if key not in s:
                raise ValueError(f"{where}: missing {key!r}")
        if not isinstance(s["step"], int) or isinstance(s["step"], bool):
            raise ValueError(f"{where}: 'step' must be an int, got {s['step']!r}")
        if s["step"] <= last:
            raise ValueError(f"{where}: steps must increase ({s['step']} after {last})")
        last = s["step"]
        if not isinstance(s["expert_load"], Mapping):
            raise ValueError(f"{where}: 'expert_load' must map layer -> fractions")
        try:
            loads = {int(k): np.asarray(_fraction_list(v, f"{where}, layer {k}"))
                     for k, v in s["expert_load"].items()}
            ents = {int(k): float(v) for k, v in (s.get("router_entropy") or {}).items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
        val = s.get("val_loss")
        out.append({"step": s["step"], "loss": float(s["loss"]),
                    "val_loss": None if val is None else float(val),
                    "expert_load": loads, "router_entropy": ents})
    return {"schema": SCHEMA, "meta": dict(log.get("meta") or {}), "steps": out}


def load_training_log(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read (a path to a JSON file) or take (a dict) a training log and validate it."""
    if isinstance(source, Mapping):
        return validate_training_log(source)
    with open(source, encoding="utf-8") as fh:
        return validate_training_log(json.load(fh))


@dataclass(frozen=True)
class TrainingCurves:
    """Per-step routing metrics from a training log (S steps, L layers, E experts).

    steps, loss, val_loss (NaN where not evaluated): (S,); load: (S, L, E) (NaN where a step
    lacks the layer); cv, max_over_mean, entropy_norm (load entropy / log E),
    effective_experts, router_entropy (NaN where not logged): (S, L).
    """

    steps: np.ndarray
    loss: np.ndarray
    val_loss: np.ndarray
    layers: list[int]
    load: np.ndarray
    cv: np.ndarray
    max_over_mean: np.ndarray
    entropy_norm: np.ndarray
    effective_experts: np.ndarray
    router_entropy: np.ndarray


def training_curves(log: str | os.PathLike | Mapping[str, Any]) -> TrainingCurves:
    """Load CV, max/mean, normalised load entropy, effective experts and router entropy at
    every logged step (same formulas as :mod:`workbench.analysis.load`)."""
    lg = load_training_log(log)
    steps = lg["steps"]
    if not steps:
        raise ValueError("training log has no steps")
    layers = sorted({i for s in steps for i in s["expert_load"]})
    widths = {v.size for s in steps for v in s["expert_load"].values()}
    if len(widths) > 1:
        raise ValueError(f"training log: expert_load lists have different lengths {widths}")
    E = widths.pop() if widths else 0
    S, L = len(steps), len(layers)
    load = np.full((S, L, E), np.nan)
    ent = np.full((S, L), np.nan)
    for a, s in enumerate(steps):
        for b, i in enumerate(layers):
            if i in s["expert_load"]:
                load[a, b] = s["expert_load"][i]
            if i in s["router_entropy"]:
                ent[a, b] = s["router_entropy"][i]
    with np.errstate(invalid="ignore"):
        cv = np.asarray(load_cv(load)) if E else np.full((S, L), np.nan)
        mom = np.asarray(max_over_mean(load)) if E else np.full((S, L), np.nan)
        hn = np.asarray(load_entropy(load, normalised=True)) if E else np.full((S, L), np.nan)
        eff = np.asarray(effective_experts(load)) if E else np.full((S, L), np.nan)
    missing = np.isnan(load).any(axis=-1) if E else np.ones((S, L), dtype=bool)
    for arr in (cv, mom, hn, eff):
        arr[missing] = np.nan
    return TrainingCurves(
        np.array([s["step"] for s in steps]), np.array([s["loss"] for s in steps]),
        np.array([np.nan if s["val_loss"] is None else s["val_loss"] for s in steps]),
        layers, load, cv.reshape(S, L), mom.reshape(S, L), hn.reshape(S, L),
        eff.reshape(S, L), ent)


# --------------------------------------------------------------------------- stability
def _paired(a: Traces, b: Traces) -> tuple[list[Trace], list[Trace]]:
    ta, tb = as_list(a), as_list(b)
    if len(ta) != len(tb):
        raise ValueError(f"routing stability compares paired traces: got {len(ta)} and "
                         f"{len(tb)}")
    for n, (x, y) in enumerate(zip(ta, tb)):
        if x.input_ids.shape != y.input_ids.shape or not np.array_equal(x.input_ids,
                                                                        y.input_ids):
            raise ValueError(f"trace pair {n}: the two runs saw different input_ids; compare "
                             "runs on the same input")
    return ta, tb


def _overlap(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token |S ∩ S'| and |S ∪ S'| of two (N, k) index arrays."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"routing comparison: {x.shape[0]} vs {y.shape[0]} tokens")
    E = int(max(x.max(initial=0), y.max(initial=0))) + 1
    rows = np.arange(x.shape[0])[:, None]
    sa = np.zeros((x.shape[0], E), dtype=bool)
    sb = np.zeros_like(sa)
    sa[rows, x] = True
    sb[rows, y] = True
    return (sa & sb).sum(axis=1), (sa | sb).sum(axis=1)


def routing_jaccard(a: Traces, b: Traces, layer: int) -> np.ndarray:
    """Per-token Jaccard J_t = |S_t ∩ S'_t| / |S_t ∪ S'_t| of the chosen expert sets of two
    runs on the same input, (N,) (1 = same experts; for top-1, 1[e = e'])."""
    ta, tb = _paired(a, b)
    inter, union = _overlap(indices(ta, layer, "routing_jaccard"),
                            indices(tb, layer, "routing_jaccard"))
    return inter / np.maximum(union, 1)


def routing_disagreement(a: Traces, b: Traces, layer: int) -> np.ndarray:
    """Boolean (N,) per token: the first-choice (top-1) experts of the two runs differ."""
    ta, tb = _paired(a, b)
    return indices(ta, layer, "routing_disagreement")[:, 0] != \
        indices(tb, layer, "routing_disagreement")[:, 0]


def routing_stability(a: Traces, b: Traces, layers: Sequence[int] | None = None,
                      eps: float = NEAR_TIE_EPS) -> list[dict[str, Any]]:
    """Per layer: jaccard (mean J), top1_agreement, saturation (mean |S∩S'| / k), tokens,
    top1_disagreements, and near_tie_disagreements (those with a top-1/top-2 router-logit
    margin below ``eps`` in either run; None when neither run captured router_logits)."""
    ta, tb = _paired(a, b)
    if layers is None:
        layers = sorted(set(moe_layers(ta)) & set(moe_layers(tb)))
    rows = []
    for i in layers:
        x = indices(ta, i, "routing_stability")
        y = indices(tb, i, "routing_stability")
        inter, union = _overlap(x, y)
        j = inter / np.maximum(union, 1)
        k = max(x.shape[1], y.shape[1])
        dis = x[:, 0] != y[:, 0]
        near = None
        tie = np.zeros(dis.shape, dtype=bool)
        have = False
        for ts in (ta, tb):
            if all(f"layers.{i}.moe.router_logits" in t for t in ts):
                tie |= logit_margin(ts, i) < eps
                have = True
        if have:
            near = int(np.sum(dis & tie))
        rows.append({"layer": i, "jaccard": float(j.mean()),
                     "top1_agreement": float(1.0 - dis.mean()),
                     "saturation": float(inter.mean() / k), "tokens": int(dis.size),
                     "top1_disagreements": int(dis.sum()),
                     "near_tie_disagreements": near})
    return rows
