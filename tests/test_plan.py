"""`workbench plan`: memory per mode and bytes per step, checked against a streamed run."""

from __future__ import annotations

import numpy as np
import pytest

import workbench as wb
from workbench.config import ModelConfig
from workbench.plan import (
    causal_pairs,
    context_plan,
    expected_experts,
    make_plan,
    parse_context,
    plan_text,
)
from workbench.random_weights import write_random_checkpoint


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("maverick", [False, True])
def test_decode_bytes_equal_what_a_streamed_decode_step_reads(tmp_path, backend, maverick):
    cfg = (ModelConfig.tiny_maverick() if maverick else ModelConfig.tiny())
    path = write_random_checkpoint(tmp_path, cfg, seed=2)
    p = make_plan(cfg, "1GB", dtype="float32", read_rate=1e9, backend=backend)
    m = wb.load(path, backend=backend, offload="disk")
    cache = m.new_cache(1)
    from workbench.interventions import Plan
    from workbench.model import CaptureSpec
    m._forward(np.array([[5, 6, 7]]), Plan(), CaptureSpec(frozenset()), cache)
    m.io_stats(reset=True)
    m._forward(np.array([[9]]), Plan(), CaptureSpec(frozenset()), cache)
    assert m.io_stats()["total"]["bytes_read"] == p.decode_read
    assert p.decode_s == pytest.approx(p.decode_read / 1e9)


