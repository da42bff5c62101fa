"""``compile=`` (torch): layers run as a torch.compile'd step with the same hooks and results."""

from __future__ import annotations

import numpy as np
import pytest

import workbench as wb

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


def test_compile_argument_is_checked():
    with pytest.raises(ValueError, match="compile= applies to the torch backend"):
        wb.load(MODEL, backend="jax", compile=True)
    m = wb.load(MODEL)
    with pytest.raises(ValueError, match="compile="):
        m.set_compile("fast")
