"""``compile=`` (torch): layers run as a torch.compile'd step with the same hooks and results."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.config import ModelConfig
from workbench.random_weights import random_tensors
from workbench.torch.model import TorchModel

MODEL = "data/scout-mini"


def test_compiled_layers_match_eager_with_hooks_and_interventions():
    eager = wb.load(MODEL)
    # dynamo's tracing (graph breaks at dispatch and the cache append included) without
    # inductor's C++ build, which would take minutes here
    compiled = wb.load(MODEL, compile={"backend": "eager", "dynamic": True})
    assert compiled._compiled is not None
    ids = np.random.default_rng(0).integers(0, 4000, (2, 24))
    kw = dict(capture=["*.moe.router_logits", "layers.1.attn.pattern", "logits"],
              interventions=[wb.ban_expert(1, 2)])
    a, b = eager.run(ids, **kw), compiled.run(ids, **kw)
    assert sorted(a.trace) == sorted(b.trace)
    for n in a.trace:
        np.testing.assert_array_equal(a.trace[n], b.trace[n], err_msg=n)
    compiled.set_compile(False)
    assert compiled._compiled is None


def test_layers_alike_share_compiled_graphs():
    # hooks are seen by relative name inside a compiled layer, so its graph depends on the
    # layer's kind, hooks and interventions, not on its index: fewer graphs than layers (torch
    # recompiles a function at most 8 times: per-layer graphs left every layer past the eighth
    # eager), and hooks and interventions on deep layers still apply
    graphs: list = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    layers = 12
    cfg = ModelConfig.mini(num_local_experts=4, num_hidden_layers=layers, hidden_size=64,
                           intermediate_size=64, intermediate_size_mlp=128, head_dim=16,
                           vocab_size=256)
    tensors = random_tensors(cfg, seed=0, router_std=0.5)
    ids = np.random.default_rng(1).integers(0, 256, (1, 12))
    torch._dynamo.reset()
    compiled = TorchModel(cfg, tensors, "float32")
    compiled.set_compile({"backend": counting, "dynamic": True})
    compiled.run(ids)
    assert 0 < len(graphs) < layers
    kw = dict(capture=["layers.10.attn.q", "layers.9.resid_post", "logits"],
              interventions=[wb.ban_expert(11, 0)])
    a = TorchModel(cfg, tensors, "float32").run(ids, **kw).trace
    b = compiled.run(ids, **kw).trace
    assert sorted(a) == sorted(b)
    for n in a:
        np.testing.assert_array_equal(a[n], b[n], err_msg=n)
    torch._dynamo.reset()


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="inductor builds C++ on the CPU")
def test_inductor_bf16_matches_eager_to_the_bit():
    # inductor's fused bf16 ops round where eager rounds (emulate_precision_casts) and decode
    # attention is the eager kernel (a custom op): the same values and the same greedy tokens
    torch._dynamo.reset()
    eager = wb.load(MODEL, dtype="bfloat16")
    compiled = wb.load(MODEL, dtype="bfloat16", compile=True)
    ids = np.random.default_rng(2).integers(0, 4000, (1, 16))
    cap = ["*.resid_post", "*.attn.out", "*.moe.router_logits", "logits"]
    a, b = eager.run(ids, capture=cap).trace, compiled.run(ids, capture=cap).trace
    for n in a:
        np.testing.assert_array_equal(a[n], b[n], err_msg=n)
    np.testing.assert_array_equal(compiled.generate(ids, 6, temperature=0)[0],
                                  eager.generate(ids, 6, temperature=0)[0])
    torch._dynamo.reset()


def test_compile_argument_is_checked():
    with pytest.raises(ValueError, match="compile= applies to the torch backend"):
        wb.load(MODEL, backend="jax", compile=True)
    m = wb.load(MODEL)
    with pytest.raises(ValueError, match="compile="):
        m.set_compile("fast")


def test_cuda_graph_steps_copy_out_what_outlives_them(monkeypatch):
    """With CUDA graphs a layer step's outputs are overwritten by the next replay: each step
    begins a CUDA-graph step and the residual stream and captured hooks are copied out. The
    same values as eager (the CPU runs the copies; graphs are recorded on CUDA only)."""
    marks: list[int] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    eager = wb.load(MODEL)
    compiled = wb.load(MODEL, compile={"backend": "eager", "dynamic": True})
    assert compiled._compiled[2] is False  # the CPU: no CUDA graphs
    compiled._compiled = (*compiled._compiled[:2], True)
    ids = np.random.default_rng(3).integers(0, 4000, (1, 12))
    kw = dict(capture=["layers.0.resid_post", "*.moe.topk_indices", "logits"])
    a, b = eager.run(ids, **kw), compiled.run(ids, **kw)
    for n in a.trace:
        np.testing.assert_array_equal(a.trace[n], b.trace[n], err_msg=n)
    assert len(marks) == eager.config.num_hidden_layers
    ga = eager.generate(ids, 4, temperature=0)
    gb = compiled.generate(ids, 4, temperature=0)
    np.testing.assert_array_equal(ga.sequences, gb.sequences)


def test_cuda_graphs_only_on_cuda_and_grouped_products_only_for_cuda_bf16():
    from workbench.torch import moe
    m = TorchModel(ModelConfig.tiny(), random_tensors(ModelConfig.tiny(), seed=0), "float32")
    for options in (True, {"mode": "reduce-overhead"},
                    {"options": {"triton.cudagraphs": True}}):
        m.set_compile(options)
        assert m._compiled[2] is False  # CPU model
    x = torch.zeros(4, 16, dtype=torch.bfloat16)
    w = torch.zeros(2, 16, 32, dtype=torch.bfloat16)
    assert not moe.grouped(x, w)  # CPU tensors: the CPU kernels / a product per expert
