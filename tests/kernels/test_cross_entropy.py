"""Fused linear cross-entropy: against the reference and F.cross_entropy, chunking, no logits kept.

Tolerances and helpers: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine_kernels.cross_entropy import (
    FusedLinearCrossEntropyFunction,
    cross_entropy_reference,
    default_chunk_size,
    fused_linear_cross_entropy,
)
from engine_kernels.errors import ConfigurationError
from engine_kernels.lora_linear import lora_linear
from tests.kernels.op_testing import (
    DTYPES,
    IGNORE,
    assert_close,
    direct_cross_entropy,
    grads,
    leaf,
    random_labels,
    record_saved,
)

# --------------------------------------------------------------------------- fused linear cross-entropy







def _run_ce(hidden0, weight0, labels, dtype, w_grad=True, grad_scale=1.0, **kwargs):
    """Fused vs reference (and direct F.cross_entropy) loss and gradients."""
    h, w = leaf(hidden0.to(dtype)), leaf(weight0.to(dtype), w_grad)
    hr, wr = leaf(hidden0.to(dtype)), leaf(weight0.to(dtype), w_grad)
    chunk = kwargs.pop("chunk_size", None)
    loss = fused_linear_cross_entropy(h, w, labels, chunk_size=chunk, **kwargs)
    ref = cross_entropy_reference(hr, wr, labels, **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == ()
    gout = torch.tensor(grad_scale)
    inputs, ref_inputs = ([h, w], [hr, wr]) if w_grad else ([h], [hr])
    return loss, ref, grads(loss, inputs, gout), grads(ref, ref_inputs, gout), (h, w)


CE_CASES = [
    # (N, H, V, chunk_size, label pattern)
    pytest.param(1, 80, 1009, None, "none", id="N1_H80_chunkNone"),
    pytest.param(3, 80, 1009, 1, "middle", id="N3_H80_chunk1_ignore_middle"),
    pytest.param(3, 576, 1009, 7, "ends", id="N3_H576_chunk7_ignore_ends"),
    pytest.param(127, 80, 1009, 7, "scattered", id="N127_H80_chunk7_scattered"),
    pytest.param(127, 80, 1009, 50, "middle", id="N127_H80_chunk50_not_multiple"),
    pytest.param(127, 576, 1009, None, "ends", id="N127_H576_chunkNone_ignore_ends"),
    pytest.param(127, 80, 1009, 1, "all_but_one", id="N127_H80_chunk1_all_but_one"),
    pytest.param(3, 80, 49152, None, "none", id="N3_H80_V49152"),
    pytest.param(5, 80, 49152, 2, "ends", id="N5_H80_V49152_chunk2"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,hdim,vocab,chunk,pattern", CE_CASES)
def test_cross_entropy_matches_reference(n, hdim, vocab, chunk, pattern, dtype):
    torch.manual_seed(21)
    hidden0 = torch.randn(n, hdim)
    weight0 = torch.randn(vocab, hdim) * hdim**-0.5 * 2.0
    labels = random_labels(n, vocab, pattern)
    loss, ref, got, want, (h, w) = _run_ce(hidden0, weight0, labels, dtype, chunk_size=chunk)
    assert_close(loss, ref, dtype, "ce.loss", reduction=True)
    assert_close(loss, direct_cross_entropy(h.detach(), w.detach(), labels), dtype, "ce.loss_vs_F", reduction=True)
    assert_close(got[0], want[0], dtype, "ce.dhidden", reduction=True)
    assert_close(got[1], want[1], dtype, "ce.dweight", reduction=True)
    # Ignored tokens get exactly zero gradient.
    ignored = labels == IGNORE
    if ignored.any():
        assert torch.count_nonzero(got[0][ignored]) == 0


CE_OPTIONS = [
    pytest.param({"softcap": 30.0}, id="softcap30"),
    pytest.param({"reduction": "sum"}, id="sum"),
    pytest.param({"num_items_in_batch": 37}, id="num_items37"),
    pytest.param({"num_items_in_batch": torch.tensor(11)}, id="num_items_tensor"),
    pytest.param({"softcap": 30.0, "reduction": "sum", "num_items_in_batch": 5}, id="softcap_sum_num_items_ignored"),
    pytest.param({"ignore_index": 3}, id="ignore_index3"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [1, 7, None], ids=["chunk1", "chunk7", "chunkNone"])
@pytest.mark.parametrize("options", CE_OPTIONS)
def test_cross_entropy_options(options, chunk, dtype):
    torch.manual_seed(22)
    n, hdim, vocab = 19, 80, 1009
    hidden0 = torch.randn(n, hdim) * 3.0  # large logits so that softcap 30 actually bends them
    weight0 = torch.randn(vocab, hdim) * hdim**-0.5 * 4.0
    labels = random_labels(n, vocab, "middle")
    kwargs = dict(options)
    if "ignore_index" in kwargs:
        labels = torch.where(labels == IGNORE, torch.tensor(kwargs["ignore_index"]), labels)
        labels[labels.eq(kwargs["ignore_index"]).nonzero()[0]] = 3  # ensure 3 (the ignore id) appears
    loss, ref, got, want, (h, w) = _run_ce(hidden0, weight0, labels, dtype, chunk_size=chunk, grad_scale=2.5, **kwargs)
    direct = direct_cross_entropy(
        h.detach(),
        w.detach(),
        labels,
        reduction=kwargs.get("reduction", "mean"),
        softcap=kwargs.get("softcap"),
        num_items=kwargs.get("num_items_in_batch"),
        ignore_index=kwargs.get("ignore_index", IGNORE),
    )
    assert_close(loss, ref, dtype, "ce.loss", reduction=True)
    assert_close(loss, direct, dtype, "ce.loss_vs_F", reduction=True)
    assert_close(got[0], want[0], dtype, "ce.dhidden", reduction=True)
    assert_close(got[1], want[1], dtype, "ce.dweight", reduction=True)
    if "softcap" in kwargs:
        raw = (h.detach() @ w.detach().T).float().abs().max()
        assert raw > 30.0, "test data should exceed the softcap"


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_frozen_weight_returns_no_weight_grad(dtype):
    torch.manual_seed(23)
    hidden0, weight0 = torch.randn(7, 80), torch.randn(1009, 80) * 0.2
    labels = random_labels(7, 1009, "ends")
    loss, ref, got, want, (h, w) = _run_ce(hidden0, weight0, labels, dtype, w_grad=False, chunk_size=3)
    assert_close(loss, ref, dtype, "ce.loss", reduction=True)
    assert_close(got[0], want[0], dtype, "ce.dhidden", reduction=True)
    # The Function's backward itself returns None for the frozen weight.
    h2, w2 = leaf(hidden0.to(dtype)), leaf(weight0.to(dtype), False)
    loss2 = fused_linear_cross_entropy(h2, w2, labels, chunk_size=3)
    # No [V, H] fp32 gradient buffer is kept for a frozen weight.
    assert loss2.grad_fn.saved_tensors[1] is None
    returned = loss2.grad_fn.apply(torch.tensor(1.0))
    assert returned[0] is not None and returned[1] is None
    assert all(r is None for r in returned[2:])
    loss2.backward()
    assert w2.grad is None and h2.grad is not None


def test_cross_entropy_frozen_hidden_weight_grad_only():
    torch.manual_seed(24)
    hidden0, weight0 = torch.randn(7, 80), torch.randn(1009, 80) * 0.2
    labels = random_labels(7, 1009, "middle")
    w, wr = leaf(weight0), leaf(weight0)
    loss = fused_linear_cross_entropy(hidden0, w, labels, chunk_size=2)
    ref = cross_entropy_reference(hidden0, wr, labels)
    assert_close(loss, ref, torch.float32, "ce.loss")
    returned = loss.grad_fn.apply(torch.tensor(1.0))
    assert returned[0] is None and returned[1] is not None
    (dw,), (dwr,) = grads(loss, [w], torch.tensor(1.0)), grads(ref, [wr], torch.tensor(1.0))
    assert_close(dw, dwr, torch.float32, "ce.dweight")


def test_cross_entropy_all_ignored():
    torch.manual_seed(25)
    hidden0, weight0 = torch.randn(4, 80), torch.randn(1009, 80) * 0.2
    labels = torch.full((4,), IGNORE)
    # With num_items_in_batch (gradient accumulation: this micro-batch has no targets): zero loss and grads.
    h, w = leaf(hidden0), leaf(weight0)
    loss = fused_linear_cross_entropy(h, w, labels, num_items_in_batch=9, chunk_size=3)
    assert loss.item() == 0.0
    dh, dw = grads(loss, [h, w], torch.tensor(1.0))
    assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0
    # Plain mean over zero tokens: 0/0 like the reference and F.cross_entropy.
    loss = fused_linear_cross_entropy(leaf(hidden0), leaf(weight0), labels)
    ref = cross_entropy_reference(hidden0, weight0, labels)
    assert torch.isnan(ref) and torch.isnan(loss)
    # reduction="sum": exactly 0.
    assert fused_linear_cross_entropy(hidden0, weight0, labels, reduction="sum").item() == 0.0


def test_cross_entropy_chunking_invariance_and_default_chunk():
    torch.manual_seed(26)
    hidden0, weight0 = torch.randn(31, 80), torch.randn(1009, 80) * 0.3
    labels = random_labels(31, 1009, "scattered")
    results = []
    for chunk in (1, 4, 7, 31, 1000, None):
        h, w = leaf(hidden0), leaf(weight0)
        loss = fused_linear_cross_entropy(h, w, labels, chunk_size=chunk)
        results.append((loss, *grads(loss, [h, w], torch.tensor(1.0))))
    for loss, dh, dw in results[1:]:
        assert_close(loss, results[0][0], torch.float32, "ce.loss")
        assert_close(dh, results[0][1], torch.float32, "ce.dhidden")
        assert_close(dw, results[0][2], torch.float32, "ce.dweight")
    assert default_chunk_size(31, 1009) == 31
    assert default_chunk_size(10**6, 49152) == (1 << 24) // 49152
    assert default_chunk_size(5, 10**9) == 1


def test_cross_entropy_never_keeps_full_logits():
    """Saved for backward: the [N, H] and [V, H] gradients only, never [N, V] logits."""
    torch.manual_seed(27)
    n, hdim, vocab = 64, 80, 1009
    h, w = leaf(torch.randn(n, hdim)), leaf(torch.randn(vocab, hdim) * 0.2)
    labels = random_labels(n, vocab, "none")
    with record_saved() as saved:
        fused_linear_cross_entropy(h, w, labels, chunk_size=8)
    shapes = [shape for shape, _, _ in saved]
    assert sorted(shapes) == sorted([(n, hdim), (vocab, hdim)]), shapes


def test_cross_entropy_no_grad_forward():
    torch.manual_seed(28)
    hidden0, weight0 = torch.randn(5, 80), torch.randn(1009, 80) * 0.2
    labels = random_labels(5, 1009, "ends")
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden0, weight0, labels, chunk_size=2)
    assert_close(loss, cross_entropy_reference(hidden0, weight0, labels), torch.float32, "ce.loss")
    assert loss.grad_fn is None


class _OpLog(TorchDispatchMode):
    """Records the aten ops that run inside the block."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _matmuls(ops: list[str]) -> int:
    return sum(op.split(".")[0] in ("mm", "addmm", "addmm_", "matmul", "bmm") for op in ops)


