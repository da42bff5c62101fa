"""What the workbench refuses, in both backends alike: argument types of run / generate /
estimate_capture_bytes, contradictory interventions, patch values, captures too large for
memory, unreadable traces, analyses about experts that do not exist, and the process state
after a refusal.

Every refusal is checked on torch and on jax (the ``model`` fixture), and ``test_*_agree``
runs both and requires the same error type and message: the checks live in the shared code
(``Model.run/generate``, ``interventions.plan``), so a backend never resolves a contradiction its
own way.
"""

from __future__ import annotations

import json
import struct
import warnings

import numpy as np
import pytest
from helpers_ckpt import raises_with, write_raw_safetensors

import workbench as wb
from workbench import analysis as an
from workbench import model as wb_model
from workbench.config import ModelConfig
from workbench.interventions import BanExpert, ForceExpert, InterventionError, Patch, SetTopK
from workbench.model import CaptureTooLarge, InputError
from workbench.random_weights import write_random_checkpoint
from workbench.trace import Trace, TraceError

pytest.importorskip("jax")
pytest.importorskip("torch")

BACKENDS = ("torch", "jax")
MAX_POS = 16
CFG = ModelConfig.tiny(max_position_embeddings=MAX_POS)  # vocab 512, 4 MoE layers, 8 experts top-1
E, V, L = CFG.num_local_experts, CFG.vocab_size, CFG.num_hidden_layers
IDS = np.array([[1, 2, 3, 4, 5]])
FAST = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("refusals"), CFG, seed=0,
                                   router_std=0.5)


def load(path, backend):
    m = wb.load(path, backend=backend)
    if backend == "jax":
        m.compiler_options.update(FAST)
    return m


@pytest.fixture(scope="module")
def models(ckpt):
    return {b: load(ckpt, b) for b in BACKENDS}


@pytest.fixture(params=BACKENDS)
def model(request, models):
    return models[request.param]


def both_refuse(models, call, exc, *fragments):
    """``call(model)`` raises ``exc`` with every fragment, with the same message, in both."""
    msgs = {b: raises_with(exc, lambda b=b: call(models[b]), *fragments) for b in BACKENDS}
    assert msgs["torch"] == msgs["jax"], msgs
    return msgs["torch"]


# ----------------------------------------------------------------------------- run arguments
RUN_CASES = {
    "stop_at_layer_float": (dict(stop_at_layer=1.0), ("stop_at_layer", "int", "1.0")),
    "stop_at_layer_bool": (dict(stop_at_layer=True), ("stop_at_layer", "int")),
    "positions_float": (dict(capture="embed", positions=[1.0, 2.0]), ("positions", "float")),
    "positions_slice_float": (dict(capture="embed", positions=slice(0.5, 3)),
                              ("positions", "start", "0.5")),
    "positions_past_end": (dict(capture="embed", positions=[3, 4, 5]),
                           ("positions [5]", "length 5")),
    "positions_slice_past_end": (dict(capture="embed", positions=slice(2, 9)),
                                 ("stop=9", "length 5")),
    "positions_slice_before_start": (dict(capture="embed", positions=slice(-6, None)),
                                     ("start=-6", "length 5")),
    "positions_empty_slice": (dict(capture="embed", positions=slice(3, 3)),
                              ("selects no position",)),
    "positions_empty_list": (dict(capture="embed", positions=[]), ("positions is empty",)),
    "positions_not_contiguous": (dict(capture="embed", positions=[0, 2]), ("contiguous",)),
    "positions_string": (dict(capture="embed", positions="0:3"), ("positions", "'0:3'")),
    "positions_negative_step": (dict(capture="embed", positions=slice(None, None, -1)),
                                ("step",)),
    "capture_dtype_int": (dict(capture="embed", capture_dtype="int8"),
                          ("capture_dtype='int8'", "float dtype")),
    "capture_dtype_bool": (dict(capture="embed", capture_dtype=bool), ("float dtype",)),
    "capture_dtype_complex": (dict(capture="embed", capture_dtype=np.complex64),
                              ("float dtype",)),
    "capture_dtype_unknown": (dict(capture="embed", capture_dtype="float33"),
                              ("capture_dtype='float33'",)),
    "max_capture_bytes_negative": (dict(capture="embed", max_capture_bytes=-1),
                                   ("max_capture_bytes=-1",)),
    "max_capture_bytes_nan": (dict(capture="embed", max_capture_bytes=float("nan")),
                              ("max_capture_bytes=nan",)),
}


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_run_argument_refused(model, case):
    kw, fragments = RUN_CASES[case]
    raises_with(InputError, lambda: model.run(IDS, **kw), *fragments)


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_run_refusals_agree(models, case):
    kw, fragments = RUN_CASES[case]
    both_refuse(models, lambda m: m.run(IDS, **kw), InputError, *fragments)


