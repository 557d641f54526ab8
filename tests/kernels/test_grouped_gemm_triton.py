"""The Triton grouped matmul (CPU: Triton's interpreter) against the definition (autograd over slices).

Tolerances and helpers: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import pytest
import torch

from engine_kernels import grouped_gemm_triton as ggt
from engine_kernels.dispatch import record_backends
from engine_kernels.errors import ConfigurationError
from engine_kernels.grouped_gemm import grouped_mm, grouped_mm_reference
from tests.kernels.op_testing import DTYPES_WITH_FP16, assert_close, grads, leaf

#: (sizes, K, N): odd extents with an empty group; a group spanning several row tiles (70 > 64 rows) and an
#: empty last group; aligned extents (multiples of 16: the big 16-bit tiles) with N over one 128-wide tile
#: and K over one 64-deep step.
CASES = [
    ((7, 0, 13, 9, 8), 24, 40),
    ((70, 2, 0), 17, 9),
    ((5, 0, 11), 80, 144),
]


def _inputs(sizes, k, n, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), k, generator=g)
    w = torch.randn(len(sizes), n, k, generator=g) * k**-0.5
    dy = torch.randn(sum(sizes), n, generator=g)
    return x.to(device, dtype), w.to(device, dtype), dy.to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES_WITH_FP16)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{sum(c[0])}_K{c[1]}_N{c[2]}")
def test_triton_grouped_mm_matches_reference(triton_backend, case, dtype):
    sizes, k, n = case
    x0, w0, dy = _inputs(sizes, k, n, dtype, triton_backend, seed=11)
    x, w, xr, wr = leaf(x0), leaf(w0), leaf(x0), leaf(w0)
    with record_backends() as used:
        y = grouped_mm(x, w, sizes)
        got = grads(y, [x, w], dy)
    assert used == {"grouped_mm": {"triton"}}
    yr = grouped_mm_reference(xr, wr, sizes)
    want = grads(yr, [xr, wr], dy)
    assert_close(y, yr, dtype, "grouped_mm.y", reduction=True)
    assert_close(got[0], want[0], dtype, "grouped_mm.dx", reduction=True)
    assert_close(got[1], want[1], dtype, "grouped_mm.dw", reduction=True)
    for g, size in enumerate(sizes):
        if size == 0:
            assert torch.equal(got[1][g], torch.zeros_like(got[1][g])), f"expert {g} has no rows: its gradient is 0"


def test_tile_schedule():
    """One (group, first row, end row) per 32-row tile; empty groups have none; a tile never crosses a group."""
    tiles = ggt.tile_schedule([3, 0, 70, 64, 1], 32)
    assert tiles.dtype == torch.int32
    assert tiles.tolist() == [[0, 0, 3], [2, 3, 73], [2, 35, 73], [2, 67, 73], [3, 73, 137], [3, 105, 137],
                              [4, 137, 138]]
    assert ggt.tile_schedule([0, 0], 64).shape == (0, 3)


def test_launch_configs():
    """Big tiles only for extents the compiler knows are multiples of 16; tl.dot's 16-wide minimum for LoRA ranks."""
    assert ggt.mm_config(28672, 4096, torch.bfloat16) == ggt.TileConfig(64, 128, 64, 4, 3)
    assert ggt.mm_config(16, 4096, torch.bfloat16) == ggt.TileConfig(64, 16, 64, 4, 3)
    assert ggt.mm_config(4096, 8, torch.float16) == ggt.TileConfig(64, 64, 16, 8, 2)  # rank 8: not aligned
    assert ggt.mm_config(40, 24, torch.float32) == ggt.TileConfig(32, 64, 32, 4, 2)


def test_triton_grouped_mm_no_rows(triton_backend):
    x = torch.zeros(0, 24, device=triton_backend)
    w = leaf(torch.randn(3, 40, 24, device=triton_backend))
    y = grouped_mm(x, w, (0, 0, 0))
    assert y.shape == (0, 40)
    dw = ggt.grouped_weight_grad_triton(torch.zeros(0, 40, device=triton_backend), x, (0, 0, 0))
    assert torch.equal(dw, torch.zeros(3, 40, 24, device=triton_backend))


def test_triton_grouped_mm_meta_tensors_launch_nothing():
    """Memory planning: the wrappers allocate their outputs on ``meta`` tensors and launch nothing."""
    x, w, dy = torch.empty(9, 24, device="meta"), torch.empty(2, 40, 24, device="meta"), torch.empty(9, 40, device="meta")
    assert ggt.grouped_mm_triton(x, w, (4, 5)).shape == (9, 40)
    assert ggt.grouped_mm_triton(dy, w, (4, 5), transpose_w=False).shape == (9, 24)
    assert ggt.grouped_weight_grad_triton(dy, x, (4, 5)).shape == (2, 40, 24)


def test_triton_grouped_mm_rejects_other_dtypes(triton_backend):
    x = torch.randn(3, 4, dtype=torch.float64, device=triton_backend)
    with pytest.raises(ConfigurationError, match="float32, float16 or bfloat16"):
        ggt.grouped_mm_triton(x, torch.randn(1, 2, 4, dtype=torch.float64, device=triton_backend), (3,))
