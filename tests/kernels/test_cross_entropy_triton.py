"""Triton fused linear cross-entropy: against ``F.cross_entropy``, the unfused reference and the PyTorch path.

Every test takes the ``triton_backend`` fixture (``ENGINE_KERNELS=triton``; CPU tensors under Triton's
interpreter when there is no GPU). Shapes are small: the interpreter runs each program in numpy.
Tolerances and helpers: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from engine_kernels import dispatch
from engine_kernels.cross_entropy import (
    FusedLinearCrossEntropyFunction,
    FusedLinearCrossEntropyTritonFunction,
    _ce_rows_kernel,
    _launch_config,
    _triton_rows,
    audit_launches,
    cross_entropy_reference,
    fused_linear_cross_entropy,
)
from tests.kernels.op_testing import DTYPES, IGNORE, assert_close, direct_cross_entropy, grads, leaf, random_labels


def _compare_all(device, hidden0, weight0, labels, dtype, *, chunk_size=None, grad_scale=1.0, **options):
    """Triton (public entry) vs reference autograd, ``F.cross_entropy`` and the PyTorch-path Function.

    Returns the Triton loss and gradients ``(dh, dw)``.
    """
    hidden0, weight0, labels = hidden0.to(device), weight0.to(device), labels.to(device)
    gout = torch.tensor(grad_scale, device=device)
    h, w = leaf(hidden0.to(dtype)), leaf(weight0.to(dtype))
    with dispatch.record_backends() as used:
        loss = fused_linear_cross_entropy(h, w, labels, chunk_size=chunk_size, **options)
    assert used["cross_entropy"] == {"triton"}
    assert loss.grad_fn._forward_cls is FusedLinearCrossEntropyTritonFunction
    assert loss.dtype == torch.float32 and loss.shape == ()
    got = grads(loss, [h, w], gout)

    hr, wr = leaf(hidden0.to(dtype)), leaf(weight0.to(dtype))
    ref = cross_entropy_reference(hr, wr, labels, **options)
    want = grads(ref, [hr, wr], gout)
    assert_close(loss, ref, dtype, "ce.loss", reduction=True)
    assert_close(got[0], want[0], dtype, "ce.dhidden", reduction=True)
    assert_close(got[1], want[1], dtype, "ce.dweight", reduction=True)

    direct = direct_cross_entropy(
        h.detach(), w.detach(), labels,
        reduction=options.get("reduction", "mean"),
        softcap=options.get("softcap"),
        num_items=options.get("num_items_in_batch"),
        ignore_index=options.get("ignore_index", IGNORE),
    )
    assert_close(loss, direct, dtype, "ce.loss_vs_F", reduction=True)

    ht, wt = leaf(hidden0.to(dtype)), leaf(weight0.to(dtype))
    torch_loss = FusedLinearCrossEntropyFunction.apply(
        ht, wt, labels, options.get("ignore_index", IGNORE), options.get("reduction", "mean"), options.get("softcap"),
        options.get("num_items_in_batch"), chunk_size, True,
    )
    torch_grads = grads(torch_loss, [ht, wt], gout)
    assert_close(loss, torch_loss, dtype, "ce.loss_vs_torch_path", reduction=True)
    assert_close(got[0], torch_grads[0], dtype, "ce.dhidden_vs_torch_path", reduction=True)
    assert_close(got[1], torch_grads[1], dtype, "ce.dweight_vs_torch_path", reduction=True)

    ignored = labels == options.get("ignore_index", IGNORE)
    if ignored.any():
        assert torch.count_nonzero(got[0][ignored]) == 0, "ignored tokens must get exactly zero gradient"
    return loss, got


CASES = [
    # (N, H, V, chunk_size, label pattern)
    pytest.param(1, 80, 1000, None, "none", id="N1_H80_V1000"),
    pytest.param(3, 576, 211, 2, "ends", id="N3_H576_V211_chunk2_ignore_ends"),
    pytest.param(3, 80, 211, 1, "middle", id="N3_H80_V211_chunk1_ignore_middle"),
    pytest.param(127, 80, 211, 7, "scattered", id="N127_H80_V211_chunk7_scattered"),
    pytest.param(127, 80, 1000, 50, "middle", id="N127_H80_V1000_chunk50_ignore_middle"),
    pytest.param(127, 80, 211, 2, "all_but_one", id="N127_H80_V211_all_but_one"),
    pytest.param(3, 80, 49152, None, "none", id="N3_H80_V49152"),
    pytest.param(5, 80, 49152, 2, "ends", id="N5_H80_V49152_chunk2_ignore_ends"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,hdim,vocab,chunk,pattern", CASES)
def test_triton_cross_entropy_matches_reference(triton_backend, n, hdim, vocab, chunk, pattern, dtype):
    torch.manual_seed(31)
    hidden0 = torch.randn(n, hdim)
    weight0 = torch.randn(vocab, hdim) * hdim**-0.5 * 2.0
    _compare_all(triton_backend, hidden0, weight0, random_labels(n, vocab, pattern), dtype, chunk_size=chunk)


OPTIONS = [
    pytest.param({"softcap": 30.0}, id="softcap30"),
    pytest.param({"reduction": "sum"}, id="sum"),
    pytest.param({"num_items_in_batch": 37}, id="num_items37"),
    pytest.param({"num_items_in_batch": torch.tensor(11)}, id="num_items_tensor"),
    pytest.param({"softcap": 30.0, "reduction": "sum"}, id="softcap_sum"),
    pytest.param({"ignore_index": 3}, id="ignore_index3"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", OPTIONS)
def test_triton_cross_entropy_options(triton_backend, options, dtype):
    torch.manual_seed(32)
    n, hdim, vocab = 11, 80, 1000
    hidden0 = torch.randn(n, hdim) * 3.0  # large logits so that softcap 30 actually bends them
    weight0 = torch.randn(vocab, hdim) * hdim**-0.5 * 4.0
    labels = random_labels(n, vocab, "middle")
    options = dict(options)
    if "ignore_index" in options:
        labels = torch.where(labels == IGNORE, torch.tensor(options["ignore_index"]), labels)
    if "softcap" in options:
        assert (hidden0 @ weight0.T).abs().max() > 30.0, "test data should exceed the softcap"
    # chunk_size=2: several chunks, one of them with an ignored row in it.
    _compare_all(triton_backend, hidden0, weight0, labels, dtype, chunk_size=2, grad_scale=2.5, **options)


def _dlogits_oracle(z, labels, denom, softcap):
    """Loss per row and ``d(sum loss / denom) / dz`` by autograd through ``F.cross_entropy`` in fp32."""
    zf = z.detach().float().requires_grad_()
    logits = softcap * torch.tanh(zf / softcap) if softcap is not None else zf
    per_row = F.cross_entropy(logits, labels, reduction="none")
    (dz,) = torch.autograd.grad(per_row.sum() / denom, zf)
    return per_row.detach(), dz


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap30"])
@pytest.mark.parametrize("vocab", [211, 9000], ids=["V211", "V9000_two_blocks"])
def test_triton_rows_kernel_in_place(triton_backend, vocab, softcap, dtype):
    """The rows kernel alone: per-row loss, and ``dz`` written over the logits (or left alone without grad)."""
    torch.manual_seed(33)
    z = torch.randn(4, vocab) * 20.0
    z[:2] -= 60.0  # all-negative rows: a masked tail lane read as 0 would dominate the max and the sum
    z = z.to(dtype).to(triton_backend)
    labels = torch.tensor([0, vocab - 1, 5, vocab // 2], device=triton_backend)
    denom = torch.tensor(3.0, device=triton_backend)
    want_loss, want_dz = _dlogits_oracle(z, labels, denom, softcap)

    buf = z.clone()
    loss, dz = _triton_rows(buf, labels, denom, softcap, want_grad=False)
    assert dz is None
    assert torch.equal(buf, z), "without HAS_GRAD the logits must be left untouched"
    assert_close(loss, want_loss, dtype, "rows.loss_no_grad", reduction=True)

    loss, dz = _triton_rows(buf, labels, denom, softcap, want_grad=True)
    assert dz.data_ptr() == buf.data_ptr() and dz.dtype == dtype, "dz must overwrite the logits buffer"
    assert_close(loss, want_loss, dtype, "rows.loss", reduction=True)
    assert_close(dz, want_dz.to(dtype), dtype, "rows.dz")


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_frozen_weight_returns_no_weight_grad(triton_backend, dtype):
    torch.manual_seed(34)
    hidden0, weight0 = torch.randn(7, 80), torch.randn(1000, 80) * 0.2
    labels = random_labels(7, 1000, "ends").to(triton_backend)
    h, w = leaf(hidden0.to(dtype).to(triton_backend)), leaf(weight0.to(dtype).to(triton_backend), False)
    hr = leaf(hidden0.to(dtype).to(triton_backend))
    loss = fused_linear_cross_entropy(h, w, labels, chunk_size=3)
    ref = cross_entropy_reference(hr, w, labels)
    assert_close(loss, ref, dtype, "ce.loss", reduction=True)
    assert loss.grad_fn.saved_tensors[1] is None, "no [V, H] fp32 gradient buffer for a frozen weight"
    returned = loss.grad_fn.apply(torch.tensor(1.0, device=triton_backend))
    assert returned[0] is not None and returned[1] is None
    (dh,), (dhr,) = grads(loss, [h], torch.tensor(1.0, device=triton_backend)), grads(ref, [hr], None)
    assert_close(dh, dhr, dtype, "ce.dhidden", reduction=True)


def _count_matmuls(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.__name__.split(".")[0] in ("mm", "addmm", "addmm_", "matmul", "bmm")
            return func(*args, **(kwargs or {}))

    with _Log() as log:
        fn()
    return log.count


def test_triton_no_grad_forward_only(triton_backend):
    """Under no_grad: correct loss, no graph, one logits matmul per chunk and no gradient matmuls."""
    torch.manual_seed(35)
    n, chunk = 9, 2
    hidden = torch.randn(n, 80, device=triton_backend).requires_grad_()
    weight = (torch.randn(1000, 80) * 0.3).to(triton_backend).requires_grad_()
    labels = random_labels(n, 1000, "ends").to(triton_backend)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
        matmuls = _count_matmuls(lambda: fused_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk))
        ref = direct_cross_entropy(hidden, weight, labels)
    assert loss.grad_fn is None
    assert_close(loss, ref, torch.float32, "ce.loss_no_grad", reduction=True)
    with_target = int((labels != IGNORE).sum())
    assert with_target < n and matmuls == math.ceil(with_target / chunk), f"{matmuls} matmuls under no_grad"


def test_triton_all_ignored(triton_backend):
    hidden0, weight0 = torch.randn(4, 80, device=triton_backend), torch.randn(211, 80, device=triton_backend) * 0.2
    labels = torch.full((4,), IGNORE, device=triton_backend)
    h, w = leaf(hidden0), leaf(weight0)
    loss = fused_linear_cross_entropy(h, w, labels, num_items_in_batch=9, chunk_size=3)
    assert loss.item() == 0.0
    dh, dw = grads(loss, [h, w], torch.tensor(1.0, device=triton_backend))
    assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0
    assert torch.isnan(fused_linear_cross_entropy(hidden0, weight0, labels))  # 0/0, as F.cross_entropy
    assert fused_linear_cross_entropy(hidden0, weight0, labels, reduction="sum").item() == 0.0


@pytest.mark.parametrize("vocab", [1, 211, 1000, 32768, 49152, 128256, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launch_config(vocab, dtype):
    block, num_warps = _launch_config(vocab, dtype)
    assert block & (block - 1) == 0 and num_warps & (num_warps - 1) == 0
    assert block == min(1 << (vocab - 1).bit_length(), 8192)
    assert 4 <= num_warps <= 32 and block // (num_warps * 32) <= 8


def test_audit_launches_match_kernel_signature():
    """Audit records name exactly the kernel's runtime parameters (in order) and its constexprs."""
    params = inspect.signature(getattr(_ce_rows_kernel, "fn", _ce_rows_kernel)).parameters.values()
    runtime = [p.name for p in params if "constexpr" not in str(p.annotation)]
    constexprs = {p.name for p in params if "constexpr" in str(p.annotation)}
    assert constexprs == {"HAS_SOFTCAP", "HAS_GRAD", "BLOCK_V"}
    launches = audit_launches()
    shapes = " ".join(launch.shape for launch in launches)
    for vocab in (32768, 49152, 128256, 151936):
        assert f"V={vocab} bfloat16 grad" in shapes and f"V={vocab} bfloat16 no-grad" in shapes
    assert "softcap" in shapes and "float32" in shapes
    for launch in launches:
        assert list(launch.signature) == runtime
        assert set(launch.constexprs) == constexprs
        assert (launch.constexprs["BLOCK_V"], launch.num_warps) == _launch_config(
            int(launch.shape.split("V=")[1].split()[0]), torch.bfloat16
        )
