"""Expert specialisation by domain, by token category and by vocabulary.

- Domain: per-expert load per domain f^D (all top-k assignments) and the Jensen-Shannon
  divergence JS(f^D ‖ f^all) in bits, where f^all pools the tokens of every domain.
- Token category: counts N(c, e) of assignments of category-c tokens to expert e, P(e | c), and
  the normalised mutual information NMI(E; C) = I(E; C) / sqrt(H(E)·H(C)) over assignments
  (each token counted once per top-k slot; for top-1 this is over tokens).
- Vocabulary: VS(x) = max_e N_{x,e} / N_x for each input token id x, where N_x is the number of
  occurrences of x and N_{x,e} the occurrences routed to e in any top-k slot (1 = the token
  always goes to the same expert); the score is the frequency-weighted mean Σ_x N_x VS(x) / Σ N_x.

Categories come from ``workbench.tokenizer`` (``Tokenizer.categories(ids)``), passed in as one
label per token aligned with ``trace.input_ids`` (flattened over batch and position; several
traces concatenated, or a list with one array per trace).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ..trace import LayerArray, Trace
from ._common import (
    Traces,
    as_list,
    flat_labels,
    indices,
    nmi_from_joint,
    num_experts,
    token_ids,
)
from .load import expert_counts

DomainTraces = Mapping[str, Traces] | Sequence[Trace]


def js_divergence(p: ArrayLike, q: ArrayLike) -> float:
    """Jensen-Shannon divergence in bits, JS(p‖q) = ½KL(p‖m) + ½KL(q‖m), m = (p+q)/2; in [0, 1].

    Inputs are normalised to sum to 1 first.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"js_divergence: shapes differ {p.shape} vs {q.shape}")
    if p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("js_divergence: a distribution has zero total mass")
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return float(min(max(0.5 * kl(p) + 0.5 * kl(q), 0.0), 1.0))


def group_by_domain(traces: DomainTraces) -> dict[str, list[Trace]]:
    """{domain: traces}: a mapping is taken as is; a sequence of traces is grouped by
    ``trace.meta["domain"]`` (in order of first appearance)."""
    if isinstance(traces, Mapping):
        out = {str(k): as_list(v) for k, v in traces.items()}
    else:
        out = {}
        for t in as_list(list(traces)):
            d = t.meta.get("domain")
            if d is None:
                raise ValueError("group_by_domain: a trace has no meta['domain']; pass a dict "
                                 "{domain: traces} or set trace.meta['domain']")
            out.setdefault(str(d), []).append(t)
    if not out:
        raise ValueError("no domains given")
    return out


@dataclass(frozen=True)
class DomainSpecialisation:
    """Result of :func:`domain_specialisation` for one layer.

    ``load``: (D, E) per-domain load fractions f^D; ``overall``: (E,) f^all over all tokens;
    ``ratio``: f^D_e · E (1 = uniform share); ``js``: (D,) JS(f^D ‖ f^all) in bits;
    ``tokens``: (D,) tokens per domain.
    """

    layer: int
    domains: list[str]
    load: np.ndarray
    overall: np.ndarray
    ratio: np.ndarray
    js: np.ndarray
    tokens: np.ndarray


def domain_specialisation(traces: DomainTraces, layer: int) -> DomainSpecialisation:
    """Per-domain expert load and its JS divergence from the pooled load (see module doc)."""
    groups = group_by_domain(traces)
    counts = [expert_counts(ts, layer) for ts in groups.values()]
    tokens = [indices(ts, layer, "domain_specialisation").shape[0] for ts in groups.values()]
    E = max(c.shape[0] for c in counts)
    C = np.stack([np.pad(c, (0, E - c.shape[0])) for c in counts]).astype(np.float64)
    if np.any(C.sum(axis=1) == 0):
        empty = [d for d, c in zip(groups, C) if c.sum() == 0]
        raise ValueError(f"domain_specialisation: domains {empty} have no routed tokens")
    load = C / C.sum(axis=1, keepdims=True)
    overall = C.sum(axis=0) / C.sum()
    js = np.array([js_divergence(f, overall) for f in load])
    return DomainSpecialisation(layer, list(groups), load, overall, load * E, js,
                                np.asarray(tokens, dtype=np.int64))


def domain_js_by_layer(traces: DomainTraces, layers: Sequence[int]) -> np.ndarray:
    """(L, D) JS(f^D ‖ f^all) in bits for each layer and domain, as a
    :class:`~workbench.trace.LayerArray`: ``js[3]`` is layer 3's row."""
    return LayerArray(np.stack([domain_specialisation(traces, i).js for i in layers]), layers)


@dataclass(frozen=True)
class CategorySpecialisation:
    """Result of :func:`category_specialisation` for one layer.

    ``counts``: (C, E) assignments of each category to each expert; ``p_expert``: P(e | c)
    (rows sum to 1); ``ratio``: P(e | c) · E; ``nmi``: NMI(E; C) in [0, 1].
    """

    layer: int
    categories: list[str]
    counts: np.ndarray
    p_expert: np.ndarray
    ratio: np.ndarray
    nmi: float


