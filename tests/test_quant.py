"""FP8 compressed-tensors checkpoints: layout, oracle (transformers + compressed-tensors), w8a8,
refusals, `workbench quantize`, and the routing-flip analysis."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from helpers_ckpt import raises_with, read_safetensors, rewrite_file
from oracle import CASES, build_hf, hf_run, rel

import workbench as wb
from workbench.checkpoint import SINGLE_FILE, CheckpointError
from workbench.config import ModelConfig
from workbench.parity import margins
from workbench.quant import FP8, dequantize, fp8_tokens, quantize_fp8

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import FloatQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

# Meta's Maverick-FP8 keeps these modules in bf16 (regexes here; exact names work too)
IGNORE = ["re:.*self_attn.*", "re:.*feed_forward\\.router$", "re:.*shared_expert.*",
          "re:.*feed_forward\\.(gate|up|down)_proj$", "lm_head"]


def _scheme():
    s = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    s.weights.strategy = "channel"  # static per-output-channel weight scales, as Meta's
    return s


def library_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of an nn.Linear weight by compressed-tensors' own qparams and compressor."""
    scheme = _scheme()
    amax = w.abs().amax(1, keepdim=True)
    scale, _ = calculate_qparams(-amax, amax, scheme.weights)
    out = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
    return out["weight"], out["weight_scale"]


def write_compressed(model, path, ignore=IGNORE) -> None:
    """A transformers Llama 4 model written in Meta's FP8 layout with the library's compressor:
    routed experts unfused per expert, FP8 + weight_scale (out, 1); the rest as it is."""
    from safetensors.torch import save_file
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("experts.gate_up_proj"):
            pre, inter = k[: -len("gate_up_proj")], v.shape[-1] // 2
            for e in range(v.shape[0]):
                for proj, w in (("gate_proj", v[e][:, :inter]), ("up_proj", v[e][:, inter:])):
                    out[f"{pre}{e}.{proj}.weight"], out[f"{pre}{e}.{proj}.weight_scale"] = \
                        library_fp8(w.T.contiguous())
        elif k.endswith("experts.down_proj"):
            pre = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{pre}{e}.down_proj.weight"], out[f"{pre}{e}.down_proj.weight_scale"] = \
                    library_fp8(v[e].T.contiguous())
        else:
            out[k] = v.contiguous()
    path.mkdir(parents=True)
    save_file(out, str(path / SINGLE_FILE), metadata={"format": "pt"})
    qc = QuantizationConfig(config_groups={"group_0": _scheme()}, format="float-quantized",
                            ignore=ignore, quantization_status="compressed")
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {**qc.model_dump(mode="json"),
                                  "quant_method": "compressed-tensors"}
    (path / "config.json").write_text(json.dumps(cfg, indent=1))


@pytest.fixture(scope="module")
def maverick(tmp_path_factory):
    """(config, bf16-free fp32 HF model, FP8 checkpoint dir, ids): Maverick-like (MoE every
    other layer, 16 experts), written with compressed-tensors' compressor."""
    cfg = ModelConfig.tiny(**CASES["maverick"])
    hf = build_hf(cfg, seed=3)
    path = tmp_path_factory.mktemp("fp8") / "maverick-fp8"
    write_compressed(hf, path)
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 19))
    return cfg, hf, path, ids


@pytest.fixture(scope="module")
def hf_fp8(maverick):
    """transformers + compressed-tensors loading the FP8 checkpoint (dequantised weights)."""
    import transformers
    from transformers import CompressedTensorsConfig
    m = transformers.Llama4ForCausalLM.from_pretrained(
        maverick[2], dtype=torch.float32, attn_implementation="eager",
        quantization_config=CompressedTensorsConfig(dequantize=True))
    return m.eval()


