"""RMSNorm's Triton kernels (CPU: Triton's interpreter) against the PyTorch reference.

Tolerances and helpers: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import pytest
import torch

from engine_kernels.dispatch import record_backends
from engine_kernels.rms_norm import (
    MAX_FUSED_BACKWARD,
    RMSNormTritonFunction,
    _backward_programs,
    rms_norm,
    rms_norm_reference,
)
from tests.kernels.op_testing import DTYPES, assert_close, grads, leaf

# 4100 columns: wider than MAX_FUSED_BACKWARD, so the two-step backward (row dot, then column tiles) runs.
SHAPES = [(1, 80), (3, 576), (127, 1000), (2, 3, 80), (5, 4100)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("weight_grad", [True, False], ids=["w_grad", "w_frozen"])
def test_triton_rms_norm_matches_reference(triton_backend, shape, dtype, weight_grad):
    assert max(s[-1] for s in SHAPES) > MAX_FUSED_BACKWARD  # both backward variants are covered
    torch.manual_seed(0)
    device = triton_backend
    x0 = torch.randn(shape) * 3.0 + 0.5
    w0 = 1.0 + 0.1 * torch.randn(shape[-1])
    dy = torch.randn(shape).to(device, dtype)
    eps = 1e-6 if shape[-1] != 576 else 1e-5
    x, w = leaf(x0.to(device, dtype)), leaf(w0.to(device, dtype), weight_grad)
    xr, wr = leaf(x0.to(device, dtype)), leaf(w0.to(device, dtype), weight_grad)
    with record_backends() as used:
        y = rms_norm(x, w, eps)
    assert used == {"rms_norm": {"triton"}}
    assert y.grad_fn._forward_cls is RMSNormTritonFunction
    yr = rms_norm_reference(xr, wr, eps)
    assert_close(y, yr, dtype, "rms_norm.y")
    inputs, ref_inputs = ([x, w], [xr, wr]) if weight_grad else ([x], [xr])
    got, want = grads(y, inputs, dy), grads(yr, ref_inputs, dy)
    assert_close(got[0], want[0], dtype, "rms_norm.dx")
    if weight_grad:
        assert_close(got[1], want[1], dtype, "rms_norm.dw", reduction=True)


def test_triton_rms_norm_weight_grad_only_and_inputs_untouched(triton_backend):
    """Only dw wanted (frozen input); the backward leaves x and dy as they were."""
    torch.manual_seed(1)
    device = triton_backend
    x = torch.randn(37, 576, device=device)  # more rows than backward programs: each walks several
    assert _backward_programs(37, x.device) < 37
    dy = torch.randn(37, 576, device=device)
    x_copy, dy_copy = x.clone(), dy.clone()
    w, wr = leaf(1.0 + 0.1 * torch.randn(576, device=device)), None
    wr = leaf(w.detach().clone())
    (dw,) = grads(rms_norm(x, w, 1e-5), [w], dy)
    (dw_ref,) = grads(rms_norm_reference(x, wr, 1e-5), [wr], dy)
    assert_close(dw, dw_ref, torch.float32, "rms_norm.dw", reduction=True)
    assert torch.equal(x, x_copy) and torch.equal(dy, dy_copy)


def test_triton_rms_norm_non_contiguous_rows(triton_backend):
    """A strided view (rows of a wider tensor) is normalised as its contiguous copy."""
    torch.manual_seed(2)
    device = triton_backend
    wide = torch.randn(5, 200, device=device)
    x = leaf(wide[:, :80].clone()).detach()
    view = wide[:, :80]
    w = torch.randn(80, device=device)
    assert_close(rms_norm(view, w, 1e-6), rms_norm_reference(x, w, 1e-6), torch.float32, "rms_norm.y")


def test_triton_rms_norm_mixed_dtypes(triton_backend):
    """bf16 input with an fp32 weight (Llama's casting rule): the output is fp32, like the reference.

    The normalised row passes through bf16 (the cast before scaling), so it is compared at bf16 tolerance:
    Triton's interpreter rounds fp32 -> bf16 toward zero where GPUs round to nearest even.
    """
    device = triton_backend
    x = torch.randn(3, 80, device=device).to(torch.bfloat16)
    w = torch.randn(80, device=device)
    y, yr = rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)
    assert y.dtype == yr.dtype == torch.float32
    assert_close(y, yr, torch.bfloat16 if y.device.type == "cpu" else torch.float32, "rms_norm.y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 80), (37, 576), (2, 3, 256), (5, 4100)], ids=lambda s: "x".join(map(str, s)))
def test_triton_rms_norm_gemma_offset_matches_torch_path(triton_backend, shape, dtype, monkeypatch):
    """offset=1 (Gemma, ``HAS_OFFSET``): the Triton kernels against the PyTorch path and the reference, forward,
    ``dx`` and ``dw``; both backward variants (4100 columns: the two-step one)."""
    gen = torch.Generator().manual_seed(3)
    device = triton_backend
    x0 = torch.randn(shape, generator=gen) * 3.0 + 0.5
    w0 = 0.3 * torch.randn(shape[-1], generator=gen)
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    x, w = leaf(x0.to(device, dtype)), leaf(w0.to(device, dtype))
    xr, wr = leaf(x0.to(device, dtype)), leaf(w0.to(device, dtype))
    with record_backends() as used:
        y = rms_norm(x, w, 1e-6, offset=1.0)
    assert used == {"rms_norm": {"triton"}}
    assert y.grad_fn._forward_cls is RMSNormTritonFunction and y.dtype == dtype
    got = grads(y, [x, w], dy)
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    yt = rms_norm(xr, wr, 1e-6, offset=1.0)
    want = grads(yt, [xr, wr], dy)
    assert_close(y, yt, dtype, "gemma_rms_norm.y")
    assert_close(y, rms_norm_reference(xr.detach(), wr.detach(), 1e-6, offset=1.0), dtype, "gemma_rms_norm.y_ref")
    assert_close(got[0], want[0], dtype, "gemma_rms_norm.dx")
    assert_close(got[1], want[1], dtype, "gemma_rms_norm.dw", reduction=True)


def test_triton_rms_norm_gemma_fp32_weight_keeps_input_dtype(triton_backend):
    """Gemma's rule casts to x's dtype even with an fp32 weight; dw comes back in the weight's dtype."""
    device = triton_backend
    gen = torch.Generator().manual_seed(4)
    x = leaf(torch.randn(3, 80, generator=gen).to(device, torch.bfloat16))
    w = leaf((0.2 * torch.randn(80, generator=gen)).to(device))
    xr, wr = leaf(x.detach()), leaf(w.detach())
    y, yr = rms_norm(x, w, 1e-6, offset=1.0), rms_norm_reference(xr, wr, 1e-6, offset=1.0)
    assert y.dtype == yr.dtype == torch.bfloat16
    assert_close(y, yr, torch.bfloat16, "gemma_rms_norm.y")
    dy = torch.randn(3, 80, generator=gen).to(device, torch.bfloat16)
    (dx, dw), (dxr, dwr) = grads(y, [x, w], dy), grads(yr, [xr, wr], dy)
    assert dw.dtype == torch.float32
    assert_close(dx, dxr, torch.bfloat16, "gemma_rms_norm.dx")
    assert_close(dw, dwr, torch.float32, "gemma_rms_norm.dw", reduction=True)
