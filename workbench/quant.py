"""FP8 checkpoints in the compressed-tensors layout: the scheme, numpy (de)quantisation, writing.

Meta's ``Llama-4-Maverick-17B-128E-Instruct-FP8`` and llm-compressor outputs store each routed
expert unfused (``feed_forward.experts.{e}.{gate,up,down}_proj.weight``) as float8_e4m3fn in
nn.Linear layout (out, in), with a static ``weight_scale`` of shape (out, 1): one scale per
output channel, ``w = q * scale``. Activations are quantised dynamically per token at run time.
config.json's ``quantization_config`` (``quant_method: "compressed-tensors"``, ``format:
"float-quantized"``) says so, and its ``ignore`` list names the Linear modules kept in bf16.

This module reads that config (:func:`parse_quantization_config`), quantises and dequantises
with numpy (:func:`quantize_fp8`, :func:`dequantize`) and writes such checkpoints from any
checkpoint the workbench reads (:func:`quantize_checkpoint`, ``workbench quantize``). It needs
neither torch nor the ``compressed-tensors`` library.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_EPS = float(np.finfo(np.float32).eps)  # smallest scale (an all-zero channel)
QUANT_MODES = ("weights", "w8a8")
SCHEMES = ("fp8-channel",)
_STRATEGIES = ("channel", "tensor")
_UNSUPPORTED_STRATEGIES = {"group": "per-group scales", "block": "per-block scales",
                           "tensor_group": "per-tensor-group scales", "token": "weights "
                           "scaled per token"}
# Linear modules of a Llama 4 text model the workbench can hold quantised (canonical names)
_LINEAR = re.compile(r"(layers\.\d+\.(self_attn\.[qkvo]_proj|feed_forward\.(router|"
                     r"shared_expert\.(gate|up|down)_proj|(gate|up|down)_proj|experts\.\d+\."
                     r"(gate|up|down)_proj))|lm_head)\.weight")
EXPERT_PART = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(gate|up|down)_proj"
                         r"\.weight")


@dataclass(frozen=True)
class QuantScheme:
    """A checkpoint's compressed-tensors ``quantization_config``, as the workbench reads it.

    ``strategy``: "channel" (scale (out, 1)) or "tensor" (one scale); ``activations``:
    "token" when activations are quantised dynamically per token to FP8, else None.
    ``targets``/``ignore`` are the config's module patterns (names or ``re:`` regexes).
    """

    strategy: str
    activations: str | None
    targets: tuple[str, ...]
    ignore: tuple[str, ...]
    source: str = "config.json"

    def quantises(self, hf_module: str) -> bool:
        """Whether the Linear module ``hf_module`` (HF name, no ``.weight``) is quantised:
        some target matches it and no ``ignore`` entry does."""
        targeted = any(t == "Linear" or _match(t, hf_module) for t in self.targets)
        return targeted and not self.ignored(hf_module)

    def ignored(self, hf_module: str) -> bool:
        """Whether the config's ``ignore`` list keeps ``hf_module`` unquantised."""
        return any(_match(t, hf_module) for t in self.ignore)

    def describe(self) -> str:
        """One line: format, weights and activations."""
        acts = "activations FP8 dynamic per token" if self.activations else \
            "activations unquantised"
        return (f"compressed-tensors float-quantized: weights FP8 E4M3, static "
                f"{self.strategy}-wise scales; {acts}")


