"""Torch blockwise kernels: the attention summary against its full-pattern definition, blockwise
masked attention against the one-mask call, and the preallocated KV cache against a full
recompute (no timing thresholds: speed and memory are measured in the long-context benchmark)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.config import ModelConfig
from workbench.interventions import Plan
from workbench.model import CaptureSpec
from workbench.numerics import (
    SUMMARY_FEATURES,
    attention_mask,
    attention_summary_reference,
    distance_bucket_edges,
)
from workbench.random_weights import write_random_checkpoint
from workbench.torch import attention as att

NB = len(distance_bucket_edges())


def _reference(q, k, start, k_start, chunk, own_chunk, scale):
    """Summary from the exact (float64) softmax of the fp32 scores."""
    B, H, S, d = q.shape
    K, T = k.shape[1], k.shape[2]
    kr = k.double().repeat_interleave(H // K, dim=1)
    s = (q.double() @ kr.transpose(-1, -2)) * scale
    qpos, kpos = np.arange(start, start + S), np.arange(k_start, k_start + T)
    m = torch.from_numpy(attention_mask(qpos, kpos, chunk))
    p = torch.softmax(s.masked_fill(~m, float("-inf")), -1).numpy()
    return attention_summary_reference(p, qpos, kpos, own_chunk)


def _qk(B, H, K, S, T, d=8, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, d, generator=g) * spread
    k = torch.randn(B, K, T, d, generator=g)
    return q, k


# (B, H, K, S, start, k_start, T, chunk, own_chunk)
CASES = {
    "global-fresh": (1, 4, 2, 37, 0, 0, 37, None, 16),
    "global-own-none": (2, 4, 4, 29, 0, 0, 29, None, None),
    "global-continue": (2, 6, 2, 23, 300, 0, 323, None, 64),
    "global-k-start": (1, 4, 1, 19, 150, 40, 129, None, 50),
    "chunked-fresh": (2, 4, 2, 45, 0, 0, 45, 16, 16),  # chunk does not divide S
    "chunked-continue": (1, 4, 2, 21, 70, 64, 27, 16, 16),  # keys from the kept chunk on
    "chunked-own-other": (1, 2, 1, 30, 5, 0, 35, 12, 8),
    "decode": (2, 4, 2, 1, 200, 0, 201, None, 64),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_summary_equals_the_full_pattern_definition(name):
    B, H, K, S, start, k_start, T, chunk, own = CASES[name]
    q, k = _qk(B, H, K, S, T)
    scale = 8 ** -0.5
    ref = _reference(q, k, start, k_start, chunk, own, scale)
    for bq, bk in ((None, None), (4, 8), (7, 5)):
        got = att.attention_summary(q, k, start, k_start, chunk, own, scale, block_q=bq,
                                    block_k=bk)
        assert got.dtype == torch.float32 and got.shape == (B, H, S, len(SUMMARY_FEATURES))
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=2e-5 * max(1, start),
                                   err_msg=f"{name} blocks {bq}x{bk}")
        # the distance column scales with positions; the others are within [0, log T]
        cols = [i for i, f in enumerate(SUMMARY_FEATURES) if f != "distance"]
        np.testing.assert_allclose(got.numpy()[..., cols], ref[..., cols], atol=2e-5)


def test_bucket_masses_sum_to_one_and_cover_long_distances():
    q, k = _qk(1, 4, 2, 40, 700, spread=0.5)
    s = att.attention_summary(q, k, 660, 0, None, None, 8 ** -0.5, block_q=16, block_k=64)
    np.testing.assert_allclose(s[..., 5:].sum(-1).numpy(), 1.0, atol=1e-5)
    assert (s[..., 5 + 9:5 + 11].sum(-1) > 0.1).all()  # d in [256, 1024): most keys are there
    d = torch.tensor([0, 1, 2, 3, 4, 7, 8, (1 << 22) + 5, (1 << 23) - 1, 1 << 23, 1 << 30, -3])
    want = np.searchsorted(distance_bucket_edges(), np.maximum(d.numpy(), 0), "right") - 1
    assert att._buckets(d, torch.as_tensor(distance_bucket_edges())).tolist() == want.tolist()


def test_summary_does_not_depend_on_block_sizes():
    q, k = _qk(2, 8, 2, 50, 150, seed=3)
    args = (q, k, 100, 0, None, 32, 0.3)
    base = att.attention_summary(*args)
    for bq, bk in ((2, 3), (3, 17), (50, 150), (16, 1000)):
        np.testing.assert_allclose(att.attention_summary(*args, block_q=bq, block_k=bk).numpy(),
                                   base.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("chunk", [None, 8])
def test_blockwise_masked_attention_equals_one_mask(monkeypatch, chunk):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 30, 16, generator=g)
    k, v = (torch.randn(2, 2, 71, 16, generator=g) for _ in range(2))
    one = att.fused(q, k, v, 41, 0, chunk, 0.25)  # 30 x 71 < MASK_ELEMS: one mask
    monkeypatch.setattr(att, "MASK_ELEMS", 100)
    blocked = att.fused(q, k, v, 41, 0, chunk, 0.25)
    torch.testing.assert_close(blocked, one, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- KV cache
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = ModelConfig.tiny()  # chunk 8: layers 0-2 chunked (RoPE), layer 3 global (NoPE)
    path = write_random_checkpoint(tmp_path_factory.mktemp("tiny"), cfg, seed=1)
    return cfg, wb.load(path, backend="torch")


def test_cached_generate_equals_full_recompute_across_chunk_boundaries(tiny):
    cfg, m = tiny
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 5))
    g = m.generate(ids, 22, temperature=0)  # positions 5..26: crosses 8, 16 and 24
    seq = ids
    for _ in range(22):  # greedy without a cache: the whole sequence every step
        seq = np.concatenate([seq, m.run(seq).logits[:, -1].argmax(-1)[:, None]], 1)
    assert np.array_equal(g.sequences, seq)


def test_continuation_calls_equal_one_forward(tiny):
    cfg, m = tiny
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 60))
    full = m.run(ids).logits
    cache = m.new_cache(2)
    at = 0
    for n in (5, 1, 7, 12, 1, 1, 20, 13):  # decode steps and calls longer than two chunks
        logits, _, cache = m._forward(ids[:, at:at + n], Plan(), CaptureSpec(frozenset()), cache)
        np.testing.assert_allclose(logits, full[:, at:at + n], rtol=1e-4, atol=1e-4)
        at += n
    assert cache["start"] == 60


def test_cache_buffers_are_preallocated_and_chunked_ones_bounded(tiny):
    cfg, m = tiny
    chunk = cfg.attention_chunk_size
    cache = m.new_cache(1)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 90))
    m._forward(ids[:, :30], Plan(), CaptureSpec(frozenset()), cache)
    moves = dict.fromkeys(range(cfg.num_hidden_layers), 0)
    for t in range(30, 90):
        before = {i: e.k.data_ptr() for i, e in cache["layers"].items()}
        m._forward(ids[:, t:t + 1], Plan(), CaptureSpec(frozenset()), cache)
        for i, e in cache["layers"].items():
            moves[i] += e.k.data_ptr() != before[i]
            if cfg.chunk_size(i) is not None:
                assert e.capacity <= 2 * chunk and e.n <= chunk
                assert e.pos == ((t // chunk) * chunk)  # only the last query's chunk is kept
            else:
                assert e.n == t + 1 and e.pos == 0
    assert moves == dict.fromkeys(range(cfg.num_hidden_layers), 0)  # written in place
    # a call longer than the buffer attends to a one-off copy; the buffer stays two chunks
    m._forward(ids[:, :40], Plan(), CaptureSpec(frozenset()), cache)
    for i, e in cache["layers"].items():
        if cfg.chunk_size(i) is not None:
            assert e.capacity <= 2 * chunk and e.n <= chunk


def test_global_buffer_grows_in_blocks():
    k = torch.zeros(1, 2, 3, 4)
    e = att.EMPTY
    caps, pos = [], 0
    for S in [3] + [1] * 3000:
        ks, _, k_start, e = att.cache_update(e, k[:, :, :S] + pos, k[:, :, :S], pos, None)
        pos += S
        caps.append(e.capacity)
        assert k_start == 0 and ks.shape[2] == pos and e.n == pos
    assert ks[0, 0, :, 0].tolist() == [0, 0, 0] + list(range(3, 3003))
    assert len(set(caps)) <= 4 and caps[-1] - pos < 2 * att.CACHE_BLOCK
