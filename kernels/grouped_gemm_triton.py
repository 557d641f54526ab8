"""Triton kernels of :func:`engine_kernels.grouped_gemm.grouped_mm` (math and layout: :mod:`engine_kernels.grouped_gemm`).

Two kernels, both accumulating in fp32 and writing the input dtype:

* :func:`_grouped_mm_kernel`: ``y[rows_g] = x[rows_g] @ w[g].T`` (``TRANSPOSE_W``, ``w [E, N, K]``: the forward)
  or ``x[rows_g] @ w[g]`` (``w [E, K, N]``: the input gradient ``dx = dy_g @ w[g]``). The host turns ``sizes``
  into a *tile schedule*: one int32 row ``(group, first row, end row)`` per ``BLOCK_M``-row tile of one group
  (:func:`tile_schedule`). A tile never straddles two groups, empty groups have no tile, and the last tile of a
  group is masked at the group's end. The grid is ``(tiles, cdiv(N, BLOCK_N))``; consecutive programs share
  one ``BLOCK_N`` slice of one expert's weight, so it is read from L2 while that expert's tiles run.
* :func:`_grouped_weight_grad_kernel`: ``dw[g] = dy[rows_g].T @ x[rows_g]`` (``[E, N, K]``). One program per
  ``BLOCK_N x BLOCK_K`` tile of one expert's gradient, looping over the group's rows ``BLOCK_M`` at a time
  (the group bounds come from an int32 ``offsets [E + 1]`` table); an empty group's tile is written as zeros.

Launch settings (:func:`mm_config`, :func:`weight_grad_config`) depend only on the dtype and on ``N`` and ``K``
clipped to the tile: 16-bit inputs take 64 x 128 x 64 tiles (rows x outputs x reduction) with 4 warps and 3
pipeline stages (72 KiB of shared memory: it fits sm_86/89's 99 KiB), narrower tiles when ``N`` or ``K`` is a
LoRA rank (16..64). fp32 inputs (tests, debugging) multiply in full fp32 (``ieee``, no TF32, as ``torch.mm``
does by default) on 32 x 64 x 32 tiles. ``python -m engine_kernels.audit --ops grouped_mm`` compiles every
configuration for sm_80/86/89/90.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from engine_kernels._triton import AuditLaunch, cdiv, dtype_signature, interpreting, jit, launchable, next_power_of_2, tl
from engine_kernels.errors import ConfigurationError

#: Input dtypes the kernels take.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: The largest tile extent: offsets inside a tile (``< _MAX_TILE`` rows of a matrix) are int32.
_MAX_TILE = 128


class TileConfig(NamedTuple):
    """One kernel's tile: ``block_m`` rows x ``block_n`` outputs x ``block_k`` reduction, warps and stages.

    For the weight gradient ``block_m`` is the reduction (rows of a group per step) and ``block_n x block_k`` the
    tile of ``dw[g]``.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _clip(n: int, low: int, high: int) -> int:
    """``next_power_of_2(n)`` clipped to ``[low, high]`` (``tl.dot`` needs every dimension >= 16)."""
    return max(low, min(high, next_power_of_2(n)))


def aligned(n: int, k: int) -> bool:
    """Whether both extents are multiples of 16: Triton then specialises them, and with 16-byte aligned tensors the
    tiles load as 16-byte vectors (the big 16-bit tiles are only spill-free in that case)."""
    return n % 16 == 0 and k % 16 == 0


def mm_config(n: int, k: int, dtype: torch.dtype) -> TileConfig:
    """Tile of :func:`_grouped_mm_kernel` for ``n`` outputs and a reduction over ``k``.

    16-bit inputs: 64 rows x up to 128 outputs x up to 64 reduction, 4 warps, 3 stages when :func:`aligned`; else
    64 x 64 x 32 with 8 warps and 2 stages (element-wise loads need more registers). fp32: 32 x 64 x 32, 4 warps.
    """
    if dtype == torch.float32:
        return TileConfig(32, _clip(n, 16, 64), _clip(k, 16, 32), 4, 2)
    if aligned(n, k):
        return TileConfig(64, _clip(n, 16, 128), _clip(k, 16, 64), 4, 3)
    return TileConfig(64, _clip(n, 16, 64), _clip(k, 16, 32), 8, 2)