def test_layout_is_read_and_experts_stay_fp8(maverick):
    cfg, _, path, _ = maverick
    ck = wb.Checkpoint.open(path)
    assert ck.quant is not None and ck.quant.strategy == "channel" and ck.quant.activations
    assert sorted(ck.quantized_names()) == sorted(
        f"layers.{i}.feed_forward.experts.{n}" for i in cfg.moe_layers
        for n in ("gate_up_proj", "down_proj"))
    I, D, E = cfg.intermediate_size, cfg.hidden_size, cfg.num_local_experts
    assert ck.info("layers.1.feed_forward.experts.gate_up_proj").shape == (E, D, 2 * I)
    w = ck.expert(1, 3)
    assert w.gate_up.dtype == FP8 and w.gate_up.shape == (D, 2 * I)
    assert w.gate_up_scale.shape == (2 * I,) and w.down_scale.shape == (D,)
    assert ck.bytes_by_dtype()["F8_E4M3"] == len(cfg.moe_layers) * E * 3 * I * D
    assert "layers.0.self_attn.q_proj.weight" in ck and not ck.is_quantized(
        "layers.0.self_attn.q_proj.weight")
    model = wb.load(path, backend="torch")
    p = model.params.as_dict()
    assert p["layers.1.feed_forward.experts.gate_up_proj"].dtype == torch.float8_e4m3fn
    assert model.quant == "weights"


def test_numpy_dequant_reference(maverick):
    """Our dequantisation == q * scale by hand == the library's decompressor."""
    _, _, path, _ = maverick
    tensors, _ = read_safetensors(path / SINGLE_FILE)
    name = "model.layers.3.feed_forward.experts.5.down_proj.weight"
    q, s = tensors[name], tensors[name + "_scale"]
    assert q.dtype == FP8 and s.shape == (q.shape[0], 1)
    by_hand = np.array([[float(q[r, c]) * float(s[r, 0]) for c in range(q.shape[1])]
                        for r in range(q.shape[0])], np.float32)
    lib = FloatQuantizationCompressor.decompress(
        {"weight": torch.from_numpy(q.view(np.uint8).copy()).view(torch.float8_e4m3fn),
         "weight_scale": torch.from_numpy(s)}, _scheme())["weight"].float().numpy()
    ck = wb.Checkpoint.open(path)
    ours = ck.dequantized("layers.3.feed_forward.experts.down_proj")[5].T
    np.testing.assert_array_equal(by_hand, lib)
    np.testing.assert_array_equal(ours, by_hand)
    np.testing.assert_array_equal(dequantize(q, s), by_hand)


def test_quantize_matches_the_library_bitwise():
    w = torch.randn(48, 40) * torch.linspace(0.01, 3, 48)[:, None]
    q_lib, s_lib = library_fp8(w)
    q, s = quantize_fp8(w.numpy())
    np.testing.assert_array_equal(s, s_lib.numpy())
    np.testing.assert_array_equal(q.view(np.uint8), q_lib.view(torch.uint8).numpy())


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_backends_match_transformers_compressed_tensors(maverick, hf_fp8, backend):
    cfg, _, path, ids = maverick
    ref, routers, _ = hf_run(hf_fp8, ids)
    for offload in (None, "disk"):
        m = wb.load(path, backend=backend, offload=offload)
        out = m.run(ids, capture="*.moe.router_logits")
        assert rel(out.logits, ref) <= wb.parity.FP32_TOL, (backend, offload)
        for j, layer in enumerate(cfg.moe_layers):
            ours = out.trace[f"layers.{layer}.moe.router_logits"]
            assert rel(ours, routers[j]) <= wb.parity.FP32_TOL
            # top-1 agreement, near-ties (margin below the fp32 near-tie) set aside
            clear = margins(routers[j]) > wb.parity.FP32_NEAR_TIE
            assert (ours.argmax(-1) == routers[j].argmax(-1))[clear].all()


def test_streamed_fp8_reads_half_the_expert_bytes(maverick, tmp_path):
    cfg, hf, path, ids = maverick
    bf16 = tmp_path / "bf16"
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(bf16)
    stats = {}
    for name, p in (("fp8", path), ("bf16", bf16)):
        m = wb.load(p, backend="torch", offload="disk")
        m.run(ids[:, :4])
        stats[name] = m.io_stats()["total"]
    n = stats["fp8"]["expert_misses"]
    assert n == stats["bf16"]["expert_misses"] > 0
    I, D = cfg.intermediate_size, cfg.hidden_size
    assert stats["bf16"]["expert_bytes"] == n * 3 * I * D * 2
    # one byte per weight, plus float32 scales for gate, up (I each) and down (D)
    assert stats["fp8"]["expert_bytes"] == n * (3 * I * D + (2 * I + D) * 4)


