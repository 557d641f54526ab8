"""Tests of the compute ops in ``kernels/``: each fused/hand-written op against its plain-PyTorch reference.

Every test compares the forward output *and every gradient* of the op (its
``torch.autograd.Function`` with a hand-written backward) with the reference
differentiated by autograd, over deliberately odd shapes (rows 1 / 3 / 127,
hidden 80 / 576 / 1000, vocab 1009 and 49152, 3 heads / 1 KV head, 5 / 5,
head_dim 24 / 64), in fp32 and bf16.

Tolerances (as Liger-Kernel states them, one pair per dtype) are applied to the
*scale* of the expected tensor: ``|actual - expected| <= atol * scale + rtol * |expected|``
with ``scale = max(1, max|expected|)``. fp32 runs the same math in a different
order (hand-written backward, chunked loss), so it agrees to about 1e-6 relative;
bf16 differs by a few bf16 rounding steps (8 mantissa bits, eps = 2**-7). Results of long
reductions get both tolerances doubled (``REDUCTION_FACTOR``).

Besides numerics, the tests check the properties the ops' docstrings promise:
RMSNorm's backward does not write into its inputs, SwiGLU saves only ``gate`` and
``up``, LoRA with an NF4 base never saves a dense copy of the weight, the fused
cross-entropy never keeps ``[N, V]`` logits, the attention mask follows the
documented visibility rules, and ``ENGINE_KERNELS`` selects (or refuses) a backend.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import dispatch
from kernels.attention import attention, attention_reference, build_attention_mask
from kernels.cross_entropy import (
    FusedLinearCrossEntropyFunction,
    cross_entropy_reference,
    default_chunk_size,
    fused_linear_cross_entropy,
)
from kernels.dispatch import describe_backends, select_backend
from kernels.errors import ConfigurationError, EngineError
from kernels.lora_linear import LoRALinearFunction, lora_linear, lora_linear_reference
from kernels.nf4 import NF4Weight, nf4_dequantize, nf4_quantize
from kernels.rms_norm import RMSNormFunction, rms_norm, rms_norm_reference
from kernels.rope import RoPEFunction, rope, rope_cos_sin, rope_reference
from kernels.swiglu import SwiGLUFunction, swiglu, swiglu_reference

# --------------------------------------------------------------------------- tolerances

#: Absolute tolerance per dtype, multiplied by the scale (max |expected|, at least 1) of the compared tensor.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
#: Relative tolerance per dtype.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
#: Both tolerances are multiplied by this for results of long reductions (matmuls over H or V, sums over rows),
#: whose summation order legitimately differs between the fused op and the reference.
REDUCTION_FACTOR = 2.0

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    """Every numerical test runs the PyTorch path, whatever the caller's environment says."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def tolerances(dtype: torch.dtype, reduction: bool = False) -> tuple[float, float]:
    """``(atol, rtol)`` for ``dtype``, widened by :data:`REDUCTION_FACTOR` for long reductions."""
    factor = REDUCTION_FACTOR if reduction else 1.0
    return ATOL[dtype] * factor, RTOL[dtype] * factor


def assert_close(actual, expected, dtype: torch.dtype, name: str, *, reduction: bool = False):
    """Compare two tensors with the per-dtype tolerances; on failure report where and by how much.

    The message names the tensor, the number of mismatching elements, the max abs error
    and the index where the tolerance is exceeded the most, with both values there.
    """
    assert actual is not None, f"{name}: got None, expected a tensor"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    atol, rtol = tolerances(dtype, reduction)
    a = actual.detach().float().cpu()
    e = expected.detach().float().cpu()
    finite_e = e[torch.isfinite(e)]
    scale = max(1.0, finite_e.abs().max().item()) if finite_e.numel() else 1.0
    diff = (a - e).abs()
    allowed = atol * scale + rtol * e.abs()
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    inf_mismatch = (torch.isinf(a) | torch.isinf(e)) & (a != e)
    both_special = (torch.isnan(a) & torch.isnan(e)) | (torch.isinf(a) & (a == e))
    excess = torch.where(both_special, torch.zeros_like(diff), diff - allowed)
    bad = (excess > 0) | nan_mismatch | inf_mismatch
    if bad.any():
        excess = torch.where(nan_mismatch | inf_mismatch, torch.full_like(excess, float("inf")), excess)
        flat = int(torch.argmax(excess.reshape(-1)).item())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
        finite = torch.isfinite(diff)
        max_abs = diff[finite].max().item() if finite.any() else float("nan")
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())}/{bad.numel()} elements out of tolerance "
            f"(atol={atol}*scale {scale:.3g}, rtol={rtol}); max abs err {max_abs:.3e}; "
            f"worst at index {idx}: actual {a[idx].item()!r} vs expected {e[idx].item()!r}"
        )


