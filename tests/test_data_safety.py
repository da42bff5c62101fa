"""What the workbench refuses, and that refusing never costs the user a file.

One section per family of the issue: nothing the user has is ever destroyed (save, train); the
checkpoint is validated as safetensors promises; the index and files stay inside the checkpoint;
the config is validated by type and value; NaN/Inf weights are reported. Each case asserts the
error type and that the message names the file, tensor or field.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import warnings
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from helpers_ckpt import (
    copy_ckpt,
    edit_config,
    file_of,
    index_map,
    raises_with,
    raw_header,
    save_random,
    write_raw_safetensors,
)

import workbench as wb
from workbench import checkpoint as ckmod
from workbench import train as trainmod
from workbench.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    CheckpointError,
    CheckpointWarning,
    expected_shapes,
    scan_values,
)
from workbench.cli import main
from workbench.config import ConfigError, ModelConfig
from workbench.describe import inspect_text
from workbench.random_weights import random_tensors

REPO = Path(__file__).resolve().parent.parent
TINY = ModelConfig.tiny()
IDS = np.array([[1, 5, 9, 200, 3, 7, 11, 13, 100, 17, 4, 250]])
Q1 = "model.layers.1.self_attn.q_proj.weight"
Q1C = "layers.1.self_attn.q_proj.weight"  # its canonical name


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (recursively) with its bytes; symlinks by their target."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        if p.is_symlink():
            out[rel] = os.readlink(p).encode()
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = b"<dir>"
    return out


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A tiny fp32 single-file checkpoint, its tensors and its torch logits on IDS."""
    d, tensors = save_random(tmp_path_factory.mktemp("ours") / "ckpt", TINY, seed=1)
    return d, tensors, wb.load(d).run(IDS).logits


@pytest.fixture
def single(ours, tmp_path):
    return copy_ckpt(ours[0], tmp_path / "ckpt")


@pytest.fixture
def sharded(ours, tmp_path):
    d, _ = save_random(tmp_path / "sharded", TINY, seed=1, max_shard_bytes=200_000)
    return d


@contextlib.contextmanager
def no_hang(seconds: int = 10):
    """Fail (instead of hanging the suite) if the body blocks, e.g. opening a FIFO."""
    def boom(*_):
        raise TimeoutError(f"blocked for {seconds} s")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ============================================================================ 1. nothing destroyed


class Interrupted(BaseException):
    """Stands for a signal or a crash in the middle of writing."""


