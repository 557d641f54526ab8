"""Fused linear token log-probabilities: ``lm_head`` matmul + log-softmax + gather, in chunks of tokens.

For hidden states ``h [N, H]``, the output embedding ``W [V, H]`` and targets ``y [N]``
(``ignore_index`` marks tokens without a target)::

    z     = h @ W.T                   (optionally z = c * tanh(z / c), logit soft-capping)
    z     = z / T                     (optionally, sampling temperature T; GRPO scores tokens as sampled)
    out_i = z_{i, y_i} - logsumexp(z_i)       for y_i != ignore_index
    out_i = 0                                 for y_i == ignore_index

This is what DPO (and other preference / RL losses) need: the per-token log-probability of
the chosen tokens, ``[N]`` fp32, not a reduced loss. Unlike the cross-entropy op, the gradient
depends on an upstream ``g = dL/dout [N]`` that is only known in backward, so it cannot be
computed inside the forward. Instead:

* only tokens with a target are computed (prompt tokens and padding cost nothing; their output and
  gradient are 0);
* forward runs over chunks of those tokens, building one ``[chunk, V]`` fp32 block of logits at a
  time, and saves only ``h``, ``W``, ``y``, the indices of the tokens with a target and their
  ``lse_i = logsumexp(z_i)`` (1 fp32 each);
* backward recomputes each chunk's logits and, with ``p = softmax(z) = exp(z - lse)``::

      dz   = g_i * (onehot(y_i) - p_i)        (zero rows for ignored tokens)
      dz  *= 1 - tanh(z_raw / c)^2            (only with soft-capping: d(c tanh(u/c))/du)
      dh   = dz @ W                           [chunk, H], in h's dtype
      dW  += dz.T @ h                         [V, H], fp32 accumulator, only when W requires grad

So neither pass ever holds the full ``[N, V]`` logits. With a temperature ``T`` the chunk's logits are
divided by ``T`` before the softmax and ``dz`` is multiplied by ``1 / T`` before the soft-cap factor.

:func:`linear_token_entropy` (no gradient) gives the entropy ``H_i = -Σ_v p_iv log p_iv`` of the same
distribution per token, in the same ``[chunk, V]`` blocks. As in :mod:`engine_kernels.cross_entropy`, the
logits are ``(h @ W.T).float()`` (the matmul runs in the input dtype, with the fp32 accumulation
of the matmul kernels, then is upcast) and ``dz`` is cast to ``h``'s dtype before the two matmuls.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from engine_kernels.cross_entropy import default_chunk_size
from engine_kernels.dispatch import select_backend


def token_log_probs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Unfused reference: materialise all ``[N, V]`` logits, ``log_softmax`` and gather.

    Returns:
        float32 ``[N]``: ``log softmax(h @ W.T)[target]``, 0 where ``target == ignore_index``.
    """
    logits = (hidden @ weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    valid = targets != ignore_index
    safe = targets.masked_fill(~valid, 0)
    out = torch.log_softmax(logits, dim=-1).gather(-1, safe[:, None]).squeeze(-1)
    return out.masked_fill(~valid, 0.0)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, softcap: float | None, temperature: float = 1.0):
    """fp32 logits ``[chunk, V]`` of one chunk (divided by ``temperature``) and, with soft-capping,
    ``tanh(z_raw / c)`` (else ``None``)."""
    z = (h @ weight.t()).float()
    t = None
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = softcap * t
    if temperature != 1.0:
        z = z / temperature
    return z, t


