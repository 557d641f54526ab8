"""Backend dispatch (ENGINE_KERNELS) and the comparison helper itself.

Tolerances and helpers: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import pytest
import torch

from engine_kernels import dispatch
from engine_kernels._triton import interpreting
from engine_kernels.dispatch import describe_backends, record_backends, select_backend
from engine_kernels.errors import ConfigurationError, EngineError
from engine_kernels.rms_norm import rms_norm
from engine_kernels.swiglu import swiglu
from tests.kernels.op_testing import assert_close

# --------------------------------------------------------------------------- dispatch


def test_dispatch_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.requested_backend() == "auto"
    backends = describe_backends()
    assert set(backends) == set(dispatch.OPS)
    assert set(backends.values()) == {"torch"}
    # On CUDA, auto picks the Triton kernels of the ops that have one.
    assert dispatch.TRITON_OPS == {"rms_norm", "rope", "swiglu", "geglu", "cross_entropy", "nf4_dequantize", "attention",
                                   "grouped_mm"}
    expected = {op: "triton" if op in dispatch.TRITON_OPS and not interpreting() else "torch" for op in dispatch.OPS}
    assert describe_backends("cuda") == expected


@pytest.mark.parametrize("value", ["torch", "TORCH", " torch ", "auto", "Auto", ""])
def test_dispatch_valid_values(monkeypatch, value):
    monkeypatch.setenv(dispatch.ENV_VAR, value)
    for op in dispatch.OPS:
        assert select_backend(op, "cpu") == "torch"
        assert select_backend(op, torch.device("cpu")) == "torch"


def test_dispatch_triton_forced(monkeypatch):
    """ENGINE_KERNELS=triton: the ops with a Triton kernel take it (here under the interpreter), others PyTorch."""
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert interpreting()  # tests/conftest.py turned the interpreter on (no CUDA here)
    backends = describe_backends("cpu")
    assert {op for op, b in backends.items() if b == "triton"} == dispatch.TRITON_OPS
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # compiled Triton cannot run on CPU tensors: a clear error
    with pytest.raises(ConfigurationError, match="TRITON_INTERPRET=1"):
        select_backend("rms_norm", "cpu")
    assert select_backend("token_log_probs", "cpu") == "torch"
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    with pytest.raises(ConfigurationError, match="not installed"):
        select_backend("rms_norm", "cuda")


def test_record_backends(monkeypatch):
    x = torch.randn(3, 8)
    with record_backends() as used:
        rms_norm(x, torch.ones(8))
        swiglu(x, x)
    assert used == {"rms_norm": {"torch"}, "swiglu": {"torch"}}
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with record_backends() as used:
        rms_norm(x, torch.ones(8))
        with record_backends() as inner:
            swiglu(x, x)
    assert used == {"rms_norm": {"triton"}} and inner == {"swiglu": {"triton"}}
    swiglu(x, x)  # outside any block: nothing recorded, no error
    assert used == {"rms_norm": {"triton"}}


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


def test_dispatch_auto_on_cuda(monkeypatch):
    """auto picks Triton on CUDA only, and only when triton is installed and not interpreting."""
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert select_backend("rms_norm", "cuda") == "triton"
    assert select_backend("rms_norm", torch.device("cuda", 0)) == "triton"
    assert select_backend("rms_norm", "cpu") == "torch"
    assert select_backend("lora_linear", "cuda") == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert select_backend("rms_norm", "cuda") == "torch"
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert select_backend("rms_norm", "cuda") == "torch"


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




def test_attention_backend_order(monkeypatch):
    """flash-attn (Ampere+, 16-bit) > xformers > our Triton kernel on CUDA; SDPA on CPU; ENGINE_KERNELS overrides."""
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    installed = {"flash_attn", "xformers"}
    monkeypatch.setattr(dispatch, "_has_module", lambda name: name in installed)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert dispatch.attention_backend("cuda", torch.bfloat16) == "flash_attn"
    assert dispatch.attention_backend("cuda", torch.float32) == "xformers"  # flash-attn needs fp16/bf16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert dispatch.attention_backend("cuda", torch.bfloat16) == "xformers"  # Turing: no flash-attn 2
    installed.discard("xformers")
    assert dispatch.attention_backend("cuda", torch.bfloat16) == "triton"
    assert dispatch.attention_backend("cpu", torch.bfloat16) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.attention_backend("cuda", torch.bfloat16) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    installed.add("flash_attn")
    assert dispatch.attention_backend("cuda", torch.bfloat16) == "triton"  # forcing Triton means our kernel
    with record_backends() as used:
        dispatch.attention_backend("cuda", torch.bfloat16)
    assert used == {"attention": {"triton"}}
    assert describe_backends("cuda", torch.bfloat16)["attention"] == "triton"


def test_attention_backend_with_softcap(monkeypatch):
    """A softcap (Gemma 2) never goes to xformers (it cannot cap scores), and to flash-attn only from 2.6."""
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_has_module", lambda name: name in {"flash_attn", "xformers"})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(dispatch, "_flash_attn_has_softcap", lambda: True)
    assert dispatch.attention_backend("cuda", torch.bfloat16, softcap=True) == "flash_attn"
    monkeypatch.setattr(dispatch, "_flash_attn_has_softcap", lambda: False)  # flash-attn < 2.6
    assert dispatch.attention_backend("cuda", torch.bfloat16, softcap=False) == "flash_attn"
    assert dispatch.attention_backend("cuda", torch.bfloat16, softcap=True) != "xformers"
    assert dispatch.attention_backend("cuda", torch.float32, softcap=True) != "xformers"
    assert dispatch.attention_backend("cpu", torch.bfloat16, softcap=True) == "torch"