def test_scout_and_maverick_modes():
    scout, maverick = ModelConfig.scout(), ModelConfig.maverick()
    p = make_plan(scout, "24GB", read_rate=2e9)
    assert p.mode == "disk" and p.weights == scout.param_counts()["total"] * 2
    assert p.streamed_need < 24e9 < p.resident_need
    assert make_plan(scout, "300GB", read_rate=2e9).mode == "resident"
    # a decode step streams the active parameters: about 17B in bf16
    assert 30e9 < p.decode_read < 36e9
    # torch holds one expert at a time; jax the chosen experts in groups of at most 1 GiB
    t = make_plan(maverick, "24GB", read_rate=2e9)
    j = make_plan(maverick, "24GB", read_rate=2e9, backend="jax")
    assert t.mode == j.mode == "disk"
    assert j.streamed_need - t.streamed_need == (2**30 // t.expert - 1) * t.expert
    text = plan_text(p, scout, "scout")
    assert "mode: disk" in text and "decode" in text
    assert expected_experts(16, 1) == pytest.approx(1.0)
    assert expected_experts(16, 10**6) == pytest.approx(16.0)


def test_read_rate_is_measured_on_the_checkpoint(tmp_path):
    cfg = ModelConfig.tiny()
    path = write_random_checkpoint(tmp_path, cfg)
    p = make_plan(cfg, "1GB", path=path)
    assert p.read_rate > 0 and "model.safetensors" in p.read_rate_source


@pytest.mark.parametrize("kw, match", [
    (dict(memory="lots"), "memory=.lots"), (dict(memory=0), "positive"),
    (dict(dtype="int3"), "dtype"), (dict(prefill_tokens=0), "prefill_tokens"),
    (dict(backend="tf"), "backend"),
])
def test_bad_plan_arguments(kw, match):
    args = dict(memory="24GB", read_rate=1e9) | kw
    with pytest.raises(ValueError, match=match):
        make_plan(ModelConfig.scout(), **args)


# ----------------------------------------------------------------------------- long context

GiB = 1024**3


@pytest.mark.parametrize("text, n", [("1M", 2**20), ("10M", 10 * 2**20), ("262144", 262144),
                                     ("128K", 131072), ("128k", 131072), (" 1m ", 2**20),
                                     ("1_000_000", 10**6), (65536, 65536), ("0.5M", 2**19)])
def test_context_lengths_parse(text, n):
    assert parse_context(text) == n


@pytest.mark.parametrize("bad", ["", "1G", "1.5x", "-5", "0", 0, "1.0000001K", True, "M"])
def test_bad_context_lengths_are_refused(bad):
    with pytest.raises(ValueError, match="context"):
        parse_context(bad)


def test_causal_pairs_count_the_mask():
    from workbench.numerics import attention_mask
    for T, w in [(1, None), (7, None), (7, 3), (9, 3), (10, 4), (5, 8)]:
        pos = np.arange(T)
        assert causal_pairs(T, w) == attention_mask(pos, pos, w).sum(), (T, w)


@pytest.mark.parametrize("text, T", [("1M", 1_048_576), ("10M", 10_485_760)])
def test_scout_context_projection_by_hand(text, T):
    """Scout: 48 layers, 36 chunked (8192) + 12 global NoPE, 40 query / 8 KV heads of 128."""
    cfg = ModelConfig.scout()
    c = context_plan(cfg, text, "bfloat16")
    assert c.tokens == T and not c.beyond_max_positions
    chunked, glob = c.kinds
    assert (chunked.kind, chunked.window, chunked.layers) == ("chunked", 8192, 36)
    assert (glob.kind, glob.window, glob.layers) == ("global", None, 12)
    per_token = 2 * 8 * 128 * 2  # keys + values, 8 KV heads of 128, bf16: 4 KiB per token
    assert chunked.kv_bytes == 8192 * per_token == 32 * 2**20
    assert glob.kv_bytes == T * per_token
    assert c.kv_bytes == 36 * 32 * 2**20 + 12 * T * 4096
    # 1M: 48 GiB global + 1.125 GiB chunked; 10M: 480 GiB + 1.125 GiB
    assert c.kv_bytes == (48 * T // 2**20 + 1.125) * GiB
    # prefill pairs: global T(T+1)/2; chunked T/8192 full chunks of 8192*8193/2
    assert T % 8192 == 0
    assert glob.prefill_pairs == T * (T + 1) // 2
    assert chunked.prefill_pairs == T // 8192 * 8192 * 8193 // 2
    per_pair = 4 * 40 * 128  # QK^T and PV, 2 FLOPs per multiply-add, 40 heads of 128
    assert glob.prefill_flops == per_pair * T * (T + 1) / 2
    assert chunked.prefill_flops == per_pair * T * 8193 / 2
    assert c.prefill_attn_flops == pytest.approx(12 * per_pair * T * (T + 1) / 2
                                                 + 36 * per_pair * T * 8193 / 2, rel=1e-12)
    if T == 2**20:
        assert c.prefill_attn_flops == pytest.approx(1.38275e17, rel=1e-5)
    else:
        assert c.prefill_attn_flops == pytest.approx(1.35425e19, rel=1e-5)
    # the weights' matmuls: 2 x (active params - embedding) per token
    active = cfg.param_counts()["active"] - 202048 * 5120
    assert c.prefill_linear_flops == 2 * active * T
    # decode after T tokens: every kept key, 20480 FLOPs each; reads the whole KV cache
    assert c.decode_attn_flops == per_pair * (12 * T + 36 * 8192)
    assert c.decode_kv_read == c.kv_bytes
    assert glob.decode_keys == T and chunked.decode_keys == 8192


def test_context_projection_small_cases_and_dtypes():
    cfg = ModelConfig.tiny()  # chunk 8, NoPE at layer 3, 4 heads / 2 KV heads of 16
    c = context_plan(cfg, 5, "float32")  # shorter than a chunk: every layer keeps all 5
    assert [(k.kind, k.layers, k.kv_tokens) for k in c.kinds] == [("chunked", 3, 5),
                                                                 ("global", 1, 5)]
    assert c.kv_bytes == 4 * 2 * 2 * 16 * 5 * 4
    assert c.prefill_attn_flops == 4 * (4 * 4 * 16 * 15)
    c = context_plan(cfg, 20, "bfloat16")  # 2 full chunks + 4: 2 * 36 + 10 pairs
    assert c.kinds[0].prefill_pairs == 82 and c.kinds[0].kv_tokens == 8
    assert c.kinds[1].prefill_pairs == 210 and c.kinds[1].kv_tokens == 20
    assert c.kv_bytes == (3 * 8 + 20) * 2 * 2 * 16 * 2
    assert context_plan(cfg, "1M").beyond_max_positions  # tiny: 4096 positions
    # no chunk anywhere: every layer global
    flat = context_plan(ModelConfig.tiny(attention_chunk_size=None), 16)
    assert [(k.kind, k.layers) for k in flat.kinds] == [("global", 4)]
    with pytest.raises(ValueError, match="dtype"):
        context_plan(cfg, 16, "int4")


def test_plan_includes_contexts_in_text_and_dict():
    import json
    scout = ModelConfig.scout()
    p = make_plan(scout, "24GB", read_rate=2e9, context=["1M", "10M"])
    assert [c.tokens for c in p.contexts] == [2**20, 10 * 2**20]
    d = p.as_dict()
    assert d["contexts"][0]["kv_bytes"] == 48 * GiB + 36 * 32 * 2**20
    assert d["contexts"][1]["kinds"][1]["kv_bytes"] == 40 * GiB
    json.dumps(d)
    assert make_plan(scout, "24GB", read_rate=2e9).contexts == ()
    assert make_plan(scout, "24GB", read_rate=2e9, context="1M").contexts[0].tokens == 2**20
    text = plan_text(p, scout, "scout")
    assert "49.1 GiB" in text and "481.1 GiB" in text and "1,048,576" in text
    assert "KV per layer, global x12" in text and "4.0 GiB" in text and "40.0 GiB" in text
    assert "with the KV cache of 1,048,576 tokens" in text
    with pytest.raises(ValueError, match="context"):
        make_plan(scout, "24GB", read_rate=2e9, context="lots")


def test_plan_command_with_context(capsys):
    from workbench.cli import main
    assert main(["plan", "scout", "--context", "1M", "--context", "10M"]) == 0
    out = capsys.readouterr().out
    assert "10,485,760" in out and "481.1 GiB" in out and "138 PFLOP" in out
    assert "mode:" not in out  # without --memory: the projection alone
    assert main(["plan", "maverick", "--context", "262144,10M", "--memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "mode: disk" in out and "262,144" in out
    assert "exceed the config's max_position_embeddings=1,048,576" in out
    assert main(["plan", "scout"]) == 2
    assert "--memory" in capsys.readouterr().err
    assert main(["plan", "scout", "--context", "lots"]) == 2
    assert "context='lots'" in capsys.readouterr().err