def test_positions_accepted_forms_agree(models):
    """Negative positions count from the end; a slice, a range and a list select the same."""
    want = models["torch"].run(IDS, capture="embed").trace["embed"][:, 2:5]
    for pos in (slice(2, None), slice(-3, None), range(2, 5), [2, 3, 4], [-3, -2, -1],
                np.array([2, 3, 4])):
        for b in BACKENDS:
            got = models[b].run(IDS, capture="embed", positions=pos).trace["embed"]
            np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"{b} {pos}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", np.float16, "float64"])
def test_float_capture_dtypes_accepted(model, dtype):
    t = model.run(IDS, capture=["embed", "layers.0.moe.topk_indices"], capture_dtype=dtype).trace
    assert t["layers.0.moe.topk_indices"].dtype == np.int32
    assert t["embed"].dtype.itemsize == (8 if dtype == "float64" else 2)


# ----------------------------------------------------------------------------- generate
GEN_CASES = {
    "max_new_tokens_float": (dict(max_new_tokens=2.0), ("max_new_tokens", "int", "2.0")),
    "max_new_tokens_str": (dict(max_new_tokens="3"), ("max_new_tokens", "int")),
    "max_new_tokens_negative": (dict(max_new_tokens=-1), ("max_new_tokens", ">= 0")),
    "temperature_nan": (dict(temperature=float("nan")), ("temperature", "finite", "nan")),
    "temperature_inf": (dict(temperature=float("inf")), ("temperature", "finite", "inf")),
    "temperature_negative": (dict(temperature=-0.5), ("temperature", ">= 0")),
    "temperature_str": (dict(temperature="hot"), ("temperature", "number")),
    "top_p_nan": (dict(top_p=float("nan")), ("top_p", "finite")),
    "top_p_zero": (dict(top_p=0.0), ("top_p", "(0, 1]")),
    "top_p_above_one": (dict(top_p=1.5), ("top_p", "1.5")),
    "stop_ids_float": (dict(stop_ids=[2, 7.0]), ("stop_ids", "float", "7.0")),
    "stop_ids_str": (dict(stop_ids="\n"), ("stop_ids",)),
    "stop_ids_bool": (dict(stop_ids=[True]), ("stop_ids", "bool")),
    "stop_ids_out_of_vocab": (dict(stop_ids=[V]), ("stop_ids", str(V), f"[0, {V})")),
    "seed_float": (dict(seed=1.5), ("seed", "int")),
}


@pytest.mark.parametrize("case", sorted(GEN_CASES))
def test_generate_argument_refused(models, case):
    kw = {"max_new_tokens": 2, **GEN_CASES[case][0]}
    both_refuse(models, lambda m: m.generate(IDS, **kw), InputError, *GEN_CASES[case][1])


def test_generate_accepts_numpy_numbers_and_one_stop_id(model):
    g = model.generate(IDS, np.int64(2), temperature=np.float32(0), top_p=1, stop_ids=3)
    assert g.new_tokens.shape == (1, 2)
    g2 = model.generate(IDS, 2, temperature=0, stop_ids=np.array([3]))
    np.testing.assert_array_equal(g.sequences, g2.sequences)


# ----------------------------------------------------------------------------- estimate
@pytest.mark.parametrize("kw, fragments", [
    (dict(batch=1, seq=-4), ("seq", ">= 0", "-4")),
    (dict(batch=-1, seq=4), ("batch", ">= 0")),
    (dict(batch=1, seq=4.0), ("seq", "int", "float")),
    (dict(batch=1.5, seq=4), ("batch", "int")),
    (dict(batch=1, seq=4, capture_dtype="int32"), ("capture_dtype",)),
])
def test_estimate_capture_bytes_refuses(model, kw, fragments):
    raises_with(InputError, lambda: model.estimate_capture_bytes("*", **kw), *fragments)


