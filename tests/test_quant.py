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
    """(config, fp32 HF model, FP8 checkpoint dir, ids): Maverick-like (MoE every other
    layer, 16 experts), written with compressed-tensors' compressor."""
    cfg = ModelConfig.tiny(**CASES["maverick"])
    hf = build_hf(cfg, seed=3)
    path = tmp_path_factory.mktemp("fp8") / "maverick-fp8"
    write_compressed(hf, path)
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 19))
    return cfg, hf, path, ids


def _hf_compressed(path, dtype):
    """transformers + compressed-tensors loading an FP8 checkpoint (dequantised weights)."""
    import transformers
    from transformers import CompressedTensorsConfig
    m = transformers.Llama4ForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="eager",
        quantization_config=CompressedTensorsConfig(dequantize=True))
    return m.eval()


@pytest.fixture(scope="module")
def hf_fp8(maverick):
    """The oracle's (logits, router logits) in float32 on the FP8 checkpoint."""
    return hf_run(_hf_compressed(maverick[2], torch.float32), maverick[3])[:2]


@pytest.fixture(scope="module")
def bf16_dir(maverick, tmp_path_factory):
    """The unquantised model as a bf16 transformers checkpoint (the reference of flips)."""
    path = tmp_path_factory.mktemp("bf16") / "maverick-bf16"
    copy.deepcopy(maverick[1]).to(torch.bfloat16).save_pretrained(path)
    return path


# what a variant's run captures: the routing and layer 1's MoE (the numpy reference); w8a8
# runs capture every hook, as wb.compare (which adds the routing hooks to "*") asks, so the
# torch/jax comparison reuses the jax model's compiled steps. jax compiles take most of this
# module's time, and capturing everything roughly doubles one.
ROUTING = ["*.moe.router_logits", "*.moe.topk_indices"]
CAPTURE = {"weights": ["layers.1.resid_mid", "layers.1.moe.*", *ROUTING], "w8a8": ["*", *ROUTING]}
FAST = {"xla_backend_optimization_level": 0}  # compile the small jax model quickly


@pytest.fixture(scope="module")
def runs(maverick):
    """``runs(backend, quant, offload, dtype)`` -> (model, output of ids with CAPTURE[quant]):
    each variant loaded and run once per module (a jax variant is compiled once)."""
    _, _, path, ids = maverick
    memo: dict[tuple, tuple] = {}

    def get(backend: str, quant: str = "weights", offload: str | None = None,
            dtype: str = "float32"):
        key = (backend, quant, offload, dtype)
        if key not in memo:
            m = wb.load(path, backend=backend, quant=quant, offload=offload, dtype=dtype)
            if backend == "jax":
                m.compiler_options.update(FAST)
            memo[key] = m, m.run(ids, capture=CAPTURE[quant])
        return memo[key]
    return get


def test_layout_is_read_and_experts_stay_fp8(maverick, runs):
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
    model = runs("torch")[0]
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


# (backend, offload) run against the float32 oracle; jax streams here and runs resident in
# the w8a8 and bf16 tests, so each of its three compiled variants is built once
ORACLE_RUNS = [("torch", None), ("torch", "disk"), ("jax", "disk")]


@pytest.mark.parametrize("backend, offload", ORACLE_RUNS)
def test_backends_match_transformers_compressed_tensors(maverick, hf_fp8, runs, backend,
                                                        offload):
    cfg, _, _, _ = maverick
    ref, routers = hf_fp8
    out = runs(backend, offload=offload)[1]
    assert rel(out.logits, ref) <= wb.parity.FP32_TOL
    for j, layer in enumerate(cfg.moe_layers):
        ours = out.trace[f"layers.{layer}.moe.router_logits"]
        assert rel(ours, routers[j]) <= wb.parity.FP32_TOL
        # top-1 agreement, near-ties (margin below the fp32 near-tie) set aside
        clear = margins(routers[j]) > wb.parity.FP32_NEAR_TIE
        assert (ours.argmax(-1) == routers[j].argmax(-1))[clear].all()


