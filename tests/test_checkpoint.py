"""Tests for workbench.checkpoint: HF layouts, dtypes, lazy layer subsets, save, bad inputs."""

from __future__ import annotations

import ast
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from helpers_ckpt import (
    TINY_VISION,
    copy_ckpt,
    edit_config,
    file_of,
    index_map,
    raises_with,
    raw_header,
    rewrite_file,
    save_random,
    state_dict_numpy,
    write_raw_safetensors,
)
from oracle import build_hf, rel, save_hf

import workbench as wb
from workbench.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    CheckpointError,
    canonical_name,
    expected_shapes,
)
from workbench.config import ModelConfig

REPO = Path(__file__).resolve().parent.parent
TINY = ModelConfig.tiny()
IDS = np.array([[1, 5, 9, 200, 3, 7, 11, 13, 100, 17, 4, 250],
                [2, 8, 300, 41, 0, 511, 6, 12, 99, 18, 77, 3]])


def hf_prefix(multimodal: bool) -> tuple[str, str]:
    """(body prefix, lm_head prefix) of HF tensor names."""
    return ("language_model.model.", "language_model.") if multimodal else ("model.", "")


def hf_name_of(name: str, multimodal: bool) -> str:
    body, head = hf_prefix(multimodal)
    return head + name if name.startswith("lm_head.") else body + name


