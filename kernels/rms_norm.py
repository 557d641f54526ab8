"""RMSNorm with a hand-written backward, in Llama's rule and in Gemma's (``offset``).

Math (per row ``x`` of width ``H``, computed in fp32 whatever the input dtype)::

    rstd = 1 / sqrt(mean(x**2) + eps)
    xhat = x * rstd
    y    = w * cast(xhat, x.dtype)                      # offset == 0, Llama: normalise in fp32, cast, then scale
    y    = cast(xhat * (offset + float(w)), x.dtype)    # offset != 0, Gemma (offset 1): scale in fp32, cast once

The first is transformers' ``LlamaRMSNorm`` (output dtype: ``w``'s and ``x``'s promoted), the second its
``GemmaRMSNorm`` (and Gemma 2/3's), whose weight is stored as ``w = scale - 1`` (output dtype: ``x``'s).

Backward, with ``g = dy * (offset + w)`` (fp32)::

    dx = rstd * (g - xhat * mean(g * xhat))
    dw = sum_rows(dy * cast(xhat, x.dtype))             # offset == 0 (the product rounded as the reference's)
    dw = sum_rows(float(dy) * xhat)                     # offset != 0, all in fp32, cast to w's dtype at the end

Saved for backward: ``x`` (the input itself, no copy), ``w`` and ``rstd`` (one fp32 per row).
``xhat`` is recomputed. The backward never writes into its inputs (autograd may share ``dy``
with other consumers), so it is safe whatever the caller does with them.

Triton kernels (the rule is the constexpr ``HAS_OFFSET``, the offset a runtime float): the forward reads a row once and writes ``y`` and ``rstd``; the backward runs
a persistent grid (about one program per multiprocessor), each program walking its share of the
rows, writing ``dx`` and accumulating its partial ``dw`` in fp32 registers; the partials
(``[programs, H]``) are summed afterwards. Bytes per element: forward reads ``x`` and writes
``y`` (2 accesses; unfused PyTorch makes ~8: cast, square, mean, multiply, cast, scale);
backward reads ``x``, ``dy`` and writes ``dx`` (3 accesses).
"""

from __future__ import annotations

import torch

from engine_kernels._triton import (
    AuditLaunch,
    cdiv,
    dtype_signature,
    jit,
    launchable,
    multiprocessor_count,
    next_power_of_2,
    tl,
)
from engine_kernels.cpu_fusion import cpu_fused
from engine_kernels.dispatch import select_backend


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """Plain PyTorch RMSNorm exactly as transformers computes it (autograd does the backward): ``LlamaRMSNorm``
    for ``offset == 0``, ``GemmaRMSNorm`` (``offset = 1``, the ``1.0 + weight`` of its forward) otherwise."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * xf.to(x.dtype)
    return (xf * (offset + weight.float())).type_as(x)


@cpu_fused
def _rms_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)``: the forward of :class:`RMSNormFunction` (one fused loop on CPU, :mod:`engine_kernels.cpu_fusion`)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * (xf * rstd).to(x.dtype), rstd
    return (xf * rstd * (offset + weight.float())).to(x.dtype), rstd


@cpu_fused
def _rms_backward_dx(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float
) -> torch.Tensor:
    xhat = x.float() * rstd
    g = dy.float() * (offset + weight.float())
    return (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)


@cpu_fused
def _rms_backward_dw(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float
) -> torch.Tensor:
    xhat = x.float() * rstd
    if offset == 0.0:
        return (dy * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).float().sum(0).to(weight.dtype)
    return (dy.float() * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Autograd Function for RMSNorm; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
        y, rstd = _rms_forward(x, weight, eps, offset)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx = _rms_backward_dx(dy, x, weight, rstd, ctx.offset) if ctx.needs_input_grad[0] else None
        dw = _rms_backward_dw(dy, x, weight, rstd, ctx.offset) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


# --------------------------------------------------------------------------- Triton


@jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, offset, BLOCK: tl.constexpr,
                         HAS_OFFSET: tl.constexpr):
    """One row per program: ``y = w * cast(x * rstd)`` (Llama) or ``y = cast(x * rstd * (offset + w))``
    (``HAS_OFFSET``, Gemma); ``rstd`` stored for backward."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    if HAS_OFFSET:
        y = x * rstd * (offset + w)  # Gemma: scale in fp32, one cast at the end
    else:
        y = w * (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # Llama: cast before scaling
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@jit
def _dw_term(dy, xhat, X, HAS_OFFSET: tl.constexpr):
    """One row's ``dw`` term, fp32 out: ``dy * cast(xhat)`` rounded to the input dtype as the Llama
    reference's product is, or ``dy * xhat`` in fp32 (``HAS_OFFSET``, Gemma)."""
    if HAS_OFFSET:
        return dy * xhat
    xcast = xhat.to(X.dtype.element_ty).to(tl.float32)
    return (dy * xcast).to(X.dtype.element_ty).to(tl.float32)


@jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, n_cols, rows_per_program, offset,
    BLOCK: tl.constexpr, HAS_DX: tl.constexpr, HAS_DW: tl.constexpr, HAS_OFFSET: tl.constexpr,
):
    """Rows ``[pid * rows_per_program, ...)``: ``dx`` per row, this program's ``dw`` partial summed in fp32."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        w = w + offset  # the effective scale (padded columns: dy is 0 there)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program  # int64 row offsets: no overflow on long packed batches
    end = tl.minimum(start + rows_per_program, n_rows)
    for row64 in range(start, end):
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        xhat = x * rstd
        if HAS_DX:
            g = dy * w
            dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
            tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DW:
            dw += _dw_term(dy, xhat, X, HAS_OFFSET)
    if HAS_DW:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


@jit
def _rms_norm_bwd_dot_kernel(DY, X, W, RSTD, DOT, stride_dy, stride_x, n_cols, offset, BLOCK: tl.constexpr,
                             HAS_OFFSET: tl.constexpr):
    """Wide rows, step 1: ``dot = mean(dy * (offset + w) * xhat)`` per row (one row per program)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        w = w + offset
    tl.store(DOT + row, tl.sum(dy * w * x, axis=0) * tl.load(RSTD + row) / n_cols)


