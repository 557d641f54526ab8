"""LoRA linear over dense and NF4 bases: forward and gradients against the reference, dropout, saved memory.

Tolerances and helpers: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import pytest
import torch

from engine_kernels.lora_linear import LoRALinearFunction, lora_linear, lora_linear_reference
from engine_kernels.nf4 import NF4Weight, nf4_dequantize, nf4_quantize
from tests.kernels.op_testing import DTYPES, assert_close, grads, leaf, record_saved

# --------------------------------------------------------------------------- LoRA linear

LORA_SHAPES = [
    # (x shape, out_features, rank)
    pytest.param((3, 80), 576, 8, id="3x80_to576_r8"),
    pytest.param((1, 80), 67, 4, id="1x80_to67_r4"),
    pytest.param((2, 5, 80), 67, 3, id="2x5x80_to67_r3"),
    pytest.param((127, 576), 80, 16, id="127x576_to80_r16"),
]


def _lora_params(in_f, out_f, rank, seed=8):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * in_f**-0.5
    bias = torch.randn(out_f, generator=g) * 0.1
    a = torch.randn(rank, in_f, generator=g) * in_f**-0.5
    b = torch.randn(out_f, rank, generator=g) * 0.5  # non-zero so every gradient is exercised
    return w, bias, a, b


def _make_base(w: torch.Tensor, base: str, dtype: torch.dtype):
    if base == "dense":
        return w.to(dtype)
    return nf4_quantize(w.to(dtype), blocksize=64, double_quant=base == "nf4_dq")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", ["dense", "nf4", "nf4_dq"])
@pytest.mark.parametrize("x_shape,out_f,rank", LORA_SHAPES)
def test_lora_linear_matches_reference(x_shape, out_f, rank, base, dtype):
    torch.manual_seed(9)
    in_f = x_shape[-1]
    w, bias, a0, b0 = _lora_params(in_f, out_f, rank)
    weight = _make_base(w, base, dtype)
    bias = bias.to(dtype) if out_f != 80 else None
    x0 = torch.randn(x_shape)
    dy = torch.randn(*x_shape[:-1], out_f).to(dtype)
    scaling = 16 / rank

    x, a, b = leaf(x0.to(dtype)), leaf(a0.to(dtype)), leaf(b0.to(dtype))
    xr, ar, br = leaf(x0.to(dtype)), leaf(a0.to(dtype)), leaf(b0.to(dtype))
    y = lora_linear(x, weight, bias, a, b, scaling)
    yr = lora_linear_reference(xr, weight, bias, ar, br, scaling)
    assert y.dtype == dtype and y.shape == (*x_shape[:-1], out_f)
    assert y.grad_fn._forward_cls is LoRALinearFunction
    assert_close(y, yr, dtype, "lora.y", reduction=True)
    got, want = grads(y, [x, a, b], dy), grads(yr, [xr, ar, br], dy)
    for name, g_, w_ in zip(("dx", "dA", "dB"), got, want):
        assert_close(g_, w_, dtype, f"lora.{name}", reduction=True)


def test_lora_linear_nf4_base_matches_its_dequantized_dense_base():
    torch.manual_seed(10)
    w, bias, a0, b0 = _lora_params(80, 67, 4)
    nf4 = nf4_quantize(w, blocksize=64, double_quant=True)
    dense = nf4_dequantize(nf4, dtype=torch.float32)
    x0, dy = torch.randn(3, 80), torch.randn(3, 67)
    x1, a1, b1 = leaf(x0), leaf(a0), leaf(b0)
    x2, a2, b2 = leaf(x0), leaf(a0), leaf(b0)
    y1 = lora_linear(x1, nf4, bias, a1, b1, 2.0)
    y2 = lora_linear(x2, dense, bias, a2, b2, 2.0)
    assert torch.equal(y1, y2)
    for n, g1, g2 in zip(("dx", "dA", "dB"), grads(y1, [x1, a1, b1], dy), grads(y2, [x2, a2, b2], dy)):
        assert torch.equal(g1, g2), n


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_fp32_adapters_on_bf16_activations(dtype):
    """LoRA weights kept in fp32 while activations (and the base) are ``dtype``: grads come back in fp32."""
    torch.manual_seed(11)
    w, bias, a0, b0 = _lora_params(80, 67, 8)
    weight = nf4_quantize(w.to(dtype), blocksize=64)
    x0, dy = torch.randn(3, 80), torch.randn(3, 67).to(dtype)
    x, a, b = leaf(x0.to(dtype)), leaf(a0), leaf(b0)
    xr, ar, br = leaf(x0.to(dtype)), leaf(a0), leaf(b0)
    y = lora_linear(x, weight, bias.to(dtype), a, b, 0.5)
    yr = lora_linear_reference(xr, weight, bias.to(dtype), ar, br, 0.5)
    assert_close(y, yr, dtype, "lora.y", reduction=True)
    got, want = grads(y, [x, a, b], dy), grads(yr, [xr, ar, br], dy)
    assert got[1].dtype == got[2].dtype == torch.float32
    for name, g_, w_ in zip(("dx", "dA", "dB"), got, want):
        assert_close(g_, w_, dtype, f"lora.{name}", reduction=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_lora_linear_dropout_matches_reference_with_same_mask(p, base, dtype):
    torch.manual_seed(12)
    x_shape, out_f, rank = (2, 5, 80), 67, 4
    w, bias, a0, b0 = _lora_params(80, out_f, rank)
    weight = _make_base(w, base, dtype)
    x0, dy = torch.randn(x_shape).to(dtype), torch.randn(2, 5, out_f).to(dtype)
    x, a, b = leaf(x0), leaf(a0.to(dtype)), leaf(b0.to(dtype))
    xr, ar, br = leaf(x0), leaf(a0.to(dtype)), leaf(b0.to(dtype))

    torch.manual_seed(1234)
    y = lora_linear(x, weight, bias.to(dtype), a, b, 2.0, dropout_p=p, training=True)
    torch.manual_seed(1234)
    mask = torch.empty_like(xr, dtype=torch.bool).bernoulli_(1.0 - p)
    assert 0 < mask.sum() < mask.numel()
    yr = lora_linear_reference(xr, weight, bias.to(dtype), ar, br, 2.0, dropout_mask=mask, dropout_p=p)
    assert_close(y, yr, dtype, "lora.y", reduction=True)
    got, want = grads(y, [x, a, b], dy), grads(yr, [xr, ar, br], dy)
    for name, g_, w_ in zip(("dx", "dA", "dB"), got, want):
        assert_close(g_, w_, dtype, f"lora.{name}", reduction=True)

    # Dropout really acts: without the mask the reference differs.
    y_nodrop = lora_linear_reference(xr, weight, bias.to(dtype), ar, br, 2.0)
    assert not torch.allclose(y.float(), y_nodrop.float(), atol=1e-3)


def test_lora_linear_dropout_inactive_when_not_training():
    torch.manual_seed(13)
    w, bias, a0, b0 = _lora_params(80, 67, 4)
    x0, dy = torch.randn(3, 80), torch.randn(3, 67)
    x, a, b = leaf(x0), leaf(a0), leaf(b0)
    xr, ar, br = leaf(x0), leaf(a0), leaf(b0)
    y = lora_linear(x, w, bias, a, b, 2.0, dropout_p=0.5, training=False)
    yr = lora_linear_reference(xr, w, bias, ar, br, 2.0)
    assert_close(y, yr, torch.float32, "lora.y")
    assert y.grad_fn.saved_tensors[-1] is None  # no mask saved
    for name, g_, w_ in zip(("dx", "dA", "dB"), grads(y, [x, a, b], dy), grads(yr, [xr, ar, br], dy)):
        assert_close(g_, w_, torch.float32, f"lora.{name}")


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_lora_linear_without_adapter(base):
    torch.manual_seed(14)
    w, bias, _, _ = _lora_params(80, 67, 4)
    weight = _make_base(w, base, torch.float32)
    x0, dy = torch.randn(2, 3, 80), torch.randn(2, 3, 67)
    x, xr = leaf(x0), leaf(x0)
    y = lora_linear(x, weight, bias)
    yr = lora_linear_reference(xr, weight, bias, None, None, 1.0)
    assert_close(y, yr, torch.float32, "lora.y")
    assert_close(grads(y, [x], dy)[0], grads(yr, [xr], dy)[0], torch.float32, "lora.dx")


def test_lora_linear_frozen_input_only_adapter_grads():
    """x does not require grad (first layer): only dA and dB are computed."""
    torch.manual_seed(15)
    w, bias, a0, b0 = _lora_params(80, 67, 4)
    x0, dy = torch.randn(3, 80), torch.randn(3, 67)
    a, b = leaf(a0), leaf(b0)
    ar, br = leaf(a0), leaf(b0)
    y = lora_linear(x0, w, bias, a, b, 2.0)
    yr = lora_linear_reference(x0, w, bias, ar, br, 2.0)
    returned = y.grad_fn.apply(dy)  # the Function's own backward, before autograd frees the saved tensors
    assert returned[0] is None and returned[1] is None and returned[2] is None
    got, want = grads(y, [a, b], dy), grads(yr, [ar, br], dy)
    assert_close(got[0], want[0], torch.float32, "lora.dA")
    assert_close(got[1], want[1], torch.float32, "lora.dB")


def test_lora_linear_requires_both_adapters():
    _, _, a, b = _lora_params(80, 67, 4)
    w = torch.randn(67, 80)
    with pytest.raises(ValueError):
        lora_linear(torch.randn(3, 80), w, None, a, None)
    with pytest.raises(ValueError):
        lora_linear(torch.randn(3, 80), w, None, None, b)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_linear_nf4_never_saves_dense_weight(double_quant, dropout):
    torch.manual_seed(16)
    in_f, out_f, rank = 576, 1000, 8
    w, _, a0, b0 = _lora_params(in_f, out_f, rank)
    nf4 = nf4_quantize(w, blocksize=64, double_quant=double_quant)
    dense_bytes = w.numel() * w.element_size()
    x, a, b = leaf(torch.randn(3, in_f)), leaf(a0), leaf(b0)
    with record_saved() as saved:
        y = lora_linear(x, nf4, None, a, b, 2.0, dropout_p=dropout, training=True)
    total = sum(nbytes for _, _, nbytes in saved)
    assert total < dense_bytes, f"saved {total} bytes >= dense weight {dense_bytes}: {saved}"
    for shape, dtype, _ in saved:
        assert shape not in ((out_f, in_f), (in_f, out_f)), f"a dense weight copy {shape} {dtype} was saved"
    assert isinstance(y.grad_fn.base, NF4Weight)
    # Nothing dense is hiding on the context either.
    for value in vars(y.grad_fn).values():
        if isinstance(value, torch.Tensor):
            assert value.numel() < w.numel()
    # And the backward still runs (dequantizing again).
    dx, da, db = grads(y, [x, a, b], torch.randn(3, out_f))
    assert dx.shape == x.shape and da.shape == a.shape and db.shape == b.shape
