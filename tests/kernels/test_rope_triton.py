"""The Triton RoPE kernel (forward and hand-written backward) against the PyTorch reference.

Runs on CUDA when there is one, else on CPU tensors under Triton's interpreter (``triton_backend``).
Shapes stay small: the interpreter runs one Python program per token. Tolerances: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from engine_kernels.dispatch import record_backends
from engine_kernels.rope import (
    RoPETritonFunction,
    _launch_config,
    _rope_kernel,
    audit_launches,
    rope,
    rope_cos_sin,
    rope_reference,
    rope_triton_forward,
)
from tests.kernels.op_testing import DTYPES, assert_close, grads, inv_freq, leaf, record_saved

rope_module = importlib.import_module("engine_kernels.rope")  # ``engine_kernels.rope`` as an attribute is the function

CASES = [
    # (batch, seq, heads, kv_heads, head_dim)
    pytest.param((1, 1, 3, 1, 8), id="b1_s1_h3kv1_d8"),
    pytest.param((2, 9, 3, 1, 64), id="b2_s9_h3kv1_d64"),
    pytest.param((1, 3, 4, 4, 80), id="b1_s3_h4kv4_d80"),
    pytest.param((1, 127, 3, 1, 8), id="b1_s127_h3kv1_d8"),
]


def llama3_inv_freq(head_dim: int, theta: float = 500000.0, factor: float = 8.0, low: float = 1.0,
                    high: float = 4.0, old_context: float = 16.0) -> torch.Tensor:
    """Llama-3.1 scaled inverse frequencies, with a tiny original context so every band occurs at small dims."""
    base = inv_freq(head_dim, theta)
    wavelen = 2 * math.pi / base
    scaled = torch.where(wavelen > old_context / low, base / factor, base)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, smoothed, scaled)


def packed_positions(batch: int, seq: int) -> torch.Tensor:
    """Position ids of packed documents, restarting at 0 (row 0: ``[0, 1, 2, 0, 1, 0, 1, 2, 3, ...]``).

    Row ``r`` starts inside a document at position ``1000 * r`` (a continued sequence: large angles).
    """
    lengths = [3, 2, 4, 7, 1, 30]
    rows = []
    for r in range(batch):
        pos, start, doc = [], 1000 * r, 0
        while len(pos) < seq:
            pos.extend(range(start, start + lengths[doc % len(lengths)]))
            start, doc = 0, doc + 1
        rows.append(pos[:seq])
    return torch.tensor(rows, dtype=torch.long)


def _tables(b, s, d, dtype, device, scaling=1.0):
    return rope_cos_sin(packed_positions(b, s).to(device), llama3_inv_freq(d), scaling, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_rope_triton_matches_reference(triton_backend, case, dtype):
    """Through the public ``rope()``: Triton forward and gradients equal the reference's autograd."""
    torch.manual_seed(11)
    b, s, h, kv, d = case
    device = triton_backend
    cos, sin = _tables(b, s, d, dtype, device, scaling=0.9)
    q0, k0 = torch.randn(b, s, h, d, device=device), torch.randn(b, s, kv, d, device=device)
    dq_out = torch.randn(b, s, h, d, device=device).to(dtype)
    dk_out = torch.randn(b, s, kv, d, device=device).to(dtype)
    q, k = leaf(q0.to(dtype)), leaf(k0.to(dtype))
    qr, kr = leaf(q0.to(dtype)), leaf(k0.to(dtype))

    with record_backends() as used:
        qo, ko = rope(q, k, cos, sin)
    qro, kro = rope_reference(qr, kr, cos, sin)
    assert used == {"rope": {"triton"}}
    assert qo.grad_fn._forward_cls is RoPETritonFunction
    assert_close(qo, qro, dtype, "rope_triton.q")
    assert_close(ko, kro, dtype, "rope_triton.k")

    got = grads((qo, ko), [q, k], (dq_out, dk_out))
    want = grads((qro, kro), [qr, kr], (dq_out, dk_out))
    assert_close(got[0], want[0], dtype, "rope_triton.dq")
    assert_close(got[1], want[1], dtype, "rope_triton.dk")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_triton_strided_views(triton_backend, dtype):
    """Q/K sliced from a fused QKV projection, a transposed upstream gradient, a non-contiguous last dim."""
    torch.manual_seed(12)
    b, s, h, kv, d = 2, 5, 3, 1, 16
    device = triton_backend
    cos, sin = _tables(b, s, d, dtype, device)
    qkv0 = torch.randn(b, s, (h + 2 * kv) * d, device=device).to(dtype)
    qkv, qkv_r = leaf(qkv0), leaf(qkv0)
    heads = qkv.view(b, s, h + 2 * kv, d)
    q, k = heads[:, :, :h], heads[:, :, h:h + kv]
    assert not q.is_contiguous() and not k.is_contiguous()
    qo, ko = RoPETritonFunction.apply(q, k, cos, sin)
    heads_r = qkv_r.view(b, s, h + 2 * kv, d)
    qro, kro = rope_reference(heads_r[:, :, :h], heads_r[:, :, h:h + kv], cos, sin)
    assert_close(qo, qro, dtype, "strided.q")
    assert_close(ko, kro, dtype, "strided.k")
    # Attention hands back dq as the transpose of a [b, h, s, d] tensor.
    dq_out = torch.randn(b, h, s, d, device=device).to(dtype).transpose(1, 2)
    dk_out = torch.randn(b, s, kv, 2 * d, device=device).to(dtype)[..., ::2]  # last dim strided
    (got,) = grads((qo, ko), [qkv], (dq_out, dk_out))
    (want,) = grads((qro, kro), [qkv_r], (dq_out, dk_out))
    assert_close(got, want, dtype, "strided.dqkv")
    assert torch.count_nonzero(got[..., (h + kv) * d:]) == 0  # V's part gets no gradient from RoPE


