"""SwiGLU activation ``silu(gate) * up`` whose backward recomputes the activation.

Forward::

    h = silu(g) * u,   silu(g) = g * sigmoid(g)

Backward, with ``s = sigmoid(g)``::

    du = dh * silu(g)
    dg = dh * u * s * (1 + g * (1 - s))

Saved for backward: ``g`` and ``u`` only. Plain autograd additionally keeps
``silu(g)`` alive (one more ``[tokens, intermediate]`` tensor per layer);
here it is recomputed from ``g``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import select_backend


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch SwiGLU as Hugging Face's Llama MLP computes it."""
    return F.silu(gate) * up


class SwiGLUFunction(torch.autograd.Function):
    """Autograd Function for ``silu(gate) * up``; see the module docstring."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        g = gate.float()
        s = torch.sigmoid(g)
        dhf = dh.float()
        dgate = (dhf * up.float() * s * (1.0 + g * (1.0 - s))).to(gate.dtype)
        dup = (dhf * (g * s)).to(up.dtype)
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for tensors of the same shape ``[..., intermediate]``."""
    return _IMPLEMENTATIONS[select_backend("swiglu", gate.device)](gate, up)


_IMPLEMENTATIONS = {"torch": SwiGLUFunction.apply}