# ----------------------------------------------------------------------------- interventions
@pytest.mark.parametrize("make, fragments", [
    (lambda: wb.ban_expert(0, 1.5), ("ban_expert", "expert", "int", "1.5")),
    (lambda: wb.ban_expert(0.0, 1), ("ban_expert", "layer", "int")),
    (lambda: wb.zero_expert(1, 2.0), ("zero_expert", "expert", "2.0")),
    (lambda: wb.force_expert(1, 2, positions=[0, 1.5]), ("force_expert", "position", "1.5")),
    (lambda: wb.force_expert(1, 2, positions=[]), ("force_expert", "positions is empty")),
    (lambda: wb.force_expert(1, 2, positions="01"), ("force_expert", "positions")),
    (lambda: wb.set_top_k(2.0), ("set_top_k", "k", "int")),
    (lambda: wb.set_top_k(2, layer=True), ("set_top_k", "layer", "bool")),
    (lambda: wb.ablate_head(0, 1.0), ("ablate_head", "head", "int")),
    (lambda: wb.patch(3, 0.0), ("patch", "string")),
    (lambda: wb.patch("embed", [[1.0, 2.0], [3.0]]), ("patch", "embed")),
    (lambda: wb.patch("embed", 1 + 2j), ("complex",)),
    (lambda: wb.patch("embed", np.array(["a"])), ("dtype", "real numbers")),
    (lambda: wb.patch("embed", True), ("bool",)),
    (lambda: wb.patch("embed", np.array([object()])), ("object",)),
    (lambda: wb.patch("embed", np.nan), ("embed", "NaN/inf", "allow_nonfinite=True")),
    (lambda: wb.patch("embed", np.array([0.0, np.inf])), ("1 NaN/inf", "index (1,)")),
])
def test_intervention_constructor_refuses(make, fragments):
    raises_with(InterventionError, make, *fragments)


# interventions built directly (no constructor): plan() checks them the same way
RAW_CASES = {
    "raw_float_expert": ([BanExpert(0, 1.5)], ("ban_expert", "expert", "1.5")),
    "raw_float_layer": ([ForceExpert(1.0, 2)], ("force_expert", "layer", "1.0")),
    "raw_float_position": ([ForceExpert(1, 2, (0.5,))], ("position", "0.5")),
    "raw_float_k": ([SetTopK(2.5)], ("set_top_k", "k", "2.5")),
    "raw_nan_patch": ([Patch("embed", np.array(np.nan))], ("embed", "NaN/inf")),
    "raw_complex_patch": ([Patch("embed", np.array(1j))], ("complex",)),
}

CONTRADICTIONS = {
    "ban_every_expert": ([wb.ban_expert(2, e) for e in range(E)],
                         ("ban_expert(layer=2, expert=0)", f"all {E} experts", "layer 2")),
    "ban_leaves_fewer_than_k": ([wb.set_top_k(3, layer=1)] + [wb.ban_expert(1, e)
                                                             for e in range(E - 2)],
                                ("leave 2 of 8", "layer 1", "set_top_k(k=3, layer=1)",
                                 "ban_expert(layer=1, expert=0)")),
    "force_banned": ([wb.ban_expert(1, 3), wb.force_expert(1, 3)],
                     ("force_expert(layer=1, expert=3", "ban_expert(layer=1, expert=3)",
                      "layer 1")),
    "force_banned_at_positions": ([wb.force_expert(0, 2, positions=[1]), wb.ban_expert(0, 2)],
                                  ("force_expert(layer=0, expert=2, positions=(1,))",
                                   "ban_expert(layer=0, expert=2)")),
    "two_forced_top1": ([wb.force_expert(0, 1), wb.force_expert(0, 2)],
                        ("force_expert(layer=0, expert=1", "force_expert(layer=0, expert=2",
                         "k=1", "every position")),
    "two_forced_at_one_position": ([wb.force_expert(3, 1, positions=[0, 2]),
                                    wb.force_expert(3, 4, positions=[2, 4])],
                                   ("expert=1", "expert=4", "position 2", "layer 3")),
    "three_forced_top2": ([wb.set_top_k(2), wb.force_expert(0, 1), wb.force_expert(0, 2),
                           wb.force_expert(0, 5, positions=[3])],
                          ("expert=1", "expert=2", "expert=5", "position 3", "k=2",
                           "set_top_k(k=2, layer=None)")),
    "set_top_k_twice_global_and_layer": ([wb.set_top_k(2), wb.set_top_k(3, layer=1)],
                                         ("set_top_k(k=2, layer=None)",
                                          "set_top_k(k=3, layer=1)", "layer 1")),
    "set_top_k_twice_same_layer": ([wb.set_top_k(2, layer=0), wb.set_top_k(2, layer=0)],
                                   ("set_top_k(k=2, layer=0)", "layer 0")),
    "patch_twice": ([wb.patch("layers.1.resid_mid", 0.0), wb.patch("layers.1.resid_mid", 1.0)],
                    ("layers.1.resid_mid", "one patch per hook")),
    "patch_routing_and_ban": ([wb.patch("layers.1.moe.topk_indices", 2), wb.ban_expert(1, 2)],
                              ("patch(name='layers.1.moe.topk_indices')",
                               "ban_expert(layer=1, expert=2)")),
}