class LinearTokenLogProbsFunction(torch.autograd.Function):
    """Autograd Function for the chunked token log-probabilities; see the module docstring.

    ``forward(hidden [N, H], weight [V, H], targets [N], ignore_index, softcap, chunk_size, temperature=1.0)
    -> [N] fp32``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, softcap, chunk_size, temperature=1.0):
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        chunk = chunk_size or default_chunk_size(n_tokens, vocab)
        out = torch.zeros(n_tokens, dtype=torch.float32, device=hidden.device)
        # Only tokens with a target cost anything (DPO prompts, padding): ignored rows stay 0.
        rows = (targets != ignore_index).nonzero().squeeze(1)
        lse = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows.numel(), chunk):
            part = rows[start : start + chunk]
            y = targets.index_select(0, part)
            z, _ = _chunk_logits(hidden.index_select(0, part), weight, softcap, temperature)
            lse_c = torch.logsumexp(z, dim=-1)
            out.index_copy_(0, part, z.gather(1, y[:, None]).squeeze(1) - lse_c)
            lse[start : start + chunk] = lse_c
        ctx.save_for_backward(hidden, weight, targets, rows, lse)
        ctx.softcap, ctx.chunk, ctx.temperature = softcap, chunk, temperature
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, targets, rows, lse = ctx.saved_tensors
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_dh or want_dw):
            return None, None, None, None, None, None, None
        grad_out = grad_out.float()
        if ctx.temperature != 1.0:
            grad_out = grad_out / ctx.temperature  # d(z / T) / dz
        grad_hidden = torch.zeros_like(hidden) if want_dh else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
        for start in range(0, rows.numel(), ctx.chunk):
            part = rows[start : start + ctx.chunk]
            h, y = hidden.index_select(0, part), targets.index_select(0, part)
            z, t = _chunk_logits(h, weight, ctx.softcap, ctx.temperature)
            dz = z.sub_(lse[start : start + ctx.chunk, None]).exp_().neg_()  # -softmax, in place of the logits
            dz[torch.arange(part.numel(), device=dz.device), y] += 1.0
            dz.mul_(grad_out.index_select(0, part)[:, None])
            if t is not None:
                dz.mul_(1.0 - t * t)
            dz = dz.to(hidden.dtype)
            if want_dh:
                grad_hidden.index_copy_(0, part, dz @ weight)
            if want_dw:
                grad_weight.addmm_(dz.t().float(), h.float())
        dw = grad_weight.to(weight.dtype) if want_dw else None
        return grad_hidden, dw, None, None, None, None, None


def linear_token_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    softcap: float | None = None,
    *,
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probability of each target token under ``softmax(hidden @ weight.T)``, without all logits.

    Args:
        hidden (Tensor): ``[N, H]`` final hidden states (already normed).
        weight (Tensor): ``[V, H]`` output embedding (``lm_head.weight``); usually frozen.
        targets (Tensor): int64 ``[N]``, already shifted; ``ignore_index`` entries get 0.
        ignore_index (int): target value meaning "no log-prob wanted here".
        softcap (float, optional): logit soft-capping value ``c`` (``z = c * tanh(z / c)``).
        chunk_size (int, optional): tokens per chunk; default from
            :func:`engine_kernels.cross_entropy.default_chunk_size`.
        temperature (float): divide the (soft-capped) logits by this before the softmax (default 1).

    Returns:
        float32 ``[N]``.

    Raises:
        ValueError: if the shapes do not fit together or ``temperature`` is not positive.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape [{hidden.shape[0]}], got {tuple(targets.shape)}")
    impl = _IMPLEMENTATIONS[select_backend("token_log_probs", hidden.device)]
    return impl(hidden, weight, targets, ignore_index, softcap, chunk_size, float(temperature))


@torch.no_grad()
def linear_token_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    softcap: float | None = None,
    temperature: float = 1.0,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Entropy of ``softmax(z / T)`` per token, ``z = hidden @ weight.T`` (soft-capped), without all logits.

    ``H_i = logsumexp(z_i) - Σ_v p_iv z_iv`` with ``p = softmax(z_i)``, computed over chunks of tokens: one fp32
    ``[chunk, V]`` block at a time (``chunk`` from :func:`engine_kernels.cross_entropy.default_chunk_size`). No gradient
    (a metric).

    Args:
        hidden (Tensor): ``[N, H]``; weight (Tensor): ``[V, H]``; softcap, temperature: as in
            :func:`linear_token_log_probs`.

    Returns:
        float32 ``[N]``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    n_tokens = hidden.shape[0]
    chunk = chunk_size or default_chunk_size(n_tokens, weight.shape[0])
    out = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
    for start in range(0, n_tokens, chunk):
        z, _ = _chunk_logits(hidden[start : start + chunk], weight, softcap, temperature)
        log_p = torch.log_softmax(z, dim=-1)
        out[start : start + chunk] = -(log_p.exp() * log_p).sum(dim=-1)
    return out


_IMPLEMENTATIONS = {"torch": LinearTokenLogProbsFunction.apply}
