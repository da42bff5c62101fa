"""Interventions: small frozen records, validated once here and applied by each backend.

Semantics (identical in torch and jax):
- ``ban_expert``: the expert's logit is -inf for selection; tokens re-route to their next choice.
  The captured ``router_logits`` stay the raw logits, so one sees what the router wanted.
- ``zero_expert``: routing is unchanged, but the expert contributes nothing to ``routed_out``.
- ``force_expert``: at the given positions (all when None) the expert becomes the first choice;
  remaining top-k slots go to the best other experts; its gate is sigmoid of its own logit.
- ``set_top_k``: route each token to k experts (each with its own sigmoid gate, as in Llama 4).
- ``ablate_head``: the head's attention output is zeroed before ``o_proj``.
- ``patch``: the hook's value is replaced by the given array (broadcast to the hook's shape).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import numpy as np

from .config import ModelConfig
from .hooks import check_name, hook_shape, parse


class InterventionError(ValueError):
    """An intervention that does not fit the model or the input."""


@dataclass(frozen=True)
class BanExpert:
    layer: int
    expert: int
    kind: str = field(default="ban_expert", init=False)


@dataclass(frozen=True)
class ZeroExpert:
    layer: int
    expert: int
    kind: str = field(default="zero_expert", init=False)


@dataclass(frozen=True)
class ForceExpert:
    layer: int
    expert: int
    positions: tuple[int, ...] | None = None
    kind: str = field(default="force_expert", init=False)


@dataclass(frozen=True)
class SetTopK:
    k: int
    layer: int | None = None
    kind: str = field(default="set_top_k", init=False)


@dataclass(frozen=True)
class AblateHead:
    layer: int
    head: int
    kind: str = field(default="ablate_head", init=False)


@dataclass(frozen=True, eq=False)
class Patch:
    name: str
    value: np.ndarray
    kind: str = field(default="patch", init=False)


Intervention = BanExpert | ZeroExpert | ForceExpert | SetTopK | AblateHead | Patch


def ban_expert(layer: int, expert: int) -> BanExpert:
    """Make ``expert`` unselectable in ``layer``; its tokens re-route."""
    return BanExpert(int(layer), int(expert))


def zero_expert(layer: int, expert: int) -> ZeroExpert:
    """Keep routing, but drop ``expert``'s output in ``layer``."""
    return ZeroExpert(int(layer), int(expert))


def force_expert(layer: int, expert: int, positions: Iterable[int] | None = None) -> ForceExpert:
    """Route the tokens at ``positions`` (all if None) to ``expert`` first."""
    pos = None if positions is None else tuple(int(p) for p in np.atleast_1d(positions))
    return ForceExpert(int(layer), int(expert), pos)


def set_top_k(k: int, layer: int | None = None) -> SetTopK:
    """Route to ``k`` experts per token in ``layer`` (every MoE layer when None)."""
    return SetTopK(int(k), None if layer is None else int(layer))


def ablate_head(layer: int, head: int) -> AblateHead:
    """Zero one attention head's output before o_proj."""
    return AblateHead(int(layer), int(head))


def patch(name: str, value: Any) -> Patch:
    """Replace the value of hook ``name`` (activation patching)."""
    return Patch(str(name), np.asarray(value))


@dataclass
class Plan:
    """Validated interventions grouped per layer, ready for a backend to apply."""

    ban: dict[int, list[int]] = field(default_factory=dict)
    zero: dict[int, list[int]] = field(default_factory=dict)
    force: dict[int, list[tuple[int, tuple[int, ...] | None]]] = field(default_factory=dict)
    top_k: dict[int, int] = field(default_factory=dict)
    ablate: dict[int, list[int]] = field(default_factory=dict)
    patches: dict[str, np.ndarray] = field(default_factory=dict)
    fns: dict[str, Callable] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.ban or self.zero or self.force or self.top_k or self.ablate
                    or self.patches or self.fns)

    def k(self, cfg: ModelConfig, layer: int) -> int:
        return self.top_k.get(layer, cfg.num_experts_per_tok)

    def edits(self) -> set[str]:
        """Hook names whose values a backend must route through the edit path."""
        return set(self.patches) | set(self.fns)

    def key(self) -> tuple:
        """A hashable summary of everything that changes a compiled graph's structure."""
        return (tuple(sorted((k, tuple(v)) for k, v in self.ban.items())),
                tuple(sorted((k, tuple(v)) for k, v in self.zero.items())),
                tuple(sorted((k, tuple(v)) for k, v in self.force.items())),
                tuple(sorted(self.top_k.items())),
                tuple(sorted((k, tuple(v)) for k, v in self.ablate.items())),
                tuple(sorted((k, v.shape, str(v.dtype)) for k, v in self.patches.items())),
                tuple(sorted((k, id(f)) for k, f in self.fns.items())))


def _layer(cfg: ModelConfig, layer: int, what: str, need_moe: bool) -> None:
    if not 0 <= layer < cfg.num_hidden_layers:
        raise InterventionError(f"{what}: layer {layer} out of range (model has "
                                f"{cfg.num_hidden_layers} layers)")
    if need_moe and not cfg.is_moe(layer):
        raise InterventionError(f"{what}: layer {layer} is a dense layer; MoE layers are "
                                f"{cfg.moe_layers}")


