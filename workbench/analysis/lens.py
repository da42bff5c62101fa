"""Reading the residual stream: the logit lens, layer × position activation patching and
loss as the busiest experts are disabled.

- Logit lens: each layer's residual stream h (``resid_post``) through the final RMSNorm and
  the unembedding, log softmax(RMSNorm(h)·w ⊙ W_U^T), compared with the model's own output.
- Activation patching: run a corrupted input, replace the residual stream entering layer i
  (``resid_pre``) at position p with the clean run's, and measure how much of the clean
  behaviour returns: recovery = (m_patched − m_corrupt) / (m_clean − m_corrupt) for the logit
  difference m = z[clean answer] − z[corrupt answer] at the last position (1 = fully
  restored, 0 = no effect).
- Top-expert knockout (DeepSeek-MoE style): ban the busiest fraction of experts of the chosen
  layers (ranked by their load on the clean run) and measure next-token loss, against banning
  the same number of randomly chosen experts.

Works against the model API (``model.run(ids, capture=..., interventions=...)``); no
framework is imported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ..interventions import ban_expert, patch
from ..trace import Trace
from ._common import need
from .causal import as_token_batch, next_token_loss


# --------------------------------------------------------------------------- logit lens
@dataclass(frozen=True)
class LogitLens:
    """Result of :func:`logit_lens` (L lens layers, T positions of batch row ``batch``).

    ``top_ids`` / ``top_probs``: (L, T, k) the lens's most likely next tokens; ``final_ids``:
    (T,) the model's own top-1 next token; ``p_final``: (L, T) the lens probability of that
    token; ``p_next``: (L, T-1) of the actual next input token; ``kl``: (L, T) KL(model ‖
    lens) in nats.
    """

    layers: list[int]
    top_ids: np.ndarray
    top_probs: np.ndarray
    final_ids: np.ndarray
    p_final: np.ndarray
    p_next: np.ndarray
    kl: np.ndarray


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def logit_lens(trace: Trace, norm_weight: ArrayLike, unembed: ArrayLike,
               layers: Sequence[int] | None = None, eps: float = 1e-5, batch: int = 0,
               k: int = 5) -> LogitLens:
    """The logit lens over ``layers.{i}.resid_post`` (module doc). ``norm_weight``: the final
    RMSNorm weight (D,), ``ckpt["norm.weight"]``; ``unembed``: (V, D), ``ckpt["lm_head.weight"]``
    (or ``embed_tokens.weight`` when tied). The model's own distribution is the last layer's
    lens unless the trace captured ``logits``."""
    w = np.asarray(norm_weight, dtype=np.float64)
    W = np.asarray(unembed, dtype=np.float64)
    if w.ndim != 1 or W.ndim != 2 or W.shape[1] != w.shape[0]:
        raise ValueError(f"logit_lens: need norm_weight (D,) and unembed (V, D), got "
                         f"{w.shape} and {W.shape}")
    if layers is None:
        layers = sorted(i for i in trace.layers if f"layers.{i}.resid_post" in trace)
    layers = [int(i) for i in layers]
    if not layers:
        raise ValueError("logit_lens needs the hook 'layers.{i}.resid_post' of some layer; re-run "
                         "with capture=['*.resid_post']")
    logps = []
    for i in layers:
        h = need(trace, f"layers.{i}.resid_post", "logit_lens").astype(np.float64)[batch]
        if h.shape[-1] != w.shape[0]:
            raise ValueError(f"logit_lens: layers.{i}.resid_post has width {h.shape[-1]}, the "
                             f"norm weight {w.shape[0]}")
        x = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps) * w
        logps.append(_log_softmax(x @ W.T))
    lp = np.stack(logps)  # (L, T, V)
    final = _log_softmax(np.asarray(trace["logits"], dtype=np.float64)[batch]) \
        if "logits" in trace else lp[-1]
    order = np.argsort(-lp, axis=-1)[..., :k]
    top_p = np.exp(np.take_along_axis(lp, order, axis=-1))
    final_ids = final.argmax(axis=-1)
    p_final = np.exp(np.take_along_axis(lp, final_ids[None, :, None].repeat(len(layers), 0),
                                        axis=-1))[..., 0]
    ids = np.asarray(trace.input_ids)
    ids = ids[batch] if ids.ndim == 2 else ids.ravel()
    nxt = ids[1:lp.shape[1]]
    p_next = np.exp(np.take_along_axis(lp[:, :len(nxt)], nxt[None, :, None].repeat(
        len(layers), 0), axis=-1))[..., 0]
    pf = np.exp(final)
    kl = np.sum(pf[None] * (final[None] - lp), axis=-1)
    return LogitLens(layers, order, top_p, final_ids, p_final, p_next, kl)


# --------------------------------------------------------------------------- patching
@dataclass(frozen=True)
class ActivationPatching:
    """Result of :func:`activation_patching`: ``recovery`` (L, P) for ``layers`` × ``positions``,
    the clean and corrupt logit differences, and the two answer tokens compared."""

    layers: list[int]
    positions: list[int]
    recovery: np.ndarray
    clean_diff: float
    corrupt_diff: float
    clean_answer: int
    corrupt_answer: int
    clean_ids: np.ndarray
    corrupt_ids: np.ndarray


def _as_row(ids: ArrayLike, what: str) -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] != 1 or a.dtype.kind not in "iu":
        raise ValueError(f"activation_patching: {what} must be one integer sequence (T,) or "
                         f"(1, T), got {a.dtype} {a.shape}")
    return a.astype(np.int64)


def activation_patching(model: Any, clean_ids: ArrayLike, corrupt_ids: ArrayLike,
                        layers: Sequence[int] | None = None,
                        positions: Sequence[int] | None = None,
                        answers: tuple[int, int] | None = None) -> ActivationPatching:
    """Layer × position patching of ``resid_pre`` from the clean into the corrupted run
    (module doc); both inputs have the same length (e.g. the same sentence with one token
    changed). ``answers``: (clean, corrupt) answer tokens, default each run's top-1 next
    token at the last position (the corrupt run's second choice when both agree). Costs
    2 + |layers|·|positions| runs."""
    clean = _as_row(clean_ids, "clean_ids")
    bad = _as_row(corrupt_ids, "corrupt_ids")
    if clean.shape != bad.shape:
        raise ValueError(f"activation_patching: clean {clean.shape} and corrupt {bad.shape} "
                         "inputs must have the same length (change tokens, do not add them)")
    L = int(model.config.num_hidden_layers)
    layers = list(range(L)) if layers is None else [int(i) for i in layers]
    T = clean.shape[1]
    positions = list(range(T)) if positions is None else [int(p) for p in positions]
    for p in positions:
        if not 0 <= p < T:
            raise ValueError(f"activation_patching: position {p} outside 0..{T - 1}")
    names = [f"layers.{i}.resid_pre" for i in layers]
    c = model.run(clean, capture=names)
    b = model.run(bad, capture=names)
    zc, zb = np.asarray(c.logits)[0, -1], np.asarray(b.logits)[0, -1]
    if answers is not None:
        a_c, a_b = (int(a) for a in answers)
    else:
        a_c = int(zc.argmax())
        a_b = int(zb.argmax()) if int(zb.argmax()) != a_c else int(np.argsort(-zb)[1])

    def diff(z: np.ndarray) -> float:
        return float(z[a_c] - z[a_b])

    dc, db = diff(zc), diff(zb)
    rec = np.zeros((len(layers), len(positions)))
    for r, name in enumerate(names):
        base = np.asarray(b.trace[name])
        for q, p in enumerate(positions):
            val = base.copy()
            val[:, p] = np.asarray(c.trace[name])[:, p]
            out = model.run(bad, interventions=[patch(name, val)])
            m = diff(np.asarray(out.logits)[0, -1])
            rec[r, q] = (m - db) / (dc - db) if dc != db else np.nan
    return ActivationPatching(layers, positions, rec, dc, db, a_c, a_b, clean[0], bad[0])


# --------------------------------------------------------------------------- knockout
@dataclass(frozen=True)
class Knockout:
    """Result of :func:`top_expert_knockout`: ``fractions`` of experts banned, the loss with
    the busiest experts banned (``top_loss``) and with random ones (``random_loss``, mean and
    std over ``n_random`` draws); ``base_loss`` with none banned."""

    layers: list[int]
    fractions: np.ndarray
    counts: np.ndarray
    base_loss: float
    top_loss: np.ndarray
    random_loss: np.ndarray
    random_std: np.ndarray


def top_expert_knockout(model: Any, ids: ArrayLike, layers: Sequence[int] | None = None,
                        fractions: Sequence[float] = (0.0, 1 / 16, 1 / 8, 1 / 4, 1 / 2),
                        n_random: int = 3, seed: int = 0) -> Knockout:
    """Next-token loss as the busiest ``fraction`` of each layer's experts are banned
    (DeepSeek-MoE style; busiest by load on the clean run), against banning as many random
    experts. Every fraction must leave more experts than the model's top-k."""
    x = as_token_batch(ids, "top_expert_knockout")
    cfg = model.config
    moe = list(cfg.moe_layers)
    layers = moe if layers is None else [int(i) for i in layers]
    bad = [i for i in layers if i not in moe]
    if bad:
        raise ValueError(f"top_expert_knockout: layers {bad} are not MoE layers ({moe})")
    E, k = int(cfg.num_local_experts), int(cfg.num_experts_per_tok)
    fr = np.asarray(fractions, dtype=np.float64)
    counts = np.round(fr * E).astype(int)
    if np.any(fr < 0) or np.any(E - counts < k):
        raise ValueError(f"top_expert_knockout: fractions must lie in [0, 1) and leave at least "
                         f"top-k = {k} of {E} experts, got {list(fractions)}")
    clean = model.run(x, capture=[f"layers.{i}.moe.topk_indices" for i in layers])
    base = next_token_loss(clean.logits, x)
    rank = {i: np.argsort(-np.bincount(np.asarray(clean.trace[f"layers.{i}.moe.topk_indices"]
                                                  ).ravel(), minlength=E), kind="stable")
            for i in layers}
    rng = np.random.default_rng(seed)

    def loss(banned: dict[int, np.ndarray]) -> float:
        ivs = [ban_expert(i, int(e)) for i in layers for e in banned[i]]
        return base if not ivs else next_token_loss(model.run(x, interventions=ivs).logits, x)

    top, rnd, sd = [], [], []
    for n in counts:
        top.append(loss({i: rank[i][:n] for i in layers}))
        draws = [loss({i: rng.choice(E, n, replace=False) for i in layers})
                 for _ in range(n_random if n else 1)]
        rnd.append(float(np.mean(draws)))
        sd.append(float(np.std(draws)))
    return Knockout(layers, fr, counts, float(base), np.array(top), np.array(rnd), np.array(sd))
