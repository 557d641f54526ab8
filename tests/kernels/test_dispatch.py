"""Backend dispatch (ENGINE_KERNELS) and the comparison helper itself.

Tolerances and helpers: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import pytest
import torch

from kernels import dispatch
from kernels.attention import attention
from kernels.cross_entropy import (
    fused_linear_cross_entropy,
)
from kernels.dispatch import describe_backends, select_backend
from kernels.errors import ConfigurationError, EngineError
from kernels.lora_linear import lora_linear
from kernels.rms_norm import rms_norm
from kernels.rope import rope, rope_cos_sin
from kernels.swiglu import swiglu
from tests.kernels.op_testing import assert_close, inv_freq

# --------------------------------------------------------------------------- dispatch


def test_dispatch_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.requested_backend() == "auto"
    backends = describe_backends()
    assert set(backends) == set(dispatch.OPS)
    assert set(backends.values()) == {"torch"}
    # No op has a Triton kernel yet: even a CUDA device gets PyTorch under auto.
    assert dispatch.TRITON_OPS == frozenset()
    assert describe_backends("cuda") == {op: "torch" for op in dispatch.OPS}


@pytest.mark.parametrize("value", ["torch", "TORCH", " torch ", "auto", "Auto", ""])
def test_dispatch_valid_values(monkeypatch, value):
    monkeypatch.setenv(dispatch.ENV_VAR, value)
    for op in dispatch.OPS:
        assert select_backend(op, "cpu") == "torch"
        assert select_backend(op, torch.device("cpu")) == "torch"


def test_dispatch_triton_without_kernels_raises(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    for op in dispatch.OPS:
        with pytest.raises(ConfigurationError, match="triton"):
            select_backend(op, "cpu")
        with pytest.raises(ConfigurationError):
            select_backend(op, "cuda")
    with pytest.raises(ConfigurationError):
        describe_backends()


def test_dispatch_triton_makes_every_op_raise(monkeypatch):
    """The ops consult the dispatcher: forcing a missing backend fails loudly instead of silently falling back."""
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    x = torch.randn(2, 8)
    cos, sin = rope_cos_sin(torch.arange(3)[None], inv_freq(8), 1.0, torch.float32)
    calls = [
        lambda: rms_norm(x, torch.ones(8)),
        lambda: rope(torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8), cos, sin),
        lambda: swiglu(x, x),
        lambda: lora_linear(x, torch.randn(5, 8)),
        lambda: attention(torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8), scale=0.3),
        lambda: fused_linear_cross_entropy(x, torch.randn(11, 8), torch.tensor([1, 2])),
    ]
    for call in calls:
        with pytest.raises(ConfigurationError):
            call()
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    for call in calls:
        call()


@pytest.mark.parametrize("value", ["cuda", "tritonn", "pytorch", "1"])
def test_dispatch_invalid_value_raises(monkeypatch, value):
    monkeypatch.setenv(dispatch.ENV_VAR, value)
    with pytest.raises(ConfigurationError, match=dispatch.ENV_VAR) as info:
        select_backend("rms_norm", "cpu")
    assert isinstance(info.value, ValueError) and isinstance(info.value, EngineError)
    with pytest.raises(ConfigurationError):
        rms_norm(torch.randn(2, 8), torch.ones(8))


def test_dispatch_unknown_op_raises(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    with pytest.raises(ConfigurationError, match="unknown op"):
        select_backend("layer_norm", "cpu")


def test_dispatch_with_a_triton_kernel(monkeypatch):
    """Selection logic once an op has a Triton kernel (simulated): auto picks it on CUDA only."""
    monkeypatch.setattr(dispatch, "TRITON_OPS", frozenset({"rms_norm"}))
    monkeypatch.setattr(dispatch, "_triton_available", lambda: True)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert select_backend("rms_norm", "cuda") == "triton"
    assert select_backend("rms_norm", torch.device("cuda", 0)) == "triton"
    assert select_backend("rms_norm", "cpu") == "torch"
    assert select_backend("swiglu", "cuda") == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert select_backend("rms_norm", "cpu") == "triton"
    with pytest.raises(ConfigurationError):
        select_backend("swiglu", "cuda")
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert select_backend("rms_norm", "cuda") == "torch"
    # triton not installed: auto falls back, forced triton raises.
    monkeypatch.setattr(dispatch, "_triton_available", lambda: False)
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert select_backend("rms_norm", "cuda") == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(ConfigurationError):
        select_backend("rms_norm", "cuda")


def test_assert_close_reports_location():
    expected = torch.zeros(3, 4)
    actual = expected.clone()
    actual[2, 1] = 0.5
    with pytest.raises(AssertionError, match=r"1/12 elements.*max abs err 5\.000e-01.*index \(2, 1\)"):
        assert_close(actual, expected, torch.float32, "probe")
    nan = expected.clone()
    nan[0, 3] = float("nan")
    with pytest.raises(AssertionError, match=r"index \(0, 3\)"):
        assert_close(nan, expected, torch.float32, "probe")
    assert_close(expected + 5e-6, expected, torch.float32, "within")


