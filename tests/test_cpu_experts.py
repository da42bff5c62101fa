"""The torch CPU expert phase: split over two threads, bf16 through fp32, same values."""

from __future__ import annotations

import torch

from workbench.torch import moe


def _case(E: int = 12, A: int = 40, D: int = 32, inter: int = 24, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    sorted_e = torch.sort(torch.randint(0, E, (A,), generator=g)).values
    xin = torch.randn(A, D, generator=g).to(dtype)
    gate_up = (torch.randn(E, D, 2 * inter, generator=g) / D ** 0.5).to(dtype)
    down = (torch.randn(E, inter, D, generator=g) / inter ** 0.5).to(dtype)
    return xin, sorted_e, gate_up, down


def _reference(xin, sorted_e, gate_up, down):
    """Each row through its expert, one at a time, in fp32."""
    out = []
    for x, e in zip(xin.float(), sorted_e.tolist()):
        gu = x @ gate_up[e].float()
        inter = gu.shape[-1] // 2
        out.append((gu[inter:] * torch.nn.functional.silu(gu[:inter])) @ down[e].float())
    return torch.stack(out)


def test_split_equals_one_thread_and_reference(monkeypatch):
    xin, sorted_e, gate_up, down = _case()
    with torch.inference_mode():
        split = moe.cpu_expert_rows(xin, sorted_e, gate_up, down)
        monkeypatch.setattr(moe, "MIN_SPLIT_EXPERTS", 10 ** 9)
        single = moe.cpu_expert_rows(xin, sorted_e, gate_up, down)
    torch.testing.assert_close(split, single, rtol=0, atol=0)
    torch.testing.assert_close(split, _reference(xin, sorted_e, gate_up, down),
                               rtol=1e-5, atol=1e-5)
    # the autograd path (a loop of per-expert products) gives the same rows
    loop = moe.expert_rows(xin, sorted_e, (gate_up, down))
    torch.testing.assert_close(split, loop.detach(), rtol=1e-6, atol=1e-6)


def test_bf16_rows_round_once_from_fp32():
    xin, sorted_e, gate_up, down = _case(dtype=torch.bfloat16)
    w = gate_up[3]
    one = moe._mm(xin[:1], w)
    many = moe._mm(xin[:5], w)
    exact = (xin[:5].float() @ w.float()).bfloat16()
    assert one.dtype == many.dtype == torch.bfloat16
    torch.testing.assert_close(one, exact[:1], rtol=0, atol=0)  # mv: same values as the upcast
    torch.testing.assert_close(many, exact, rtol=0, atol=0)
    with torch.inference_mode():
        rows = moe.cpu_expert_rows(xin, sorted_e, gate_up, down)
    torch.testing.assert_close(rows.float(), _reference(xin, sorted_e, gate_up, down),
                               rtol=2e-2, atol=2e-2)
