"""Uncertainty for specialisation numbers: shuffle baselines and bootstrap intervals.

Every estimate here is a :class:`Estimate`: the value on the data, a bootstrap confidence
interval over documents (each batch row of each trace is one document, resampled with
replacement; domains resampled separately), a shuffle baseline (the same statistic after
permuting the labels that carry the claim, which destroys the association but keeps every
marginal) with its 95% range, a one-sided permutation p-value, and the token and document counts.

Resampling duplicates documents, which inflates plug-in divergences and scores, so the
interval is the bootstrap distribution's 2.5-97.5% spread placed around the value
(``value + q - mean(boot)``), not its raw percentiles. The shuffle baseline is the value
the statistic takes with no association at all at this sample size: plug-in JS, NMI and VS
are all positive on finite samples, so compare against it, not against 0.

- Domain JS: mean over domains of JS(f^D ‖ f^all) in bits; baseline: domain labels permuted
  across documents.
- Category NMI: NMI(E; C) over assignments; baseline: category labels permuted across token
  ids when every id has one category (as tokenizer categories do: a token's routing depends
  on its id, so permuting single tokens would understate the null), else across tokens.
- Vocabulary specialisation: the frequency-weighted VS score; baseline: expert choices
  permuted across tokens (token counts and expert load kept).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ._common import (
    Traces,
    as_list,
    flat_labels,
    nmi_from_joint,
    num_experts,
    row_ids,
    rows,
    token_ids,
)
from .specialisation import DomainTraces, group_by_domain, js_divergence

#: Default numbers of bootstrap resamples and label shuffles.
N_BOOT = 200
N_SHUFFLE = 200


@dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap interval and shuffle baseline (see module doc)."""

    value: float
    ci_low: float
    ci_high: float
    baseline: float
    baseline_low: float
    baseline_high: float
    p_value: float
    n_tokens: int
    n_docs: int

    @property
    def ci(self) -> tuple[float, float]:
        return self.ci_low, self.ci_high

    @property
    def above_baseline(self) -> bool:
        """True when the interval lies above the baseline's 95% range."""
        return self.ci_low > self.baseline_high

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self, fmt: str = "{:.3f}") -> str:
        """``0.123 [0.101, 0.140], shuffled 0.010``."""
        f = fmt.format
        return f"{f(self.value)} [{f(self.ci_low)}, {f(self.ci_high)}], shuffled {f(self.baseline)}"


def estimate(value: float, resampled: Callable[[np.random.Generator], float],
             shuffled: Callable[[np.random.Generator], float], n_tokens: int, n_docs: int,
             n_boot: int = N_BOOT, n_shuffle: int = N_SHUFFLE, seed: int = 0,
             level: float = 0.95) -> Estimate:
    """An :class:`Estimate` of ``value`` from ``resampled(rng)`` (the statistic on one
    bootstrap resample of the documents) and ``shuffled(rng)`` (on one label permutation)."""
    if n_boot < 1 or n_shuffle < 1:
        raise ValueError(f"n_boot and n_shuffle must be >= 1, got {n_boot}, {n_shuffle}")
    rng = np.random.default_rng(seed)
    boots = np.array([resampled(rng) for _ in range(n_boot)], dtype=np.float64)
    null = np.array([shuffled(rng) for _ in range(n_shuffle)], dtype=np.float64)
    a = (1 - level) / 2
    ok = boots[np.isfinite(boots)]
    if ok.size:
        q_lo, q_hi = np.quantile(ok, [a, 1 - a])
        lo, hi = value + q_lo - ok.mean(), value + q_hi - ok.mean()
    else:
        lo = hi = float("nan")
    nlo, nhi = np.quantile(null, [a, 1 - a])
    p = (1 + int(np.sum(null >= value))) / (1 + null.size)
    return Estimate(float(value), float(lo), float(hi), float(null.mean()), float(nlo),
                    float(nhi), float(p), int(n_tokens), int(n_docs))


