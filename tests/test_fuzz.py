"""Seeded mutation campaign over a small checkpoint's files.

Each trial mutates one file of a valid checkpoint (the safetensors header, byte by byte or as
JSON; config.json as JSON; the shard index) and loads it. Allowed outcomes:

* refused: one CheckpointError or ConfigError whose message names the checkpoint's file (a
  config problem names config.json);
* same: the model loads without warnings and its logits equal the unmutated model's, bit for
  bit (torch always; jax for the first few such trials);
* warned: the file loads with a CheckpointWarning naming it. Only bytes that belong to no tensor
  (a gap, or trailing bytes) may do this, as the format's rules allow; a header length cut into
  the header's padding, or a byte inserted into it, shifts the data area and lands here.

Any other exception, or different logits without an error, fails the test with the seed, the
trial and the mutation, so it can be replayed. Mutations are corruptions (wrong types,
non-finite or out-of-range values, broken JSON, duplicate keys, foreign paths) or equivalent
rewrites (reordered keys, whitespace, an int for a float of the same value); a *valid* but
different config (say rms_norm_eps 1e-6) is a different model, not a defect, and is not
generated. Bounded: about 30 s on a 2-core CPU (40 s when it is busy).
"""

from __future__ import annotations

import json
import os
import random
import struct
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers_ckpt import save_random

import workbench as wb
from workbench.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError, CheckpointWarning
from workbench.config import ConfigError, ModelConfig

SEED = 20261130
TRIALS = {"header_bytes": 120, "header_json": 90, "config_json": 120, "index_json": 40}
# jax compiles per load: the first accepted mutation of these families goes through it too
JAX_SAME = {"header_bytes": 0, "header_json": 1, "config_json": 1, "index_json": 0}
CFG = ModelConfig.tiny()
IDS = np.array([[1, 5, 9, 200, 3, 7, 11, 13, 100, 17, 4, 250, 33, 2]])

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    single, _ = save_random(root / "single", CFG, seed=3, std=0.08, router_std=0.5)
    sharded, _ = save_random(root / "sharded", CFG, seed=3, std=0.08, router_std=0.5,
                             max_shard_bytes=300_000)
    ref = {"torch": wb.load(single, backend="torch").run(IDS).logits,
           "jax": wb.load(single, backend="jax").run(IDS).logits}
    return single, sharded, ref


