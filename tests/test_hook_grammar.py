"""The hook-name grammar of workbench.hooks: parse, layer_of, relative, absolute, seq_axis."""

from __future__ import annotations

import random

import numpy as np
import pytest

from workbench.checkpoint import expected_shapes
from workbench.config import ModelConfig
from workbench.hooks import (
    BLOCKS,
    LAYER_SITES,
    TOP_LEVEL,
    HookError,
    HookName,
    absolute,
    hook_dtype,
    hook_names,
    layer_of,
    parse,
    relative,
    seq_axis,
)

TINY = ModelConfig.tiny()  # 4 MoE layers
# Maverick-like: MoE on every other layer, dense (mlp) layers between
MAVERICK_LIKE = ModelConfig.tiny_maverick(num_hidden_layers=6)
CONFIGS = {"tiny": TINY, "maverick-like": MAVERICK_LIKE,
           "maverick": ModelConfig.maverick()}  # 48 layers, the real interleaving


def test_maverick_like_config_is_interleaved():
    assert MAVERICK_LIKE.moe_layers == [1, 3, 5] and MAVERICK_LIKE.dense_layers == [0, 2, 4]
    names = hook_names(MAVERICK_LIKE)
    assert "layers.0.mlp.out" in names and "layers.0.moe.router_logits" not in names
    assert "layers.1.moe.router_logits" in names and "layers.1.mlp.out" not in names


@pytest.mark.parametrize("which", list(CONFIGS))
def test_every_hook_name_round_trips(which):
    cfg = CONFIGS[which]
    names = hook_names(cfg)
    assert len(names) == len(set(names))
    for name in names:
        h = parse(name)
        assert isinstance(h, HookName) and h.name == name
        assert layer_of(name) == h.layer
        if h.layer is None:
            assert name in TOP_LEVEL and h.block is None and h.site == name
            assert relative(name) == name
            continue
        assert 0 <= h.layer < cfg.num_hidden_layers
        rel = relative(name)
        assert rel == h.relative
        assert absolute(h.layer, rel) == name
        if h.block is None:
            assert h.site in LAYER_SITES and rel == h.site
        else:
            assert h.block in BLOCKS and h.site in BLOCKS[h.block]
            assert rel == f"{h.block}.{h.site}"
            if h.block != "attn":
                assert h.block == ("moe" if cfg.is_moe(h.layer) else "mlp")


@pytest.mark.parametrize("which", list(CONFIGS))
def test_hook_names_follow_the_grammar_in_forward_order(which):
    """Each layer: resid_pre, attn.*, resid_mid, moe.* or mlp.out, resid_post."""
    cfg = CONFIGS[which]
    names = hook_names(cfg)
    assert names[0] == "embed" and names[-2:] == ["final_norm", "logits"]
    for i in range(cfg.num_hidden_layers):
        rels = [relative(n) for n in names if layer_of(n) == i]
        ffn = ["moe." + h for h in BLOCKS["moe"]] if cfg.is_moe(i) else ["mlp.out"]
        assert rels == ["resid_pre", *("attn." + h for h in BLOCKS["attn"]), "resid_mid",
                        *ffn, "resid_post"]


def test_parse_examples():
    assert parse("layers.3.attn.q") == HookName("layers.3.attn.q", 3, "attn", "q")
    assert parse("layers.12.moe.router_logits") == \
        HookName("layers.12.moe.router_logits", 12, "moe", "router_logits")
    assert parse("layers.0.resid_pre") == HookName("layers.0.resid_pre", 0, None, "resid_pre")
    assert parse("layers.2.mlp.out") == HookName("layers.2.mlp.out", 2, "mlp", "out")
    for top in ("embed", "final_norm", "logits"):
        assert parse(top) == HookName(top, None, None, top)
    # the grammar, not a model: any layer index and any block parse
    assert parse("layers.999.mlp.out").layer == 999


@pytest.mark.parametrize("bad, says", [
    ("", "neither a top-level name"),
    ("embeds", "neither a top-level name"),
    ("Logits", "neither a top-level name"),
    ("layers.3", "neither a top-level name"),
    ("layers.x.attn.q", "neither a top-level name"),
    ("layers.-1.attn.q", "neither a top-level name"),
    ("layers.03.attn.q", "without leading zeros"),
    ("layers.3.", "'' is not a site of a layer"),
    ("layers.3.attn", "'attn' is not a site of a layer"),
    ("layers.3.resid", "'resid' is not a site of a layer"),
    ("layers.3.ffn.out", "'ffn.out' is not a site of a layer"),
    ("layers.3.attn.o", "'o' is not a leaf of the attn block"),
    ("layers.3.attn.q.x", "'q.x' is not a leaf of the attn block"),
    ("layers.3.moe.router_logit", "'router_logit' is not a leaf of the moe block"),
    ("layers.3.mlp.router_logits", "'router_logits' is not a leaf of the mlp block"),
    ("layers.3.moe.*", "'*' is not a leaf of the moe block"),
    ("*.moe.*", "neither a top-level name"),
    (" layers.3.attn.q", "neither a top-level name"),
    ("layers.3.attn.q ", "'q ' is not a leaf"),
    ("model.layers.3.attn.q", "neither a top-level name"),
    ("layers.3.self_attn.q_proj.weight", "'self_attn.q_proj.weight' is not a site"),
])
def test_bad_names_raise_hook_error(bad, says):
    with pytest.raises(HookError) as e:
        parse(bad)
    msg = str(e.value)
    assert repr(bad) in msg and says in msg
    assert "hook names are embed | final_norm | logits | layers.{i}." in msg
    assert isinstance(e.value, KeyError)  # HookError is a KeyError (mapping-style lookups)


