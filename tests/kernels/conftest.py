"""Fixtures of the kernel tests."""

import pytest

from kernels import dispatch


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    """Every numerical test runs the PyTorch path, whatever the caller's environment says."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