PATCH_CASES = {
    "patch_shape": ([wb.patch("layers.0.resid_pre", np.zeros((2, 5, 64)))],
                    ("(2, 5, 64)", "(1, 5, 64)")),
    "patch_shape_pattern": ([wb.patch("layers.0.attn.pattern", np.zeros((5, 4)))],
                            ("(5, 4)", "(1, 4, 5, 5)")),
    "patch_index_float": ([wb.patch("layers.0.moe.topk_indices", np.full((1, 5, 1), 2.0))],
                          ("topk_indices", "ints", "float64")),
    "patch_index_out_of_range": ([wb.patch("layers.0.moe.topk_indices", [[[0], [1], [8], [2],
                                                                          [3]]])],
                                 ("0..7", "8")),
    "patch_index_negative": ([wb.patch("layers.2.moe.topk_indices", -1)], ("0..7", "-1")),
    "patch_index_wrong_k": ([wb.set_top_k(2, layer=0),
                             wb.patch("layers.0.moe.topk_indices", np.zeros((1, 5, 3), int))],
                            ("(1, 5, 3)", "(1, 5, 2)")),
    "patch_unknown_hook": ([wb.patch("layers.0.moe.router", 0.0)], ("layers.0.moe.router",)),
}

IV_CASES = {**RAW_CASES, **CONTRADICTIONS, **PATCH_CASES}


@pytest.mark.parametrize("case", sorted(IV_CASES))
def test_intervention_refused(model, case):
    ivs, fragments = IV_CASES[case]
    raises_with(InterventionError, lambda: model.run(IDS, interventions=ivs), *fragments)


@pytest.mark.parametrize("case", sorted(IV_CASES))
def test_intervention_refusals_agree(models, case):
    ivs, fragments = IV_CASES[case]
    both_refuse(models, lambda m: m.run(IDS, interventions=ivs), InterventionError, *fragments)


def test_order_of_contradicting_interventions_does_not_matter(models):
    for ivs in ([wb.force_expert(1, 3), wb.ban_expert(1, 3)],
                [wb.ban_expert(1, 3), wb.force_expert(1, 3)]):
        both_refuse(models, lambda m, ivs=ivs: m.run(IDS, interventions=ivs), InterventionError,
                    "force_expert(layer=1, expert=3", "ban_expert(layer=1, expert=3)")


def test_compatible_interventions_still_run_and_agree(models):
    """Not contradictions: duplicates, as many forced experts as slots, bans that leave k,
    set_top_k on different layers, a patch of the routing with set_top_k for its shape."""
    ivs = [wb.ban_expert(0, 1), wb.ban_expert(0, 1), *(wb.ban_expert(2, e) for e in range(E - 1)),
           wb.set_top_k(2, layer=1), wb.set_top_k(3, layer=3), wb.force_expert(1, 4),
           wb.force_expert(0, 0, positions=[1]), wb.force_expert(0, 6, positions=[2, -1]),
           wb.patch("layers.3.moe.topk_indices", np.array([[[0, 1, 2]]]).repeat(5, 1)),
           wb.zero_expert(1, 4)]
    outs = {b: models[b].run(IDS, capture="*.moe.topk_indices", interventions=ivs)
            for b in BACKENDS}
    t, j = outs["torch"], outs["jax"]
    np.testing.assert_allclose(j.logits, t.logits, rtol=2e-4, atol=2e-5)
    for n in t.trace:
        np.testing.assert_array_equal(t.trace[n], j.trace[n], err_msg=n)
    assert (t.trace["layers.2.moe.topk_indices"] == E - 1).all()
    assert (t.trace["layers.1.moe.topk_indices"][..., 0] == 4).all()
    assert t.trace["layers.0.moe.topk_indices"][0, [1, 2, 4], 0].tolist() == [0, 6, 6]
    assert t.trace.meta["interventions"] == j.trace.meta["interventions"]