def bad_tensors(case: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(tensors, save keywords, fragment the error must contain) for one refused save."""
    t: dict[str, Any] = dict(random_tensors(TINY, seed=2))
    kw: dict[str, Any] = {}
    if case == "extra_complex64":
        t["layers.0.extra.weight"] = np.zeros(3, np.complex64)
        return t, kw, "layers.0.extra.weight"
    if case == "norm_uint32":
        t["norm.weight"] = np.ones(64, np.uint32)
        return t, kw, "norm.weight"
    if case == "norm_int32":  # writable, but no model could load it
        t["norm.weight"] = np.ones(64, np.int32)
        return t, kw, "norm.weight"
    if case == "unexpected_tensor":
        t["layers.9.self_attn.q_proj.weight"] = np.ones((64, 64), np.float32)
        return t, kw, "layers.9.self_attn.q_proj.weight"
    if case == "missing_tensor":
        del t["layers.3.feed_forward.router.weight"]
        return t, kw, "layers.3.feed_forward.router.weight"
    if case == "wrong_shape":
        t["layers.2.self_attn.k_proj.weight"] = np.ones((16, 64), np.float32)
        return t, kw, "layers.2.self_attn.k_proj.weight"
    if case == "bad_dtype_argument":
        return t, {"dtype": "complex64"}, "complex64"
    if case == "unknown_dtype_argument":
        return t, {"dtype": "float33"}, "float33"
    if case == "bad_extra_file_name":
        return t, {"extra_files": {"../escape.txt": "x"}}, "escape.txt"
    raise AssertionError(case)


REFUSED_SAVES = ["extra_complex64", "norm_uint32", "norm_int32", "unexpected_tensor",
                 "missing_tensor", "wrong_shape", "bad_dtype_argument", "unknown_dtype_argument",
                 "bad_extra_file_name"]


def existing_checkpoint(ours, tmp_path: Path, layout: str) -> tuple[Path, Path]:
    """(parent, ckpt dir): a single-file or sharded checkpoint, or ("new") no directory yet."""
    parent = tmp_path / "parent"
    parent.mkdir()
    d = parent / "ckpt"
    if layout == "single":
        copy_ckpt(ours[0], d)
    elif layout == "sharded":
        save_random(d, TINY, seed=1, max_shard_bytes=200_000)
    return parent, d


@pytest.mark.parametrize("layout", ["single", "sharded", "new"])
@pytest.mark.parametrize("case", REFUSED_SAVES)
def test_refused_save_leaves_everything_as_it_was(ours, tmp_path, case, layout):
    parent, d = existing_checkpoint(ours, tmp_path, layout)
    if d.exists():
        (d / "README.md").write_text("my notes")
    before = snapshot(parent)
    t, kw, fragment = bad_tensors(case)
    raises_with(CheckpointError, lambda: Checkpoint.save(d, t, TINY, **kw), fragment)
    assert snapshot(parent) == before
    if layout != "new":
        assert len(Checkpoint.open(d)) == len(expected_shapes(TINY))


@pytest.mark.parametrize("after_writes", [0, 1, 5])
@pytest.mark.parametrize("layout", ["single", "sharded", "new"])
def test_interrupted_save_leaves_the_old_checkpoint(ours, tmp_path, monkeypatch, layout,
                                                    after_writes):
    parent, d = existing_checkpoint(ours, tmp_path, layout)
    before = snapshot(parent)
    real = ckmod._write_array
    calls = []

    def dying_writer(fh, a, *args, **kwargs):
        if len(calls) == after_writes:
            fh.write(b"\x00" * 100)  # half a tensor on disk, then the process dies
            raise Interrupted()
        calls.append(1)
        return real(fh, a, *args, **kwargs)

    monkeypatch.setattr(ckmod, "_write_array", dying_writer)
    new = random_tensors(TINY, seed=9)
    with pytest.raises(Interrupted):  # saved the other way round: single <-> sharded
        Checkpoint.save(d, new, TINY, max_shard_bytes=200_000 if layout == "single" else 2**31)
    assert snapshot(parent) == before, "old files changed or temporary files left behind"
    monkeypatch.undo()
    if layout != "new":
        ck = Checkpoint.open(d)
        want = random_tensors(TINY, seed=1)
        np.testing.assert_array_equal(ck[Q1C], want[Q1C])
    # and the same save, uninterrupted, replaces the checkpoint completely
    Checkpoint.save(d, new, TINY, max_shard_bytes=200_000 if layout == "single" else 2**31)
    ck = Checkpoint.open(d)
    np.testing.assert_array_equal(ck[Q1C], new[Q1C])
    names = sorted(p.name for p in d.iterdir())
    assert (INDEX_FILE in names) == (layout == "single")
    assert (SINGLE_FILE in names) == (layout != "single")
    assert sorted(p.name for p in parent.iterdir()) == ["ckpt"]


def test_save_over_a_loaded_model_keeps_the_model_and_replaces_the_files(tmp_path):
    d, _ = save_random(tmp_path / "ckpt", TINY, seed=1)
    model = wb.load(d)  # fp32 weights are zero-copy views of the mapped file
    before = model.run(IDS).logits
    inode = (d / SINGLE_FILE).stat().st_ino
    new = random_tensors(TINY, seed=7)
    Checkpoint.save(d, new, TINY)
    assert (d / SINGLE_FILE).stat().st_ino != inode, "the file must be replaced, not rewritten"
    assert np.array_equal(model.run(IDS).logits, before)
    np.testing.assert_array_equal(Checkpoint.open(d)[Q1C], new[Q1C])


def fake_model_dir(d: Path) -> Path:
    """A directory shaped like data/scout-mini (files only need to exist)."""
    (d / "checkpoints" / "step-00050").mkdir(parents=True)
    for name in ("README.md", "config.json", "model.safetensors", "tokenizer.json",
                 "training_log.json", "routing_structure.json",
                 "checkpoints/step-00050/model.safetensors"):
        (d / name).write_text(f"old {name}")
    return d


BAD_TRAIN = {
    "no_out": (["--steps", "5"], "--out"),
    "missing_corpus": (["--corpus", "/nonexistent"], "--corpus"),
    "missing_tokenizer": (["--tokenizer", "/nonexistent"], "--tokenizer"),
    "zero_steps": (["--steps", "0"], "--steps"),
    "negative_batch": (["--batch", "-1"], "--batch"),
    "nan_lr": (["--lr", "nan"], "--lr"),
    "snapshot_not_a_number": (["--snapshots", "ten"], "--snapshots"),
    "snapshot_after_last_step": (["--steps", "10", "--snapshots", "50"], "--snapshots"),
    "zero_eval_every": (["--eval-every", "0"], "--eval-every"),
}


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("case", sorted(BAD_TRAIN))
def test_train_refuses_bad_arguments_before_touching_the_disk(tmp_path, capsys, case,
                                                              overwrite):
    out = fake_model_dir(tmp_path / "model")
    before = snapshot(tmp_path)
    bundled = bundled_meta()
    extra, fragment = BAD_TRAIN[case]
    args = ["train", *extra] + ([] if case == "no_out" else ["--out", str(out)])
    rc = main(args + (["--overwrite"] if overwrite else []))
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err, err
    assert snapshot(tmp_path) == before
    assert bundled_meta() == bundled


def bundled_meta() -> dict[str, dict[str, tuple[int, int]]]:
    """snapshot_meta of each bundled model (the text model and the multimodal one)."""
    return {name: snapshot_meta(REPO / "data" / name)
            for name in ("scout-mini", "scout-mini-vision") if (REPO / "data" / name).is_dir()}


def snapshot_meta(d: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) per file: cheap enough for the bundled model."""
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("multimodal", [False, True], ids=["text", "multimodal"])
@pytest.mark.parametrize("target", ["bundled", "bundled-vision", "other"])
def test_train_refuses_a_non_empty_out_without_overwrite(tmp_path, capsys, target, multimodal):
    out = {"bundled": REPO / "data" / "scout-mini",
           "bundled-vision": REPO / "data" / "scout-mini-vision"}.get(target)
    if out is None:
        out = fake_model_dir(tmp_path / "m")
    elif not out.is_dir():
        pytest.skip(f"{out} is not there")
    before = snapshot_meta(out)
    mode = ["--multimodal"] if multimodal else []
    assert main(["train", *mode, "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err
    assert snapshot_meta(out) == before


@pytest.fixture
def tiny_corpus(tmp_path):
    c = tmp_path / "corpus"
    c.mkdir()
    for split in ("train", "val"):
        docs = [{"domain": dom, "text": f"{dom} text number {i} " * 20}
                for i in range(4) for dom in ("code", "prose")]
        (c / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return c


def fake_run(tensors_seed: int, snapshots: tuple[int, ...] = (10,)):
    """A stand-in for the training loop: writes what a run writes into its staging dir."""
    def _train(a, cfg, tok, train_stream, val_batches, stage, progress):
        for s in snapshots:
            Checkpoint.save(stage / "checkpoints" / f"step-{s:05d}",
                            random_tensors(TINY, seed=s), TINY)
        Checkpoint.save(stage, random_tensors(TINY, seed=tensors_seed), TINY,
                        max_shard_bytes=200_000)
        tok.save(stage)
        (stage / "training_log.json").write_text('{"steps": []}\n')
        return {"steps": []}
    return _train


CFG_4096 = TINY.replace(vocab_size=4096)  # the bundled tokenizer's vocabulary


def train_args(out: Path, corpus: Path) -> trainmod.TrainArgs:
    return trainmod.TrainArgs(out=out, corpus=corpus, steps=20, batch=2, context=16,
                              eval_batches=1, snapshots=(10,))


def test_interrupted_train_leaves_the_old_directory(tmp_path, tiny_corpus, monkeypatch):
    out = fake_model_dir(tmp_path / "model")
    before = snapshot(tmp_path)

    def dying(a, cfg, tok, train_stream, val_batches, stage, progress):
        fake_run(3)(a, cfg, tok, train_stream, val_batches, stage, progress)
        raise Interrupted()

    monkeypatch.setattr(trainmod, "_train", dying)
    with pytest.raises(Interrupted):
        trainmod.train(train_args(out, tiny_corpus), cfg=CFG_4096, overwrite=True)
    assert snapshot(tmp_path) == before


def test_train_with_overwrite_replaces_the_run_and_keeps_other_files(tmp_path, tiny_corpus,
                                                                   monkeypatch):
    out = fake_model_dir(tmp_path / "model")
    monkeypatch.setattr(trainmod, "_train", fake_run(3))
    trainmod.train(train_args(out, tiny_corpus), cfg=CFG_4096, overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    assert SINGLE_FILE not in names and INDEX_FILE in names  # the old single file was stale
    for kept in ("README.md", "routing_structure.json"):
        assert (out / kept).read_text() == f"old {kept}"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00010"]
    np.testing.assert_array_equal(Checkpoint.open(out)["norm.weight"],
                                  random_tensors(TINY, seed=3)["norm.weight"])
    Checkpoint.open(out / "checkpoints" / "step-00010")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "model"]


def test_train_into_a_new_directory(tmp_path, tiny_corpus, monkeypatch):
    out = tmp_path / "a" / "b"
    monkeypatch.setattr(trainmod, "_train", fake_run(4))
    trainmod.train(train_args(out, tiny_corpus), cfg=CFG_4096)
    assert (out / "tokenizer.json").exists() and (out / "training_log.json").exists()
    assert len(Checkpoint.open(out)) == len(random_tensors(TINY))
    assert sorted(p.name for p in out.parent.iterdir()) == ["b"]


# ============================================================================ 2. safetensors


def set_entry(name: str, key: str, value: Any):
    def mutate(h: dict) -> None:
        h[name][key] = value
    return mutate


def overlap(h: dict) -> None:
    """Q1 re-pointed half-way into the tensor stored before it (same byte length)."""
    b, e = h[Q1]["data_offsets"]
    prev = max((v["data_offsets"] for k, v in h.items() if k != "__metadata__"
                and v["data_offsets"][1] <= b), key=lambda o: o[1])
    shift = (prev[1] - prev[0]) // 2
    h[Q1]["data_offsets"] = [b - shift, e - shift]


def into_header(h: dict) -> None:
    b, e = h[Q1]["data_offsets"]
    h[Q1]["data_offsets"] = [b - 10**9, e - 10**9]


HEADER_CASES: dict[str, tuple[Any, tuple[str, ...]]] = {
    "overlapping_offsets": (overlap, ("overlap", Q1)),
    "negative_offsets_into_header": (into_header, ("negative", Q1)),
    "offsets_as_int": (set_entry(Q1, "data_offsets", 4096), ("data_offsets", Q1)),
    "offsets_as_strings": (set_entry(Q1, "data_offsets", ["0", "4096"]), ("data_offsets", Q1)),
    "offsets_as_floats": (set_entry(Q1, "data_offsets", [0.0, 4096.0]), ("data_offsets", Q1)),
    "three_offsets": (set_entry(Q1, "data_offsets", [0, 1, 2]), ("data_offsets", Q1)),
    "reversed_offsets": (set_entry(Q1, "data_offsets", [4096, 0]), ("data_offsets", Q1)),
    "offsets_past_the_end": (set_entry(Q1, "data_offsets", [10**9, 10**9 + 16384]),
                             ("truncated", Q1)),
    "shape_null": (set_entry(Q1, "shape", None), ("shape", Q1)),
    "shape_float": (set_entry(Q1, "shape", [64.0, 64]), ("shape", Q1)),
    "shape_negative": (set_entry(Q1, "shape", [-64, -64]), ("shape", Q1)),
    "shape_beyond_int64": (set_entry(Q1, "shape", [2**64, 0]), ("shape", Q1)),
    "shape_string": (set_entry(Q1, "shape", "64x64"), ("shape", Q1)),
    "shape_disagrees_with_span": (set_entry(Q1, "shape", [64, 32]), ("spans", Q1)),
    "dtype_list": (set_entry(Q1, "dtype", ["F32"]), ("dtype", Q1)),
    "dtype_unknown": (set_entry(Q1, "dtype", "F31"), ("dtype", "F31", Q1)),
    "dtype_complex": (set_entry(Q1, "dtype", "C64"), ("unsupported dtype", Q1)),
    "dtype_fp8": (set_entry(Q1, "dtype", "F8_E4M3"), ("FP8", Q1)),
    "entry_not_an_object": (lambda h: h.__setitem__(Q1, [1, 2]), ("header entry", Q1)),
    "entry_lacks_dtype": (lambda h: h[Q1].pop("dtype"), ("lacks dtype", Q1)),
    "metadata_not_strings": (lambda h: h.__setitem__("__metadata__", {"format": 1}),
                             ("__metadata__",)),
}


def rewrite_header(f: Path, mutate) -> None:
    header, start = raw_header(f)
    data = f.read_bytes()[start:]
    mutate(header)
    write_raw_safetensors(f, header, data)


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_header_defect_is_one_clear_error(single, case):
    mutate, fragments = HEADER_CASES[case]
    f = single / SINGLE_FILE
    rewrite_header(f, mutate)
    raises_with(CheckpointError, lambda: Checkpoint.open(single), str(f), *fragments)


def raw_bytes_case(case: str, data: bytes) -> tuple[bytes, tuple[str, ...]]:
    (n,) = struct.unpack("<Q", data[:8])
    text = data[8:8 + n]
    if case == "duplicate_key":  # Q1 again, last, pointing at layer 2's q_proj (same shape)
        header = json.loads(text)
        q2 = header[Q1.replace("1", "2")]
        body = text.rstrip()
        new = body[:-1] + b"," + json.dumps({Q1: q2}).encode()[1:-1] + b"}"
        return struct.pack("<Q", len(new)) + new + data[8 + n:], ("duplicate key", Q1)
    if case == "not_utf8":
        new = text.replace(b"format", b"f\xffrmat", 1)
        return struct.pack("<Q", len(new)) + new + data[8 + n:], ("UTF-8",)
    if case == "deep_nesting":
        new = b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        return struct.pack("<Q", len(new)) + new, ("nested",)
    if case == "header_size_too_large":
        return struct.pack("<Q", 2**40) + data[8:], ("header", str(2**40))
    if case == "header_is_a_list":
        new = b"[" + b" " * (n - 2) + b"]"
        return struct.pack("<Q", n) + new + data[8 + n:], ("not a JSON object",)
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["duplicate_key", "not_utf8", "deep_nesting",
                                  "header_size_too_large", "header_is_a_list"])
def test_header_bytes_defect_is_one_clear_error(single, case):
    f = single / SINGLE_FILE
    data, fragments = raw_bytes_case(case, f.read_bytes())
    f.write_bytes(data)
    raises_with(CheckpointError, lambda: Checkpoint.open(single), str(f), *fragments)


@pytest.mark.parametrize("where", ["gap", "trailing"])
def test_gap_or_trailing_bytes_only_warn(single, ours, where):
    f = single / SINGLE_FILE
    header, start = raw_header(f)
    data = f.read_bytes()[start:]
    if where == "gap":  # 64 unused bytes before Q1's data
        b = header[Q1]["data_offsets"][0]
        for k, v in header.items():
            if k != "__metadata__" and v["data_offsets"][0] >= b:
                v["data_offsets"] = [o + 64 for o in v["data_offsets"]]
        data = data[:b] + b"\xff" * 64 + data[b:]
    else:
        data += b"\xff" * 24
    write_raw_safetensors(f, header, data)
    with pytest.warns(CheckpointWarning, match=SINGLE_FILE):
        model = wb.load(single)
    assert np.array_equal(model.run(IDS).logits, ours[2])


def test_safetensors_library_opens_every_file_we_accept(single):
    """The library's own check runs on every accepted file (a second opinion)."""
    from safetensors import safe_open
    Checkpoint.open(single)
    with safe_open(str(single / SINGLE_FILE), framework="numpy") as fh:
        assert Q1 in fh.keys()


# ============================================================================ 3. inside the dir


def set_index(d: Path, change) -> None:
    idx = json.loads((d / INDEX_FILE).read_text())
    change(idx["weight_map"])
    (d / INDEX_FILE).write_text(json.dumps(idx))


def outside_copy(d: Path) -> Path:
    """A valid shard outside the checkpoint (the same bytes as the one holding Q1)."""
    src = file_of(d, Q1)
    dst = d.parent / "elsewhere" / src.name
    dst.parent.mkdir(exist_ok=True)
    shutil.copy(src, dst)
    return dst


def index_case(d: Path, case: str) -> tuple[Path, tuple[str, ...]]:
    """Damage ``d``; (the file the message must name, fragments)."""
    shard = file_of(d, Q1)
    if case == "absolute_path":
        target = outside_copy(d)
        set_index(d, lambda wm: wm.__setitem__(Q1, str(target)))
        return d / INDEX_FILE, (str(target), "relative")
    if case == "dot_dot":
        target = outside_copy(d)
        rel = f"../elsewhere/{target.name}"
        set_index(d, lambda wm: wm.__setitem__(Q1, rel))
        return d / INDEX_FILE, (rel, "..")
    if case == "symlink_leaving":
        target = outside_copy(d)
        shard.unlink()
        shard.symlink_to(target)
        return d / INDEX_FILE, (shard.name, "outside the checkpoint")
    if case == "fifo_shard":
        shard.unlink()
        os.mkfifo(shard)
        return shard, ("FIFO",)
    if case == "dev_zero_shard":
        shard.unlink()
        shard.symlink_to("/dev/zero")
        return d / INDEX_FILE, (shard.name,)
    if case == "directory_shard":
        shard.unlink()
        shard.mkdir()
        return shard, ("directory",)
    if case == "fifo_index":
        (d / INDEX_FILE).unlink()
        os.mkfifo(d / INDEX_FILE)
        return d / INDEX_FILE, ("FIFO",)
    if case == "directory_index":
        (d / INDEX_FILE).unlink()
        (d / INDEX_FILE).mkdir()
        return d / INDEX_FILE, ("directory",)
    if case == "value_not_a_string":
        set_index(d, lambda wm: wm.__setitem__(Q1, 3))
        return d / INDEX_FILE, ("weight_map", Q1)
    if case == "value_not_a_shard":
        set_index(d, lambda wm: wm.__setitem__(Q1, "config.json"))
        return d / INDEX_FILE, ("config.json", ".safetensors")
    if case == "empty_weight_map":
        set_index(d, lambda wm: wm.clear())
        return d / INDEX_FILE, ("weight_map",)
    raise AssertionError(case)


INDEX_CASES = ["absolute_path", "dot_dot", "symlink_leaving", "fifo_shard", "dev_zero_shard",
               "directory_shard", "fifo_index", "directory_index", "value_not_a_string",
               "value_not_a_shard", "empty_weight_map"]


@pytest.mark.parametrize("case", INDEX_CASES)
def test_index_and_shards_stay_inside_the_checkpoint(sharded, case):
    named, fragments = index_case(sharded, case)
    with no_hang():
        msg = raises_with(CheckpointError, lambda: Checkpoint.open(sharded), str(named.name),
                          *fragments)
    if case == "dev_zero_shard":
        assert "outside the checkpoint" in msg or "character device" in msg


@pytest.mark.parametrize("case", ["fifo", "dev_zero", "directory", "symlink_leaving"])
def test_single_file_must_be_a_regular_file_inside(single, case):
    f = single / SINGLE_FILE
    if case == "symlink_leaving":
        target = single.parent / "elsewhere.safetensors"
        shutil.move(f, target)
        f.symlink_to(target)
        fragments: tuple[str, ...] = ("outside the checkpoint",)
    else:
        f.unlink()
        if case == "fifo":
            os.mkfifo(f)
            fragments = ("FIFO",)
        elif case == "dev_zero":
            f.symlink_to("/dev/zero")
            fragments = ()
        else:
            f.mkdir()
            fragments = ("directory",)
    with no_hang():
        raises_with(CheckpointError, lambda: Checkpoint.open(single), SINGLE_FILE, *fragments)


def test_symlinks_inside_and_the_hugging_face_cache_layout_are_fine(sharded, tmp_path, ours):
    repo = tmp_path / "models--x--tiny"
    snap = repo / "snapshots" / "0123abc"
    blobs = repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, p in enumerate(sorted(sharded.iterdir())):
        blob = blobs / f"{i:040x}"
        shutil.copy(p, blob)
        (snap / p.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    ck = Checkpoint.open(snap)
    np.testing.assert_array_equal(ck["norm.weight"], Checkpoint.open(sharded)["norm.weight"])
    # a shard linked to another name inside the same directory
    first = file_of(sharded, Q1)
    moved = sharded / ("renamed-" + first.name)
    first.rename(moved)
    first.symlink_to(moved.name)
    Checkpoint.open(sharded)


@pytest.mark.parametrize("case", ["fifo", "directory", "not_utf8", "duplicate_key",
                                  "deep_nesting"])
def test_config_file_defects(single, case):
    f = single / "config.json"
    text = f.read_text()
    f.unlink()
    if case == "fifo":
        os.mkfifo(f)
        fragments: tuple[str, ...] = ("FIFO",)
    elif case == "directory":
        f.mkdir()
        fragments = ("directory",)
    elif case == "not_utf8":
        f.write_bytes(text.encode().replace(b"silu", b"s\xffl\xfe", 1))
        fragments = ("UTF-8",)
    elif case == "duplicate_key":
        f.write_text(text.replace("{", '{\n  "vocab_size": 512,', 1))
        fragments = ("duplicate key", "vocab_size")
    else:
        f.write_text('{"extra": ' + "[" * 50_000 + "]" * 50_000 + "}")
        fragments = ("nested",)
    with no_hang():
        raises_with(ConfigError, lambda: wb.load(single), str(f), *fragments)


# ============================================================================ 4. config values

NAN, INF = float("nan"), float("inf")


def rope(**changes: Any) -> dict[str, Any]:
    rp = dict(TINY.to_text_dict()["rope_parameters"])
    rp.update(changes)
    return {"rope_parameters": rp}


BAD_FIELDS: dict[str, tuple[dict[str, Any], str]] = {
    "eps_nan": ({"rms_norm_eps": NAN}, "rms_norm_eps"),
    "eps_inf": ({"rms_norm_eps": INF}, "rms_norm_eps"),
    "eps_zero": ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    "eps_negative": ({"rms_norm_eps": -1e-5}, "rms_norm_eps"),
    "eps_string": ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    "eps_bool": ({"rms_norm_eps": True}, "rms_norm_eps"),
    "rope_theta_nan": (rope(rope_theta=NAN), "rope_theta"),
    "rope_theta_inf": (rope(rope_theta=INF), "rope_theta"),
    "rope_theta_zero": (rope(rope_theta=0), "rope_theta"),
    "rope_theta_string": (rope(rope_theta="1e4"), "rope_theta"),
    "rope_theta_inf_in_float32": (rope(rope_theta=1e39), "rope_theta"),
    "rope_theta_beyond_any_float": (rope(rope_theta=10**400), "rope_theta"),
    "eps_zero_in_float32": ({"rms_norm_eps": 1e-50}, "rms_norm_eps"),
    "rope_factors_inverted": (rope(low_freq_factor=4.0, high_freq_factor=1.0),
                              "low_freq_factor"),
    "rope_factor_nan": (rope(factor=NAN), "factor"),
    "rope_factor_zero": (rope(factor=0.0), "factor"),
    "rope_original_max_zero": (rope(original_max_position_embeddings=0),
                               "original_max_position_embeddings"),
    "rope_original_max_float": (rope(original_max_position_embeddings=32.5),
                                "original_max_position_embeddings"),
    "rope_parameters_list": ({"rope_parameters": [1, 2]}, "rope_parameters"),
    "attn_scale_nan": ({"attn_scale": NAN}, "attn_scale"),
    "attn_scale_zero": ({"attn_scale": 0.0}, "attn_scale"),
    "attn_scale_inf": ({"attn_scale": INF}, "attn_scale"),
    "floor_scale_nan": ({"floor_scale": NAN}, "floor_scale"),
    "floor_scale_negative": ({"floor_scale": -4}, "floor_scale"),
    "floor_scale_string": ({"floor_scale": "4"}, "floor_scale"),
    "chunk_zero": ({"attention_chunk_size": 0}, "attention_chunk_size"),
    "chunk_float": ({"attention_chunk_size": 8.5}, "attention_chunk_size"),
    "chunk_string": ({"attention_chunk_size": "8"}, "attention_chunk_size"),
    "int_given_float": ({"hidden_size": 64.0}, "hidden_size"),
    "int_given_string": ({"num_local_experts": "8"}, "num_local_experts"),
    "int_given_bool": ({"vocab_size": True}, "vocab_size"),
    "kv_heads_float": ({"num_key_value_heads": 2.0}, "num_key_value_heads"),
    "head_dim_string": ({"head_dim": "16"}, "head_dim"),
    "top_k_zero": ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
    "max_positions_negative": ({"max_position_embeddings": -1}, "max_position_embeddings"),
    "bool_given_string": ({"use_qk_norm": "false"}, "use_qk_norm"),
    "bool_given_int": ({"tie_word_embeddings": 0}, "tie_word_embeddings"),
    "temperature_tuning_string": ({"attn_temperature_tuning": "yes"},
                                  "attn_temperature_tuning"),
    "no_rope_layers_short": ({"no_rope_layers": [1, 1, 0]}, "no_rope_layers"),
    "no_rope_layers_string_element": ({"no_rope_layers": [1, 1, "1", 0]}, "no_rope_layers"),
    "no_rope_layers_float_element": ({"no_rope_layers": [1, 1, 1.0, 0]}, "no_rope_layers"),
    "no_rope_layers_not_a_flag": ({"no_rope_layers": [1, 1, 2, 0]}, "no_rope_layers"),
    "moe_layers_float_element": ({"moe_layers": [0, 1.0, 2, 3]}, "moe_layers"),
    "moe_layers_not_a_list": ({"moe_layers": 3}, "moe_layers"),
    "layer_types_not_strings": ({"layer_types": [1, 2, 3, 4]}, "layer_types"),
    "eos_string": ({"eos_token_id": "2"}, "eos_token_id"),
    "eos_list_of_floats": ({"eos_token_id": [2.0]}, "eos_token_id"),
    "bos_float": ({"bos_token_id": 1.0}, "bos_token_id"),
    "initializer_range_negative": ({"initializer_range": -0.02}, "initializer_range"),
    "dropout_above_one": ({"attention_dropout": 2.0}, "attention_dropout"),
    "router_aux_loss_nan": ({"router_aux_loss_coef": NAN}, "router_aux_loss_coef"),
    "hidden_act_not_a_string": ({"hidden_act": 1}, "hidden_act"),
    "vision_width_string": ({"__wrap__": {"hidden_size": "1408"}}, "vision_config.hidden_size"),
}


def text_dict(**changes: Any) -> dict[str, Any]:
    d = TINY.to_text_dict()
    d.update(changes)
    return d


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_config_field_type_and_range(case):
    changes, field = BAD_FIELDS[case]
    if "__wrap__" in changes:
        raw: dict[str, Any] = {"model_type": "llama4", "text_config": text_dict(),
                               "vision_config": changes["__wrap__"]}
    else:
        raw = text_dict(**changes)
    raises_with(ConfigError, lambda: ModelConfig.from_dict(raw, source="cfg.json"), "cfg.json",
                field)


@pytest.mark.parametrize("case", ["eps_nan", "rope_theta_inf", "attn_scale_nan",
                                  "floor_scale_nan", "rope_factors_inverted"])
def test_config_defect_in_a_checkpoint_names_file_and_field(single, case):
    changes, field = BAD_FIELDS[case]
    edit_config(single, **changes)
    for backend in ("torch", "jax"):
        raises_with(ConfigError, lambda b=backend: wb.load(single, backend=b),
                    str(single / "config.json"), field)


def test_equal_rope_factors_are_allowed():
    """transformers itself writes low == high (Scout's own config): only inverted is refused."""
    cfg = ModelConfig.from_dict(text_dict(**rope(low_freq_factor=2.0, high_freq_factor=2.0)))
    assert cfg.rope_scaling["low_freq_factor"] == cfg.rope_scaling["high_freq_factor"] == 2.0
    from workbench.numerics import rope_inv_freq
    assert np.isfinite(rope_inv_freq(cfg)).all()
    assert ModelConfig.scout().rope_scaling["low_freq_factor"] == 1.0


def test_equivalent_representations_are_accepted():
    """An int where a float is expected, numpy scalars, legacy int temperature tuning."""
    cfg = ModelConfig.from_dict(text_dict(rms_norm_eps=1, attn_temperature_tuning=4,
                                          **rope(rope_theta=10000)))
    assert cfg.rms_norm_eps == 1 and cfg.rope_theta == 10000 and cfg.attn_temperature_tuning
    cfg = ModelConfig.tiny(hidden_size=np.int64(64), rms_norm_eps=np.float32(1e-5))
    assert type(cfg.hidden_size) is int and type(cfg.rms_norm_eps) is float


@pytest.mark.parametrize("multimodal", [False, True], ids=["text", "multimodal"])
def test_tied_embeddings_with_an_lm_head_tensor(tmp_path, multimodal):
    cfg = TINY.replace(multimodal=multimodal)
    d, tensors = save_random(tmp_path / "ckpt", cfg, seed=1)
    edit_config(d, tie_word_embeddings=True)
    f = d / SINGLE_FILE
    hf = ("language_model." if multimodal else "") + "lm_head.weight"
    raises_with(CheckpointError, lambda: Checkpoint.open(d), str(f), "tie_word_embeddings",
                hf, "embed_tokens.weight")
    raises_with(CheckpointError, lambda: wb.load(d), "tie_word_embeddings", hf)
    with pytest.warns(CheckpointWarning, match="tie_word_embeddings"):
        ck = Checkpoint.open(d, strict=False)
    assert "lm_head.weight" not in ck
    # and save refuses to write such a checkpoint in the first place
    tied = cfg.replace(tie_word_embeddings=True)
    raises_with(CheckpointError, lambda: Checkpoint.save(tmp_path / "x", tensors, tied),
                "lm_head.weight", "tie_word_embeddings")
    assert not (tmp_path / "x").exists()


def test_tied_checkpoint_written_by_transformers_opens():
    """save_pretrained with tie_word_embeddings=True writes no lm_head: nothing to refuse."""
    import tempfile

    from oracle import build_hf, save_hf
    cfg = ModelConfig.tiny(tie_word_embeddings=True)
    with tempfile.TemporaryDirectory() as t:
        d = save_hf(build_hf(cfg, seed=0), Path(t), shard="100MB")
        ck = Checkpoint.open(d)
        assert "lm_head.weight" not in ck and ck.config.tie_word_embeddings


# ============================================================================ 5. NaN / Inf weights


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_nonfinite_weights_are_named_with_counts(tmp_path, dtype, capsys):
    t = random_tensors(TINY, seed=1)
    t[Q1C].reshape(-1)[[3, 50, 700]] = np.nan
    emb = t["embed_tokens.weight"].reshape(-1)
    emb[[0, 9]] = np.inf
    emb[11] = -np.inf
    d = Checkpoint.save(tmp_path / "ckpt", t, TINY, dtype=dtype)
    Checkpoint.open(d)  # reading values is opt-in
    raises_with(CheckpointError, lambda: Checkpoint.open(d, check_values=True), str(d),
                f"{Q1!r} in {SINGLE_FILE}: 3 NaN, 0 Inf",
                f"'model.embed_tokens.weight' in {SINGLE_FILE}: 0 NaN, 3 Inf")
    text = inspect_text(str(d))
    assert "NaN/Inf in 2 of" in text and f"{Q1!r} in {SINGLE_FILE}: 3 NaN, 0 Inf" in text
    assert main(["inspect", str(d)]) == 0
    assert "'model.embed_tokens.weight' in model.safetensors: 0 NaN, 3 Inf" in \
        capsys.readouterr().out


def test_finite_weights_pass_and_inspect_says_so(ours):
    d = ours[0]
    ck = Checkpoint.open(d, check_values=True)
    assert ck.nonfinite() == {}
    assert f"values: all {len(ck)} tensors finite" in inspect_text(str(d))
    assert "not checked" in inspect_text(str(d), check_values=False)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64])
def test_scan_values_counts_like_numpy(dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1e3, 10_001).astype(np.float32)
    x[rng.integers(0, x.size, 40)] = np.nan
    x[rng.integers(0, x.size, 30)] = np.inf
    x[rng.integers(0, x.size, 20)] = -np.inf
    x[:5] = [1e-40, -0.0, 65504.0, 3e38, -3e38]  # subnormal, signed zero, extremes
    with np.errstate(over="ignore"):  # 3e38 is inf in float16
        a = x.astype(dtype)
    f = a.astype(np.float64)
    want = (int(np.isnan(f).sum()), int(np.isinf(f).sum()))
    assert scan_values(a, chunk=1000) == want
    assert scan_values(np.arange(5, dtype=np.int32)) == (0, 0)


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_no_warnings_for_a_clean_checkpoint(single, sharded, layout):
    d = single if layout == "single" else sharded
    assert (index_map(d) is None) == (layout == "single")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Checkpoint.open(d, check_values=True)
