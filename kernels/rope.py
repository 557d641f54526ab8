"""Rotary position embedding (RoPE) on Q and K, Hugging Face "rotate half" layout.

For a head vector ``x = [x1, x2]`` (two halves of ``head_dim``) at a position with
angles ``theta`` (``cos``/``sin`` repeat each frequency in both halves)::

    rope(x) = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]

A rotation is orthogonal, so the backward is the inverse rotation::

    dx = dy * cos + rotate_half_T(dy * sin),     rotate_half_T([g1, g2]) = [g2, -g1]

Nothing but ``cos`` and ``sin`` (shared by all layers) is saved for backward.
Positions come from per-token position ids, so packed documents restart at 0.

Triton kernel (:func:`_rope_kernel`): one program per token (``b * s`` programs). It loads the
token's ``cos``/``sin`` once and rotates all ``n_heads`` Q heads and all ``n_kv_heads`` K heads
(GQA: the counts differ) in the same launch, in fp32, storing the input dtype into new tensors.
Q and K may be strided views (a slice of a fused QKV projection, a transposed gradient); only
their last dim must be contiguous. The backward is the same kernel with ``BACKWARD=True``: the
rotation by ``-theta``, i.e. ``sin`` negated (halves swapped, so it is the exact transpose of the
forward even for tables whose halves differ). As in the PyTorch path, only ``cos``/``sin`` are saved.
"""

from __future__ import annotations

import torch

from engine_kernels._triton import AuditLaunch, dtype_signature, jit, launchable, next_power_of_2, tl
from engine_kernels.cpu_fusion import cpu_fused
from engine_kernels.dispatch import select_backend


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_half_transposed(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, -x1), dim=-1)


def rope_reference(q, k, cos, sin):
    """Plain PyTorch RoPE, as Hugging Face's ``apply_rotary_pos_emb`` computes it."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class RoPEFunction(torch.autograd.Function):
    """Autograd Function applying RoPE to Q and K together; backward is the inverse rotation."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq_in = _unrotate(dq, cos, sin) if dq is not None else None
        dk_in = _unrotate(dk, cos, sin) if dk is not None else None
        return dq_in, dk_in, None, None


@cpu_fused
def _rotate(x, cos, sin):
    """``x * cos + rotate_half(x) * sin`` (one fused loop on CPU, :mod:`engine_kernels.cpu_fusion`)."""
    return x * cos + _rotate_half(x) * sin


@cpu_fused
def _unrotate(dy, cos, sin):
    """The inverse rotation (RoPE's backward)."""
    return dy * cos + _rotate_half_transposed(dy * sin)


# --------------------------------------------------------------------------- Triton

#: Largest ``[BLOCK_H, BLOCK_D]`` tile a program holds per half; more heads are rotated in a loop.
_MAX_TILE = 2048


