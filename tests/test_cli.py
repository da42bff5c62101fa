"""Tests for `workbench inspect` (workbench.cli.main / workbench.describe.inspect_text)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_ckpt import TINY_VISION, copy_ckpt, raw_header, rewrite_file, save_random

from workbench.checkpoint import SINGLE_FILE, expected_shapes
from workbench.cli import main
from workbench.config import ModelConfig, human_bytes, human_count
from workbench.describe import PRESETS, inspect_text

REPO = Path(__file__).resolve().parent.parent
MAV = ModelConfig.tiny_maverick()  # MoE at 1, 3; dense at 0, 2; NoPE at 3


@pytest.fixture(scope="module")
def mav_ckpt(tmp_path_factory):
    d, tensors = save_random(tmp_path_factory.mktemp("mav"), MAV)
    return d, tensors


def run_inspect(capsys, target) -> tuple[int, str, str]:
    rc = main(["inspect", str(target)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def layer_lines(out: str) -> list[str]:
    lines = out.splitlines()
    start = lines.index("layer map:")
    return lines[start + 1:]


def test_inspect_checkpoint(capsys, mav_ckpt):
    d, tensors = mav_ckpt
    rc, out, err = run_inspect(capsys, d)
    assert rc == 0 and err == ""
    assert out.strip() == inspect_text(str(d))
    assert f"checkpoint: {d}" in out
    assert "Llama4ForCausalLM (text only)" in out
    n = len(expected_shapes(MAV))
    total_bytes = sum(a.nbytes for a in tensors.values())
    assert f"tensors: {n} in 1 file(s), {human_bytes(total_bytes)}" in out
    assert f"by dtype: F32 {human_bytes(total_bytes)}" in out
    pc = MAV.param_counts()
    assert f"{human_count(pc['total'])} total" in out
    assert f"{human_count(pc['active'])} active per token" in out
    assert "experts 16 (top-1)" in out
    layers = layer_lines(out)
    assert len(layers) == 4
    assert layers[0].split()[:2] == ["0", "dense"] and "RoPE chunk=8" in layers[0]
    assert layers[1].split()[:2] == ["1", "MoE"] and "RoPE chunk=8" in layers[1]
    assert layers[2].split()[:2] == ["2", "dense"]
    assert layers[3].split()[:2] == ["3", "MoE"] and "NoPE global" in layers[3]
    assert sum("NoPE" in s for s in layers) == 1


def test_inspect_reports_bytes_per_dtype(capsys, tmp_path, mav_ckpt):
    d = copy_ckpt(mav_ckpt[0], tmp_path / "ckpt")
    tensors = mav_ckpt[1]
    half = "model.layers.0.feed_forward.gate_proj.weight"
    rewrite_file(d / SINGLE_FILE, put={half: tensors[half[len("model."):]].astype(np.float16)})
    header, _ = raw_header(d / SINGLE_FILE)
    assert header[half]["dtype"] == "F16"
    f16 = tensors[half[len("model."):]].size * 2
    f32 = sum(a.nbytes for a in tensors.values()) - f16 * 2
    rc, out, _ = run_inspect(capsys, d)
    assert rc == 0
    assert f"by dtype: F16 {human_bytes(f16)}, F32 {human_bytes(f32)}" in out


def test_inspect_sharded_bfloat16_multimodal(capsys, tmp_path):
    cfg = ModelConfig.tiny(multimodal=True, extra={"vision_config": dict(TINY_VISION)})
    d, tensors = save_random(tmp_path / "mm", cfg, dtype="bfloat16", max_shard_bytes=300_000)
    n_files = len(list(d.glob("*.safetensors")))
    assert n_files > 1
    rc, out, _ = run_inspect(capsys, d)
    assert rc == 0
    assert "multimodal wrapper" in out
    assert f"tensors: {len(tensors)} in {n_files} file(s)" in out
    nbytes = sum(a.size * 2 for a in tensors.values())
    assert f"by dtype: BF16 {human_bytes(nbytes)}" in out
    assert "with vision encoder + projector" in out
    assert all(s.split()[1] == "MoE" for s in layer_lines(out))


def test_inspect_counts_ignored_vision_tensors(capsys, tmp_path):
    cfg = ModelConfig.tiny(multimodal=True, extra={"vision_config": dict(TINY_VISION)})
    d, _ = save_random(tmp_path / "mm", cfg)
    vision = {"vision_model.class_embedding": np.zeros(32, np.float32),
              "vision_model.layernorm_pre.weight": np.ones(32, np.float32),
              "multi_modal_projector.linear_1.weight": np.zeros((64, 32), np.float32)}
    rewrite_file(d / SINGLE_FILE, put=vision)
    rc, out, _ = run_inspect(capsys, d)
    assert rc == 0
    assert f"ignored (vision/projector): {len(vision)} tensors" in out
    assert f"tensors: {len(expected_shapes(cfg))} in 1 file(s)" in out


@pytest.mark.parametrize("preset, total, lm, active", [
    ("scout", "108.64B", "107.77B", "17.17B"),
    ("maverick", "401.58B", "400.71B", "17.18B"),
])
def test_inspect_presets(capsys, preset, total, lm, active):
    rc, out, err = run_inspect(capsys, preset)
    assert rc == 0 and err == ""
    assert f"preset: {preset}" in out
    assert f"{total} total" in out
    assert f"language model {lm} total, {active} active per token" in out
    layers = layer_lines(out)
    assert len(layers) == 48
    assert sum("NoPE" in s for s in layers) == 12
    n_moe = sum(s.split()[1] == "MoE" for s in layers)
    assert n_moe == (48 if preset == "scout" else 24)


def test_inspect_config_only(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MAV.to_hf_dict()))
    for target in (tmp_path, tmp_path / "config.json"):
        rc, out, _ = run_inspect(capsys, target)
        assert rc == 0 and "(config only)" in out and "tensors:" not in out
        assert len(layer_lines(out)) == 4


def test_inspect_corrupt_checkpoint_exits_2(capsys, tmp_path, mav_ckpt):
    d = copy_ckpt(mav_ckpt[0], tmp_path / "ckpt")
    f = d / SINGLE_FILE
    f.write_bytes(f.read_bytes()[:-100])
    rc, out, err = run_inspect(capsys, d)
    assert rc == 2
    assert out == ""
    assert err.startswith("error: ") and SINGLE_FILE in err and "truncated" in err


def test_inspect_bad_config_exits_2(capsys, tmp_path, mav_ckpt):
    d = copy_ckpt(mav_ckpt[0], tmp_path / "ckpt")
    (d / "config.json").write_text("{broken")
    rc, out, err = run_inspect(capsys, d)
    assert rc == 2 and out == "" and "config.json" in err and "JSON" in err


def test_inspect_missing_path_exits_2(capsys, tmp_path):
    rc, out, err = run_inspect(capsys, tmp_path / "nowhere")
    assert rc == 2 and out == "" and "nowhere" in err


def test_command_line_process(tmp_path, mav_ckpt):
    """The real entry point: exit status and streams of a separate process."""
    d = copy_ckpt(mav_ckpt[0], tmp_path / "ckpt")
    (d / SINGLE_FILE).write_bytes(b"\x00\x01")
    cmd = [sys.executable, "-m", "workbench.cli", "inspect"]
    ok = subprocess.run(cmd + ["scout"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert ok.returncode == 0 and "108.64B" in ok.stdout and "17.17B" in ok.stdout
    bad = subprocess.run(cmd + [str(d)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and "truncated" in bad.stderr and bad.stdout == ""


def test_describe_stands_alone():
    """inspect_text lives in workbench.describe, which imports neither the command line nor
    the demo (the demo imports it too: no cli <-> demo import circle)."""
    code = ("import sys, workbench.describe, workbench.demo; "
            "print(sorted(m for m in sys.modules if m in ('workbench.cli', 'torch', 'jax')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    assert set(PRESETS) == {"scout", "maverick"}
    assert inspect_text("scout").startswith("preset: scout")


# ----------------------------------------------------------------------------- user mistakes
# Every user mistake is one "error: ..." line and exit status 2 (argparse's own convention),
# never a Python traceback; --debug / WORKBENCH_DEBUG=1 re-raise; bugs keep their traceback.


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from workbench.random_weights import write_random_checkpoint
    return write_random_checkpoint(tmp_path_factory.mktemp("cli_tiny"),
                                   ModelConfig.tiny(max_position_embeddings=32), seed=0)


@pytest.mark.parametrize("argv, fragment", [
    (["parity", "C", "--ids", "1 a"], "'a' is not a token id"),
    (["parity", "C", "--ids", " , "], "no token ids"),
    (["parity", "C", "--ids", "3 -1"], "negative"),
    (["parity", "C", "--ids", "1.5"], "'1.5' is not a token id"),
    (["parity", "C", "--length", "0"], "--length"),
    (["parity", "C", "--length", "-4"], "must be >= 1"),
    (["parity", "C", "--length", "ten"], "not an integer"),
    (["parity", "C", "--dtype", "float64"], "invalid choice"),
    (["parity", "C", "--dtype-a", "int8"], "invalid choice"),
    (["parity", "C", "--backend-a", "tensorflow"], "invalid choice"),
    (["parity", "C", "--backend-b", "numpy"], "invalid choice"),
    (["parity", "C", "--tol", "nan"], "finite"),
    (["parity", "C", "--tol", "inf"], "finite"),
    (["parity", "C", "--tol", "-1e-3"], "--tol"),
    (["parity", "C", "--near-tie", "NaN"], "finite"),
    (["parity", "C", "--text", "hi", "--ids", "1"], "not allowed with"),
    (["report", "C", "--out", "o", "--max-tokens", "0"], "--max-tokens"),
    (["report", "C", "--out", "o", "--max-tokens", "-3"], "must be >= 1"),
    (["report", "C", "--out", "o", "--corpus-sample", "0"], "--corpus-sample"),
    (["report", "C", "--out", "o", "--corpus-sample", "-2"], "must be >= 1"),
    (["report", "C", "--out", "o", "--dpi", "0"], "--dpi"),
    (["report", "C", "--out", "o", "--layer", "-1"], "must be >= 0"),
])
def test_bad_arguments_exit_2_without_traceback(capsys, argv, fragment):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "error:" in err and fragment in err and "Traceback" not in err


def run_main(capsys, argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_workbench_errors_exit_2(capsys, tiny_ckpt, tmp_path):
    c = tiny_ckpt
    afile = tmp_path / "a-file"
    afile.write_text("x")
    garbage = tmp_path / "t.safetensors"
    garbage.write_bytes(b"garbage")
    cases = [
        (["parity", c, "--capture", "layers.0.moe.nope"], "layers.0.moe.nope"),  # HookError
        (["parity", c, "--ids", "1 2 99999"], "99999"),  # InputError: id out of range
        (["parity", c, "--length", "33"], "max_position_embeddings=32"),
        (["parity", c, "--text", "hello"], "tokenizer.json"),
        (["parity", c, "--json", tmp_path], "is a directory"),
        (["parity", tmp_path / "nowhere"], "nowhere"),
        (["demo", "--out", afile], "is a file"),
        (["report", c, "--out", afile, "--text", "x"], "is a file"),
        (["report", garbage, "--out", tmp_path / "r"], str(garbage)),
        (["inspect", tmp_path / "nowhere"], "nowhere"),
    ]
    for argv, fragment in cases:
        rc, out, err = run_main(capsys, argv)
        assert rc == 2, (argv, out, err)
        assert err.startswith("error: ") and fragment in err and "Traceback" not in err, \
            (argv, err)


def test_debug_reraises_user_errors(capsys, tiny_ckpt, monkeypatch):
    from workbench.hooks import HookError
    argv = ["parity", str(tiny_ckpt), "--capture", "layers.0.moe.nope"]
    with pytest.raises(HookError):
        main(["--debug", *argv])
    with pytest.raises(HookError):
        main([*argv, "--debug"])
    monkeypatch.setenv("WORKBENCH_DEBUG", "1")
    with pytest.raises(HookError):
        main(argv)
    monkeypatch.setenv("WORKBENCH_DEBUG", "0")
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_bugs_keep_their_traceback(capsys, tiny_ckpt, monkeypatch):
    """Only workbench's own error classes and ValueErrors raised by workbench's checks become
    'error: ...'; an exception from a bug (or raised inside numpy) propagates."""
    import workbench as wb
    import workbench.cli as cli

    def zero_division(args):
        return 1 // 0

    def numpy_value_error(args):
        return np.broadcast_to(np.zeros(3), (2,))

    def workbench_check(args):
        return wb.load(tiny_ckpt, backend="tensorflow")

    for fn, exc in ((zero_division, ZeroDivisionError), (numpy_value_error, ValueError)):
        monkeypatch.setattr(cli, "cmd_inspect", fn)
        with pytest.raises(exc):
            main(["inspect", "scout"])
    monkeypatch.setattr(cli, "cmd_inspect", workbench_check)
    rc, _, err = run_main(capsys, ["inspect", "scout"])
    assert rc == 2 and "tensorflow" in err and err.startswith("error: ")


def test_command_line_process_user_errors(tiny_ckpt):
    """The real entry point prints one error line, no traceback, exit status 2."""
    cmd = [sys.executable, "-m", "workbench.cli", "parity", str(tiny_ckpt)]
    for extra, fragment in ((["--capture", "nope.*"], "nope.*"), (["--ids", "1 x"], "'x'"),
                            (["--tol", "nan"], "finite")):
        r = subprocess.run(cmd + extra, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert r.returncode == 2, r.stderr
        assert "error:" in r.stderr and fragment in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_train_refuses_non_positive_steps(capsys, tmp_path, steps):
    """`workbench train --steps 0`: exit 2 and one error line, before any training."""
    try:
        rc = main(["train", "--steps", steps, "--out", str(tmp_path / "out")])
    except SystemExit as e:  # refused by argparse itself
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and "--steps" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_inspect_check_values_flag(capsys, tmp_path):
    from workbench.checkpoint import Checkpoint
    from workbench.random_weights import random_tensors
    cfg = ModelConfig.tiny()
    tensors = random_tensors(cfg)
    tensors["layers.1.self_attn.q_proj.weight"][0, :3] = np.inf
    d = Checkpoint.save(tmp_path / "nan", tensors, cfg)
    rc, out, _ = run_inspect(capsys, d)
    assert rc == 0 and "layers.1.self_attn.q_proj.weight" in out
    assert main(["inspect", str(d), "--no-check-values"]) == 0
    assert "layers.1.self_attn.q_proj.weight" not in capsys.readouterr().out