@pytest.fixture(scope="module")
def hf_ckpts(tmp_path_factory):
    """transformers-written tiny checkpoints: {(multimodal, sharded): (model, dir)}."""
    out = {}
    for mm in (False, True):
        model = build_hf(TINY, seed=3, multimodal=mm)
        for sharded in (False, True):
            d = tmp_path_factory.mktemp(f"hf_{'mm' if mm else 'text'}_{sharded}")
            save_hf(model, d, shard="200KB" if sharded else "100MB")
            out[mm, sharded] = (model, d)
    return out


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A tiny fp32 checkpoint written by Checkpoint.save (single file) and its tensors."""
    return save_random(tmp_path_factory.mktemp("ours"), TINY, seed=1)


@pytest.fixture(scope="module")
def ours_sharded(tmp_path_factory):
    """The same tensors, sharded at 200 kB (an index plus many shards)."""
    return save_random(tmp_path_factory.mktemp("ours_sharded"), TINY, seed=1,
                       max_shard_bytes=200_000)


# ----------------------------------------------------------------------------- reading HF


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("multimodal", [False, True], ids=["text", "multimodal"])
def test_open_transformers_checkpoint(hf_ckpts, multimodal, sharded):
    model, d = hf_ckpts[multimodal, sharded]
    assert (d / INDEX_FILE).exists() == sharded
    assert (d / SINGLE_FILE).exists() == (not sharded)
    ck = Checkpoint.open(d)
    assert ck.config.multimodal == multimodal
    assert set(ck) == set(expected_shapes(TINY))
    if sharded:
        assert len(ck.files()) > 1
    sd = state_dict_numpy(model)
    for name in ck:
        info = ck.info(name)
        assert info.hf_name == hf_name_of(name, multimodal)
        np.testing.assert_array_equal(ck[name], sd[info.hf_name], err_msg=name)
    vision = sorted(k for k in sd if k.startswith(("vision_model.", "multi_modal_projector.")))
    assert ck.ignored == vision
    assert bool(vision) == multimodal
    assert ck.stored_dtype == "float32"
    ck.close()


def test_canonical_names():
    assert canonical_name("model.layers.0.self_attn.q_proj.weight") == \
        "layers.0.self_attn.q_proj.weight"
    assert canonical_name("language_model.model.layers.3.feed_forward.experts.down_proj") == \
        "layers.3.feed_forward.experts.down_proj"
    assert canonical_name("model.language_model.norm.weight") == "norm.weight"
    assert canonical_name("lm_head.weight") == "lm_head.weight"
    assert canonical_name("language_model.lm_head.weight") == "lm_head.weight"
    assert canonical_name("model.embed_tokens.weight") == "embed_tokens.weight"
    for vision in ("vision_model.class_embedding", "multi_modal_projector.linear_1.weight",
                   "model.vision_model.layernorm_pre.weight",
                   "model.multi_modal_projector.linear_1.weight"):
        assert canonical_name(vision) is None


def test_vision_tensors_under_model_prefix_are_ignored(hf_ckpts, tmp_path):
    """The transformers 5.x VLM layout: model.language_model.*, model.vision_model.*, ..."""
    d = copy_ckpt(hf_ckpts[True, False][1], tmp_path / "ckpt")
    f = d / SINGLE_FILE
    from workbench.checkpoint import read_safetensors, write_safetensors
    tensors, meta = read_safetensors(f)

    def rename(k: str) -> str:
        if k.startswith("language_model.model."):
            return "model.language_model." + k[len("language_model.model."):]
        if k.startswith("language_model.lm_head."):
            return k[len("language_model."):]
        return "model." + k  # model.vision_model.*, model.multi_modal_projector.*

    write_safetensors(f, {rename(k): np.array(v) for k, v in tensors.items()}, meta)
    ck = Checkpoint.open(d)
    assert set(ck) == set(expected_shapes(TINY))
    assert ck.ignored and all(k.startswith(("model.vision_model.",
                                            "model.multi_modal_projector."))
                              for k in ck.ignored)


def test_hf_bfloat16_checkpoint_reads_as_ml_dtypes(tmp_path):
    model = build_hf(TINY, seed=4).to(torch.bfloat16)
    save_hf(model, tmp_path, shard="300KB")
    ck = Checkpoint.open(tmp_path)
    assert ck.stored_dtype == "bfloat16"
    assert set(ck.bytes_by_dtype()) == {"BF16"}
    sd = model.state_dict()
    for name in ck:
        a = ck[name]
        assert a.dtype == np.dtype(ml_dtypes.bfloat16)
        want = sd[ck.info(name).hf_name].view(torch.int16).numpy()
        np.testing.assert_array_equal(a.view(np.int16), want, err_msg=name)


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype, np_dtype, tag", [
    ("float32", np.float32, "F32"),
    ("float16", np.float16, "F16"),
    ("bfloat16", ml_dtypes.bfloat16, "BF16"),
])
def test_save_dtype_round_trip(tmp_path, dtype, np_dtype, tag):
    d, tensors = save_random(tmp_path, TINY, seed=2, dtype=dtype)
    assert json.loads((d / "config.json").read_text())["dtype"] == dtype
    ck = Checkpoint.open(d)
    assert set(ck.bytes_by_dtype()) == {tag}
    assert ck.stored_dtype == dtype
    for name, ref in tensors.items():
        got = ck[name]
        assert got.dtype == np.dtype(np_dtype)
        want = ref.astype(np_dtype)  # round to nearest even
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=name)
        if dtype == "bfloat16":  # the same rounding torch does
            t = torch.from_numpy(ref).to(torch.bfloat16).view(torch.int16).numpy()
            np.testing.assert_array_equal(got.view(np.int16), t, err_msg=name)
        np.testing.assert_allclose(got.astype(np.float32), ref,
                                   rtol={"float32": 0, "float16": 1e-3,
                                         "bfloat16": 8e-3}[dtype], atol=1e-6)
    # get(name, dtype) converts
    assert ck.get("norm.weight", np.float32).dtype == np.float32


def test_saved_files_read_by_safetensors_library(ours_sharded):
    from safetensors import safe_open
    d, tensors = ours_sharded
    wm = index_map(d)
    assert wm is not None
    for fname in sorted(set(wm.values())):
        with safe_open(str(d / fname), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                assert wm[key] == fname
                name = canonical_name(key)
                np.testing.assert_array_equal(f.get_tensor(key).numpy(), tensors[name])


# ----------------------------------------------------------------------------- lazy subsets


@pytest.mark.parametrize("which", ["ours", "hf_sharded"])
def test_layer_subset_reads_only_that_layer(ours, hf_ckpts, which):
    d = ours[0] if which == "ours" else hf_ckpts[False, True][1]
    full = Checkpoint.open(d)
    ck = Checkpoint.open(d, layers=[1])
    assert ck.bytes_read == 0
    want = {n: s for n, s in expected_shapes(TINY).items()
            if not n.startswith("layers.") or n.startswith("layers.1.")}
    assert set(ck) == set(want)
    subset_bytes = sum(int(np.prod(s)) * 4 for s in want.values())
    total = 0
    for name in ck:
        a = ck[name]
        assert a.shape == want[name]
        total += a.nbytes
        np.testing.assert_array_equal(a, full[name])
    assert ck.bytes_read == total == subset_bytes
    assert subset_bytes < 0.45 * full.nbytes
    assert full.bytes_read == subset_bytes  # only what was asked for, there too
    with pytest.raises(KeyError, match=r"layers=\[1\]"):
        ck["layers.0.self_attn.q_proj.weight"]


def test_backend_needs_every_layer(ours):
    from workbench.torch import load
    subset = Checkpoint.open(ours[0], layers=[0])
    with pytest.raises(CheckpointError, match="every layer"):
        load(ours[0], checkpoint=subset)


# ----------------------------------------------------------------------------- saving


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


@pytest.mark.parametrize("preset", ["tiny", "tiny_maverick"])
def test_save_loads_in_transformers_with_same_logits(tmp_path, preset):
    import transformers
    cfg = getattr(ModelConfig, preset)()
    d, tensors = save_random(tmp_path, cfg, seed=5, std=0.08, router_std=0.5)
    model, info = transformers.Llama4ForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    sd = state_dict_numpy(model)
    assert len(sd) == len(tensors)
    for name, a in tensors.items():
        np.testing.assert_array_equal(sd[hf_name_of(name, False)], a, err_msg=name)
    ours = wb.load(d).run(IDS).logits
    ref = hf_logits(model.eval(), IDS)
    assert ours.shape == ref.shape == (2, IDS.shape[1], cfg.vocab_size)
    assert rel(ours, ref) <= 2e-4
    assert np.std(ref) > 1e-3  # not a degenerate comparison
    back = ModelConfig.from_pretrained(d)
    assert back.to_text_dict() == cfg.to_text_dict()


def test_save_multimodal_loads_in_transformers(tmp_path):
    import transformers
    cfg = TINY.replace(multimodal=True, extra={"vision_config": dict(TINY_VISION),
                                               "image_token_index": 500})
    d, tensors = save_random(tmp_path, cfg, seed=6, std=0.08, router_std=0.5,
                             max_shard_bytes=400_000)
    wm = index_map(d)
    assert wm and all(k.startswith("language_model.") for k in wm)
    raw = json.loads((d / "config.json").read_text())
    assert raw["model_type"] == "llama4" and raw["architectures"] == [
        "Llama4ForConditionalGeneration"] and raw["image_token_index"] == 500
    model, info = transformers.Llama4ForConditionalGeneration.from_pretrained(
        d, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    # only the vision tower (which we never write) is missing
    assert info["missing_keys"]
    assert all(k.startswith(("vision_model.", "multi_modal_projector."))
               for k in info["missing_keys"])
    sd = state_dict_numpy(model)
    for name, a in tensors.items():
        np.testing.assert_array_equal(sd[hf_name_of(name, True)], a, err_msg=name)
    ref = hf_logits(model.eval().language_model, IDS)
    assert rel(wb.load(d).run(IDS).logits, ref) <= 2e-4
    ck = Checkpoint.open(d)
    assert ck.config.multimodal and ck.ignored == []


def test_multimodal_flag_overrides_config(tmp_path):
    d, _ = save_random(tmp_path, TINY, multimodal=True)
    ck = Checkpoint.open(d)
    assert ck.config.multimodal
    assert ck.info("lm_head.weight").hf_name == "language_model.lm_head.weight"
    assert ck.info("norm.weight").hf_name == "language_model.model.norm.weight"


def test_sharding_above_max_shard_bytes(tmp_path, ours):
    d, tensors = save_random(tmp_path, TINY, seed=1, max_shard_bytes=200_000)
    idx = json.loads((d / INDEX_FILE).read_text())
    assert not (d / SINGLE_FILE).exists()
    files = sorted(set(idx["weight_map"].values()))
    n = len(files)
    assert n > 2
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in d.glob("*.safetensors")) == files
    assert set(idx["weight_map"]) == {hf_name_of(k, False) for k in tensors}
    assert idx["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    for f in files:
        header, _ = raw_header(d / f)
        sizes = [int(np.prod(v["shape"])) * 4 for k, v in header.items() if k != "__metadata__"]
        assert sum(sizes) <= 200_000 or len(sizes) == 1, f
    ck = Checkpoint.open(d)
    for name, a in tensors.items():
        np.testing.assert_array_equal(ck[name], a)
    # saving again unsharded into the same directory leaves no stale shards or index
    Checkpoint.save(d, tensors, TINY)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", SINGLE_FILE]
    assert len(Checkpoint.open(d)) == len(tensors)


def test_save_refuses_missing_and_misshaped(tmp_path):
    from workbench.random_weights import random_tensors
    t = random_tensors(TINY)
    t.pop("layers.1.self_attn.v_proj.weight")
    raises_with(CheckpointError, lambda: Checkpoint.save(tmp_path / "a", t, TINY),
                "layers.1.self_attn.v_proj.weight")
    t = random_tensors(TINY)
    t["norm.weight"] = np.ones(7, np.float32)
    raises_with(CheckpointError, lambda: Checkpoint.save(tmp_path / "b", t, TINY),
                "norm.weight", "(7,)", "(64,)")


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture
def text_copy(hf_ckpts, tmp_path):
    """A private copy of the transformers-written sharded text checkpoint."""
    return copy_ckpt(hf_ckpts[False, True][1], tmp_path / "ckpt")


@pytest.fixture
def single_copy(ours, tmp_path):
    """A private copy of our single-file checkpoint."""
    return copy_ckpt(ours[0], tmp_path / "ckpt")


def test_truncated_shard(text_copy):
    f = file_of(text_copy, "model.norm.weight")
    header, start = raw_header(f)
    data = f.read_bytes()
    f.write_bytes(data[:-16])
    data_len = len(data) - 16 - start
    cut = [k for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] > data_len]
    msg = raises_with(CheckpointError, lambda: Checkpoint.open(text_copy), f.name, "truncated")
    assert any(repr(k) in msg for k in cut), msg


def test_corrupt_header_json(single_copy):
    f = single_copy / SINGLE_FILE
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    f.write_bytes(data[:8] + b"{garbage" + b" " * (n - 8) + data[8 + n:])
    raises_with(CheckpointError, lambda: Checkpoint.open(single_copy), f.name, "header", "JSON")


def test_header_length_larger_than_file(single_copy):
    f = single_copy / SINGLE_FILE
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(data) + 1000) + data[8:])
    raises_with(CheckpointError, lambda: Checkpoint.open(single_copy), f.name, "header",
                str(len(data) + 1000), str(len(data)))


@pytest.mark.parametrize("size", [0, 3, 7])
def test_file_shorter_than_8_bytes(single_copy, size):
    f = single_copy / SINGLE_FILE
    f.write_bytes(b"\x01" * size)
    raises_with(CheckpointError, lambda: Checkpoint.open(single_copy), f.name, "truncated",
                f"{size} bytes")


def test_missing_tensor_single_file(single_copy):
    rewrite_file(single_copy / SINGLE_FILE, drop=["model.layers.2.self_attn.k_proj.weight"])
    raises_with(CheckpointError, lambda: Checkpoint.open(single_copy), str(single_copy),
                "missing", "layers.2.self_attn.k_proj.weight", "(32, 64)")


def test_missing_tensor_in_shard_named_by_index(text_copy):
    name = "model.layers.1.self_attn.q_proj.weight"
    f = file_of(text_copy, name)
    rewrite_file(f, drop=[name])
    raises_with(CheckpointError, lambda: Checkpoint.open(text_copy), f.name, name)


def test_missing_tensor_absent_from_index_too(text_copy):
    name = "model.layers.3.post_attention_layernorm.weight"
    f = file_of(text_copy, name)
    rewrite_file(f, drop=[name])
    idx = json.loads((text_copy / INDEX_FILE).read_text())
    del idx["weight_map"][name]
    (text_copy / INDEX_FILE).write_text(json.dumps(idx))
    raises_with(CheckpointError, lambda: Checkpoint.open(text_copy), str(text_copy), "missing",
                "layers.3.post_attention_layernorm.weight", "(64,)")


def test_unexpected_tensor(single_copy):
    rewrite_file(single_copy / SINGLE_FILE,
                 put={"model.layers.2.self_attn.q_norm.weight": np.ones(16, np.float32)})
    raises_with(CheckpointError, lambda: Checkpoint.open(single_copy), SINGLE_FILE,
                "unexpected", "layers.2.self_attn.q_norm.weight")
    # strict=False tolerates it
    assert "layers.2.self_attn.q_norm.weight" in Checkpoint.open(single_copy, strict=False)


def test_wrong_shape(single_copy):
    name = "model.layers.2.self_attn.k_proj.weight"
    rewrite_file(single_copy / SINGLE_FILE, put={name: np.ones((16, 64), np.float32)})
    raises_with(CheckpointError, lambda: Checkpoint.open(single_copy), SINGLE_FILE, name,
                "(16, 64)", "(32, 64)")


@pytest.mark.parametrize("multimodal", [False, True], ids=["text", "multimodal"])
def test_config_and_weights_disagree_on_expert_count(hf_ckpts, tmp_path, multimodal):
    d = copy_ckpt(hf_ckpts[multimodal, True][1], tmp_path / "ckpt")
    edit_config(d, num_local_experts=4)
    msg = raises_with(CheckpointError, lambda: Checkpoint.open(d), "num_local_experts=4",
                      "8 experts", ".safetensors")
    assert "router.weight" in msg or "experts." in msg


def test_int_weights_refused(single_copy):
    name = "model.norm.weight"
    rewrite_file(single_copy / SINGLE_FILE, put={name: np.ones(64, np.int32)})
    raises_with(CheckpointError, lambda: Checkpoint.open(single_copy), SINGLE_FILE, name, "I32")


def test_fp8_tensor_refused(single_copy):
    f = single_copy / "model.safetensors"
    tensors = {"model.embed_tokens.weight": ("F8_E4M3", [512, 64])}
    header, data, off = {}, b"", 0
    for k, (dt, shape) in tensors.items():
        n = int(np.prod(shape))
        header[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}
        data += b"\x00" * n
        off += n
    write_raw_safetensors(f, header, data)
    raises_with(CheckpointError, lambda: Checkpoint.open(single_copy), f.name,
                "model.embed_tokens.weight", "FP8")


def test_declared_shape_disagrees_with_byte_span(single_copy):
    f = single_copy / SINGLE_FILE
    write_raw_safetensors(f, {"model.norm.weight": {"dtype": "F32", "shape": [64],
                                                    "data_offsets": [0, 128]}}, b"\x00" * 128)
    raises_with(CheckpointError, lambda: Checkpoint.open(single_copy), f.name,
                "model.norm.weight", "(64,)")


def test_missing_shard(text_copy):
    f = file_of(text_copy, "model.layers.2.self_attn.o_proj.weight")
    f.unlink()
    raises_with(CheckpointError, lambda: Checkpoint.open(text_copy), INDEX_FILE, f.name,
                "missing")


@pytest.mark.parametrize("content", ['{"weight_map": {', "[]", '{"metadata": {}}',
                                     '{"weight_map": [1]}'])
def test_corrupt_index(text_copy, content):
    (text_copy / INDEX_FILE).write_text(content)
    raises_with(CheckpointError, lambda: Checkpoint.open(text_copy), INDEX_FILE, "index")


def test_pickle_weights_refused(tmp_path, ours):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text((ours[0] / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    raises_with(CheckpointError, lambda: Checkpoint.open(d), "pickle")


def test_directory_with_only_pytorch_model_bin_refused_mentioning_pickle(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    raises_with(CheckpointError, lambda: Checkpoint.open(tmp_path), "pickle")


def test_not_a_directory(tmp_path):
    raises_with(CheckpointError, lambda: Checkpoint.open(tmp_path / "nope"), "nope")


def test_stray_shards_without_index(single_copy):
    (single_copy / SINGLE_FILE).rename(single_copy / "model-00001-of-00001.safetensors")
    raises_with(CheckpointError, lambda: Checkpoint.open(single_copy),
                "model-00001-of-00001.safetensors", INDEX_FILE)


@pytest.mark.parametrize("layers", [[99], [0, 4], [-1]])
def test_layers_out_of_range(ours, layers):
    bad = [x for x in layers if not 0 <= x < 4]
    raises_with(CheckpointError, lambda: Checkpoint.open(ours[0], layers=layers), str(bad),
                "4 layers")


# ----------------------------------------------------------------------------- no pickle

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "cloudpickle"}


def pickle_uses(source: str) -> list[str]:
    """Imports of pickle-like modules, torch.load / pickle.load calls, allow_pickle=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:  # not `from .torch import`
            mod = (node.module or "").split(".")[0]
            if mod in PICKLE_MODULES or (mod == "torch" and any(a.name == "load"
                                                                for a in node.names)):
                found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            fn = node.func
            if isinstance(fn, ast.Attribute) and fn.attr in ("load", "loads", "Unpickler") \
                    and isinstance(fn.value, ast.Name) and fn.value.id in (PICKLE_MODULES
                                                                          | {"torch"}):
                found.append(f"{fn.value.id}.{fn.attr}(...) at line {node.lineno}")
            for kw in node.keywords:
                if kw.arg in ("allow_pickle", "weights_only") and isinstance(
                        kw.value, ast.Constant) and kw.value.value is (kw.arg == "allow_pickle"):
                    found.append(f"{kw.arg}={kw.value.value} at line {node.lineno}")
    return found


def test_pickle_detector_detects():
    src = ("import pickle\nimport torch\nfrom dill import loads\ntorch.load('x')\n"
           "np.load('y', allow_pickle=True)\ntorch.load('z', weights_only=False)\n")
    assert len(pickle_uses(src)) == 6
    assert pickle_uses("import workbench.torch\nworkbench.torch.load('p')\n"
                       "from .torch import load\n") == []
    assert pickle_uses("from torch import load\n") == ["from torch import ..."]


def test_no_pickle_anywhere_in_workbench():
    files = sorted((REPO / "workbench").rglob("*.py"))
    assert len(files) > 10
    offenders = {str(f.relative_to(REPO)): u for f in files
                 if (u := pickle_uses(f.read_text(encoding="utf-8")))}
    assert not offenders, offenders
