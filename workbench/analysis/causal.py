"""Causal expert importance: Δloss and Δ next-token prediction when an expert is removed.

For each domain's token ids and each expert e of one layer, the model is run with
``ban_expert(layer, e)`` (the router may not choose e; its tokens re-route) or
``zero_expert(layer, e)`` (routing kept, e's output dropped), and compared with the clean run:

- Δloss_e = L(ablated) - L(clean), L = mean next-token cross-entropy (nats) over every position
  t < T-1 of every sequence (predicting ids[t+1] from logits[t]);
- flip_rate_e = fraction of positions whose argmax next-token prediction changes;
- Δaccuracy_e = change of next-token top-1 accuracy.

Random-expert null: the same intervention on an expert drawn uniformly at random. With
``n_random=None`` (default) the null is exact: mean and std over all E experts. With an integer,
``n_random`` experts are drawn with replacement (seeded). ``z_e = (Δloss_e - null_mean) /
null_std`` says how much more the expert matters on a domain than a random expert does. The
observed load of the clean run is returned alongside, since utilisation need not predict
causal importance.

Works against the model API: ``model.run(ids, capture=[...], interventions=[...])`` returning an
object with ``.logits`` (B, T, V) and ``.trace``; ``model.config`` has ``moe_layers`` and
``num_local_experts``. No framework is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ..interventions import ban_expert, zero_expert
from ._common import check_index

MODES = ("ban", "zero")


def next_token_loss(logits: ArrayLike, input_ids: ArrayLike) -> float:
    """Mean next-token cross-entropy in nats,
    L = -mean_{b, t<T-1} log softmax(logits[b, t])[ids[b, t+1]]."""
    total, n, _ = _ce_sum_and_preds(np.asarray(logits), np.asarray(input_ids))
    return total / n


def _ce_sum_and_preds(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int, np.ndarray]:
    """(Σ cross-entropy, number of predictions, argmax predictions (B, T-1))."""
    if ids.ndim == 1:
        ids = ids[None]
    if logits.ndim == 2:
        logits = logits[None]
    if logits.shape[:2] != ids.shape:
        raise ValueError(f"logits {logits.shape} do not match input_ids {ids.shape}")
    if ids.shape[1] < 2:
        raise ValueError("next-token loss needs sequences of at least 2 tokens")
    z = logits[:, :-1].astype(np.float64)
    tgt = ids[:, 1:].astype(np.int64)
    m = z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=-1)) + m[..., 0]
    picked = np.take_along_axis(z, tgt[..., None], axis=-1)[..., 0]
    return float(np.sum(lse - picked)), int(tgt.size), z.argmax(axis=-1)


def as_token_batch(x: ArrayLike, what: str) -> np.ndarray:
    """Token ids as (batch, seq >= 2) integers (a 1-D sequence becomes one row); ValueError
    naming ``what`` otherwise."""
    ids = np.asarray(x)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] < 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"{what}: token ids must be an integer array (batch, seq) with "
                         f"seq >= 2, got shape {ids.shape} dtype {ids.dtype}")
    return ids


@dataclass
class _Run:
    ce: float
    n: int
    preds: np.ndarray
    targets: np.ndarray

    @property
    def loss(self) -> float:
        return self.ce / self.n

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.preds == self.targets))


def _run(model: Any, ids: np.ndarray, capture: list[str], interventions: list[Any],
         batch_size: int | None) -> tuple[_Run, list[np.ndarray]]:
    step = ids.shape[0] if not batch_size else int(batch_size)
    ce, n, preds, caught = 0.0, 0, [], []
    for s in range(0, ids.shape[0], step):
        chunk = ids[s:s + step]
        out = model.run(chunk, capture=capture, interventions=interventions)
        c, k, p = _ce_sum_and_preds(np.asarray(out.logits), chunk)
        ce, n = ce + c, n + k
        preds.append(p)
        for name in capture:
            caught.append(np.asarray(out.trace[name]))
    return _Run(ce, n, np.concatenate(preds), ids[:, 1:]), caught


@dataclass(frozen=True)
class ExpertAblation:
    """Result of :func:`expert_ablation` (D domains, X experts ablated, E experts, R null draws).

    base_loss, base_accuracy: (D,); delta_loss, flip_rate, delta_accuracy, z: (D, X);
    load: (D, E) load fractions of the clean run; null_experts: (R,) experts of the null;
    null_delta_loss: (D, R); null_mean, null_std: (D,).
    """

    layer: int
    mode: str
    domains: list[str]
    experts: list[int]
    base_loss: np.ndarray
    base_accuracy: np.ndarray
    delta_loss: np.ndarray
    flip_rate: np.ndarray
    delta_accuracy: np.ndarray
    load: np.ndarray
    null_experts: np.ndarray
    null_delta_loss: np.ndarray
    null_mean: np.ndarray
    null_std: np.ndarray
    z: np.ndarray

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (domain, expert): domain, expert, load, delta_loss, flip_rate,
        delta_accuracy, null_mean, z."""
        out = []
        for d, dom in enumerate(self.domains):
            for x, e in enumerate(self.experts):
                out.append({"domain": dom, "expert": e, "load": float(self.load[d, e]),
                            "delta_loss": float(self.delta_loss[d, x]),
                            "flip_rate": float(self.flip_rate[d, x]),
                            "delta_accuracy": float(self.delta_accuracy[d, x]),
                            "null_mean": float(self.null_mean[d]), "z": float(self.z[d, x])})
        return out


