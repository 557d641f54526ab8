"""The one place that decides which implementation of a compute op runs.

Every op in :mod:`kernels` has a PyTorch implementation (what CPUs run, and the
reference the Triton kernels are tested against). Ops that also have a Triton
implementation are listed in ``TRITON_OPS``. The choice is made from one
documented switch, the ``ENGINE_KERNELS`` environment variable:

* unset or ``auto``: Triton on CUDA tensors for the ops in ``TRITON_OPS`` (when
  triton is installed), PyTorch otherwise;
* ``torch``: always the PyTorch implementation;
* ``triton``: Triton for every op that has a Triton kernel, on any device; on a
  machine without CUDA the kernels run under Triton's CPU interpreter
  (``TRITON_INTERPRET=1``, which :mod:`engine_kernels._triton` turns on when this is set
  before the kernels are imported). Ops without a Triton kernel run PyTorch.

Both paths compute the same math. :func:`describe_backends` says which one each op
would take; :func:`record_backends` records which one each op actually took.

Memory planning (:mod:`engine.memory`) runs the model on fake ``meta`` tensors. Inside
:func:`simulate_gpu`, ``meta`` tensors stand for tensors on a CUDA GPU: every decision here is
taken as on that GPU (Triton kernels, our flash attention), and the Triton launch wrappers
allocate their outputs but launch nothing (:func:`engine_kernels._triton.launchable`).
"""

from __future__ import annotations

import contextvars
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from engine_kernels._triton import HAS_TRITON, interpreting
from engine_kernels.errors import ConfigurationError

ENV_VAR = "ENGINE_KERNELS"
CHOICES = ("auto", "torch", "triton")

#: Ops with a Triton implementation (see docs/kernels.md).
TRITON_OPS: frozenset[str] = frozenset(
    {"rms_norm", "rope", "swiglu", "geglu", "cross_entropy", "nf4_dequantize", "attention", "grouped_mm"}
)

#: Every op behind this dispatch point.
OPS = (
    "rms_norm", "rope", "swiglu", "geglu", "lora_linear", "nf4_dequantize", "attention", "cross_entropy",
    "token_log_probs", "grouped_mm",
)

@dataclass(frozen=True)
class SimulatedGPU:
    """The GPU that ``meta`` tensors stand for inside :func:`simulate_gpu` (memory planning).

    Attributes:
        name: for reports (``"sm_90"``).
        capability: CUDA compute capability.
        multiprocessors: SM count (persistent kernels size their grids with it).
    """

    name: str = "sm_90"
    capability: tuple[int, int] = (9, 0)
    multiprocessors: int = 132


_SIMULATED: contextvars.ContextVar[SimulatedGPU | None] = contextvars.ContextVar("engine_simulated_gpu", default=None)


@contextmanager
def simulate_gpu(gpu: SimulatedGPU | None = None) -> Iterator[SimulatedGPU]:
    """Inside the block, ``meta`` tensors are treated as tensors on ``gpu`` (default: an sm_90 GPU)."""
    gpu = gpu or SimulatedGPU()
    token = _SIMULATED.set(gpu)
    try:
        yield gpu
    finally:
        _SIMULATED.reset(token)


def simulated_gpu(device: torch.device | str | None = None) -> SimulatedGPU | None:
    """The simulated GPU when ``device`` (default: any) is a ``meta`` device inside :func:`simulate_gpu`, else None."""
    gpu = _SIMULATED.get()
    if gpu is None or (device is not None and torch.device(device).type != "meta"):
        return None
    return gpu


def is_gpu(device: torch.device | str) -> bool:
    """True for CUDA devices, and for ``meta`` standing for a GPU inside :func:`simulate_gpu`."""
    device = torch.device(device)
    return device.type == "cuda" or simulated_gpu(device) is not None


# The recorder of the innermost active ``record_backends()`` block (None outside one).
_RECORDER: contextvars.ContextVar[dict[str, set[str]] | None] = contextvars.ContextVar("engine_kernel_recorder", default=None)


