"""Grouped matrix multiply: one weight matrix per group of consecutive rows (mixture-of-experts experts).

The rows of ``x`` are sorted by group (expert); group ``g`` owns rows ``[o_g, o_g + sizes[g])`` where ``o_g`` is the
sum of the earlier sizes. For each group::

    y[rows_g] = x[rows_g] @ w[g].T          x [T, K], w [E, N, K] (transformers' expert layout), y [T, N]

Backward::

    dx[rows_g] = dy[rows_g] @ w[g]          (a grouped matmul with ``w[g]`` not transposed)
    dw[g]      = dy[rows_g].T @ x[rows_g]   (the grouped weight gradient, only when ``w`` trains)

Groups may be empty. ``sizes`` is a tuple of host integers (one device-to-host copy per MoE layer, made by the
caller when it sorts tokens by expert).

Implementations: the PyTorch one (CPUs, and the reference) multiplies each non-empty group's slice with one
``torch.mm`` — a loop over experts, never over tokens. On CPU in bf16/fp16, each group's rows are first padded with
zero rows to a multiple of :data:`ROW_BUCKET` (:class:`RowBuckets`): oneDNN builds a new kernel for every new matrix
shape (about 1 ms each on this project's 2-core machine), and the rows per expert change every step; in buckets the
shapes repeat, and with 16 experts the grouped products ran 2.6-4.9x faster (forward) and 2.3-4.0x (weight gradient)
(``python benchmarks/grouped_mm_buckets.py``, this 2-core CPU machine). fp32 (MKL) has no such cost and is not
padded. :func:`grouped_mm_nf4` is the same product with the weights
stored as one NF4 tensor per expert (QLoRA): each expert is dequantized when its group is multiplied, in forward
and again in backward, so no dense copy of the expert stack is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine_kernels.dispatch import select_backend
from engine_kernels.errors import ConfigurationError
from engine_kernels.nf4 import NF4Weight, nf4_dequantize


def _check(x: torch.Tensor, n_groups: int, sizes: Sequence[int], k: int) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in sizes)
    if x.dim() != 2:
        raise ConfigurationError(f"grouped_mm expects x of shape [rows, in], got {tuple(x.shape)}")
    if len(sizes) != n_groups or any(s < 0 for s in sizes) or sum(sizes) != x.shape[0]:
        raise ConfigurationError(
            f"grouped_mm: sizes {sizes[:8]} must give one non-negative row count per expert ({n_groups}) summing to "
            f"the {x.shape[0]} rows of x"
        )
    if x.shape[1] != k:
        raise ConfigurationError(f"grouped_mm: x has {x.shape[1]} columns, the expert weights take {k}")
    return sizes


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """The definition, with autograd: ``cat([x_g @ w[g].T for each group g])`` (``[T, N]``)."""
    sizes = _check(x, w.shape[0], sizes, w.shape[2])
    parts = [xg @ w[g].T for g, xg in enumerate(torch.split(x, list(sizes)))]
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[1])


#: Rows per bucket of the CPU 16-bit path (see the module docstring).
ROW_BUCKET = 64


class RowBuckets:
    """Where each group's rows go when every group is padded with zero rows to a multiple of :data:`ROW_BUCKET`.

    Attributes:
        index: int64 ``[T]``, the padded position of each real row.
        sizes: the padded group sizes; ``rows``: their sum.
    """

    def __init__(self, sizes: tuple[int, ...], device: torch.device):
        padded = tuple(-(-s // ROW_BUCKET) * ROW_BUCKET for s in sizes)
        starts = torch.tensor([0, *padded[:-1]], device=device).cumsum(0)
        counts = torch.tensor(sizes, device=device)
        self.index = torch.repeat_interleave(starts, counts) + (
            torch.arange(sum(sizes), device=device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        )
        self.sizes, self.rows = padded, sum(padded)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, C] -> [rows, C]``, zeros between the groups."""
        out = x.new_zeros(self.rows, x.shape[1])
        return out.index_copy_(0, self.index, x)

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """``[rows, C] -> [T, C]``."""
        return y.index_select(0, self.index)


def _bucketed(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def grouped_mm_torch(x: torch.Tensor, w: torch.Tensor, sizes: tuple[int, ...], transpose_w: bool = True) -> torch.Tensor:
    """``x_g @ w[g].T`` per group (``transpose_w``; ``w [E, N, K]``) or ``x_g @ w[g]`` (``w [E, K, N]``), no autograd.

    Returns:
        ``[T, N]`` in ``x``'s dtype.
    """
    if _bucketed(x):
        buckets = RowBuckets(sizes, x.device)
        return buckets.unpad(_grouped_mm_loop(buckets.pad(x), w, buckets.sizes, transpose_w))
    return _grouped_mm_loop(x, w, sizes, transpose_w)


def _grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, sizes: tuple[int, ...], transpose_w: bool) -> torch.Tensor:
    n = w.shape[1] if transpose_w else w.shape[2]
    out = x.new_empty(x.shape[0], n)
    start = 0
    for g, size in enumerate(sizes):
        if size:
            wg = w[g].T if transpose_w else w[g]
            torch.mm(x[start:start + size], wg, out=out[start:start + size])
        start += size
    return out


