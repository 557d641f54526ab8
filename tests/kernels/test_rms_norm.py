"""RMSNorm: forward and both gradients against the reference; the backward leaves its inputs alone.

Tolerances and helpers: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import pytest
import torch

from kernels.rms_norm import RMSNormFunction, rms_norm, rms_norm_reference
from tests.kernels.op_testing import DTYPES, assert_close, grads, leaf, record_saved

# --------------------------------------------------------------------------- RMSNorm

RMS_SHAPES = [(1, 80), (3, 576), (127, 1000), (2, 3, 80)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", RMS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("weight_grad", [True, False], ids=["w_grad", "w_frozen"])
def test_rms_norm_matches_reference(shape, dtype, weight_grad):
    torch.manual_seed(0)
    hidden = shape[-1]
    x0 = torch.randn(shape) * 3.0 + 0.5
    w0 = 1.0 + 0.1 * torch.randn(hidden)
    dy = torch.randn(shape).to(dtype)
    eps = 1e-6 if hidden != 576 else 1e-5

    x, w = leaf(x0.to(dtype)), leaf(w0.to(dtype), weight_grad)
    xr, wr = leaf(x0.to(dtype)), leaf(w0.to(dtype), weight_grad)
    y = rms_norm(x, w, eps)
    yr = rms_norm_reference(xr, wr, eps)
    assert y.grad_fn._forward_cls is RMSNormFunction
    assert_close(y, yr, dtype, "rms_norm.y")

    inputs, ref_inputs = ([x, w], [xr, wr]) if weight_grad else ([x], [xr])
    got, want = grads(y, inputs, dy), grads(yr, ref_inputs, dy)
    assert_close(got[0], want[0], dtype, "rms_norm.dx")
    if weight_grad:
        # dw sums over all rows: a long reduction in bf16.
        assert_close(got[1], want[1], dtype, "rms_norm.dw", reduction=True)


def test_rms_norm_frozen_weight_gets_no_gradient():
    x = leaf(torch.randn(3, 80))
    w = leaf(torch.ones(80), False)
    y = rms_norm(x, w, 1e-6)
    dx, dw, deps = y.grad_fn.apply(torch.ones_like(y))
    assert dx is not None and dw is None and deps is None


def test_rms_norm_weight_grad_only():
    """x does not require grad (e.g. a frozen embedding output): only dw is computed."""
    torch.manual_seed(1)
    x0, w0, dy = torch.randn(3, 576), 1.0 + 0.1 * torch.randn(576), torch.randn(3, 576)
    w, wr = leaf(w0), leaf(w0)
    y, yr = rms_norm(x0, w, 1e-5), rms_norm_reference(x0, wr, 1e-5)
    assert_close(grads(y, [w], dy)[0], grads(yr, [wr], dy)[0], torch.float32, "rms_norm.dw", reduction=True)


def test_rms_norm_mixed_precision_fp32_weight_bf16_input():
    """An fp32 weight with bf16 activations (the weight promotes the output to fp32, as in HF)."""
    torch.manual_seed(1)
    x0, w0 = torch.randn(3, 80), 1.0 + 0.1 * torch.randn(80)
    x, w = leaf(x0.bfloat16()), leaf(w0)
    xr, wr = leaf(x0.bfloat16()), leaf(w0)
    y, yr = rms_norm(x, w, 1e-6), rms_norm_reference(xr, wr, 1e-6)
    assert y.dtype == yr.dtype == torch.float32
    assert_close(y, yr, torch.bfloat16, "rms_norm.y")
    dy = torch.randn(3, 80)
    (dx, dw), (dxr, dwr) = grads(y, [x, w], dy), grads(yr, [xr, wr], dy)
    assert_close(dx, dxr, torch.bfloat16, "rms_norm.dx")
    assert_close(dw, dwr, torch.bfloat16, "rms_norm.dw", reduction=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_backward_does_not_modify_inputs(dtype):
    torch.manual_seed(2)
    x = leaf(torch.randn(5, 80).to(dtype))
    w = leaf((1.0 + 0.1 * torch.randn(80)).to(dtype))
    dy = torch.randn(5, 80).to(dtype)
    snapshot = [t.detach().clone() for t in (x, w, dy)]
    versions = [t._version for t in (x, w, dy)]
    y = rms_norm(x, w, 1e-6)
    y_before = y.detach().clone()
    y.backward(dy)
    for name, t, before, version in zip(("x", "weight", "dy"), (x, w, dy), snapshot, versions):
        assert t._version == version, f"{name} was written in place"
        assert torch.equal(t.detach(), before), f"{name} changed during backward"
    assert torch.equal(y.detach(), y_before), "output changed during backward"


def test_rms_norm_saves_input_not_a_copy():
    """Saved for backward: x itself (no normalised copy), the weight, and one fp32 rstd per row."""
    x = leaf(torch.randn(7, 80))
    w = leaf(torch.ones(80))
    with record_saved() as saved:
        y = rms_norm(x, w, 1e-6)
    assert sorted(s[0] for s in saved) == sorted([(7, 80), (80,), (7, 1)])
    assert y.grad_fn.saved_tensors[0] is not None
    assert y.grad_fn.saved_tensors[0].data_ptr() == x.data_ptr()