@jit
def _rms_norm_bwd_tiled_kernel(
    DY, X, W, RSTD, DOT, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, n_cols, rows_per_program, offset,
    TILE: tl.constexpr, HAS_DX: tl.constexpr, HAS_DW: tl.constexpr, HAS_OFFSET: tl.constexpr,
):
    """Wide rows, step 2: program ``(p, t)`` walks rows of ``p`` over column tile ``t``: ``dx`` and ``dw``."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * TILE + tl.arange(0, TILE)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        w = w + offset
    dw = tl.zeros((TILE,), dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    for row64 in range(start, end):
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        xhat = x * rstd
        if HAS_DX:
            dx = rstd * (dy * w - xhat * tl.load(DOT + row64))
            tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DW:
            dw += _dw_term(dy, xhat, X, HAS_OFFSET)
    if HAS_DW:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


#: Rows wider than this take the two-step backward (a whole row of x, dy, w and dw no longer fits in registers).
MAX_FUSED_BACKWARD = 4096
#: Column tile of the two-step backward.
WIDE_TILE = 2048


def _launch_config(n_cols: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for rows of ``n_cols``: the whole row in one block, more warps for wider rows."""
    block = next_power_of_2(n_cols)
    if block > 65536:
        raise ValueError(f"RMSNorm Triton kernel supports rows up to 65536 wide, got {n_cols}")
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return block, num_warps