def expert_ablation(model: Any, inputs: Mapping[str, ArrayLike] | ArrayLike, layer: int,
                    mode: str = "ban", experts: Sequence[int] | None = None,
                    n_random: int | None = None, seed: int = 0,
                    batch_size: int | None = None) -> ExpertAblation:
    """Δloss / Δprediction per expert and domain against a random-expert null (module doc).

    ``inputs``: {domain: token ids (B, T)} or one id array (domain ``"all"``). ``mode``:
    ``"ban"`` or ``"zero"``. ``experts``: which to ablate (default all). ``batch_size`` runs
    the rows of each domain in chunks to bound memory. Costs 1 + |experts ∪ null| runs per
    domain.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cfg = model.config
    layer = check_index(layer, "expert_ablation: layer")
    if layer not in list(cfg.moe_layers):
        raise ValueError(f"layer {layer} is not an MoE layer; MoE layers: {list(cfg.moe_layers)}")
    E = int(cfg.num_local_experts)
    if experts is None:
        experts = list(range(E))
    else:
        if isinstance(experts, int | np.integer):
            experts = [experts]
        experts = [check_index(e, "expert_ablation: expert", E) for e in experts]
    if not experts:
        raise ValueError(f"experts is empty: choose from 0..{E - 1} (or None for all)")
    if n_random is None:
        null = np.arange(E)
    else:
        n_random = check_index(n_random, "expert_ablation: n_random")
        if n_random < 1:
            raise ValueError(f"n_random must be >= 1 or None, got {n_random}")
        null = np.random.default_rng(seed).integers(0, E, size=int(n_random))
    domains = ({str(k): as_token_batch(v, f"domain {str(k)!r}") for k, v in inputs.items()}
               if isinstance(inputs, Mapping) else {"all": as_token_batch(inputs, "domain 'all'")})
    if not domains:
        raise ValueError("no inputs given")
    make = ban_expert if mode == "ban" else zero_expert
    capture = [f"layers.{layer}.moe.topk_indices"]
    D, X = len(domains), len(experts)
    base_loss, base_acc = np.zeros(D), np.zeros(D)
    dl, flip, dacc = np.zeros((D, X)), np.zeros((D, X)), np.zeros((D, X))
    load = np.zeros((D, E))
    null_dl = np.zeros((D, null.size))
    for d, ids in enumerate(domains.values()):
        base, caught = _run(model, ids, capture, [], batch_size)
        idx = np.concatenate([c.reshape(-1, c.shape[-1]) for c in caught]).astype(np.int64)
        load[d] = np.bincount(idx.ravel(), minlength=E)[:E] / max(idx.size, 1)
        base_loss[d], base_acc[d] = base.loss, base.accuracy
        cache: dict[int, _Run] = {}
        for e in sorted(set(experts) | {int(x) for x in null}):
            cache[e], _ = _run(model, ids, [], [make(layer, e)], batch_size)
        for x, e in enumerate(experts):
            r = cache[e]
            dl[d, x] = r.loss - base.loss
            flip[d, x] = float(np.mean(r.preds != base.preds))
            dacc[d, x] = r.accuracy - base.accuracy
        null_dl[d] = [cache[int(e)].loss - base.loss for e in null]
    mean, std = null_dl.mean(axis=1), null_dl.std(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(std[:, None] > 0, (dl - mean[:, None]) / np.where(std > 0, std, 1)[:, None],
                     np.nan)
    return ExpertAblation(layer, mode, list(domains), experts, base_loss, base_acc, dl, flip,
                          dacc, load, null, null_dl, mean, std, z)