def weight_grad_config(n: int, k: int, dtype: torch.dtype) -> TileConfig:
    """Tile of :func:`_grouped_weight_grad_kernel` for ``dw [E, n, k]`` (``block_m``: rows per step); as
    :func:`mm_config`."""
    return mm_config(n, k, dtype)


def _dot_options(dtype: torch.dtype, interpreted: bool | None = None) -> dict[str, object]:
    """``PRECISION``: fp32 inputs multiply in full fp32 (``ieee``). ``UPCAST``: under the interpreter, bf16 operands
    go to fp32 before ``tl.dot`` (the interpreter multiplies bf16 as its uint16 storage); the GPU's bf16 MMA
    multiplies the same exact values."""
    interpreted = interpreting() if interpreted is None else interpreted
    return {"PRECISION": "ieee" if dtype == torch.float32 else "tf32", "UPCAST": interpreted and dtype == torch.bfloat16}


# --------------------------------------------------------------------------- kernels


@jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` in fp32 (see :func:`_dot_options`)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@jit
def _grouped_mm_kernel(
    X,
    W,
    Y,
    TILES,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TRANSPOSE_W: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One ``BLOCK_M x BLOCK_N`` tile of ``y`` for the rows of one group.

    Args:
        X: ``[T, K]`` rows sorted by group, contiguous.
        W: ``[E, N, K]`` (``TRANSPOSE_W``) or ``[E, K, N]``, contiguous.
        Y: ``[T, N]`` output, contiguous.
        TILES: int32 ``[tiles, 3]``: ``(group, first row, end row)`` of each row tile (:func:`tile_schedule`).
        N, K: output columns and reduction length.
    """
    tile = tl.program_id(0)
    group = tl.load(TILES + 3 * tile).to(tl.int64)
    row_start = tl.load(TILES + 3 * tile + 1)
    n_rows = tl.load(TILES + 3 * tile + 2) - row_start
    col_start = tl.program_id(1) * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = offs_m < n_rows
    col_mask = offs_n < N - col_start

    # 64-bit scalar bases, 32-bit offsets inside the tile (the host keeps N * K and BLOCK_M * K under 2**31).
    x_base = X + row_start.to(tl.int64) * K
    x_offs = offs_m[:, None] * K + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    if TRANSPOSE_W:  # w[g] is [N, K]: the [BLOCK_K, BLOCK_N] tile of w[g].T
        w_base = W + group * N * K + col_start.to(tl.int64) * K
        w_offs = offs_n[None, :] * K + offs_k[:, None]
        w_step = BLOCK_K
    else:  # w[g] is [K, N]
        w_base = W + group * N * K + col_start
        w_offs = offs_k[:, None] * N + offs_n[None, :]
        w_step = BLOCK_K * N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(x_base + x_offs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_base + w_offs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _dot(a, b, acc, PRECISION, UPCAST)
        x_base += BLOCK_K
        w_base += w_step

    y_base = Y + row_start.to(tl.int64) * N + col_start
    y_offs = offs_m[:, None] * N + offs_n[None, :]
    tl.store(y_base + y_offs, acc.to(Y.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@jit
def _grouped_weight_grad_kernel(
    DY,
    X,
    DW,
    OFFSETS,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One ``BLOCK_N x BLOCK_K`` tile of ``dw[g] = dy[rows_g].T @ x[rows_g]``; grid ``(n tiles, k tiles, E)``.

    Args:
        DY: ``[T, N]``, rows sorted by group, contiguous.
        X: ``[T, K]``, contiguous.
        DW: ``[E, N, K]`` output, contiguous.
        OFFSETS: int32 ``[E + 1]``: group ``g`` owns rows ``[OFFSETS[g], OFFSETS[g + 1])``.
    """
    group = tl.program_id(2)
    n_start = tl.program_id(0) * BLOCK_N
    k_start = tl.program_id(1) * BLOCK_K
    row_start = tl.load(OFFSETS + group)
    row_end = tl.load(OFFSETS + group + 1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N - n_start
    k_mask = offs_k < K - k_start

    # 64-bit scalar bases, 32-bit offsets inside the tile.
    dy_base = DY + row_start.to(tl.int64) * N + n_start
    dy_offs = offs_m[None, :] * N + offs_n[:, None]  # [BLOCK_N, BLOCK_M]: the tile of dy.T
    x_base = X + row_start.to(tl.int64) * K + k_start
    x_offs = offs_m[:, None] * K + offs_k[None, :]  # [BLOCK_M, BLOCK_K]

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        m_mask = offs_m < row_end - m0
        a = tl.load(dy_base + dy_offs, mask=n_mask[:, None] & m_mask[None, :], other=0.0)
        b = tl.load(x_base + x_offs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _dot(a, b, acc, PRECISION, UPCAST)
        dy_base += BLOCK_M * N
        x_base += BLOCK_M * K

    dw_base = DW + group.to(tl.int64) * N * K + n_start.to(tl.int64) * K + k_start
    dw_offs = offs_n[:, None] * K + offs_k[None, :]
    tl.store(dw_base + dw_offs, acc.to(DW.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


# --------------------------------------------------------------------------- host side


def tile_schedule(sizes: Sequence[int], block_m: int) -> torch.Tensor:
    """The row tiles of the groups, on the CPU: int32 ``[tiles, 3]`` of ``(group, first row, end row)``.

    Group ``g`` (rows ``[o_g, o_g + sizes[g])``) gets ``cdiv(sizes[g], block_m)`` tiles; empty groups get none.
    """
    counts = torch.tensor([int(s) for s in sizes], dtype=torch.int64)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    tiles_per_group = (counts + block_m - 1) // block_m
    group = torch.repeat_interleave(torch.arange(len(counts)), tiles_per_group)
    first_tile = torch.cumsum(tiles_per_group, 0) - tiles_per_group
    index_in_group = torch.arange(int(tiles_per_group.sum())) - first_tile[group]
    schedule = torch.stack([group, starts[group] + index_in_group * block_m, ends[group]], dim=1)
    return schedule.to(torch.int32)


def _check_inputs(name: str, *tensors: torch.Tensor) -> None:
    dtype = tensors[0].dtype
    if dtype not in DTYPES or any(t.dtype != dtype for t in tensors):
        raise ConfigurationError(
            f"{name}: the Triton kernel takes float32, float16 or bfloat16 inputs of one dtype, got "
            f"{', '.join(str(t.dtype) for t in tensors)}; cast them, or set ENGINE_KERNELS=torch"
        )
    if tensors[0].shape[0] >= 2**31:
        raise ConfigurationError(f"{name}: {tensors[0].shape[0]} rows exceed the kernel's int32 row index; split the batch")
    widest = max(t.shape[-1] for t in tensors)
    if widest * _MAX_TILE >= 2**31:
        raise ConfigurationError(f"{name}: rows of {widest} values overflow the kernel's int32 tile offsets; "
                                 "set ENGINE_KERNELS=torch for such shapes")


def grouped_mm_triton(x: torch.Tensor, w: torch.Tensor, sizes: Sequence[int], transpose_w: bool = True) -> torch.Tensor:
    """``x_g @ w[g].T`` per group (``transpose_w``, ``w [E, N, K]``) or ``x_g @ w[g]`` (``w [E, K, N]``).

    Args:
        x: ``[T, K]``, rows sorted by group.
        w: the expert weights, same dtype as ``x``.
        sizes: ``E`` host integers summing to ``T`` (checked by :func:`engine_kernels.grouped_gemm.grouped_mm`).

    Returns:
        ``[T, N]`` in ``x``'s dtype.
    """
    _check_inputs("grouped_mm", x, w)
    x, w = x.contiguous(), w.contiguous()
    n, k = (w.shape[1], w.shape[2]) if transpose_w else (w.shape[2], w.shape[1])
    y = x.new_empty(x.shape[0], n)
    if not launchable(x, w) or y.numel() == 0:
        return y
    if k == 0:
        return y.zero_()
    cfg = mm_config(n, k, x.dtype)
    tiles = tile_schedule(sizes, cfg.block_m).to(x.device)
    grid = (tiles.shape[0], cdiv(n, cfg.block_n))
    _grouped_mm_kernel[grid](
        x, w, y, tiles, n, k,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, TRANSPOSE_W=transpose_w,
        **_dot_options(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def grouped_weight_grad_triton(dy: torch.Tensor, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``dw[g] = dy_g.T @ x_g``: ``[E, N, K]`` in ``dy``'s dtype (zero for empty groups).

    Args:
        dy: ``[T, N]``, rows sorted by group.
        x: ``[T, K]``, same dtype.
        sizes: ``E`` host integers summing to ``T``.
    """
    _check_inputs("grouped_mm weight gradient", dy, x)
    dy, x = dy.contiguous(), x.contiguous()
    n_groups, n, k = len(sizes), dy.shape[1], x.shape[1]
    dw = dy.new_empty(n_groups, n, k)
    if not launchable(dy, x) or dw.numel() == 0:
        return dw
    cfg = weight_grad_config(n, k, dy.dtype)
    counts = torch.tensor([0, *(int(s) for s in sizes)], dtype=torch.int64)
    offsets = torch.cumsum(counts, 0).to(device=dy.device, dtype=torch.int32)
    grid = (cdiv(n, cfg.block_n), cdiv(k, cfg.block_k), n_groups)
    _grouped_weight_grad_kernel[grid](
        dy, x, dw, offsets, n, k,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        **_dot_options(dy.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dw


# --------------------------------------------------------------------------- audit

#: (model, projection, N, K) of the expert weights ``w [E, N, K]`` the audit compiles for (transformers' layout:
#: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``), LoRA factors on them (``A [E, r, in]``, ``B [E, out, r]``,
#: r = 16 and 64), and an odd shape (rank 8 or the tests' sizes: extents not multiples of 16).
_AUDIT_WEIGHTS = (
    ("Mixtral-8x7B", "gate_up", 2 * 14336, 4096),
    ("Mixtral-8x7B", "down", 4096, 14336),
    ("Qwen3-30B-A3B", "gate_up", 2 * 768, 2048),
    ("Qwen3-30B-A3B", "down", 2048, 768),
    ("LoRA r=16", "A", 16, 4096),
    ("LoRA r=16", "B", 4096, 16),
    ("LoRA r=64", "A", 64, 2048),
    ("LoRA r=64", "B", 2048, 64),
    ("odd", "w", 40, 24),
)

#: The dtypes each audited weight is compiled in: every one in bf16, the model weights in fp16 and fp32 too.
_AUDIT_DTYPES = {"Mixtral-8x7B": ("bfloat16", "float16", "float32"), "Qwen3-30B-A3B": ("bfloat16", "float16", "float32")}


def audit_launches() -> list[AuditLaunch]:
    """The forward, input-gradient (dx) and weight-gradient (dw) launches the wrappers make for
    :data:`_AUDIT_WEIGHTS` (dtypes: :data:`_AUDIT_DTYPES`, else bf16). Weights whose launches compile to the same
    configuration share one entry, named after all of them."""
    found: dict[tuple, list[str]] = {}
    for model, proj, n, k in _AUDIT_WEIGHTS:
        for tag in _AUDIT_DTYPES.get(model, ("bfloat16",)):
            dtype = getattr(torch, tag)
            for name, out, red, transpose in (("fwd", n, k, True), ("dx", k, n, False), ("dw", n, k, None)):
                cfg = weight_grad_config(out, red, dtype) if transpose is None else mm_config(out, red, dtype)
                key = (tag, name, cfg, transpose, aligned(out, red))
                found.setdefault(key, []).append(f"{model} {proj} {n}x{k}")
    launches = []
    for (tag, name, cfg, transpose, is_aligned), weights in found.items():
        ptr = dtype_signature(getattr(torch, tag))
        constexprs = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k}
        if transpose is None:
            kernel = _grouped_weight_grad_kernel
            signature = {"DY": ptr, "X": ptr, "DW": ptr, "OFFSETS": "*i32", "N": "i32", "K": "i32"}
        else:
            kernel = _grouped_mm_kernel
            signature = {"X": ptr, "W": ptr, "Y": ptr, "TILES": "*i32", "N": "i32", "K": "i32"}
            constexprs["TRANSPOSE_W"] = transpose
        constexprs.update(_dot_options(getattr(torch, tag), interpreted=False))
        shape = f"{name} {tag} {cfg.block_m}x{cfg.block_n}x{cfg.block_k}: {', '.join(weights)}"
        launches.append(AuditLaunch("grouped_mm", kernel, signature, constexprs, cfg.num_warps, shape, cfg.num_stages,
                                    divisible_by_16=("N", "K") if is_aligned else ()))
    return launches
