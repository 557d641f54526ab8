"""SwiGLU activation ``silu(gate) * up`` whose backward recomputes the activation.

Forward::

    h = silu(g) * u,   silu(g) = g * sigmoid(g)

Backward, with ``s = sigmoid(g)``::

    du = dh * silu(g)
    dg = dh * u * s * (1 + g * (1 - s))

Saved for backward: ``g`` and ``u`` only. Plain autograd additionally keeps
``silu(g)`` alive (one more ``[tokens, intermediate]`` tensor per layer);
here it is recomputed from ``g``.

Triton kernels: elementwise over the flattened tensors, fp32 inside. Forward reads ``g``, ``u``
and writes ``h`` (3 accesses per element; unfused PyTorch writes and re-reads ``silu(g)``: 5);
backward reads ``dh``, ``g``, ``u`` and writes ``dg``, ``du`` (5 accesses; unfused autograd: ~10,
plus the saved ``silu(g)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine_kernels._glu_launch import BLOCK, launch_backward, launch_forward  # noqa: F401 (BLOCK: tests size inputs by it)
from engine_kernels._glu_launch import audit_launches as glu_audit_launches
from engine_kernels._triton import AuditLaunch, jit, tl
from engine_kernels.cpu_fusion import cpu_fused
from engine_kernels.dispatch import select_backend


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch SwiGLU as Hugging Face's Llama MLP computes it."""
    return F.silu(gate) * up


class SwiGLUFunction(torch.autograd.Function):
    """Autograd Function for ``silu(gate) * up``; see the module docstring."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        return swiglu_backward_torch(dh, gate, up)


@cpu_fused
def _swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (one fused loop on CPU, :mod:`engine_kernels.cpu_fusion`)."""
    return F.silu(gate) * up


@cpu_fused
def swiglu_backward_torch(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dgate, dup)`` of ``h = silu(gate) * up`` in PyTorch (fp32 inside), ``silu`` recomputed."""
    g = gate.float()
    s = torch.sigmoid(g)
    dhf = dh.float()
    dgate = (dhf * up.float() * s * (1.0 + g * (1.0 - s))).to(gate.dtype)
    dup = (dhf * (g * s)).to(up.dtype)
    return dgate, dup


# --------------------------------------------------------------------------- Triton



@jit
def _swiglu_fwd_kernel(G, U, H, n, BLOCK: tl.constexpr):
    """``h = silu(g) * u``, rounded as PyTorch does (``silu(g)`` to the input dtype, then the product)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(G.dtype.element_ty).to(tl.float32)
    tl.store(H + offs, (silu * u).to(H.dtype.element_ty), mask=mask)


@jit
def _swiglu_bwd_kernel(DH, G, U, DG, DU, n, BLOCK: tl.constexpr):
    """``dg = dh * u * s * (1 + g * (1 - s))``, ``du = dh * silu(g)``, with ``s = sigmoid(g)`` recomputed."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DG + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dh * g * s).to(DU.dtype.element_ty), mask=mask)


class SwiGLUTritonFunction(torch.autograd.Function):
    """The Triton kernels behind the same math as :class:`SwiGLUFunction`."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up, h = launch_forward(_swiglu_fwd_kernel, "swiglu", gate, up)
        ctx.save_for_backward(gate, up)
        return h

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        return swiglu_backward_triton(dh, gate, up)


def swiglu_backward_triton(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dgate, dup)`` with the Triton backward kernel (inputs made contiguous if they are not)."""
    return launch_backward(_swiglu_bwd_kernel, dh, gate, up)


def audit_launches() -> list[AuditLaunch]:
    """Forward and backward in bf16, fp16 and fp32 (the launch does not depend on the shape)."""
    return glu_audit_launches("swiglu", _swiglu_fwd_kernel, _swiglu_bwd_kernel)


# --------------------------------------------------------------------------- dispatch


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for tensors of the same shape ``[..., intermediate]``."""
    return _IMPLEMENTATIONS[select_backend("swiglu", gate.device)](gate, up)


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The SwiGLU backward alone (for fused Functions that recompute it): ``(dgate, dup)``, dispatched."""
    return _BACKWARDS[select_backend("swiglu", gate.device)](dh, gate, up)


_IMPLEMENTATIONS = {"torch": SwiGLUFunction.apply, "triton": SwiGLUTritonFunction.apply}
_BACKWARDS = {"torch": swiglu_backward_torch, "triton": swiglu_backward_triton}