def _docs(traces: Traces, layer: int, what: str) -> list[np.ndarray]:
    """Each document's chosen experts (T, k), documents = batch rows of every trace (their
    real tokens: pads left out)."""
    return rows(traces, layer, what)


def domain_js_estimate(traces: DomainTraces, layer: int, n_boot: int = N_BOOT,
                       n_shuffle: int = N_SHUFFLE, seed: int = 0) -> Estimate:
    """Mean over domains of JS(f^D ‖ f^all) (bits) with its bootstrap interval over documents
    (resampled within each domain) and the domain-label shuffle baseline."""
    groups = group_by_domain(traces)
    if len(groups) < 2:
        raise ValueError(f"domain_js_estimate needs two or more domains, got {list(groups)}")
    E = num_experts([t for ts in groups.values() for t in ts], layer)
    counts, labels = [], []
    for d, ts in enumerate(groups.values()):
        for doc in _docs(ts, layer, "domain_js_estimate"):
            counts.append(np.bincount(doc.ravel(), minlength=E)[:E])
            labels.append(d)
    C = np.stack(counts).astype(np.float64)
    lab = np.asarray(labels)
    D = len(groups)
    members = [np.flatnonzero(lab == d) for d in range(D)]
    n_tokens = int(sum(doc.shape[0] for ts in groups.values()
                       for doc in _docs(ts, layer, "domain_js_estimate")))

    def js_of(rows: np.ndarray, labs: np.ndarray) -> float:
        per = np.stack([C[rows[labs == d]].sum(axis=0) for d in range(D)])
        if np.any(per.sum(axis=1) == 0):
            return float("nan")
        overall = per.sum(axis=0)
        return float(np.mean([js_divergence(f, overall) for f in per]))

    def resampled(rng: np.random.Generator) -> float:
        rows = np.concatenate([m[rng.integers(0, m.size, m.size)] for m in members])
        return js_of(rows, lab[rows])

    def shuffled(rng: np.random.Generator) -> float:
        return js_of(np.arange(lab.size), rng.permutation(lab))

    return estimate(js_of(np.arange(lab.size), lab), resampled, shuffled, n_tokens, lab.size,
                    n_boot, n_shuffle, seed)


def category_nmi_estimate(traces: Traces, layer: int, categories: object,
                          n_boot: int = N_BOOT, n_shuffle: int = N_SHUFFLE,
                          seed: int = 0) -> Estimate:
    """NMI(E; C) over assignments with its bootstrap interval over documents and the
    category-label shuffle baseline (labels permuted across token ids, see module doc)."""
    ts = as_list(traces)
    docs = _docs(ts, layer, "category_nmi_estimate")
    k = docs[0].shape[-1]
    N = sum(d.shape[0] for d in docs)
    labels = flat_labels(categories, N, "category_nmi_estimate", ts).astype(str)
    _, cat = np.unique(labels, return_inverse=True)
    E = max(num_experts(ts, layer), max(int(d.max()) + 1 for d in docs))
    C = int(cat.max()) + 1
    bounds = np.cumsum([0] + [d.shape[0] for d in docs])
    idx = np.concatenate(docs)
    joint_docs = np.zeros((len(docs), C, E))
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        np.add.at(joint_docs[n], (np.repeat(cat[a:b], k), idx[a:b].ravel()), 1)

    def resampled(rng: np.random.Generator) -> float:
        return nmi_from_joint(joint_docs[rng.integers(0, len(docs), len(docs))].sum(axis=0))

    flat_e = idx.ravel()
    ids = np.concatenate([token_ids(t) for t in ts])
    by_type = ids.size == N
    if by_type:
        uniq, inv = np.unique(ids, return_inverse=True)
        type_cat = np.full(uniq.size, -1)
        type_cat[inv] = cat
        by_type = bool(np.all(type_cat[inv] == cat))

    def shuffled(rng: np.random.Generator) -> float:
        perm = type_cat[rng.permutation(uniq.size)][inv] if by_type else rng.permutation(cat)
        code = np.repeat(perm, k) * E + flat_e
        return nmi_from_joint(np.bincount(code, minlength=C * E).reshape(C, E))

    return estimate(nmi_from_joint(joint_docs.sum(axis=0)), resampled, shuffled, N, len(docs),
                    n_boot, n_shuffle, seed)