def test_streamed_fp8_reads_half_the_expert_bytes(maverick, bf16_dir):
    cfg, _, path, ids = maverick
    stats = {}
    for name, p in (("fp8", path), ("bf16", bf16_dir)):
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


# where each backend's two modes run: jax's weights mode is its streamed oracle run
MODES = {"torch": {"weights": None, "w8a8": None}, "jax": {"weights": "disk", "w8a8": None}}


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_w8a8_matches_numpy_reference(maverick, runs, backend):
    _, _, path, _ = maverick
    ck = wb.Checkpoint.open(path)
    out = {mode: runs(backend, mode, offload)[1] for mode, offload in MODES[backend].items()}
    for mode, o in out.items():
        ref = _routed_reference(o.trace, ck, 1, mode == "w8a8")
        err = rel(o.trace["layers.1.moe.routed_out"], ref)
        assert err <= (1e-5 if mode == "weights" else 2e-2), (mode, err)
    # the activations were really quantised
    assert rel(out["w8a8"].logits, out["weights"].logits) > 1e-4


def test_torch_and_jax_agree_w8a8_streamed(runs, maverick):
    jm = runs("jax", "w8a8")[0]
    steps = jm.compiled_steps
    rep = wb.compare(runs("torch", "w8a8", "disk")[0], jm, maverick[3])
    assert jm.compiled_steps == steps  # the compare reused the module's compiled jax steps
    assert rep.ok, rep.summary()
    assert rep.label_a == "torch/float32+fp8-w8a8"
    assert len(rep.hooks) > 20  # every hook compared, not only the routing


@pytest.fixture(scope="module")
def hf_fp8_bf16(maverick):
    """The oracle in bfloat16: transformers + compressed-tensors, weights dequantised to bf16."""
    return hf_run(_hf_compressed(maverick[2], torch.bfloat16), maverick[3])[:2]


def bf16_agreement(out, ref_logits: np.ndarray, ref_routers: list[np.ndarray],
                   moe_layers: list[int], near_tie: float) -> dict[str, float]:
    """A bf16 run against the bf16 oracle, robust to routing near-ties.

    Layer by layer, positions are compared up to the first one in their row that an earlier
    top-1 flip can have reached (attention carries a flip to every later position). There,
    router logits are compared and every flip must sit at a near-tie (oracle margin at most
    ``near_tie``); the logits are compared on the untouched prefixes. Returns the worst
    relative errors, the untouched fraction and top-1 agreement over every token whose oracle
    margin exceeds ``near_tie`` (near-ties set aside).
    """
    B, S = ref_logits.shape[:2]
    reach = np.full(B, S)  # first position an earlier flip can have changed, per row
    router_err, agree, clear_n = 0.0, 0, 0
    for layer, r in zip(moe_layers, ref_routers):
        ours = out.trace[f"layers.{layer}.moe.router_logits"]
        flips = ours.argmax(-1) != r.argmax(-1)
        m = margins(r)
        for b in range(B):
            t = reach[b]
            if t:
                router_err = max(router_err, rel(ours[b, :t], r[b, :t]))
            assert (m[b, :t][flips[b, :t]] <= near_tie).all(), (layer, b, m[b, :t][flips[b, :t]])
            hit = np.flatnonzero(flips[b])
            reach[b] = min(t, hit[0]) if hit.size else t
        clear = m > near_tie
        agree += int((~flips)[clear].sum())
        clear_n += int(clear.sum())
    logit_err = max(rel(out.logits[b, :reach[b]], ref_logits[b, :reach[b]])
                    for b in range(B) if reach[b])
    return {"router_rel": router_err, "logits_rel": logit_err,
            "untouched": float(reach.sum() / (B * S)), "top1_clear": agree / max(clear_n, 1)}


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_bf16_matches_transformers_compressed_tensors_bf16(maverick, hf_fp8_bf16, runs,
                                                           backend):
    """Both backends in bf16 against transformers + compressed-tensors in bf16: within the
    bf16 tolerance wherever no routing flip has reached, every flip at a near-tie, top-1
    agreement high once near-ties are set aside. (A flip moves every later position of its
    row, so whole-sequence errors would measure where near-ties fall, not the kernels.)"""
    cfg = maverick[0]
    out = runs(backend, dtype="bfloat16")[1]
    ref, routers = hf_fp8_bf16
    got = bf16_agreement(out, ref, routers, cfg.moe_layers, wb.parity.BF16_NEAR_TIE)
    assert got["router_rel"] <= wb.parity.BF16_TOL and got["logits_rel"] <= wb.parity.BF16_TOL
    assert got["untouched"] >= 0.5 and got["top1_clear"] >= 0.9, got


