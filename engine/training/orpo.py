"""Odds Ratio Preference Optimization: :class:`ORPOTrainer`.

ORPO (Hong et al. 2024) adds to the chosen sequences' language-modelling loss a term that raises the odds of the
chosen completion over the rejected one; there is **no reference model** (see :mod:`engine.training.orpo_loss`)::

    loss = NLL(chosen) − β · mean log σ(log odds(y_w|x) − log odds(y_l|x))

Data and batching are DPO's (:mod:`engine.training.preference_data`): ``prompt``/``chosen``/``rejected`` rows,
strings or conversations; chosen and rejected sequences share one forward pass, which gives both the completion
log-probs and the NLL (one ``token_log_probs`` call, never the ``[N, V]`` logits). The loss and metrics equal
TRL 1.16's ``trl.experimental.orpo.ORPOTrainer`` on the same token ids (tested to 1e-5 in fp32).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from engine.errors import DatasetError
from engine.training.base import pad_token_id, resolve_config, trainer_inputs
from engine.training.config import ORPOConfig
from engine.training.orpo_loss import orpo_loss
from engine.training.preference_base import PreferenceTrainer
from engine.training.preference_data import (
    PreferenceCollator,
    completion_log_prob_sums,
)


def orpo_log_probs(model, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ORPO needs from a :class:`PreferenceCollator` batch, from one forward pass.

    Returns:
        ``(chosen_mean_logps [b], rejected_mean_logps [b], nll)``: the mean log-prob of each completion's tokens
        (those with a context), and the chosen sequences' mean negative log-likelihood over all their tokens after
        the first (prompt included; one mean over the batch's tokens). Float32, differentiable.
    """
    sums = completion_log_prob_sums(model, batch, whole_sequence=True)
    n = sums["logps"].shape[0]
    if n % 2:
        raise DatasetError(f"a preference batch holds chosen and rejected sequences (2b), got {n}")
    scored = sums["scored_lengths"]
    if bool((scored == 0).any()):
        raise DatasetError("a completion has no token with a context (empty prompt and one-token completion)")
    mean_logps = sums["logps"] / scored.to(sums["logps"].dtype)
    b = n // 2
    nll = -sums["all_logps"][:b].sum() / sums["all_scored"][:b].sum().clamp(min=1).to(sums["all_logps"].dtype)
    return mean_logps[:b], mean_logps[b:], nll


class ORPOTrainer(PreferenceTrainer):
    """Reference-free preference tuning on ``prompt`` / ``chosen`` / ``rejected`` data (strings or conversations).

    Args:
        model (CausalLM): from :class:`engine.FastModel`, with LoRA adapters or fully trainable.
        args (ORPOConfig, optional): defaults to ``ORPOConfig(output_dir="outputs")``.
        train_dataset / eval_dataset: :class:`datasets.Dataset` or list of dicts (as :class:`engine.DPOTrainer`).
        tokenizer / processing_class: the tokenizer.

    Logged metrics (TRL's names): ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``nll_loss``, ``log_odds_ratio``, ``log_odds_chosen``.
    """

    def __init__(
        self,
        model=None,
        args: ORPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        *,
        tokenizer=None,
        processing_class=None,
        data_collator=None,
        **kwargs,
    ):
        args = resolve_config(args, ORPOConfig, "ORPOTrainer")
        tok = trainer_inputs("ORPOTrainer", tokenizer, processing_class, train_dataset)
        train_dataset = self._tokenize_pairs(train_dataset, tok, args)
        if eval_dataset is not None:
            eval_dataset = self._tokenize_pairs(eval_dataset, tok, args)
        if data_collator is None:
            data_collator = PreferenceCollator(pad_token_id=pad_token_id(tok), padding_free=args.padding_free)
        super().__init__(
            model=model,
            args=args,
            processing_class=tok,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=data_collator,
            **kwargs,
        )

    def step_shape(self) -> tuple[int, int]:
        """Chosen and rejected sequences share the forward (as DPO): ``2 x batch`` rows, or one padding-free row."""
        rows, length = super().step_shape()
        if getattr(self.data_collator, "padding_free", False):
            return 1, 2 * rows * length
        return 2 * rows, length

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        split = "train" if model.training else "eval"
        chosen, rejected, nll = orpo_log_probs(model, inputs)
        loss, metrics = orpo_loss(chosen, rejected, nll, beta=self.args.beta)
        self.record(split, metrics)
        return (loss, metrics) if return_outputs else loss