def test_rope_triton_general_tables_broadcast_over_batch(triton_backend):
    """Arbitrary cos/sin (halves differ) shared by the batch (stride 0): the backward is the exact transpose."""
    torch.manual_seed(15)
    b, s, h, kv, d = 2, 3, 2, 1, 12
    device = triton_backend
    cos, sin = torch.randn(1, s, 1, d, device=device), torch.randn(1, s, 1, d, device=device)
    q, k = leaf(torch.randn(b, s, h, d, device=device)), leaf(torch.randn(b, s, kv, d, device=device))
    qr, kr = leaf(q), leaf(k)
    qo, ko = RoPETritonFunction.apply(q, k, cos, sin)
    qro, kro = rope_reference(qr, kr, cos, sin)
    assert_close(qo, qro, torch.float32, "tables.q")
    assert_close(ko, kro, torch.float32, "tables.k")
    dq_out, dk_out = torch.randn_like(qo), torch.randn_like(ko)
    got = grads((qo, ko), [q, k], (dq_out, dk_out))
    want = grads((qro, kro), [qr, kr], (dq_out, dk_out))
    assert_close(got[0], want[0], torch.float32, "tables.dq")
    assert_close(got[1], want[1], torch.float32, "tables.dk")


def test_rope_triton_rotates_heads_in_chunks(triton_backend, monkeypatch):
    """More heads than one tile holds (as Llama-70B's 64 at head_dim 128): the kernel loops over head blocks."""
    torch.manual_seed(16)
    monkeypatch.setattr(rope_module, "_MAX_TILE", 8)
    b, s, h, kv, d = 1, 3, 5, 3, 8
    assert _launch_config(h, kv, d)[0] == 2  # 3 blocks of Q heads (the last half-masked), 2 of K heads
    cos, sin = _tables(b, s, d, torch.float32, triton_backend)
    q, k = leaf(torch.randn(b, s, h, d, device=triton_backend)), leaf(torch.randn(b, s, kv, d, device=triton_backend))
    qr, kr = leaf(q), leaf(k)
    qo, ko = RoPETritonFunction.apply(q, k, cos, sin)
    qro, kro = rope_reference(qr, kr, cos, sin)
    assert_close(qo, qro, torch.float32, "chunks.q")
    assert_close(ko, kro, torch.float32, "chunks.k")
    dq_out, dk_out = torch.randn_like(qo), torch.randn_like(ko)
    got = grads((qo, ko), [q, k], (dq_out, dk_out))
    want = grads((qro, kro), [qr, kr], (dq_out, dk_out))
    assert_close(got[0], want[0], torch.float32, "chunks.dq")
    assert_close(got[1], want[1], torch.float32, "chunks.dk")