def test_cross_entropy_forward_only_when_nothing_needs_grad():
    """Nothing requires grad: one logits matmul per chunk, no gradient work."""
    n, hdim, vocab, chunk = 10, 16, 37, 4
    with _OpLog() as log:
        fused_linear_cross_entropy(torch.randn(n, hdim), torch.randn(vocab, hdim), torch.arange(n), chunk_size=chunk)
    assert _matmuls(log.ops) == math.ceil(n / chunk)


@pytest.mark.parametrize("requires", [(False, True), (True, False)], ids=["weight_trainable", "hidden_requires_grad"])
def test_cross_entropy_no_gradient_work_under_no_grad(requires):
    """Under no_grad (evaluation) no gradient buffers or matmuls, even if lm_head is trainable."""
    n, hdim, vocab, chunk = 10, 16, 37, 4
    hidden = torch.randn(n, hdim).requires_grad_(requires[0])
    weight = torch.randn(vocab, hdim).requires_grad_(requires[1])
    with torch.no_grad(), _OpLog() as log:
        loss = fused_linear_cross_entropy(hidden, weight, torch.arange(n), chunk_size=chunk)
    assert loss.grad_fn is None
    matmuls = _matmuls(log.ops)
    assert matmuls == math.ceil(n / chunk), f"{matmuls} matmuls under no_grad for {math.ceil(n / chunk)} chunks"


def test_lora_linear_refuses_trainable_base():
    x = torch.randn(3, 8)
    with pytest.raises(ConfigurationError, match="frozen"):
        lora_linear(x, torch.randn(5, 8, requires_grad=True))
    with pytest.raises(ConfigurationError, match="frozen"):
        lora_linear(x, torch.randn(5, 8), torch.zeros(5, requires_grad=True))


def test_cross_entropy_invalid_reduction():
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(torch.randn(2, 8), torch.randn(11, 8), torch.tensor([1, 2]), reduction="none")


def test_cross_entropy_function_is_what_runs():
    h = leaf(torch.randn(2, 8))
    loss = fused_linear_cross_entropy(h, torch.randn(11, 8), torch.tensor([1, 2]))
    assert loss.grad_fn._forward_cls is FusedLinearCrossEntropyFunction
