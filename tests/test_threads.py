"""Thread choice of the torch backend: single-threaded small CPU calls, ``threads=``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.torch.model import SMALL_CALL_TOKENS

MODEL = "data/scout-mini"


def test_small_calls_run_on_one_thread_and_torch_setting_is_restored(monkeypatch):
    m = wb.load(MODEL)
    seen = []
    inner = m._forward_inner

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return inner(*a, **k)

    monkeypatch.setattr(m, "_forward_inner", spy)
    before = torch.get_num_threads()
    ids = np.arange(8)[None]
    small = m.run(ids).logits
    m.run(np.zeros((1, SMALL_CALL_TOKENS), np.int64))
    assert seen == [1, before] and torch.get_num_threads() == before
    assert m.threads_for(1) == 1 and m.threads_for(SMALL_CALL_TOKENS) is None
    m.threads = 2
    assert m.threads_for(1) == 2
    np.testing.assert_allclose(m.run(ids).logits, small, rtol=1e-5, atol=1e-5)  # to rounding


def test_threads_argument():
    m = wb.load(MODEL, threads=1)
    assert m.threads == 1 and m.threads_for(10_000) == 1
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads"):
            wb.load(MODEL, threads=bad)
    with pytest.raises(ValueError, match="torch backend"):
        wb.load(MODEL, backend="jax", threads=1)
