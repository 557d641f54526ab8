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
"""

from __future__ import annotations

import torch

from kernels.dispatch import select_backend

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


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd Function for the chunked loss; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, softcap, num_items_in_batch, chunk_size, grad_enabled):
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        chunk = chunk_size or default_chunk_size(n_tokens, vocab)
        denom = _denominator(labels, ignore_index, reduction, num_items_in_batch)
        # Grad mode is always off inside forward: whether a backward can follow is decided by the caller.
        want_dh = grad_enabled and ctx.needs_input_grad[0]
        want_dw = grad_enabled and ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if want_dh else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # Only tokens with a target cost anything: prompt tokens (completion-only loss), padding and
        # document starts are skipped, and their gradient stays zero.
        rows_with_target = (labels != ignore_index).nonzero().squeeze(1)
        for start in range(0, rows_with_target.numel(), chunk):
            rows = rows_with_target[start : start + chunk]
            h = hidden.index_select(0, rows)
            y = labels.index_select(0, rows)
            z = (h @ weight.t()).float()
            if softcap is not None:
                t = torch.tanh(z / softcap)
                z = softcap * t
            target = z.gather(1, y[:, None]).squeeze(1)
            # logsumexp by hand, in place: one [chunk, V] buffer, which then holds the softmax.
            z_max = z.amax(dim=-1, keepdim=True)
            z.sub_(z_max).exp_()
            z_sum = z.sum(dim=-1, keepdim=True)
            lse = (z_max + z_sum.log()).squeeze(1)
            loss += (lse - target).sum()
            if want_dh or want_dw:
                dz = z.div_(z_sum)  # softmax
                dz[torch.arange(len(y), device=dz.device), y] -= 1.0
                dz.div_(denom)
                if softcap is not None:
                    dz.mul_(1.0 - t * t)
                dz = dz.to(hidden.dtype)
                if want_dh:
                    grad_hidden.index_copy_(0, rows, dz @ weight)
                if want_dw:
                    grad_weight.addmm_(dz.t().float(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss / denom

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        dh = dw = None
        if ctx.needs_input_grad[0]:
            dh = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if ctx.needs_input_grad[1]:
            dw = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None, None, None, None


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


_IMPLEMENTATIONS = {"torch": FusedLinearCrossEntropyFunction.apply}
