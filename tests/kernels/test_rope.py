"""RoPE on q and k: forward and gradients against the reference, positions restarting per packed document.

Tolerances and helpers: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import pytest
import torch

from engine_kernels.rope import RoPEFunction, rope, rope_cos_sin, rope_reference
from tests.kernels.op_testing import DTYPES, assert_close, grads, inv_freq, leaf, record_saved

# --------------------------------------------------------------------------- RoPE

ROPE_CASES = [
    # (batch, seq, heads, kv_heads, head_dim)
    pytest.param((2, 9, 3, 1, 24), id="h3_kv1_d24"),
    pytest.param((1, 7, 5, 5, 64), id="h5_kv5_d64"),
    pytest.param((1, 1, 3, 1, 24), id="single_token"),
]


def _packed_positions(batch: int, seq: int) -> torch.Tensor:
    """Position ids with restarts (several packed documents per row), different per row."""
    rows = []
    for b in range(batch):
        starts = {0, 3 + b, 5 + 2 * b}
        pos, p = [], 0
        for t in range(seq):
            p = 0 if t in starts else p + 1
            pos.append(p)
        rows.append(pos)
    return torch.tensor(rows, dtype=torch.long)


def test_rope_cos_sin_tables():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 7]])
    inv = inv_freq(24)
    cos, sin = rope_cos_sin(pos, inv, 0.75, torch.float32)
    assert cos.shape == sin.shape == (1, 7, 1, 24)
    angles = pos[0, :, None].double() * inv.double()
    angles = torch.cat([angles, angles], dim=-1)
    torch.testing.assert_close(cos[0, :, 0], (angles.cos() * 0.75).float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin[0, :, 0], (angles.sin() * 0.75).float(), rtol=1e-6, atol=1e-6)
    # A restart at position 0 gives the identity rotation (up to attention_scaling).
    assert torch.equal(cos[0, 3, 0], torch.full((24,), 0.75))
    assert torch.equal(sin[0, 3, 0], torch.zeros(24))
    cos16, _ = rope_cos_sin(pos, inv, 1.0, torch.bfloat16)
    assert cos16.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROPE_CASES)
@pytest.mark.parametrize("scaling", [1.0, 0.7], ids=["scale1", "scale0.7"])
def test_rope_matches_reference(case, dtype, scaling):
    torch.manual_seed(3)
    b, s, h, kv, d = case
    pos = _packed_positions(b, s)
    cos, sin = rope_cos_sin(pos, inv_freq(d), scaling, dtype)
    q0, k0 = torch.randn(b, s, h, d), torch.randn(b, s, kv, d)
    dq_out, dk_out = torch.randn(b, s, h, d).to(dtype), torch.randn(b, s, kv, d).to(dtype)

    q, k = leaf(q0.to(dtype)), leaf(k0.to(dtype))
    qr, kr = leaf(q0.to(dtype)), leaf(k0.to(dtype))
    qo, ko = rope(q, k, cos, sin)
    qro, kro = rope_reference(qr, kr, cos, sin)
    assert qo.grad_fn._forward_cls is RoPEFunction
    assert_close(qo, qro, dtype, "rope.q")
    assert_close(ko, kro, dtype, "rope.k")

    got = grads((qo, ko), [q, k], (dq_out, dk_out))
    want = grads((qro, kro), [qr, kr], (dq_out, dk_out))
    assert_close(got[0], want[0], dtype, "rope.dq")
    assert_close(got[1], want[1], dtype, "rope.dk")


@pytest.mark.parametrize("which", ["q_only", "k_only"])
def test_rope_gradient_through_one_output(which):
    """Only one of the two outputs feeds the loss (the other's gradient is absent/zero)."""
    torch.manual_seed(4)
    b, s, h, kv, d = 1, 7, 3, 1, 24
    cos, sin = rope_cos_sin(_packed_positions(b, s), inv_freq(d), 1.0, torch.float32)
    q, k = leaf(torch.randn(b, s, h, d)), leaf(torch.randn(b, s, kv, d))
    qr, kr = leaf(q), leaf(k)
    qo, ko = rope(q, k, cos, sin)
    qro, kro = rope_reference(qr, kr, cos, sin)
    out, ref_out, x, xr = (qo, qro, q, qr) if which == "q_only" else (ko, kro, k, kr)
    probe = torch.arange(out.numel()).reshape(out.shape).sin()
    loss = (out * probe).sum()
    loss.backward()
    (ref_out * probe).sum().backward()
    assert_close(x.grad, xr.grad, torch.float32, f"rope.{which}.grad")
    other, other_ref = (k, kr) if which == "q_only" else (q, qr)
    assert other_ref.grad is None
    assert other.grad is None or torch.count_nonzero(other.grad) == 0
    assert torch.isfinite(loss)


def test_rope_packing_restart_is_position_zero():
    """With position restarts, a token at a restart is unrotated, and q.k depends only on relative position."""
    torch.manual_seed(5)
    d = 64
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    cos, sin = rope_cos_sin(pos, inv_freq(d), 1.0, torch.float32)
    v = torch.randn(d)
    q = v.expand(1, 8, 1, d).contiguous()
    k = v.expand(1, 8, 1, d).contiguous()
    qo, ko = rope(q, k, cos, sin)
    torch.testing.assert_close(qo[0, 0, 0], v)
    torch.testing.assert_close(qo[0, 4, 0], v)
    # The two packed documents get the same rotations at the same in-document positions.
    torch.testing.assert_close(qo[0, :4], qo[0, 4:])
    # Relative property: <R_m q, R_n k> = <R_{m+c} q, R_{n+c} k>.
    assert torch.allclose((qo[0, 3, 0] * ko[0, 1, 0]).sum(), (qo[0, 2, 0] * ko[0, 0, 0]).sum(), atol=1e-4)
    # Rotation preserves norms.
    torch.testing.assert_close(qo.norm(dim=-1), q.norm(dim=-1))


def test_rope_saves_only_cos_sin():
    b, s, h, kv, d = 1, 5, 3, 1, 24
    cos, sin = rope_cos_sin(_packed_positions(b, s), inv_freq(d), 1.0, torch.float32)
    q, k = leaf(torch.randn(b, s, h, d)), leaf(torch.randn(b, s, kv, d))
    with record_saved() as saved:
        rope(q, k, cos, sin)
    assert [shape for shape, _, _ in saved] == [(b, s, 1, d), (b, s, 1, d)]
