"""Tests for workbench.config: HF config.json round trips, legacy forms, presets, validation."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from helpers_ckpt import SCOUT_VISION, TINY_VISION, meta_model, numel, raises_with

from workbench.config import ConfigError, ModelConfig, human_count

# Our fields that are not plain Llama4TextConfig attributes (compared separately).
NOT_HF = ("multimodal", "extra", "rope_theta", "rope_scaling")
FIELDS = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in NOT_HF]

# Text configs written by transformers itself (keyword arguments of Llama4TextConfig).
HF_TEXT_CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "maverick_like": dict(
        num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
        max_position_embeddings=1048576, bos_token_id=200000,
        eos_token_id=[200001, 200007, 200008], pad_token_id=200018),
    "custom": dict(
        vocab_size=1000, hidden_size=96, intermediate_size=48, intermediate_size_mlp=80,
        num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=3, head_dim=16,
        max_position_embeddings=2048, rms_norm_eps=1e-6, pad_token_id=7, bos_token_id=3,
        eos_token_id=[4, 5], num_experts_per_tok=2, num_local_experts=4,
        interleave_moe_layer_step=3, use_qk_norm=False, router_aux_loss_coef=0.01,
        no_rope_layer_interval=3, attention_chunk_size=32, attn_temperature_tuning=False,
        floor_scale=16, attn_scale=0.2, initializer_range=0.05,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64}),
    "no_chunk_tied": dict(
        vocab_size=300, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, attention_chunk_size=None, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=1, moe_layers=[1],
        rope_parameters={"rope_type": "default", "rope_theta": 12345.0}),
}


def assert_same_as_hf(ours: ModelConfig, hf) -> None:
    """Every ModelConfig field equals the transformers config's value."""
    diffs = {n: (getattr(ours, n), getattr(hf, n)) for n in FIELDS
             if getattr(ours, n) != getattr(hf, n)}
    assert not diffs, f"fields differ (ours, transformers): {diffs}"
    rp = dict(hf.rope_parameters)
    assert ours.rope_theta == rp.pop("rope_theta")
    assert ours.rope_type == rp.pop("rope_type")
    rp.pop("type", None)
    if ours.rope_type == "default":
        assert ours.rope_scaling is None
    else:
        assert {k: v for k, v in ours.rope_scaling.items() if k not in ("rope_type", "type")} \
            == rp


def text_base(**changes: Any) -> dict[str, Any]:
    """The tiny config's 5.x text dict without the derived layer lists, plus changes."""
    d = ModelConfig.tiny().to_text_dict()
    for k in ("moe_layers", "no_rope_layers", "layer_types"):
        d.pop(k)
    d.update(changes)
    return d


# ----------------------------------------------------------------------------- HF round trips


def test_every_llama4_text_field_is_a_modelconfig_field():
    from transformers import Llama4TextConfig, PretrainedConfig
    specific = set(Llama4TextConfig().to_dict()) - set(PretrainedConfig().to_dict())
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert specific - fields == {"rope_parameters"}


@pytest.mark.parametrize("case", sorted(HF_TEXT_CASES))
def test_text_config_written_by_transformers(tmp_path, case):
    from transformers import Llama4TextConfig
    hf = Llama4TextConfig(**copy.deepcopy(HF_TEXT_CASES[case]))
    hf.to_json_file(tmp_path / "config.json")
    ours = ModelConfig.from_pretrained(tmp_path)
    assert not ours.multimodal
    assert_same_as_hf(ours, hf)
    # the file path form reads the same
    assert ModelConfig.from_pretrained(tmp_path / "config.json") == ours


@pytest.mark.parametrize("case", ["defaults", "custom"])
def test_multimodal_config_written_by_transformers(tmp_path, case):
    from transformers import Llama4Config, Llama4TextConfig, Llama4VisionConfig
    tc = Llama4TextConfig(**copy.deepcopy(HF_TEXT_CASES[case]))
    full = Llama4Config(text_config=tc.to_dict(), vision_config=Llama4VisionConfig(
        **TINY_VISION).to_dict(), image_token_index=900, boi_token_index=901,
        eoi_token_index=902)
    full.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    ours = ModelConfig.from_pretrained(tmp_path)
    assert ours.multimodal
    assert_same_as_hf(ours, full.text_config)
    assert ours.extra["vision_config"] == written["vision_config"]
    for key in ("image_token_index", "boi_token_index", "eoi_token_index"):
        assert ours.extra[key] == written[key]


