"""The tiled LoRA GLU MLP (SwiGLU, GeGLU) (:mod:`engine_kernels.tiled_mlp`) against the untiled fused :func:`lora_mlp`.

Odd sizes: hidden 80, intermediate 136 (and 56), rank 4; 1, 7, 33 and 100 rows in tiles of 8 or 16, so most
runs end with a partial tile. Tolerances and helpers: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine_kernels.dispatch import record_backends
from engine_kernels.errors import ConfigurationError
from engine_kernels.lora_fused import DequantWorkspace, LoRAMLPFunction, Projection, dropout_masks, lora_mlp, reference_mlp
from engine_kernels.tiled_mlp import (
    DEFAULT_TILE_ROWS,
    TiledMLPFunction,
    default_tile_rows,
    tiled_lora_mlp,
)
from tests.kernels.op_testing import DTYPES, assert_close, grads, leaf, lora_projection, record_saved

D, INTER, R = 80, 136, 4
BASES = ["dense", "nf4"]
DROPOUTS = [pytest.param(0.0, id="p0"), pytest.param(0.3, id="p0.3")]
ROWS = [pytest.param(1, 8, id="n1_t8"), pytest.param(7, 8, id="n7_t8"), pytest.param(33, 8, id="n33_t8"),
        pytest.param(100, 16, id="n100_t16")]


def _mlp(base, dtype, p=0.0, inter=INTER, lora=(True, True, True), bias=False, seed=30):
    shapes = ((inter, D), (inter, D), (D, inter))
    return [lora_projection(o, i, base, dtype, seed + k, f, bias, p) for k, ((o, i), f) in enumerate(zip(shapes, lora))]


def _twin(p: Projection) -> Projection:
    """The same projection with fresh LoRA leaves (separate gradients for the second run)."""
    if not p.has_lora:
        return p
    return dataclasses.replace(p, lora_a=leaf(p.lora_a), lora_b=leaf(p.lora_b))


def _lora_tensors(projs):
    return [t for p in projs if p.has_lora for t in (p.lora_a, p.lora_b)]


def _compare(x0, projs, dtype, tile_rows, x_grad=True, training=True, workspace=None, activation="silu"):
    """Tiled and untiled runs with the same generator seed (same dropout masks); every output and gradient."""
    ref_projs = [_twin(p) for p in projs]
    x, xr = leaf(x0.to(dtype), x_grad), leaf(x0.to(dtype), x_grad)
    y = tiled_lora_mlp(x, *projs, workspace=workspace, training=training,
                       generator=torch.Generator().manual_seed(77), tile_rows=tile_rows, activation=activation)
    yr = lora_mlp(xr, *ref_projs, training=training, generator=torch.Generator().manual_seed(77),
                  activation=activation)
    assert y.dtype == dtype and y.shape == yr.shape
    assert_close(y, yr, dtype, "y", reduction=True)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    names = (["dx"] if x_grad else []) + [f"{n}.{t}" for p, n in zip(projs, ("gate", "up", "down"))
                                          if p.has_lora for t in ("dA", "dB")]
    got = grads(y, ([x] if x_grad else []) + _lora_tensors(projs), dy)
    want = grads(yr, ([xr] if x_grad else []) + _lora_tensors(ref_projs), dy)
    for name, g_, w_ in zip(names, got, want):
        assert_close(g_, w_, dtype, name, reduction=True)
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("p", DROPOUTS)
@pytest.mark.parametrize(("n", "tile_rows"), ROWS)
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "x_frozen"])
def test_tiled_equals_untiled(x_grad, n, tile_rows, p, base, dtype):
    projs = _mlp(base, dtype, p)
    x0 = torch.randn(n, D, generator=torch.Generator().manual_seed(4))
    y = _compare(x0, projs, dtype, tile_rows, x_grad)
    # At most one tile: the untiled Function itself; more: the tiled one.
    assert y.grad_fn._forward_cls is (TiledMLPFunction if n > tile_rows else LoRAMLPFunction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "tile_rows"), ROWS[1:3])
def test_tiled_geglu_equals_untiled_and_reference(n, tile_rows, dtype):
    """``activation="gelu_tanh"`` (Gemma) goes to every tile: tiled == untiled == the plain-autograd reference."""
    projs = _mlp("nf4", dtype, 0.3)
    x0 = torch.randn(n, D, generator=torch.Generator().manual_seed(4))
    with record_backends() as used:
        y = _compare(x0, projs, dtype, tile_rows, activation="gelu_tanh")
    assert used["geglu"] == {"torch"} and "swiglu" not in used
    assert y.grad_fn._forward_cls is (TiledMLPFunction if n > tile_rows else LoRAMLPFunction)
    xr = leaf(x0.to(dtype))
    ref_projs = [_twin(p) for p in projs]
    masks = dropout_masks(xr, projs, True, torch.Generator().manual_seed(77))
    yr = reference_mlp(xr, *ref_projs, masks, activation="gelu_tanh")
    assert_close(y, yr, dtype, "y_vs_reference", reduction=True)
    silu = tiled_lora_mlp(x0.to(dtype), *projs, training=True, generator=torch.Generator().manual_seed(77),
                          tile_rows=tile_rows)
    assert not torch.allclose(y.detach().float(), silu.float(), atol=1e-3)


def test_tiled_unknown_activation_is_an_error():
    with pytest.raises(ConfigurationError, match="'silu', 'gelu_tanh'"):
        tiled_lora_mlp(torch.randn(33, D), *_mlp("dense", torch.float32), tile_rows=8, activation="gelu")


@pytest.mark.parametrize("lora", [(False, False, True), (True, False, False), (False, False, False)],
                         ids=["down_only", "gate_only", "none"])
def test_partial_lora_bias_and_narrow_intermediate(lora):
    """LoRA on some projections only (or none: a frozen plain MLP, only dx), biases, intermediate 56."""
    projs = _mlp("nf4", torch.float32, 0.3, inter=56, lora=lora, bias=True)
    x0 = torch.randn(33, D, generator=torch.Generator().manual_seed(5))
    y = _compare(x0, projs, torch.float32, 8)
    assert y.grad_fn._forward_cls is TiledMLPFunction


def test_leading_dims_workspace_and_eval():
    """``[b, s, d]`` input (rows flattened across the batch), a dequantization workspace, and eval mode."""
    projs = _mlp("nf4", torch.float32, 0.3)
    x0 = torch.randn(3, 11, D, generator=torch.Generator().manual_seed(6))
    y = _compare(x0, projs, torch.float32, 8, workspace=DequantWorkspace())
    assert y.shape == (3, 11, D)
    assert torch.equal(y, tiled_lora_mlp(x0, *projs, training=True, generator=torch.Generator().manual_seed(77),
                                         tile_rows=8))  # the workspace changes nothing
    _compare(x0, projs, torch.float32, 8, training=False)  # no dropout


def test_dropout_masks_are_drawn_once_and_sliced():
    """Same generator state -> the very masks of :func:`dropout_masks` over all rows; and they are used."""
    projs = _mlp("dense", torch.float32, 0.3)
    x0 = torch.randn(33, D)
    masks = dropout_masks(x0, projs, True, torch.Generator().manual_seed(9))
    saved = {}

    def keep_masks(t):
        if t.dtype == torch.bool:
            saved.setdefault(t.shape[-1], []).append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep_masks, lambda t: t):
        y = tiled_lora_mlp(leaf(x0), *projs, training=True, generator=torch.Generator().manual_seed(9), tile_rows=8)
    assert [m.shape for m in saved[D]] == [(33, D), (33, D)] and saved[INTER][0].shape == (33, INTER)
    assert torch.equal(saved[D][0], masks[0]) and torch.equal(saved[D][1], masks[1])
    assert torch.equal(saved[INTER][0], masks[2])
    no_dropout = tiled_lora_mlp(x0, *projs, training=False, tile_rows=8)
    assert not torch.allclose(y, no_dropout, atol=1e-3)


def test_frozen_input_and_frozen_adapter_get_no_gradient():
    """``x`` without grad and a frozen gate adapter: the backward returns ``None`` for them."""
    projs = _mlp("dense", torch.float32)
    projs[0].lora_a.requires_grad_(False)
    projs[0].lora_b.requires_grad_(False)
    y = tiled_lora_mlp(torch.randn(33, D), *projs, tile_rows=8)
    returned = y.grad_fn.apply(torch.ones_like(y))
    # (dx, projs, workspace, tile_rows, activation, dA_g, dB_g, m_g, dA_u, dB_u, m_u, dA_d, dB_d, m_d)
    assert [r is None for r in returned] == [True] * 7 + [True, False, False, True, False, False, True]
    assert returned[8].shape == (R, D) and returned[12].shape == (D, R) and returned[8].dtype == torch.float32


def _saved_bytes(saved):
    return sum(b for *_, b in saved)


@pytest.mark.parametrize("p", DROPOUTS)
def test_saves_no_intermediate_tensor(p):
    """N = 256 in tiles of 32: the tiled call saves x (+ masks, A/B), not g and u; its backward recomputes
    tile-sized intermediates only."""
    dtype, n, tile = torch.bfloat16, 256, 32
    projs = _mlp("dense", dtype, p)
    x = leaf(torch.randn(n, D).to(dtype))
    with record_saved() as untiled:
        lora_mlp(x, *projs, training=True, generator=torch.Generator().manual_seed(0))
    with record_saved() as tiled:
        y = tiled_lora_mlp(x, *projs, training=True, generator=torch.Generator().manual_seed(0), tile_rows=tile)
    assert (n, INTER) in [s for s, *_ in untiled]  # g and u
    wide = [s for s, dt, _ in tiled if s[-1] == INTER and dt != torch.bool]
    assert wide == [(R, INTER)], tiled  # only the down projection's LoRA A (a parameter)
    g_u_bytes = 2 * n * INTER * 2
    assert _saved_bytes(tiled) <= _saved_bytes(untiled) - g_u_bytes
    with record_saved() as in_backward:  # the per-tile recomputation's saved tensors
        y.backward(torch.ones_like(y))
    rows = {s[0] for s, dt, _ in in_backward if s[-1] == INTER and len(s) == 2 and s[0] != R}
    assert rows == {tile}, in_backward  # g, u of one tile, never of all rows


def test_default_tile_rows_and_validation():
    assert default_tile_rows(80, 56) == DEFAULT_TILE_ROWS == 1024
    assert default_tile_rows(576, 1536) == 1280  # SmolLM2-135M: 2 * 576 rounded up to 256
    assert default_tile_rows(4096, 14336) == 8192  # Llama-3.1-8B
    assert default_tile_rows(8192, 28672) == 4608  # Llama-3.1-70B: capped by MAX_TILE_ELEMENTS
    for rows in (default_tile_rows(h, f) for h, f in [(576, 1536), (2048, 8192), (8192, 28672)]):
        assert rows % 256 == 0 and rows >= DEFAULT_TILE_ROWS
    with pytest.raises(ConfigurationError):
        default_tile_rows(0, 56)
    projs = _mlp("dense", torch.float32)
    x = torch.randn(5, D)
    for bad in (0, -3, True, 2.5, "8"):
        with pytest.raises(ConfigurationError, match="tile_rows"):
            tiled_lora_mlp(x, *projs, tile_rows=bad)
    # None: the default for these dims (1024 rows), so 5 rows run untiled.
    assert tiled_lora_mlp(leaf(x), *projs).grad_fn._forward_cls is LoRAMLPFunction


def test_triton_kernels_inside(triton_backend):
    """Under ENGINE_KERNELS=triton the NF4 dequantization and SwiGLU kernels run inside every tile."""
    dev = triton_backend
    projs = [dataclasses.replace(p, weight=p.weight.to(dev), lora_a=leaf(p.lora_a.to(dev)),
                                 lora_b=leaf(p.lora_b.to(dev))) for p in _mlp("nf4", torch.float32, 0.3)]
    with record_backends() as used:
        _compare(torch.randn(33, D, device=dev), projs, torch.float32, 16, workspace=DequantWorkspace())
    assert used["nf4_dequantize"] == {"triton"} and used["swiglu"] == {"triton"}
