"""Shared by the expert-parallel tests (and their worker subprocesses): one run of a reference
model and an expert-parallel one, compared hook by hook."""

from __future__ import annotations

import numpy as np


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference relative to b's largest magnitude (float64)."""
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def compare_runs(ref, ep, ids: np.ndarray, interventions: list,
                 capture: object = "*") -> tuple[dict, object, object, list[str]]:
    """Runs both models; the summary (worst relative error over logits and float hooks, hook
    count, identical routing), both outputs and the routing hook names."""
    a = ref.run(ids, capture=capture, interventions=interventions)
    b = ep.run(ids, capture=capture, interventions=interventions)
    assert set(a.trace) == set(b.trace)
    worst = rel(b.logits, a.logits)
    for n in a.trace:
        assert a.trace[n].shape == b.trace[n].shape, n
        if a.trace[n].dtype.kind == "f":
            worst = max(worst, rel(b.trace[n], a.trace[n]))
    idx = sorted(n for n in a.trace if n.endswith("moe.topk_indices"))
    summary = {"worst_rel": worst, "hooks": len(a.trace),
               "routing_equal": all(np.array_equal(a.trace[n], b.trace[n]) for n in idx)}
    return summary, a, b, idx
