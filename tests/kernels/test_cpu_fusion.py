"""The compiled CPU elementwise ops (kernels/cpu_fusion.py): they run compiled, equal the eager ops, and a whole
model with them equals transformers + PEFT (fp32) and trains in bf16 like the eager one."""

from __future__ import annotations

import pytest
import torch

from engine_kernels import cpu_fusion
from engine_kernels.geglu import geglu
from engine_kernels.rms_norm import rms_norm
from engine_kernels.rope import rope
from engine_kernels.swiglu import swiglu
from engine_kernels.cross_entropy import _torch_rows, fused_linear_cross_entropy
from engine_kernels.errors import ConfigurationError
from engine_kernels.geglu import _geglu_forward, geglu_backward_torch
from engine_kernels.rms_norm import _rms_backward_dw, _rms_backward_dx, _rms_forward
from engine_kernels.rope import _rotate, _unrotate
from engine_kernels.swiglu import _swiglu_forward, swiglu_backward_torch
from tests.kernels.op_testing import assert_close, grads, leaf

FUSED = (_rms_forward, _rms_backward_dx, _rms_backward_dw, _swiglu_forward, swiglu_backward_torch, _rotate, _unrotate,
         _torch_rows, _geglu_forward, geglu_backward_torch)


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setenv(cpu_fusion.ENV_VAR, "1")
    monkeypatch.setenv(cpu_fusion.MIN_ENV_VAR, "0")  # the shapes below are small: compile them anyway
    for f in FUSED:
        f.broken = False
    yield
    assert not any(f.broken for f in FUSED), [f.__name__ for f in FUSED if f.broken]


def _ops(dtype):
    """Every op forward + backward at model-like shapes; returns outputs and input gradients."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x, w = leaf(r(37, 96)), leaf(r(96))
    y = rms_norm(x, w, 1e-5)
    x2, w2 = leaf(r(37, 96)), leaf(r(96, scale=0.3))
    y2 = rms_norm(x2, w2, 1e-6, offset=1.0)  # Gemma's rule
    gate, up = leaf(r(37, 160)), leaf(r(37, 160))
    h = swiglu(gate, up)
    h2 = geglu(gate, up)
    q, k = leaf(r(1, 37, 4, 16)), leaf(r(1, 37, 2, 16))
    ang = torch.arange(37)[:, None] * torch.linspace(0.01, 1.0, 8)[None]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None].to(dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None].to(dtype)
    qo, ko = rope(q, k, cos, sin)
    hid, head = leaf(r(37, 96)), r(301, 96, scale=0.1)
    labels = torch.randint(0, 301, (37,), generator=g)
    labels[::5] = -100
    loss = fused_linear_cross_entropy(hid, head, labels)
    outs = [y, y2, h, h2, qo, ko, loss]
    douts = [r(*o.shape) for o in outs[:-1]] + [torch.ones((), dtype=loss.dtype)]
    ins = [x, w, x2, w2, gate, up, q, k, hid]
    return outs, grads(outs, ins, douts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_ops_equal_the_eager_ops(dtype, compiled, monkeypatch):
    outs, gs = _ops(dtype)
    # Each function really ran compiled (a compiled object exists and did not fall back).
    assert all(f.compiled is not None for f in FUSED), [f.__name__ for f in FUSED if f.compiled is None]
    monkeypatch.setenv(cpu_fusion.ENV_VAR, "0")
    ref_outs, ref_gs = _ops(dtype)
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        assert_close(a, b, dtype, f"out{i}")
    for i, (a, b) in enumerate(zip(gs, ref_gs)):
        assert_close(a, b, dtype, f"grad{i}", reduction=True)
    if dtype == torch.float32:  # fused loops keep every cast: fp32 results agree to rounding
        for a, b in zip(outs, ref_outs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_rms_norm_keeps_the_bf16_rounding(compiled):
    """Hugging Face rounds the normalized row to bf16 before the weight multiply; the fused loop must too."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 576, generator=g).to(torch.bfloat16)
    w = (1 + torch.randn(576, generator=g) * 0.1).to(torch.bfloat16)
    with torch.no_grad():
        fused = rms_norm(x, w, 1e-5)
    from engine_kernels.rms_norm import rms_norm_reference

    torch.testing.assert_close(fused, rms_norm_reference(x, w, 1e-5), rtol=0, atol=0)


def test_fake_and_grad_inputs_take_the_eager_path(compiled):
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls = []
    fused = cpu_fusion.cpu_fused(lambda a: calls.append(1) or a * 2)
    with FakeTensorMode():
        out = fused(torch.ones(3))
    assert out.shape == (3,) and calls == [1]  # eager, not traced
    t = torch.ones(3, requires_grad=True)
    assert fused(t).requires_grad and fused.compiled is None


def test_bad_switch_value_is_refused(monkeypatch):

    monkeypatch.setenv(cpu_fusion.ENV_VAR, "maybe")
    with pytest.raises(ConfigurationError, match="ENGINE_CPU_COMPILE='maybe'"):
        cpu_fusion.cpu_compile_enabled()


def test_model_with_compiled_ops_matches_peft(hf_folders, compiled):
    """The whole LoRA model, compiled CPU ops on: loss and every gradient equal transformers + PEFT (fp32)."""
    from tests.test_parity import assert_close_rel, load_pair

    hf, ours = load_pair("llama", hf_folders["llama"], lora=True)
    ids = torch.randint(0, hf.config.vocab_size, (1, 29), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    out_hf, out_ours = hf(input_ids=ids, labels=labels), ours(input_ids=ids, labels=labels)
    assert_close_rel(out_ours.loss, out_hf.loss, what="loss")
    out_hf.loss.backward()
    out_ours.loss.backward()
    peft_params = dict(hf.named_parameters())
    from engine.peft import lora_modules

    for name, m in lora_modules(ours).items():
        for part in ("A", "B"):
            ref = peft_params[f"base_model.model.{name}.lora_{part}.default.weight"].grad
            assert_close_rel(getattr(m, f"lora_{part}").grad, ref, what=f"{name} lora_{part}")
    assert _rms_forward.compiled is not None and _swiglu_forward.compiled is not None


def test_small_calls_run_eagerly(compiled, monkeypatch):
    """Below ENGINE_CPU_COMPILE_MIN_ELEMENTS (default 65,536: a decode step's rows) the eager op runs."""
    monkeypatch.delenv(cpu_fusion.MIN_ENV_VAR)
    calls = []
    fused = cpu_fusion.cpu_fused(lambda a: calls.append(1) or a * 2)
    fused(torch.ones(32, 576))  # 18,432 elements: eager
    assert calls == [1] and fused.compiled is None
    fused(torch.ones(1024, 576))  # compiled: traced once (the lambda runs while tracing), then the compiled loop
    assert fused.compiled is not None
    monkeypatch.setenv(cpu_fusion.MIN_ENV_VAR, "lots")
    with pytest.raises(ConfigurationError, match="ENGINE_CPU_COMPILE_MIN_ELEMENTS='lots'"):
        fused(torch.ones(1024, 576))