def _backward_programs(n_rows: int, device: torch.device) -> int:
    """Persistent grid: about one program per multiprocessor (a few on CPU under the interpreter)."""
    slots = multiprocessor_count(device)
    return max(1, min(n_rows, slots))


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class RMSNormTritonFunction(torch.autograd.Function):
    """The Triton kernels behind the same math as :class:`RMSNormFunction`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
        rows = _as_rows(x)
        n_rows, n_cols = rows.shape
        out_dtype = torch.result_type(weight, x) if offset == 0.0 else x.dtype
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block, num_warps = _launch_config(n_cols)
        weight_c = weight.contiguous()
        if launchable(rows):
            _rms_norm_fwd_kernel[(n_rows,)](
                rows, weight_c, y, rstd, rows.stride(0), y.stride(0), n_cols, eps, offset, BLOCK=block,
                HAS_OFFSET=offset != 0.0, num_warps=num_warps,
            )
        ctx.save_for_backward(rows, weight_c, rstd)
        ctx.x_shape, ctx.offset = x.shape, offset
        return y.view(*x.shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = rows.shape
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_dx or want_dw):
            return None, None, None, None
        offset = ctx.offset
        has_offset = offset != 0.0
        dy_rows = _as_rows(dy)
        dx = torch.empty_like(rows) if want_dx else rows  # a placeholder pointer when not written
        programs = _backward_programs(n_rows, rows.device)
        partial = torch.empty((programs, n_cols) if want_dw else (1,), dtype=torch.float32, device=rows.device)
        block, num_warps = _launch_config(n_cols)
        if block <= MAX_FUSED_BACKWARD:
            if launchable(dy_rows):
                _rms_norm_bwd_kernel[(programs,)](
                    dy_rows, rows, weight, rstd, dx, partial, dy_rows.stride(0), rows.stride(0), dx.stride(0),
                    n_rows, n_cols, cdiv(n_rows, programs), offset, BLOCK=block, HAS_DX=want_dx, HAS_DW=want_dw,
                    HAS_OFFSET=has_offset, num_warps=num_warps,
                )
        else:
            dot = torch.empty(n_rows, dtype=torch.float32, device=rows.device)
            if want_dx and launchable(dy_rows):
                _rms_norm_bwd_dot_kernel[(n_rows,)](
                    dy_rows, rows, weight, rstd, dot, dy_rows.stride(0), rows.stride(0), n_cols, offset,
                    BLOCK=block, HAS_OFFSET=has_offset, num_warps=num_warps,
                )
            if launchable(dy_rows):
                _rms_norm_bwd_tiled_kernel[(programs, cdiv(n_cols, WIDE_TILE))](
                    dy_rows, rows, weight, rstd, dot, dx, partial, dy_rows.stride(0), rows.stride(0), dx.stride(0),
                    n_rows, n_cols, cdiv(n_rows, programs), offset, TILE=WIDE_TILE, HAS_DX=want_dx, HAS_DW=want_dw,
                    HAS_OFFSET=has_offset, num_warps=8,
                )
        dx_out = dx.view(ctx.x_shape) if want_dx else None
        dw_out = partial.sum(0).to(weight.dtype) if want_dw else None
        return dx_out, dw_out, None, None


#: Model shapes the audit compiles: (name, hidden size, Gemma's offset rule).
_AUDIT_SHAPES = (
    ("smollm2-135m", 576, False),
    ("llama-3.1-8b", 4096, False),
    ("qwen3 head_dim q/k norm", 128, False),
    ("llama-3.1-70b", 8192, False),
    ("phi-3.5-mini", 3072, False),
    ("gemma-2-9b", 3584, True),
    ("gemma-3-12b", 3840, True),
    ("gemma-3 head_dim q/k norm", 256, True),
)


def audit_launches() -> list[AuditLaunch]:
    """The forward and backward launches for representative hidden sizes, in bf16 (fp16 for one), with the
    Llama rule or Gemma's offset rule (``HAS_OFFSET``) as each model uses it."""
    launches = []
    for name, hidden, has_offset in _AUDIT_SHAPES:
        block, num_warps = _launch_config(hidden)
        rule = {"HAS_OFFSET": has_offset}
        for dtype in (torch.bfloat16,) + ((torch.float16,) if hidden == 4096 else ()):
            ptr, tag = dtype_signature(dtype), str(dtype).removeprefix("torch.")
            tag += " offset" if has_offset else ""
            fwd_sig = {"X": ptr, "W": ptr, "Y": ptr, "RSTD": "*fp32", "stride_x": "i32", "stride_y": "i32",
                       "n_cols": "i32", "eps": "fp32", "offset": "fp32"}
            launches.append(AuditLaunch("rms_norm", _rms_norm_fwd_kernel, fwd_sig, {"BLOCK": block, **rule},
                                        num_warps, f"{name} H={hidden} {tag} fwd"))
            sizes = {"stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32", "n_rows": "i32", "n_cols": "i32",
                     "rows_per_program": "i32", "offset": "fp32"}
            flags = {"HAS_DX": True, "HAS_DW": True, **rule}
            if block <= MAX_FUSED_BACKWARD:
                bwd_sig = {"DY": ptr, "X": ptr, "W": ptr, "RSTD": "*fp32", "DX": ptr, "DW_PARTIAL": "*fp32", **sizes}
                launches.append(AuditLaunch("rms_norm", _rms_norm_bwd_kernel, bwd_sig, {"BLOCK": block, **flags},
                                            num_warps, f"{name} H={hidden} {tag} bwd"))
                continue
            dot_sig = {"DY": ptr, "X": ptr, "W": ptr, "RSTD": "*fp32", "DOT": "*fp32", "stride_dy": "i32",
                       "stride_x": "i32", "n_cols": "i32", "offset": "fp32"}
            launches.append(AuditLaunch("rms_norm", _rms_norm_bwd_dot_kernel, dot_sig, {"BLOCK": block, **rule},
                                        num_warps, f"{name} H={hidden} {tag} bwd step 1"))
            tiled_sig = {"DY": ptr, "X": ptr, "W": ptr, "RSTD": "*fp32", "DOT": "*fp32", "DX": ptr,
                         "DW_PARTIAL": "*fp32", **sizes}
            launches.append(AuditLaunch("rms_norm", _rms_norm_bwd_tiled_kernel, tiled_sig,
                                        {"TILE": WIDE_TILE, **flags}, 8, f"{name} H={hidden} {tag} bwd step 2"))
    return launches


# --------------------------------------------------------------------------- dispatch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dimension.

    Args:
        x (Tensor): input of shape ``[..., H]``.
        weight (Tensor): scale of shape ``[H]``.
        eps (float): added to the mean square before the square root.
        offset (float): 0 (default): Llama's rule ``w * cast(xhat)``; nonzero: Gemma's rule
            ``cast(xhat * (offset + w))`` in fp32 (Gemma 1/2/3 use ``offset=1.0``; see the module docstring).

    Returns:
        Tensor of the same shape as ``x``; dtype ``x``'s (with ``offset == 0``, ``x``'s and ``weight``'s promoted).
    """
    return _IMPLEMENTATIONS[select_backend("rms_norm", x.device)](x, weight, eps, float(offset))


_IMPLEMENTATIONS = {"torch": RMSNormFunction.apply, "triton": RMSNormTritonFunction.apply}
