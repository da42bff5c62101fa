"""Streamed execution (offload="disk"): exact equality with resident weights, sparse reads."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from oracle import CASES, make_case  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.config import ModelConfig  # noqa: E402
from workbench.random_weights import write_random_checkpoint  # noqa: E402
from workbench.streaming import ExpertCache, ExpertSet, parse_bytes  # noqa: E402

BACKENDS = ["torch", "jax"]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    cfg, _, path, ids = make_case(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, cfg, path, ids


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cfg = ModelConfig.tiny(num_local_experts=16)
    return cfg, write_random_checkpoint(tmp_path_factory.mktemp("stream"), cfg, seed=5,
                                        router_std=1.0)


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and np.array_equal(a[n], b[n]), n


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_hook_equals_resident_on_the_oracle_cases(case, backend):
    name, cfg, path, ids = case
    resident = wb.load(path, backend=backend)
    streamed = wb.load(path, backend=backend, offload="disk")
    assert streamed.offload == "disk" and resident.offload is None
    a, b = resident.run(ids, capture="*"), streamed.run(ids, capture="*")
    assert np.array_equal(a.logits, b.logits), name
    _same(dict(a.trace), dict(b.trace))


def test_jax_runs_chosen_experts_in_byte_bounded_groups(small):
    """jax holds at most ``expert_group_bytes`` of chosen experts at once; the groups' rows
    merge to exactly the resident result, with top-k > 1 and every intervention kind."""
    cfg, path = small
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 17))
    resident = wb.load(path, backend="jax")
    streamed = wb.load(path, backend="jax", offload="disk", max_memory=0)
    experts = ExpertSet(streamed.weights, 0)
    streamed.expert_group_bytes = 3 * experts.expert_bytes  # three experts per group
    assert experts.groups(range(8), streamed.expert_group_bytes) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    ivs = [wb.set_top_k(2, layer=1), wb.zero_expert(1, 5), wb.ban_expert(2, 0)]
    a = resident.run(ids, capture="*", interventions=ivs)
    b = streamed.run(ids, capture="*", interventions=ivs)
    assert np.array_equal(a.logits, b.logits)
    _same(dict(a.trace), dict(b.trace))
    merged = [k for k in streamed._steps if k[0] == "experts" and k[3] is False]
    assert merged, "no layer ran its experts in more than one group"


@pytest.mark.parametrize("backend", BACKENDS)
def test_interventions_generate_and_compare_work_streamed(small, backend):
    cfg, path = small
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 13))
    resident = wb.load(path, backend=backend)
    streamed = wb.load(path, backend=backend, offload="disk", max_memory="1MB")
    ivs = [wb.ban_expert(0, 3), wb.zero_expert(1, 5), wb.force_expert(2, 7, positions=[0, 4]),
           wb.set_top_k(2, layer=3), wb.ablate_head(1, 2)]
    kw = dict(capture=["*.moe.*", "layers.1.attn.pattern", "logits"], interventions=ivs)
    _same(dict(resident.run(ids, **kw).trace), dict(streamed.run(ids, **kw).trace))
    ga = resident.generate(ids[:, :5], 6, temperature=0, capture="*.moe.topk_indices")
    gb = streamed.generate(ids[:, :5], 6, temperature=0, capture="*.moe.topk_indices")
    assert np.array_equal(ga.sequences, gb.sequences)
    _same(dict(ga.trace), dict(gb.trace))
    report = wb.compare(resident, streamed, ids)
    assert report.ok and not report.flips and report.worst.rel == 0.0
    assert all(r.top1_agreement == 1.0 for r in report.routing)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_chosen_experts_are_read_once_per_forward(small, backend):
    cfg, path = small
    E, D, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    per_expert = 4 * (D * 2 * I + I * D)  # float32 checkpoint
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 9))
    m = wb.load(path, backend=backend, offload="disk")
    out = m.run(ids, capture="*.moe.topk_indices")
    stats = m.io_stats(reset=True)
    assert stats["mode"] == "disk"
    for i in cfg.moe_layers:
        used = len(np.unique(out.trace[f"layers.{i}.moe.topk_indices"]))
        layer = stats["layers"][str(i)]
        assert used < E
        assert layer["expert_misses"] == used and layer["expert_hits"] == 0, (i, layer)
        assert layer["expert_bytes"] == used * per_expert
    # the embedding reads only the rows asked for
    assert stats["layers"]["embed"]["bytes_read"] == len(np.unique(ids)) * D * 4
    total = sum(v["bytes_read"] for v in stats["layers"].values())
    assert stats["total"]["bytes_read"] == total
    ck = wb.Checkpoint.open(path)
    assert total < ck.nbytes
    # with a cache, a second identical forward reads no expert again
    m = wb.load(path, backend=backend, offload="disk", max_memory=10**9)
    m.run(ids)
    first = m.io_stats(reset=True)
    m.run(ids)
    second = m.io_stats()
    assert second["total"]["expert_misses"] == 0
    assert second["total"]["expert_hits"] == first["total"]["expert_misses"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_at_layer_reads_only_those_layers(small, backend):
    cfg, path = small
    m = wb.load(path, backend=backend, offload="disk")
    ids = np.arange(6)[None]
    out = m.run(ids, capture="layers.1.resid_post", stop_at_layer=2)
    assert out.logits is None
    assert set(m.io_stats()["layers"]) == {"embed", "0", "1"}
    ref = wb.load(path, backend=backend).run(ids, capture="layers.1.resid_post")
    assert np.array_equal(out.trace["layers.1.resid_post"], ref.trace["layers.1.resid_post"])


def test_expert_cache_is_lru_within_a_layer():
    c = ExpertCache(100)
    c.put((0, 0), "a", 40)
    c.put((0, 1), "b", 40)
    assert c.get((0, 0)) == "a"  # (0, 1) is now the least recently used
    c.put((0, 2), "c", 40)
    assert c.get((0, 1)) is None and c.get((0, 0)) == "a" and c.get((0, 2)) == "c"
    assert c.used == 80
    c.put((1, 0), "big", 101)  # larger than the whole budget: not kept
    assert c.get((1, 0)) is None and len(c) == 2


def test_expert_cache_does_not_thrash_on_the_layer_cycle():
    """Room for 7 experts, 8 layers, the same choice every decode step: plain LRU would evict
    each layer's expert just before it is needed (0 hits); this cache keeps 7 of 8."""
    c = ExpertCache(7, layers=8)
    for layer in range(8):  # a prefill that read all 16 experts of every layer
        for e in range(16):
            c.put((layer, e), e, 1)
    assert len({k[0] for k in c._items}) == 7  # spread over layers, not held by layer 0
    hits = 0
    for _ in range(5):
        for layer in range(8):
            if c.get((layer, 15)) is not None:
                hits += 1
            else:
                c.put((layer, 15), 15, 1)
    assert hits == 5 * 7


def test_byte_budgets_and_bad_offload_arguments(small):
    assert parse_bytes("6GB") == 6 * 10**9 and parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes(1234) == 1234 and parse_bytes(None) is None
    _, path = small
    for bad in ("6 parsecs", "-1GB", -5, True, "GB"):
        with pytest.raises(ValueError, match="max_memory"):
            wb.load(path, offload="disk", max_memory=bad)
    with pytest.raises(ValueError, match="offload='ram'"):
        wb.load(path, offload="ram")
    with pytest.raises(ValueError, match="needs offload='disk'"):
        wb.load(path, max_memory="1GB")
