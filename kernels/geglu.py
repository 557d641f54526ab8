"""GeGLU activation ``gelu_tanh(gate) * up`` whose backward recomputes the activation (Gemma's MLP).

Forward, with the tanh approximation of GELU (``F.gelu(x, approximate="tanh")``, transformers'
``gelu_pytorch_tanh``)::

    h = gelu(g) * u,   gelu(g) = 0.5 * g * (1 + t),   t = tanh(k * (g + 0.044715 * g**3)),   k = sqrt(2 / pi)

Rounding as PyTorch does it: ``gelu(g)`` is rounded to the input dtype, then multiplied by ``u``.

Backward (fp32 inside, ``t`` recomputed from ``g``)::

    gelu'(g) = 0.5 * (1 + t) + 0.5 * g * (1 - t**2) * k * (1 + 3 * 0.044715 * g**2)
    du = dh * gelu(g)
    dg = dh * u * gelu'(g)

Saved for backward: ``g`` and ``u`` only (plain autograd also keeps ``gelu(g)``, one more
``[tokens, intermediate]`` tensor per layer).

Triton kernels: elementwise over the flattened tensors, fp32 inside, ``tanh`` from ``exp``
(:func:`_tanh`, stable for any ``|x|``). Forward reads ``g``, ``u`` and writes ``h`` (3 accesses per
element); backward reads ``dh``, ``g``, ``u`` and writes ``dg``, ``du`` (5 accesses).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine_kernels._glu_launch import BLOCK, launch_backward, launch_forward  # noqa: F401 (BLOCK: tests size inputs by it)
from engine_kernels._glu_launch import audit_launches as glu_audit_launches
from engine_kernels._triton import AuditLaunch, jit, tanh, tl
from engine_kernels.cpu_fusion import cpu_fused
from engine_kernels.dispatch import select_backend

#: ``sqrt(2 / pi)`` and the cubic coefficient of the tanh approximation.
GELU_K = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch GeGLU as transformers' Gemma MLP computes it (``gelu_pytorch_tanh(gate) * up``)."""
    return F.gelu(gate, approximate="tanh") * up


class GeGLUFunction(torch.autograd.Function):
    """Autograd Function for ``gelu_tanh(gate) * up``; see the module docstring."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _geglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        return geglu_backward_torch(dh, gate, up)


@cpu_fused
def _geglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` (one fused loop on CPU, :mod:`engine_kernels.cpu_fusion`)."""
    return F.gelu(gate, approximate="tanh") * up


@cpu_fused
def geglu_backward_torch(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dgate, dup)`` of ``h = gelu_tanh(gate) * up`` in PyTorch (fp32 inside), the activation recomputed."""
    g = gate.float()
    t = torch.tanh(GELU_K * (g + GELU_C * g * g * g))
    dhf = dh.float()
    dgelu = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * (GELU_K * (1.0 + 3.0 * GELU_C * g * g))
    dgate = (dhf * up.float() * dgelu).to(gate.dtype)
    dup = (dhf * (0.5 * g * (1.0 + t))).to(up.dtype)
    return dgate, dup


# --------------------------------------------------------------------------- Triton



@jit
def _gelu_tanh_parts(g):
    """``(0.5 * g, 1 + t)`` with ``t = tanh(k * (g + c * g**3))``: ``gelu(g)`` is their product."""
    t = tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
    return 0.5 * g, 1.0 + t


@jit
def _geglu_fwd_kernel(G, U, H, n, BLOCK: tl.constexpr):
    """``h = gelu_tanh(g) * u``, rounded as PyTorch does (``gelu(g)`` to the input dtype, then the product)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    half_g, one_plus_t = _gelu_tanh_parts(g)
    gelu = (half_g * one_plus_t).to(G.dtype.element_ty).to(tl.float32)
    tl.store(H + offs, (gelu * u).to(H.dtype.element_ty), mask=mask)


@jit
def _geglu_bwd_kernel(DH, G, U, DG, DU, n, BLOCK: tl.constexpr):
    """``dg = dh * u * gelu'(g)``, ``du = dh * gelu(g)``, with ``t`` recomputed (fp32)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    half_g, one_plus_t = _gelu_tanh_parts(g)
    t = one_plus_t - 1.0
    dgelu = 0.5 * one_plus_t + half_g * (1.0 - t * t) * (0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g))
    tl.store(DG + offs, (dh * u * dgelu).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dh * half_g * one_plus_t).to(DU.dtype.element_ty), mask=mask)


class GeGLUTritonFunction(torch.autograd.Function):
    """The Triton kernels behind the same math as :class:`GeGLUFunction`."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up, h = launch_forward(_geglu_fwd_kernel, "geglu", gate, up)
        ctx.save_for_backward(gate, up)
        return h

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        return geglu_backward_triton(dh, gate, up)


def geglu_backward_triton(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dgate, dup)`` with the Triton backward kernel (``gate``/``up`` made contiguous if they are not)."""
    return launch_backward(_geglu_bwd_kernel, dh, gate, up)


def audit_launches() -> list[AuditLaunch]:
    """Forward and backward in bf16, fp16 and fp32 (the launch does not depend on the shape)."""
    return glu_audit_launches("geglu", _geglu_fwd_kernel, _geglu_bwd_kernel)


# --------------------------------------------------------------------------- dispatch


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` for tensors of the same shape ``[..., intermediate]``."""
    return _IMPLEMENTATIONS[select_backend("geglu", gate.device)](gate, up)


def geglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The GeGLU backward alone (for fused Functions that recompute it): ``(dgate, dup)``, dispatched."""
    return _BACKWARDS[select_backend("geglu", gate.device)](dh, gate, up)


_IMPLEMENTATIONS = {"torch": GeGLUFunction.apply, "triton": GeGLUTritonFunction.apply}
_BACKWARDS = {"torch": geglu_backward_torch, "triton": geglu_backward_triton}
