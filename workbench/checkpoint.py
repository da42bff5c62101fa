"""Checkpoint: lazy, validated access to HF-layout Llama 4 safetensors by canonical name.

Canonical names drop the HF prefixes: ``model.layers.0.self_attn.q_proj.weight`` and
``language_model.model.layers.0.self_attn.q_proj.weight`` are both
``layers.0.self_attn.q_proj.weight``; ``lm_head.weight`` and ``language_model.lm_head.weight`` are
``lm_head.weight``. Tensors are memory-mapped and read only when asked for. The safetensors header
is parsed here (not by a library) so that every defect gets one message naming the file and tensor.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from .config import ModelConfig
from .hooks import layer_of

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024

_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_FP8 = {"F8_E4M3", "F8_E5M2", "F8_E4M3FN", "F8_E8M0", "F4"}
_NP_TO_ST = {v: k for k, v in _DTYPES.items()}
_FLOAT_WEIGHTS = {"F32", "F16", "BF16"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names file, tensor and shapes."""


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


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """Parse and check a safetensors header: (tensors, metadata, data_start). No data is read."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes; the 8-byte "
                              "header length is missing)")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors header (declares {n} header bytes, "
                f"file has {size} bytes)")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header, not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", {}) or {}
    data_start = 8 + n
    data_len = size - data_start
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {info!r}")
        dt = info["dtype"]
        if dt in _FP8:
            raise CheckpointError(
                f"{path}: tensor {name!r} is {dt}: FP8/FP4-quantised Llama 4 checkpoints (e.g. "
                "Maverick-FP8) are not supported; use the bf16 release")
        if dt not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dt}")
        b, e = info["data_offsets"]
        want = int(np.prod(info["shape"], dtype=np.int64)) * _DTYPES[dt].itemsize
        if e - b != want:
            raise CheckpointError(
                f"{path}: tensor {name!r} declares shape {tuple(info['shape'])} {dt} "
                f"({want} bytes) but spans {e - b} bytes")
        if e > data_len:
            raise CheckpointError(
                f"{path}: truncated file: tensor {name!r} ends at byte {data_start + e} but the "
                f"file has {size} bytes")
    return header, meta, data_start


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

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike, layers: Iterable[int] | None = None,
             config: ModelConfig | None = None, strict: bool = True) -> Checkpoint:
        """Open a directory with ``model.safetensors`` or shards + ``model.safetensors.index.json``.

        Validates every header, maps names and checks names and shapes against the config
        (missing, unexpected and mis-shaped tensors are errors when ``strict``).
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
        ignored: list[str] = []
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
                    ignored.append(hf_name)
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
        ck._validate(strict)
        return ck

    def _validate(self, strict: bool) -> None:
        exp = expected_shapes(self.config)
        if self.layers is not None:
            exp = {k: v for k, v in exp.items() if layer_of(k) in (None, *self.layers)}
        if self.config.tie_word_embeddings:
            self._infos.pop("lm_head.weight", None)
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
            if info.dtype not in _FLOAT_WEIGHTS:
                raise CheckpointError(f"{info.file}: tensor {info.hf_name!r} has dtype "
                                      f"{info.dtype}; weights must be F32, F16 or BF16")
        unexpected = sorted(set(self._infos) - set(exp))
        if unexpected and strict:
            raise CheckpointError(
                f"{where}: unexpected tensor(s) for this config: {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''} (in "
                f"{self._infos[unexpected[0]].file.name})")

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
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(self._unknown(name)) from None

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

    def view(self, name: str) -> np.ndarray:
        """A zero-copy array over the memory-mapped file (bf16 as ml_dtypes.bfloat16).

        Pages are read from disk when touched and count as file-backed memory; writing to the
        array changes a private copy of the page, never the file.
        """
        info = self.info(name)
        arr = np.frombuffer(self._map(info.file), dtype=_DTYPES[info.dtype],
                            count=int(np.prod(info.shape)), offset=info.start)
        self.bytes_read += info.nbytes
        return arr.reshape(info.shape)

    def evict(self, name: str) -> None:
        """Drop the tensor's pages from this process's memory (they are re-read from the file
        if touched again). Call it only while nothing has written to arrays over the file."""
        info = self.info(name)
        mm = self._maps.get(info.file)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        lo = info.start - info.start % page
        hi = min(len(mm), -(-(info.start + info.nbytes) // page) * page)
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def get(self, name: str, dtype: np.dtype | str | None = None) -> np.ndarray:  # type: ignore[override]
        """Read one tensor (a fresh array; bf16 stays ml_dtypes.bfloat16 unless ``dtype``)."""
        arr = self.view(name)
        if dtype is not None:
            return arr.astype(np.dtype(dtype))
        return arr.copy()

    def weight_names(self) -> list[str]:
        """The canonical names of every weight a forward pass needs, in checkpoint order."""
        if self.layers is not None:
            raise CheckpointError("a full forward pass needs every layer; open the checkpoint "
                                  "without layers= to run it (use layers= to inspect weights)")
        return [n for n in expected_shapes(self.config) if n in self._infos]

    def model_tensors(self) -> dict[str, np.ndarray]:
        """Every weight a forward pass needs, by canonical name (what a backend loads)."""
        return {n: self.get(n) for n in self.weight_names()}

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
        return sum(i.nbytes for i in self._infos.values())

    def bytes_by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in self._infos.values():
            out[i.dtype] = out.get(i.dtype, 0) + i.nbytes
        return out

    @property
    def stored_dtype(self) -> str:
        """The dominant floating dtype of the weights ('bfloat16', 'float16' or 'float32')."""
        by = self.bytes_by_dtype()
        tag = max(by, key=by.get) if by else "F32"
        return {"BF16": "bfloat16", "F16": "float16"}.get(tag, "float32")

    def files(self) -> list[Path]:
        return sorted({i.file for i in self._infos.values()})

    # ----------------------------------------------------------------- writing
    @staticmethod
    def save(directory: str | os.PathLike, tensors: Mapping[str, np.ndarray],
             config: ModelConfig, *, multimodal: bool | None = None,
             max_shard_bytes: int = 2 * 1024**3, dtype: str | np.dtype | None = None,
             extra_files: Mapping[str, str] | None = None) -> Path:
        """Write canonical-name tensors in HF layout (sharded above ``max_shard_bytes``).

        ``multimodal`` (default: ``config.multimodal``) chooses the ``language_model.`` prefix
        and the wrapper config. The result loads with transformers' ``from_pretrained``.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        mm = config.multimodal if multimodal is None else multimodal
        exp = expected_shapes(config)
        missing = sorted(set(exp) - set(tensors))
        if missing:
            raise CheckpointError(f"cannot save: missing tensor(s) {missing[:5]}")
        for name, arr in tensors.items():
            if name in exp and tuple(arr.shape) != exp[name]:
                raise CheckpointError(f"cannot save: tensor {name!r} has shape {arr.shape}, "
                                      f"config expects {exp[name]}")
        np_dtype = None if dtype is None else np.dtype(
            ml_dtypes.bfloat16 if str(dtype) in ("bfloat16", "bf16") else dtype)

        def hf(name: str) -> str:
            if name.startswith("lm_head."):
                return ("language_model." if mm else "") + name
            return ("language_model.model." if mm else "model.") + name

        arrays = {}
        for name in sorted(tensors, key=_save_order):
            a = np.asarray(tensors[name])
            if np_dtype is not None and (a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16):
                a = a.astype(np_dtype)
            arrays[hf(name)] = np.ascontiguousarray(a)
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for k, a in arrays.items():
            if shards[-1] and size + a.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = a
            size += a.nbytes
        for old in list(out.glob("model*.safetensors")) + [out / INDEX_FILE]:
            if old.exists():
                old.unlink()
        dt_name = "float32"
        if arrays:
            first = next(iter(arrays.values())).dtype
            dt_name = {np.dtype(ml_dtypes.bfloat16): "bfloat16",
                       np.dtype(np.float16): "float16"}.get(first, "float32")
        cfg_dict = config.replace(multimodal=mm).to_hf_dict()
        cfg_dict["dtype"] = dt_name
        if mm:
            cfg_dict["text_config"]["dtype"] = dt_name
        (out / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
        if len(shards) == 1:
            write_safetensors(out / SINGLE_FILE, shards[0], {"format": "pt"})
        else:
            n = len(shards)
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{n:05d}.safetensors"
                write_safetensors(out / fname, shard, {"format": "pt"})
                weight_map.update({k: fname for k in shard})
            index = {"metadata": {"total_size": sum(a.nbytes for a in arrays.values())},
                     "weight_map": weight_map}
            (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for fname, text in (extra_files or {}).items():
            (out / fname).write_text(text)
        return out


def _save_order(name: str) -> tuple[int, str]:
    lay = layer_of(name)
    return (-1 if name.startswith("embed") else 10**9 if lay is None else lay, name)


def _shard_files(root: Path) -> list[tuple[Path, list[str] | None]]:
    index = root / INDEX_FILE
    if index.exists():
        try:
            data = json.loads(index.read_text())
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: corrupt shard index ({e})") from None
        by_file: dict[str, list[str]] = {}
        for tensor, fname in weight_map.items():
            by_file.setdefault(fname, []).append(tensor)
        out = []
        for fname, names in sorted(by_file.items()):
            f = root / fname
            if not f.exists():
                raise CheckpointError(f"{index}: shard {fname} (holding {names[0]!r} and "
                                      f"{len(names) - 1} more) is missing")
            out.append((f, names))
        return out
    single = root / SINGLE_FILE
    if single.exists():
        return [(single, None)]
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
    """Write numpy arrays (bf16 via ml_dtypes included) as one safetensors file."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    items = []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        tag = _NP_TO_ST.get(a.dtype)
        if tag is None:
            raise CheckpointError(f"cannot write tensor {name!r}: dtype {a.dtype} unsupported")
        header[name] = {"dtype": tag, "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        items.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for a in items:
            fh.write(a.tobytes())
    tmp.replace(path)


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
