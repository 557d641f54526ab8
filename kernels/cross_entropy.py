"""Fused linear cross-entropy: ``lm_head`` matmul + log-softmax + NLL over chunks of tokens.

For hidden states ``h [N, H]``, the output embedding ``W [V, H]`` and labels ``y [N]``
(``ignore_index`` marks tokens without a target)::

    z    = h @ W.T                  (optionally z = c * tanh(z / c), logit soft-capping)
    loss = sum_{i: y_i != ignore} (logsumexp(z_i) - z_{i, y_i}) / D

``D`` is the number of non-ignored tokens (``reduction="mean"``), 1 (``"sum"``), or a
given ``num_items_in_batch`` (so that gradient accumulation gives the loss of the
whole batch, as Hugging Face's Trainer does).

The gradient is computed inside the forward chunk loop, which is where the
logits of a chunk exist::

    dz   = (softmax(z) - onehot(y)) / D      (zero rows for ignored tokens)
    dh   = dz @ W                            [chunk, H]
    dW  += dz.T @ h                          [V, H], only when W is trained

Only tokens with a target are computed (prompt tokens of a completion-only loss, padding and
packed-document starts cost nothing), and the log-sum-exp is taken in place, so only one
``[chunk, V]`` fp32 block of logits is alive at a time; the full
``[N, V]`` logits never exist. Backward just scales the stored gradients by the
incoming scalar gradient.

Both implementations share that chunk loop (:func:`_chunked_loss_and_grads`); they differ only in
the *rows kernel* that turns one chunk's logits into per-row losses and, in place, into ``dz``:

* PyTorch (:func:`_torch_rows`): the logits are cast to fp32 (a ``[chunk, V]`` fp32 buffer) and
  reduced by separate elementwise/reduction ops (max, exp, sum, divide, scatter, ...).
* Triton (:func:`_triton_rows`, Liger-Kernel style): the two matmuls stay cuBLAS (``h @ W.T`` in
  the hidden dtype, so bf16 logits stay bf16; ``dz @ W`` and ``dW += dz.T @ h``), and one program
  of ``_ce_rows_kernel`` per row does the softmax part in place in the logits buffer:

  - pass 1 walks the row in blocks of ``BLOCK_V``, keeping an online max and sum of ``exp`` in
    fp32 (of the soft-capped logits when ``softcap`` is set) and writes ``lse - z_y``;
  - pass 2 (only when a gradient is wanted, ``HAS_GRAD``) walks it again and overwrites each
    logit with ``dz = (exp(z - lse) - onehot(y)) / D`` (times ``1 - tanh^2`` under softcap).

  Memory traffic per logit: one read for the max/sum, one read and one write for the gradient
  (3 accesses in the logits dtype, 2 bytes each in bf16), against about a dozen fp32 accesses for
  the PyTorch ops; the only large temporary is the ``[chunk, V]`` logits buffer itself.
"""

from __future__ import annotations

import torch

from engine_kernels._triton import AuditLaunch, dtype_signature, jit, launchable, next_power_of_2, tanh, tl
from engine_kernels.cpu_fusion import cpu_fused
from engine_kernels.dispatch import select_backend

#: Target number of fp32 logits per chunk (64 MiB): big enough for efficient matmuls, small next to a model.
CHUNK_LOGITS = 1 << 24