def _expert(cfg: ModelConfig, expert: int, what: str) -> None:
    if not 0 <= expert < cfg.num_local_experts:
        raise InterventionError(f"{what}: expert {expert} out of range (num_local_experts="
                                f"{cfg.num_local_experts})")


def plan(cfg: ModelConfig, interventions: Sequence[Intervention] | None,
         hooks: Mapping[str, Callable] | None, batch: int, seq: int) -> Plan:
    """Validate interventions and custom hook functions for an input of (batch, seq)."""
    p = Plan()
    if interventions is not None and not isinstance(interventions, list | tuple):
        interventions = [interventions]  # a single intervention needs no list
    # top-k changes first: a topk_indices patch is checked against the k in force
    ordered = sorted(interventions or (), key=lambda iv: not isinstance(iv, SetTopK))
    for iv in ordered:
        what = f"{getattr(iv, 'kind', type(iv).__name__)}{_fmt(iv)}"
        if isinstance(iv, BanExpert):
            _layer(cfg, iv.layer, what, True)
            _expert(cfg, iv.expert, what)
            p.ban.setdefault(iv.layer, []).append(iv.expert)
        elif isinstance(iv, ZeroExpert):
            _layer(cfg, iv.layer, what, True)
            _expert(cfg, iv.expert, what)
            p.zero.setdefault(iv.layer, []).append(iv.expert)
        elif isinstance(iv, ForceExpert):
            _layer(cfg, iv.layer, what, True)
            _expert(cfg, iv.expert, what)
            if iv.positions is not None:
                bad = [q for q in iv.positions if not -seq <= q < seq]
                if bad:
                    raise InterventionError(f"{what}: positions {bad} outside the sequence of "
                                            f"length {seq}")
                pos = tuple(sorted({q % seq for q in iv.positions}))
            else:
                pos = None
            p.force.setdefault(iv.layer, []).append((iv.expert, pos))
        elif isinstance(iv, SetTopK):
            layers = cfg.moe_layers if iv.layer is None else [iv.layer]
            if iv.layer is not None:
                _layer(cfg, iv.layer, what, True)
            if not 1 <= iv.k <= cfg.num_local_experts:
                raise InterventionError(f"{what}: k={iv.k} must be in 1..{cfg.num_local_experts}")
            for layer in layers:
                p.top_k[layer] = iv.k
        elif isinstance(iv, AblateHead):
            _layer(cfg, iv.layer, what, False)
            if not 0 <= iv.head < cfg.num_attention_heads:
                raise InterventionError(f"{what}: head {iv.head} out of range "
                                        f"(num_attention_heads={cfg.num_attention_heads})")
            p.ablate.setdefault(iv.layer, []).append(iv.head)
        elif isinstance(iv, Patch):
            try:
                check_name(cfg, iv.name)
            except KeyError as e:
                raise InterventionError(f"{what}: {e}") from None
            hook = parse(iv.name)
            top_k = p.k(cfg, hook.layer) if hook.block == "moe" else None
            shape = hook_shape(cfg, iv.name, batch, seq, top_k=top_k)
            try:
                val = np.broadcast_to(iv.value, shape)
            except ValueError:
                raise InterventionError(f"{what}: value of shape {iv.value.shape} does not "
                                        f"broadcast to the hook's shape {shape}") from None
            if (hook.block, hook.site) == ("moe", "topk_indices"):
                if val.size and (val.min() < 0 or val.max() >= cfg.num_local_experts):
                    raise InterventionError(f"{what}: expert indices outside 0.."
                                            f"{cfg.num_local_experts - 1}")
                val = val.astype(np.int32)
            p.patches[iv.name] = val
        else:
            raise InterventionError(
                f"unknown intervention {iv!r}; use wb.ban_expert, zero_expert, force_expert, "
                "set_top_k, ablate_head or patch")
        p.records.append(describe(iv))
    for name, fn in (hooks or {}).items():
        try:
            check_name(cfg, name)
        except KeyError as e:
            raise InterventionError(f"hooks: {e}") from None
        if not callable(fn):
            raise InterventionError(f"hooks[{name!r}] is not callable")
        p.fns[name] = fn
        p.records.append({"kind": "hook_fn", "name": name,
                          "fn": getattr(fn, "__qualname__", repr(fn))})
    return p


def _fmt(iv: Any) -> str:
    if isinstance(iv, Patch):
        return f"(name={iv.name!r})"
    if not is_dataclass(iv):
        return f"({iv!r})"
    d = {f.name: getattr(iv, f.name) for f in fields(iv) if f.name != "kind"}
    return "(" + ", ".join(f"{k}={v}" for k, v in d.items()) + ")"


def describe(iv: Intervention) -> dict[str, Any]:
    """A JSON-able record of an intervention (stored in traces)."""
    if isinstance(iv, Patch):
        return {"kind": "patch", "name": iv.name, "shape": list(iv.value.shape)}
    d = {f.name: getattr(iv, f.name) for f in fields(iv)}
    if d.get("positions") is not None:
        d["positions"] = list(d["positions"])
    return d
