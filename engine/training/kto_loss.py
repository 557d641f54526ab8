"""KTO losses and metrics, defined as in TRL 1.16's ``KTOTrainer``.

For a batch of ``n`` unpaired examples ``(x_i, y_i, label_i)`` (``label = True``: desirable), with summed
completion log-probs under the policy and the reference (see
:func:`engine.training.preference_data.completion_log_prob_sums`):

* log-ratio ``r_i = log π_θ(y_i|x_i) - log π_ref(y_i|x_i)``; reward ``β r_i`` (what TRL logs).
* KL estimate ``z = max(0, mean_i [log π_θ(y'_i|x_i) - log π_ref(y'_i|x_i)])`` over the mismatched pairs
  ``(x_i, y'_i)`` (another row's completion, :func:`engine.training.kto_data.add_kl_completions`); ``z`` carries
  no gradient.

Losses (``loss_type``):

``kto`` (Ethayarajh et al. 2024, eq. 7)::

    desirable:    λ_D (1 - σ(β (r - z)))
    undesirable:  λ_U (1 - σ(β (z - r)))

``apo_zero_unpaired`` (D'Oosterlinck et al. 2024, unpaired APO-zero; no KL term, ``z`` is not computed)::

    desirable:    λ_D (1 - σ(β r))
    undesirable:  λ_U σ(β r)

The training loss is the mean over the batch's ``n`` per-example losses (``λ_D`` = ``desirable_weight``,
``λ_U`` = ``undesirable_weight``).
"""

from __future__ import annotations

import torch

from engine.errors import ConfigurationError

__all__ = ["KTO_LOSS_TYPES", "kl_estimate", "kto_loss", "kto_metrics"]

#: Loss types :func:`kto_loss` implements (TRL's names; both of TRL 1.16's).
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """``z = max(0, mean(policy - reference))`` over the mismatched pairs, detached (a float32 scalar).

    Args:
        policy_kl_logps, ref_kl_logps: ``[n]`` summed completion log-probs of the KL sequences.
    """
    diff = policy_kl_logps.detach().float() - ref_kl_logps.detach().float().to(policy_kl_logps.device)
    return diff.mean().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor | None,
    *,
    beta: float,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example KTO losses and rewards (see the module docstring for the formulas).

    Args:
        policy_logps: ``[n]`` summed completion log-probs under the policy (carry the gradient).
        ref_logps: ``[n]`` the same under the reference.
        labels: bool ``[n]``, ``True`` for desirable completions.
        kl: the scalar from :func:`kl_estimate` (``loss_type="kto"``), or ``None`` (``apo_zero_unpaired``).
        beta (float): ``β > 0``.
        loss_type (str): one of :data:`KTO_LOSS_TYPES`.
        desirable_weight, undesirable_weight (float): ``λ_D``, ``λ_U`` (positive).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``: float32; ``losses`` ``[n]`` are the weighted desirable
        losses followed by the weighted undesirable ones (the training loss is their mean); the rewards ``β r``
        (detached) of the desirable ``[n_D]`` and undesirable ``[n_U]`` examples, in batch order.

    Raises:
        ConfigurationError: unknown ``loss_type``, ``beta <= 0``, non-positive weights, ``kto`` without ``kl``, or
            shapes that disagree.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ConfigurationError(f"unknown KTO loss_type {loss_type!r}; supported loss types are {KTO_LOSS_TYPES}")
    if not beta > 0:
        raise ConfigurationError(f"beta must be positive, got {beta}")
    if not (desirable_weight > 0 and undesirable_weight > 0):
        raise ConfigurationError(
            f"desirable_weight and undesirable_weight must be positive, got {desirable_weight}, {undesirable_weight}"
        )
    if policy_logps.dim() != 1 or policy_logps.shape != ref_logps.shape or labels.shape != policy_logps.shape:
        raise ConfigurationError(
            f"policy_logps, ref_logps and labels must all have shape [n], got {tuple(policy_logps.shape)}, "
            f"{tuple(ref_logps.shape)}, {tuple(labels.shape)}"
        )
    if loss_type == "kto" and kl is None:
        raise ConfigurationError(
            "the 'kto' loss needs the KL estimate (kl_estimate(...)); only apo_zero_unpaired has none"
        )
    labels = labels.to(policy_logps.device, torch.bool)
    logratios = policy_logps.float() - ref_logps.float().to(policy_logps.device)
    chosen, rejected = logratios[labels], logratios[~labels]
    if loss_type == "kto":
        chosen_losses = 1.0 - torch.sigmoid(beta * (chosen - kl))
        rejected_losses = 1.0 - torch.sigmoid(beta * (kl - rejected))
    else:
        chosen_losses = 1.0 - torch.sigmoid(beta * chosen)
        rejected_losses = torch.sigmoid(beta * rejected)
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses))
    return losses, beta * chosen.detach(), beta * rejected.detach()


def kto_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor | None,
) -> dict[str, float]:
    """One batch's metrics under TRL 1.16's names, as TRL records them.

    Args:
        chosen_rewards, rejected_rewards: from :func:`kto_loss`.
        policy_logps: ``[n]`` summed completion log-probs under the policy; labels: bool ``[n]``.
        kl: the KL estimate, or ``None`` (logged as 0, as TRL does for ``apo_zero_unpaired``).

    Returns:
        ``kl`` always; ``rewards/chosen`` and ``logps/chosen`` (means over the desirable examples) only if the batch
        has one, ``rewards/rejected`` and ``logps/rejected`` likewise, ``rewards/margins`` (their difference) only if
        it has both. The logged value is the mean over the batches that had the key (TRL's averaging).
    """
    labels = labels.to(policy_logps.device, torch.bool)
    logps = policy_logps.detach().float()
    out = {"kl": 0.0 if kl is None else float(kl)}
    if chosen_rewards.numel():
        out["rewards/chosen"] = chosen_rewards.float().nansum().item() / chosen_rewards.numel()
        out["logps/chosen"] = logps[labels].nansum().item() / chosen_rewards.numel()
    if rejected_rewards.numel():
        out["rewards/rejected"] = rejected_rewards.float().nansum().item() / rejected_rewards.numel()
        out["logps/rejected"] = logps[~labels].nansum().item() / rejected_rewards.numel()
    if chosen_rewards.numel() and rejected_rewards.numel():
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out
