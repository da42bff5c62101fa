"""Interventions: small frozen records, validated once here and applied by each backend.

Semantics (identical in torch and jax):
- ``ban_expert``: the expert's logit is -inf for selection; tokens re-route to their next choice.
  The captured ``router_logits`` stay the raw logits, so one sees what the router wanted.
- ``zero_expert``: routing is unchanged, but the expert contributes nothing to ``routed_out``.
- ``force_expert``: at the given positions (all when None) the expert becomes the first choice;
  remaining top-k slots go to the best other experts; its gate is sigmoid of its own logit.
- ``set_top_k``: route each token to k experts (each with its own sigmoid gate, as in Llama 4).
- ``ablate_head``: the head's attention output is zeroed before ``o_proj``.
- ``disable_temperature``: a global NoPE layer's queries are not scaled by the position's
  temperature (``attn_temperature_tuning``), as if tuning were off for that layer.
- ``patch``: the hook's value is replaced by the given array (broadcast to the hook's shape).

Everything is checked here, before either backend runs, so torch and jax refuse the same
things with the same message: indices must be ints (a float is never truncated) in range, and
interventions that contradict each other are an ``InterventionError`` naming both: banning
every expert of a layer (or so many that fewer than k remain), forcing a banned expert, forcing
more experts at a position than the layer's k, ``set_top_k`` twice for one layer, two patches of
one hook, and ban/force at a layer whose ``topk_indices`` is patched (the patch replaces the
routing they would change). Patch values must broadcast to the hook's shape, be real numbers
(no bool, complex, object or string arrays), be finite unless ``allow_nonfinite=True``, and be
ints in ``0..E-1`` for ``moe.topk_indices``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import numpy as np

from .config import ModelConfig
from .hooks import check_name, hook_dtype, hook_shape, parse


class InterventionError(ValueError):
    """An intervention that does not fit the model or the input, or contradicts another."""


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


@dataclass(frozen=True)
class DisableTemperature:
    layer: int | None = None
    kind: str = field(default="disable_temperature", init=False)


@dataclass(frozen=True, eq=False)
class Patch:
    name: str
    value: np.ndarray
    allow_nonfinite: bool = False
    kind: str = field(default="patch", init=False)


Intervention = BanExpert | ZeroExpert | ForceExpert | SetTopK | AblateHead | DisableTemperature \
    | Patch


def _is_int(x: Any) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def _int(x: Any, what: str, name: str) -> int:
    """``x`` as an int; InterventionError for floats (never truncated), bools and the rest."""
    if not _is_int(x):
        raise InterventionError(f"{what}: {name} must be an int, got {type(x).__name__} {x!r}")
    return int(x)


def _positions(positions: Any, what: str) -> tuple[int, ...]:
    if _is_int(positions):
        positions = [positions]
    if isinstance(positions, str | bytes) or not (isinstance(positions, Iterable)
                                                  or hasattr(positions, "__array__")):
        raise InterventionError(f"{what}: positions must be ints (or None for all), got "
                                f"{positions!r}")
    items = np.asarray(positions, dtype=object).ravel().tolist() \
        if hasattr(positions, "__array__") else list(positions)
    if not items:
        raise InterventionError(f"{what}: positions is empty; pass None to force every position")
    return tuple(_int(q, what, "each position") for q in items)


def ban_expert(layer: int, expert: int) -> BanExpert:
    """Make ``expert`` unselectable in ``layer``; its tokens re-route."""
    return BanExpert(_int(layer, "ban_expert", "layer"), _int(expert, "ban_expert", "expert"))


def zero_expert(layer: int, expert: int) -> ZeroExpert:
    """Keep routing, but drop ``expert``'s output in ``layer``."""
    return ZeroExpert(_int(layer, "zero_expert", "layer"), _int(expert, "zero_expert", "expert"))


