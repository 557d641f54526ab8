"""RMSNorm with a hand-written backward.

Math (per row ``x`` of width ``H``, computed in fp32 whatever the input dtype)::

    rstd = 1 / sqrt(mean(x**2) + eps)
    xhat = x * rstd
    y    = w * cast(xhat, x.dtype)           # Llama casting rule: normalise in fp32, cast, then scale

Backward, with ``g = dy * w`` (fp32)::

    dx = rstd * (g - xhat * mean(g * xhat))
    dw = sum_rows(dy * cast(xhat, x.dtype))

Saved for backward: ``x`` (the input itself, no copy), ``w`` and ``rstd`` (one fp32 per row).
``xhat`` is recomputed. The backward never writes into its inputs.
"""

from __future__ import annotations

import torch

from kernels.dispatch import select_backend


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain PyTorch RMSNorm, exactly as Hugging Face's Llama computes it (autograd does the backward)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Autograd Function for RMSNorm; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        dx = dw = None
        if ctx.needs_input_grad[0]:
            g = dy.float() * weight.float()
            dx = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = (dy * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).float().sum(0).to(weight.dtype)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension.

    Args:
        x (Tensor): input of shape ``[..., H]``.
        weight (Tensor): scale of shape ``[H]``.
        eps (float): added to the mean square before the square root.

    Returns:
        Tensor of the same shape and dtype as ``x``.
    """
    return _IMPLEMENTATIONS[select_backend("rms_norm", x.device)](x, weight, eps)


_IMPLEMENTATIONS = {"torch": RMSNormFunction.apply}
