"""Shared helpers of the kernel tests: per-dtype tolerances and a comparison that says where values differ.

Tolerances (as Liger-Kernel states them, one pair per dtype) are applied to the
*scale* of the expected tensor: ``|actual - expected| <= atol * scale + rtol * |expected|``
with ``scale = max(1, max|expected|)``. fp32 runs the same math in a different
order (hand-written backward, chunked loss), so it agrees to about 1e-6 relative;
bf16 differs by a few bf16 rounding steps (8 mantissa bits, eps = 2**-7), fp16 by a few fp16
steps (11 bits, eps = 2**-10). Results of long reductions get both tolerances doubled
(``REDUCTION_FACTOR``).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

# --------------------------------------------------------------------------- tolerances

#: Absolute tolerance per dtype, multiplied by the scale (max |expected|, at least 1) of the compared tensor.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
#: Relative tolerance per dtype.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
#: Both tolerances are multiplied by this for results of long reductions (matmuls over H or V, sums over rows),
#: whose summation order legitimately differs between the fused op and the reference.
REDUCTION_FACTOR = 2.0

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
#: :data:`DTYPES` and fp16, for kernels whose launch differs per 16-bit type.
DTYPES_WITH_FP16 = [*DTYPES, pytest.param(torch.float16, id="fp16")]


def tolerances(dtype: torch.dtype, reduction: bool = False) -> tuple[float, float]:
    """``(atol, rtol)`` for ``dtype``, widened by :data:`REDUCTION_FACTOR` for long reductions."""
    factor = REDUCTION_FACTOR if reduction else 1.0
    return ATOL[dtype] * factor, RTOL[dtype] * factor


def assert_close(actual, expected, dtype: torch.dtype, name: str, *, reduction: bool = False):
    """Compare two tensors with the per-dtype tolerances; on failure report where and by how much.

    The message names the tensor, the number of mismatching elements, the max abs error
    and the index where the tolerance is exceeded the most, with both values there.
    """
    assert actual is not None, f"{name}: got None, expected a tensor"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    atol, rtol = tolerances(dtype, reduction)
    a = actual.detach().float().cpu()
    e = expected.detach().float().cpu()
    finite_e = e[torch.isfinite(e)]
    scale = max(1.0, finite_e.abs().max().item()) if finite_e.numel() else 1.0
    diff = (a - e).abs()
    allowed = atol * scale + rtol * e.abs()
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    inf_mismatch = (torch.isinf(a) | torch.isinf(e)) & (a != e)
    both_special = (torch.isnan(a) & torch.isnan(e)) | (torch.isinf(a) & (a == e))
    excess = torch.where(both_special, torch.zeros_like(diff), diff - allowed)
    bad = (excess > 0) | nan_mismatch | inf_mismatch
    if bad.any():
        excess = torch.where(nan_mismatch | inf_mismatch, torch.full_like(excess, float("inf")), excess)
        flat = int(torch.argmax(excess.reshape(-1)).item())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
        finite = torch.isfinite(diff)
        max_abs = diff[finite].max().item() if finite.any() else float("nan")
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())}/{bad.numel()} elements out of tolerance "
            f"(atol={atol}*scale {scale:.3g}, rtol={rtol}); max abs err {max_abs:.3e}; "
            f"worst at index {idx}: actual {a[idx].item()!r} vs expected {e[idx].item()!r}"
        )


def grads(out, inputs, grad_out):
    """Gradients of ``out`` (with upstream ``grad_out``) w.r.t. ``inputs`` (each must require grad)."""
    return torch.autograd.grad(out, inputs, grad_out)


def leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return t.detach().clone().requires_grad_(requires_grad)


@contextmanager
def record_saved():
    """Record ``(shape, dtype, nbytes)`` of every tensor autograd saves for backward inside the block."""
    saved: list[tuple[tuple[int, ...], torch.dtype, int]] = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Default RoPE inverse frequencies ``[head_dim // 2]``."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


# --------------------------------------------------------------------------- vocabulary-op fixtures

IGNORE = -100


def random_labels(n: int, vocab: int, pattern: str, seed: int = 0) -> torch.Tensor:
    """Random int64 targets ``[n]`` with ``IGNORE`` placed by ``pattern``.

    Patterns: ``none``, ``middle`` (a run in the middle), ``ends`` (first two and last), ``scattered``
    (~30% and the first), ``all_but_one``. The first and last kept targets are 0 and ``vocab - 1`` so the
    edge vocabulary ids are always exercised.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, vocab, (n,), generator=g)
    if pattern == "middle":
        y[n // 3 : n // 3 + max(1, n // 4)] = IGNORE
    elif pattern == "ends":
        y[0] = y[-1] = IGNORE
        if n > 4:
            y[1] = IGNORE
    elif pattern == "scattered":
        y[torch.rand(n, generator=g) < 0.3] = IGNORE
        y[0] = IGNORE
    elif pattern == "all_but_one":
        y[torch.arange(n) != n // 2] = IGNORE
    elif pattern != "none":
        raise AssertionError(f"unknown label pattern {pattern!r}")
    valid = (y != IGNORE).nonzero().flatten()
    if len(valid) >= 2:
        y[valid[0]], y[valid[-1]] = 0, vocab - 1
    return y


def direct_cross_entropy(hidden, weight, labels, reduction="mean", softcap=None, num_items=None, ignore_index=IGNORE):
    """Independent oracle: full logits and ``F.cross_entropy``'s own reductions."""
    logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if num_items is not None and reduction == "mean":
        return torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum") / num_items
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def lora_projection(out_f, in_f, base, dtype, seed, lora=True, bias=False, p=0.0, rank=4):
    """A random :class:`engine_kernels.lora_fused.Projection` (dense or NF4 base, LoRA of ``rank`` with non-zero ``B``)."""
    from engine_kernels.lora_fused import Projection
    from engine_kernels.nf4 import nf4_quantize

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * in_f**-0.5
    b = torch.randn(out_f, generator=g).to(dtype) * 0.1 if bias else None
    a = torch.randn(rank, in_f, generator=g) * in_f**-0.5
    bb = torch.randn(out_f, rank, generator=g) * 0.5  # non-zero so every gradient is exercised
    weight = w.to(dtype) if base == "dense" else nf4_quantize(w.to(dtype), blocksize=64)
    if not lora:
        return Projection(weight, b)
    return Projection(weight, b, leaf(a.to(dtype)), leaf(bb.to(dtype)), scaling=8.0 / rank, dropout_p=p)