@jit
def _rotate_heads(X, XO, x_row, xo_row, x_stride_h, n_heads, half, c1, c2, s1, s2,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate the ``n_heads`` heads of one token: ``[o1, o2] = [x1*c1 - x2*s1, x2*c2 + x1*s2]``."""
    cols = tl.arange(0, BLOCK_D)
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < n_heads)[:, None] & (cols < half)[None, :]
        x_ptr = X + x_row + heads[:, None] * x_stride_h + cols[None, :]
        o_ptr = XO + xo_row + heads[:, None] * (2 * half) + cols[None, :]
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(o_ptr, o1.to(XO.dtype.element_ty), mask=mask)
        tl.store(o_ptr + half, o2.to(XO.dtype.element_ty), mask=mask)


@jit
def _rope_kernel(Q, K, COS, SIN, QO, KO, seq_len, n_heads, n_kv_heads, half,
                 q_stride_b, q_stride_s, q_stride_h, k_stride_b, k_stride_s, k_stride_h, cs_stride_b, cs_stride_s,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    """One token: ``Q [b, s, n_heads, 2*half]``, ``K [b, s, n_kv_heads, 2*half]`` (strided), ``COS``/``SIN``
    ``[b, s, 2*half]`` (strided) -> contiguous ``QO``/``KO``. ``BACKWARD`` applies the inverse rotation."""
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    s = row % seq_len
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < half
    cs = b * cs_stride_b + s * cs_stride_s
    c1 = tl.load(COS + cs + cols, mask=col_mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cs + half + cols, mask=col_mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cs + cols, mask=col_mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cs + half + cols, mask=col_mask, other=0.0).to(tl.float32)
    if BACKWARD:  # transpose: [dx1, dx2] = [dy1*c1 + dy2*s2, dy2*c2 - dy1*s1]
        s1, s2 = -s2, -s1
    _rotate_heads(Q, QO, b * q_stride_b + s * q_stride_s, row * n_heads * 2 * half, q_stride_h, n_heads, half,
                  c1, c2, s1, s2, BLOCK_H, BLOCK_D)
    _rotate_heads(K, KO, b * k_stride_b + s * k_stride_s, row * n_kv_heads * 2 * half, k_stride_h, n_kv_heads, half,
                  c1, c2, s1, s2, BLOCK_H, BLOCK_D)


def _launch_config(n_heads: int, n_kv_heads: int, head_dim: int) -> tuple[int, int, int]:
    """``(BLOCK_H, BLOCK_D, num_warps)``: the half head dim and as many heads as fit a ``_MAX_TILE`` tile."""
    block_d = next_power_of_2(head_dim // 2)
    block_h = min(next_power_of_2(max(n_heads, n_kv_heads)), max(1, _MAX_TILE // block_d))
    num_warps = min(8, max(1, block_h * block_d // 256))
    return block_h, block_d, num_warps


def _last_dim_contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def rope_triton_forward(q, k, cos, sin, backward: bool = False):
    """Rotate ``q [b, s, n_heads, d]`` and ``k [b, s, n_kv_heads, d]`` by ``cos``/``sin`` (broadcastable to
    ``[b, s, 1, d]``) in one launch; ``backward=True`` rotates back (the gradient of the rotation).

    Either of ``q``, ``k`` may be None (an output that got no gradient): it is skipped and None returned.
    Returns new contiguous tensors in the inputs' dtypes.
    """
    if q is None and k is None:
        return None, None
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    present = q if q is not None else k
    b, s, _, d = present.shape
    assert d % 2 == 0, f"RoPE needs an even head_dim, got {d}"
    assert k is None or q is None or (q.shape[:2] == k.shape[:2] and q.shape[-1] == k.shape[-1]), "q/k shapes differ"
    cos, sin = cos.expand(b, s, 1, d), sin.expand(b, s, 1, d)
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    qo = None if q is None else torch.empty_like(q, memory_format=torch.contiguous_format)
    ko = None if k is None else torch.empty_like(k, memory_format=torch.contiguous_format)
    if b * s == 0:
        return qo, ko
    # A missing operand gets 0 heads (never read or written) and borrows the other's pointers.
    q_in, q_out = (q, qo) if q is not None else (k, ko)
    k_in, k_out = (k, ko) if k is not None else (q, qo)
    n_heads = 0 if q is None else q.shape[2]
    n_kv_heads = 0 if k is None else k.shape[2]
    block_h, block_d, num_warps = _launch_config(n_heads, n_kv_heads, d)
    if launchable(q_in):
        _rope_kernel[(b * s,)](
            q_in, k_in, cos, sin, q_out, k_out, s, n_heads, n_kv_heads, d // 2,
            q_in.stride(0), q_in.stride(1), q_in.stride(2), k_in.stride(0), k_in.stride(1), k_in.stride(2),
            cos.stride(0), cos.stride(1),
            BLOCK_H=block_h, BLOCK_D=block_d, BACKWARD=backward, num_warps=num_warps,
        )
    return qo, ko


class RoPETritonFunction(torch.autograd.Function):
    """RoPE on Q and K with the Triton kernel; backward is the same kernel rotating back. Saves only cos/sin."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(cos, sin)
        return rope_triton_forward(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq_in, dk_in = rope_triton_forward(dq, dk, cos, sin, backward=True)
        return dq_in, dk_in, None, None


def audit_launches() -> list[AuditLaunch]:
    """The forward and backward launches of :func:`rope_triton_forward` for representative models."""
    models = [  # (name, n_heads, n_kv_heads, head_dim, dtypes)
        ("smollm2-135m", 9, 3, 64, (torch.bfloat16,)),
        ("llama-3.1-8b", 32, 8, 128, (torch.bfloat16, torch.float16)),
        ("qwen2.5-7b", 28, 4, 128, (torch.bfloat16,)),
        ("mistral-7b", 32, 8, 128, (torch.bfloat16,)),
    ]
    ints = ("seq_len", "n_heads", "n_kv_heads", "half", "q_stride_b", "q_stride_s", "q_stride_h",
            "k_stride_b", "k_stride_s", "k_stride_h", "cs_stride_b", "cs_stride_s")
    launches = []
    for name, heads, kv_heads, head_dim, dtypes in models:
        block_h, block_d, num_warps = _launch_config(heads, kv_heads, head_dim)
        for dtype in dtypes:
            pointers = {p: dtype_signature(dtype) for p in ("Q", "K", "COS", "SIN", "QO", "KO")}
            for backward in (False, True):
                launches.append(AuditLaunch(
                    op="rope",
                    kernel=_rope_kernel,
                    signature={**pointers, **{i: "i32" for i in ints}},
                    constexprs={"BLOCK_H": block_h, "BLOCK_D": block_d, "BACKWARD": backward},
                    num_warps=num_warps,
                    shape=f"{name} {dtype_signature(dtype)[1:]} {'bwd' if backward else 'fwd'}",
                ))
    return launches


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float, dtype: torch.dtype):
    """Cos/sin tables for per-token positions.

    Args:
        position_ids (Tensor): int64 ``[b, s]``.
        inv_freq (Tensor): fp32 ``[head_dim // 2]``.
        attention_scaling (float): multiplier of cos and sin (1.0 except for some scaled RoPE types).
        dtype: dtype of the returned tables (the activations' dtype, as Hugging Face does).

    Returns:
        ``(cos, sin)``, each ``[b, s, 1, head_dim]``, ready to broadcast over heads of a ``[b, s, h, d]`` tensor.
    """
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device, torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * attention_scaling).to(dtype)
    sin = (emb.sin() * attention_scaling).to(dtype)
    return cos.unsqueeze(2), sin.unsqueeze(2)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate queries and keys.

    Args:
        q (Tensor): ``[b, s, n_heads, head_dim]``.
        k (Tensor): ``[b, s, n_kv_heads, head_dim]``.
        cos, sin (Tensor): ``[b, s, 1, head_dim]`` from :func:`rope_cos_sin`.

    Returns:
        ``(q_rotated, k_rotated)`` with the input shapes.
    """
    return _IMPLEMENTATIONS[select_backend("rope", q.device)](q, k, cos, sin)


_IMPLEMENTATIONS = {"torch": RoPEFunction.apply, "triton": RoPETritonFunction.apply}
