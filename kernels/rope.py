"""Rotary position embedding (RoPE) on Q and K, Hugging Face "rotate half" layout.

For a head vector ``x = [x1, x2]`` (two halves of ``head_dim``) at a position with
angles ``theta`` (``cos``/``sin`` repeat each frequency in both halves)::

    rope(x) = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]

A rotation is orthogonal, so the backward is the inverse rotation::

    dx = dy * cos + rotate_half_T(dy * sin),     rotate_half_T([g1, g2]) = [g2, -g1]

Nothing but ``cos`` and ``sin`` (shared by all layers) is saved for backward.
Positions come from per-token position ids, so packed documents restart at 0.
"""

from __future__ import annotations

import torch

from kernels.dispatch import select_backend


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
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq_in = dq * cos + _rotate_half_transposed(dq * sin) if dq is not None else None
        dk_in = dk * cos + _rotate_half_transposed(dk * sin) if dk is not None else None
        return dq_in, dk_in, None, None


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


_IMPLEMENTATIONS = {"torch": RoPEFunction.apply}
