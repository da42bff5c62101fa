"""Analyses of a padded batch equal the same analyses of its rows run alone: pads (whatever
routing they carry) are left out of every per-token and per-position result, for right and left
padding. Synthetic traces, no model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import workbench as wb
from workbench import analysis as an

E, K, T, D = 8, 2, 15, 4
LAYERS = [1, 3]  # Maverick-like: MoE on odd layers only
LENGTHS = [9, 12, 15]  # row 0 right-padded, row 1 left-padded, row 2 full


def _row_arrays(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for i in LAYERS:
        # runs of repeated experts, so same-expert rates and run lengths are not trivial
        first = np.repeat(rng.integers(0, E, n), 2)[:n]
        second = (first + 1 + rng.integers(0, E - 1, n)) % E
        out[f"layers.{i}.moe.topk_indices"] = np.stack([first, second], -1).astype(np.int32)
        out[f"layers.{i}.moe.router_logits"] = rng.normal(size=(n, E)).astype(np.float32)
        out[f"layers.{i}.moe.topk_scores"] = rng.uniform(size=(n, K)).astype(np.float32)
        out[f"layers.{i}.moe.routed_out"] = rng.normal(size=(n, D)).astype(np.float32)
        out[f"layers.{i}.moe.shared_out"] = rng.normal(size=(n, D)).astype(np.float32)
    out["token_modality"] = (rng.uniform(size=n) < 0.4).astype(np.int8)
    return out


@pytest.fixture(scope="module")
def traces() -> tuple[wb.Trace, list[wb.Trace]]:
    """(the padded batch, its three rows as traces of their own)."""
    rng = np.random.default_rng(0)
    meta = {"config": {"experts": E}}
    ids = [rng.integers(3, 12, n) for n in LENGTHS]  # few ids: they repeat
    per = [_row_arrays(rng, n) for n in LENGTHS]
    alone = [wb.Trace({k: v[None] for k, v in a.items()}, i[None], meta)
             for a, i in zip(per, ids)]
    mask = np.zeros((3, T), bool)
    mask[0, :LENGTHS[0]] = True
    mask[1, T - LENGTHS[1]:] = True
    mask[2] = True
    padded_ids = rng.integers(0, 3, (3, T))  # pad ids: junk
    padded = {}
    for k in per[0]:
        # junk at pads: expert 0 everywhere, huge values, modality "image"
        junk = np.zeros((3, T, *per[0][k].shape[1:]), per[0][k].dtype) + (
            0 if k.endswith("topk_indices") else 1)
        if "router_logits" in k or "_out" in k:
            junk[...] = 50
        padded[k] = junk
        for b in range(3):
            padded[k][b, mask[b]] = per[b][k]
    for b in range(3):
        padded_ids[b, mask[b]] = ids[b]
    return wb.Trace(padded, padded_ids, meta, attention_mask=mask), alone


def _same(x, y) -> None:
    if dataclasses.is_dataclass(x):
        x, y = dataclasses.asdict(x), dataclasses.asdict(y)
    if isinstance(x, dict):
        assert x.keys() == y.keys()
        for k in x:
            _same(x[k], y[k])
    elif isinstance(x, list | tuple):
        assert len(x) == len(y)
        for a, b in zip(x, y):
            _same(a, b)
    else:
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("fn", [
    an.same_expert_rate, an.run_lengths, an.run_length_histogram, an.expert_counts,
    an.gate_values, an.logit_margin, an.routing_entropy, an.confidence_summary,
    an.capacity_drops, an.shared_routed_ratio, an.vocabulary_specialisation,
    lambda t, i: an.load_by_position(t, i, bins=4), an.load_by_frequency,
    lambda t, i: an.routing_by_position(t, [0, 4, 8, 16], layers=[i]),
    lambda t, i: an.vocabulary_estimate(t, i, n_boot=20, n_shuffle=20),
    lambda t, i: an.category_nmi_estimate(
        t, i, [np.asarray(x.input_ids) % 2 for x in t] if isinstance(t, list)
        else np.asarray(t.input_ids) % 2, n_boot=20, n_shuffle=20),
], ids=lambda f: getattr(f, "__name__", "fn"))
@pytest.mark.parametrize("layer", LAYERS)
def test_per_token_analyses_leave_pads_out(traces, fn, layer):
    padded, alone = traces
    _same(fn(padded, layer), fn(alone, layer))


def test_cross_layer_analyses_leave_pads_out(traces):
    padded, alone = traces
    a, b = LAYERS
    for fn in (an.transition_counts, an.transition_matrix, an.conditional_entropy,
               an.layer_nmi, an.next_layer_predictability):
        _same(fn(padded, a, b), fn(alone, a, b))
    _same(an.expert_paths(padded), an.expert_paths(alone))
    _same(an.path_entropy(padded), an.path_entropy(alone))
    path = an.expert_paths(alone, top=1)[0][0]
    got = an.path_tokens(padded, path)
    assert got.size and np.array_equal(got, an.path_tokens(alone, path))
    _same(an.cross_layer_table(padded), an.cross_layer_table(alone))


def test_modality_and_diff_leave_pads_out(traces):
    padded, alone = traces
    _same(an.modality_labels(padded), an.modality_labels(alone))
    _same(an.modality_specialisation(padded), an.modality_specialisation(alone))
    full = alone[2]  # unpadded (T tokens): three copies make a batch to diff row by row
    other = wb.Trace({k: np.repeat(v, 3, axis=0) for k, v in full.items()},
                     np.repeat(full.input_ids, 3, axis=0), full.meta)
    for b in range(3):
        _same(an.routing_diff(padded, other, batch=b), an.routing_diff(alone[b], full))
        _same(an.routing_diff(other, padded, batch=b), an.routing_diff(full, alone[b]))


def test_padded_analyses_differ_from_counting_pads(traces):
    """The junk routing at pads would change the results: the equalities above are not
    vacuous."""
    padded, _ = traces
    full = wb.Trace(dict(padded), padded.input_ids, padded.meta)  # same arrays, no mask
    layer = LAYERS[0]
    assert an.same_expert_rate(full, layer) != an.same_expert_rate(padded, layer)
    assert an.run_lengths(full, layer).sum() == padded.input_ids.size
    assert an.run_lengths(padded, layer).sum() == sum(LENGTHS)
    assert an.capacity_drops(full, layer).drop_rate != an.capacity_drops(padded, layer).drop_rate