def test_two_forced_experts_in_two_slots_agree(models):
    """Both forced experts tie at +inf: both backends put the lower expert id first."""
    ivs = [wb.set_top_k(2, layer=1), wb.force_expert(1, 5), wb.force_expert(1, 2)]
    ids = np.random.default_rng(0).integers(0, V, (2, 9))
    t, j = (models[b].run(ids, capture="layers.1.moe.topk_indices", interventions=ivs)
            for b in BACKENDS)
    np.testing.assert_allclose(j.logits, t.logits, rtol=2e-4, atol=2e-5)
    np.testing.assert_array_equal(t.trace["layers.1.moe.topk_indices"],
                                  j.trace["layers.1.moe.topk_indices"])
    assert (t.trace["layers.1.moe.topk_indices"] == [2, 5]).all()


def test_patch_values_accepted_and_converted(models):
    """ints for a float hook, bf16 and torch tensors, and NaN with allow_nonfinite=True."""
    import ml_dtypes
    import torch
    ref = {b: models[b].run(IDS, interventions=[wb.patch("layers.1.resid_mid", 0.0)]).logits
           for b in BACKENDS}
    np.testing.assert_allclose(ref["jax"], ref["torch"], rtol=2e-4, atol=2e-5)
    for value in (0, np.zeros(64, ml_dtypes.bfloat16), torch.zeros(1, 5, 64),
                  np.zeros((5, 64), np.float16)):
        for b in BACKENDS:
            got = models[b].run(IDS, interventions=[wb.patch("layers.1.resid_mid", value)])
            np.testing.assert_array_equal(got.logits, ref[b])
    nan = [wb.patch("layers.1.resid_mid", np.nan, allow_nonfinite=True)]
    for b in BACKENDS:
        with warnings.catch_warnings():  # the model's once-only NaN-logits warning
            warnings.simplefilter("ignore", RuntimeWarning)
            out = models[b].run(IDS, interventions=nan)
        assert np.isnan(out.logits).all(), b
        assert out.trace.meta["interventions"][0]["allow_nonfinite"] is True
    with pytest.raises(InterventionError, match="allow_nonfinite must be True or False"):
        wb.patch("embed", np.nan, allow_nonfinite="yes")


# ----------------------------------------------------------------------------- memory
def test_capture_over_max_bytes_is_refused_before_running(models):
    est = models["torch"].estimate_capture_bytes("*", 1, IDS.shape[1])
    msg = both_refuse(models, lambda m: m.run(IDS, capture="*", max_capture_bytes=est - 1),
                      CaptureTooLarge, f"({est} bytes)", "positions=", "capture_dtype",
                      "fewer hooks or layers", "max_capture_bytes=")
    assert "logits" in msg  # the largest hook is named
    assert isinstance(CaptureTooLarge("x"), InputError)
    for b in BACKENDS:  # exactly the estimate is allowed
        t = models[b].run(IDS, capture="*", max_capture_bytes=est).trace
        assert sum(a.nbytes for a in t.values()) == est


def test_capture_limit_counts_positions_dtype_and_top_k(models):
    """The refusal uses what the trace will really hold: positions, capture dtype, k."""
    kw = dict(capture=["*.attn.pattern", "*.moe.*", "logits"], positions=slice(1, 4),
              capture_dtype="float16", interventions=[wb.set_top_k(3, layer=2)])
    for b in BACKENDS:
        t = models[b].run(IDS, **kw).trace
        held = sum(a.nbytes for a in t.values())
        models[b].run(IDS, max_capture_bytes=held, **kw)
        raises_with(CaptureTooLarge, lambda b=b, n=held - 1: models[b].run(
            IDS, max_capture_bytes=n, **kw), f"({held} bytes)")