def default_chunk_size(n_tokens: int, vocab_size: int) -> int:
    """Tokens per chunk so a chunk's fp32 logits stay near :data:`CHUNK_LOGITS` elements."""
    return max(1, min(n_tokens, CHUNK_LOGITS // max(vocab_size, 1)))


def cross_entropy_reference(hidden, weight, labels, ignore_index=-100, reduction="mean", softcap=None, num_items_in_batch=None):
    """Unfused reference: materialise all logits and call ``F.cross_entropy`` (sum), then divide."""
    logits = (hidden @ weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    total = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / _denominator(labels, ignore_index, reduction, num_items_in_batch)


def _denominator(labels, ignore_index, reduction, num_items_in_batch):
    if reduction == "sum":
        return torch.ones((), device=labels.device)
    if num_items_in_batch is not None:
        return torch.as_tensor(num_items_in_batch, device=labels.device, dtype=torch.float32)
    return (labels != ignore_index).sum().float()


@cpu_fused
def _torch_rows(z, labels, denom, softcap, want_grad):
    """PyTorch rows kernel: per-row loss of a chunk's logits, and their gradient.

    Args:
        z (Tensor): ``[rows, V]`` logits ``h @ W.T`` in the hidden dtype.
        labels (Tensor): int64 ``[rows]`` targets (none ignored).
        denom (Tensor): fp32 scalar ``D``.
        softcap (float, optional): logit soft-capping value.
        want_grad (bool): also compute ``dz``.

    Returns:
        ``(loss [rows] fp32, dz [rows, V] in z's dtype or None)``.
    """
    dtype = z.dtype
    z = z.float()
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = softcap * t
    target = z.gather(1, labels[:, None]).squeeze(1)
    # logsumexp by hand, in place: one [chunk, V] buffer, which then holds the softmax.
    z_max = z.amax(dim=-1, keepdim=True)
    z.sub_(z_max).exp_()
    z_sum = z.sum(dim=-1, keepdim=True)
    lse = (z_max + z_sum.log()).squeeze(1)
    if not want_grad:
        return lse - target, None
    dz = z.div_(z_sum)  # softmax
    dz[torch.arange(len(labels), device=dz.device), labels] -= 1.0
    dz.div_(denom)
    if softcap is not None:
        dz.mul_(1.0 - t * t)
    return lse - target, dz.to(dtype)


def _chunked_loss_and_grads(hidden, weight, labels, ignore_index, denom, softcap, chunk, want_dh, want_dw, rows_fn):
    """The shared chunk loop: logits matmul, ``rows_fn``, then the gradient matmuls of each chunk.

    Args:
        hidden (Tensor): ``[N, H]``; weight (Tensor): ``[V, H]``; labels (Tensor): int64 ``[N]``.
        denom (Tensor): fp32 scalar ``D``.
        chunk (int): rows with a target per chunk.
        want_dh, want_dw (bool): which gradients to compute.
        rows_fn: rows kernel ``(z, y, denom, softcap, want_grad) -> (loss [rows] fp32, dz or None)``
            (:func:`_torch_rows` or :func:`_triton_rows`); it may overwrite ``z``.

    Returns:
        ``(loss sum fp32 scalar, grad_hidden [N, H] or None, grad_weight [V, H] fp32 or None)``,
        the gradients already divided by ``D``.
    """
    grad_hidden = torch.zeros_like(hidden) if want_dh else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    want_grad = want_dh or want_dw
    # Only tokens with a target cost anything: prompt tokens (completion-only loss), padding and
    # document starts are skipped, and their gradient stays zero.
    rows_with_target = (labels != ignore_index).nonzero().squeeze(1)
    for start in range(0, rows_with_target.numel(), chunk):
        rows = rows_with_target[start : start + chunk]
        h = hidden.index_select(0, rows)
        y = labels.index_select(0, rows)
        row_loss, dz = rows_fn(h @ weight.t(), y, denom, softcap, want_grad)
        loss += row_loss.sum()
        if want_dh:
            grad_hidden.index_copy_(0, rows, dz @ weight)
        if want_dw:
            grad_weight.addmm_(dz.t().float(), h.float())
    return loss, grad_hidden, grad_weight


def _forward(ctx, rows_fn, hidden, weight, labels, ignore_index, reduction, softcap, num_items_in_batch, chunk_size,
             grad_enabled):
    """Forward of both autograd Functions: the chunk loop with ``rows_fn``; saves the gradients."""
    chunk = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0])
    denom = _denominator(labels, ignore_index, reduction, num_items_in_batch)
    # Grad mode is always off inside forward: whether a backward can follow is decided by the caller.
    want_dh = grad_enabled and ctx.needs_input_grad[0]
    want_dw = grad_enabled and ctx.needs_input_grad[1]
    loss, grad_hidden, grad_weight = _chunked_loss_and_grads(
        hidden, weight, labels, ignore_index, denom, softcap, chunk, want_dh, want_dw, rows_fn
    )
    ctx.save_for_backward(grad_hidden, grad_weight)
    ctx.weight_dtype = weight.dtype
    return loss / denom


def _backward(ctx, grad_loss):
    """Backward of both autograd Functions: scale the stored gradients by the incoming scalar."""
    grad_hidden, grad_weight = ctx.saved_tensors
    dh = dw = None
    if ctx.needs_input_grad[0]:
        dh = grad_hidden * grad_loss.to(grad_hidden.dtype)
    if ctx.needs_input_grad[1]:
        dw = (grad_weight * grad_loss).to(ctx.weight_dtype)
    return dh, dw, None, None, None, None, None, None, None


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd Function for the chunked loss (PyTorch rows kernel); see the module docstring."""

    @staticmethod
    def forward(
        ctx, hidden, weight, labels, ignore_index, reduction, softcap, num_items_in_batch, chunk_size, grad_enabled
    ):
        return _forward(ctx, _torch_rows, hidden, weight, labels, ignore_index, reduction, softcap,
                        num_items_in_batch, chunk_size, grad_enabled)

    @staticmethod
    def backward(ctx, grad_loss):
        return _backward(ctx, grad_loss)


# --------------------------------------------------------------------------- Triton


@jit
def _ce_rows_kernel(
    Z, z_stride, Y, LOSS, DENOM, n_cols, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One row of logits per program: ``LOSS[row] = lse - z_y``; with ``HAS_GRAD``, ``Z[row] <- dz`` in place.

    ``Z`` is ``[rows, n_cols]`` (row stride ``z_stride``, unit column stride), ``Y`` int64 ``[rows]``
    targets (all valid), ``LOSS`` fp32 ``[rows]``, ``DENOM`` a fp32 scalar ``D``.
    """
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * z_stride
    y = tl.load(Y + row)
    # The target logit is read before pass 1: its cross-warp reductions order it before pass 2's stores.
    z_y = tl.load(z_row + y).to(tl.float32)
    if HAS_SOFTCAP:
        z_y = softcap * tanh(z_y / softcap)

    # Pass 1: online max and sum of exp over the row, in fp32.
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * tanh(z / softcap)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    tl.store(LOSS + row, lse - z_y)

    # Pass 2: overwrite the logits with dz = (softmax - onehot(y)) / D (times 1 - tanh^2 under softcap).
    if HAS_GRAD:
        inv_denom = 1.0 / tl.load(DENOM)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = tanh(z / softcap)
                z = softcap * t
            dz = tl.exp(z - lse) - tl.where(cols == y, 1.0, 0.0)
            dz = dz * inv_denom
            if HAS_SOFTCAP:
                dz = dz * (1.0 - t * t)
            tl.store(z_row + cols, dz.to(Z.dtype.element_ty), mask=mask)


#: Largest block of logits a program holds per loop iteration, and logits per warp (8 per thread).
_MAX_BLOCK_V = 8192
_LOGITS_PER_WARP = 256
_MAX_WARPS = 32


def _launch_config(vocab_size: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` of ``_ce_rows_kernel`` for rows of ``vocab_size`` logits of ``dtype``.

    The block is the row rounded up to a power of two, capped at 8192 logits with 8 per thread
    (32 warps): one row per program leaves about one program per multiprocessor (a chunk has
    ~``2**24 / V`` rows), so each program needs many warps to keep enough loads in flight. The
    values are computed in fp32 whatever ``dtype`` stores them, so the register need (at most 46
    per thread, no spills on sm_80..sm_90, checked by :mod:`engine_kernels.audit`) and hence the choice
    do not depend on it; 16384 logits per block spill on sm_86..sm_90.
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"cross-entropy Triton kernel: unsupported logits dtype {dtype}")
    block = min(next_power_of_2(vocab_size), _MAX_BLOCK_V)
    num_warps = max(4, min(_MAX_WARPS, block // _LOGITS_PER_WARP))
    return block, num_warps


def _triton_rows(z, labels, denom, softcap, want_grad):
    """Triton rows kernel: same contract as :func:`_torch_rows`; ``dz`` overwrites ``z`` in place."""
    z = z if z.stride(-1) == 1 else z.contiguous()
    n_rows, vocab = z.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=z.device)
    block, num_warps = _launch_config(vocab, z.dtype)
    if launchable(z):
        _ce_rows_kernel[(n_rows,)](
            z, z.stride(0), labels, loss, denom, vocab, float(softcap) if softcap is not None else 1.0,
            HAS_SOFTCAP=softcap is not None, HAS_GRAD=want_grad, BLOCK_V=block, num_warps=num_warps,
        )
    return loss, (z if want_grad else None)


class FusedLinearCrossEntropyTritonFunction(torch.autograd.Function):
    """The chunked loss with the Triton rows kernel (:func:`_triton_rows`).

    Same arguments, math and saved gradients as :class:`FusedLinearCrossEntropyFunction`.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, labels, ignore_index, reduction, softcap, num_items_in_batch, chunk_size, grad_enabled
    ):
        return _forward(ctx, _triton_rows, hidden, weight, labels, ignore_index, reduction, softcap,
                        num_items_in_batch, chunk_size, grad_enabled)

    @staticmethod
    def backward(ctx, grad_loss):
        return _backward(ctx, grad_loss)


#: Vocabularies the audit compiles: (model, V).
_AUDIT_VOCABS = (("mistral", 32768), ("smollm2", 49152), ("llama-3", 128256), ("qwen2.5", 151936))


def _audit_launch(model: str, vocab: int, dtype: torch.dtype, softcap: bool, grad: bool) -> AuditLaunch:
    block, num_warps = _launch_config(vocab, dtype)
    signature = {"Z": dtype_signature(dtype), "z_stride": "i32", "Y": "*i64", "LOSS": "*fp32", "DENOM": "*fp32",
                 "n_cols": "i32", "softcap": "fp32"}
    constexprs = {"HAS_SOFTCAP": softcap, "HAS_GRAD": grad, "BLOCK_V": block}
    flags = (["softcap"] if softcap else []) + ["grad" if grad else "no-grad"]
    tag = " ".join([str(dtype).removeprefix("torch."), *flags])
    return AuditLaunch("cross_entropy", _ce_rows_kernel, signature, constexprs, num_warps, f"{model} V={vocab} {tag}")


def audit_launches() -> list[AuditLaunch]:
    """The rows kernel for representative vocabularies: bf16 with/without gradient, softcap, one fp32."""
    launches = []
    for model, vocab in _AUDIT_VOCABS:
        launches.append(_audit_launch(model, vocab, torch.bfloat16, softcap=False, grad=True))
        launches.append(_audit_launch(model, vocab, torch.bfloat16, softcap=False, grad=False))
    launches.append(_audit_launch("gemma-2", 256000, torch.bfloat16, softcap=True, grad=True))
    launches.append(_audit_launch("gemma-2", 256000, torch.bfloat16, softcap=True, grad=False))
    launches.append(_audit_launch("llama-3", 128256, torch.bfloat16, softcap=True, grad=True))
    launches.append(_audit_launch("llama-3", 128256, torch.float32, softcap=False, grad=True))
    launches.append(_audit_launch("llama-3", 128256, torch.float32, softcap=True, grad=True))
    launches.append(_audit_launch("small", 1000, torch.bfloat16, softcap=True, grad=True))
    return launches


# --------------------------------------------------------------------------- dispatch


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` without materialising all logits.

    Args:
        hidden (Tensor): ``[N, H]`` final hidden states (already normed).
        weight (Tensor): ``[V, H]`` output embedding (``lm_head.weight``).
        labels (Tensor): int64 ``[N]``, already shifted; ``ignore_index`` entries have no target.
        reduction (str): ``"mean"`` over non-ignored tokens, or ``"sum"``.
        softcap (float, optional): logit soft-capping value.
        num_items_in_batch: if given (and reduction is ``"mean"``), divide by it instead of
            by this call's non-ignored count.
        chunk_size (int, optional): tokens per chunk; default from :func:`default_chunk_size`.

    Returns:
        Scalar fp32 loss.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    impl = _IMPLEMENTATIONS[select_backend("cross_entropy", hidden.device)]
    grad_enabled = torch.is_grad_enabled()
    return impl(hidden, weight, labels, ignore_index, reduction, softcap, num_items_in_batch, chunk_size, grad_enabled)


_IMPLEMENTATIONS = {
    "torch": FusedLinearCrossEntropyFunction.apply,
    "triton": FusedLinearCrossEntropyTritonFunction.apply,
}
