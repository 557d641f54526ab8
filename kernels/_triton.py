"""What every Triton kernel file shares: the optional ``triton`` import, interpreter mode, audit launches.

``triton`` is a dependency on Linux only. Kernel files import ``triton``, ``tl`` and :func:`jit` from
here, so they import (and their PyTorch paths run) where triton is missing; the Triton path is then
simply unavailable (:data:`HAS_TRITON` is False and :mod:`engine_kernels.dispatch` never selects it).

Interpreter mode: Triton's interpreter (``TRITON_INTERPRET=1``) runs kernels on CPU tensors with
numpy. It must be on when the ``@jit`` decorators run, i.e. before any kernel file is imported.
Forcing ``ENGINE_KERNELS=triton`` on a machine without CUDA turns it on here, at that point, so
``ENGINE_KERNELS=triton python train.py`` runs the Triton kernels (slowly) on a CPU-only machine;
the test suite does the same from ``tests/conftest.py``.

Audit: each kernel file lists the launches it makes for representative model shapes as
:class:`AuditLaunch` records (``audit_launches()``), built from the same launch-configuration
helpers its wrappers use; ``python -m engine_kernels.audit`` compiles them for real GPU targets.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

INTERPRET_ENV = "TRITON_INTERPRET"


def _want_interpreter() -> bool:
    if os.environ.get("ENGINE_KERNELS", "").strip().lower() != "triton" or os.environ.get(INTERPRET_ENV):
        return False
    import torch

    return not torch.cuda.is_available()


if _want_interpreter():
    os.environ[INTERPRET_ENV] = "1"

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # macOS / Windows wheels of torch come without triton: PyTorch paths only
    triton = None
    tl = None
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get(INTERPRET_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def jit(fn: Callable | None = None, **kwargs):
    """``triton.jit`` when triton is installed; otherwise the plain function (never launched)."""
    if fn is None:
        return lambda f: jit(f, **kwargs)
    return triton.jit(fn, **kwargs) if HAS_TRITON else fn


@jit
def tanh(x):
    """``tanh`` from ``exp`` (libdevice's is not available under the interpreter), stable for any ``|x|``:
    ``(1 - e) / (1 + e)`` with ``e = exp(-2 |x|)`` in ``(0, 1]``, the sign restored afterwards."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


def launchable(*tensors) -> bool:
    """False when a tensor is a ``meta`` (shape-only) tensor: memory planning runs the launch wrappers,
    which allocate their outputs as usual, but no kernel is launched (see :func:`engine_kernels.dispatch.simulate_gpu`)."""
    return not any(t is not None and t.device.type == "meta" for t in tensors)


def multiprocessor_count(device) -> int:
    """SMs of a CUDA device (of the simulated GPU for ``meta`` tensors); 4 programs' worth elsewhere."""
    import torch

    from engine_kernels.dispatch import simulated_gpu

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    gpu = simulated_gpu(device)
    return gpu.multiprocessors if gpu is not None else 4


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= n`` (``n >= 1``)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dtype_signature(dtype) -> str:
    """Triton's pointer type string (``"*bf16"``) of a torch dtype."""
    import torch

    names = {
        torch.float32: "*fp32",
        torch.float16: "*fp16",
        torch.bfloat16: "*bf16",
        torch.uint8: "*u8",
        torch.int32: "*i32",
        torch.int64: "*i64",
    }
    return names[dtype]


@dataclass(frozen=True)
class AuditLaunch:
    """One compiled configuration of a kernel, as its launch wrapper would choose it.

    Attributes:
        op: the op it belongs to (``"rms_norm"``).
        kernel: the ``@jit`` function.
        signature: Triton type of every non-constexpr argument (``{"X": "*bf16", "n_cols": "i32"}``),
            in argument order; constexpr arguments are listed in ``constexprs``.
        constexprs: values of the constexpr arguments (block sizes, flags).
        num_warps: warps per program, as the wrapper launches it.
        shape: the model shape this launch stands for, for the report (``"hidden=4096 bf16"``).
        num_stages: software-pipelining stages (Triton's default 3 unless the wrapper sets one).
        options: other compile options the wrapper passes at launch (``{"enable_fp_fusion": False}``).
        divisible_by_16: integer arguments the wrapper passes only as multiples of 16 in this configuration;
            compiled with that divisibility, as Triton specialises such integers at a real launch.
    """

    op: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    shape: str
    num_stages: int = 3
    options: dict[str, Any] = field(default_factory=dict)
    divisible_by_16: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))