def force_expert(layer: int, expert: int, positions: Iterable[int] | None = None) -> ForceExpert:
    """Route the tokens at ``positions`` (all if None) to ``expert`` first."""
    what = "force_expert"
    return ForceExpert(_int(layer, what, "layer"), _int(expert, what, "expert"),
                       None if positions is None else _positions(positions, what))


def set_top_k(k: int, layer: int | None = None) -> SetTopK:
    """Route to ``k`` experts per token in ``layer`` (every MoE layer when None)."""
    return SetTopK(_int(k, "set_top_k", "k"),
                   None if layer is None else _int(layer, "set_top_k", "layer"))


def ablate_head(layer: int, head: int) -> AblateHead:
    """Zero one attention head's output before o_proj."""
    return AblateHead(_int(layer, "ablate_head", "layer"), _int(head, "ablate_head", "head"))


def disable_temperature(layer: int | None = None) -> DisableTemperature:
    """Run ``layer`` (every layer with a query temperature when None) without the
    position-dependent query temperature of ``attn_temperature_tuning``."""
    return DisableTemperature(None if layer is None else
                              _int(layer, "disable_temperature", "layer"))


def patch(name: str, value: Any, *, allow_nonfinite: bool = False) -> Patch:
    """Replace the value of hook ``name`` (activation patching).

    ``value`` (numpy, a torch tensor, a jax array or nested lists) must broadcast to the hook's
    shape and hold real numbers; NaN and inf are refused unless ``allow_nonfinite=True``.
    """
    if not isinstance(name, str):
        raise InterventionError(f"patch: the hook name must be a string, got "
                                f"{type(name).__name__} {name!r}")
    what = f"patch(name={name!r})"
    arr = _patch_array(value, what)
    if not isinstance(allow_nonfinite, bool | np.bool_):
        raise InterventionError(f"{what}: allow_nonfinite must be True or False, got "
                                f"{allow_nonfinite!r}")
    _check_finite(arr, what, bool(allow_nonfinite))
    return Patch(name, arr, bool(allow_nonfinite))


def _patch_array(value: Any, what: str) -> np.ndarray:
    """A patch value as a numpy array of real numbers (ints or floats, bf16 included)."""
    if hasattr(value, "detach"):  # a torch tensor, possibly on a GPU or with grad
        t = value.detach().cpu()
        value = t.float().numpy() if str(t.dtype) == "torch.bfloat16" else t.numpy()
    try:
        arr = np.asarray(value)
    except Exception as e:  # noqa: BLE001 - anything numpy cannot read is a bad patch value
        raise InterventionError(f"{what}: value could not be read as an array: {e}") from None
    if not (arr.dtype.kind in "iuf" or _is_ml_float(arr.dtype)):
        kinds = {"b": "bool", "c": "complex", "O": "object (ragged or mixed)", "U": "string",
                 "S": "bytes"}
        raise InterventionError(f"{what}: value has dtype {arr.dtype} "
                                f"({kinds.get(arr.dtype.kind, 'not a number')}); patch values "
                                "must be real numbers (ints or floats)")
    return arr


def _is_ml_float(dt: np.dtype) -> bool:
    """bfloat16 and the other ml_dtypes floats (numpy calls their kind 'V')."""
    return dt.kind == "V" and dt.name.startswith(("bfloat16", "float8", "float6", "float4"))


def _check_finite(arr: np.ndarray, what: str, allow: bool) -> None:
    if allow or arr.dtype.kind in "iu" or not arr.size:
        return
    bad = ~np.isfinite(arr.astype(np.float32) if _is_ml_float(arr.dtype) else arr)
    if bad.any():
        where = f" (first at index {tuple(int(i) for i in np.argwhere(bad)[0])})" \
            if bad.ndim else ""
        raise InterventionError(f"{what}: value holds {int(bad.sum())} NaN/inf entries{where}; "
                                "pass allow_nonfinite=True to patch them in anyway")