def test_capture_limit_from_available_memory(models, monkeypatch):
    """By default the limit is CAPTURE_MEMORY_FRACTION of MemAvailable."""
    est = models["torch"].estimate_capture_bytes("*", 1, IDS.shape[1])
    monkeypatch.setattr(wb_model, "available_memory", lambda: 2 * est - 2)
    monkeypatch.setattr(wb_model, "CAPTURE_MEMORY_FRACTION", 0.5)
    both_refuse(models, lambda m: m.run(IDS, capture="*"), CaptureTooLarge,
                "50% of the", "memory available now")
    both_refuse(models, lambda m: m.generate(IDS, 3, capture="*"), CaptureTooLarge,
                "fewer max_new_tokens")
    for b in BACKENDS:
        models[b].run(IDS, capture="*.moe.*")  # small captures still run
        models[b].run(IDS, capture="*", max_capture_bytes=est)  # the keyword overrides
    monkeypatch.setattr(wb_model, "available_memory", lambda: None)  # system does not say
    for b in BACKENDS:
        models[b].run(IDS, capture="*")


def test_available_memory_reads_meminfo():
    avail = wb_model.available_memory()
    if avail is not None:
        assert avail > 0


# ----------------------------------------------------------------------------- traces
def _saved_trace(model, tmp_path):
    return model.run(IDS, capture="*.moe.*").trace.save(tmp_path / f"{model.backend}.safetensors")


def _write_trace_file(path, meta, ids=None):
    ids = np.array([[1, 2]], np.int64) if ids is None else ids
    header = {"__input_ids__": {"dtype": {"int64": "I64", "float32": "F32"}[str(ids.dtype)],
                                "shape": list(ids.shape), "data_offsets": [0, ids.nbytes]}}
    if meta is not None:
        header["__metadata__"] = meta
    write_raw_safetensors(path, header, ids.tobytes())
    return path


def test_saved_traces_of_both_backends_load(models, tmp_path):
    for b in BACKENDS:
        back = Trace.load(_saved_trace(models[b], tmp_path))
        assert back.meta["backend"] == b and back.moe_layers == CFG.moe_layers


@pytest.mark.parametrize("damage", [
    lambda p: p.write_bytes(b""),
    lambda p: p.write_bytes(p.read_bytes()[:-7]),
    lambda p: p.write_bytes(p.read_bytes()[:5]),
    lambda p: p.write_bytes(b"garbage, not safetensors at all"),
    lambda p: p.write_bytes(struct.pack("<Q", 8) + b"{broken!"),
], ids=["empty", "truncated_data", "truncated_header", "garbage", "bad_header_json"])
def test_unreadable_trace_file(models, tmp_path, damage):
    for b in BACKENDS:
        p = _saved_trace(models[b], tmp_path)
        damage(p)
        raises_with(TraceError, lambda p=p: Trace.load(p), str(p), "workbench trace")


@pytest.mark.parametrize("meta, fragment", [
    ({"workbench_trace": "{not json"}, "not valid JSON"),
    ({"workbench_trace": "[1, 2]"}, "JSON object, got list"),
    ({"workbench_trace": "5"}, "JSON object, got int"),
    ({"workbench_trace": 5}, "workbench"),  # the reader may refuse non-string metadata
    ({"workbench_trace": json.dumps({"config": "tiny"})}, "'config' must be dict"),
    ({"workbench_trace": json.dumps({"capture": "*"})}, "'capture' must be list"),
    ({"workbench_trace": json.dumps({"backend": 3})}, "'backend' must be str or null"),
    ({"workbench_trace": json.dumps({"config": {"experts": "8"}})}, "config.experts"),
    ({"other": "x"}, "not a workbench trace"),
    (None, "not a workbench trace"),
    ("a string", "workbench trace"),
])
def test_trace_with_bad_metadata(tmp_path, meta, fragment):
    p = _write_trace_file(tmp_path / "t.safetensors", meta)
    msg = raises_with(TraceError, lambda: Trace.load(p), str(p), fragment)
    assert "expected str" not in msg


