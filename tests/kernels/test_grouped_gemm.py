"""The PyTorch grouped matmul (``grouped_mm``, ``grouped_mm_nf4``) against its definition (autograd over slices).

Tolerances and helpers: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import pytest
import torch

from engine_kernels.dispatch import record_backends
from engine_kernels.errors import ConfigurationError
from engine_kernels.grouped_gemm import GroupedMMFunction, grouped_mm, grouped_mm_nf4, grouped_mm_reference
from engine_kernels.nf4 import nf4_dequantize, nf4_quantize
from tests.kernels.op_testing import DTYPES, assert_close, grads, leaf

#: (sizes, K, N): odd extents, an empty group (first, middle, last), a single group, one row per group.
CASES = [
    ((7, 0, 13, 9, 8), 24, 40),
    ((0, 5, 1), 17, 33),
    ((3, 4, 0), 8, 16),
    ((11,), 9, 5),
    ((1, 1, 1, 1), 32, 3),
]


def _inputs(sizes, k, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), k, generator=g).to(dtype)
    w = (torch.randn(len(sizes), n, k, generator=g) * k**-0.5).to(dtype)
    dy = torch.randn(sum(sizes), n, generator=g).to(dtype)
    return x, w, dy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[0])}groups")
def test_grouped_mm_matches_reference(case, dtype):
    sizes, k, n = case
    x0, w0, dy = _inputs(sizes, k, n, dtype, seed=1)
    x, w, xr, wr = leaf(x0), leaf(w0), leaf(x0), leaf(w0)
    with record_backends() as used:
        y = grouped_mm(x, w, sizes)
    assert used == {"grouped_mm": {"torch"}}
    assert y.grad_fn._forward_cls is GroupedMMFunction
    yr = grouped_mm_reference(xr, wr, sizes)
    assert_close(y, yr, dtype, "grouped_mm.y", reduction=True)
    got, want = grads(y, [x, w], dy), grads(yr, [xr, wr], dy)
    assert_close(got[0], want[0], dtype, "grouped_mm.dx", reduction=True)
    assert_close(got[1], want[1], dtype, "grouped_mm.dw", reduction=True)
    for g, size in enumerate(sizes):
        if size == 0:
            assert torch.equal(got[1][g], torch.zeros_like(got[1][g])), f"expert {g} has no rows: its gradient is 0"


def test_grouped_mm_gradcheck_float64():
    sizes = (2, 0, 3, 1)
    x0, w0, _ = _inputs(sizes, 5, 4, torch.float64, seed=2)
    assert torch.autograd.gradcheck(lambda x, w: grouped_mm(x, w, sizes), (leaf(x0), leaf(w0)))


def test_grouped_mm_saves_only_what_backward_needs():
    """A frozen expert stack (LoRA on experts) keeps no ``x`` for ``dw``; a frozen input keeps no ``w``."""
    sizes = (2, 3)
    x0, w0, dy = _inputs(sizes, 6, 4, torch.float32, seed=3)
    x, w = leaf(x0), leaf(w0, requires_grad=False)
    y = grouped_mm(x, w, sizes)
    assert y.grad_fn.saved_tensors[0] is None
    xr = leaf(x0)
    assert_close(grads(y, [x], dy)[0], grads(grouped_mm_reference(xr, w0, sizes), [xr], dy)[0], torch.float32, "dx")
    y = grouped_mm(leaf(x0, requires_grad=False), leaf(w0), sizes)
    assert y.grad_fn.saved_tensors[1] is None


def test_grouped_mm_no_rows():
    x = torch.zeros(0, 8)
    w = leaf(torch.randn(3, 5, 8))
    y = grouped_mm(x, w, (0, 0, 0))
    assert y.shape == (0, 5)
    (dw,) = grads(y, [w], torch.zeros(0, 5))
    assert torch.equal(dw, torch.zeros_like(w))


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_mm_nf4_matches_dequantized(dtype):
    """NF4 experts give the same forward and dx as ``grouped_mm`` on the dequantized weights."""
    sizes, k, n = (5, 0, 9, 2), 64, 24
    x0, w0, dy = _inputs(sizes, k, n, dtype, seed=4)
    experts = [nf4_quantize(w0[g], blocksize=64) for g in range(len(sizes))]
    dense = torch.stack([nf4_dequantize(e, dtype=dtype) for e in experts])
    x, xr = leaf(x0), leaf(x0)
    y = grouped_mm_nf4(x, experts, sizes)
    yr = grouped_mm(xr, dense, sizes)
    assert_close(y, yr, dtype, "grouped_mm_nf4.y")
    assert_close(grads(y, [x], dy)[0], grads(yr, [xr], dy)[0], dtype, "grouped_mm_nf4.dx")


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "sizes", "match"),
    [
        ((5, 4), (2, 3, 4), (2, 2), "summing to the 5 rows"),
        ((5, 4), (2, 3, 4), (2, 2, 1), r"one non-negative row count per expert \(2\)"),
        ((5, 4), (2, 3, 4), (6, -1), "non-negative"),
        ((5, 4), (2, 3, 6), (2, 3), "x has 4 columns, the expert weights take 6"),
        ((5,), (2, 3, 5), (2, 3), r"x of shape \[rows, in\]"),
    ],
)
def test_grouped_mm_bad_input(x_shape, w_shape, sizes, match):
    with pytest.raises(ConfigurationError, match=match):
        grouped_mm(torch.randn(x_shape), torch.randn(w_shape), sizes)


def test_grouped_mm_dtype_mismatch():
    with pytest.raises(ConfigurationError, match="cast one of them"):
        grouped_mm(torch.randn(3, 4), torch.randn(1, 2, 4, dtype=torch.float64), (3,))


def test_cpu_16bit_row_buckets_equal_the_exact_rows():
    """bf16 on CPU pads each group to a multiple of ROW_BUCKET rows; zero rows change no real row nor any dw."""
    from engine_kernels.grouped_gemm import (
        ROW_BUCKET, RowBuckets, _grouped_mm_loop, grouped_mm_torch, grouped_weight_grad_torch,
    )

    g = torch.Generator().manual_seed(3)
    sizes = (70, 0, 3, ROW_BUCKET, 27)
    x = torch.randn(sum(sizes), 24, generator=g).bfloat16()
    w = torch.randn(5, 40, 24, generator=g).bfloat16()
    dy = torch.randn(sum(sizes), 40, generator=g).bfloat16()
    buckets = RowBuckets(sizes, x.device)
    assert buckets.sizes == (2 * ROW_BUCKET, 0, ROW_BUCKET, ROW_BUCKET, ROW_BUCKET)
    assert torch.equal(buckets.unpad(buckets.pad(x)), x)
    exact = _grouped_mm_loop(x, w, sizes, True)
    torch.testing.assert_close(grouped_mm_torch(x, w, sizes), exact, rtol=1e-2, atol=1e-2)
    bounds = [0, 70, 70, 73, 137, 164]
    dw_exact = torch.stack([dy[a:b].float().T @ x[a:b].float() for a, b in zip(bounds[:-1], bounds[1:])])
    torch.testing.assert_close(grouped_weight_grad_torch(dy, x, sizes).float(), dw_exact, rtol=2e-2, atol=2e-1)
