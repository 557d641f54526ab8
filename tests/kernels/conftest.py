"""Fixtures of the kernel tests.

Numerical tests of the PyTorch path run with ``ENGINE_KERNELS`` unset (automatic: PyTorch on CPU).
Tests of the Triton kernels take the ``triton_backend`` fixture: ``ENGINE_KERNELS=triton`` on the
device of :data:`DEVICE` (CUDA when there is one, else CPU under Triton's interpreter, which
``tests/conftest.py`` turns on before any kernel file is imported).
"""

import pytest
import torch

from engine_kernels import dispatch
from engine_kernels._triton import HAS_TRITON, interpreting

#: Where the Triton tests run: CUDA when available, else CPU tensors under the interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    """Every numerical test runs the PyTorch path, whatever the caller's environment says."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


@pytest.fixture()
def triton_backend(monkeypatch):
    """Force the Triton kernels (``ENGINE_KERNELS=triton``); yields the device to put tensors on."""
    if not HAS_TRITON:
        pytest.fail("triton is not installed: the Triton kernel tests need it (pip install triton)")
    assert DEVICE.type == "cuda" or interpreting(), "TRITON_INTERPRET=1 must be set before kernels are imported"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    yield DEVICE
