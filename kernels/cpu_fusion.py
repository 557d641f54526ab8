"""Elementwise math fused into single passes on CPU: ``torch.compile`` with Inductor's C++ backend.

The PyTorch implementations of RMSNorm, RoPE, SwiGLU and the cross-entropy rows run as chains of
separate ops (``x.float()``, ``pow``, ``mean``, ``rsqrt``, ``mul``, a cast back, ...), each reading and
writing a whole tensor. On a GPU the Triton kernels fuse them; on a CPU this module does, by compiling the
same Python functions with Inductor (one C++/OpenMP loop per function, vectorized). The math is the
reference's line for line; ``emulate_precision_casts`` keeps every explicit cast (e.g. the bf16 rounding
Hugging Face's RMSNorm does before the weight multiply), so results equal the eager ops' up to the order of
a row's sum.

* :func:`cpu_fused` wraps a function: real CPU tensors go through the compiled version, anything else (CUDA,
  fake tensors of the memory planner, ``meta``) through the eager one. ``dynamic=True``: packed rows change
  length every step, and one compiled kernel serves every length (a new dtype compiles once more).
* The switch is the ``ENGINE_CPU_COMPILE`` environment variable: ``1`` (default) compiles, ``0`` runs the
  eager ops.
* Small calls run eagerly: a compiled call costs a fixed ~0.1-0.2 ms (guards, cache lookup), more than the
  whole eager op on a decode step's ``[32, 1, 576]`` rows. Only calls whose largest tensor has at least
  ``ENGINE_CPU_COMPILE_MIN_ELEMENTS`` elements (default :data:`MIN_ELEMENTS`, 65,536) are compiled: training
  steps (hundreds of tokens x hidden) are, generation's one-token steps are not. The first call of each function compiles it (seconds; Inductor keeps the result in its on-disk
  cache for later processes).
* If compiling fails (most often: no C++ compiler on the machine), a warning says so and what to do, once per
  function, and the eager ops run from then on: the same math, unfused. Beyond :data:`RECOMPILE_LIMIT`
  variants of one function (dtypes, ranks, memory layouts), further variants run eagerly without a warning.
* The test suite turns compiling off (``tests/conftest.py``) except in the tests that check the compiled path
  against the eager one and a whole model against transformers (``tests/kernels/test_cpu_fusion.py``): every
  parametrized shape and dtype would otherwise compile anew.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch

from engine_kernels.errors import ConfigurationError

ENV_VAR = "ENGINE_CPU_COMPILE"
MIN_ENV_VAR = "ENGINE_CPU_COMPILE_MIN_ELEMENTS"
#: Calls whose largest tensor is smaller run eagerly (a compiled call's fixed cost exceeds the op's).
MIN_ELEMENTS = 65_536
#: Compiled variants kept per function (dtypes, ranks, layouts); calls beyond them run eagerly.
RECOMPILE_LIMIT = 16
_OPTIONS = {"emulate_precision_casts": True}


def cpu_compile_enabled() -> bool:
    """Whether ``ENGINE_CPU_COMPILE`` (default ``1``) asks for compiled CPU elementwise ops."""
    value = os.environ.get(ENV_VAR, "1").strip().lower() or "1"
    if value not in ("0", "1", "true", "false", "on", "off"):
        raise ConfigurationError(f"{ENV_VAR}={value!r}: use 1 (compile the CPU elementwise ops, default) or 0 (eager)")
    return value in ("1", "true", "on")


def min_compiled_elements() -> int:
    """``ENGINE_CPU_COMPILE_MIN_ELEMENTS`` (default :data:`MIN_ELEMENTS`): smaller calls run eagerly."""
    value = os.environ.get(MIN_ENV_VAR, "").strip()
    if not value:
        return MIN_ELEMENTS
    if not value.isdigit():
        raise ConfigurationError(f"{MIN_ENV_VAR}={value!r}: use a whole number of elements (0 compiles every call)")
    return int(value)


def _real_cpu_tensors(args) -> bool:
    """Real CPU tensors without grad, the largest with at least :func:`min_compiled_elements` elements."""
    from torch._subclasses.fake_tensor import FakeTensor

    largest = -1
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.device.type != "cpu" or isinstance(a, FakeTensor) or a.requires_grad and torch.is_grad_enabled():
                return False
            largest = max(largest, a.numel())
    return largest >= 0 and largest >= min_compiled_elements()


class _Fused:
    """A function and its compiled form; see :func:`cpu_fused`."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.compiled: Callable | None = None
        self.broken = False
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        if self.broken or not _real_cpu_tensors(args) or torch.compiler.is_compiling() or not cpu_compile_enabled():
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True, options=_OPTIONS)
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return self.compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: warn and run the same math eagerly
            if type(exc).__name__ == "FailOnRecompileLimitHit":
                return self.fn(*args)  # an unusual dtype/layout beyond the compiled variants: eager, this call only
            if not _is_compile_error(exc):
                raise
            self.broken = True
            warnings.warn(
                f"engine: compiling {self.fn.__qualname__} for the CPU failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); running it unfused (same results, slower). "
                f"Install a C++ compiler (g++/clang) for the fused CPU kernels, or set {ENV_VAR}=0 to skip compiling.",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.fn(*args)


def _is_compile_error(exc: Exception) -> bool:
    """Errors raised by Dynamo/Inductor while compiling (not errors of the math itself, e.g. a shape mismatch)."""
    module = type(exc).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "torch._export")) or isinstance(
        exc, (OSError, ImportError, NotImplementedError)
    )


def cpu_fused(fn: Callable) -> Callable:
    """Decorator: run ``fn`` compiled into fused CPU loops for real CPU tensors (see the module docstring).

    ``fn`` must be pure tensor math (no Python side effects, no ``.item()``); inputs that need a gradient while
    grad mode is on take the eager path, so wrap the math *inside* an autograd Function's forward/backward.
    """
    return _Fused(fn)
