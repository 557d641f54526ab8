"""RMSNorm: forward and both gradients against the reference (Llama's rule and Gemma's ``offset`` rule, the latter
also against transformers' own ``GemmaRMSNorm``); the backward leaves its inputs alone.

Tolerances and helpers: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import pytest
import torch

from engine_kernels.rms_norm import RMSNormFunction, rms_norm, rms_norm_reference
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
    dx, dw, deps, doffset = y.grad_fn.apply(torch.ones_like(y))
    assert dx is not None and dw is None and deps is None and doffset is None


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


# --------------------------------------------------------------------------- Gemma's rule (offset)


def _gemma_module(weight: torch.Tensor, eps: float):
    """transformers' ``GemmaRMSNorm`` (the independent oracle) with ``weight`` as its parameter."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    module = GemmaRMSNorm(weight.shape[0], eps=eps)
    with torch.no_grad():
        module.weight = torch.nn.Parameter(weight.detach().clone())
    return module


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", RMS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("weight_grad", [True, False], ids=["w_grad", "w_frozen"])
def test_rms_norm_gemma_matches_transformers(shape, dtype, weight_grad):
    """offset=1: transformers' GemmaRMSNorm (random weight around 0, i.e. scale around 1) and our reference,
    forward and both gradients."""
    gen = torch.Generator().manual_seed(3)
    hidden = shape[-1]
    x0 = torch.randn(shape, generator=gen) * 3.0 + 0.5
    w0 = 0.3 * torch.randn(hidden, generator=gen)
    dy = torch.randn(shape, generator=gen).to(dtype)
    eps = 1e-6
    x, w = leaf(x0.to(dtype)), leaf(w0.to(dtype), weight_grad)
    xr, wr = leaf(x0.to(dtype)), leaf(w0.to(dtype), weight_grad)
    xt = leaf(x0.to(dtype))
    module = _gemma_module(w0.to(dtype), eps).requires_grad_(weight_grad)
    y = rms_norm(x, w, eps, offset=1.0)
    yr = rms_norm_reference(xr, wr, eps, offset=1.0)
    yt = module(xt)
    assert y.grad_fn._forward_cls is RMSNormFunction
    assert y.dtype == yt.dtype == dtype
    torch.testing.assert_close(yr, yt, rtol=0, atol=0)  # the reference IS transformers' computation
    assert_close(y, yt, dtype, "gemma_rms_norm.y")
    inputs, ref_inputs = ([x, w], [xt, module.weight]) if weight_grad else ([x], [xt])
    got, want = grads(y, inputs, dy), grads(yt, ref_inputs, dy)
    assert_close(got[0], want[0], dtype, "gemma_rms_norm.dx")
    assert_close(got[0], grads(yr, [xr], dy)[0], dtype, "gemma_rms_norm.dx_vs_reference")
    if weight_grad:
        assert_close(got[1], want[1], dtype, "gemma_rms_norm.dw", reduction=True)


def test_rms_norm_gemma_rule_differs_from_llama_rule():
    """Gemma scales in fp32 and casts once: in bf16 that is not Llama's (rounded-then-scaled) result with 1 + w."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 576, generator=gen).bfloat16()
    w = (0.3 * torch.randn(576, generator=gen)).bfloat16()
    gemma = rms_norm(x, w, 1e-6, offset=1.0)
    torch.testing.assert_close(gemma, rms_norm_reference(x, w, 1e-6, offset=1.0), rtol=0, atol=0)
    assert not torch.equal(gemma, rms_norm(x, (1.0 + w.float()).bfloat16(), 1e-6))


def test_rms_norm_gemma_fp32_weight_keeps_input_dtype():
    """Gemma's ``type_as(x)``: a bf16 input with an fp32 weight gives bf16 (Llama's rule would promote to fp32)."""
    gen = torch.Generator().manual_seed(5)
    x0, w0 = torch.randn(3, 80, generator=gen), 0.2 * torch.randn(80, generator=gen)
    x, w = leaf(x0.bfloat16()), leaf(w0)
    xt = leaf(x0.bfloat16())
    module = _gemma_module(w0, 1e-6)
    y, yt = rms_norm(x, w, 1e-6, offset=1.0), module(xt)
    assert y.dtype == yt.dtype == torch.bfloat16
    assert_close(y, yt, torch.bfloat16, "gemma_rms_norm.y")
    dy = torch.randn(3, 80, generator=gen).bfloat16()
    (dx, dw), (dxt, dwt) = grads(y, [x, w], dy), grads(yt, [xt, module.weight], dy)
    assert dw.dtype == dwt.dtype == torch.float32
    assert_close(dx, dxt, torch.bfloat16, "gemma_rms_norm.dx")
    assert_close(dw, dwt, torch.float32, "gemma_rms_norm.dw", reduction=True)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_offset_saves_the_same(offset):
    x, w = leaf(torch.randn(7, 80)), leaf(torch.zeros(80))
    with record_saved() as saved:
        rms_norm(x, w, 1e-6, offset=offset)
    assert sorted(s[0] for s in saved) == sorted([(7, 80), (80,), (7, 1)])
