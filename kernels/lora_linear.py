"""Linear layer with a frozen (optionally NF4 4-bit) base weight and a LoRA branch: the single-projection reference.

The engine runs every projection through :mod:`engine_kernels.lora_fused` (one path, one Function per group of
projections that share an input); this module is the single-projection form the tests and the GPU check
compare it with: an autograd Function with the same hand-written backward, and its plain-autograd oracle
:func:`lora_linear_reference`.

Forward, for input ``x [N, in]``, base weight ``W [out, in]`` (dense, or NF4 and
dequantized on the fly), LoRA ``A [r, in]``, ``B [out, r]`` and scale ``s``::

    y = x @ W.T + bias + s * (drop(x) @ A.T) @ B.T

``drop`` is inverted dropout on the LoRA branch only (as PEFT does):
``drop(x) = x * m / (1 - p)`` with a Bernoulli keep-mask ``m``.

Backward, with ``xa = drop(x) @ A.T [N, r]`` saved from the forward::

    dB = s * dy.T @ xa                      [out, r]
    dxa = s * dy @ B                        [N, r]
    dA = dxa.T @ drop(x)                    [r, in]
    dx = dy @ W + (dxa @ A) * m / (1 - p)   [N, in]

Saved for backward: ``x``, ``xa`` (r values per token), the dropout mask (bool,
only when ``p > 0``) and references to the weights. The base weight is never
saved dequantized: an NF4 weight is dequantized again in backward. Frozen
weights get no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine_kernels.dispatch import select_backend
from engine_kernels.errors import ConfigurationError
from engine_kernels.nf4 import NF4Weight, nf4_dequantize

BaseWeight = torch.Tensor | NF4Weight


def _dense(weight: BaseWeight, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(weight, NF4Weight):
        return nf4_dequantize(weight, dtype=dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


def lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, dropout_mask=None, dropout_p=0.0):
    """Plain PyTorch composition of the same math, differentiated by autograd (the test oracle)."""
    w = _dense(weight, x.dtype)
    y = F.linear(x, w, bias)
    if lora_a is None:
        return y
    xd = x if dropout_mask is None else x * dropout_mask / (1.0 - dropout_p)
    return y + F.linear(F.linear(xd, lora_a.to(x.dtype)), lora_b.to(x.dtype)) * scaling


class LoRALinearFunction(torch.autograd.Function):
    """Autograd Function for a frozen base linear plus LoRA; see the module docstring.

    ``forward(x, weight_data, bias, lora_a, lora_b, scaling, dropout_mask, dropout_p, nf4_meta)``: ``weight_data`` is
    the dense weight, or ``None`` with the NF4 weight passed as ``nf4_meta`` (it is not a tensor autograd
    needs to see: the base weight is frozen).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dropout_mask, dropout_p, nf4):
        base = nf4 if weight is None else weight
        w = _dense(base, x.dtype)
        y = F.linear(x, w, bias)
        del w
        xa = None
        if lora_a is not None:
            xd = x if dropout_mask is None else x * dropout_mask / (1.0 - dropout_p)
            xa = F.linear(xd, lora_a.to(x.dtype))
            y = y + F.linear(xa, lora_b.to(x.dtype)) * scaling
        ctx.base = base
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.save_for_backward(x, xa, lora_a, lora_b, dropout_mask)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, lora_a, lora_b, dropout_mask = ctx.saved_tensors
        dx = d_a = d_b = None
        dy2 = dy.reshape(-1, dy.shape[-1])
        if lora_a is not None:
            s = ctx.scaling
            b = lora_b.to(dy.dtype)
            dxa = (dy2 @ b) * s
            if ctx.needs_input_grad[4]:
                d_b = (dy2.t() @ xa.reshape(-1, xa.shape[-1])).mul_(s).to(lora_b.dtype)
            if ctx.needs_input_grad[3]:
                x2 = x.reshape(-1, x.shape[-1])
                if dropout_mask is not None:
                    x2 = x2 * dropout_mask.reshape(x2.shape) / (1.0 - ctx.dropout_p)
                d_a = (dxa.t() @ x2).to(lora_a.dtype)
        if ctx.needs_input_grad[0]:
            dx = dy2 @ _dense(ctx.base, dy.dtype)
            if lora_a is not None:
                dx_lora = dxa @ lora_a.to(dy.dtype)
                if dropout_mask is not None:
                    dx_lora = dx_lora * dropout_mask.reshape(dx_lora.shape) / (1.0 - ctx.dropout_p)
                dx = dx + dx_lora
            dx = dx.reshape(x.shape)
        return dx, None, None, d_a, d_b, None, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: BaseWeight,
    bias: torch.Tensor | None = None,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Frozen base linear (dense or NF4) plus an optional LoRA branch.

    Args:
        x (Tensor): input ``[..., in]``.
        weight: frozen base weight ``[out, in]``: a tensor or an :class:`~engine_kernels.nf4.NF4Weight`.
        bias (Tensor, optional): frozen bias ``[out]``.
        lora_a (Tensor, optional): ``[r, in]`` (any float dtype; computed in ``x.dtype``).
        lora_b (Tensor, optional): ``[out, r]``.
        scaling (float): LoRA scale ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA).
        dropout_p (float): dropout probability on the LoRA branch, applied only when ``training``.
        training (bool): whether dropout is active.

    Returns:
        Tensor ``[..., out]`` in ``x.dtype``.
    """
    if (lora_a is None) != (lora_b is None):
        raise ConfigurationError("lora_a and lora_b must be given together")
    if (isinstance(weight, torch.Tensor) and weight.requires_grad) or (bias is not None and bias.requires_grad):
        raise ConfigurationError("lora_linear treats the base weight and bias as frozen; use F.linear to train them")
    mask = None
    if lora_a is not None and training and dropout_p > 0.0:
        mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
    dense, nf4 = (None, weight) if isinstance(weight, NF4Weight) else (weight, None)
    impl = _IMPLEMENTATIONS[select_backend("lora_linear", x.device)]
    return impl(x, dense, bias, lora_a, lora_b, scaling, mask, dropout_p, nf4)


_IMPLEMENTATIONS = {"torch": LoRALinearFunction.apply}