def grads(out, inputs, grad_out):
    """Gradients of ``out`` (with upstream ``grad_out``) w.r.t. ``inputs`` (each must require grad)."""
    return torch.autograd.grad(out, inputs, grad_out)


def leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return t.detach().clone().requires_grad_(requires_grad)


@contextmanager
def record_saved():
    """Record ``(shape, dtype, nbytes)`` of every tensor autograd saves for backward inside the block."""
    saved: list[tuple[tuple[int, ...], torch.dtype, int]] = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def test_assert_close_reports_location():
    expected = torch.zeros(3, 4)
    actual = expected.clone()
    actual[2, 1] = 0.5
    with pytest.raises(AssertionError, match=r"1/12 elements.*max abs err 5\.000e-01.*index \(2, 1\)"):
        assert_close(actual, expected, torch.float32, "probe")
    nan = expected.clone()
    nan[0, 3] = float("nan")
    with pytest.raises(AssertionError, match=r"index \(0, 3\)"):
        assert_close(nan, expected, torch.float32, "probe")
    assert_close(expected + 5e-6, expected, torch.float32, "within")


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


# --------------------------------------------------------------------------- RoPE

ROPE_CASES = [
    # (batch, seq, heads, kv_heads, head_dim)
    pytest.param((2, 9, 3, 1, 24), id="h3_kv1_d24"),
    pytest.param((1, 7, 5, 5, 64), id="h5_kv5_d64"),
    pytest.param((1, 1, 3, 1, 24), id="single_token"),
]


def _inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def _packed_positions(batch: int, seq: int) -> torch.Tensor:
    """Position ids with restarts (several packed documents per row), different per row."""
    rows = []
    for b in range(batch):
        starts = {0, 3 + b, 5 + 2 * b}
        pos, p = [], 0
        for t in range(seq):
            p = 0 if t in starts else p + 1
            pos.append(p)
        rows.append(pos)
    return torch.tensor(rows, dtype=torch.long)


def test_rope_cos_sin_tables():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 7]])
    inv = _inv_freq(24)
    cos, sin = rope_cos_sin(pos, inv, 0.75, torch.float32)
    assert cos.shape == sin.shape == (1, 7, 1, 24)
    angles = pos[0, :, None].double() * inv.double()
    angles = torch.cat([angles, angles], dim=-1)
    torch.testing.assert_close(cos[0, :, 0], (angles.cos() * 0.75).float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin[0, :, 0], (angles.sin() * 0.75).float(), rtol=1e-6, atol=1e-6)
    # A restart at position 0 gives the identity rotation (up to attention_scaling).
    assert torch.equal(cos[0, 3, 0], torch.full((24,), 0.75))
    assert torch.equal(sin[0, 3, 0], torch.zeros(24))
    cos16, _ = rope_cos_sin(pos, inv, 1.0, torch.bfloat16)
    assert cos16.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROPE_CASES)
@pytest.mark.parametrize("scaling", [1.0, 0.7], ids=["scale1", "scale0.7"])
def test_rope_matches_reference(case, dtype, scaling):
    torch.manual_seed(3)
    b, s, h, kv, d = case
    pos = _packed_positions(b, s)
    cos, sin = rope_cos_sin(pos, _inv_freq(d), scaling, dtype)
    q0, k0 = torch.randn(b, s, h, d), torch.randn(b, s, kv, d)
    dq_out, dk_out = torch.randn(b, s, h, d).to(dtype), torch.randn(b, s, kv, d).to(dtype)

    q, k = leaf(q0.to(dtype)), leaf(k0.to(dtype))
    qr, kr = leaf(q0.to(dtype)), leaf(k0.to(dtype))
    qo, ko = rope(q, k, cos, sin)
    qro, kro = rope_reference(qr, kr, cos, sin)
    assert qo.grad_fn._forward_cls is RoPEFunction
    assert_close(qo, qro, dtype, "rope.q")
    assert_close(ko, kro, dtype, "rope.k")

    got = grads((qo, ko), [q, k], (dq_out, dk_out))
    want = grads((qro, kro), [qr, kr], (dq_out, dk_out))
    assert_close(got[0], want[0], dtype, "rope.dq")
    assert_close(got[1], want[1], dtype, "rope.dk")


@pytest.mark.parametrize("which", ["q_only", "k_only"])
def test_rope_gradient_through_one_output(which):
    """Only one of the two outputs feeds the loss (the other's gradient is absent/zero)."""
    torch.manual_seed(4)
    b, s, h, kv, d = 1, 7, 3, 1, 24
    cos, sin = rope_cos_sin(_packed_positions(b, s), _inv_freq(d), 1.0, torch.float32)
    q, k = leaf(torch.randn(b, s, h, d)), leaf(torch.randn(b, s, kv, d))
    qr, kr = leaf(q), leaf(k)
    qo, ko = rope(q, k, cos, sin)
    qro, kro = rope_reference(qr, kr, cos, sin)
    out, ref_out, x, xr = (qo, qro, q, qr) if which == "q_only" else (ko, kro, k, kr)
    probe = torch.arange(out.numel()).reshape(out.shape).sin()
    loss = (out * probe).sum()
    loss.backward()
    (ref_out * probe).sum().backward()
    assert_close(x.grad, xr.grad, torch.float32, f"rope.{which}.grad")
    other, other_ref = (k, kr) if which == "q_only" else (q, qr)
    assert other_ref.grad is None
    assert other.grad is None or torch.count_nonzero(other.grad) == 0
    assert torch.isfinite(loss)