@dataclass
class Plan:
    """Validated interventions grouped per layer, ready for a backend to apply."""

    ban: dict[int, list[int]] = field(default_factory=dict)
    zero: dict[int, list[int]] = field(default_factory=dict)
    force: dict[int, list[tuple[int, tuple[int, ...] | None]]] = field(default_factory=dict)
    top_k: dict[int, int] = field(default_factory=dict)
    ablate: dict[int, list[int]] = field(default_factory=dict)
    no_temperature: set[int] = field(default_factory=set)
    patches: dict[str, np.ndarray] = field(default_factory=dict)
    fns: dict[str, Callable] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.ban or self.zero or self.force or self.top_k or self.ablate
                    or self.no_temperature or self.patches or self.fns)

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
                tuple(sorted(self.no_temperature)),
                tuple(sorted((k, v.shape, str(v.dtype)) for k, v in self.patches.items())),
                tuple(sorted((k, id(f)) for k, f in self.fns.items())))


def _layer(cfg: ModelConfig, layer: Any, what: str, need_moe: bool) -> int:
    layer = _int(layer, what, "layer")
    if not 0 <= layer < cfg.num_hidden_layers:
        raise InterventionError(f"{what}: layer {layer} out of range (model has "
                                f"{cfg.num_hidden_layers} layers)")
    if need_moe and not cfg.is_moe(layer):
        raise InterventionError(f"{what}: layer {layer} is a dense layer; MoE layers are "
                                f"{cfg.moe_layers}")
    return layer


def _expert(cfg: ModelConfig, expert: Any, what: str) -> int:
    expert = _int(expert, what, "expert")
    if not 0 <= expert < cfg.num_local_experts:
        raise InterventionError(f"{what}: expert {expert} out of range (num_local_experts="
                                f"{cfg.num_local_experts})")
    return expert


def _names(whats: Iterable[str], limit: int = 4) -> str:
    """Intervention descriptions joined for a message (the first ``limit``, then a count)."""
    ws = list(dict.fromkeys(whats))
    more = f" and {len(ws) - limit} more" if len(ws) > limit else ""
    return ", ".join(ws[:limit]) + more


