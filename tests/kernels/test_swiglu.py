"""SwiGLU: forward and gradients against the reference; only gate and up are saved for backward.

Tolerances and helpers: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import pytest
import torch

from engine_kernels.swiglu import SwiGLUFunction, swiglu, swiglu_reference
from tests.kernels.op_testing import DTYPES, assert_close, grads, leaf, record_saved

# --------------------------------------------------------------------------- SwiGLU

SWIGLU_SHAPES = [(1, 80), (3, 576), (127, 1000), (2, 3, 56)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_swiglu_matches_reference(shape, dtype):
    torch.manual_seed(6)
    g0 = torch.randn(shape) * 4.0  # wide range: saturated sigmoid on both sides
    g0.view(-1)[:4] = torch.tensor([-60.0, 60.0, 0.0, -1e-3])[: g0.numel()]
    u0 = torch.randn(shape)
    dh = torch.randn(shape).to(dtype)
    g, u = leaf(g0.to(dtype)), leaf(u0.to(dtype))
    gr, ur = leaf(g0.to(dtype)), leaf(u0.to(dtype))
    h, hr = swiglu(g, u), swiglu_reference(gr, ur)
    assert h.grad_fn._forward_cls is SwiGLUFunction
    assert_close(h, hr, dtype, "swiglu.h")
    got, want = grads(h, [g, u], dh), grads(hr, [gr, ur], dh)
    assert_close(got[0], want[0], dtype, "swiglu.dgate")
    assert_close(got[1], want[1], dtype, "swiglu.dup")
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()


@pytest.mark.parametrize("requires", [(True, False), (False, True)], ids=["gate_only", "up_only"])
def test_swiglu_one_input_requires_grad(requires):
    torch.manual_seed(7)
    g0, u0, dh = torch.randn(3, 80), torch.randn(3, 80), torch.randn(3, 80)
    g, u = leaf(g0, requires[0]), leaf(u0, requires[1])
    gr, ur = leaf(g0, requires[0]), leaf(u0, requires[1])
    target, ref_target = (g, gr) if requires[0] else (u, ur)
    (got,), (want,) = grads(swiglu(g, u), [target], dh), grads(swiglu_reference(gr, ur), [ref_target], dh)
    assert_close(got, want, torch.float32, "swiglu.grad")


def test_swiglu_saves_only_two_tensors():
    gate, up = leaf(torch.randn(3, 80)), leaf(torch.randn(3, 80))
    with record_saved() as saved:
        out = swiglu(gate, up)
    assert len(saved) == 2, f"SwiGLUFunction saved {len(saved)} tensors: {saved}"
    assert len(out.grad_fn.saved_tensors) == 2
    # The two saved tensors are the inputs themselves, not copies.
    ptrs = {t.data_ptr() for t in out.grad_fn.saved_tensors}
    assert ptrs == {gate.data_ptr(), up.data_ptr()}
    # For comparison, plain autograd keeps more (silu(gate) as well).
    with record_saved() as ref_saved:
        swiglu_reference(gate, up)
    assert len(ref_saved) > 2