def category_specialisation(traces: Traces, layer: int, categories: object
                            ) -> CategorySpecialisation:
    """Token-category × expert table and NMI(E; C) (see module doc).

    ``categories``: one label per token (e.g. ``tok.categories(trace.input_ids.ravel())``),
    flattened over batch and position, traces concatenated; or one array per trace.
    """
    ts = as_list(traces)
    idx = indices(ts, layer, "category_specialisation")
    N, k = idx.shape
    labels = flat_labels(categories, N, "category_specialisation", ts).astype(str)
    names, cat = np.unique(labels, return_inverse=True)
    E = max(num_experts(ts, layer), int(idx.max()) + 1 if idx.size else 1)
    counts = np.zeros((len(names), E), dtype=np.int64)
    np.add.at(counts, (np.repeat(cat, k), idx.ravel()), 1)
    rows = counts.sum(axis=1, keepdims=True).astype(np.float64)
    p = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    return CategorySpecialisation(layer, [str(n) for n in names], counts, p, p * E,
                                  nmi_from_joint(counts))


def normalised_mutual_information(a: ArrayLike, b: ArrayLike) -> float:
    """NMI(A; B) = I(A; B) / sqrt(H(A)·H(B)) of two aligned label arrays (0 if either is
    constant)."""
    a = np.asarray(a).ravel()
    b = np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"normalised_mutual_information: {a.size} vs {b.size} labels")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    joint = np.zeros((ia.max() + 1 if ia.size else 1, ib.max() + 1 if ib.size else 1))
    np.add.at(joint, (ia, ib), 1)
    return nmi_from_joint(joint)


def _token_ids(ts: list[Trace], layer: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N,), indices (N, k)) aligned, checking that routing covers every input token."""
    ids, idx = [], []
    for t in ts:
        a = indices(t, layer, what)
        real = token_ids(t)
        if a.shape[0] != real.size:
            raise ValueError(f"{what}: routing of layer {layer} covers {a.shape[0]} tokens but "
                             f"input_ids has {real.size}; capture without a position slice")
        ids.append(real.astype(np.int64))
        idx.append(a)
    return np.concatenate(ids), np.concatenate(idx)


def _token_expert_counts(ts: list[Trace], layer: int, what: str
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unique token ids (X,), N_x (X,), N_{x,e} (X, E)) with N_{x,e} = occurrences of x that
    have e among their chosen experts."""
    ids, idx = _token_ids(ts, layer, what)
    uniq, inv = np.unique(ids, return_inverse=True)
    E = max(num_experts(ts, layer), int(idx.max()) + 1 if idx.size else 1)
    hit = np.zeros((ids.size, E), dtype=bool)
    hit[np.repeat(np.arange(ids.size), idx.shape[1]), idx.ravel()] = True
    nxe = np.zeros((uniq.size, E), dtype=np.int64)
    np.add.at(nxe, inv, hit.astype(np.int64))
    nx = np.bincount(inv, minlength=uniq.size).astype(np.int64)
    return uniq, nx, nxe


@dataclass(frozen=True)
class VocabularySpecialisation:
    """Result of :func:`vocabulary_specialisation` for one layer.

    ``token_ids``, ``counts`` (N_x), ``vs`` (VS(x)) and ``top_expert`` (argmax_e N_{x,e}) for
    every token id seen at least ``min_count`` times; ``score``: Σ_x N_x VS(x) / Σ_x N_x.
    """

    layer: int
    token_ids: np.ndarray
    counts: np.ndarray
    vs: np.ndarray
    top_expert: np.ndarray
    score: float


def vocabulary_specialisation(traces: Traces, layer: int, min_count: int = 1
                              ) -> VocabularySpecialisation:
    """VS(x) = max_e N_{x,e} / N_x per token id and its frequency-weighted mean (module doc).

    ``min_count`` drops rare ids (a token seen once trivially has VS = 1).
    """
    ts = as_list(traces)
    uniq, nx, nxe = _token_expert_counts(ts, layer, "vocabulary_specialisation")
    keep = nx >= min_count
    if not keep.any():
        raise ValueError(f"vocabulary_specialisation: no token id occurs {min_count}+ times")
    uniq, nx, nxe = uniq[keep], nx[keep], nxe[keep]
    vs = nxe.max(axis=1) / nx
    score = float(np.sum(nx * vs) / np.sum(nx))
    return VocabularySpecialisation(layer, uniq, nx, vs, nxe.argmax(axis=1), score)


def top_tokens_per_expert(traces: Traces, layer: int, n: int = 10, min_count: int = 1,
                          by: str = "count") -> list[list[tuple[int, int, float]]]:
    """For each expert, its top ``n`` input token ids as (token_id, N_{x,e}, N_{x,e}/N_x).

    ``by="count"`` ranks by N_{x,e} (the expert's most frequent tokens); ``by="share"`` ranks
    by N_{x,e}/N_x among ids seen at least ``min_count`` times (the tokens it owns).
    """
    if by not in ("count", "share"):
        raise ValueError(f"by must be 'count' or 'share', got {by!r}")
    ts = as_list(traces)
    uniq, nx, nxe = _token_expert_counts(ts, layer, "top_tokens_per_expert")
    keep = nx >= min_count
    uniq, nx, nxe = uniq[keep], nx[keep], nxe[keep]
    share = nxe / np.maximum(nx, 1)[:, None]
    out: list[list[tuple[int, int, float]]] = []
    for e in range(nxe.shape[1]):
        key = nxe[:, e] if by == "count" else share[:, e]
        tie = nxe[:, e]
        order = np.lexsort((uniq, -tie, -key))
        order = [i for i in order if nxe[i, e] > 0][:n]
        out.append([(int(uniq[i]), int(nxe[i, e]), float(share[i, e])) for i in order])
    return out