def put(path: Path, data: bytes) -> None:
    """Replace a file by a new inode (never truncate a file a model may still map)."""
    tmp = path.with_name(path.name + ".fuzz-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def pad_header(text: bytes, data: bytes) -> bytes:
    text += b" " * (-(len(text) + 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


# ----------------------------------------------------------------------------- mutations

JSON_CHARS = b'{}[]",:0123456789-+.eE ntrufalsNI\\\t\n'
VALUE_POOL: list[Any] = [None, True, False, -1, 0, 1, 2**63, 2**64, 1.5, -0.0, NAN, INF, "8",
                         "F32", "F16", "BF16", "I32", "C64", "U32", "F8_E4M3", "", [], [0],
                         [0, 0], [1, 2, 3], [-8, 0], [2**64, 2**64 + 4], [[1]], [1.0, 2.0], {},
                         {"a": 1}]


def header_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    (n,) = struct.unpack("<Q", data[:8])
    kind = rng.choice(["replace", "replace", "replace", "insert", "delete", "length"])
    if kind == "length":
        new_n = rng.choice([n - rng.randint(1, 16), n + rng.randint(1, 16), 0, 2**63,
                            n ^ (1 << rng.randrange(64))])
        return struct.pack("<Q", new_n % 2**64) + data[8:], f"length {n} -> {new_n}"
    pos = rng.randrange(8, 8 + n)
    byte = bytes([rng.randrange(256)]) if rng.random() < 0.4 else bytes(
        [rng.choice(JSON_CHARS)])
    if kind == "replace":
        return data[:pos] + byte + data[pos + 1:], f"byte {pos} = {byte!r}"
    if kind == "insert":
        return data[:pos] + byte + data[pos:], f"insert {byte!r} at {pos}"
    return data[:pos] + data[pos + 1:], f"delete byte {pos}"


def header_json(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    (n,) = struct.unpack("<Q", data[:8])
    h = json.loads(data[8:8 + n])
    body = data[8 + n:]
    names = [k for k in h if k != "__metadata__"]
    name = rng.choice(names)
    kind = rng.choice(["set", "set", "set", "del_key", "del_tensor", "dup_key", "copy_offsets",
                       "permute_shape", "metadata", "reorder", "reindent", "vision_extra",
                       "shift"])
    label = f"{kind} {name}"
    text = None
    if kind == "set":
        key = rng.choice(["dtype", "shape", "data_offsets"])
        value = rng.choice(VALUE_POOL)
        h[name][key] = value
        label += f".{key} = {value!r}"
    elif kind == "del_key":
        key = rng.choice(["dtype", "shape", "data_offsets"])
        del h[name][key]
        label += f".{key}"
    elif kind == "del_tensor":
        del h[name]
    elif kind == "dup_key":  # the name again, last, pointing at another tensor's entry
        other = h[rng.choice(names)]
        raw = json.dumps(h).encode()
        text = raw[:-1] + b"," + json.dumps({name: other}).encode()[1:-1] + b"}"
    elif kind == "copy_offsets":
        other = rng.choice(names)
        h[name]["data_offsets"] = list(h[other]["data_offsets"])
        label += f" <- {other}"
    elif kind == "permute_shape":
        h[name]["shape"] = list(reversed(h[name]["shape"]))
    elif kind == "metadata":
        value = rng.choice([{"format": "np"}, {}, None, {"format": 1}, [], "pt"])
        h["__metadata__"] = value
        label = f"__metadata__ = {value!r}"
    elif kind == "reorder":
        items = list(h.items())
        rng.shuffle(items)
        h = dict(items)
    elif kind == "reindent":
        text = json.dumps(h, indent=rng.choice([1, 2, "\t"])).encode()
    elif kind == "vision_extra":  # an ignored vision tensor, empty and in bounds: harmless
        end = max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__")
        h["vision_model.class_embedding"] = {"dtype": "F32", "shape": [0],
                                             "data_offsets": [end, end]}
    elif kind == "shift":  # every offset moved by k bytes: a gap at the start
        k = rng.choice([-4, 4, 8])
        for v in h.values():
            if isinstance(v, dict) and "data_offsets" in v:
                v["data_offsets"] = [o + k for o in v["data_offsets"]]
        body = (b"\x00" * k + body) if k > 0 else body
        label = f"shift offsets by {k}"
    if text is None:
        text = json.dumps(h).encode()
    return pad_header(text, body), label


def corrupt_values(v: Any, field: str) -> list[Any]:
    """Values that must be refused (or are the same value written differently) for a field
    whose valid value is ``v``."""
    common: list[Any] = [[], {}, "x", [v]]
    if isinstance(v, bool):
        pool = ["true", "false", 2.5, None, *common]
        return pool + ([] if field == "attn_temperature_tuning" else [int(v)])
    if isinstance(v, int):
        pool = [-1, float(v) + 0.5, float(v), str(v), True, NAN, INF, *common]
        if field not in ("pad_token_id", "bos_token_id", "eos_token_id",
                         "intermediate_size_mlp", "initializer_range"):
            pool += [0, None]
        if field == "floor_scale":  # real-valued: equal float is the same, others differ
            pool = [NAN, INF, -INF, 0, -1, "4", True, None, float(v), *common]
        return pool
    if isinstance(v, float):
        pool = [NAN, INF, -INF, -1.0, str(v), True, None, *common]
        if field in ("rms_norm_eps", "rope_theta", "attn_scale", "factor", "low_freq_factor",
                     "high_freq_factor"):
            pool.append(0.0)
        if v == int(v):
            pool.append(int(v))  # the same number as an int
        return pool
    if isinstance(v, str):
        return ["gelu" if field == "hidden_act" else "yarn" if field == "rope_type" else "other",
                1, None, [v], v.upper() if v != v.upper() else v.lower()]
    if isinstance(v, list):
        pool = [v[:-1], [str(x) for x in v], 3, "x", [None] * len(v)]
        if v and isinstance(v[0], int):
            pool += [[float(x) for x in v], [True] * len(v), v[:-1] + [99]]
        if field == "moe_layers":
            pool.append(v + v[-1:])  # a repeated layer: the same set
        return pool
    return [1, "x"]


NEUTRAL = {"architectures", "dtype", "torch_dtype", "transformers_version", "use_cache",
           "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
           "initializer_range", "attention_dropout"}


def config_json(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    d = json.loads(data)
    kind = rng.choice(["field"] * 6 + ["rope", "rope_invert", "dup_key", "truncate",
                                       "reorder", "unknown_key", "not_utf8", "whole"])
    if kind == "field":
        field = rng.choice([k for k in d if k != "rope_parameters" and d[k] is not None])
        value = rng.choice(corrupt_values(d[field], field))
        d[field] = value
        return json.dumps(d).encode(), f"{field} = {value!r}"
    if kind == "rope":
        rp = d["rope_parameters"]
        key = rng.choice(list(rp))
        value = rng.choice(corrupt_values(rp[key], key))
        rp[key] = value
        return json.dumps(d).encode(), f"rope_parameters.{key} = {value!r}"
    if kind == "rope_invert":
        rp = d["rope_parameters"]
        rp["low_freq_factor"], rp["high_freq_factor"] = 4.0, 2.0
        return json.dumps(d).encode(), "rope factors inverted"
    if kind == "dup_key":
        field = rng.choice(list(d))
        text = json.dumps(d)
        return (text[:-1] + f", {json.dumps(field)}: {json.dumps(d[field])}}}").encode(), \
            f"duplicate {field}"
    if kind == "truncate":
        cut = rng.randrange(len(data))
        return data[:cut], f"truncated at {cut}"
    if kind == "reorder":
        items = list(d.items())
        rng.shuffle(items)
        return json.dumps(dict(items), indent=rng.choice([None, 1, 4])).encode(), "reordered"
    if kind == "unknown_key":
        return json.dumps({**d, "fuzz_unknown": rng.choice(VALUE_POOL)}).encode(), \
            "unknown key"
    if kind == "not_utf8":
        pos = rng.randrange(len(data))
        return data[:pos] + b"\xff" + data[pos:], f"0xff at {pos}"
    value = rng.choice([[], "x", 1, None, [d]])
    return json.dumps(value).encode(), f"whole config = {type(value).__name__}"


def index_json(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    idx = json.loads(data)
    wm = idx["weight_map"]
    name = rng.choice(list(wm))
    shards = sorted(set(wm.values()))
    value = rng.choice([rng.choice(shards), "../single/model.safetensors",
                        "/dev/zero", "/etc/passwd", "config.json", "model.safetensors", "",
                        ".", "..", 1, None, ["x"], {"a": 1}, f"./{wm[name]}",
                        f"sub/../{wm[name]}", wm[name] + "\x00"])
    kind = rng.choice(["value", "value", "drop", "weight_map", "reorder"])
    if kind == "value":
        wm[name] = value
        return json.dumps(idx).encode(), f"weight_map[{name}] = {value!r}"
    if kind == "drop":
        del wm[name]
        return json.dumps(idx).encode(), f"drop {name}"
    if kind == "weight_map":
        idx["weight_map"] = rng.choice([[], None, "x", {}, 1])
        return json.dumps(idx).encode(), f"weight_map = {idx['weight_map']!r}"
    items = list(wm.items())
    rng.shuffle(items)
    idx["weight_map"] = dict(items)
    return json.dumps(idx, indent=2).encode(), "reordered"


# ----------------------------------------------------------------------------- the campaign


def trial(d: Path, ref: dict, jax_left: list[int]) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = wb.load(d, backend="torch")
        except (CheckpointError, ConfigError) as e:
            msg = str(e)
            assert str(d) in msg, f"the message names no file of the checkpoint: {msg}"
            if isinstance(e, ConfigError):
                assert "config.json" in msg, msg
            with pytest.raises(type(e)):  # the other backend refuses it the same way
                wb.load(d, backend="jax")
            return "refused"
    ours = [w for w in caught if issubclass(w.category, CheckpointWarning)]
    if ours:
        assert all(str(d) in str(w.message) for w in ours), [str(w.message) for w in ours]
        assert all("belong to no tensor" in str(w.message) for w in ours), \
            [str(w.message) for w in ours]
        return "warned"
    assert np.array_equal(model.run(IDS).logits, ref["torch"]), "accepted, but logits differ"
    if jax_left[0] > 0:
        jax_left[0] -= 1
        assert np.array_equal(wb.load(d, backend="jax").run(IDS).logits, ref["jax"]), \
            "accepted, but jax logits differ"
    return "same"


MUTATORS = {"header_bytes": (header_bytes, "single", SINGLE_FILE),
            "header_json": (header_json, "single", SINGLE_FILE),
            "config_json": (config_json, "single", "config.json"),
            "index_json": (index_json, "sharded", INDEX_FILE)}


@pytest.mark.parametrize("family", list(TRIALS))
def test_mutated_checkpoint_is_refused_or_unchanged(base, family):
    single, sharded, ref = base
    mutate, which, fname = MUTATORS[family]
    d = single if which == "single" else sharded
    f = d / fname
    original = f.read_bytes()
    rng = random.Random(f"{SEED}-{family}")
    outcomes: Counter[str] = Counter()
    jax_left = [JAX_SAME[family]]
    try:
        for i in range(TRIALS[family]):
            data, label = mutate(rng, original)
            put(f, data)
            try:
                outcomes[trial(d, ref, jax_left)] += 1
            except AssertionError as e:
                raise AssertionError(f"seed {SEED}, {family} trial {i}: {label}: {e}") from None
            except Exception as e:
                raise AssertionError(f"seed {SEED}, {family} trial {i}: {label}: unexpected "
                                     f"{type(e).__name__}: {e}") from e
    finally:
        put(f, original)
    print(family, dict(outcomes))
    # the campaign is not vacuous: most mutations are refused, some are harmless rewrites
    assert outcomes["refused"] >= TRIALS[family] // 2, outcomes
    if family != "header_bytes":  # a random byte is rarely a harmless one
        assert outcomes["same"] >= 1, outcomes
