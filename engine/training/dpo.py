"""Direct Preference Optimization: :class:`DPOTrainer`.

For a prompt ``x`` with a preferred completion ``y_w`` and a rejected one ``y_l``, DPO trains
the policy ``π`` against a frozen reference ``π_ref`` (see :mod:`engine.training.dpo_loss`)::

    h = β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]
    loss = −log σ(h)                                  (loss_type="sigmoid"; also ipo, hinge, robust)

The reference policy is **the same model with its LoRA adapters disabled** — no second copy
of the weights — or log-probabilities computed once before training
(``precompute_ref_log_probs=True``, required for full fine-tuning). Chosen and rejected
sequences share one forward pass (one batch of ``2b`` sequences, or one padding-free row).
Tokenization, batching and losses equal TRL's ``DPOTrainer`` (tested to 1e-5 in fp32).
"""

from __future__ import annotations

import datasets
import torch
from tqdm.auto import tqdm

from engine.training.base import check_reference_policy, pad_token_id, resolve_config, trainer_inputs
from engine.training.config import DPOConfig
from engine.training.preference_data import (
    PreferenceCollator,
    reference_sequence_log_probs,
    sequence_log_probs,
)
from engine.training.dpo_loss import dpo_loss, dpo_metrics
from engine.training.preference_base import PreferenceTrainer


class DPOTrainer(PreferenceTrainer):
    """Preference tuning on ``prompt`` / ``chosen`` / ``rejected`` data (strings or conversations).

    Args:
        model (CausalLM): from :class:`engine.FastModel`, with LoRA adapters (the reference is the
            model with adapters off), or fully trainable with ``precompute_ref_log_probs=True``.
        ref_model: must be ``None`` (kept for TRL-compatible call sites).
        args (DPOConfig, optional): defaults to ``DPOConfig(output_dir="outputs")``.
        train_dataset / eval_dataset: :class:`datasets.Dataset` or list of dicts.
        tokenizer / processing_class: the tokenizer.

    Logged metrics (TRL's names): ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``.
    """

    def __init__(
        self,
        model=None,
        ref_model=None,
        args: DPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        *,
        tokenizer=None,
        processing_class=None,
        data_collator=None,
        **kwargs,
    ):
        args = resolve_config(args, DPOConfig, "DPOTrainer")
        check_reference_policy("DPOTrainer", "DPO", model, ref_model, args.precompute_ref_log_probs)
        tok = trainer_inputs("DPOTrainer", tokenizer, processing_class, train_dataset)
        train_dataset = self._tokenize_pairs(train_dataset, tok, args, args.truncation_mode)
        if eval_dataset is not None:
            eval_dataset = self._tokenize_pairs(eval_dataset, tok, args, args.truncation_mode)
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
        if args.precompute_ref_log_probs:
            self.train_dataset = self._with_reference_log_probs(self.train_dataset, "train")
            if self.eval_dataset is not None:
                self.eval_dataset = self._with_reference_log_probs(self.eval_dataset, "eval")

    @torch.no_grad()
    def _with_reference_log_probs(self, dataset: datasets.Dataset, split: str) -> datasets.Dataset:
        """Add ``ref_chosen_logps`` / ``ref_rejected_logps`` columns, computed once with the current model."""
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        model = self.model
        was_training = model.training
        model.eval()
        chosen, rejected = [], []
        starts = range(0, len(dataset), batch_size)
        for start in tqdm(starts, desc=f"reference log-probs ({split})", disable=self.args.disable_tqdm):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(model.device) for k, v in self.data_collator(rows).items()}
            c, r = reference_sequence_log_probs(model, batch)
            chosen.extend(c.float().cpu().tolist())
            rejected.extend(r.float().cpu().tolist())
        model.train(was_training)
        return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)

    def step_shape(self) -> tuple[int, int]:
        """Chosen and rejected sequences share the forward: ``2 x batch`` rows of up to ``max_length`` tokens, or
        with ``padding_free`` one row of up to ``2 x batch x max_length``."""
        rows, length = super().step_shape()
        if getattr(self.data_collator, "padding_free", False):
            return 1, 2 * rows * length
        return 2 * rows, length

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        split = "train" if model.training else "eval"
        if "ref_chosen_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = reference_sequence_log_probs(model, inputs)
        chosen, rejected, extra = sequence_log_probs(model, inputs)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen,
            rejected,
            ref_chosen.to(chosen.dtype),
            ref_rejected.to(chosen.dtype),
            beta=self.args.beta,
            loss_type=self.args.loss_type,
            label_smoothing=self.args.label_smoothing,
            chosen_lengths=extra["chosen_lengths"],
            rejected_lengths=extra["rejected_lengths"],
        )
        self.record(split, dpo_metrics(chosen_rewards, rejected_rewards, chosen, rejected))
        loss = losses.mean()
        return (loss, {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}) if return_outputs else loss
