"""GeGLU's Triton kernels (CPU: Triton's interpreter) against the PyTorch path and the reference.

Tolerances and helpers: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import pytest
import torch

from engine_kernels.dispatch import record_backends
from engine_kernels.geglu import BLOCK, GeGLUTritonFunction, geglu, geglu_backward, geglu_reference
from tests.kernels.op_testing import DTYPES_WITH_FP16, assert_close, grads, leaf

SHAPES = [(1, 80), (3, 576), (2, 3, 56), (1, BLOCK + 1)]


def _gate(shape, seed=6):
    """Wide-range gate values with the tanh saturated on both sides, zero and a tiny negative value."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 4.0
    g.view(-1)[:4] = torch.tensor([-60.0, 60.0, 0.0, -1e-3])[: g.numel()]
    return g


@pytest.mark.parametrize("dtype", DTYPES_WITH_FP16)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_geglu_matches_torch_path_and_reference(triton_backend, shape, dtype, monkeypatch):
    device = triton_backend
    gen = torch.Generator().manual_seed(7)
    g0, u0, dh = _gate(shape), torch.randn(shape, generator=gen), torch.randn(shape, generator=gen).to(device, dtype)
    g, u = leaf(g0.to(device, dtype)), leaf(u0.to(device, dtype))
    gr, ur = leaf(g0.to(device, dtype)), leaf(u0.to(device, dtype))
    with record_backends() as used:
        h = geglu(g, u)
    assert used == {"geglu": {"triton"}}
    assert h.grad_fn._forward_cls is GeGLUTritonFunction and h.dtype == dtype
    got = grads(h, [g, u], dh)
    hr = geglu_reference(gr, ur)
    assert_close(h, hr, dtype, "geglu.h")
    want = grads(hr, [gr, ur], dh)
    assert_close(got[0], want[0], dtype, "geglu.dgate")
    assert_close(got[1], want[1], dtype, "geglu.dup")
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    monkeypatch.setenv("ENGINE_KERNELS", "torch")  # the PyTorch path, fp32 inside like the kernels
    torch_path = geglu_backward(dh, gr.detach(), ur.detach())
    assert_close(got[0], torch_path[0], dtype, "geglu.dgate_vs_torch_path")
    assert_close(got[1], torch_path[1], dtype, "geglu.dup_vs_torch_path")


def test_triton_geglu_backward_alone_and_strided_inputs(triton_backend):
    """The dispatched backward the fused MLP calls; gate and up as halves of one fused projection output."""
    device = triton_backend
    fused = leaf(torch.randn(9, 2 * 56, device=device) * 3.0)
    fused_ref = leaf(fused.detach().clone())
    out = geglu(fused[:, :56], fused[:, 56:])
    ref = geglu_reference(fused_ref[:, :56], fused_ref[:, 56:])
    assert_close(out, ref, torch.float32, "geglu.h")
    dh = torch.randn_like(out)
    want = grads(ref, [fused_ref], dh)[0]
    assert_close(grads(out, [fused], dh)[0], want, torch.float32, "geglu.dfused")
    dg, du = geglu_backward(dh, fused.detach()[:, :56], fused.detach()[:, 56:])
    assert_close(torch.cat([dg, du], 1), want, torch.float32, "geglu.backward_alone")


def test_triton_geglu_shape_mismatch_is_an_error(triton_backend):
    with pytest.raises(ValueError, match="one shape and dtype"):
        geglu(torch.randn(3, 8, device=triton_backend), torch.randn(3, 9, device=triton_backend))


@pytest.mark.parametrize("tile_rows", [None, 8], ids=["untiled", "tiled"])
def test_triton_geglu_inside_the_fused_mlp(triton_backend, tile_rows):
    """``activation="gelu_tanh"``: the fused (and tiled) LoRA MLP runs the GeGLU kernels, forward and backward."""
    import dataclasses

    from engine_kernels.lora_fused import reference_mlp
    from engine_kernels.tiled_mlp import tiled_lora_mlp
    from tests.kernels.op_testing import lora_projection

    device, d, inter = triton_backend, 40, 56
    projs = [lora_projection(o, i, "dense", torch.float32, 30 + k) for k, (o, i) in enumerate(((inter, d), (inter, d), (d, inter)))]
    projs = [dataclasses.replace(p, weight=p.weight.to(device), lora_a=leaf(p.lora_a.to(device)),
                                 lora_b=leaf(p.lora_b.to(device))) for p in projs]
    twins = [dataclasses.replace(p, lora_a=leaf(p.lora_a), lora_b=leaf(p.lora_b)) for p in projs]
    x0 = torch.randn(19, d, generator=torch.Generator().manual_seed(8)).to(device)
    x, xr = leaf(x0), leaf(x0)
    with record_backends() as used:
        y = tiled_lora_mlp(x, *projs, tile_rows=tile_rows or 1024, activation="gelu_tanh")
        dy = torch.randn_like(y)
        got = grads(y, [x] + [t for p in projs for t in (p.lora_a, p.lora_b)], dy)
    assert used["geglu"] == {"triton"} and "swiglu" not in used
    yr = reference_mlp(xr, *twins, activation="gelu_tanh")
    want = grads(yr, [xr] + [t for p in twins for t in (p.lora_a, p.lora_b)], dy)
    assert_close(y, yr, torch.float32, "mlp.y", reduction=True)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, torch.float32, f"mlp.grad{i}", reduction=True)