def test_rope_packing_restart_is_position_zero():
    """With position restarts, a token at a restart is unrotated, and q.k depends only on relative position."""
    torch.manual_seed(5)
    d = 64
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    cos, sin = rope_cos_sin(pos, _inv_freq(d), 1.0, torch.float32)
    v = torch.randn(d)
    q = v.expand(1, 8, 1, d).contiguous()
    k = v.expand(1, 8, 1, d).contiguous()
    qo, ko = rope(q, k, cos, sin)
    torch.testing.assert_close(qo[0, 0, 0], v)
    torch.testing.assert_close(qo[0, 4, 0], v)
    # The two packed documents get the same rotations at the same in-document positions.
    torch.testing.assert_close(qo[0, :4], qo[0, 4:])
    # Relative property: <R_m q, R_n k> = <R_{m+c} q, R_{n+c} k>.
    assert torch.allclose((qo[0, 3, 0] * ko[0, 1, 0]).sum(), (qo[0, 2, 0] * ko[0, 0, 0]).sum(), atol=1e-4)
    # Rotation preserves norms.
    torch.testing.assert_close(qo.norm(dim=-1), q.norm(dim=-1))


def test_rope_saves_only_cos_sin():
    b, s, h, kv, d = 1, 5, 3, 1, 24
    cos, sin = rope_cos_sin(_packed_positions(b, s), _inv_freq(d), 1.0, torch.float32)
    q, k = leaf(torch.randn(b, s, h, d)), leaf(torch.randn(b, s, kv, d))
    with record_saved() as saved:
        rope(q, k, cos, sin)
    assert [shape for shape, _, _ in saved] == [(b, s, 1, d), (b, s, 1, d)]


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


# --------------------------------------------------------------------------- attention mask semantics


def _brute_force_mask(q_len, kv_len, q_offset=0, pad=None, docs=None, window=None, batch=1):
    """The visibility rules of kernels/attention.py's docstring, element by element."""
    out = torch.zeros(batch, 1, q_len, kv_len, dtype=torch.bool)
    for bb in range(batch):
        for i in range(q_len):
            qi = i + q_offset
            for j in range(kv_len):
                ok = j <= qi
                if window is not None:
                    ok = ok and j > qi - window
                if pad is not None:
                    ok = ok and bool(pad[bb, j])
                if docs is not None:
                    ok = ok and int(docs[bb, kv_len - q_len + i]) == int(docs[bb, j])
                out[bb, 0, i, j] = ok
            if not out[bb, 0, i].any() and qi < kv_len:
                out[bb, 0, i, qi] = True
    return out


def _m(rows):
    return torch.tensor(rows, dtype=torch.bool)[None, None]


def test_mask_causal():
    m = build_attention_mask(4, 4)
    assert m.dtype == torch.bool and m.shape == (1, 1, 4, 4)
    assert torch.equal(m, torch.ones(4, 4, dtype=torch.bool).tril()[None, None])


def test_mask_q_offset_with_cache():
    m = build_attention_mask(2, 5, q_offset=3)
    assert torch.equal(m, _m([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]))
    # One decode step sees the whole cache.
    assert build_attention_mask(1, 6, q_offset=5).all()


def test_mask_left_padding_query_sees_itself():
    pad = torch.tensor([[0, 0, 1, 1]])
    m = build_attention_mask(4, 4, key_padding_mask=pad)
    expected = _m([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])
    assert torch.equal(m, expected)


def test_mask_right_padding_and_batch():
    pad = torch.tensor([[1, 1, 0], [1, 1, 1]])
    m = build_attention_mask(3, 3, key_padding_mask=pad)
    assert m.shape == (2, 1, 3, 3)
    assert torch.equal(m[0], _m([[1, 0, 0], [1, 1, 0], [1, 1, 0]])[0])  # pad query sees real keys only
    assert torch.equal(m[1], _m([[1, 0, 0], [1, 1, 0], [1, 1, 1]])[0])


def test_mask_documents():
    docs = torch.tensor([[0, 0, 1, 1, 1]])
    m = build_attention_mask(5, 5, doc_ids=docs)
    expected = _m(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    )
    assert torch.equal(m, expected)


