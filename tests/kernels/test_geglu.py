"""GeGLU: forward and gradients against the reference (transformers' ``gelu_pytorch_tanh(gate) * up``);
only gate and up are saved for backward; the GLU activation names of :mod:`engine_kernels.glu`.

Tolerances and helpers: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import pytest
import torch

from engine_kernels.glu import glu_activation
from engine_kernels.dispatch import record_backends
from engine_kernels.errors import ConfigurationError
from engine_kernels.geglu import GeGLUFunction, geglu, geglu_backward, geglu_reference
from engine_kernels.glu import GLU_ACTIVATIONS, glu, glu_backward, glu_ops, glu_reference
from engine_kernels.swiglu import swiglu, swiglu_reference
from tests.kernels.op_testing import DTYPES, assert_close, grads, leaf, record_saved

SHAPES = [(1, 80), (3, 576), (127, 1000), (2, 3, 56)]


def _gate(shape, seed=6):
    """Wide-range gate values with the tanh saturated on both sides, zero and a tiny negative value."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 4.0
    g.view(-1)[:4] = torch.tensor([-60.0, 60.0, 0.0, -1e-3])[: g.numel()]
    return g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_geglu_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(7)
    g0, u0, dh = _gate(shape), torch.randn(shape, generator=gen), torch.randn(shape, generator=gen).to(dtype)
    g, u = leaf(g0.to(dtype)), leaf(u0.to(dtype))
    gr, ur = leaf(g0.to(dtype)), leaf(u0.to(dtype))
    with record_backends() as used:
        h = geglu(g, u)
    hr = geglu_reference(gr, ur)
    assert used == {"geglu": {"torch"}}
    assert h.grad_fn._forward_cls is GeGLUFunction
    assert_close(h, hr, dtype, "geglu.h")
    got, want = grads(h, [g, u], dh), grads(hr, [gr, ur], dh)
    assert_close(got[0], want[0], dtype, "geglu.dgate")
    assert_close(got[1], want[1], dtype, "geglu.dup")
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()


def test_geglu_forward_rounds_as_pytorch_does():
    """bf16: ``gelu(g)`` rounded to bf16, then the product: bit-identical to the reference."""
    g, u = _gate((5, 64)).bfloat16(), torch.randn(5, 64).bfloat16()
    assert torch.equal(geglu(g, u), geglu_reference(g, u))


def test_geglu_is_transformers_gelu_pytorch_tanh():
    """The activation is exactly the one Gemma's config names (``hidden_activation="gelu_pytorch_tanh"``)."""
    from transformers.activations import ACT2FN

    g, u = _gate((4, 40)), torch.randn(4, 40)
    torch.testing.assert_close(geglu(g, u), ACT2FN["gelu_pytorch_tanh"](g) * u, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_backward_alone(dtype):
    """The dispatched backward (used by the fused MLP) equals autograd of the reference."""
    gen = torch.Generator().manual_seed(8)
    g0, u0, dh = _gate((9, 48)), torch.randn(9, 48, generator=gen), torch.randn(9, 48, generator=gen).to(dtype)
    gr, ur = leaf(g0.to(dtype)), leaf(u0.to(dtype))
    dg, du = geglu_backward(dh, gr.detach(), ur.detach())
    want = grads(geglu_reference(gr, ur), [gr, ur], dh)
    assert dg.dtype == du.dtype == dtype
    assert_close(dg, want[0], dtype, "geglu.dgate")
    assert_close(du, want[1], dtype, "geglu.dup")


@pytest.mark.parametrize("requires", [(True, False), (False, True)], ids=["gate_only", "up_only"])
def test_geglu_one_input_requires_grad(requires):
    gen = torch.Generator().manual_seed(9)
    g0, u0, dh = torch.randn(3, 80, generator=gen), torch.randn(3, 80, generator=gen), torch.randn(3, 80, generator=gen)
    g, u = leaf(g0, requires[0]), leaf(u0, requires[1])
    gr, ur = leaf(g0, requires[0]), leaf(u0, requires[1])
    target, ref_target = (g, gr) if requires[0] else (u, ur)
    (got,), (want,) = grads(geglu(g, u), [target], dh), grads(geglu_reference(gr, ur), [ref_target], dh)
    assert_close(got, want, torch.float32, "geglu.grad")


def test_geglu_saves_only_two_tensors():
    gate, up = leaf(torch.randn(3, 80)), leaf(torch.randn(3, 80))
    with record_saved() as saved:
        out = geglu(gate, up)
    assert len(saved) == 2, f"GeGLUFunction saved {len(saved)} tensors: {saved}"
    assert {t.data_ptr() for t in out.grad_fn.saved_tensors} == {gate.data_ptr(), up.data_ptr()}


# --------------------------------------------------------------------------- activation names (engine_kernels.glu)


def test_glu_names_map_to_the_matching_ops():
    assert set(GLU_ACTIVATIONS) == {"silu", "gelu_tanh"}
    assert glu_activation("silu") is swiglu and glu_activation("gelu_tanh") is geglu
    assert glu_ops("silu").reference is swiglu_reference and glu_ops("gelu_tanh").reference is geglu_reference
    gen = torch.Generator().manual_seed(10)
    g, u, dh = (torch.randn(4, 24, generator=gen) for _ in range(3))
    for name in GLU_ACTIVATIONS:
        gl, ul = leaf(g), leaf(u)
        h = glu(name, gl, ul)
        assert_close(h, glu_reference(name, g, u), torch.float32, f"{name}.h")
        want = grads(h, [gl, ul], dh)
        got = glu_backward(name, dh, g, u)
        assert_close(got[0], want[0], torch.float32, f"{name}.dgate")
        assert_close(got[1], want[1], torch.float32, f"{name}.dup")
    assert not torch.allclose(glu("silu", g, u), glu("gelu_tanh", g, u))


@pytest.mark.parametrize("bad", ["gelu", "swiglu", "GELU_TANH", None, 3])
def test_unknown_glu_activation_names_the_valid_ones(bad):
    for call in (lambda: glu_activation(bad), lambda: glu(bad, torch.ones(2), torch.ones(2)),
                 lambda: glu_backward(bad, torch.ones(2), torch.ones(2), torch.ones(2))):
        with pytest.raises(ConfigurationError, match="'silu', 'gelu_tanh'"):
            call()
