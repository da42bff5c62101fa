"""Widget logic without a browser: the explorers' state classes and their thin ipywidgets layer,
on a tiny random model (no tokenizer: text boxes take token ids)."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest

import workbench as wb

pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")

from workbench import widgets as W  # noqa: E402
from workbench.widgets._common import encode  # noqa: E402
from workbench.widgets.routing import _layer_slider  # noqa: E402


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from workbench.random_weights import write_random_checkpoint
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), wb.ModelConfig.tiny(),
                                   seed=0, std=0.08, router_std=0.5)


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return wb.load(tiny_path, backend="torch")


def png(fig) -> bytes:
    return W.figure_png(fig)


IDS = " ".join(str(i) for i in np.random.default_rng(1).integers(3, 512, 40))
LONG = " ".join(str(i) for i in np.random.default_rng(2).integers(3, 512, 30))


def test_import_needs_neither_torch_nor_jax():
    code = ("import sys, workbench.widgets; "
            "assert 'torch' not in sys.modules and 'jax' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_encode_without_tokenizer_checks_ids():
    assert encode(None, "1 2 3", 10, 8).tolist() == [[1, 2, 3]]
    with pytest.raises(ValueError, match="token ids"):
        encode(None, "hello world", 10, 8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        encode(None, "1 99", 10, 8)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        encode(None, "1", 10, 8)


def test_layer_slider_kinds():
    import ipywidgets as widgets
    assert isinstance(_layer_slider([0, 1, 2, 3], 1), widgets.IntSlider)
    s = _layer_slider([1, 3, 5], 3)
    assert isinstance(s, widgets.IntSlider) and s.step == 2
    assert isinstance(_layer_slider([0, 1, 5], 5), widgets.SelectionSlider)


# --------------------------------------------------------------------------- routing
def test_routing_state(tiny):
    s = W.RoutingState(tiny, text=IDS)
    assert s.layers == [0, 1, 2, 3] and len(s.tokens) == 40 and s.position == 39
    tokens0, path0, load0 = png(s.render_tokens()), png(s.render_path()), png(s.render_load())
    s.set_layer(2)
    assert png(s.render_tokens()) != tokens0
    assert png(s.render_load()) != load0
    s.select_token(5)
    assert png(s.render_path()) != path0
    rows = s.path()
    assert [r["layer"] for r in rows] == s.layers
    top1 = [s.experts(i)[5] for i in s.layers]
    assert [r["experts"][0] for r in rows] == top1
    for r in rows:
        assert 0 < r["gates"][0] < 1 and r["margin"] >= 0
        assert r["near_tie"] == (r["margin"] < s.eps)
    assert "<table" in s.path_html()
    s.select_token(-1)
    assert s.position == 39
    with pytest.raises(ValueError, match="MoE layer 7"):
        s.set_layer(7)
    with pytest.raises(ValueError, match="out of range"):
        s.select_token(40)
    s.set_text(LONG)
    assert len(s.tokens) == 30 and s.position == 29


def test_routing_explorer_updates_figures(tiny):
    e = W.RoutingExplorer(tiny, text=IDS)
    assert e.errors == [] and e.path_image.value and e.load_image.value
    assert len(e.token_buttons) == 40 and list(e.token_box.children) == e.token_buttons
    colours = [b.style.button_color for b in e.token_buttons]
    load = e.load_image.value
    e.layer_slider.value = 3
    assert e.state.layer == 3 and e.load_image.value != load
    top1 = e.state.experts()
    assert [b.style.button_color for b in e.token_buttons] != colours  # recoloured
    same = [i for i in range(40) if top1[i] == top1[0]]
    assert len({e.token_buttons[i].style.button_color for i in same}) == 1
    assert "3px solid" in e.token_buttons[39].layout.border  # the last token is selected
    path = e.path_image.value
    e.token_buttons[4].click()  # tokens are clickable
    assert e.state.position == 4 and e.path_image.value != path
    assert "3px solid" in e.token_buttons[4].layout.border
    assert "3px solid" not in e.token_buttons[39].layout.border
    assert e.token_buttons[4].style.font_size == "15px"
    e.text.value = LONG
    e.run_button.click()
    assert e.errors == []
    assert len(e.token_buttons) == 30 and e.state.position == 29
    assert "ready" in e.status.value and e.progress.layout.visibility == "hidden"
    # driving the state from code, then refresh(): the controls follow
    e.state.set_text(IDS)
    e.state.set_layer(1)
    e.state.select_token(7)
    e.refresh()
    assert e.text.value == IDS and e.layer_slider.value == 1
    assert len(e.token_buttons) == 40 and "3px solid" in e.token_buttons[7].layout.border
    assert e.errors == []


def test_routing_prompt_dropdown_follows_the_text(tiny_path):
    """After a prompt, custom text resets the dropdown to "(custom)"; picking the same prompt
    again then loads it again."""
    from workbench.tokenizer import Tokenizer
    from workbench.widgets._common import PROMPTS, bundled_path
    tok = Tokenizer.from_pretrained(bundled_path())
    model = wb.load(bundled_path())
    e = W.RoutingExplorer(model, tok, text="hello there")
    assert e.prompt.value == "(custom)"
    e.prompt.value = "numeric"
    assert e.text.value == PROMPTS["numeric"] and e.state.text == PROMPTS["numeric"]
    e.text.value = "a custom sentence"
    e.run_button.click()
    assert e.prompt.value == "(custom)" and e.errors == []
    e.prompt.value = "numeric"  # a change again: loads it
    assert e.state.text == PROMPTS["numeric"]
    assert e.token_buttons[0].description and e.errors == []


def test_routing_explorer_surfaces_errors(tiny, caplog):
    e = W.RoutingExplorer(tiny, text=IDS)

    def broken():
        raise RuntimeError("renderer exploded")

    e.state.render_load = broken
    # an observe callback: outside a kernel the error propagates to whoever changed the value
    with caplog.at_level(logging.ERROR, logger="workbench.widgets"):
        with pytest.raises(RuntimeError, match="renderer exploded"):
            e.layer_slider.value = 1
    assert "renderer exploded" in e.error_box.value and "changing the layer" in e.error_box.value
    assert isinstance(e.errors[-1], RuntimeError)
    assert any("renderer exploded" in r.getMessage() for r in caplog.records)
    assert "failed" in e.status.value
    # a button callback: ipywidgets logs it; the explorer still records and shows it
    e.text.value = "not token ids"
    e.run_button.click()
    assert isinstance(e.errors[-1], ValueError)
    assert "running the model" in e.error_box.value
    # the next successful action clears the box
    del e.state.render_load
    e.text.value = LONG
    e.run_button.click()
    assert e.error_box.value == "" and len(e.errors) == 2


def test_default_model_from_env(tiny_path, monkeypatch):
    monkeypatch.setenv(W.MODEL_ENV, str(tiny_path))
    assert W.bundled_path() == tiny_path
    s = W.RoutingState()
    assert s.model.path == str(tiny_path) and s.tokenizer is None and len(s.tokens) == 48
    monkeypatch.setenv(W.MODEL_ENV, str(tiny_path / "missing"))
    with pytest.raises(FileNotFoundError, match="WORKBENCH_MODEL"):
        W.RoutingState()


# --------------------------------------------------------------------------- attention
def test_attention_state(tiny):
    s = W.AttentionState(tiny, text=IDS)
    assert s.layer == 0 and s.chunk == 8 and s.query == 39
    assert s.layer_type().startswith("chunked RoPE")
    fig = s.render_pattern()
    gids = [ln.get_gid() for ln in fig.axes[0].lines]
    assert "chunk-boundary" in gids
    assert any(p.get_gid() == "query-focus" for p in fig.axes[0].patches)
    w = s.query_weights()
    assert w.shape == (40,) and np.isclose(w.sum(), 1.0, atol=1e-4)
    assert w[:32].sum() == 0  # query 39 sits in the chunk [32, 40)
    assert set(s._traces) == {0}  # only the shown layer was captured
    s.set_layer(3)
    assert s.layer_type() == "global NoPE" and s.chunk is None
    fig = s.render_pattern()
    assert "chunk-boundary" not in [ln.get_gid() for ln in fig.axes[0].lines]
    assert s.query_weights()[:32].sum() > 0
    mean = png(s.render_pattern())
    s.set_head(1)
    assert png(s.render_pattern()) != mean
    s.set_head(-1)
    assert s.head is None
    s.set_query(10)
    keys = s.top_keys(3)
    assert len(keys) == 3 and all(k <= 10 for k, _, _ in keys)
    assert keys[0][2] >= keys[1][2] >= keys[2][2]
    assert "query 10" in s.top_keys_html()
    s.set_query(None)
    assert not any(p.get_gid() == "query-focus" for p in s.render_pattern().axes[0].patches)
    with pytest.raises(ValueError, match="head 9"):
        s.set_head(9)
    s.set_text(LONG)
    assert s._traces.keys() == {3} and s.query == 29


def test_attention_explorer(tiny):
    e = W.AttentionExplorer(tiny, text=IDS)
    assert "chunked RoPE" in e.layer_type.value
    before = e.pattern_image.value
    e.layer_slider.value = 3
    assert "global NoPE" in e.layer_type.value and e.pattern_image.value != before
    q = e.query_image.value
    e.query_picker.value = 12
    assert e.query_image.value != q and "query 12" in e.keys_table.value
    e.head_picker.value = 2
    assert e.state.head == 2
    e.text.value = LONG
    e.run_button.click()
    assert e.errors == [] and len(e.query_picker.options) == 31
    e.state.set_layer(1)
    e.state.set_head(None)
    e.refresh()
    assert e.layer_slider.value == 1 and e.head_picker.value == -1


# --------------------------------------------------------------------------- interventions
def test_intervention_state(tiny):
    s = W.InterventionState(tiny, text=IDS)
    eff = s.effect
    assert eff.delta_loss == 0 and eff.changed.size == 0
    assert all(v.size == 0 for v in eff.rerouted.values())
    base = s._base.trace
    used = int(np.bincount(base["layers.1.moe.topk_indices"].ravel()).argmax())
    users = np.flatnonzero(base["layers.1.moe.topk_indices"][0, :, 0] == used)
    assert s.toggle("ban", 1, used) is True
    eff = s.update()
    assert np.array_equal(eff.rerouted[1], users)  # exactly its tokens re-route
    assert eff.rerouted[0].size == 0 and eff.delta_loss != 0
    assert s.describe() == f"ban L1 E{used}"
    s.toggle("ban", 1, used)
    s.toggle("zero", 1, used)
    eff = s.update()
    assert eff.rerouted[1].size == 0 and eff.delta_loss != 0  # routing kept, output dropped
    s.clear()
    assert s.toggle("force", 0, 5) is True
    eff = s.update()
    assert (s.out.trace["layers.0.moe.topk_indices"][0, :, 0] == 5).all()
    assert s.is_on("force", 0, 5) and not s.is_on("force", 0, 4)
    assert s.toggle("force", 0, 4) is True and s.forced == {0: 4}
    assert s.toggle("force", 0, 4) is False and s.forced == {}
    s.toggle_head(2, 1)
    eff = s.update()
    assert eff.delta_loss != 0 and s.interventions() == [wb.ablate_head(2, 1)]
    rows = s.changed_predictions()
    assert len(rows) == eff.changed.size
    for r in rows:
        assert r["before"] != r["after"]
    s.render_effect()
    s.render_tokens()
    assert "Δ" in s.summary_html()
    with pytest.raises(ValueError, match="expert 8"):
        s.toggle_ban(1, 8)
    with pytest.raises(ValueError, match="mode"):
        s.toggle("drop", 1, 1)


def test_intervention_explorer(tiny):
    e = W.InterventionExplorer(tiny, text=IDS)
    effect = e.effect_image.value
    e.layer_slider.value = 1
    e.expert_toggles[3].value = True
    assert e.state.banned == {(1, 3)} and e.effect_image.value != effect
    assert "ban L1 E3" in e.summary.value
    e.mode.value = "force"
    # the ban stays active, and its toggle says so (labelled, coloured) in every mode
    assert e.state.banned == {(1, 3)}
    assert e.expert_toggles[3].value and e.expert_toggles[3].description == "E3 ban"
    assert e.expert_toggles[3].button_style == "danger"
    assert [t.value for t in e.expert_toggles].count(True) == 1
    e.expert_toggles[2].value = True
    e.expert_toggles[6].value = True
    assert e.state.forced == {1: 6} and not e.expert_toggles[2].value
    assert e.expert_toggles[6].description == "E6 force"
    # clicking a toggle that shows on removes what it holds, whatever the mode
    e.expert_toggles[3].value = False
    assert e.state.banned == set() and e.expert_toggles[3].description == "E3"
    assert e.state.interventions() == [wb.force_expert(1, 6)]
    e.head_toggles[0].value = True
    assert e.state.ablated == {(1, 0)}
    e.layer_slider.value = 2
    assert not e.head_toggles[0].value  # layer 2 has no ablated head ...
    labels = [b.description for b in e.active_box.children[1:]]
    assert labels == ["✕ force L1 E6", "✕ ablate L1 H0"]  # ... but layer 1's is listed
    e.head_toggles[0].value = True
    assert e.state.ablated == {(1, 0), (2, 0)}
    e.active_box.children[2].click()  # remove "ablate L1 H0" from layer 2
    assert e.state.ablated == {(2, 0)} and e.head_toggles[0].value
    e.layer_slider.value = 1
    assert not e.head_toggles[0].value and e.expert_toggles[6].value
    e.clear_button.click()
    assert e.state.interventions() == [] and e.state.effect.delta_loss == 0
    assert e.active_box.children[0].value == "active: none"
    assert e.errors == []


def test_intervention_state_one_intervention_per_expert(tiny):
    s = W.InterventionState(tiny, text=IDS)
    assert s.toggle("ban", 1, 3) is True and s.mode_of(1, 3) == "ban"
    assert s.toggle("force", 1, 3) is False  # an expert holding one: toggling removes it
    assert s.mode_of(1, 3) is None and s.interventions() == []
    assert s.toggle("zero", 1, 3) is True and s.active() == [("zero", 1, 3)]
    s.toggle_head(0, 1)
    s.remove("zero", 1, 3)
    assert s.active() == [("ablate", 0, 1)]
    with pytest.raises(ValueError, match="no ban intervention on layer 1, expert 2"):
        s.remove("ban", 1, 2)


# --------------------------------------------------------------------------- parity
@pytest.fixture(scope="module")
def tiny_jax(tiny_path):
    pytest.importorskip("jax")
    return wb.load(tiny_path, backend="jax")


@pytest.mark.slow
def test_parity_state(tiny, tiny_jax):
    steps = []
    s = W.ParityState(tiny, tiny_jax, text=IDS, progress=lambda f, m: steps.append((f, m)))
    assert s.report.ok and s.dtype == "float32" and steps[-1][0] == 1.0
    assert s.report.label_b == "jax/float32"
    errors = png(s.render_errors())
    flips = png(s.render_flips())
    s.set_layer(2)
    assert png(s.render_flips()) != flips
    assert "OK" in s.flips_html()
    steps.clear()
    s.set_dtype("bfloat16")  # loaded lazily from the jax model's path
    assert set(s._models) == {"float32", "bfloat16"} and s.model_b.dtype == "bfloat16"
    assert any("loading the bfloat16" in m for _, m in steps)
    assert s.report.label_b == "jax/bfloat16" and s.report.tol > 1e-3
    assert png(s.render_errors()) != errors
    for f in s.flips():
        assert f.layer in s.layers
    with pytest.raises(ValueError, match="dtype"):
        s.set_dtype("float16")


@pytest.mark.slow
def test_parity_explorer(tiny, tiny_jax):
    bf16 = wb.load(tiny_jax.path, backend="jax", dtype="bfloat16")
    e = W.ParityExplorer(tiny, tiny_jax, text=IDS, variants=[bf16])
    assert e.state._models["bfloat16"] is bf16
    before = e.errors_image.value
    e.dtype_toggle.value = "bfloat16"
    assert e.errors == [] and e.errors_image.value != before
    assert "jax/bfloat16" in e.flips_table.value
    flips = e.flips_image.value
    e.layer_slider.value = 3
    assert e.flips_image.value != flips
    with pytest.raises(ValueError, match="other dtypes"):
        W.ParityState(tiny, tiny_jax, text=IDS, variants=[tiny])