def _vs_score(ids: np.ndarray, idx: np.ndarray, E: int, min_count: int) -> float:
    uniq, inv = np.unique(ids, return_inverse=True)
    k = idx.shape[1]
    if k > 1:  # an expert counts once per token even if listed twice
        first = np.ones(idx.shape, dtype=bool)
        for s in range(1, k):
            first[:, s] = ~np.any(idx[:, :s] == idx[:, s:s + 1], axis=1)
        code = (np.repeat(inv, k) * E + idx.ravel())[first.ravel()]
    else:
        code = inv * E + idx[:, 0]
    nxe = np.bincount(code, minlength=uniq.size * E).reshape(uniq.size, E)
    nx = np.bincount(inv, minlength=uniq.size)
    keep = nx >= min_count
    if not keep.any():
        return float("nan")
    return float(nxe[keep].max(axis=1).sum() / nx[keep].sum())


def vocabulary_estimate(traces: Traces, layer: int, min_count: int = 2,
                        n_boot: int = N_BOOT, n_shuffle: int = N_SHUFFLE,
                        seed: int = 0) -> Estimate:
    """The vocabulary-specialisation score (ids seen ``min_count``+ times) with its bootstrap
    interval over documents and the baseline of expert choices permuted across tokens."""
    ts = as_list(traces)
    docs = _docs(ts, layer, "vocabulary_estimate")
    ids_docs = [r for t in ts for r in row_ids(t)]
    if [d.shape[0] for d in docs] != [r.size for r in ids_docs]:
        raise ValueError(f"vocabulary_estimate: routing of layer {layer} does not cover every "
                         "input token; capture without a position slice")
    E = max(num_experts(ts, layer), max(int(d.max()) + 1 for d in docs))
    ids = np.concatenate(ids_docs)
    idx = np.concatenate(docs)
    value = _vs_score(ids, idx, E, min_count)
    if not np.isfinite(value):
        raise ValueError(f"vocabulary_estimate: no token id occurs {min_count}+ times")

    def resampled(rng: np.random.Generator) -> float:
        pick = rng.integers(0, len(docs), len(docs))
        return _vs_score(np.concatenate([ids_docs[p] for p in pick]),
                         np.concatenate([docs[p] for p in pick]), E, min_count)

    def shuffled(rng: np.random.Generator) -> float:
        return _vs_score(ids, idx[rng.permutation(idx.shape[0])], E, min_count)

    return estimate(value, resampled, shuffled, ids.size, len(docs), n_boot, n_shuffle, seed)


def specialisation_estimates(traces: DomainTraces, layers: Sequence[int],
                             categories: object = None, min_count: int = 2,
                             n_boot: int = N_BOOT, n_shuffle: int = N_SHUFFLE,
                             seed: int = 0) -> dict[str, dict[int, Estimate]]:
    """{"domain_js" (two or more domains), "category_nmi" (with ``categories``),
    "vocabulary": {layer: Estimate}} for every layer."""
    try:
        groups = group_by_domain(traces)
    except ValueError:
        groups = {"all": as_list(list(traces.values()) if hasattr(traces, "values")
                                 else traces)}  # type: ignore[arg-type]
    pooled = [t for ts in groups.values() for t in ts]
    out: dict[str, dict[int, Estimate]] = {}
    kw = {"n_boot": n_boot, "n_shuffle": n_shuffle, "seed": seed}
    if len(groups) > 1:
        out["domain_js"] = {i: domain_js_estimate(groups, i, **kw) for i in layers}
    if categories is not None:
        out["category_nmi"] = {i: category_nmi_estimate(pooled, i, categories, **kw)
                               for i in layers}
    out["vocabulary"] = {i: vocabulary_estimate(pooled, i, min_count, **kw) for i in layers}
    return out
