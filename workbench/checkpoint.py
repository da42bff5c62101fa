"""Checkpoint: lazy, validated access to HF-layout Llama 4 safetensors by canonical name.

Canonical names drop the HF prefixes: ``model.layers.0.self_attn.q_proj.weight`` and
``language_model.model.layers.0.self_attn.q_proj.weight`` are both
``layers.0.self_attn.q_proj.weight``; ``lm_head.weight`` and ``language_model.lm_head.weight`` are
``lm_head.weight``. Tensors are memory-mapped and read only when asked for. The safetensors header
is parsed and checked here so that every defect gets one message naming the file and tensor;
the safetensors library then opens each file too and must accept it.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import ml_dtypes
import numpy as np

from .config import (
    ModelConfig,
    VisionConfig,
    load_strict_json,
    read_regular_file,
    regular_file_stat,
)
from .hooks import layer_of
from .quant import EXPERT_PART, FP8, QuantScheme, dequantize, is_linear, read_quantization_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100_000_000  # the safetensors library's own limit (MAX_HEADER_SIZE)
_MAX_HEADER_DEPTH = 8  # a valid header nests 3 levels: {name: {"shape": [...]}}
_MAX_INDEX_DEPTH = 8
_INT64_MAX = 2**63 - 1

_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": FP8,  # float8_e4m3fn: only in FP8 checkpoints with a quantization_config
}
_FP8 = {"F8_E5M2", "F8_E4M3FN", "F8_E8M0", "F4", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
        "F6_E2M3", "F6_E3M2"}
# dtypes the safetensors format knows that the workbench does not read
_ST_OTHER = {"U16", "U32", "U64", "C64"}
_NP_TO_ST = {v: k for k, v in _DTYPES.items()}
_FLOAT_WEIGHTS = {"F32", "F16", "BF16"}
_SCALE_SUFFIX = "_scale"  # compressed-tensors: "<module>.weight_scale" next to "<module>.weight"
_UNSUPPORTED_PARTS = {  # compressed-tensors companions of schemes the workbench does not run
    ".weight_zero_point": "zero points (asymmetric quantisation)",
    ".weight_packed": "packed int4/int8 weights", ".weight_shape": "packed weights",
    ".weight_global_scale": "FP4 global scales", ".input_scale": "static activation scales",
    ".weight_g_idx": "activation-ordered groups",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names file, tensor and shapes."""


