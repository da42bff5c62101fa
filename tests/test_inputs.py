"""Tests for input validation through the torch backend: token ids, hooks, interventions, load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_ckpt import raises_with

import workbench as wb
from workbench.config import ModelConfig
from workbench.hooks import HookError
from workbench.interventions import InterventionError
from workbench.model import InputError
from workbench.random_weights import write_random_checkpoint

MAX_POS = 16
CFG = ModelConfig.tiny(max_position_embeddings=MAX_POS)  # vocab 512, 4 layers, 8 experts
V = CFG.vocab_size


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), CFG, seed=0)


@pytest.fixture(scope="module")
def model(ckpt):
    return wb.load(ckpt, backend="torch")


@pytest.fixture(scope="module")
def maverick(tmp_path_factory):
    """Interleaved dense/MoE layers (MoE at 1 and 3)."""
    d = write_random_checkpoint(tmp_path_factory.mktemp("tiny_mav"), ModelConfig.tiny_maverick())
    return wb.load(d)


# ----------------------------------------------------------------------------- token ids


def test_valid_input_runs(model):
    out = model.run(np.array([[1, 2, 3], [4, 5, V - 1]]))
    assert out.logits.shape == (2, 3, V) and out.logits.dtype == np.float32
    assert np.isfinite(out.logits).all()


def test_out_of_range_id_names_id_and_position(model):
    ids = np.array([[1, 2, 3, 4], [5, 6, V, 7]])
    raises_with(InputError, lambda: model.run(ids), str(V), "batch 1", "position 2",
                f"[0, {V})")


def test_negative_id(model):
    raises_with(InputError, lambda: model.run([[1, 2, -1]]), "-1", "position 2")


def test_counts_every_bad_id(model):
    raises_with(InputError, lambda: model.run([[V, 1, V + 5, -3]]), "3 id(s)")


@pytest.mark.parametrize("ids", [[], [[]], np.zeros((2, 0), np.int64), np.zeros((0, 3), int)],
                         ids=["list", "nested", "no_positions", "no_batch"])
def test_empty_input(model, ids):
    raises_with(InputError, lambda: model.run(ids), "empty")


@pytest.mark.parametrize("shape", [(1, 2, 3), (2, 1, 1, 4)])
def test_rank3_or_more(model, shape):
    raises_with(InputError, lambda: model.run(np.ones(shape, np.int64)), "(batch, seq)",
                str(shape))


def test_scalar_input(model):
    raises_with(InputError, lambda: model.run(np.int64(5)), "(batch, seq)")


@pytest.mark.parametrize("ids", [np.array([[1.5, 2.0]]), np.array([[1.0, np.nan]]),
                                 np.array([[0.25]], np.float32)], ids=["half", "nan", "f32"])
def test_float_ids(model, ids):
    raises_with(InputError, lambda: model.run(ids), "integer")


@pytest.mark.parametrize("ids", [np.array([[True, False]]), np.array([["1", "2"]]),
                                 [[1, 2], [3]], [[1, "a"]], np.array([[1 + 2j]])],
                         ids=["bool", "str", "ragged", "mixed", "complex"])
def test_non_integer_ids(model, ids):
    with pytest.raises(InputError):
        model.run(ids)


def test_sequence_longer_than_max_position_embeddings(model):
    model.run(np.ones((1, MAX_POS), np.int64))  # exactly the limit is fine
    raises_with(InputError, lambda: model.run(np.ones((2, MAX_POS + 1), np.int64)),
                str(MAX_POS + 1), f"max_position_embeddings={MAX_POS}")


def test_generation_longer_than_max_position_embeddings(model):
    raises_with(InputError, lambda: model.generate([[1, 2, 3]], MAX_POS), "max_position_embeddings")


def test_one_dimensional_input_is_batch_one(model):
    ids = [3, 1, 4, 1, 5]
    a = model.run(np.array(ids)).logits
    b = model.run(np.array([ids])).logits
    assert a.shape == (1, 5, V)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.run(ids).logits, b)
    np.testing.assert_array_equal(model.run(torch.tensor([ids])).logits, b)
    assert model.run(tuple(ids)).trace.input_ids.shape == (1, 5)


def test_check_ids_normalises(model):
    for ids in ([1, 2], np.array([[1, 2]], np.int32), np.array([[1, 2]], np.uint8),
                torch.tensor([1, 2])):
        out = model.check_ids(ids)
        assert out.dtype == np.int64 and out.shape == (1, 2)
        assert out.tolist() == [[1, 2]]


def test_bad_input_does_not_poison_the_model(model):
    ref = model.run([[1, 2, 3]]).logits
    with pytest.raises(InputError):
        model.run([[1, 2, V]])
    np.testing.assert_array_equal(model.run([[1, 2, 3]]).logits, ref)


# ----------------------------------------------------------------------------- hooks


@pytest.mark.parametrize("pattern, closest", [
    ("layers.0.moe.router_logit", "layers.0.moe.router_logits"),
    ("layers.1.attn.patern", "layers.1.attn.pattern"),
    ("layers.9.resid_post", "resid_post"),
])
def test_unknown_hook_pattern_lists_closest_names(model, pattern, closest):
    msg = raises_with(HookError, lambda: model.run([[1, 2]], capture=[pattern]), pattern,
                      closest)
    assert "closest" in msg or "did you mean" in msg
    with pytest.raises(KeyError):  # HookError is a KeyError (mapping-style lookups)
        model.run([[1, 2]], capture=pattern)


def test_glob_that_matches_nothing(model):
    raises_with(HookError, lambda: model.run([[1, 2]], capture="*.moe.nothing"), "*.moe.nothing")


def test_capture_must_be_strings(model):
    with pytest.raises(HookError):
        model.run([[1, 2]], capture=[3])


def test_mlp_hook_on_moe_only_model(model):
    """The tiny model has no dense layer, so no mlp.out hook."""
    raises_with(HookError, lambda: model.run([[1, 2]], capture="layers.0.mlp.out"),
                "layers.0.mlp.out")


# ----------------------------------------------------------------------------- interventions


@pytest.mark.parametrize("iv", ["ban_expert", object(), {"layer": 0, "expert": 1}, None, 3],
                         ids=["string", "object", "dict", "none", "int"])
def test_unknown_intervention_object(model, iv):
    raises_with(InterventionError, lambda: model.run([[1, 2]], interventions=[iv]),
                "unknown intervention")


def test_bare_intervention_not_in_a_list(model):
    """A single intervention passed without a list: either accepted as [iv] or refused clearly."""
    iv = wb.ban_expert(layer=0, expert=1)
    try:
        out = model.run([[1, 2, 3]], interventions=iv)
    except InterventionError:
        return
    np.testing.assert_array_equal(out.logits, model.run([[1, 2, 3]], interventions=[iv]).logits)


BAD_INTERVENTIONS = {
    "ban_layer": (wb.ban_expert(layer=4, expert=0), ("layer 4", "4 layers")),
    "ban_negative_layer": (wb.ban_expert(layer=-1, expert=0), ("layer -1",)),
    "ban_expert": (wb.ban_expert(layer=0, expert=8), ("expert 8", "num_local_experts=8")),
    "zero_expert": (wb.zero_expert(layer=1, expert=-1), ("expert -1",)),
    "force_expert": (wb.force_expert(layer=2, expert=99), ("expert 99",)),
    "force_positions": (wb.force_expert(layer=0, expert=1, positions=[3]), ("positions [3]",
                                                                           "length 3")),
    "ablate_head": (wb.ablate_head(layer=0, head=4), ("head 4", "num_attention_heads=4")),
    "ablate_layer": (wb.ablate_head(layer=7, head=0), ("layer 7",)),
    "top_k_zero": (wb.set_top_k(0), ("k=0",)),
    "top_k_above_experts": (wb.set_top_k(9, layer=1), ("k=9",)),
    "top_k_layer": (wb.set_top_k(2, layer=5), ("layer 5",)),
    "patch_name": (wb.patch("layers.0.resid_prex", 0.0), ("layers.0.resid_prex",
                                                           "layers.0.resid_pre")),
    "patch_shape": (wb.patch("layers.0.resid_pre", np.zeros((2, 2))), ("(2, 2)", "(1, 3, 64)")),
    "patch_topk_index": (wb.patch("layers.0.moe.topk_indices", 8), ("topk_indices", "0..7")),
}


@pytest.mark.parametrize("case", sorted(BAD_INTERVENTIONS))
def test_bad_intervention(model, case):
    iv, fragments = BAD_INTERVENTIONS[case]
    raises_with(InterventionError, lambda: model.run([[1, 2, 3]], interventions=[iv]),
                *fragments)


def test_expert_intervention_on_dense_layer(maverick):
    for iv in (wb.ban_expert(layer=0, expert=0), wb.zero_expert(layer=2, expert=1),
               wb.force_expert(layer=0, expert=1), wb.set_top_k(2, layer=2)):
        raises_with(InterventionError, lambda iv=iv: maverick.run([[1, 2]], interventions=[iv]),
                    "dense", "[1, 3]")
    maverick.run([[1, 2]], interventions=[wb.ban_expert(layer=1, expert=15)])  # MoE: fine


def test_bad_hook_function(model):
    raises_with(InterventionError, lambda: model.run([[1, 2]], hooks={"layers.0.nope": abs}),
                "layers.0.nope")
    raises_with(InterventionError, lambda: model.run([[1, 2]], hooks={"embed": 3}), "embed",
                "callable")


# ----------------------------------------------------------------------------- load


def test_unknown_backend(ckpt):
    raises_with(ValueError, lambda: wb.load(ckpt, backend="tensorflow"), "tensorflow", "torch",
                "jax")


@pytest.mark.parametrize("dtype", ["int8", "float64", "fp32"])
def test_unsupported_dtype(ckpt, dtype):
    raises_with(ValueError, lambda: wb.load(ckpt, dtype=dtype), repr(dtype), "float32",
                "bfloat16")


def test_load_of_missing_checkpoint(tmp_path):
    with pytest.raises((FileNotFoundError, wb.CheckpointError)):
        wb.load(tmp_path / "nothing")
