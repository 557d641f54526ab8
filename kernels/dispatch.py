"""The one place that decides which implementation of a compute op runs.

Every op in :mod:`kernels` has a PyTorch implementation (what CPUs run, and the
reference the Triton kernels are tested against). Ops that also have a Triton
implementation list it in ``TRITON_OPS``. The choice is made from one
documented switch, the ``ENGINE_KERNELS`` environment variable:

* unset or ``auto``: Triton on CUDA tensors when the op has a Triton kernel and
  triton is importable, PyTorch otherwise;
* ``torch``: always the PyTorch implementation;
* ``triton``: always Triton (on CPU this needs ``TRITON_INTERPRET=1`` set before
  triton is first imported).

Both paths compute the same math; which one ran can be asked with
:func:`describe_backends`.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from kernels.errors import ConfigurationError

ENV_VAR = "ENGINE_KERNELS"
CHOICES = ("auto", "torch", "triton")

#: Ops with a Triton implementation. Filled in as kernels land (see docs/kernels.md).
TRITON_OPS: frozenset[str] = frozenset()

#: Every op behind this dispatch point.
OPS = ("rms_norm", "rope", "swiglu", "lora_linear", "nf4_dequantize", "attention", "cross_entropy", "token_log_probs")


def requested_backend() -> str:
    """The backend asked for through ``ENGINE_KERNELS`` (``auto`` when unset)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ConfigurationError(
            f"{ENV_VAR}={value!r} is not a valid kernel backend; use one of {', '.join(CHOICES)} "
            f"or leave it unset for automatic selection."
        )
    return value


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def select_backend(op: str, device: torch.device | str) -> str:
    """Return ``"torch"`` or ``"triton"`` for ``op`` running on ``device``.

    Raises:
        ConfigurationError: if Triton is forced but the op has no Triton kernel
            or triton is not installed.
    """
    if op not in OPS:
        raise ConfigurationError(f"unknown op {op!r}; known ops: {', '.join(OPS)}")
    requested = requested_backend()
    if requested == "torch":
        return "torch"
    has_kernel = op in TRITON_OPS and _triton_available()
    if requested == "triton":
        if not has_kernel:
            raise ConfigurationError(
                f"{ENV_VAR}=triton was set but op {op!r} has no Triton kernel "
                f"(or triton is not installed); unset {ENV_VAR} or set it to 'torch'."
            )
        return "triton"
    return "triton" if has_kernel and torch.device(device).type == "cuda" else "torch"


def describe_backends(device: torch.device | str = "cpu") -> dict[str, str]:
    """Which implementation each op uses on ``device`` under the current setting."""
    return {op: select_backend(op, device) for op in OPS}