def _routed_reference(trace, ck: wb.Checkpoint, layer: int, w8a8: bool) -> np.ndarray:
    """numpy routed_out of a top-1 layer from the trace's resid_mid and routing."""
    cfg = ck.config
    h = trace[f"layers.{layer}.resid_mid"].astype(np.float32)
    x = h / np.sqrt((h * h).mean(-1, keepdims=True) + cfg.rms_norm_eps)
    x = x * ck.get(f"layers.{layer}.post_attention_layernorm.weight", np.float32)
    idx = trace[f"layers.{layer}.moe.topk_indices"][..., 0]
    g = trace[f"layers.{layer}.moe.topk_scores"][..., 0]
    out = np.zeros_like(x)
    q = fp8_tokens if w8a8 else (lambda a: a)
    for b, t in np.ndindex(idx.shape):
        gu, dn = ck.expert(layer, int(idx[b, t])).dequantized()
        a = q((x[b, t] * g[b, t])[None]) @ gu
        inter = a.shape[-1] // 2
        mid = a[:, inter:] * (a[:, :inter] / (1 + np.exp(-a[:, :inter])))
        out[b, t] = (q(mid) @ dn)[0]
    return out


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_w8a8_matches_numpy_reference(maverick, backend):
    _, _, path, ids = maverick
    ck = wb.Checkpoint.open(path)
    for mode in ("weights", "w8a8"):
        m = wb.load(path, backend=backend, quant=mode)
        tr = m.run(ids, capture=["layers.1.*"]).trace
        ref = _routed_reference(tr, ck, 1, mode == "w8a8")
        err = rel(tr["layers.1.moe.routed_out"], ref)
        assert err <= (1e-5 if mode == "weights" else 2e-2), (mode, err)
    w = wb.load(path, backend=backend, quant="w8a8").run(ids).logits
    d = wb.load(path, backend=backend, quant="weights").run(ids).logits
    assert rel(w, d) > 1e-4  # the activations were really quantised


def test_torch_and_jax_agree_w8a8_streamed(maverick):
    _, _, path, ids = maverick
    rep = wb.compare(wb.load(path, backend="torch", quant="w8a8", offload="disk"),
                     wb.load(path, backend="jax", quant="w8a8"), ids)
    assert rep.ok, rep.summary()
    assert rep.label_a == "torch/float32+fp8-w8a8"


def test_routing_flip_analysis_and_plot(maverick, tmp_path):
    _, hf, path, ids = maverick
    import matplotlib
    matplotlib.use("Agg")
    from workbench import plots
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ref = wb.load(tmp_path / "bf16", backend="torch")
    stats = {}
    for mode in ("weights", "w8a8"):
        rep = wb.compare(ref, wb.load(path, backend="torch", quant=mode), ids,
                         tol=1.0, near_tie=1.0)
        fs = rep.flip_stats
        for r, layer in zip(rep.routing, fs.layers):
            assert r.layer == layer
            assert fs.flip_fraction[fs.layers.index(layer)] == pytest.approx(
                1 - r.top1_agreement)
        assert len(fs.kl) == ids.size and min(fs.kl) >= -1e-9
        assert np.mean(fs.kl) == pytest.approx(rep.logits_kl)
        assert all(len(m) == ids.size for m in fs.margins)
        assert len(fs.downstream) == len(fs.layers)
        stats[f"FP8 ({mode})"] = fs
        assert "top-1 flips" in fs.summary()
    fig = plots.routing_agreement(stats)
    assert len(fig.axes) == 3 and "bf16 vs FP8 (weights) vs FP8 (w8a8)" in fig._suptitle.get_text()


