"""The forward written once: structure, devices, compiled-step reuse, stop_at_layer."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from oracle import rel  # noqa: E402

import workbench as wb  # noqa: E402
from workbench import hooks as hk  # noqa: E402
from workbench.config import ModelConfig  # noqa: E402
from workbench.random_weights import random_tensors, write_random_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "workbench"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = ModelConfig.tiny(floor_scale=2)
    return cfg, write_random_checkpoint(tmp_path_factory.mktemp("fw"), cfg, seed=3)


def _string_constants(path: Path) -> list[str]:
    return [n.value for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _mentions_hook(s: str) -> bool:
    """A string that is, or ends with, a hook name or a relative hook site."""
    if s in hk.TOP_LEVEL:
        return True
    for block, sites in (("attn", hk.ATTN_HOOKS), ("moe", hk.MOE_HOOKS), ("mlp", ("out",))):
        if any(s.endswith(f"{block}.{site}") for site in sites):
            return True
    return any(s.endswith(site) for site in ("resid_pre", "resid_mid", "resid_post"))


def test_hook_names_are_emitted_only_by_the_shared_forward():
    """No backend file spells a hook name; forward.py spells every one of them."""
    backends = sorted((PKG / "torch").glob("*.py")) + sorted((PKG / "jax").glob("*.py"))
    assert backends
    for f in backends:
        bad = [s for s in _string_constants(f) if _mentions_hook(s)]
        assert not bad, f"{f.relative_to(ROOT)} spells hook names {bad}"
    emitted = set(_string_constants(PKG / "forward.py"))
    cfg = ModelConfig.tiny_maverick()
    for name in hk.hook_names(cfg):
        assert hk.relative(name) in emitted, name


def test_backends_hold_no_forward_loop():
    """The layer loop and the blocks live in forward.py only."""
    for f in sorted((PKG / "torch").glob("*.py")) + sorted((PKG / "jax").glob("*.py")):
        tree = ast.parse(f.read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert not names & {"forward", "moe", "mlp", "attention_block", "layer_step"}, f
        loops = [n for n in ast.walk(tree) if isinstance(n, ast.For)
                 and "num_hidden_layers" in ast.unparse(n.iter)]
        # bookkeeping loops over layers (cache capacities) are fine; none may call a block
        for loop in loops:
            assert "layer_step" not in ast.unparse(loop), f


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_device_argument_on_cpu(ckpt, backend):
    cfg, path = ckpt
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11))
    default = wb.load(path, backend=backend)
    if backend == "torch":
        import torch
        devices = ["cpu", torch.device("cpu")]
        assert default.device == torch.device("cpu")
    else:
        import jax
        devices = ["cpu", "cpu:0", jax.devices("cpu")[0]]
        assert default.device == jax.devices("cpu")[0]
    ref = default.run(ids, capture="*.moe.*")
    for dev in devices:
        m = wb.load(path, backend=backend, device=dev)
        assert "cpu" in str(m.device).lower() and "on " in repr(m)
        out = m.run(ids, capture="*.moe.*")
        assert np.array_equal(out.logits, ref.logits)
        for n in ref.trace:
            assert np.array_equal(out.trace[n], ref.trace[n]), n
        g = m.generate(ids[:, :4], 3, temperature=0)
        assert g.new_tokens.shape == (2, 3)


def test_torch_weights_and_forward_tensors_live_on_the_model_device(ckpt):
    import torch
    cfg, path = ckpt
    m = wb.load(path, backend="torch", device="cpu")
    assert all(t.device == torch.device("cpu") for t in m.params.as_dict().values())
    seen = []
    ids = np.arange(6)[None]
    m.run(ids, hooks={"layers.0.attn.q": lambda q: seen.append(q.device) or q,
                      "logits": lambda x: seen.append(x.device) or x})
    assert seen == [torch.device("cpu")] * 2


@pytest.mark.parametrize("device, match", [
    ("cuda", "CUDA is not available"), ("cuda:3", "CUDA is not available"),
    ("mps", "MPS is not available"), ("xpu", "runs on 'cpu', 'cuda"),
    ("gpu-ish thing", "not a torch device"), (3.5, "not a torch device"),
])
def test_torch_unavailable_device_is_one_clear_error(ckpt, device, match):
    import torch
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        pytest.skip("this machine has CUDA")
    _, path = ckpt
    with pytest.raises(wb.DeviceError, match=match):
        wb.load(path, backend="torch", device=device)


@pytest.mark.parametrize("device, match", [
    ("tpu", "no tpu backend"), ("quantum", "unknown jax platform"), ("cpu:9", "0..0"),
    (7, "give a jax.Device or a platform name"),
])
def test_jax_unavailable_device_is_one_clear_error(ckpt, device, match):
    import jax
    if device == "tpu" and any(d.platform == "tpu" for d in jax.devices()):
        pytest.skip("this machine has a TPU")
    _, path = ckpt
    with pytest.raises(wb.DeviceError, match=match):
        wb.load(path, backend="jax", device=device)


def test_jax_compiles_one_function_per_layer_kind_whatever_the_depth():
    """4 and 12 layers of the same pattern compile the same number of step functions."""
    from workbench.jax.model import JaxModel
    counts = {}
    for layers in (4, 12):
        cfg = ModelConfig.tiny(num_hidden_layers=layers)
        kinds = {(cfg.is_moe(i), cfg.uses_rope(i), cfg.chunk_size(i)) for i in range(layers)}
        m = JaxModel(cfg, random_tensors(cfg, seed=1))
        m.compiler_options["xla_backend_optimization_level"] = 0
        ids = np.arange(10)[None]
        m.run(ids)
        counts[layers] = m.compiled_steps
        assert m.compiled_steps == 2 + len(kinds)  # embedding, head, one per kind
        # an intervention on one layer gives that layer its own function, no others
        m.run(ids, interventions=[wb.ban_expert(layer=1, expert=0)])
        assert m.compiled_steps == 2 + len(kinds) + 1
        # capturing one layer's hook recompiles only that layer's kind
        m.run(ids, capture="layers.2.moe.router_logits")
        assert m.compiled_steps == 2 + len(kinds) + 2
    assert counts[4] == counts[12]


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_stop_at_layer(ckpt, backend):
    cfg, path = ckpt
    m = wb.load(path, backend=backend)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9))
    full = m.run(ids, capture=["layers.1.resid_post", "layers.0.moe.topk_indices", "embed"])
    part = m.run(ids, capture=["layers.1.resid_post", "layers.0.moe.topk_indices", "embed"],
                 stop_at_layer=2)
    assert part.logits is None
    for n in full.trace:
        assert rel(part.trace[n], full.trace[n]) == 0 or np.array_equal(part.trace[n],
                                                                        full.trace[n]), n
    assert m.run(ids, stop_at_layer=0).logits is None
    with pytest.raises(wb.InputError, match="never reaches"):
        m.run(ids, capture="layers.2.attn.q", stop_at_layer=2)
    with pytest.raises(wb.InputError, match="never reaches"):
        m.run(ids, capture="logits", stop_at_layer=4)
    for bad in (-1, 5, 1.5, True):
        with pytest.raises(wb.InputError, match="stop_at_layer"):
            m.run(ids, stop_at_layer=bad)


def test_stop_at_layer_is_the_same_in_both_backends(ckpt):
    cfg, path = ckpt
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 12))
    a = wb.load(path, backend="torch").run(ids, capture="layers.2.*", stop_at_layer=3).trace
    b = wb.load(path, backend="jax").run(ids, capture="layers.2.*", stop_at_layer=3).trace
    assert sorted(a) == sorted(b)
    for n in a:
        assert np.array_equal(a[n], b[n]) if "indices" in n else rel(b[n], a[n]) <= 2e-6, n


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_nan_check_names_the_first_nonfinite_hook(tmp_path, backend):
    cfg = ModelConfig.tiny()
    tensors = random_tensors(cfg, seed=4)
    tensors["layers.2.self_attn.o_proj.weight"][3, 5] = np.nan
    path = wb.Checkpoint.save(tmp_path, tensors, cfg)
    m = wb.load(path, backend=backend)
    ids = np.arange(7)[None]
    with pytest.warns(RuntimeWarning, match="logits hold NaN"):
        out = m.run(ids)
    assert np.isnan(out.logits).all()
    with pytest.raises(wb.NonFiniteError, match="'layers.2.attn.out'"):
        m.run(ids, nan_check=True)
    # a NaN patched in earlier is found there; a finite run passes the check
    good = wb.load(write_random_checkpoint(tmp_path / "ok", cfg, seed=4), backend=backend)
    assert np.isfinite(good.run(ids, nan_check=True).logits).all()
    with pytest.raises(wb.NonFiniteError, match="'layers.1.resid_mid'"):
        good.run(ids, nan_check=True,
                 interventions=[wb.patch("layers.1.resid_mid", np.nan, allow_nonfinite=True)])
    with pytest.raises(wb.InputError, match="nan_check"):
        good.run(ids, nan_check="yes")
