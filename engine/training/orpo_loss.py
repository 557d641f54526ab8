"""ORPO loss and metrics, defined as in TRL 1.16's ``trl.experimental.orpo.ORPOTrainer``.

ORPO (Hong et al. 2024) needs no reference model. For a batch of ``b`` pairs (prompt ``x``, chosen ``y_w``,
rejected ``y_l``):

* ``ℓ(y|x)`` is the **mean** log-probability of the completion's tokens (each with its context), so
  ``exp ℓ ∈ (0, 1]``; the odds are ``odds(y|x) = exp ℓ / (1 - exp ℓ)``.
* log odds ratio ``L = log odds(y_w|x) - log odds(y_l|x) = (ℓ_w - ℓ_l) - (log(1 - e^{ℓ_w}) - log(1 - e^{ℓ_l}))``
  (``log(1 - e^ℓ)`` computed stably, :func:`log1mexp`).
* NLL ``= -`` mean log-probability of **every token of the chosen sequences after the first** (prompt included,
  as TRL: one mean over all those tokens of the batch, not a mean of per-sequence means).

Loss, with ``β`` (TRL's name for the paper's ``λ``)::

    loss = NLL - β · mean_i log σ(L_i)

Metrics (TRL's names): rewards ``β ℓ_w``/``β ℓ_l`` (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``), ``logps/chosen``/``logps/rejected`` (the mean ``ℓ``), ``nll_loss``,
``log_odds_ratio`` (``mean log σ(L)``) and ``log_odds_chosen`` (``mean L``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.errors import ConfigurationError

__all__ = ["log1mexp", "orpo_loss"]

_MINUS_LN2 = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stably: ``log1p(-e^x)`` below ``-ln 2``, else ``log(-expm1(x))``."""
    return torch.where(x < _MINUS_LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    nll: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The ORPO loss of a batch and its metrics (see the module docstring).

    Args:
        chosen_mean_logps, rejected_mean_logps: ``[b]`` mean completion-token log-probs ``ℓ`` (carry the gradient).
        nll: scalar, the chosen sequences' mean negative log-likelihood over all their tokens after the first.
        beta (float): ``β > 0``, the weight of the odds-ratio term.

    Returns:
        ``(loss, metrics)``: the float32 scalar training loss, and the batch's metrics as Python floats.

    Raises:
        ConfigurationError: ``beta <= 0`` or shapes that disagree.
    """
    if not beta > 0:
        raise ConfigurationError(f"beta must be positive, got {beta}")
    if chosen_mean_logps.dim() != 1 or chosen_mean_logps.shape != rejected_mean_logps.shape:
        raise ConfigurationError(
            f"chosen and rejected log-probs must both have shape [b], got {tuple(chosen_mean_logps.shape)} and "
            f"{tuple(rejected_mean_logps.shape)}"
        )
    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    loss = nll.float() - (beta * ratio).mean()
    chosen_rewards, rejected_rewards = beta * chosen.detach(), beta * rejected.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/rejected": rejected.detach().mean().item(),
        "logps/chosen": chosen.detach().mean().item(),
        "nll_loss": nll.detach().float().item(),
        "log_odds_ratio": ratio.detach().mean().item(),
        "log_odds_chosen": log_odds.detach().mean().item(),
    }
    return loss, metrics
