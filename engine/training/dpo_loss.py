"""DPO losses and metrics, defined as in TRL 1.16's ``DPOTrainer``.

Notation, for a batch of ``b`` preference pairs (prompt ``x``, chosen ``y_w``, rejected ``y_l``):

* ``log π(y|x)`` is the **sum** of the log-probabilities of the completion tokens (policy ``π_θ``,
  reference ``π_ref``); see :func:`engine.training.preference_data.sequence_log_probs`.
* log-ratios ``r_w = log π_θ(y_w|x) - log π_ref(y_w|x)`` and ``r_l = log π_θ(y_l|x) - log π_ref(y_l|x)``;
  ``Δ = r_w - r_l``.
* implicit rewards (every loss type, what TRL logs): ``β r_w`` (chosen) and ``β r_l`` (rejected).

Losses (per pair; the training loss is their mean over the batch):

``sigmoid`` (DPO, Rafailov et al. 2023), with conservative label smoothing ``ε`` (cDPO)::

    L = -(1 - ε) log σ(β Δ) - ε log σ(-β Δ)

  With ``ε = 0`` (the default) this is TRL 1.16's ``sigmoid`` loss exactly. TRL 1.16 ignores
  ``label_smoothing`` for ``sigmoid`` (it only reads it for ``robust``/``exo_pair``); earlier TRL
  versions used the cDPO formula above, which we keep so that ``label_smoothing`` is never silently
  ignored.

``robust`` (rDPO, Chowdhury et al. 2024; TRL's ``robust``): an unbiased estimate under a label
flip probability ``ε < 1/2``::

    L = ( -(1 - ε) log σ(β Δ) + ε log σ(-β Δ) ) / (1 - 2ε)

``ipo`` (Azar et al. 2023, eq. 17), with TRL's length normalisation: each log-ratio is divided by
the number of completion tokens ``n`` of its sequence (clamped to at least 1), and ``β`` plays the
role of the paper's ``τ``::

    Δ̄ = r_w / n_w - r_l / n_l ,    L = (Δ̄ - 1 / (2β))²

  (The rewards reported for ``ipo`` are still ``β r`` with the *summed* log-ratios, as in TRL.)

``hinge`` (SLiC, Zhao et al. 2023)::

    L = max(0, 1 - β Δ)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.errors import ConfigurationError

__all__ = ["DPO_LOSS_TYPES", "dpo_loss", "dpo_metrics"]

#: Loss types :func:`dpo_loss` implements (TRL's names).
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
_SMOOTHED = ("sigmoid", "robust")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and implicit rewards (see the module docstring for the formulas).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[b]`` summed completion log-probs under the policy
            (carry the gradient).
        ref_chosen_logps, ref_rejected_logps: ``[b]`` the same under the reference (no gradient needed).
        beta (float): ``β > 0``, the strength of the pull towards the reference (IPO: ``τ``).
        loss_type (str): one of :data:`DPO_LOSS_TYPES`.
        label_smoothing (float): ``ε`` in ``[0, 0.5)``; only for ``sigmoid`` (cDPO) and ``robust``.
        chosen_lengths, rejected_lengths: ``[b]`` number of completion tokens per sequence; required by
            ``ipo`` (the ``extra`` dict of :func:`~engine.training.preference_data.sequence_log_probs` has them).

    Returns:
        ``(losses [b], chosen_rewards [b], rejected_rewards [b])``: float32; the rewards ``β r`` are detached.
        The training loss is ``losses.mean()``.

    Raises:
        ConfigurationError: unknown ``loss_type``, ``beta <= 0``, ``label_smoothing`` out of range or given to a
            loss that does not use it, or ``ipo`` without the lengths.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ConfigurationError(f"unknown DPO loss_type {loss_type!r}; supported loss types are {DPO_LOSS_TYPES}")
    if not beta > 0:
        raise ConfigurationError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigurationError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in _SMOOTHED:
        raise ConfigurationError(
            f"label_smoothing={label_smoothing} has no effect on the {loss_type!r} loss; "
            f"set label_smoothing=0 or use one of {_SMOOTHED}"
        )
    shapes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1 or policy_chosen_logps.dim() != 1:
        raise ConfigurationError(f"the four log-prob tensors must all have shape [b], got {sorted(map(tuple, shapes))}")

    chosen_logratios = policy_chosen_logps.float() - ref_chosen_logps.float().to(policy_chosen_logps.device)
    rejected_logratios = policy_rejected_logps.float() - ref_rejected_logps.float().to(policy_rejected_logps.device)
    delta = chosen_logratios - rejected_logratios

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
        if label_smoothing:
            losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        clean = -(1.0 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1.0 - 2.0 * label_smoothing)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ConfigurationError(
                "the 'ipo' loss normalises the log-ratios by the completion lengths: pass chosen_lengths and "
                "rejected_lengths (the 'chosen_lengths'/'rejected_lengths' of sequence_log_probs' extra dict)"
            )
        n_w = chosen_lengths.to(delta.device, torch.float32).clamp(min=1.0)
        n_l = rejected_lengths.to(delta.device, torch.float32).clamp(min=1.0)
        ipo_delta = chosen_logratios / n_w - rejected_logratios / n_l
        losses = (ipo_delta - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1.0 - beta * delta)

    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
) -> dict[str, float]:
    """Batch means under TRL's metric names.

    Args:
        chosen_rewards, rejected_rewards: ``[b]`` from :func:`dpo_loss`.
        policy_chosen_logps, policy_rejected_logps: ``[b]`` summed completion log-probs under the policy.

    Returns:
        ``{"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
        "logps/rejected"}`` as Python floats; ``rewards/accuracies`` is the fraction of pairs whose chosen
        reward is strictly larger than the rejected one.
    """
    chosen_rewards = chosen_rewards.detach().float()
    rejected_rewards = rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "logps/chosen": policy_chosen_logps.detach().float().mean().item(),
        "logps/rejected": policy_rejected_logps.detach().float().mean().item(),
    }