@pytest.mark.parametrize("bad", [None, 3, b"embed", ("layers", 0)])
def test_parse_rejects_non_strings(bad):
    with pytest.raises(HookError, match="hook names are strings"):
        parse(bad)


def test_layer_of_on_tensor_names():
    names = expected_shapes(MAVERICK_LIKE)
    for name in names:
        want = int(name.split(".")[1]) if name.startswith("layers.") else None
        assert layer_of(name) == want, name
    assert layer_of("layers.7.feed_forward.experts.gate_up_proj") == 7
    assert layer_of("layers.10.self_attn.q_proj.weight") == 10
    for other in ("embed_tokens.weight", "norm.weight", "lm_head.weight", "logits", "",
                  "model.layers.3.mlp.down_proj.weight", "layers.3", "layers.x.attn.q",
                  "layers.03.attn.q", "layers..attn", "xlayers.3.attn.q", "layers.٣.attn.q"):
        assert layer_of(other) is None, other
    for not_a_string in (None, 3, b"layers.3.x"):
        assert layer_of(not_a_string) is None


def test_relative_and_absolute():
    assert relative("layers.3.attn.q") == "attn.q"
    assert relative("layers.3.resid_post") == "resid_post"
    assert relative("logits") == "logits"
    assert relative("layers.3.self_attn.q_proj.weight") == "self_attn.q_proj.weight"
    assert absolute(3, "attn.q") == "layers.3.attn.q"
    assert absolute(np.int64(2), "moe.*") == "layers.2.moe.*"  # globs are fine
    for bad in (-1, 1.0, True, "3", None):
        with pytest.raises(ValueError, match="non-negative integer"):
            absolute(bad, "attn.q")


def test_seq_axis():
    for leaf in ("q", "k", "v", "pattern"):
        assert seq_axis(f"layers.1.attn.{leaf}") == 2
    for name in ("layers.1.attn.out", "layers.1.resid_pre", "layers.1.resid_mid",
                 "layers.1.resid_post", "layers.1.moe.router_logits", "layers.1.moe.topk_indices",
                 "layers.1.moe.routed_out", "layers.0.mlp.out", "embed", "final_norm", "logits"):
        assert seq_axis(name) == 1, name
    for name in hook_names(MAVERICK_LIKE):  # agrees with the shapes' layout
        h = parse(name)
        assert seq_axis(name) == (2 if h.block == "attn" and h.site != "out" else 1)
    with pytest.raises(HookError):
        seq_axis("layers.1.attn.o")


def test_seq_axis_and_dtype_take_layer_relative_names():
    """A per-layer step emits names without the "layers.{i}." prefix."""
    for name in hook_names(MAVERICK_LIKE):
        assert seq_axis(relative(name)) == seq_axis(name), name
        assert hook_dtype(relative(name), np.float32) == hook_dtype(name, np.float32), name
    for bad in ("attn.o", "moe", "layers.3", "q", "mlp.out.x"):
        with pytest.raises(HookError, match="nor is it a layer-relative name"):
            seq_axis(bad)
    with pytest.raises(HookError, match="'o' is not a leaf of the attn block"):
        seq_axis("layers.1.attn.o")  # a layer-prefixed name is not retried as relative


def test_hook_dtype():
    f16 = np.dtype("float16")
    assert hook_dtype("layers.1.moe.topk_indices", f16) == np.int32
    assert hook_dtype("layers.1.moe.topk_scores", f16) == f16
    assert hook_dtype("logits", np.float32) == np.float32
    with pytest.raises(HookError):
        hook_dtype("layers.1.moe.topk_index", np.float32)


def _random_valid_name(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return rng.choice(TOP_LEVEL)
    layer = rng.choice([0, 1, 9, 10, 47, rng.randint(0, 10**6)])
    if kind == 1:
        return absolute(layer, rng.choice(LAYER_SITES))
    block = rng.choice(list(BLOCKS))
    return absolute(layer, f"{block}.{rng.choice(BLOCKS[block])}")


def _mutate(name: str, rng: random.Random) -> str:
    alphabet = "layers.0123456789_abcdemoqkvtp*-. ٣"
    i = rng.randrange(len(name) + 1)
    op = rng.randrange(3)
    if op == 0:
        return name[:i] + rng.choice(alphabet) + name[i:]
    if op == 1:
        return name[:i] + name[i + 1:]
    return name[:i] + rng.choice(alphabet) + name[i + 1:]


def test_random_names_round_trip_and_mutants_fail_cleanly():
    """Fuzz: valid names round-trip; one-character mutants either still follow the grammar
    (and round-trip) or raise HookError naming the string, never another exception."""
    rng = random.Random(0)
    parsed = failed = 0
    for _ in range(5000):
        name = _random_valid_name(rng)
        if rng.random() < 0.5:
            name = _mutate(name, rng)
        try:
            h = parse(name)
        except HookError as e:
            assert repr(name) in str(e)
            assert layer_of(name) is None or name.startswith("layers.")
            failed += 1
            continue
        parsed += 1
        assert h.name == name and layer_of(name) == h.layer
        if h.layer is None:
            assert name in TOP_LEVEL and relative(name) == name
        else:
            assert absolute(h.layer, relative(name)) == name == absolute(h.layer, h.relative)
        assert seq_axis(name) in (1, 2)
    assert parsed > 2500 and failed > 1000