def test_mask_sliding_window():
    m = build_attention_mask(4, 4, sliding_window=2)
    assert torch.equal(m, _m([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]))
    m = build_attention_mask(2, 6, q_offset=4, sliding_window=3)
    assert torch.equal(m, _m([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]]))
    # A window of 1 is the diagonal.
    assert torch.equal(build_attention_mask(3, 3, sliding_window=1), torch.eye(3, dtype=torch.bool)[None, None])


def test_mask_documents_with_cache_use_last_slots_for_queries():
    docs = torch.tensor([[0, 0, 1, 1, 1, 2]])
    m = build_attention_mask(2, 6, q_offset=4, doc_ids=docs)
    assert torch.equal(m, _m([[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]]))


@pytest.mark.parametrize("seed", range(6))
def test_mask_matches_brute_force_rules(seed):
    g = torch.Generator().manual_seed(seed)
    batch = 2
    kv_len = int(torch.randint(3, 12, (1,), generator=g))
    q_len = int(torch.randint(1, kv_len + 1, (1,), generator=g))
    q_offset = kv_len - q_len
    pad = (torch.rand(batch, kv_len, generator=g) > 0.3) if seed % 2 == 0 else None
    docs = torch.sort(torch.randint(0, 3, (batch, kv_len), generator=g), dim=1).values if seed % 3 != 2 else None
    window = int(torch.randint(1, kv_len + 2, (1,), generator=g)) if seed >= 2 else None
    m = build_attention_mask(
        q_len, kv_len, q_offset=q_offset, key_padding_mask=pad, doc_ids=docs, sliding_window=window
    )
    expected = _brute_force_mask(q_len, kv_len, q_offset, pad, docs, window, batch)
    assert torch.equal(m.expand_as(expected), expected)
    assert m.any(dim=-1).all(), "every query must see at least one key"


# --------------------------------------------------------------------------- attention numerics

ATTN_HEADS = [
    pytest.param((3, 1, 24), id="h3_kv1_d24"),
    pytest.param((5, 5, 64), id="h5_kv5_d64"),
]

ATTN_SETUPS = ["causal", "cache", "padding", "documents", "window", "window_cache", "all"]


