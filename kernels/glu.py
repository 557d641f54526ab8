"""The gated-linear-unit activations of the MLPs, by name: the one place that maps a name to its ops.

A GLU MLP computes ``down(act(gate(x)) * up(x))``. The activation is named as in the model configs:

* ``"silu"``: SwiGLU, ``silu(gate) * up`` (Llama, Mistral, Qwen, Phi-3): :mod:`engine_kernels.swiglu`;
* ``"gelu_tanh"``: GeGLU, ``gelu_tanh(gate) * up`` (Gemma 1/2/3, transformers' ``gelu_pytorch_tanh``):
  :mod:`engine_kernels.geglu`.

Each name maps to the dispatched forward ``(gate, up) -> h``, the dispatched backward
``(dh, gate, up) -> (dgate, dup)`` (for fused Functions that recompute ``h``) and the plain PyTorch
reference (the oracle of the tests). Any other name is an error that lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from engine_kernels.errors import ConfigurationError
from engine_kernels.geglu import geglu, geglu_backward, geglu_reference
from engine_kernels.swiglu import swiglu, swiglu_backward, swiglu_reference


class GLUOps(NamedTuple):
    """The ops of one GLU activation."""

    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


#: Activation name -> its ops. The default of every MLP function is ``"silu"``.
GLU_ACTIVATIONS: dict[str, GLUOps] = {
    "silu": GLUOps(swiglu, swiglu_backward, swiglu_reference),
    "gelu_tanh": GLUOps(geglu, geglu_backward, geglu_reference),
}


def glu_ops(activation: str) -> GLUOps:
    """The :class:`GLUOps` of ``activation``.

    Raises:
        ConfigurationError: ``activation`` is not one of :data:`GLU_ACTIVATIONS`.
    """
    ops = GLU_ACTIVATIONS.get(activation) if isinstance(activation, str) else None
    if ops is None:
        raise ConfigurationError(
            f"unknown GLU activation {activation!r}; use one of {', '.join(map(repr, GLU_ACTIVATIONS))} "
            "(\"silu\": SwiGLU, Llama-style; \"gelu_tanh\": GeGLU, Gemma-style)"
        )
    return ops


def glu_activation(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The dispatched ``(gate, up) -> act(gate) * up`` of ``name``, e.g. for ``down(glu(gate(x), up(x)))``."""
    return glu_ops(name).forward


def glu(activation: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``act(gate) * up`` for the named activation (dispatched, differentiable)."""
    return glu_ops(activation).forward(gate, up)


def glu_backward(
    activation: str, dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dgate, dup)`` of ``act(gate) * up`` for the named activation, the activation recomputed (dispatched)."""
    return glu_ops(activation).backward(dh, gate, up)


def glu_reference(activation: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The plain PyTorch reference of the named activation (autograd does the backward)."""
    return glu_ops(activation).reference(gate, up)