@pytest.mark.parametrize("preset", ["tiny", "tiny_maverick", "scout", "maverick"])
@pytest.mark.parametrize("multimodal", [False, True])
def test_our_config_json_read_by_transformers(tmp_path, preset, multimodal):
    from transformers import AutoConfig, Llama4Config, Llama4TextConfig
    cfg = getattr(ModelConfig, preset)().replace(multimodal=multimodal)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    hf = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(hf, Llama4Config if multimodal else Llama4TextConfig)
    assert_same_as_hf(cfg, hf.text_config if multimodal else hf)
    back = ModelConfig.from_pretrained(tmp_path)
    assert back.multimodal == multimodal
    for name in FIELDS + ["rope_theta", "rope_scaling"]:
        assert getattr(back, name) == getattr(cfg, name), name


# ----------------------------------------------------------------------------- legacy forms


def legacy_text(type_key: str) -> dict[str, Any]:
    """A 4.x-era text config: rope_theta + rope_scaling, int temperature tuning, [] NoPE list."""
    return {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96,
        "intermediate_size_mlp": 160, "num_hidden_layers": 8, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 8,
        "interleave_moe_layer_step": 2, "attention_chunk_size": 8,
        "max_position_embeddings": 4096, "rope_theta": 250000.0,
        "rope_scaling": {type_key: "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        "attn_temperature_tuning": 4, "no_rope_layers": [], "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "bfloat16",
    }


@pytest.mark.parametrize("type_key", ["type", "rope_type"])
@pytest.mark.parametrize("wrapped", [False, True])
def test_legacy_rope_scaling_and_int_temperature_tuning(tmp_path, type_key, wrapped):
    from transformers import AutoConfig
    text = legacy_text(type_key)
    raw = text if not wrapped else {
        "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
        "text_config": text, "vision_config": dict(TINY_VISION), "image_token_index": 500,
        "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = ModelConfig.from_pretrained(tmp_path)
    assert ours.multimodal == wrapped
    assert ours.rope_theta == 250000.0
    assert ours.rope_type == "llama3"
    assert ours.rope_scaling["factor"] == 16.0
    assert ours.rope_scaling["high_freq_factor"] == 4.0
    assert ours.rope_scaling["original_max_position_embeddings"] == 32
    assert ours.attn_temperature_tuning is True
    assert ours.no_rope_layers == [1, 1, 1, 0, 1, 1, 1, 0]
    assert ours.moe_layers == [1, 3, 5, 7]
    assert ours.extra.get("torch_dtype") == "bfloat16"
    # transformers 5.x reads the same file (it wants a bool for the temperature flag)
    text["attn_temperature_tuning"] = True
    (tmp_path / "config.json").write_text(json.dumps(raw))
    hf = AutoConfig.from_pretrained(tmp_path)
    assert_same_as_hf(ours, hf.text_config if wrapped else hf)


@pytest.mark.parametrize("value, expected", [(4, True), (1, True), (0, False), (True, True),
                                             (False, False)])
def test_attn_temperature_tuning_stored_as_int(value, expected):
    cfg = ModelConfig.from_dict(text_base(attn_temperature_tuning=value))
    assert cfg.attn_temperature_tuning is expected
    assert cfg.uses_temperature(3) is expected
    assert cfg.to_text_dict()["attn_temperature_tuning"] is expected


@pytest.mark.parametrize("scaling", [None, {"type": "default"}, {"rope_type": "default"}])
def test_legacy_default_rope(scaling):
    d = text_base(rope_theta=1234.0, rope_scaling=scaling)
    d.pop("rope_parameters")
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_scaling is None and cfg.rope_type == "default" and cfg.rope_theta == 1234.0
    assert cfg.to_text_dict()["rope_parameters"] == {"rope_type": "default", "rope_theta": 1234.0}


def test_legacy_input_dict_not_mutated():
    raw = legacy_text("type")
    before = copy.deepcopy(raw)
    ModelConfig.from_dict(raw)
    assert raw == before


def test_released_scout_config_json_reads_as_scout_preset(tmp_path):
    """The shape of Llama-4-Scout-17B-16E-Instruct's config.json (legacy 4.51 form)."""
    text = {
        "attention_bias": False, "attention_chunk_size": 8192, "attention_dropout": 0.0,
        "attn_scale": 0.1, "attn_temperature_tuning": 4, "bos_token_id": 200000,
        "eos_token_id": [200001, 200007, 200008], "floor_scale": 8192, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
        "interleave_moe_layer_step": 1, "intermediate_size": 8192,
        "intermediate_size_mlp": 16384, "max_position_embeddings": 10485760,
        "model_type": "llama4_text", "no_rope_layers": [], "num_attention_heads": 40,
        "num_experts_per_tok": 1, "num_hidden_layers": 48, "num_key_value_heads": 8,
        "num_local_experts": 16, "output_router_logits": False, "pad_token_id": 200018,
        "rms_norm_eps": 1e-05, "rope_scaling": {
            "factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
        "torch_dtype": "bfloat16", "use_cache": True, "use_qk_norm": True, "vocab_size": 202048,
    }
    raw = {"architectures": ["Llama4ForConditionalGeneration"], "boi_token_index": 200080,
           "eoi_token_index": 200081, "image_token_index": 200092, "model_type": "llama4",
           "text_config": text, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "transformers_version": "4.51.0.dev0", "vision_config": dict(SCOUT_VISION)}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = ModelConfig.from_pretrained(tmp_path)
    scout = ModelConfig.scout()
    for name in FIELDS + ["rope_theta", "rope_scaling", "multimodal"]:
        assert getattr(ours, name) == getattr(scout, name), name
    assert human_count(ours.param_counts()["total_with_vision"]) == "108.64B"


# ----------------------------------------------------------------------------- presets, counts

EXPECTED_COUNTS = {  # billions, to 0.01B
    "scout": dict(total_with_vision=108.64, total=107.77, active=17.17),
    "maverick": dict(total_with_vision=401.58, total=400.71, active=17.18),
}


@pytest.mark.parametrize("preset", sorted(EXPECTED_COUNTS))
def test_preset_param_counts(preset):
    pc = getattr(ModelConfig, preset)().param_counts()
    for key, billions in EXPECTED_COUNTS[preset].items():
        assert abs(pc[key] / 1e9 - billions) < 0.006, (key, pc[key])
    assert pc["total_with_vision"] == pc["total"] + pc["vision"]


def hf_active(model, cfg: ModelConfig, prefix: str = "") -> int:
    """Active parameters of a transformers model: all but the unchosen routed experts."""
    experts = sum(p.numel() for n, p in model.named_parameters()
                  if n.startswith(prefix) and ".experts." in n)
    E, k = cfg.num_local_experts, cfg.num_experts_per_tok
    assert experts % E == 0
    return numel(model, prefix) - experts // E * (E - k)


COUNT_CASES = {
    "tiny": lambda: ModelConfig.tiny(),
    "tiny_maverick": lambda: ModelConfig.tiny_maverick(),
    "tiny_top2_tied": lambda: ModelConfig.tiny(num_experts_per_tok=2, tie_word_embeddings=True),
    "mini": lambda: ModelConfig.mini(),
    "scout": ModelConfig.scout,
    "maverick": ModelConfig.maverick,
}


@pytest.mark.parametrize("case", sorted(COUNT_CASES))
def test_param_counts_equal_transformers_on_meta(case):
    cfg = COUNT_CASES[case]()
    pc = cfg.param_counts()
    text = meta_model(cfg)
    assert pc["total"] == numel(text)
    assert pc["active"] == hf_active(text, cfg)
    assert pc["experts"] == sum(p.numel() for n, p in text.named_parameters()
                                if ".experts." in n)


@pytest.mark.parametrize("preset", ["scout", "maverick"])
def test_preset_counts_with_vision_equal_transformers_on_meta(preset):
    cfg = getattr(ModelConfig, preset)()
    pc = cfg.param_counts()
    full = meta_model(cfg, multimodal=True, vision=SCOUT_VISION)
    assert pc["total_with_vision"] == numel(full)
    assert pc["total"] == numel(full, ("language_model.",))
    assert pc["active"] == hf_active(full, cfg, "language_model.")


@pytest.mark.parametrize("vision", [
    TINY_VISION,
    dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
         image_size=56, patch_size=14, vision_output_dim=24, projector_input_dim=40,
         projector_output_dim=36, pixel_shuffle_ratio=0.5),
], ids=["tiny_vision", "unequal_projector_dims"])
def test_vision_count_equals_transformers_on_meta(vision):
    cfg = ModelConfig.tiny(multimodal=True, extra={"vision_config": dict(vision)})
    full = meta_model(cfg, multimodal=True, vision=vision)
    pc = cfg.param_counts()
    assert pc["vision"] == numel(full) - numel(full, ("language_model.",))
    assert pc["total_with_vision"] == numel(full)


def test_attention_bias_either_refused_or_counted():
    """attention_bias=True adds q/k/v/o biases in transformers; accepting it means counting it."""
    try:
        cfg = ModelConfig.tiny(attention_bias=True)
    except ConfigError as e:
        assert "attention_bias" in str(e)
        return
    assert cfg.param_counts()["total"] == numel(meta_model(cfg))


def test_human_count():
    assert human_count(108_641_793_536) == "108.64B"
    assert human_count(17_172_894_720) == "17.17B"
    assert human_count(999) == "999"


# ----------------------------------------------------------------------------- derived views


def test_maverick_derived_views():
    cfg = ModelConfig.maverick()
    assert cfg.moe_layers == list(range(1, 48, 2))
    assert cfg.dense_layers == list(range(0, 48, 2))
    assert cfg.nope_layers == list(range(3, 48, 4))
    assert cfg.num_local_experts == 128 and cfg.rope_type == "default"
    for i in range(48):
        nope = i % 4 == 3
        assert cfg.uses_rope(i) is not nope
        assert cfg.layer_types[i] == ("full_attention" if nope else "chunked_attention")
        assert cfg.chunk_size(i) == (None if nope else 8192)
        assert cfg.uses_temperature(i) is nope
        assert cfg.uses_qk_norm(i) is False
        assert cfg.is_moe(i) is (i % 2 == 1)
    lm = cfg.layer_map()
    assert len(lm) == 48
    assert lm[0].startswith("dense") and "RoPE chunk=8192" in lm[0]
    assert lm[3].startswith("MoE") and "NoPE global" in lm[3] and "temp-tuned" in lm[3]
    assert not any("qk-norm" in s for s in lm)


def test_scout_derived_views():
    cfg = ModelConfig.scout()
    assert cfg.moe_layers == list(range(48)) and cfg.dense_layers == []
    assert cfg.nope_layers == list(range(3, 48, 4))
    assert cfg.rope_type == "llama3" and cfg.multimodal
    assert [cfg.uses_qk_norm(i) for i in range(4)] == [True, True, True, False]
    assert cfg.layer_map()[0] == "MoE   RoPE chunk=8192 qk-norm"
    assert cfg.layer_map()[3] == "MoE   NoPE global temp-tuned"


@pytest.mark.parametrize("preset", ["scout", "maverick", "tiny", "tiny_maverick", "mini"])
def test_derived_layer_lists_equal_transformers(preset):
    from oracle import hf_text_config
    cfg = getattr(ModelConfig, preset)()
    d = cfg.to_text_dict()
    for k in ("moe_layers", "no_rope_layers", "layer_types"):
        d.pop(k)
    d.pop("model_type")
    from transformers import Llama4TextConfig
    hf = Llama4TextConfig(**d)  # transformers derives the lists itself
    assert cfg.moe_layers == hf.moe_layers
    assert cfg.no_rope_layers == hf.no_rope_layers
    assert cfg.layer_types == hf.layer_types
    assert hf_text_config(cfg).layer_types == cfg.layer_types


def test_null_chunk_size_makes_every_layer_global():
    cfg = ModelConfig.from_dict(text_base(attention_chunk_size=None))
    assert cfg.layer_types == ["full_attention"] * 4
    assert [cfg.chunk_size(i) for i in range(4)] == [None] * 4
    assert "global" in cfg.layer_map()[0]


def test_tiny_presets():
    t, m = ModelConfig.tiny(), ModelConfig.tiny_maverick()
    assert t.num_hidden_layers == 4 and t.nope_layers == [3] and t.moe_layers == [0, 1, 2, 3]
    assert m.moe_layers == [1, 3] and m.dense_layers == [0, 2] and not m.use_qk_norm
    assert m.rope_scaling is None and m.num_local_experts == 16
    mini = ModelConfig.mini(num_local_experts=64)
    assert (mini.hidden_size, mini.num_local_experts, mini.head_dim) == (1024, 64, 128)


# ----------------------------------------------------------------------------- contradictions

BAD_TEXT: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "kv_heads_do_not_divide": (dict(num_key_value_heads=3), ("num_key_value_heads",
                                                             "num_attention_heads")),
    "top_k_above_experts": (dict(num_experts_per_tok=9), ("num_experts_per_tok",
                                                          "num_local_experts")),
    "unknown_rope_type": (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                                "factor": 2.0}), ("yarn", "rope")),
    "unknown_legacy_rope_type": (dict(rope_parameters=None, rope_scaling={
        "type": "dynamic", "factor": 2.0}), ("dynamic", "rope")),
    "llama3_rope_missing_key": (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4,
                                                      "factor": 2.0}), ("low_freq_factor",)),
    "moe_layers_out_of_range": (dict(moe_layers=[0, 4]), ("moe_layers", "4")),
    "moe_layers_negative": (dict(moe_layers=[-1]), ("moe_layers",)),
    "chunked_layer_null_chunk": (dict(attention_chunk_size=None,
                                      layer_types=["chunked_attention"] * 4),
                                 ("layer_types", "attention_chunk_size")),
    "layer_types_unknown": (dict(layer_types=["sliding_attention"] * 4), ("layer_types",)),
    "layer_types_wrong_length": (dict(layer_types=["full_attention"] * 3), ("layer_types",)),
    "no_rope_layers_wrong_length": (dict(no_rope_layers=[1, 1, 0]), ("no_rope_layers",)),
    "bos_outside_vocab": (dict(bos_token_id=512), ("bos_token_id", "512")),
    "eos_outside_vocab": (dict(eos_token_id=[2, 600]), ("eos_token_id", "600")),
    "pad_negative": (dict(pad_token_id=-1), ("pad_token_id",)),
    "odd_head_dim": (dict(head_dim=15), ("head_dim",)),
    "not_silu": (dict(hidden_act="gelu"), ("hidden_act",)),
    "zero_chunk": (dict(attention_chunk_size=0), ("attention_chunk_size",)),
    "zero_vocab": (dict(vocab_size=0), ("vocab_size",)),
    "negative_rope_theta": (dict(rope_parameters={"rope_type": "default", "rope_theta": -1.0}),
                            ("rope_theta",)),
    "interleave_step_zero": (dict(interleave_moe_layer_step=0), ("interleave_moe_layer_step",)),
    "no_rope_interval_zero": (dict(no_rope_layer_interval=0), ("no_rope_layer_interval",)),
    "layers_as_string": (dict(num_hidden_layers="4"), ("num_hidden_layers",)),
    "layers_null": (dict(num_hidden_layers=None), ("num_hidden_layers",)),
    "other_model_type": (dict(model_type="llama"), ("model_type", "llama")),
}


