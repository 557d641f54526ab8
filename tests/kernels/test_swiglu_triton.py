"""SwiGLU's Triton kernels (CPU: Triton's interpreter) against the PyTorch reference.

Tolerances and helpers: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import pytest
import torch

from engine_kernels.dispatch import record_backends
from engine_kernels.swiglu import BLOCK, SwiGLUTritonFunction, swiglu, swiglu_reference
from tests.kernels.op_testing import DTYPES, assert_close, grads, leaf

SHAPES = [(1, 80), (3, 576), (127, 1000), (2, 3, 56), (1, BLOCK + 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_swiglu_matches_reference(triton_backend, shape, dtype):
    torch.manual_seed(6)
    device = triton_backend
    g0 = torch.randn(shape) * 4.0
    g0.view(-1)[:4] = torch.tensor([-60.0, 60.0, 0.0, -1e-3])[: g0.numel()]  # saturated sigmoid both sides
    u0, dh = torch.randn(shape), torch.randn(shape).to(device, dtype)
    g, u = leaf(g0.to(device, dtype)), leaf(u0.to(device, dtype))
    gr, ur = leaf(g0.to(device, dtype)), leaf(u0.to(device, dtype))
    with record_backends() as used:
        h = swiglu(g, u)
    assert used == {"swiglu": {"triton"}}
    assert h.grad_fn._forward_cls is SwiGLUTritonFunction
    hr = swiglu_reference(gr, ur)
    assert_close(h, hr, dtype, "swiglu.h")
    got, want = grads(h, [g, u], dh), grads(hr, [gr, ur], dh)
    assert_close(got[0], want[0], dtype, "swiglu.dgate")
    assert_close(got[1], want[1], dtype, "swiglu.dup")
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()


def test_triton_swiglu_non_contiguous(triton_backend):
    """gate and up as halves of one fused projection output (strided views)."""
    torch.manual_seed(7)
    device = triton_backend
    fused = leaf(torch.randn(9, 2 * 56, device=device))
    fused_ref = leaf(fused.detach().clone())
    gate, up = fused[:, :56], fused[:, 56:]
    out = swiglu(gate, up)
    ref = swiglu_reference(fused_ref[:, :56], fused_ref[:, 56:])
    assert_close(out, ref, torch.float32, "swiglu.h")
    dh = torch.randn_like(out)
    assert_close(grads(out, [fused], dh)[0], grads(ref, [fused_ref], dh)[0], torch.float32, "swiglu.dfused")


def test_triton_swiglu_shape_mismatch_is_an_error(triton_backend):
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(torch.randn(3, 8, device=triton_backend), torch.randn(3, 9, device=triton_backend))