def _attn_setup(name: str, batch: int):
    """``(q_len, kv_len, kwargs)`` for one masking scenario."""
    if name == "causal":
        return 7, 7, {}
    if name == "cache":
        return 3, 10, {"q_offset": 7}
    if name == "padding":
        pad = torch.ones(batch, 9, dtype=torch.bool)
        pad[0, :3] = False  # left padding (those queries see only themselves)
        pad[-1, -2:] = False  # right padding
        return 9, 9, {"key_padding_mask": pad}
    if name == "documents":
        docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2, 3]])[:batch]
        return 9, 9, {"doc_ids": docs}
    if name == "window":
        return 9, 9, {"sliding_window": 3}
    if name == "window_cache":
        return 4, 11, {"q_offset": 7, "sliding_window": 5}
    if name == "all":
        pad = torch.ones(batch, 10, dtype=torch.bool)
        pad[0, :2] = False
        docs = torch.tensor([[0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])[:batch]
        return 6, 10, {"q_offset": 4, "key_padding_mask": pad, "doc_ids": docs, "sliding_window": 3}
    raise AssertionError(name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("setup", ATTN_SETUPS)
@pytest.mark.parametrize("heads", ATTN_HEADS)
def test_attention_matches_reference(heads, setup, dtype):
    torch.manual_seed(17)
    hq, hkv, d = heads
    batch = 2
    q_len, kv_len, kwargs = _attn_setup(setup, batch)
    scale = d**-0.5
    q0 = torch.randn(batch, hq, q_len, d)
    k0 = torch.randn(batch, hkv, kv_len, d)
    v0 = torch.randn(batch, hkv, kv_len, d)
    do = torch.randn(batch, hq, q_len, d).to(dtype)
    q, k, v = (leaf(t.to(dtype)) for t in (q0, k0, v0))
    qr, kr, vr = (leaf(t.to(dtype)) for t in (q0, k0, v0))

    out = attention(q, k, v, scale=scale, **kwargs)
    mask = build_attention_mask(q_len, kv_len, **kwargs)
    ref = attention_reference(qr, kr, vr, mask, scale)
    assert out.shape == (batch, hq, q_len, d) and out.dtype == dtype
    assert_close(out, ref, dtype, "attention.out", reduction=True)
    got, want = grads(out, [q, k, v], do), grads(ref, [qr, kr, vr], do)
    for name, g_, w_ in zip(("dq", "dk", "dv"), got, want):
        assert_close(g_, w_, dtype, f"attention.{name}", reduction=True)


def test_attention_padded_query_attends_to_itself_only():
    torch.manual_seed(18)
    hq, hkv, d = 3, 1, 24
    pad = torch.tensor([[0, 0, 1, 1, 1]], dtype=torch.bool)
    q, k, v = torch.randn(1, hq, 5, d), torch.randn(1, hkv, 5, d), torch.randn(1, hkv, 5, d)
    out = attention(q, k, v, scale=d**-0.5, key_padding_mask=pad)
    assert torch.isfinite(out).all()
    for i in (0, 1):  # padded queries: output is their own value vector, for every query head of the group
        torch.testing.assert_close(out[0, :, i], v[0, 0, i].expand(hq, d), rtol=1e-6, atol=1e-6)


def test_attention_window_at_least_kv_len_is_plain_causal():
    torch.manual_seed(19)
    q, k, v = torch.randn(1, 3, 6, 24), torch.randn(1, 1, 6, 24), torch.randn(1, 1, 6, 24)
    plain = attention(q, k, v, scale=0.2)
    for w in (6, 100):
        torch.testing.assert_close(attention(q, k, v, scale=0.2, sliding_window=w), plain)
    assert not torch.allclose(attention(q, k, v, scale=0.2, sliding_window=5), plain)


def test_attention_documents_equal_separate_sequences():
    """Packing: attention over two packed documents equals attention over each one alone."""
    torch.manual_seed(20)
    hq, hkv, d = 5, 5, 64
    q, k, v = torch.randn(1, hq, 7, d), torch.randn(1, hkv, 7, d), torch.randn(1, hkv, 7, d)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    packed = attention(q, k, v, scale=d**-0.5, doc_ids=docs)
    first = attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], scale=d**-0.5)
    second = attention(q[:, :, 3:], k[:, :, 3:], v[:, :, 3:], scale=d**-0.5)
    torch.testing.assert_close(packed, torch.cat([first, second], dim=2), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- fused linear cross-entropy

IGNORE = -100


def _labels(n: int, vocab: int, pattern: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, vocab, (n,), generator=g)
    if pattern == "none":
        return y
    if pattern == "middle":
        y[n // 3 : n // 3 + max(1, n // 4)] = IGNORE
    elif pattern == "ends":
        y[0] = IGNORE
        y[-1] = IGNORE
        if n > 4:
            y[1] = IGNORE
    elif pattern == "all_but_one":
        keep = n // 2
        y[torch.arange(n) != keep] = IGNORE
    elif pattern == "scattered":
        y[torch.rand(n, generator=g) < 0.3] = IGNORE
        y[0] = IGNORE
    else:
        raise AssertionError(pattern)
    # Edge vocab ids must be reachable targets too.
    valid = (y != IGNORE).nonzero().flatten()
    if len(valid) >= 2:
        y[valid[0]], y[valid[-1]] = 0, vocab - 1
    return y


def _direct_ce(hidden, weight, labels, reduction="mean", softcap=None, num_items=None, ignore_index=IGNORE):
    """Independent oracle: full logits and F.cross_entropy's own reductions."""
    logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if num_items is not None and reduction == "mean":
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum") / num_items
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def _run_ce(hidden0, weight0, labels, dtype, w_grad=True, grad_scale=1.0, **kwargs):
    """Fused vs reference (and direct F.cross_entropy) loss and gradients."""
    h, w = leaf(hidden0.to(dtype)), leaf(weight0.to(dtype), w_grad)
    hr, wr = leaf(hidden0.to(dtype)), leaf(weight0.to(dtype), w_grad)
    chunk = kwargs.pop("chunk_size", None)
    loss = fused_linear_cross_entropy(h, w, labels, chunk_size=chunk, **kwargs)
    ref = cross_entropy_reference(hr, wr, labels, **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == ()
    gout = torch.tensor(grad_scale)
    inputs, ref_inputs = ([h, w], [hr, wr]) if w_grad else ([h], [hr])
    return loss, ref, grads(loss, inputs, gout), grads(ref, ref_inputs, gout), (h, w)


CE_CASES = [
    # (N, H, V, chunk_size, label pattern)
    pytest.param(1, 80, 1009, None, "none", id="N1_H80_chunkNone"),
    pytest.param(3, 80, 1009, 1, "middle", id="N3_H80_chunk1_ignore_middle"),
    pytest.param(3, 576, 1009, 7, "ends", id="N3_H576_chunk7_ignore_ends"),
    pytest.param(127, 80, 1009, 7, "scattered", id="N127_H80_chunk7_scattered"),
    pytest.param(127, 80, 1009, 50, "middle", id="N127_H80_chunk50_not_multiple"),
    pytest.param(127, 576, 1009, None, "ends", id="N127_H576_chunkNone_ignore_ends"),
    pytest.param(127, 80, 1009, 1, "all_but_one", id="N127_H80_chunk1_all_but_one"),
    pytest.param(3, 80, 49152, None, "none", id="N3_H80_V49152"),
    pytest.param(5, 80, 49152, 2, "ends", id="N5_H80_V49152_chunk2"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,hdim,vocab,chunk,pattern", CE_CASES)
def test_cross_entropy_matches_reference(n, hdim, vocab, chunk, pattern, dtype):
    torch.manual_seed(21)
    hidden0 = torch.randn(n, hdim)
    weight0 = torch.randn(vocab, hdim) * hdim**-0.5 * 2.0
    labels = _labels(n, vocab, pattern)
    loss, ref, got, want, (h, w) = _run_ce(hidden0, weight0, labels, dtype, chunk_size=chunk)
    assert_close(loss, ref, dtype, "ce.loss", reduction=True)
    assert_close(loss, _direct_ce(h.detach(), w.detach(), labels), dtype, "ce.loss_vs_F", reduction=True)
    assert_close(got[0], want[0], dtype, "ce.dhidden", reduction=True)
    assert_close(got[1], want[1], dtype, "ce.dweight", reduction=True)
    # Ignored tokens get exactly zero gradient.
    ignored = labels == IGNORE
    if ignored.any():
        assert torch.count_nonzero(got[0][ignored]) == 0


CE_OPTIONS = [
    pytest.param({"softcap": 30.0}, id="softcap30"),
    pytest.param({"reduction": "sum"}, id="sum"),
    pytest.param({"num_items_in_batch": 37}, id="num_items37"),
    pytest.param({"num_items_in_batch": torch.tensor(11)}, id="num_items_tensor"),
    pytest.param({"softcap": 30.0, "reduction": "sum", "num_items_in_batch": 5}, id="softcap_sum_num_items_ignored"),
    pytest.param({"ignore_index": 3}, id="ignore_index3"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [1, 7, None], ids=["chunk1", "chunk7", "chunkNone"])
@pytest.mark.parametrize("options", CE_OPTIONS)
def test_cross_entropy_options(options, chunk, dtype):
    torch.manual_seed(22)
    n, hdim, vocab = 19, 80, 1009
    hidden0 = torch.randn(n, hdim) * 3.0  # large logits so that softcap 30 actually bends them
    weight0 = torch.randn(vocab, hdim) * hdim**-0.5 * 4.0
    labels = _labels(n, vocab, "middle")
    kwargs = dict(options)
    if "ignore_index" in kwargs:
        labels = torch.where(labels == IGNORE, torch.tensor(kwargs["ignore_index"]), labels)
        labels[labels.eq(kwargs["ignore_index"]).nonzero()[0]] = 3  # ensure 3 (the ignore id) appears
    loss, ref, got, want, (h, w) = _run_ce(hidden0, weight0, labels, dtype, chunk_size=chunk, grad_scale=2.5, **kwargs)
    direct = _direct_ce(
        h.detach(),
        w.detach(),
        labels,
        reduction=kwargs.get("reduction", "mean"),
        softcap=kwargs.get("softcap"),
        num_items=kwargs.get("num_items_in_batch"),
        ignore_index=kwargs.get("ignore_index", IGNORE),
    )
    assert_close(loss, ref, dtype, "ce.loss", reduction=True)
    assert_close(loss, direct, dtype, "ce.loss_vs_F", reduction=True)
    assert_close(got[0], want[0], dtype, "ce.dhidden", reduction=True)
    assert_close(got[1], want[1], dtype, "ce.dweight", reduction=True)
    if "softcap" in kwargs:
        raw = (h.detach() @ w.detach().T).float().abs().max()
        assert raw > 30.0, "test data should exceed the softcap"


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_frozen_weight_returns_no_weight_grad(dtype):
    torch.manual_seed(23)
    hidden0, weight0 = torch.randn(7, 80), torch.randn(1009, 80) * 0.2
    labels = _labels(7, 1009, "ends")
    loss, ref, got, want, (h, w) = _run_ce(hidden0, weight0, labels, dtype, w_grad=False, chunk_size=3)
    assert_close(loss, ref, dtype, "ce.loss", reduction=True)
    assert_close(got[0], want[0], dtype, "ce.dhidden", reduction=True)
    # The Function's backward itself returns None for the frozen weight.
    h2, w2 = leaf(hidden0.to(dtype)), leaf(weight0.to(dtype), False)
    loss2 = fused_linear_cross_entropy(h2, w2, labels, chunk_size=3)
    # No [V, H] fp32 gradient buffer is kept for a frozen weight.
    assert loss2.grad_fn.saved_tensors[1] is None
    returned = loss2.grad_fn.apply(torch.tensor(1.0))
    assert returned[0] is not None and returned[1] is None
    assert all(r is None for r in returned[2:])
    loss2.backward()
    assert w2.grad is None and h2.grad is not None


def test_cross_entropy_frozen_hidden_weight_grad_only():
    torch.manual_seed(24)
    hidden0, weight0 = torch.randn(7, 80), torch.randn(1009, 80) * 0.2
    labels = _labels(7, 1009, "middle")
    w, wr = leaf(weight0), leaf(weight0)
    loss = fused_linear_cross_entropy(hidden0, w, labels, chunk_size=2)
    ref = cross_entropy_reference(hidden0, wr, labels)
    assert_close(loss, ref, torch.float32, "ce.loss")
    returned = loss.grad_fn.apply(torch.tensor(1.0))
    assert returned[0] is None and returned[1] is not None
    (dw,), (dwr,) = grads(loss, [w], torch.tensor(1.0)), grads(ref, [wr], torch.tensor(1.0))
    assert_close(dw, dwr, torch.float32, "ce.dweight")


def test_cross_entropy_all_ignored():
    torch.manual_seed(25)
    hidden0, weight0 = torch.randn(4, 80), torch.randn(1009, 80) * 0.2
    labels = torch.full((4,), IGNORE)
    # With num_items_in_batch (gradient accumulation: this micro-batch has no targets): zero loss and grads.
    h, w = leaf(hidden0), leaf(weight0)
    loss = fused_linear_cross_entropy(h, w, labels, num_items_in_batch=9, chunk_size=3)
    assert loss.item() == 0.0
    dh, dw = grads(loss, [h, w], torch.tensor(1.0))
    assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0
    # Plain mean over zero tokens: 0/0 like the reference and F.cross_entropy.
    loss = fused_linear_cross_entropy(leaf(hidden0), leaf(weight0), labels)
    ref = cross_entropy_reference(hidden0, weight0, labels)
    assert torch.isnan(ref) and torch.isnan(loss)
    # reduction="sum": exactly 0.
    assert fused_linear_cross_entropy(hidden0, weight0, labels, reduction="sum").item() == 0.0


def test_cross_entropy_chunking_invariance_and_default_chunk():
    torch.manual_seed(26)
    hidden0, weight0 = torch.randn(31, 80), torch.randn(1009, 80) * 0.3
    labels = _labels(31, 1009, "scattered")
    results = []
    for chunk in (1, 4, 7, 31, 1000, None):
        h, w = leaf(hidden0), leaf(weight0)
        loss = fused_linear_cross_entropy(h, w, labels, chunk_size=chunk)
        results.append((loss, *grads(loss, [h, w], torch.tensor(1.0))))
    for loss, dh, dw in results[1:]:
        assert_close(loss, results[0][0], torch.float32, "ce.loss")
        assert_close(dh, results[0][1], torch.float32, "ce.dhidden")
        assert_close(dw, results[0][2], torch.float32, "ce.dweight")
    assert default_chunk_size(31, 1009) == 31
    assert default_chunk_size(10**6, 49152) == (1 << 24) // 49152
    assert default_chunk_size(5, 10**9) == 1


def test_cross_entropy_never_keeps_full_logits():
    """Saved for backward: the [N, H] and [V, H] gradients only, never [N, V] logits."""
    torch.manual_seed(27)
    n, hdim, vocab = 64, 80, 1009
    h, w = leaf(torch.randn(n, hdim)), leaf(torch.randn(vocab, hdim) * 0.2)
    labels = _labels(n, vocab, "none")
    with record_saved() as saved:
        fused_linear_cross_entropy(h, w, labels, chunk_size=8)
    shapes = [shape for shape, _, _ in saved]
    assert sorted(shapes) == sorted([(n, hdim), (vocab, hdim)]), shapes


def test_cross_entropy_no_grad_forward():
    torch.manual_seed(28)
    hidden0, weight0 = torch.randn(5, 80), torch.randn(1009, 80) * 0.2
    labels = _labels(5, 1009, "ends")
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden0, weight0, labels, chunk_size=2)
    assert_close(loss, cross_entropy_reference(hidden0, weight0, labels), torch.float32, "ce.loss")
    assert loss.grad_fn is None


class _OpLog(TorchDispatchMode):
    """Records the aten ops that run inside the block."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _matmuls(ops: list[str]) -> int:
    return sum(op.split(".")[0] in ("mm", "addmm", "addmm_", "matmul", "bmm") for op in ops)


def test_cross_entropy_forward_only_when_nothing_needs_grad():
    """Nothing requires grad: one logits matmul per chunk, no gradient work."""
    n, hdim, vocab, chunk = 10, 16, 37, 4
    with _OpLog() as log:
        fused_linear_cross_entropy(torch.randn(n, hdim), torch.randn(vocab, hdim), torch.arange(n), chunk_size=chunk)
    assert _matmuls(log.ops) == math.ceil(n / chunk)


@pytest.mark.parametrize("requires", [(False, True), (True, False)], ids=["weight_trainable", "hidden_requires_grad"])
def test_cross_entropy_no_gradient_work_under_no_grad(requires):
    """Under no_grad (evaluation) no gradient buffers or matmuls, even if lm_head is trainable."""
    n, hdim, vocab, chunk = 10, 16, 37, 4
    hidden = torch.randn(n, hdim).requires_grad_(requires[0])
    weight = torch.randn(vocab, hdim).requires_grad_(requires[1])
    with torch.no_grad(), _OpLog() as log:
        loss = fused_linear_cross_entropy(hidden, weight, torch.arange(n), chunk_size=chunk)
    assert loss.grad_fn is None
    matmuls = _matmuls(log.ops)
    assert matmuls == math.ceil(n / chunk), f"{matmuls} matmuls under no_grad for {math.ceil(n / chunk)} chunks"


def test_lora_linear_refuses_trainable_base():
    x = torch.randn(3, 8)
    with pytest.raises(ConfigurationError, match="frozen"):
        lora_linear(x, torch.randn(5, 8, requires_grad=True))
    with pytest.raises(ConfigurationError, match="frozen"):
        lora_linear(x, torch.randn(5, 8), torch.zeros(5, requires_grad=True))


def test_cross_entropy_invalid_reduction():
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(torch.randn(2, 8), torch.randn(11, 8), torch.tensor([1, 2]), reduction="none")


def test_cross_entropy_function_is_what_runs():
    h = leaf(torch.randn(2, 8))
    loss = fused_linear_cross_entropy(h, torch.randn(11, 8), torch.tensor([1, 2]))
    assert loss.grad_fn._forward_cls is FusedLinearCrossEntropyFunction


# --------------------------------------------------------------------------- dispatch


def test_dispatch_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.requested_backend() == "auto"
    backends = describe_backends()
    assert set(backends) == set(dispatch.OPS)
    assert set(backends.values()) == {"torch"}
    # No op has a Triton kernel yet: even a CUDA device gets PyTorch under auto.
    assert dispatch.TRITON_OPS == frozenset()
    assert describe_backends("cuda") == {op: "torch" for op in dispatch.OPS}


@pytest.mark.parametrize("value", ["torch", "TORCH", " torch ", "auto", "Auto", ""])
def test_dispatch_valid_values(monkeypatch, value):
    monkeypatch.setenv(dispatch.ENV_VAR, value)
    for op in dispatch.OPS:
        assert select_backend(op, "cpu") == "torch"
        assert select_backend(op, torch.device("cpu")) == "torch"


def test_dispatch_triton_without_kernels_raises(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    for op in dispatch.OPS:
        with pytest.raises(ConfigurationError, match="triton"):
            select_backend(op, "cpu")
        with pytest.raises(ConfigurationError):
            select_backend(op, "cuda")
    with pytest.raises(ConfigurationError):
        describe_backends()


def test_dispatch_triton_makes_every_op_raise(monkeypatch):
    """The ops consult the dispatcher: forcing a missing backend fails loudly instead of silently falling back."""
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    x = torch.randn(2, 8)
    cos, sin = rope_cos_sin(torch.arange(3)[None], _inv_freq(8), 1.0, torch.float32)
    calls = [
        lambda: rms_norm(x, torch.ones(8)),
        lambda: rope(torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8), cos, sin),
        lambda: swiglu(x, x),
        lambda: lora_linear(x, torch.randn(5, 8)),
        lambda: attention(torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8), scale=0.3),
        lambda: fused_linear_cross_entropy(x, torch.randn(11, 8), torch.tensor([1, 2])),
    ]
    for call in calls:
        with pytest.raises(ConfigurationError):
            call()
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    for call in calls:
        call()


@pytest.mark.parametrize("value", ["cuda", "tritonn", "pytorch", "1"])
def test_dispatch_invalid_value_raises(monkeypatch, value):
    monkeypatch.setenv(dispatch.ENV_VAR, value)
    with pytest.raises(ConfigurationError, match=dispatch.ENV_VAR) as info:
        select_backend("rms_norm", "cpu")
    assert isinstance(info.value, ValueError) and isinstance(info.value, EngineError)
    with pytest.raises(ConfigurationError):
        rms_norm(torch.randn(2, 8), torch.ones(8))


def test_dispatch_unknown_op_raises(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    with pytest.raises(ConfigurationError, match="unknown op"):
        select_backend("layer_norm", "cpu")


def test_dispatch_with_a_triton_kernel(monkeypatch):
    """Selection logic once an op has a Triton kernel (simulated): auto picks it on CUDA only."""
    monkeypatch.setattr(dispatch, "TRITON_OPS", frozenset({"rms_norm"}))
    monkeypatch.setattr(dispatch, "_triton_available", lambda: True)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert select_backend("rms_norm", "cuda") == "triton"
    assert select_backend("rms_norm", torch.device("cuda", 0)) == "triton"
    assert select_backend("rms_norm", "cpu") == "torch"
    assert select_backend("swiglu", "cuda") == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert select_backend("rms_norm", "cpu") == "triton"
    with pytest.raises(ConfigurationError):
        select_backend("swiglu", "cuda")
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert select_backend("rms_norm", "cuda") == "torch"
    # triton not installed: auto falls back, forced triton raises.
    monkeypatch.setattr(dispatch, "_triton_available", lambda: False)
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert select_backend("rms_norm", "cuda") == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(ConfigurationError):
        select_backend("rms_norm", "cuda")