def grouped_weight_grad_torch(dy: torch.Tensor, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """``dw[g] = dy_g.T @ x_g`` (``[E, N, K]``; zero for empty groups), no autograd."""
    if _bucketed(dy):  # zero rows add nothing to dy_g.T @ x_g
        buckets = RowBuckets(sizes, dy.device)
        dy, x, sizes = buckets.pad(dy), buckets.pad(x), buckets.sizes
    return _weight_grad_loop(dy, x, sizes)


def _weight_grad_loop(dy: torch.Tensor, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    dw = dy.new_zeros(len(sizes), dy.shape[1], x.shape[1])
    start = 0
    for g, size in enumerate(sizes):
        if size:
            torch.mm(dy[start:start + size].T, x[start:start + size], out=dw[g])
        start += size
    return dw


def _forward(x, w, sizes, transpose_w=True):
    if select_backend("grouped_mm", x.device) == "triton":
        from engine_kernels.grouped_gemm_triton import grouped_mm_triton

        return grouped_mm_triton(x, w, sizes, transpose_w)
    return grouped_mm_torch(x, w, sizes, transpose_w)


def _weight_grad(dy, x, sizes):
    if select_backend("grouped_mm", dy.device) == "triton":
        from engine_kernels.grouped_gemm_triton import grouped_weight_grad_triton

        return grouped_weight_grad_triton(dy, x, sizes)
    return grouped_weight_grad_torch(dy, x, sizes)


class GroupedMMFunction(torch.autograd.Function):
    """Autograd Function of :func:`grouped_mm`: saves ``x`` only when ``w`` trains and ``w`` only when ``x`` does."""

    @staticmethod
    def forward(ctx, x, w, sizes):
        ctx.sizes = sizes
        ctx.save_for_backward(x if w.requires_grad else None, w if x.requires_grad else None)
        return _forward(x, w, sizes)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy = dy.contiguous()
        dx = _forward(dy, w, ctx.sizes, transpose_w=False) if ctx.needs_input_grad[0] else None
        dw = _weight_grad(dy, x, ctx.sizes) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``y[rows_g] = x[rows_g] @ w[g].T`` for rows sorted by group; see the module docstring.

    Args:
        x (Tensor): ``[T, K]``, rows sorted by group.
        w (Tensor): ``[E, N, K]``, same dtype as ``x``.
        sizes: ``E`` host integers, the rows of each group (summing to ``T``; zeros allowed).

    Returns:
        Tensor ``[T, N]``.
    """
    sizes = _check(x, w.shape[0], sizes, w.shape[2])
    if x.dtype != w.dtype:
        raise ConfigurationError(f"grouped_mm: x is {x.dtype} but the expert weights are {w.dtype}; cast one of them")
    return GroupedMMFunction.apply(x.contiguous(), w.contiguous(), sizes)


class GroupedMMNF4Function(torch.autograd.Function):
    """:func:`grouped_mm` with frozen NF4 experts: each expert dequantized on use (forward and backward)."""

    @staticmethod
    def forward(ctx, x, sizes, experts):
        ctx.sizes, ctx.experts = sizes, experts
        return _nf4_loop(x, experts, sizes, transpose=True)

    @staticmethod
    def backward(ctx, dy):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return _nf4_loop(dy.contiguous(), ctx.experts, ctx.sizes, transpose=False), None, None


def _nf4_loop(x: torch.Tensor, experts: tuple[NF4Weight, ...], sizes: tuple[int, ...], transpose: bool) -> torch.Tensor:
    """``x_g @ W_g.T`` (``transpose``) or ``x_g @ W_g`` per group, each ``W_g`` dequantized when it is used."""
    buckets = RowBuckets(sizes, x.device) if _bucketed(x) else None
    if buckets is not None:
        x, sizes = buckets.pad(x), buckets.sizes
    n = experts[0].shape[0 if transpose else 1]
    out = x.new_empty(x.shape[0], n)
    start = 0
    for g, size in enumerate(sizes):
        if size:
            wg = nf4_dequantize(experts[g], dtype=x.dtype)
            torch.mm(x[start:start + size], wg.T if transpose else wg, out=out[start:start + size])
        start += size
    return out if buckets is None else buckets.unpad(out)


def grouped_mm_nf4(x: torch.Tensor, experts: Sequence[NF4Weight], sizes: Sequence[int]) -> torch.Tensor:
    """:func:`grouped_mm` with ``w[g]`` stored as ``experts[g]`` (NF4, each ``[N, K]``), frozen (QLoRA).

    Returns:
        Tensor ``[T, N]`` in ``x``'s dtype (each expert dequantized to it).
    """
    experts = tuple(experts)
    sizes = _check(x, len(experts), sizes, experts[0].shape[1])
    return GroupedMMNF4Function.apply(x.contiguous(), sizes, experts)
