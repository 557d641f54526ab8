"""GRPO math: group advantages, the clipped surrogate loss with its normalisations, and the logged ratios.

Equal to TRL 1.16's ``GRPOTrainer`` (tested to 1e-5 in fp32 in ``tests/training/test_grpo_parity.py``).

**Advantages** (:func:`group_advantages`). ``N = P x G`` completions, ``G = num_generations`` per prompt,
``r_ij`` the reward of function ``j`` (NaN = not applicable), weights ``w_j``::

    r_i   = Σ_j w_j r_ij        (NaNs skipped; NaN when every function gave None: "unscorable")
    A_i   = r_i - mean_group(r)                               (nan-mean over the G completions of i's prompt)
    A_i  /= std_group(r) + 1e-4     scale_rewards="group"     (nan-std, Bessel-corrected)
    A_i  /= std_batch(r) + 1e-4     scale_rewards="batch"     (over all N)
                                    scale_rewards="none": no division
    A_i   = 0 where A_i is NaN (unscorable completions)

**Loss** (:func:`grpo_loss`), per completion token ``t`` of completion ``i`` (``m_it`` = 1 on scored tokens)::

    ρ_it   = exp(log π(t) - log π_old(t))        (π_old = π detached unless num_iterations > 1: ρ = 1, grad ≠ 0)
    ℓ_it   = -min(ρ_it A_i, clip(ρ_it, 1 - ε_low, 1 + ε_high) A_i)
    KL_it  = exp(log π_ref - log π) - (log π_ref - log π) - 1          (k3 estimator, β > 0 only)
    KL_it *= ρ_it                                                      (use_bias_correction_kl, TRL's default)
    ℓ_it  += β KL_it

aggregated over one micro-batch of ``B`` completions (``S`` = gradient accumulation steps in this optimizer step;
the returned loss is already divided for accumulation, so the Trainer must not divide again)::

    grpo    : mean_i( Σ_t m ℓ / max(Σ_t m, 1) ) / S
    bnpo    : Σ_it m ℓ / max(Σ_it m, 1) / S                            (tokens of this micro-batch)
    dr_grpo : Σ_it m ℓ / (B · max_completion_length) / S
    dapo    : Σ_it m ℓ / (max(M_gen, 1) · S / steps_per_generation)    (M_gen = scored tokens of the whole
                                                                        generation batch: over the S micro-batches
                                                                        of a step this is Σ m ℓ / tokens of the step)

**Clip ratios** (logged): ``low = ρ < 1 - ε_low and A < 0``, ``high = ρ > 1 + ε_high and A > 0``,
``region = low or high``; ``*_mean`` are token means over ``m``, ``low_min`` / ``high_max`` the min / max of the
per-completion means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import ConfigurationError

__all__ = ["GRPOLossOutput", "clip_metrics", "group_advantages", "grpo_loss", "masked_mean", "nanstd"]


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaNs (NaN where fewer than 2 values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    std = torch.sqrt(var * correction)
    return std.squeeze() if dim is None else std.squeeze(dim)


def group_advantages(
    rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int, scale_rewards: str
) -> dict[str, torch.Tensor]:
    """Advantages of ``N`` completions in groups of ``num_generations`` (see the module docstring).

    Args:
        rewards_per_func: float32 ``[N, F]``, NaN where a function returned ``None``.
        weights: float32 ``[F]``.
        num_generations: ``G``; ``N`` must be a multiple.
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"``.

    Returns:
        ``advantages [N]``, ``rewards [N]`` (weighted sums, NaN when unscorable), ``std [N]`` (the std used or, for
        ``"none"``, the group std) and ``is_std_zero [N]`` (bool).
    """
    n = rewards_per_func.shape[0]
    if n % num_generations:
        raise ConfigurationError(f"{n} completions do not form groups of num_generations={num_generations}")
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.to(rewards_per_func.device)[None]).nansum(dim=1)
    rewards[unscorable] = torch.nan
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards in ("group", "none"):
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    elif scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if n > 1 else torch.zeros_like(rewards)
    else:
        raise ConfigurationError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return {
        "advantages": torch.nan_to_num(advantages, nan=0.0),
        "rewards": rewards,
        "std": std,
        "is_std_zero": torch.isclose(std, torch.zeros_like(std)),
    }


@dataclass
class GRPOLossOutput:
    """What :func:`grpo_loss` returns: the loss to backpropagate and the per-token tensors the metrics need."""

    loss: torch.Tensor  # scalar, already divided for gradient accumulation
    ratio: torch.Tensor  # [B, C] ρ, detached
    per_token_kl: torch.Tensor | None  # [B, C] detached (β > 0)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    max_completion_length: int,
    accumulation_steps: int,
    steps_per_generation: int,
    num_items_in_batch: torch.Tensor | float | None = None,
    use_bias_correction_kl: bool = True,
) -> GRPOLossOutput:
    """The GRPO loss of one micro-batch (see the module docstring for the formulas).

    Args:
        logps: float32 ``[B, C]`` per-token log-probs of the completions under the policy (with grad).
        old_logps: ``[B, C]`` under the policy that sampled them, or ``None`` (= ``logps`` detached).
        ref_logps: ``[B, C]`` under the reference, required when ``beta > 0``.
        advantages: ``[B]``.
        mask: ``[B, C]`` 1 on scored completion tokens.
        loss_type: ``grpo``, ``dr_grpo``, ``dapo`` or ``bnpo``.
        accumulation_steps: ``S``, micro-batches in this optimizer step (1 in evaluation).
        steps_per_generation: micro-batches cut from one generation batch (1 in evaluation).
        num_items_in_batch: ``M_gen`` for ``dapo``: scored tokens of the generation batch.
    """
    mask = mask.to(logps.dtype)
    if old_logps is None:
        old_logps = logps.detach()
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None].to(logps.dtype)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ConfigurationError("beta > 0 needs the reference log-probs (ref_logps)")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl
    summed = (per_token * mask).sum()
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation_steps
    elif loss_type == "bnpo":
        loss = summed / mask.sum().clamp(min=1.0) / accumulation_steps
    elif loss_type == "dr_grpo":
        loss = summed / (per_token.shape[0] * max_completion_length) / accumulation_steps
    elif loss_type == "dapo":
        if num_items_in_batch is None:
            raise ConfigurationError("loss_type='dapo' needs num_items_in_batch (tokens of the generation batch)")
        total = torch.as_tensor(num_items_in_batch, dtype=logps.dtype, device=logps.device).clamp(min=1.0)
        loss = summed / (total * accumulation_steps / steps_per_generation)
    else:
        raise ConfigurationError(f"loss_type must be 'grpo', 'dr_grpo', 'dapo' or 'bnpo', got {loss_type!r}")
    return GRPOLossOutput(loss=loss, ratio=ratio.detach(), per_token_kl=None if kl is None else kl.detach())


def clip_metrics(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float,
                 epsilon_high: float) -> dict[str, float]:
    """TRL's ``clip_ratio/*`` metrics of one micro-batch (see the module docstring)."""
    adv = advantages[:, None]
    mask = mask.float()
    low = ((ratio < 1 - epsilon_low) & (adv < 0)).float()
    high = ((ratio > 1 + epsilon_high) & (adv > 0)).float()
    region = ((low + high) > 0).float()
    count = mask.sum().clamp(min=1.0)
    per_seq = mask.sum(-1)

    def seq_mean(x):
        return (x * mask).sum(-1) / per_seq

    return {
        "clip_ratio/low_mean": float((low * mask).sum() / count),
        "clip_ratio/low_min": float(torch.nan_to_num(seq_mean(low), nan=float("inf")).min().nan_to_num(posinf=float("nan"))),
        "clip_ratio/high_mean": float((high * mask).sum() / count),
        "clip_ratio/high_max": float(torch.nan_to_num(seq_mean(high), nan=float("-inf")).max().nan_to_num(neginf=float("nan"))),
        "clip_ratio/region_mean": float((region * mask).sum() / count),
    }


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Token mean of ``x [B, C]`` over ``mask`` (0 when the mask is empty)."""
    mask = mask.float()
    return float((x * mask).sum() / mask.sum().clamp(min=1.0))