def test_quantize_cli_writes_the_real_layout(tmp_path, capsys):
    """`workbench quantize` of a transformers checkpoint: compressed-tensors layout that
    transformers loads, equal to our loader's view; `inspect` shows the quantisation."""
    import transformers
    from transformers import CompressedTensorsConfig

    from workbench.cli import main
    cfg = ModelConfig.tiny()  # Scout-like: every layer MoE
    src = tmp_path / "scout"
    build_hf(cfg, seed=5).save_pretrained(src)
    out = tmp_path / "scout-fp8"
    assert main(["quantize", str(src), "--out", str(out), "--scheme", "fp8-channel"]) == 0
    header = read_safetensors(out / SINGLE_FILE)[0]
    assert header["model.layers.0.feed_forward.experts.7.up_proj.weight"].dtype == FP8
    assert header["model.layers.0.feed_forward.experts.7.up_proj.weight_scale"].shape == \
        (cfg.intermediate_size, 1)
    assert header["model.layers.0.self_attn.q_proj.weight"].dtype != FP8
    hf = transformers.Llama4ForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, (1, 9))
    ref = hf_run(hf, ids)[0]
    assert rel(wb.load(out, backend="torch").run(ids).logits, ref) <= wb.parity.FP32_TOL
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "quantisation: compressed-tensors float-quantized" in text and "F8_E4M3" in text
    assert main(["quantize", str(src), "--out", str(out)]) == 2  # exists: refused


# ----------------------------------------------------------------------------- refusals
def _broken(maverick, tmp_path, **edits):
    path = tmp_path / "broken"
    shutil.copytree(maverick[2], path)
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg["quantization_config"]
    for k, v in edits.get("qc", {}).items():
        qc[k] = v
    for k, v in edits.get("weights", {}).items():
        qc["config_groups"]["group_0"]["weights"][k] = v
    if edits.get("drop_qc"):
        del cfg["quantization_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    if "drop" in edits or "put" in edits:
        rewrite_file(path / SINGLE_FILE, drop=edits.get("drop", ()), put=edits.get("put"))
    return path


W = "model.layers.1.feed_forward.experts.2.gate_proj.weight"


def test_missing_scale(maverick, tmp_path):
    p = _broken(maverick, tmp_path, drop=[W + "_scale"])
    raises_with(CheckpointError, lambda: wb.Checkpoint.open(p), W, "scale", "missing")


def test_scale_of_the_wrong_shape(maverick, tmp_path):
    p = _broken(maverick, tmp_path, put={W + "_scale": np.ones((3, 1), np.float32)})
    raises_with(CheckpointError, lambda: wb.Checkpoint.open(p), W + "_scale", "(3, 1)",
                "channel")


def test_fp8_tensor_in_the_ignore_list(maverick, tmp_path):
    p = _broken(maverick, tmp_path, qc={"ignore": [*IGNORE, W[:-len(".weight")]]})
    raises_with(CheckpointError, lambda: wb.Checkpoint.open(p), W, "FP8", "ignore")


def test_unknown_format(maverick, tmp_path):
    p = _broken(maverick, tmp_path, qc={"format": "mystery-quantized"})
    raises_with(CheckpointError, lambda: wb.Checkpoint.open(p), "format", "mystery-quantized",
                "float-quantized")


@pytest.mark.parametrize("edit, words", [
    ({"qc": {"format": "pack-quantized"}}, ("pack-quantized", "int4")),
    ({"qc": {"quant_method": "fbgemm_fp8"}}, ("fbgemm", "compressed-tensors")),
    ({"weights": {"strategy": "group", "group_size": 128}}, ("'group'", "channel")),
    ({"weights": {"strategy": "block"}}, ("'block'", "channel")),
    ({"drop_qc": True}, ("F8_E4M3", "no quantization_config")),
    ({"drop": [W]}, ("experts.2.gate_proj.weight", "belongs to no weight")),
])
def test_unsupported_or_malformed(maverick, tmp_path, edit, words):
    p = _broken(maverick, tmp_path, **edit)
    raises_with(CheckpointError, lambda: wb.Checkpoint.open(p), *words)


def test_meta_pth_release_refused(tmp_path):
    (tmp_path / "consolidated.00.pth").write_bytes(b"\x80\x04not read")
    (tmp_path / "params.json").write_text("{}")
    shutil.copy("data/scout-mini/config.json", tmp_path / "config.json")
    raises_with(CheckpointError, lambda: wb.Checkpoint.open(tmp_path), ".pth", "pickle")


def test_quant_argument_checked(maverick):
    raises_with(ValueError, lambda: wb.load("data/scout-mini", quant="w8a8"),
                "FP8 checkpoint", "workbench quantize")
    raises_with(ValueError, lambda: wb.load(maverick[2], quant="int4"), "'int4'", "w8a8")