def plan(cfg: ModelConfig, interventions: Sequence[Intervention] | None,
         hooks: Mapping[str, Callable] | None, batch: int, seq: int) -> Plan:
    """Validate interventions and custom hook functions for an input of (batch, seq).

    Each intervention is checked on its own (types, ranges, shapes), then against the others
    (contradictions); both raise InterventionError naming the interventions involved.
    """
    p = Plan()
    if interventions is not None and not isinstance(interventions, list | tuple):
        interventions = [interventions]  # a single intervention needs no list
    # where each entry of the plan came from, for messages about contradictions
    ban_src: dict[int, dict[int, str]] = {}
    force_src: dict[int, list[tuple[int, tuple[int, ...] | None, str]]] = {}
    topk_src: dict[int, str] = {}
    patch_src: dict[str, str] = {}
    # top-k changes first: a topk_indices patch is checked against the k in force
    ordered = sorted(interventions or (), key=lambda iv: not isinstance(iv, SetTopK))
    for iv in ordered:
        what = f"{getattr(iv, 'kind', type(iv).__name__)}{_fmt(iv)}"
        if isinstance(iv, BanExpert):
            layer = _layer(cfg, iv.layer, what, True)
            e = _expert(cfg, iv.expert, what)
            ban_src.setdefault(layer, {}).setdefault(e, what)
            if e not in p.ban.setdefault(layer, []):
                p.ban[layer].append(e)
        elif isinstance(iv, ZeroExpert):
            layer = _layer(cfg, iv.layer, what, True)
            e = _expert(cfg, iv.expert, what)
            if e not in p.zero.setdefault(layer, []):
                p.zero[layer].append(e)
        elif isinstance(iv, ForceExpert):
            layer = _layer(cfg, iv.layer, what, True)
            e = _expert(cfg, iv.expert, what)
            if iv.positions is not None:
                given = _positions(iv.positions, what)
                bad = [q for q in given if not -seq <= q < seq]
                if bad:
                    raise InterventionError(f"{what}: positions {bad} outside the sequence of "
                                            f"length {seq}")
                pos = tuple(sorted({q % seq for q in given}))
            else:
                pos = None
            force_src.setdefault(layer, []).append((e, pos, what))
            if (e, pos) not in p.force.setdefault(layer, []):
                p.force[layer].append((e, pos))
        elif isinstance(iv, SetTopK):
            k = _int(iv.k, what, "k")
            layers = cfg.moe_layers if iv.layer is None else [_layer(cfg, iv.layer, what, True)]
            if not 1 <= k <= cfg.num_local_experts:
                raise InterventionError(f"{what}: k={k} must be in 1..{cfg.num_local_experts}")
            for layer in layers:
                if layer in topk_src:
                    raise InterventionError(
                        f"{topk_src[layer]} and {what} both set the top-k of layer {layer}; "
                        "give set_top_k once per layer")
                topk_src[layer] = what
                p.top_k[layer] = k
        elif isinstance(iv, AblateHead):
            layer = _layer(cfg, iv.layer, what, False)
            head = _int(iv.head, what, "head")
            if not 0 <= head < cfg.num_attention_heads:
                raise InterventionError(f"{what}: head {head} out of range "
                                        f"(num_attention_heads={cfg.num_attention_heads})")
            if head not in p.ablate.setdefault(layer, []):
                p.ablate[layer].append(head)
        elif isinstance(iv, DisableTemperature):
            hot = [i for i in range(cfg.num_hidden_layers) if cfg.uses_temperature(i)]
            if iv.layer is None:
                if not hot:
                    raise InterventionError(f"{what}: no layer of this model scales its queries "
                                            "by temperature (attn_temperature_tuning is off or "
                                            "every layer uses RoPE)")
                p.no_temperature.update(hot)
            else:
                layer = _layer(cfg, iv.layer, what, False)
                if layer not in hot:
                    raise InterventionError(f"{what}: layer {layer} has no query temperature "
                                            f"(layers with one: {hot})")
                p.no_temperature.add(layer)
        elif isinstance(iv, Patch):
            name, val = _patch_value(cfg, iv, what, p, batch, seq)
            if name in patch_src:
                raise InterventionError(f"{patch_src[name]} and {what} both patch {name!r}; "
                                        "give one patch per hook")
            patch_src[name] = what
            p.patches[name] = val
        else:
            raise InterventionError(
                f"unknown intervention {iv!r}; use wb.ban_expert, zero_expert, force_expert, "
                "set_top_k, ablate_head, disable_temperature or patch")
        p.records.append(describe(iv))
    _check_routing(cfg, p, ban_src, force_src, topk_src, patch_src, seq)
    if hooks is not None and not isinstance(hooks, Mapping):
        raise InterventionError(f"hooks must be a mapping {{hook name: function}}, got "
                                f"{type(hooks).__name__}")
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


