"""Fused LoRA Q/K/V, O and SwiGLU-MLP Functions against the plain-autograd composition of the reference ops.

Odd sizes: 7 tokens, hidden 80, q 80 (5 heads x 16), kv 16 (one KV head), intermediate 56, rank 4.
Tolerances and helpers: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import engine_kernels.lora_fused as lf
from engine_kernels.dispatch import record_backends
from engine_kernels.errors import ConfigurationError
from engine_kernels.lora_fused import (
    DequantWorkspace,
    LoRAMLPFunction,
    LoRAProjectionsFunction,
    Projection,
    dropout_masks,
    lora_mlp,
    lora_o,
    lora_qkv,
    reference_mlp,
    reference_o,
    reference_qkv,
)
from tests.kernels.op_testing import DTYPES, assert_close, grads, leaf, lora_projection, record_saved

N, D, Q, KV, INTER, R = 7, 80, 80, 16, 56, 4
BASES = ["dense", "nf4"]
DROPOUTS = [pytest.param(0.0, id="p0"), pytest.param(0.3, id="p0.3")]


def _twin(p: Projection) -> Projection:
    """The same projection with fresh LoRA leaves (so the fused and reference graphs have separate grads)."""
    if not p.has_lora:
        return p
    return dataclasses.replace(p, lora_a=leaf(p.lora_a), lora_b=leaf(p.lora_b))


def _inputs(x, projs):
    return [x] + [t for p in projs if p.has_lora for t in (p.lora_a, p.lora_b)]


def _names(projs, labels):
    return ["dx"] + [f"{n}.{t}" for p, n in zip(projs, labels) if p.has_lora for t in ("dA", "dB")]


def _check(outs, refs, projs, ref_projs, x, xr, labels, dtype):
    outs, refs = (outs if isinstance(outs, tuple) else (outs,)), (refs if isinstance(refs, tuple) else (refs,))
    for name, y, yr in zip(labels, outs, refs):
        assert y.dtype == dtype
        assert_close(y, yr, dtype, f"{name}.y", reduction=True)
    dys = [torch.randn(y.shape, generator=torch.Generator().manual_seed(3 + i)).to(dtype) for i, y in enumerate(outs)]
    got, want = grads(outs, _inputs(x, projs), dys), grads(refs, _inputs(xr, ref_projs), dys)
    for name, g_, w_ in zip(_names(projs, labels), got, want):
        assert_close(g_, w_, dtype, name, reduction=True)


def _run(fused_fn, ref_fn, x0, projs, dtype, training, **kwargs):
    """Run the fused function and its reference with the same dropout masks; return both results and inputs."""
    ref_projs = [_twin(p) for p in projs]
    x, xr = leaf(x0.to(dtype)), leaf(x0.to(dtype))
    outs = fused_fn(x, *projs, training=training, generator=torch.Generator().manual_seed(77), **kwargs)
    masks = dropout_masks(xr, projs, training, torch.Generator().manual_seed(77))
    if fused_fn is lora_mlp:  # the down mask covers h [..., inter]: dropout_masks read down.in_features
        assert masks[2] is None or masks[2].shape == (*x0.shape[:-1], INTER)
    refs = ref_fn(xr, *ref_projs, masks) if fused_fn is not lora_o else ref_fn(xr, *ref_projs, masks[0])
    return outs, refs, ref_projs, x, xr, masks


QKV_LORA = {"all": (True, True, True), "q_v": (True, False, True), "none": (False, False, False)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "qkv_bias"])
@pytest.mark.parametrize("p", DROPOUTS)
@pytest.mark.parametrize("lora", list(QKV_LORA))
def test_lora_qkv_matches_reference(lora, p, bias, base, dtype):
    flags = QKV_LORA[lora]
    projs = [lora_projection(o, D, base, dtype, 10 + i, f, bias, p) for i, (o, f) in enumerate(zip((Q, KV, KV), flags))]
    x0 = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    outs, refs, ref_projs, x, xr, masks = _run(lora_qkv, reference_qkv, x0, projs, dtype, training=True)
    assert outs[0].grad_fn._forward_cls is LoRAProjectionsFunction
    assert [o.shape for o in outs] == [(N, Q), (N, KV), (N, KV)]
    assert [m is not None for m in masks] == [f and p > 0 for f in flags]
    _check(outs, refs, projs, ref_projs, x, xr, ("q", "k", "v"), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("p", DROPOUTS)
def test_lora_o_matches_reference(p, base, dtype):
    o = lora_projection(D, Q, base, dtype, 20, bias=True, p=p)
    x0 = torch.randn(2, 3, Q, generator=torch.Generator().manual_seed(2))  # [b, s, in]: reshaped and back
    out, ref, ref_projs, x, xr, _ = _run(lora_o, reference_o, x0, [o], dtype, training=True)
    assert out.shape == (2, 3, D)
    _check(out, ref, [o], ref_projs, x, xr, ("o",), dtype)


MLP_LORA = {"all": (True, True, True), "down_only": (False, False, True), "gate_only": (True, False, False),
            "none": (False, False, False)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("p", DROPOUTS)
@pytest.mark.parametrize("lora", list(MLP_LORA))
def test_lora_mlp_matches_reference(lora, p, bias, base, dtype):
    flags = MLP_LORA[lora]
    shapes = ((INTER, D), (INTER, D), (D, INTER))
    projs = [lora_projection(o, i, base, dtype, 30 + k, f, bias, p) for k, ((o, i), f) in enumerate(zip(shapes, flags))]
    x0 = torch.randn(N, D, generator=torch.Generator().manual_seed(4))
    out, ref, ref_projs, x, xr, _ = _run(lora_mlp, reference_mlp, x0, projs, dtype, training=True)
    assert out.grad_fn._forward_cls is LoRAMLPFunction and out.shape == (N, D)
    _check(out, ref, projs, ref_projs, x, xr, ("gate", "up", "down"), dtype)


def _geglu_reference_mlp(x, gate, up, down, masks=(None, None, None)):
    return reference_mlp(x, gate, up, down, masks, activation="gelu_tanh")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("p", DROPOUTS)
@pytest.mark.parametrize("lora", ["all", "gate_only", "none"])
def test_lora_mlp_geglu_matches_reference(lora, p, base, dtype):
    """``activation="gelu_tanh"`` (Gemma): GeGLU forward and backward, never the SwiGLU ones."""
    shapes = ((INTER, D), (INTER, D), (D, INTER))
    projs = [lora_projection(o, i, base, dtype, 30 + k, f, True, p)
             for k, ((o, i), f) in enumerate(zip(shapes, MLP_LORA[lora]))]
    x0 = torch.randn(N, D, generator=torch.Generator().manual_seed(4))
    with record_backends() as used:
        out, ref, ref_projs, x, xr, _ = _run(lora_mlp, _geglu_reference_mlp, x0, projs, dtype, training=True,
                                             activation="gelu_tanh")
        _check(out, ref, projs, ref_projs, x, xr, ("gate", "up", "down"), dtype)
    assert out.grad_fn._forward_cls is LoRAMLPFunction
    assert used["geglu"] == {"torch"} and "swiglu" not in used
    silu = lora_mlp(x0.to(dtype), *projs, activation="silu")
    assert not torch.allclose(out.detach().float(), silu.float(), atol=1e-3)  # the activation really differs


def test_lora_mlp_unknown_activation_is_an_error():
    projs = [lora_projection(o, i, "dense", torch.float32, 30 + k) for k, (o, i) in enumerate(((INTER, D), (INTER, D), (D, INTER)))]
    with pytest.raises(ConfigurationError, match="unknown GLU activation 'gelu'.*'silu', 'gelu_tanh'"):
        lora_mlp(torch.randn(N, D), *projs, activation="gelu")
    with pytest.raises(ConfigurationError, match="'silu', 'gelu_tanh'"):
        reference_mlp(torch.randn(N, D), *projs, activation="relu")


def test_dropout_masks_used_only_when_training():
    projs = [lora_projection(o, D, "dense", torch.float32, 40 + i, p=0.3) for i, o in enumerate((Q, KV, KV))]
    x0 = torch.randn(N, D)
    torch.manual_seed(5)
    train = lora_qkv(x0, *projs, training=True)  # global RNG when no generator is given
    torch.manual_seed(5)
    masks = dropout_masks(x0, projs, True)
    assert all(0 < m.sum() < m.numel() for m in masks) and not torch.equal(masks[0], masks[1])
    for y, yr in zip(train, reference_qkv(x0, *projs, masks)):
        assert_close(y, yr, torch.float32, "y", reduction=True)
    evals, plain = lora_qkv(x0, *projs, training=False), reference_qkv(x0, *projs)
    for y, yt, yr in zip(evals, train, plain):
        assert_close(y, yr, torch.float32, "y.eval", reduction=True)
        assert not torch.allclose(y, yt, atol=1e-3)


def _tiny_layer(base="nf4", dtype=torch.float32):
    qkv = [lora_projection(o, D, base, dtype, 50 + i) for i, o in enumerate((Q, KV, KV))]
    mlp = [lora_projection(o, i, base, dtype, 60 + k) for k, (o, i) in enumerate(((INTER, D), (INTER, D), (D, INTER)))]
    return qkv, lora_projection(D, Q, base, dtype, 55), mlp


def _layer_step(x0, qkv, o, mlp, workspace):
    """Forward and backward through q/k/v, o and the MLP; returns the outputs and every gradient."""
    projs = [_twin(p) for p in qkv + [o] + mlp]
    x = leaf(x0)
    q, k, v = lora_qkv(x, *projs[:3], workspace=workspace)
    y = lora_mlp(lora_o(q + 0.5 * k.repeat(1, Q // KV), projs[3], workspace) + v.sum(), *projs[4:], workspace)
    y.square().sum().backward()
    return [y.detach(), x.grad] + [t.grad for p in projs for t in (p.lora_a, p.lora_b)]


def test_workspace_is_reused_and_changes_nothing(monkeypatch):
    qkv, o, mlp = _tiny_layer("nf4")
    x0 = torch.randn(N, D)
    plain = _layer_step(x0, qkv, o, mlp, None)
    ws = DequantWorkspace()
    targets = []
    real = lf.nf4_dequantize

    def spy(w, dtype=None, out=None):
        targets.append(None if out is None else out.data_ptr())
        return real(w, dtype=dtype, out=out)

    monkeypatch.setattr(lf, "nf4_dequantize", spy)
    first = _layer_step(x0, qkv, o, mlp, ws)
    buffer = ws.buffer(torch.float32, "cpu")
    assert buffer.numel() == max(Q * D, INTER * D) and ws.nbytes == buffer.numel() * 4
    ptr = buffer.data_ptr()
    second = _layer_step(x0, qkv, o, mlp, ws)
    assert ws.buffer(torch.float32, "cpu").data_ptr() == ptr  # no reallocation after the first call
    assert targets == [ptr] * 14 * 2  # 7 weights, forward + backward, both steps: all into the one buffer
    for a, b, c in zip(plain, first, second):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_workspace_grows_never_shrinks_and_casts_dense():
    ws = DequantWorkspace()
    small = ws.get((3, 4), torch.float32, "cpu")
    assert small.shape == (3, 4) and small.is_contiguous()
    big = ws.get(100, torch.float32, "cpu")
    ptr = big.data_ptr()
    assert ws.get((5, 5), torch.float32, "cpu").data_ptr() == ptr and ws.buffer(torch.float32, "cpu").numel() == 100
    assert ws.buffer(torch.bfloat16, "cpu") is None
    p = lora_projection(KV, D, "dense", torch.float32, 70, lora=False)
    cast = p.dense(torch.bfloat16, ws)
    assert cast.data_ptr() == ws.buffer(torch.bfloat16, "cpu").data_ptr()
    assert torch.equal(cast, p.weight.to(torch.bfloat16))
    assert p.dense(torch.float32, ws) is p.weight  # same dtype: used as is


def _storage_bytes_per_token(fn, n_tokens):
    """Bytes per token autograd keeps for backward, each storage counted once, per-token tensors only."""
    seen = {}

    def pack(t):
        if t.dim() >= 1 and t.shape[0] == n_tokens:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()) / n_tokens, out


@pytest.mark.parametrize("p", DROPOUTS)
def test_mlp_saves_less_than_reference(p):
    dtype = torch.bfloat16
    projs = [lora_projection(o, i, "dense", dtype, 80 + k, p=p) for k, (o, i) in enumerate(((INTER, D), (INTER, D), (D, INTER)))]
    x = leaf(torch.randn(N, D).to(dtype))
    masks = dropout_masks(x, projs, True, torch.Generator().manual_seed(0))
    with record_saved() as fused:
        lora_mlp(x, *projs, training=True)
    with record_saved() as ref:
        reference_mlp(x, *projs, masks)
    assert sum(b for *_, b in fused) < sum(b for *_, b in ref)
    assert (N, INTER) in [s for s, *_ in fused]  # g and u
    # Exact accounting (the numbers of the module docstring, at these dims): x, xa's, g, u (+ masks).
    got, _ = _storage_bytes_per_token(lambda: lora_mlp(x, *projs, training=True), N)
    want = 2 * (D + 3 * R + 2 * INTER) + (2 * D + INTER if p else 0)
    assert got == want
    ref_bytes, _ = _storage_bytes_per_token(lambda: reference_mlp(x, *projs, masks), N)
    # The reference also keeps silu(g) and h; with dropout h * m / (1 - p) instead of h, and x * m / (1 - p)
    # for gate and up instead of x.
    assert ref_bytes - got == 2 * 2 * INTER + (2 * D if p else 0)


def test_nf4_fused_never_saves_a_dense_weight():
    qkv, o, mlp = _tiny_layer("nf4")
    x = leaf(torch.randn(N, D))
    with record_saved() as saved:
        lora_qkv(x, *qkv, training=True)
        lora_o(x, o, training=True)
        lora_mlp(x, *mlp, training=True)
    weight_shapes = {(Q, D), (KV, D), (INTER, D), (D, INTER)}
    assert not weight_shapes & {s for s, *_ in saved}, saved


def test_frozen_input_and_frozen_adapter():
    """x without grad (first layer) and a frozen q adapter: the backward returns None for both."""
    qkv, _, _ = _tiny_layer("dense")
    qkv[0].lora_a.requires_grad_(False)
    qkv[0].lora_b.requires_grad_(False)
    x0 = torch.randn(N, D)
    outs = lora_qkv(x0, *qkv)
    returned = outs[0].grad_fn.apply(*[torch.ones_like(o) for o in outs])
    assert returned[0] is None and returned[3] is None and returned[4] is None and returned[6] is not None
    refs = [_twin(p) for p in qkv]
    refs[0] = qkv[0]
    want = grads(reference_qkv(x0, *refs)[1:], [t for p in refs[1:] for t in (p.lora_a, p.lora_b)],
                 [torch.ones_like(o) for o in outs[1:]])
    got = grads(outs, [t for p in qkv[1:] for t in (p.lora_a, p.lora_b)], [torch.ones_like(o) for o in outs])
    for g_, w_ in zip(got, want):
        assert_close(g_, w_, torch.float32, "dA/dB", reduction=True)


def test_records_backend_and_validates():
    qkv, _, _ = _tiny_layer("dense")
    with record_backends() as used:
        lora_qkv(torch.randn(N, D), *qkv)
    assert used["lora_linear"] == {"torch"}
    with pytest.raises(ConfigurationError):
        Projection(qkv[0].weight, lora_a=qkv[0].lora_a)
    with pytest.raises(ConfigurationError):
        Projection(leaf(qkv[0].weight))  # trainable base: not this Function's job


def test_projection_from_engine_linear():
    from engine.modules.linear import Linear

    lin = Linear(D, KV, bias=True)
    torch.nn.init.normal_(lin.weight, std=0.1)
    lin.add_lora(R, 8.0, dropout=0.1)
    lin.quantize_nf4_()
    p = Projection.from_module(lin)
    assert p.lora_a is lin.lora_A and p.scaling == lin.lora_scaling and p.dropout_p == 0.1
    x = torch.randn(N, D)
    assert_close(lora_o(x, p), lin(x), torch.float32, "y")
    lin.adapter_enabled = False
    assert not Projection.from_module(lin).has_lora


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_nf4_and_swiglu_kernels_inside(triton_backend, dtype):
    """Under ENGINE_KERNELS=triton the NF4 dequantization and the SwiGLU kernels run inside the Functions."""
    qkv, _, mlp = _tiny_layer("nf4", dtype)
    dev = triton_backend
    projs = [dataclasses.replace(p, lora_a=leaf(p.lora_a.to(dev)), lora_b=leaf(p.lora_b.to(dev)),
                                 weight=p.weight.to(dev), dropout_p=0.3 * (k % 2)) for k, p in enumerate(qkv + mlp)]
    x0 = torch.randn(N, D, device=dev)
    ws = DequantWorkspace()
    with record_backends() as used:
        outs, refs, ref_projs, x, xr, _ = _run(lora_qkv, reference_qkv, x0, projs[:3], dtype, True, workspace=ws)
        _check(outs, refs, projs[:3], ref_projs, x, xr, ("q", "k", "v"), dtype)
        outs, refs, ref_projs, x, xr, _ = _run(lora_mlp, reference_mlp, x0, projs[3:], dtype, True, workspace=ws)
        _check(outs, refs, projs[3:], ref_projs, x, xr, ("gate", "up", "down"), dtype)
    assert used["nf4_dequantize"] == {"triton"} and used["swiglu"] == {"triton"}
    assert used["lora_linear"] == {"torch"}