@pytest.mark.parametrize("which", ["q_only", "k_only"])
def test_rope_triton_gradient_through_one_output(triton_backend, which):
    """Only one output feeds the loss: the other's gradient arrives as None and is skipped."""
    torch.manual_seed(13)
    b, s, h, kv, d = 1, 7, 3, 1, 24
    cos, sin = _tables(b, s, d, torch.float32, triton_backend)
    q, k = leaf(torch.randn(b, s, h, d, device=triton_backend)), leaf(torch.randn(b, s, kv, d, device=triton_backend))
    qr, kr = leaf(q), leaf(k)
    qo, ko = RoPETritonFunction.apply(q, k, cos, sin)
    qro, kro = rope_reference(qr, kr, cos, sin)
    out, ref_out, x, xr, other = (qo, qro, q, qr, k) if which == "q_only" else (ko, kro, k, kr, q)
    probe = torch.arange(out.numel(), device=out.device).reshape(out.shape).sin()
    (out * probe).sum().backward()
    (ref_out * probe).sum().backward()
    assert_close(x.grad, xr.grad, torch.float32, f"rope_triton.{which}.grad")
    assert other.grad is None


@pytest.mark.parametrize("head_dim", [8, 80])
def test_rope_triton_backward_is_inverse_rotation(triton_backend, head_dim):
    """The backward kernel applied to the forward output gives back the input (rotations are orthogonal)."""
    torch.manual_seed(14)
    b, s, h, kv = 1, 9, 3, 1
    cos, sin = _tables(b, s, head_dim, torch.float32, triton_backend)
    q, k = torch.randn(b, s, h, head_dim, device=triton_backend), torch.randn(b, s, kv, head_dim, device=triton_backend)
    qo, ko = rope_triton_forward(q, k, cos, sin)
    assert not torch.allclose(qo, q, atol=1e-2)  # positions > 0 actually rotate
    q_back, k_back = rope_triton_forward(qo, ko, cos, sin, backward=True)
    assert_close(q_back, q, torch.float32, "inverse.q")
    assert_close(k_back, k, torch.float32, "inverse.k")


def test_rope_triton_leaves_inputs_and_saves_only_cos_sin(triton_backend):
    b, s, h, kv, d = 1, 5, 3, 1, 24
    cos, sin = _tables(b, s, d, torch.float32, triton_backend)
    q, k = leaf(torch.randn(b, s, h, d, device=triton_backend)), leaf(torch.randn(b, s, kv, d, device=triton_backend))
    q_before, k_before = q.detach().clone(), k.detach().clone()
    with record_saved() as saved:
        qo, ko = rope(q, k, cos, sin)
    assert [shape for shape, _, _ in saved] == [(b, s, 1, d), (b, s, 1, d)]
    assert torch.equal(q, q_before) and torch.equal(k, k_before)
    assert qo.data_ptr() != q.data_ptr() and ko.data_ptr() != k.data_ptr()


@pytest.mark.parametrize("shape", [(9, 3, 64), (32, 8, 128), (28, 4, 128), (64, 8, 128), (3, 1, 80), (1, 1, 2)])
def test_launch_config_covers_heads_and_half_dim(shape):
    heads, kv_heads, head_dim = shape
    block_h, block_d, num_warps = _launch_config(heads, kv_heads, head_dim)
    assert block_d >= head_dim // 2 and block_d & (block_d - 1) == 0
    assert 1 <= block_h <= max(heads, kv_heads) * 2 and block_h & (block_h - 1) == 0
    assert block_h * block_d <= max(2048, block_d) and num_warps in (1, 2, 4, 8)


def test_audit_launches_match_kernel_parameters():
    """Every audit record names the kernel's non-constexpr parameters in order and all its constexprs."""
    names = list(getattr(_rope_kernel, "arg_names", None) or [p.name for p in _rope_kernel.params])
    launches = audit_launches()
    assert {launch.shape.split()[-1] for launch in launches} == {"fwd", "bwd"}
    for launch in launches:
        assert launch.op == "rope" and launch.kernel is _rope_kernel
        assert list(launch.signature) + list(launch.constexprs) == names
        assert all(v.startswith("*") for k, v in launch.signature.items() if k.isupper())
        assert all(v == "i32" for k, v in launch.signature.items() if not k.isupper())