def test_routing_flip_analysis_and_plot(maverick, runs, bf16_dir):
    ids = maverick[3]
    import matplotlib
    matplotlib.use("Agg")
    from workbench import plots
    ref = wb.load(bf16_dir, backend="torch")
    stats = {}
    for mode in ("weights", "w8a8"):
        rep = wb.compare(ref, runs("torch", mode)[0], ids, tol=1.0, near_tie=1.0)
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
    assert fig.axes[1].get_xscale() == "log"  # margins of flips and of all tokens, one axis


def test_next_token_kl_against_torch():
    from workbench.parity import next_token_kl
    rng = np.random.default_rng(11)
    a, b = rng.normal(0, 3, (2, 1500, 50)), rng.normal(0, 3, (2, 1500, 50))
    b[0, :7] = a[0, :7]
    want = torch.nn.functional.kl_div(torch.log_softmax(torch.from_numpy(b), -1),
                                      torch.log_softmax(torch.from_numpy(a), -1),
                                      log_target=True, reduction="none").sum(-1).numpy()
    got = next_token_kl(a.astype(np.float32), b.astype(np.float32), rows=256)  # chunked
    assert got.shape == (2, 1500) and np.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(got[0, :7]).max() < 1e-12 and got.min() > -1e-12
    raises_with(ValueError, lambda: next_token_kl(a, b[:, :3]), "(2, 1500, 50)", "(2, 3, 50)")


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


def test_quantize_copies_the_vision_tower_through(tmp_path):
    """A multimodal checkpoint: the vision tower and projector are copied byte for byte, the
    result loads with its vision path, and image + text runs match transformers +
    compressed-tensors on it."""
    import transformers
    from test_vision_oracle import IMAGE, TILES, build_vlm, prompt
    from transformers import CompressedTensorsConfig

    from workbench.quant import quantize_checkpoint
    src = tmp_path / "vlm"
    build_vlm(seed=8).save_pretrained(src)
    out = quantize_checkpoint(src, tmp_path / "vlm-fp8")
    before, after = read_safetensors(src / SINGLE_FILE)[0], read_safetensors(out / SINGLE_FILE)[0]
    vision = [k for k in before if "vision_model." in k or "multi_modal_projector." in k]
    assert len(vision) > 10
    for k in vision:
        assert after[k].dtype == before[k].dtype and np.array_equal(after[k], before[k]), k
    assert any(a.dtype == FP8 for a in after.values())
    model = wb.load(out, backend="torch")
    assert model.has_vision and model.quant == "weights"
    rng = np.random.default_rng(9)
    ids, px = prompt(rng), rng.normal(0, 1, (TILES, 3, 56, 56)).astype(np.float32)
    got = model.run(ids, pixel_values=px, capture=["vision.projected"])
    hf = transformers.Llama4ForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager",
        quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    with torch.no_grad():  # the wrapper's forward raises: its steps, as in test_vision_oracle
        feats = hf.vision_model(torch.from_numpy(px)).last_hidden_state
        proj = hf.multi_modal_projector(feats.reshape(-1, feats.shape[-1]))
        emb = hf.language_model.get_input_embeddings()(torch.from_numpy(ids))
        mask = torch.from_numpy(ids == IMAGE)[..., None].expand_as(emb)
        ref = hf.language_model(inputs_embeds=emb.masked_scatter(mask, proj)).logits.numpy()
    assert rel(got.trace["vision.projected"].reshape(proj.shape), proj.numpy()) <= \
        wb.parity.FP32_TOL
    assert rel(got.logits, ref) <= wb.parity.FP32_TOL


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