def _match(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name or name.endswith("." + pattern) and "." not in pattern


def parse_quantization_config(raw: Any, source: str,
                              error: type[Exception] = ValueError) -> QuantScheme:
    """Check a config.json ``quantization_config`` and return the scheme; anything the
    workbench cannot run raises ``error`` naming the field, the value and what is supported."""
    where = f"{source}: quantization_config"
    if not isinstance(raw, Mapping):
        raise error(f"{where} must be an object, got {type(raw).__name__}")
    method = raw.get("quant_method")
    if method == "fbgemm_fp8":
        raise error(f"{where}: quant_method 'fbgemm_fp8' (fbgemm's FP8 layout: fused experts "
                    "with per-row scales) is not supported; the workbench reads the "
                    "compressed-tensors FP8 layout (Meta's -FP8 releases, llm-compressor)")
    if method != "compressed-tensors":
        raise error(f"{where}: quant_method {method!r} is not supported; supported: "
                    "'compressed-tensors' with format 'float-quantized' (FP8 weights)")
    fmt = raw.get("format")
    if fmt != "float-quantized":
        what = {"pack-quantized": "int4/int8 weights packed into int32", "naive-quantized":
                "unpacked integer weights", "int-quantized": "int8 weights",
                "nvfp4-pack-quantized": "FP4 weights", "dense": "no quantisation",
                "marlin-24": "2:4 sparse int4 weights"}.get(str(fmt), "an unknown format")
        raise error(f"{where}: format {fmt!r} ({what}) is not supported; supported: "
                    "'float-quantized' (FP8 E4M3 weights, channel- or tensor-wise scales)")
    status = raw.get("quantization_status", "compressed")
    if status not in ("compressed", "frozen"):
        raise error(f"{where}: quantization_status {status!r}: only 'compressed' checkpoints "
                    "(weights stored quantised) are read")
    groups = raw.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise error(f"{where}: config_groups must be a non-empty object")
    if len(groups) > 1:
        raise error(f"{where}: {len(groups)} config_groups ({', '.join(map(str, groups))}); "
                    "the workbench reads one scheme for every quantised module")
    (gname, group), = groups.items()
    if not isinstance(group, Mapping):
        raise error(f"{where}: config_groups.{gname} must be an object")
    w = group.get("weights")
    if not isinstance(w, Mapping):
        raise error(f"{where}: config_groups.{gname}.weights must be an object (weights "
                    "unquantised are not a quantised checkpoint)")
    wtype, bits = w.get("type"), w.get("num_bits")
    if wtype != "float" or bits != 8:
        raise error(f"{where}: config_groups.{gname}.weights: {bits}-bit {wtype} weights are not "
                    "supported; supported: 8-bit float (FP8 E4M3)")
    strategy = w.get("strategy")
    if strategy not in _STRATEGIES:
        desc = _UNSUPPORTED_STRATEGIES.get(str(strategy), "an unknown strategy")
        raise error(f"{where}: config_groups.{gname}.weights.strategy {strategy!r} ({desc}) is "
                    "not supported; supported: 'channel' (one scale per output channel) and "
                    "'tensor'")
    if w.get("symmetric", True) is not True:
        raise error(f"{where}: asymmetric weights (zero points) are not supported; FP8 "
                    "checkpoints are symmetric")
    if w.get("dynamic", False):
        raise error(f"{where}: weights.dynamic=true: weight scales must be stored (static)")
    acts = group.get("input_activations")
    act = None
    if acts is not None:
        if not isinstance(acts, Mapping):
            raise error(f"{where}: config_groups.{gname}.input_activations must be an object "
                        "or null")
        if acts.get("type") != "float" or acts.get("num_bits") != 8 or \
                acts.get("strategy") not in ("token", "tensor") or not acts.get("dynamic"):
            raise error(f"{where}: input_activations {_short(dict(acts))}: only dynamic FP8 "
                        "activations (per token) are emulated")
        act = "token"
    if group.get("output_activations") is not None:
        raise error(f"{where}: output_activations quantisation is not supported")
    if raw.get("kv_cache_scheme") is not None:
        raise error(f"{where}: kv_cache_scheme (a quantised KV cache) is not supported")
    targets = group.get("targets")
    ignore = raw.get("ignore") or []
    for field, val in (("targets", targets), ("ignore", ignore)):
        if not isinstance(val, list) or not all(isinstance(t, str) for t in val):
            raise error(f"{where}: {field} must be a list of strings, got {_short(val)}")
    for t in [*targets, *ignore]:
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as e:
                raise error(f"{where}: bad regular expression {t!r}: {e}") from None
    return QuantScheme(strategy, act, tuple(targets), tuple(ignore), source)


def _short(v: object, n: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def read_quantization_config(path: str | os.PathLike,
                             error: type[Exception] = ValueError) -> QuantScheme | None:
    """The scheme of a checkpoint directory's config.json, or None when it has no
    ``quantization_config``."""
    from .config import _MAX_CONFIG_BYTES, _MAX_CONFIG_DEPTH, load_strict_json, read_regular_file
    f = Path(path) / "config.json"
    if not f.is_file():
        return None
    raw = load_strict_json(read_regular_file(f, _MAX_CONFIG_BYTES, error), _MAX_CONFIG_DEPTH)
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    if qc is None and isinstance(raw, dict) and isinstance(raw.get("text_config"), dict):
        qc = raw["text_config"].get("quantization_config")
    return None if qc is None else parse_quantization_config(qc, str(f), error)


def is_linear(name: str) -> bool:
    """Whether a canonical tensor name is the weight of a Linear module."""
    return _LINEAR.fullmatch(name) is not None


# ----------------------------------------------------------------------------- numerics
def quantize_fp8(w: np.ndarray, strategy: str = "channel") -> tuple[np.ndarray, np.ndarray]:
    """Quantise an nn.Linear weight (out, in) to FP8 E4M3 with static symmetric scales, as
    compressed-tensors does: ``scale = max|w| / 448`` per output channel (``(out, 1)``) or for
    the whole tensor (``(1,)``), ``q = fp8(clip(w / scale, ±448))``. Returns (q, scale float32)."""
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize_fp8: expected an (out, in) weight, got shape {w.shape}")
    if strategy == "channel":
        amax = np.abs(w).max(axis=1, keepdims=True)
    elif strategy == "tensor":
        amax = np.abs(w).max(keepdims=True).reshape(1)
    else:
        raise ValueError(f"quantize_fp8: strategy {strategy!r}; use one of {_STRATEGIES}")
    scale = np.maximum(amax / np.float32(FP8_MAX), np.float32(SCALE_EPS)).astype(np.float32)
    q = np.clip(w / (scale if strategy == "channel" else scale[0]), -FP8_MAX, FP8_MAX)
    return q.astype(FP8), scale


def dequantize(q: np.ndarray, scale: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """``q * scale`` in float32, cast to ``dtype``; ``scale`` broadcasts along q's rows
    ((out, 1) or (out,) against (out, in)) or is one value."""
    s = np.asarray(scale, np.float32)
    if s.ndim == 1 and s.size > 1:
        s = s[:, None]
    out = np.asarray(q).astype(np.float32) * s.reshape(s.shape if s.size > 1 else ())
    return out.astype(dtype, copy=False)


def fp8_tokens(x: np.ndarray) -> np.ndarray:
    """Dynamic per-token FP8 quantise-dequantise of activations (..., D) in float32: what a
    vLLM-style server does to each Linear input (the numpy reference of ``quant="w8a8"``)."""
    x = np.asarray(x, np.float32)
    s = np.maximum(np.abs(x).max(-1, keepdims=True) / np.float32(FP8_MAX),
                   np.float32(SCALE_EPS))
    return np.clip(x / s, -FP8_MAX, FP8_MAX).astype(FP8).astype(np.float32) * s


# ----------------------------------------------------------------------------- writing
# what `workbench quantize` keeps in bf16 (Meta's FP8 release keeps the same modules)
MAVERICK_IGNORE = ("re:.*self_attn.*", "re:.*feed_forward\\.router$",
                   "re:.*shared_expert.*", "re:.*feed_forward\\.(gate|up|down)_proj$",
                   "re:.*lm_head$", "re:.*vision_model.*", "re:.*multi_modal_projector.*")


def scheme_config(scheme: str = "fp8-channel") -> dict[str, Any]:
    """The config.json ``quantization_config`` that ``quantize_checkpoint`` writes."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme {scheme!r}: supported schemes are {', '.join(SCHEMES)}")
    args = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
            "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
            "observer_kwargs": {}, "strategy": "channel"}
    acts = dict(args, dynamic=True, strategy="token", observer=None)
    return {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "quantization_status": "compressed", "kv_cache_scheme": None,
        "global_compression_ratio": None, "ignore": list(MAVERICK_IGNORE),
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args,
                                      "input_activations": acts, "output_activations": None,
                                      "format": "float-quantized"}},
    }


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike,
                        scheme: str = "fp8-channel", max_shard_bytes: int = 2 * 1024**3,
                        ) -> Path:
    """Write ``src`` (any checkpoint the workbench reads) as a compressed-tensors FP8
    checkpoint in ``out``: routed experts unfused per expert in FP8 E4M3 with per-channel
    ``weight_scale`` (out, 1); everything else (attention, routers, shared experts, dense MLPs,
    embeddings, norms, lm_head, vision tensors) as stored. config.json gets the
    ``quantization_config``; tokenizer files are copied. Reads and writes one layer at a time,
    in shards of at most ``max_shard_bytes``; ``out`` appears only when complete."""
    from .checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, CheckpointError, write_safetensors
    qc = scheme_config(scheme)
    ck = Checkpoint.open(src)
    if ck.quant is not None:
        raise CheckpointError(f"{src}: already quantised ({ck.quant.describe()})")
    dst = Path(out)
    if dst.exists():
        raise CheckpointError(f"cannot quantise into {dst}: it exists (choose a new directory)")
    cfg = ck.config
    mm = cfg.multimodal
    pre = "language_model.model." if mm else "model."
    head = "language_model.lm_head.weight" if mm else "lm_head.weight"

    def hf(name: str) -> str:
        return head if name == "lm_head.weight" else pre + name

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for name in ck.weight_names():
            if ".experts." not in name:
                yield hf(name), ck.view(name)
        for i in cfg.moe_layers:
            p = f"layers.{i}.feed_forward.experts."
            for e in range(cfg.num_local_experts):
                w = ck.expert(i, e)
                gu = w.dequantized()[0].T  # (2I, D)
                inter = gu.shape[0] // 2
                parts = {"gate_proj": gu[:inter], "up_proj": gu[inter:],
                         "down_proj": w.dequantized()[1].T}
                for proj, a in parts.items():
                    q, s = quantize_fp8(a, "channel")
                    yield hf(f"{p}{e}.{proj}.weight"), q
                    yield hf(f"{p}{e}.{proj}.weight_scale"), s
                ck.evict_expert(i, e)
        yield from ck.raw_ignored()

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.quantising-", dir=dst.parent))
    try:
        shards: list[tuple[str, list[str]]] = []
        batch: dict[str, np.ndarray] = {}
        size = total = 0

        def flush() -> None:
            nonlocal batch, size
            fname = f"model-{len(shards) + 1:05d}.safetensors"
            write_safetensors(tmp / fname, batch, {"format": "pt"})
            shards.append((fname, list(batch)))
            batch, size = {}, 0

        for name, a in tensors():
            a = np.ascontiguousarray(a)
            if batch and size + a.nbytes > max_shard_bytes:
                flush()
            batch[name] = a
            size += a.nbytes
            total += a.nbytes
        if batch or not shards:
            flush()
        if len(shards) == 1:
            os.rename(tmp / shards[0][0], tmp / SINGLE_FILE)
        else:
            n = len(shards)
            weight_map = {}
            for j, (fname, names) in enumerate(shards, 1):
                final = f"model-{j:05d}-of-{n:05d}.safetensors"
                os.rename(tmp / fname, tmp / final)
                weight_map.update(dict.fromkeys(names, final))
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                      "weight_map": weight_map}, indent=2))
        raw = json.loads((Path(src) / "config.json").read_text())
        raw["quantization_config"] = qc
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        for f in Path(src).iterdir():
            if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens"))
                                or f.name in ("generation_config.json", "chat_template.jinja")):
                shutil.copyfile(f, tmp / f.name)
        os.chmod(tmp, 0o755)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        ck.close()
    return dst


def check_quant(quant: str | None, ck: Any) -> str | None:
    """Validate ``wb.load(..., quant=)`` against the checkpoint ``ck``; the mode to run.

    None: "weights" for an FP8 checkpoint, None otherwise. "weights": FP8 weights dequantised
    at use, activations in the compute dtype. "w8a8": also quantise every routed-expert
    matmul input per token to FP8 and back, as vLLM-style servers run FP8 checkpoints.
    """
    if quant is not None and quant not in QUANT_MODES:
        raise ValueError(f"quant={quant!r}: choose one of {QUANT_MODES} (FP8 checkpoints) or "
                         "None")
    if ck.quant is None:
        if quant is not None:
            raise ValueError(f"quant={quant!r} needs an FP8 checkpoint; {ck.path} holds no "
                             "quantization_config (make one with `workbench quantize CKPT "
                             "--out DIR --scheme fp8-channel`)")
        return None
    if quant == "w8a8":
        if ck.quant.activations is None:
            raise ValueError(f"quant='w8a8': {ck.path}'s quantization_config leaves "
                             "activations unquantised (no input_activations); use "
                             "quant='weights'")
        dense = [n for n in ck.quantized_names() if ".experts." not in n]
        if dense:
            raise ValueError(f"quant='w8a8' emulates FP8 activations at the routed experts; "
                             f"{ck.path} also quantises {dense[:3]}"
                             f"{' ...' if len(dense) > 3 else ''}, whose inputs it would "
                             "miss; use quant='weights'")
    return quant or "weights"