def requested_backend() -> str:
    """The backend asked for through ``ENGINE_KERNELS`` (``auto`` when unset)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ConfigurationError(
            f"{ENV_VAR}={value!r} is not a valid kernel backend; use one of {', '.join(CHOICES)} "
            f"or leave it unset for automatic selection."
        )
    return value


def select_backend(op: str, device: torch.device | str) -> str:
    """Return ``"torch"`` or ``"triton"`` for ``op`` running on ``device``.

    Raises:
        ConfigurationError: unknown op; or Triton forced while triton is not installed, or forced
            for CPU tensors without the interpreter.
    """
    if op not in OPS:
        raise ConfigurationError(f"unknown op {op!r}; known ops: {', '.join(OPS)}")
    backend = _choose(op, torch.device(device))
    recorder = _RECORDER.get()
    if recorder is not None:
        recorder.setdefault(op, set()).add(backend)
    return backend


def _choose(op: str, device: torch.device) -> str:
    requested = requested_backend()
    if requested == "torch" or op not in TRITON_OPS:
        return "torch"
    if simulated_gpu(device) is not None:  # planning: as on a GPU with triton installed
        return "triton"
    if requested == "triton":
        if not HAS_TRITON:
            raise ConfigurationError(
                f"{ENV_VAR}=triton was set but triton is not installed (it exists for Linux only); "
                f"pip install triton, or unset {ENV_VAR}."
            )
        if device.type != "cuda" and not interpreting():
            raise ConfigurationError(
                f"{ENV_VAR}=triton on {device.type} tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "(or set ENGINE_KERNELS=triton) before the engine is imported, or unset ENGINE_KERNELS."
            )
        return "triton"
    return "triton" if HAS_TRITON and device.type == "cuda" and not interpreting() else "torch"


#: Attention backends, in the order automatic selection prefers them on a CUDA GPU.
ATTENTION_BACKENDS = ("flash_attn", "xformers", "triton", "torch")


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


#: The first flash-attn release whose ``flash_attn_varlen_func`` takes ``softcap``.
FLASH_ATTN_SOFTCAP_VERSION = (2, 6)


def _flash_attn_has_softcap() -> bool:
    """Whether the installed flash-attn takes ``softcap`` (2.6 and later)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("flash_attn").split("+")[0].split(".")
        return tuple(int(p) for p in release[:2]) >= FLASH_ATTN_SOFTCAP_VERSION
    except (PackageNotFoundError, ValueError):
        return False


def _flash_attn_supported(device: torch.device, dtype: torch.dtype | None, softcap: bool = False) -> bool:
    """flash-attn 2 needs an Ampere or newer GPU and fp16/bf16 tensors (and 2.6+ for a softcap)."""
    if dtype not in (torch.float16, torch.bfloat16) or not _has_module("flash_attn"):
        return False
    if softcap and not _flash_attn_has_softcap():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def _attention_choice(device: torch.device, dtype: torch.dtype | None, softcap: bool = False) -> str:
    backend = _choose("attention", device)
    if simulated_gpu(device) is not None:
        # flash-attn and xformers save the same tensors as our kernel (q, k, v, O, LSE): plan with ours.
        return backend
    if requested_backend() == "auto" and device.type == "cuda":
        if _flash_attn_supported(device, dtype, softcap):
            return "flash_attn"
        if _has_module("xformers") and not softcap:  # xformers has no score soft-capping
            return "xformers"
    return backend


def attention_backend(device: torch.device | str, dtype: torch.dtype | None = None, softcap: bool = False) -> str:
    """The attention implementation for tensors on ``device``: one of :data:`ATTENTION_BACKENDS`.

    ``ENGINE_KERNELS=torch`` gives PyTorch (SDPA; with a softcap an explicit chunked computation) and
    ``=triton`` our Triton flash attention. Unset (automatic): on CUDA, the ``flash-attn`` package when
    installed and the GPU supports it (Ampere+, fp16/bf16; 2.6+ when ``softcap`` is set), else ``xformers``
    when installed (never with ``softcap``: it cannot soft-cap scores), else our Triton kernel; on CPU,
    PyTorch. Both packages are optional extras, never required.
    """
    backend = _attention_choice(torch.device(device), dtype, softcap)
    recorder = _RECORDER.get()
    if recorder is not None:
        recorder.setdefault("attention", set()).add(backend)
    return backend


@contextmanager
def record_backends() -> Iterator[dict[str, set[str]]]:
    """Record the backend every dispatched op takes inside the block: ``{op: {"torch" | "triton"}}``.

    Example::

        with record_backends() as used:
            model(**batch).loss.backward()
        print(used)   # {"rms_norm": {"triton"}, "rope": {"triton"}, ...}
    """
    used: dict[str, set[str]] = {}
    token = _RECORDER.set(used)
    try:
        yield used
    finally:
        _RECORDER.reset(token)


def describe_backends(device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict[str, str]:
    """Which implementation each op would use on ``device`` (activations of ``dtype``) under the current setting."""
    device = torch.device(device)
    backends = {op: _choose(op, device) for op in OPS}
    backends["attention"] = _attention_choice(device, dtype)
    return backends