def _patch_value(cfg: ModelConfig, iv: Patch, what: str, p: Plan, batch: int,
                 seq: int) -> tuple[str, np.ndarray]:
    """A patch's hook name and value, checked and in the form the backends take: the hook's
    shape (a broadcast view), int32 for expert indices, float32 for every float hook."""
    if not isinstance(iv.name, str):
        raise InterventionError(f"{what}: the hook name must be a string, got "
                                f"{type(iv.name).__name__}")
    try:
        check_name(cfg, iv.name)
    except KeyError as e:
        raise InterventionError(f"{what}: {e}") from None
    arr = _patch_array(iv.value, what)
    _check_finite(arr, what, bool(iv.allow_nonfinite))
    hook = parse(iv.name)
    top_k = p.k(cfg, hook.layer) if hook.block == "moe" else None
    shape = hook_shape(cfg, iv.name, batch, seq, top_k=top_k)
    try:
        np.broadcast_to(arr, shape)
    except ValueError:
        raise InterventionError(f"{what}: value of shape {arr.shape} does not broadcast to the "
                                f"hook's shape {shape}") from None
    if hook_dtype(iv.name, np.float32).kind in "iu":  # expert indices
        E = cfg.num_local_experts
        if arr.dtype.kind not in "iu":
            raise InterventionError(f"{what}: {iv.name} holds expert indices; the value must be "
                                    f"ints in 0..{E - 1}, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= E):
            bad = arr[(arr < 0) | (arr >= E)].ravel()[0]
            raise InterventionError(f"{what}: expert indices outside 0..{E - 1} (e.g. {bad})")
        arr = arr.astype(np.int32)
    else:
        # one rounding path for both backends: the value in float32, then the model dtype
        arr = arr.astype(np.float32)
    return iv.name, np.broadcast_to(arr, shape)


def _check_routing(cfg: ModelConfig, p: Plan, ban_src: dict[int, dict[int, str]],
                   force_src: dict[int, list[tuple[int, tuple[int, ...] | None, str]]],
                   topk_src: dict[int, str], patch_src: dict[str, str], seq: int) -> None:
    """Contradictions between the routing interventions of each MoE layer."""
    E = cfg.num_local_experts
    for layer in sorted(set(ban_src) | set(force_src)):
        k = p.k(cfg, layer)
        bans = ban_src.get(layer, {})
        forces = force_src.get(layer, [])
        ktext = f"k={k}, set by {topk_src[layer]}" if layer in topk_src else \
            f"k={k}, the model's num_experts_per_tok"
        routing = f"layers.{layer}.moe.topk_indices"
        if routing in patch_src:
            raise InterventionError(
                f"{patch_src[routing]} replaces the routing of layer {layer}, so "
                f"{_names([*bans.values(), *(w for _, _, w in forces)])} would have no effect; "
                "drop one of them")
        for e, _, w in forces:
            if e in bans:
                raise InterventionError(f"{w} forces expert {e}, which {bans[e]} bans from "
                                        f"layer {layer}")
        left = E - len(bans)
        if left == 0:
            raise InterventionError(f"{_names(bans.values())} ban all {E} experts of layer "
                                    f"{layer}: no expert is left to route to")
        if left < k:
            raise InterventionError(f"{_names(bans.values())} leave {left} of {E} experts in "
                                    f"layer {layer}, fewer than the {k} each token needs "
                                    f"({ktext})")
        if forces:
            # the experts forced at each position (None: those forced everywhere)
            everywhere = {e for e, pos, _ in forces if pos is None}
            at: dict[int | None, set[int]] = {None: everywhere}
            for e, pos, _ in forces:
                for q in pos or ():
                    at.setdefault(q, set(everywhere)).add(e)
            worst_q = max(at, key=lambda q: (len(at[q]), q is None))
            worst = at[worst_q]
            if len(worst) > k:
                whats = [w for e, pos, w in forces if e in worst
                         and (pos is None or worst_q in pos)]
                where = "every position" if worst_q is None else f"position {worst_q}"
                raise InterventionError(
                    f"{_names(whats)} force {len(worst)} experts ({sorted(worst)}) at {where} "
                    f"of layer {layer}, but a token has only {k} slot(s) there ({ktext})")


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
        rec = {"kind": "patch", "name": iv.name, "shape": list(np.shape(iv.value))}
        if iv.allow_nonfinite:
            rec["allow_nonfinite"] = True
        return rec
    d = {f.name: getattr(iv, f.name) for f in fields(iv)}
    if d.get("positions") is not None:
        d["positions"] = [int(q) for q in d["positions"]]
    for key in ("layer", "expert", "head", "k"):
        if _is_int(d.get(key)):
            d[key] = int(d[key])
    return d