class CheckpointWarning(UserWarning):
    """A checkpoint that loads but is not what the format or the config promises."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is."""

    name: str  # canonical
    hf_name: str
    file: Path
    dtype: str  # safetensors dtype tag, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class ExpertWeights:
    """One routed expert as stored, in the canonical layout: gate_up (D, 2I) and down (I, D)
    (input dimension first); FP8 experts carry float32 per-output-channel scales (2I,), (D,)."""

    gate_up: np.ndarray
    down: np.ndarray
    gate_up_scale: np.ndarray | None
    down_scale: np.ndarray | None

    @property
    def quantized(self) -> bool:
        return self.gate_up_scale is not None

    @property
    def nbytes(self) -> int:
        """Bytes as stored (weights and scales)."""
        return sum(a.nbytes for a in (self.gate_up, self.down, self.gate_up_scale,
                                      self.down_scale) if a is not None)

    def dequantized(self, dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(gate_up, down) in ``dtype``: FP8 times its scales, float weights converted."""
        if not self.quantized:
            return self.gate_up.astype(dtype), self.down.astype(dtype)
        return ((self.gate_up.astype(np.float32) * self.gate_up_scale).astype(dtype),
                (self.down.astype(np.float32) * self.down_scale).astype(dtype))


def canonical_name(hf_name: str) -> str | None:
    """Map an HF tensor name to its canonical name; None for vision/projector tensors."""
    if hf_name.startswith(("vision_model.", "multi_modal_projector.", "model.vision_model.",
                           "model.multi_modal_projector.")):
        return None
    for prefix in ("language_model.model.", "model.language_model.", "model."):
        if hf_name.startswith(prefix):
            return hf_name[len(prefix):]
    for prefix in ("language_model.lm_head.", "lm_head."):
        if hf_name.startswith(prefix):
            return "lm_head." + hf_name[len(prefix):]
    return hf_name


VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


def vision_name(hf_name: str) -> str | None:
    """The canonical name of a vision-tower or projector tensor (its HF name without a leading
    ``model.``: ``vision_model.class_embedding``, ``multi_modal_projector.linear_1.weight``);
    None for every other tensor."""
    name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
    return name if name.startswith(VISION_PREFIXES) else None


def vision_expected_shapes(vc: VisionConfig, text_hidden: int) -> dict[str, tuple[int, ...]]:
    """Every vision-tower and projector tensor of this vision config, with its shape."""
    h, inter, c, p = vc.hidden_size, vc.intermediate_size, vc.num_channels, vc.patch_size
    v = "vision_model."
    out: dict[str, tuple[int, ...]] = {
        v + "patch_embedding.linear.weight": (h, c * p * p),
        v + "class_embedding": (h,),
        v + "positional_embedding_vlm": (vc.num_patches, h),
        v + "layernorm_pre.weight": (h,), v + "layernorm_pre.bias": (h,),
        v + "layernorm_post.weight": (h,), v + "layernorm_post.bias": (h,),
    }
    for j in range(vc.num_hidden_layers):
        lp = f"{v}model.layers.{j}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{lp}self_attn.{proj}.weight"] = (h, h)
            out[f"{lp}self_attn.{proj}.bias"] = (h,)
        out[lp + "mlp.fc1.weight"] = (inter, h)
        out[lp + "mlp.fc1.bias"] = (inter,)
        out[lp + "mlp.fc2.weight"] = (h, inter)
        out[lp + "mlp.fc2.bias"] = (h,)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{lp}{norm}.weight"] = (h,)
            out[f"{lp}{norm}.bias"] = (h,)
    out[v + "vision_adapter.mlp.fc1.weight"] = (vc.projector_input_dim, inter)
    out[v + "vision_adapter.mlp.fc2.weight"] = (vc.projector_output_dim,
                                                vc.projector_output_dim)
    out["multi_modal_projector.linear_1.weight"] = (text_hidden, vc.vision_output_dim)
    return out


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor a checkpoint of this config must hold, with its shape."""
    D, V, d = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    H, K, E = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_local_experts
    I, Im = cfg.intermediate_size, cfg.intermediate_size_mlp
    out: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (V, D), "norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, D)
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        out[p + "input_layernorm.weight"] = (D,)
        out[p + "post_attention_layernorm.weight"] = (D,)
        out[p + "self_attn.q_proj.weight"] = (H * d, D)
        out[p + "self_attn.k_proj.weight"] = (K * d, D)
        out[p + "self_attn.v_proj.weight"] = (K * d, D)
        out[p + "self_attn.o_proj.weight"] = (D, H * d)
        f = p + "feed_forward."
        if cfg.is_moe(i):
            out[f + "router.weight"] = (E, D)
            out[f + "experts.gate_up_proj"] = (E, D, 2 * I)
            out[f + "experts.down_proj"] = (E, I, D)
            out[f + "shared_expert.gate_proj.weight"] = (I, D)
            out[f + "shared_expert.up_proj.weight"] = (I, D)
            out[f + "shared_expert.down_proj.weight"] = (D, I)
        else:
            out[f + "gate_proj.weight"] = (Im, D)
            out[f + "up_proj.weight"] = (Im, D)
            out[f + "down_proj.weight"] = (D, Im)
    return out


def _short(v: object, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def _is_index(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """Parse and check a safetensors header: (tensors, metadata, data_start). No data is read.

    Checked as the format promises: a regular file; an 8-byte length and at most 100 MB of
    UTF-8 JSON header, an object with unique keys nested at most a few levels; per tensor a
    known dtype, a shape of non-negative integers and two integer ``data_offsets`` inside the
    data area whose span is the shape's byte size; no two tensors overlapping. A gap between
    tensors or bytes after the last one get a :class:`CheckpointWarning`; a file without them
    is also opened by the ``safetensors`` library, which must accept it too.
    """
    size = _regular_file(path).st_size
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes; the 8-byte "
                              "header length is missing)")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors header (declares {n} header bytes, "
                f"file has {size} bytes; at most {_MAX_HEADER} header bytes are allowed)")
        raw = fh.read(n)
    try:
        header = load_strict_json(raw, _MAX_HEADER_DEPTH)
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header, {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map "
                              f"strings to strings, got {_short(meta)}")
    data_start = 8 + n
    data_len = size - data_start
    spans = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: corrupt header entry {_short(info)} (expected an "
                                  "object with dtype, shape and data_offsets)")
        lacks = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if lacks:
            raise CheckpointError(f"{where}: corrupt header entry {_short(info)} lacks "
                                  f"{', '.join(lacks)}")
        dt = info["dtype"]
        if not isinstance(dt, str):
            raise CheckpointError(f"{where}: dtype must be a string, got {_short(dt)}")
        if dt in _FP8:
            raise CheckpointError(
                f"{path}: tensor {name!r} is {dt}: FP8/FP4-quantised Llama 4 checkpoints (e.g. "
                "Maverick-FP8) are not supported; use the bf16 release")
        if dt not in _DTYPES:
            known = "unsupported" if dt in _ST_OTHER else "unknown"
            raise CheckpointError(f"{where} has {known} dtype {_short(dt)} (readable: "
                                  f"{', '.join(_DTYPES)})")
        shape = info["shape"]
        if not isinstance(shape, list) or not all(_is_index(s) and 0 <= s <= _INT64_MAX
                                                  for s in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got "
                                  f"{_short(shape)}")
        offsets = info["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(_is_index(o) for o in offsets)):
            raise CheckpointError(f"{where}: data_offsets must be two integers [begin, end], "
                                  f"got {_short(offsets)}")
        b, e = offsets
        if b < 0 or e < b:
            raise CheckpointError(f"{where}: data_offsets {offsets} are negative or reversed "
                                  "(offsets count from the end of the header)")
        if e > data_len:
            raise CheckpointError(
                f"{path}: truncated file: tensor {name!r} ends at byte {data_start + e} but the "
                f"file has {size} bytes")
        want = math.prod(shape) * _DTYPES[dt].itemsize
        if e - b != want:
            raise CheckpointError(
                f"{path}: tensor {name!r} declares shape {tuple(shape)} "
                f"{'F8_E4M3 (FP8)' if dt == 'F8_E4M3' else dt} "
                f"({want} bytes) but spans {e - b} bytes")
        spans.append((b, e, name))
    spans.sort()
    end, last, gaps = 0, None, 0
    for b, e, name in spans:
        if b < end:
            raise CheckpointError(f"{path}: tensors {last!r} and {name!r} overlap (bytes "
                                  f"{b}..{min(e, end)} of the data belong to both)")
        gaps += b - end
        end, last = e, name
    trailing = data_len - end
    if gaps or trailing:
        unused = " and ".join(w for w in (f"{gaps} bytes between tensors" if gaps else "",
                                          f"{trailing} bytes after the last tensor"
                                          if trailing else "") if w)
        warnings.warn(CheckpointWarning(
            f"{path}: {unused} belong to no tensor (the safetensors format has no holes; other "
            "readers, transformers included, may refuse this file)"), stacklevel=3)
    else:
        _library_check(path)
    return header, meta, data_start


def _library_check(path: Path) -> None:
    """Let the safetensors library parse the header too; its refusal becomes ours."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:  # pragma: no cover - a dependency, but not needed to read
        return
    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except SafetensorError as e:
        raise CheckpointError(f"{path}: refused by the safetensors library: {e}") from None


def _regular_file(path: Path) -> os.stat_result:
    """stat ``path``; CheckpointError unless it is a regular file."""
    return regular_file_stat(path, CheckpointError)


def _inside(root: Path, rel: str, source: Path | None = None) -> Path:
    """``root / rel`` if it stays inside the checkpoint directory ``root``.

    ``rel`` must be relative, without ``..``; after following symlinks the file must lie in
    ``root`` or, for the Hugging Face cache layout (``.../snapshots/<rev>/name`` linking to
    ``.../blobs/<hash>``), in that repository's ``blobs`` directory. ``source``: the file that
    named ``rel`` (the index), for the message.
    """
    by = f"{source}: " if source is not None else f"{root}: "
    pure = PurePosixPath(rel.replace("\\", "/"))
    if not rel or "\x00" in rel or pure.is_absolute() or PureWindowsPath(rel).drive:
        raise CheckpointError(f"{by}shard file name {_short(rel, 300)} must be a relative path "
                              "inside the checkpoint directory")
    if ".." in pure.parts:
        raise CheckpointError(f"{by}shard file name {_short(rel, 300)} leaves the checkpoint "
                              "directory ('..')")
    p = root / rel
    if not os.path.lexists(p):
        return p  # reported as missing by the caller
    try:
        real_root = root.resolve(strict=True)
        real = p.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{p}: cannot resolve ({e})") from None
    allowed = [real_root]
    if real_root.parent.name == "snapshots":  # the Hugging Face hub cache
        allowed.append(real_root.parent.parent / "blobs")
    if not any(real == a or a in real.parents for a in allowed):
        raise CheckpointError(f"{by}{rel} is a symlink to {real}, outside the checkpoint "
                              f"directory {real_root}")
    return p


_SPECIAL_BITS = {  # dtype -> (same-size unsigned int, exponent mask, mantissa mask)
    np.dtype(np.float32): (np.uint32, 0x7F800000, 0x007FFFFF),
    np.dtype(np.float16): (np.uint16, 0x7C00, 0x03FF),
    np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80, 0x007F),
}


def scan_values(arr: np.ndarray, chunk: int = 1 << 24) -> tuple[int, int]:
    """(NaN count, ±Inf count) of a floating array, read in chunks (float32/16 and bfloat16
    by bit pattern: no conversion, no large temporaries). Non-float arrays give (0, 0)."""
    spec = _SPECIAL_BITS.get(arr.dtype)
    flat = arr.reshape(-1)
    nan = inf = 0
    if arr.dtype == FP8:  # E4M3FN: no infinities; NaN is S.1111.111
        bits = flat.view(np.uint8)
        for s in range(0, bits.size, chunk):
            nan += int(np.count_nonzero((bits[s:s + chunk] & 0x7F) == 0x7F))
        return nan, 0
    if spec is None:
        if arr.dtype.kind != "f":
            return 0, 0
        for s in range(0, flat.size, chunk):
            x = flat[s:s + chunk]
            nan += int(np.count_nonzero(np.isnan(x)))
            inf += int(np.count_nonzero(np.isinf(x)))
        return nan, inf
    ut, exp, man = spec
    bits = flat.view(ut)
    exp, man = ut(exp), ut(man)
    for s in range(0, bits.size, chunk):
        x = bits[s:s + chunk]
        special = (x & exp) == exp
        n_special = int(np.count_nonzero(special))
        if n_special:
            k = int(np.count_nonzero(special & ((x & man) != 0)))
            nan += k
            inf += n_special - k
    return nan, inf


class Checkpoint(Mapping[str, np.ndarray]):
    """Lazy, validated view of a Llama 4 checkpoint directory.

    ``Checkpoint.open(path, layers=[0, 1])`` restricts the view (and all reads) to those layers
    plus the embedding, final norm and lm_head. ``ckpt[name]`` returns a numpy array in the stored
    dtype (bf16 as ``ml_dtypes.bfloat16``); ``ckpt.bytes_read`` counts the bytes materialised.
    """

    def __init__(self, path: Path, config: ModelConfig, infos: dict[str, TensorInfo],
                 ignored: list[str], layers: list[int] | None):
        self.path = path
        self.config = config
        self._infos = infos
        self.ignored = ignored
        self.layers = layers
        self.bytes_read = 0
        self._maps: dict[Path, mmap.mmap] = {}
        self.quant: QuantScheme | None = None  # the quantization_config, if any
        self._scales: dict[str, TensorInfo] = {}  # weight name -> its weight_scale
        self._parts: dict[int, dict[tuple[int, str], TensorInfo]] = {}  # per-expert layouts
        self._ignored_infos: dict[str, TensorInfo] = {}
        self._vision: dict[str, TensorInfo] = {}
        # why the vision tower cannot be used (None when it can, or when there is none)
        self.vision_problem: str | None = None

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike, layers: Iterable[int] | None = None,
             config: ModelConfig | None = None, strict: bool = True,
             check_values: bool = False) -> Checkpoint:
        """Open a directory with ``model.safetensors`` or shards + ``model.safetensors.index.json``.

        Validates every header, maps names and checks names and shapes against the config
        (missing, unexpected and mis-shaped tensors are errors when ``strict``). Shard files
        must be regular files inside the directory. ``check_values`` also reads every tensor
        (of the opened layers) and raises CheckpointError naming each one holding NaN or Inf
        with its counts (see :meth:`nonfinite`).
        """
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"{root}: not a checkpoint directory")
        files = _shard_files(root)
        cfg = config or ModelConfig.from_pretrained(root)
        layer_set = None if layers is None else sorted({int(i) for i in layers})
        if layer_set is not None:
            bad = [i for i in layer_set if not 0 <= i < cfg.num_hidden_layers]
            if bad:
                raise CheckpointError(f"layers={bad} out of range: the model has "
                                      f"{cfg.num_hidden_layers} layers")
        infos: dict[str, TensorInfo] = {}
        vision: dict[str, TensorInfo] = {}
        ignored: list[str] = []
        ignored_infos: dict[str, TensorInfo] = {}
        scheme = read_quantization_config(root, CheckpointError)
        for f, expected_names in files:
            header, _, data_start = read_safetensors_header(f)
            if expected_names is not None:
                missing_here = sorted(set(expected_names) - set(header))
                if missing_here:
                    raise CheckpointError(
                        f"{f}: the index maps {missing_here[:3]} to this shard but it does not "
                        "contain them")
            for hf_name, info in header.items():
                name = canonical_name(hf_name)
                if name is None:
                    vname = vision_name(hf_name)
                    if vname is not None and vname not in vision:
                        b, e = info["data_offsets"]
                        vision[vname] = TensorInfo(vname, hf_name, f, info["dtype"],
                                                   tuple(info["shape"]), data_start + b, e - b)
                    else:
                        ignored.append(hf_name)
                        b, e = info["data_offsets"]
                        ignored_infos[hf_name] = TensorInfo(hf_name, hf_name, f, info["dtype"],
                                                            tuple(info["shape"]), data_start + b,
                                                            e - b)
                    continue
                if name in infos:
                    raise CheckpointError(f"{f}: tensor {hf_name!r} duplicates {name!r} already "
                                          f"found in {infos[name].file.name}")
                lay = layer_of(name)
                if layer_set is not None and lay is not None and lay not in layer_set:
                    continue
                b, e = info["data_offsets"]
                infos[name] = TensorInfo(name, hf_name, f, info["dtype"], tuple(info["shape"]),
                                         data_start + b, e - b)
        ck = cls(root, cfg, infos, sorted(ignored), layer_set)
        # everything outside the language model, vision tower included, as stored (what a
        # rewrite such as `workbench quantize` copies through)
        ck._ignored_infos = {**ignored_infos, **{i.hf_name: i for i in vision.values()}}
        ck._organise_quantised(scheme, strict)
        ck._validate(strict)
        ck._adopt_vision(vision)
        if check_values:
            bad = ck.nonfinite()
            if bad:
                raise CheckpointError(f"{root}: weights hold NaN or Inf: "
                                      f"{format_nonfinite(ck, bad)}")
        return ck

    def _organise_quantised(self, scheme: QuantScheme | None, strict: bool) -> None:
        """Sort out FP8 tensors, their ``weight_scale`` companions and per-expert layouts.

        Per-expert tensors (``experts.{e}.{gate,up,down}_proj.weight``, FP8 or float) become
        the canonical fused ``experts.gate_up_proj`` (E, D, 2I) / ``experts.down_proj``
        (E, I, D), read expert by expert (:meth:`expert`). Every FP8 tensor must be a Linear
        weight the ``quantization_config`` quantises, with a scale of the scheme's shape.
        """
        self.quant = scheme
        for name in list(self._infos):
            info = self._infos[name]
            for suffix, what in _UNSUPPORTED_PARTS.items():
                if name.endswith(suffix):
                    raise CheckpointError(
                        f"{info.file}: tensor {info.hf_name!r} holds {what}, which the "
                        "workbench does not run; supported: compressed-tensors FP8 "
                        "(float-quantized) weights with per-channel or per-tensor scales")
            if name.endswith(".weight" + _SCALE_SUFFIX):
                self._scales[name[:-len(_SCALE_SUFFIX)]] = self._infos.pop(name)
        for name in list(self._infos):
            m = EXPERT_PART.fullmatch(name)
            if m:
                key = (int(m[2]), m[3])
                self._parts.setdefault(int(m[1]), {})[key] = self._infos.pop(name)
        parts = {i.name: i for lay in self._parts.values() for i in lay.values()}
        for name, info in [*self._infos.items(), *parts.items()]:
            if info.dtype == "F8_E4M3":
                self._check_fp8(name, info)
        for wname, sinfo in self._scales.items():
            winfo = self._infos.get(wname) or parts.get(wname)
            if winfo is None:
                if self.layers is not None and layer_of(wname) not in (None, *self.layers):
                    continue
                raise CheckpointError(f"{sinfo.file}: scale {sinfo.hf_name!r} belongs to no "
                                      f"weight (no {wname!r} in the checkpoint)")
            if winfo.dtype != "F8_E4M3":
                raise CheckpointError(f"{sinfo.file}: scale {sinfo.hf_name!r} belongs to "
                                      f"{winfo.hf_name!r}, which is {winfo.dtype}, not FP8")
        for layer, got in sorted(self._parts.items()):
            self._fuse_layer(layer, got)

    def _check_fp8(self, name: str, info: TensorInfo) -> None:
        """One FP8 tensor: allowed by the config, a Linear weight, with a well-shaped scale."""
        where = f"{info.file}: tensor {info.hf_name!r} is F8_E4M3 (FP8)"
        if self.quant is None:
            raise CheckpointError(f"{where} but config.json has no quantization_config: FP8 "
                                  "checkpoints must say how they were quantised "
                                  "(compressed-tensors, format float-quantized)")
        module = info.hf_name[:-len(".weight")] if info.hf_name.endswith(".weight") else \
            info.hf_name
        if not is_linear(name):
            raise CheckpointError(f"{where}, but only Linear weights can be FP8 (fused FP8 "
                                  "experts are fbgemm's layout, which is not supported)")
        if self.quant.ignored(module):
            raise CheckpointError(f"{where}, but quantization_config's ignore list keeps "
                                  f"{module!r} unquantised ({self.quant.source})")
        sinfo = self._scales.get(name)
        if sinfo is None:
            raise CheckpointError(f"{where} but its scale {info.hf_name + _SCALE_SUFFIX!r} is "
                                  "missing")
        out = info.shape[0]
        want = [(out, 1), (out,)] if self.quant.strategy == "channel" else [(1,), (), (1, 1)]
        if sinfo.shape not in want:
            raise CheckpointError(
                f"{sinfo.file}: scale {sinfo.hf_name!r} has shape {sinfo.shape}, expected "
                f"{want[0]} for {self.quant.strategy}-wise scales of {info.hf_name!r} "
                f"{info.shape}")
        if sinfo.dtype not in _FLOAT_WEIGHTS:
            raise CheckpointError(f"{sinfo.file}: scale {sinfo.hf_name!r} has dtype "
                                  f"{sinfo.dtype}; scales must be F32, F16 or BF16")

    def _fuse_layer(self, layer: int, got: dict[tuple[int, str], TensorInfo]) -> None:
        """Check one layer's per-expert tensors and register the fused canonical names."""
        cfg = self.config
        any_info = next(iter(got.values()))
        pre = f"layers.{layer}.feed_forward.experts."
        if not (0 <= layer < cfg.num_hidden_layers and cfg.is_moe(layer)):
            raise CheckpointError(f"{any_info.file}: tensor {any_info.hf_name!r}: layer {layer} "
                                  "is not an MoE layer of this config")
        for fused in ("gate_up_proj", "down_proj"):
            if pre + fused in self._infos:
                raise CheckpointError(
                    f"{any_info.file}: layer {layer} holds both fused experts "
                    f"{self._infos[pre + fused].hf_name!r} and per-expert tensors such as "
                    f"{any_info.hf_name!r}; keep one layout")
        E, D, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        extra = sorted(e for e, _ in got if e >= E)
        if extra:
            info = got[(extra[0], next(p for e, p in got if e == extra[0]))]
            raise CheckpointError(f"{info.file}: tensor {info.hf_name!r}: expert {extra[0]} but "
                                  f"config.json says num_local_experts={E}")
        hf_pre = any_info.hf_name[:any_info.hf_name.index(".experts.") + len(".experts.")]
        shapes = {"gate": (I, D), "up": (I, D), "down": (D, I)}
        dtypes = set()
        for e in range(E):
            for proj, shape in shapes.items():
                info = got.get((e, proj))
                if info is None:
                    raise CheckpointError(f"{self.path}: missing tensor "
                                          f"{hf_pre}{e}.{proj}_proj.weight (layer {layer} "
                                          f"stores its {E} experts one by one)")
                if info.shape != shape:
                    raise CheckpointError(f"{info.file}: tensor {info.hf_name!r} has shape "
                                          f"{info.shape}, expected {shape} (nn.Linear layout)")
                dtypes.add(info.dtype)
        if len(dtypes) > 1:
            raise CheckpointError(f"{self.path}: layer {layer}'s experts mix dtypes "
                                  f"{sorted(dtypes)}")
        (dt,) = dtypes
        if dt not in _FLOAT_WEIGHTS and dt != "F8_E4M3":
            raise CheckpointError(f"{any_info.file}: tensor {any_info.hf_name!r} has dtype {dt}; "
                                  "expert weights must be F32, F16, BF16 or FP8")
        for fused, projs, shape in (("gate_up_proj", ("gate", "up"), (E, D, 2 * I)),
                                    ("down_proj", ("down",), (E, I, D))):
            infos = [got[(e, p)] for e in range(E) for p in projs]
            self._infos[pre + fused] = TensorInfo(
                pre + fused, f"{hf_pre}{{e}}.{'/'.join(projs)}_proj.weight", infos[0].file, dt,
                shape, -1, sum(i.nbytes for i in infos))

    def _validate(self, strict: bool) -> None:
        exp = expected_shapes(self.config)
        if self.layers is not None:
            exp = {k: v for k, v in exp.items() if layer_of(k) in (None, *self.layers)}
        lm = self._infos.get("lm_head.weight")
        if self.config.tie_word_embeddings and lm is not None:
            msg = (f"{lm.file}: config.json says tie_word_embeddings=true (the output head is "
                   f"embed_tokens.weight) but the checkpoint also holds {lm.hf_name!r}")
            if strict:
                raise CheckpointError(msg + "; set tie_word_embeddings to false to use it, or "
                                      "remove the tensor")
            warnings.warn(CheckpointWarning(msg + ", which is ignored"), stacklevel=3)
            self._infos.pop("lm_head.weight")
        where = self.path
        for name, shape in exp.items():
            info = self._infos.get(name)
            if info is None:
                if strict:
                    raise CheckpointError(
                        f"{where}: missing tensor {name!r} (expected shape {shape} for this "
                        f"config)")
                continue
            if info.shape != shape:
                raise CheckpointError(self._shape_message(info, shape))
            if info.dtype not in _FLOAT_WEIGHTS and not self.is_quantized(name):
                raise CheckpointError(f"{info.file}: tensor {info.hf_name!r} has dtype "
                                      f"{info.dtype}; weights must be F32, F16 or BF16")
        unexpected = sorted(set(self._infos) - set(exp))
        if unexpected and strict:
            raise CheckpointError(
                f"{where}: unexpected tensor(s) for this config: {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''} (in "
                f"{self._infos[unexpected[0]].file.name})")

    def _adopt_vision(self, found: dict[str, TensorInfo]) -> None:
        """Use the vision tower if it is complete and matches ``vision_config``; otherwise
        list its tensors in ``ignored`` and say why in ``vision_problem``."""
        if not found:
            text_only = not (self.config.multimodal and self.config.extra.get("vision_config"))
            self.vision_problem = ("its config has no vision_config (a text-only Llama 4)"
                                   if text_only else "the checkpoint holds no vision tower "
                                   "(vision_model.*, multi_modal_projector.*)")
            return
        problem = None
        try:
            vc = self.config.vision
        except ValueError as e:
            vc, problem = None, f"its vision_config is unusable: {e}"
        if vc is None and problem is None:
            problem = "config.json has no vision_config"
        if problem is None:
            exp = vision_expected_shapes(vc, self.config.hidden_size)
            missing = sorted(set(exp) - set(found))
            extra = sorted(set(found) - set(exp))
            bad = [i for n, i in found.items() if n in exp and i.shape != exp[n]]
            wrong = [i for i in found.values() if i.dtype not in _FLOAT_WEIGHTS]
            if missing:
                problem = (f"vision tensor(s) missing: {missing[:3]}"
                           f"{' ...' if len(missing) > 3 else ''} ({len(missing)} of {len(exp)})")
            elif bad:
                i = bad[0]
                problem = (f"{i.file}: vision tensor {i.hf_name!r} has shape {i.shape}, "
                           f"vision_config expects {exp[i.name]}")
            elif extra:
                problem = f"vision tensor(s) {extra[:3]} are not part of this vision_config"
            elif wrong:
                problem = (f"{wrong[0].file}: vision tensor {wrong[0].hf_name!r} has dtype "
                           f"{wrong[0].dtype}; weights must be F32, F16 or BF16")
        if problem is None:
            self._vision = dict(sorted(found.items()))
            self.vision_problem = None
        else:
            self.vision_problem = problem
            self.ignored = sorted(self.ignored + [i.hf_name for i in found.values()])

    @property
    def has_vision(self) -> bool:
        """True when the checkpoint holds a complete vision tower and projector."""
        return bool(self._vision)

    def vision_names(self) -> list[str]:
        """Canonical names of the vision tower's and projector's tensors (empty without one)."""
        return list(self._vision)

    def _shape_message(self, info: TensorInfo, shape: tuple[int, ...]) -> str:
        cfg = self.config
        msg = (f"{info.file}: tensor {info.hf_name!r} has shape {info.shape}, expected {shape}")
        hints = []
        if info.name.endswith("router.weight") and info.shape[0] != shape[0]:
            hints.append(f"config.json says num_local_experts={cfg.num_local_experts} but the "
                         f"weights have {info.shape[0]} experts")
        if info.name == "embed_tokens.weight" and info.shape[0] != shape[0]:
            hints.append(f"config.json says vocab_size={cfg.vocab_size}")
        linear = info.name.endswith(("_proj.weight", "router.weight"))
        if linear and len(info.shape) == len(shape) and info.shape[-1] != shape[-1]:
            hints.append(f"config.json says hidden_size={cfg.hidden_size}")
        return msg + ("; " + "; ".join(hints) if hints else "")

    # ----------------------------------------------------------------- access
    def __getitem__(self, name: str) -> np.ndarray:
        return self.get(name)

    def __iter__(self):
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        info = self._infos.get(name) or self._vision.get(name)
        if info is None:
            raise KeyError(self._unknown(name))
        return info

    def _unknown(self, name: str) -> str:
        import difflib
        close = difflib.get_close_matches(name, list(self._infos), n=3)
        sub = "" if self.layers is None else f" (opened with layers={self.layers})"
        return f"no tensor {name!r} in {self.path}{sub}" + (f"; did you mean {close}?" if close
                                                           else "")

    def _map(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            with open(file, "rb") as fh:
                # copy-on-write: arrays over the mapping are writable, the file never changes
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[file] = mm
        return mm

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def view(self, name: str) -> np.ndarray:
        """A zero-copy array over the memory-mapped file (bf16 as ml_dtypes.bfloat16, FP8 as
        ml_dtypes.float8_e4m3fn, as stored: see :meth:`scale` and :meth:`dequantized`).

        Pages are read from disk when touched and count as file-backed memory; writing to the
        array changes a private copy of the page, never the file. The fused experts of a
        per-expert layout are assembled (a copy); :meth:`expert` reads one expert.
        """
        info = self.info(name)
        if info.start < 0:
            return self._fused(info)
        return self._read(info)

    def _read(self, info: TensorInfo) -> np.ndarray:
        arr = np.frombuffer(self._map(info.file), dtype=_DTYPES[info.dtype],
                            count=int(np.prod(info.shape)), offset=info.start)
        self.bytes_read += info.nbytes
        return arr.reshape(info.shape)

    def _read_slice(self, info: TensorInfo, index: int) -> np.ndarray:
        """``tensor[index]`` (along the first axis) over the mapped file, counting its bytes."""
        per = info.nbytes // info.shape[0]
        arr = np.frombuffer(self._map(info.file), dtype=_DTYPES[info.dtype],
                            count=int(np.prod(info.shape[1:])), offset=info.start + index * per)
        self.bytes_read += per
        return arr.reshape(info.shape[1:])

    def _fused(self, info: TensorInfo) -> np.ndarray:
        """The canonical (E, D, 2I) / (E, I, D) array of a per-expert layer (a copy)."""
        layer = layer_of(info.name)
        out = np.empty(info.shape, _DTYPES[info.dtype])
        for e in range(info.shape[0]):
            w = self.expert(layer, e, scales=False)
            out[e] = w.gate_up if info.name.endswith("gate_up_proj") else w.down
        return out

    # ----------------------------------------------------------------- quantisation
    def is_quantized(self, name: str) -> bool:
        """Whether the canonical tensor ``name`` is stored in FP8 (with scales)."""
        info = self._infos.get(name)
        return info is not None and info.dtype == "F8_E4M3"

    def quantized_names(self) -> list[str]:
        """Canonical names of the FP8 tensors (fused expert names for per-expert layouts)."""
        return [n for n, i in self._infos.items() if i.dtype == "F8_E4M3"]

    def scale(self, name: str) -> np.ndarray | None:
        """Float32 per-output-channel scales of an FP8 tensor (None if not quantised): (out,)
        for an nn.Linear weight (out, in); (E, 2I) / (E, D) for the fused experts, whose
        output channels are their last axis. Tensor-wise scales are repeated per channel."""
        if not self.is_quantized(name):
            self.info(name)
            return None
        info = self._infos[name]
        if info.start >= 0:
            return self._scale_of(info)
        layer = layer_of(name)
        E = info.shape[0]
        return np.stack([self._expert_scales(layer, e)[0 if name.endswith("gate_up_proj")
                                                       else 1] for e in range(E)])

    def _scale_of(self, info: TensorInfo) -> np.ndarray:
        s = self._read(self._scales[info.name]).astype(np.float32).reshape(-1)
        return np.broadcast_to(s, (info.shape[0],)).copy() if s.size == 1 else s

    def dequantized(self, name: str, dtype: np.dtype | str = np.float32) -> np.ndarray:
        """The tensor in ``dtype`` (float32 by default): FP8 times its scales, else the
        stored values converted."""
        dtype = np.dtype(ml_dtypes.bfloat16) if str(dtype) in ("bfloat16", "bf16") \
            else np.dtype(dtype)
        arr = self.view(name)
        s = self.scale(name)
        if s is None:
            return arr.astype(dtype)
        if arr.ndim == 3:  # fused experts: output channels on the last axis
            return (arr.astype(np.float32) * s[:, None, :]).astype(dtype, copy=False)
        return dequantize(arr, s, dtype)

    def expert(self, layer: int, e: int, scales: bool = True) -> ExpertWeights:
        """Routed expert ``e`` of MoE layer ``layer`` as stored, in the canonical layout:
        gate_up (D, 2I) and down (I, D) (views of the file where the layout allows), with
        float32 per-output-channel scales when FP8."""
        pre = f"layers.{layer}.feed_forward.experts."
        parts = self._parts.get(layer)
        if parts is None:
            gu, dn = (self._read_slice(self.info(pre + n), e) for n in ("gate_up_proj",
                                                                        "down_proj"))
            return ExpertWeights(gu, dn, None, None)
        g, u, d = (self._read(parts[(e, p)]) for p in ("gate", "up", "down"))
        gu = np.concatenate([g, u], axis=0).T
        gs, ds = self._expert_scales(layer, e) if scales else (None, None)
        return ExpertWeights(gu, d.T, gs, ds)

    def _expert_scales(self, layer: int, e: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        parts = self._parts[layer]
        if parts[(e, "gate")].dtype != "F8_E4M3":
            return None, None
        g, u, d = (self._scale_of(parts[(e, p)]) for p in ("gate", "up", "down"))
        return np.concatenate([g, u]), d

    def expert_nbytes(self, layer: int) -> int:
        """Bytes of one routed expert of ``layer`` as stored (weights and scales)."""
        pre = f"layers.{layer}.feed_forward.experts."
        parts = self._parts.get(layer)
        if parts is None:
            return sum(self.info(pre + n).nbytes // self.info(pre + n).shape[0]
                       for n in ("gate_up_proj", "down_proj"))
        return sum(parts[(0, p)].nbytes + (self._scales[parts[(0, p)].name].nbytes
                                           if parts[(0, p)].name in self._scales else 0)
                   for p in ("gate", "up", "down"))

    def evict_expert(self, layer: int, e: int) -> None:
        """Drop one expert's file pages (see :meth:`evict`)."""
        parts = self._parts.get(layer)
        if parts is None:
            pre = f"layers.{layer}.feed_forward.experts."
            self.evict(pre + "gate_up_proj", e)
            self.evict(pre + "down_proj", e)
            return
        for p in ("gate", "up", "down"):
            self._evict_info(parts[(e, p)])

    def raw_ignored(self) -> list[tuple[str, np.ndarray]]:
        """(HF name, array as stored) of the tensors outside the language model (vision
        encoder, projector), for tools that rewrite a checkpoint and keep them."""
        return [(n, self._read(i)) for n, i in sorted(self._ignored_infos.items())]

    def evict(self, name: str, index: int | None = None) -> None:
        """Drop the tensor's pages (or those of ``tensor[index]``, one slice along the first
        axis, e.g. one expert of a stacked tensor) from this process's memory; they are re-read
        from the file if touched again. Call it only while nothing has written to arrays over
        the file."""
        info = self.info(name)
        if info.start < 0:  # per-expert layout
            for e in range(info.shape[0]) if index is None else [index]:
                self.evict_expert(layer_of(name), e)
            return
        self._evict_info(info, index)

    def _evict_info(self, info: TensorInfo, index: int | None = None) -> None:
        mm = self._maps.get(info.file)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start, nbytes = info.start, info.nbytes
        if index is not None:
            nbytes //= info.shape[0]
            start += index * nbytes
        page = mmap.PAGESIZE
        lo = start - start % page
        hi = min(len(mm), -(-(start + nbytes) // page) * page)
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def get(self, name: str, dtype: np.dtype | str | None = None) -> np.ndarray:  # type: ignore[override]
        """Read one tensor (a fresh array; bf16 stays ml_dtypes.bfloat16 unless ``dtype``;
        FP8 tensors are dequantised, to float32 unless ``dtype``)."""
        if self.is_quantized(name):
            return self.dequantized(name, dtype or np.float32)
        arr = self.view(name)
        if dtype is not None:
            return arr.astype(np.dtype(dtype))
        return arr.copy()

    def nonfinite(self) -> dict[str, tuple[int, int]]:
        """{name: (NaN count, Inf count)} for every tensor holding NaN or ±Inf.

        Reads every tensor of the view once, in chunks, and releases its pages afterwards.
        """
        out = {}
        for name, info in self._infos.items():
            if info.start < 0:  # per-expert layout: each expert's tensors
                nan = inf = 0
                for part in self._parts[layer_of(name)].values():
                    n, i = scan_values(self._read(part))
                    self._evict_info(part)
                    nan, inf = nan + n, inf + i
            else:
                nan, inf = scan_values(self.view(name))
                self.evict(name)
            if nan or inf:
                out[name] = (nan, inf)
        for name, info in self._scales.items():
            nan, inf = scan_values(self._read(info))
            if nan or inf:
                out[name + _SCALE_SUFFIX] = (nan, inf)
        return out

    def weight_names(self) -> list[str]:
        """The canonical names of every weight a forward pass needs, in checkpoint order."""
        if self.layers is not None:
            raise CheckpointError("a full forward pass needs every layer; open the checkpoint "
                                  "without layers= to run it (use layers= to inspect weights)")
        return [n for n in expected_shapes(self.config) if n in self._infos]

    def model_tensors(self) -> dict[str, np.ndarray]:
        """Every weight a forward pass needs, by canonical name (what a backend loads), the
        vision tower's included."""
        return {n: self.get(n) for n in self.weight_names() + self.vision_names()}

    def close(self) -> None:
        """Unmap the shards. A mapping that arrays still view stays until they are gone."""
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # zero-copy arrays (e.g. a model's weights) still use it
                pass
        self._maps.clear()

    # ----------------------------------------------------------------- summaries
    @property
    def nbytes(self) -> int:
        return sum(self.bytes_by_dtype().values())

    def bytes_by_dtype(self) -> dict[str, int]:
        """Bytes of the language model's tensors (scales included) per stored dtype."""
        out: dict[str, int] = {}
        for i in [*self._infos.values(), *self._scales.values()]:
            out[i.dtype] = out.get(i.dtype, 0) + i.nbytes
        return out

    @property
    def stored_dtype(self) -> str:
        """The dominant floating dtype of the weights ('bfloat16', 'float16' or 'float32')."""
        by = self.bytes_by_dtype()
        tag = max(by, key=by.get) if by else "F32"
        return {"BF16": "bfloat16", "F16": "float16"}.get(tag, "float32")

    def files(self) -> list[Path]:
        parts = [i for lay in self._parts.values() for i in lay.values()]
        return sorted({i.file for i in [*self._infos.values(), *self._scales.values(), *parts,
                                        *self._vision.values()]})

    # ----------------------------------------------------------------- writing
    @staticmethod
    def save(directory: str | os.PathLike, tensors: Mapping[str, np.ndarray],
             config: ModelConfig, *, multimodal: bool | None = None,
             max_shard_bytes: int = 2 * 1024**3, dtype: str | np.dtype | None = None,
             extra_files: Mapping[str, str] | None = None) -> Path:
        """Write canonical-name tensors in HF layout (sharded above ``max_shard_bytes``).

        ``multimodal`` (default: ``config.multimodal``) chooses the ``language_model.`` prefix
        and the wrapper config. The result loads with transformers' ``from_pretrained``.

        Everything is checked before the disk is touched (names, shapes, dtypes). The files are
        written into a temporary directory beside or inside ``directory`` and moved into place
        only when all are complete: a new directory appears at once (one rename); in an existing
        one each file is replaced by a rename and stale shards are removed last, so a failed or
        interrupted save leaves the old checkpoint as it was, and files already memory-mapped
        (a loaded model's weights) are never rewritten in place. Other files there are kept.
        """
        out = Path(directory)
        mm = config.multimodal if multimodal is None else multimodal
        arrays = _checked_arrays(tensors, config, mm, dtype)
        extra = dict(extra_files or {})
        for fname, text in extra.items():
            if (not isinstance(fname, str) or PurePosixPath(fname).name != fname
                    or fname in ("", ".", "..", "config.json", INDEX_FILE)
                    or fname.startswith("model") and fname.endswith(".safetensors")
                    or "\\" in fname or not isinstance(text, str)):
                raise CheckpointError(f"cannot save: extra file {_short(fname)} must be a plain "
                                      "file name (not config.json or a weight file) with text")
        if out.exists() and not out.is_dir():
            raise CheckpointError(f"cannot save: {out} exists and is not a directory")
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for k, a in arrays.items():
            if shards[-1] and size + a.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = a
            size += a.nbytes
        dt_name = "float32"
        if arrays:
            first = next(iter(arrays.values())).dtype
            dt_name = {np.dtype(ml_dtypes.bfloat16): "bfloat16",
                       np.dtype(np.float16): "float16"}.get(first, "float32")
        cfg_dict = config.replace(multimodal=mm).to_hf_dict()
        cfg_dict["dtype"] = dt_name
        if mm:
            cfg_dict["text_config"]["dtype"] = dt_name

        def write_all(d: Path) -> list[str]:
            """Write every file into ``d``; their names in the order to move them into place."""
            names = []
            if len(shards) == 1:
                write_safetensors(d / SINGLE_FILE, shards[0], {"format": "pt"})
                names.append(SINGLE_FILE)
            else:
                n = len(shards)
                weight_map = {}
                for i, shard in enumerate(shards, 1):
                    fname = f"model-{i:05d}-of-{n:05d}.safetensors"
                    write_safetensors(d / fname, shard, {"format": "pt"})
                    weight_map.update({k: fname for k in shard})
                    names.append(fname)
                index = {"metadata": {"total_size": sum(a.nbytes for a in arrays.values())},
                         "weight_map": weight_map}
                _write_text(d / INDEX_FILE, json.dumps(index, indent=2) + "\n")
                names.append(INDEX_FILE)
            _write_text(d / "config.json", json.dumps(cfg_dict, indent=2) + "\n")
            names.append("config.json")
            for fname, text in extra.items():
                _write_text(d / fname, text)
                names.append(fname)
            return names

        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.saving-", dir=out.parent))
            try:
                write_all(tmp)
                os.chmod(tmp, 0o777 & ~_umask())
                os.rename(tmp, out)
                _fsync_dir(out.parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return out
        tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=out))
        try:
            names = write_all(tmp)
            install_checkpoint_files(tmp, out, names)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


def _checked_arrays(tensors: Mapping[str, np.ndarray], config: ModelConfig, mm: bool,
                    dtype: str | np.dtype | None) -> dict[str, np.ndarray]:
    """The arrays to write by HF name, in file order, after every check save makes."""
    exp = expected_shapes(config)
    missing = sorted(set(exp) - set(tensors))
    if missing:
        raise CheckpointError(f"cannot save: missing tensor(s) {missing[:5]}")
    given_vision = [n for n in tensors if n.startswith(VISION_PREFIXES)]
    if given_vision:
        vc = config.vision if mm else None
        if vc is None:
            raise CheckpointError(f"cannot save: vision tensor(s) {sorted(given_vision)[:3]} "
                                  "given but the config is not multimodal with a vision_config")
        vexp = vision_expected_shapes(vc, config.hidden_size)
        vmissing = sorted(set(vexp) - set(given_vision))
        if vmissing:
            raise CheckpointError(f"cannot save: vision tensor(s) missing {vmissing[:5]}")
        exp = {**exp, **vexp}
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        raise CheckpointError("cannot save: tensor 'lm_head.weight' given but the config ties "
                              "the output head to embed_tokens.weight (tie_word_embeddings)")
    try:
        np_dtype = None if dtype is None else np.dtype(
            ml_dtypes.bfloat16 if str(dtype) in ("bfloat16", "bf16") else dtype)
    except TypeError:
        raise CheckpointError(f"cannot save: unknown dtype {dtype!r}") from None
    if np_dtype is not None and np_dtype not in (np.dtype(np.float32), np.dtype(np.float16),
                                                 np.dtype(ml_dtypes.bfloat16)):
        raise CheckpointError(f"cannot save: dtype {dtype!r}; weights are saved as float32, "
                              "float16 or bfloat16")

    def hf(name: str) -> str:
        if name.startswith(VISION_PREFIXES):
            return name
        if name.startswith("lm_head."):
            return ("language_model." if mm else "") + name
        return ("language_model.model." if mm else "model.") + name

    arrays = {}
    for name in sorted(tensors, key=_save_order):
        a = np.asarray(tensors[name])
        if name in exp and tuple(a.shape) != exp[name]:
            raise CheckpointError(f"cannot save: tensor {name!r} has shape {a.shape}, "
                                  f"config expects {exp[name]}")
        if np_dtype is not None and (a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16):
            a = a.astype(np_dtype, copy=False)
        tag = _NP_TO_ST.get(a.dtype)
        if tag is None:
            raise CheckpointError(f"cannot save: tensor {name!r} has dtype {a.dtype}, which "
                                  "safetensors files written here cannot hold")
        if tag not in _FLOAT_WEIGHTS:
            raise CheckpointError(f"cannot save: tensor {name!r} has dtype {a.dtype}; weights "
                                  "must be float32, float16 or bfloat16")
        arrays[hf(name)] = a
    unexpected = sorted(set(tensors) - set(exp))
    if unexpected:
        raise CheckpointError(f"cannot save: tensor(s) {unexpected[:5]} are not part of a model "
                              "of this config")
    return arrays


def install_checkpoint_files(staged: Path, out: Path, names: Iterable[str]) -> None:
    """Move complete files from ``staged`` into the checkpoint directory ``out`` (each by an
    atomic rename, weights first), then remove weight files and an index the new set lacks.

    Replaced files are unlinked, never rewritten: memory maps of them stay valid.
    """
    names = list(names)
    stale = [p for p in out.glob("model*.safetensors") if p.name not in names]
    if INDEX_FILE not in names and os.path.lexists(out / INDEX_FILE):
        stale.append(out / INDEX_FILE)
    for name in names:
        os.replace(staged / name, out / name)
    for p in stale:
        p.unlink(missing_ok=True)
    _fsync_dir(out)


def _umask() -> int:
    """The process umask (new files get the usual permissions, not mkstemp's 0600)."""
    global _UMASK
    if _UMASK is None:
        try:
            with open("/proc/self/status") as fh:
                _UMASK = next(int(line.split()[1], 8) for line in fh
                              if line.startswith("Umask:"))
        except (OSError, StopIteration, ValueError, IndexError):
            _UMASK = os.umask(0o022)  # no /proc: read it the only other way, and restore it
            os.umask(_UMASK)
    return _UMASK


_UMASK: int | None = None


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def format_nonfinite(ck: Checkpoint, bad: Mapping[str, tuple[int, int]],
                     limit: int = 10) -> str:
    """'tensor 'model.norm.weight' in model.safetensors: 3 NaN, 0 Inf; ...' for nonfinite()."""
    parts = []
    for name, (nan, inf) in list(bad.items())[:limit]:
        info = ck._scales.get(name[:-len(_SCALE_SUFFIX)]) if name.endswith(_SCALE_SUFFIX) \
            else None
        info = info or ck.info(name)
        parts.append(f"tensor {info.hf_name!r} in {info.file.name}: {nan} NaN, {inf} Inf")
    more = len(bad) - limit
    return "; ".join(parts) + (f"; and {more} more tensor(s)" if more > 0 else "")


def _save_order(name: str) -> tuple[int, str]:
    lay = layer_of(name)
    return (-1 if name.startswith("embed") else 10**9 if lay is None else lay, name)


def _shard_files(root: Path) -> list[tuple[Path, list[str] | None]]:
    index = root / INDEX_FILE
    if os.path.lexists(index):
        _inside(root, INDEX_FILE)
        try:
            data = load_strict_json(read_regular_file(index, _MAX_HEADER, CheckpointError),
                                    _MAX_INDEX_DEPTH)
        except ValueError as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{index}: corrupt shard index, {e}") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            what = "not a JSON object" if not isinstance(data, dict) else \
                "no weight_map" if "weight_map" not in data else \
                f"weight_map must be a non-empty object, got {_short(weight_map)}"
            raise CheckpointError(f"{index}: corrupt shard index ({what})")
        by_file: dict[str, list[str]] = {}
        for tensor, fname in weight_map.items():
            if not isinstance(fname, str) or not fname.endswith(".safetensors"):
                raise CheckpointError(f"{index}: corrupt shard index: weight_map maps {tensor!r} "
                                      f"to {_short(fname)}, not a .safetensors file name")
            by_file.setdefault(fname, []).append(tensor)
        out = []
        for fname, names in sorted(by_file.items()):
            f = _inside(root, fname, index)
            if not f.exists():
                raise CheckpointError(f"{index}: shard {fname} (holding {names[0]!r} and "
                                      f"{len(names) - 1} more) is missing")
            _regular_file(f)
            out.append((f, names))
        return out
    single = root / SINGLE_FILE
    if os.path.lexists(single):
        return [(_inside(root, SINGLE_FILE), None)]
    found = sorted(root.glob("*.safetensors"))
    if found:
        raise CheckpointError(f"{root}: found {[f.name for f in found][:3]} but neither "
                              f"{SINGLE_FILE} nor {INDEX_FILE}")
    if any(root.glob("*.bin")) or any(root.glob("*.pth")) or any(root.glob("*.pt")):
        raise CheckpointError(f"{root}: only pickle-based weights (.bin/.pth/.pt) found; the "
                              "workbench reads safetensors only (pickle can execute code)")
    raise CheckpointError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE}")


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write numpy arrays (bf16 via ml_dtypes included) as one safetensors file.

    Every dtype is checked first; the bytes go to a temporary file beside ``path`` that
    replaces it (one rename) only once complete, so ``path`` is never truncated or half written.
    """
    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    items = []
    for name, a in tensors.items():
        a = np.asarray(a)
        tag = _NP_TO_ST.get(a.dtype)
        if tag is None:
            raise CheckpointError(f"cannot write tensor {name!r}: dtype {a.dtype} unsupported")
        header[name] = {"dtype": tag, "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        items.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            for a in items:
                _write_array(fh, a)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_array(fh, a: np.ndarray, chunk: int = 64 * 1024 * 1024) -> None:
    """Write an array's bytes in C order without copying it whole."""
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    for s in range(0, flat.size, chunk):
        fh.write(flat[s:s + chunk].data)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a whole (small) safetensors file into numpy arrays plus its metadata."""
    p = Path(path)
    header, meta, start = read_safetensors_header(p)
    out = {}
    with open(p, "rb") as fh:
        for name, info in header.items():
            b, e = info["data_offsets"]
            fh.seek(start + b)
            buf = fh.read(e - b)
            out[name] = np.frombuffer(buf, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out, meta