def test_trace_with_float_ids_and_missing_file(tmp_path):
    p = _write_trace_file(tmp_path / "f.safetensors", {"workbench_trace": "{}"},
                          np.array([[1.0, 2.0]], np.float32))
    raises_with(TraceError, lambda: Trace.load(p), str(p), "integer")
    raises_with(FileNotFoundError, lambda: Trace.load(tmp_path / "none.safetensors"),
                "none.safetensors")
    raises_with(TraceError, lambda: Trace.load(tmp_path), str(tmp_path), "directory")
    assert issubclass(TraceError, ValueError)


# ----------------------------------------------------------------------------- analyses
def test_expert_ablation_refuses_experts_the_model_lacks(models):
    for b in BACKENDS:
        m = models[b]
        raises_with(ValueError, lambda m=m: an.expert_ablation(m, IDS, 1, experts=[99]),
                    "expert 99", f"{E} experts")
        raises_with(ValueError, lambda m=m: an.expert_ablation(m, IDS, 1, experts=[-1]),
                    "expert -1")
        raises_with(ValueError, lambda m=m: an.expert_ablation(m, IDS, 1, experts=[1.5]),
                    "expert", "int", "1.5")
        raises_with(ValueError, lambda m=m: an.expert_ablation(m, IDS, 1.0), "layer", "int")
        raises_with(ValueError, lambda m=m: an.expert_ablation(m, IDS, 1, experts=[]),
                    "empty")


def test_analyses_refuse_expert_indices_outside_the_model(models):
    for b in BACKENDS:
        t = models[b].run(IDS, capture="*.moe.*").trace
        bad = Trace({**t, "layers.1.moe.topk_indices": np.full((1, 5, 1), 99, np.int32)},
                    t.input_ids, t.meta)
        raises_with(ValueError, lambda bad=bad: an.expert_counts(bad, 1), "expert 99",
                    f"{E} experts", "layers.1.moe.topk_indices")
        raises_with(ValueError, lambda bad=bad: an.expert_load(bad, 1), "expert 99")
        raises_with(ValueError, lambda t=t: an.gate_histogram(t, 1, slot=3), "slot 3")
        raises_with(ValueError, lambda t=t: an.logit_margin(t, 1, rank=1.0), "rank", "int")
        assert an.expert_counts(t, 1).shape == (E,)


# ----------------------------------------------------------------------------- process state
def test_failed_loads_and_runs_leave_the_process_usable(ckpt, tmp_path):
    """After every kind of refusal (and an exception inside a hook function mid-forward) the
    same process loads and runs a valid model exactly as before, in both backends."""
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    ref = {b: load(ckpt, b).run(ids, capture="*.moe.topk_indices") for b in BACKENDS}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{broken")
    for b in BACKENDS:
        with pytest.raises((wb.ConfigError, wb.CheckpointError)):
            wb.load(bad, backend=b)
        with pytest.raises(ValueError):
            wb.load(ckpt, backend=b, dtype="float64")
        m = load(ckpt, b)
        failing = [
            (InputError, lambda m=m: m.run([[1, V]])),
            (InputError, lambda m=m: m.run(ids, capture="embed", positions=[9])),
            (InterventionError, lambda m=m: m.run(ids, interventions=[
                wb.ban_expert(0, e) for e in range(E)])),
            (CaptureTooLarge, lambda m=m: m.run(ids, capture="*", max_capture_bytes=1)),
            (InputError, lambda m=m: m.generate(ids, 2, temperature=float("nan"))),
            (wb.HookError, lambda m=m: m.run(ids, capture="layers.0.moe.nothing")),
            (ZeroDivisionError, lambda m=m: m.run(ids, hooks={"layers.1.attn.out": lambda x:
                                                              1 / 0})),
            (ValueError, lambda m=m: m.run(ids, hooks={"layers.2.resid_mid": lambda x:
                                                       x[..., :3]})),
        ]
        for exc, call in failing:
            with pytest.raises(exc):
                call()
        for model in (m, load(ckpt, b)):  # the failed model itself, and a fresh load
            out = model.run(ids, capture="*.moe.topk_indices")
            np.testing.assert_array_equal(out.logits, ref[b].logits)
            for n in out.trace:
                np.testing.assert_array_equal(out.trace[n], ref[b].trace[n])
            g = model.generate(ids[:, :4], 3, temperature=0)
            np.testing.assert_array_equal(g.sequences[:, :4], ids[:, :4])
    np.testing.assert_allclose(ref["jax"].logits, ref["torch"].logits, rtol=2e-4, atol=2e-5)