@pytest.mark.parametrize("case", sorted(BAD_TEXT))
def test_contradiction_raises_config_error_naming_field(case):
    changes, fragments = BAD_TEXT[case]
    d = text_base(**changes)
    if d.get("rope_parameters") is None:
        d.pop("rope_parameters")
    raises_with(ConfigError, lambda: ModelConfig.from_dict(d), *fragments)


def test_error_from_file_names_the_file(tmp_path):
    f = tmp_path / "config.json"
    f.write_text(json.dumps(text_base(bos_token_id=512)))
    raises_with(ConfigError, lambda: ModelConfig.from_pretrained(tmp_path), str(f),
                "bos_token_id")


@pytest.mark.parametrize("raw", [
    {"model_type": "llama4"},
    {"model_type": "llama4", "text_config": None, "vision_config": {}},
    {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
     "text_config": "llama4_text"},
], ids=["absent", "null", "string"])
def test_wrapper_without_text_config(raw):
    raises_with(ConfigError, lambda: ModelConfig.from_dict(raw), "text_config")


def test_wrapper_of_another_model_is_refused():
    """A multimodal wrapper whose own model_type is not llama4 (e.g. a LLaVA config)."""
    raw = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
           "text_config": text_base()}
    raises_with(ConfigError, lambda: ModelConfig.from_dict(raw), "model_type", "llava")


def test_wrapper_with_foreign_text_model_type():
    raw = {"model_type": "llama4", "text_config": text_base(model_type="mistral")}
    raises_with(ConfigError, lambda: ModelConfig.from_dict(raw), "model_type", "mistral")


def test_invalid_json(tmp_path):
    f = tmp_path / "config.json"
    f.write_text('{"vocab_size": 512,, }')
    raises_with(ConfigError, lambda: ModelConfig.from_pretrained(tmp_path), str(f), "JSON")


def test_json_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2, 3]")
    raises_with(ConfigError, lambda: ModelConfig.from_pretrained(tmp_path), "JSON object")


def test_missing_config_file(tmp_path):
    raises_with(FileNotFoundError, lambda: ModelConfig.from_pretrained(tmp_path),
                str(tmp_path / "config.json"))
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_pretrained(tmp_path / "nowhere" / "config.json")


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ModelConfig.tiny(num_key_value_heads=3)
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        ModelConfig.tiny(num_experts_per_tok=9)


def test_from_pretrained_accepts_path_objects_and_strings(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig.tiny().to_hf_dict()))
    assert ModelConfig.from_pretrained(str(tmp_path)) == ModelConfig.from_pretrained(tmp_path)
