"""Kahneman-Tversky Optimization: :class:`KTOTrainer`.

KTO (Ethayarajh et al. 2024) learns from **unpaired** judgements: each row is a prompt, one completion and a
bool label (desirable or not). With the log-ratio ``r = log π(y|x) − log π_ref(y|x)`` and a KL estimate ``z``
from mismatched prompt/completion pairs of the same batch (see :mod:`engine.training.kto_loss`)::

    desirable:    λ_D (1 − σ(β (r − z)))        undesirable:  λ_U (1 − σ(β (z − r)))

The reference policy is **the same model with its LoRA adapters disabled**, or log-probabilities computed once
before training (``precompute_ref_log_probs=True``, required for full fine-tuning). Tokenization, the KL pairing,
truncation and the losses equal TRL 1.16's ``KTOTrainer`` (tested to 1e-5 in fp32).
"""

from __future__ import annotations

import datasets
import torch
from tqdm.auto import tqdm

from engine.peft import disable_adapter
from engine.training.base import check_reference_policy, pad_token_id, resolve_config, trainer_inputs
from engine.training.config import KTOConfig
from engine.training.kto_data import UnpairedPreferenceCollator, add_kl_completions, tokenize_unpaired_dataset
from engine.training.kto_loss import kl_estimate, kto_loss, kto_metrics
from engine.training.preference_base import PreferenceTrainer
from engine.training.preference_data import completion_log_prob_sums


def kto_log_probs(model, batch, *, with_kl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed completion log-probs of a :class:`UnpairedPreferenceCollator` batch: ``(logps [b], kl_logps [b])``.

    ``logps`` carries the gradient when grad is enabled; the KL sequences' log-probs never do (TRL computes them
    under ``no_grad``: the KL estimate is a constant of the loss). ``kl_logps`` is ``None`` without ``with_kl``.
    """
    logps = completion_log_prob_sums(model, batch)["logps"]
    kl_logps = None
    if with_kl:
        with torch.no_grad():
            kl_logps = completion_log_prob_sums(model, batch, prefix="KL_")["logps"]
    return logps, kl_logps


def reference_kto_log_probs(model, batch, *, with_kl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`kto_log_probs` of the reference policy (``model`` with its LoRA adapters off), without grad."""
    with torch.no_grad(), disable_adapter(model):
        return kto_log_probs(model, batch, with_kl=with_kl)


class KTOTrainer(PreferenceTrainer):
    """Preference tuning on unpaired ``prompt`` / ``completion`` / ``label`` data (strings or conversations).

    Args:
        model (CausalLM): from :class:`engine.FastModel`, with LoRA adapters (the reference is the model with
            adapters off), or fully trainable with ``precompute_ref_log_probs=True``.
        ref_model: must be ``None`` (kept for TRL-compatible call sites).
        args (KTOConfig, optional): defaults to ``KTOConfig(output_dir="outputs")``.
        train_dataset / eval_dataset: :class:`datasets.Dataset` or list of dicts: ``prompt``, ``completion``, bool
            ``label``; or paired ``prompt``/``chosen``/``rejected`` rows, unpaired as TRL does. Keep the order you
            want: batches are consecutive rows (the KL pairing needs the sequential sampler), so shuffle beforehand.
        tokenizer / processing_class: the tokenizer.

    Logged metrics (TRL 1.16's names): ``kl``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``logps/chosen``, ``logps/rejected`` (chosen = desirable, rejected = undesirable).
    """

    def __init__(
        self,
        model=None,
        ref_model=None,
        args: KTOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        *,
        tokenizer=None,
        processing_class=None,
        data_collator=None,
        **kwargs,
    ):
        args = resolve_config(args, KTOConfig, "KTOTrainer")
        check_reference_policy("KTOTrainer", "KTO", model, ref_model, args.precompute_ref_log_probs)
        tok = trainer_inputs("KTOTrainer", tokenizer, processing_class, train_dataset)
        self.with_kl = args.loss_type == "kto"
        train_dataset = self._prepare(train_dataset, tok, args, args.per_device_train_batch_size, train=True)
        if eval_dataset is not None:
            eval_dataset = self._prepare(eval_dataset, tok, args, args.per_device_eval_batch_size, train=False)
        if data_collator is None:
            data_collator = UnpairedPreferenceCollator(
                pad_token_id=pad_token_id(tok), max_length=args.max_length, padding_free=args.padding_free
            )
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

    def _prepare(self, dataset, tokenizer, args: KTOConfig, batch_size: int, *, train: bool) -> datasets.Dataset:
        columns = set(dataset.column_names) if isinstance(dataset, datasets.Dataset) else set()
        if not {"prompt_ids", "completion_ids"} <= columns:
            dataset = tokenize_unpaired_dataset(
                dataset,
                tokenizer,
                max_length=args.max_length,
                num_proc=args.dataset_num_proc,
                drop_truncated=args.drop_truncated,
                require_both_labels=train and self.with_kl,
            )
        if self.with_kl and "KL_completion_ids" not in dataset.column_names:
            # TRL pairs eval rows in blocks of the training batch size as well.
            dataset = add_kl_completions(dataset, args.per_device_train_batch_size)
        return dataset

    @torch.no_grad()
    def _with_reference_log_probs(self, dataset: datasets.Dataset, split: str) -> datasets.Dataset:
        """Add ``ref_logps`` (and ``ref_KL_logps``) columns, computed once by the current model with adapters off."""
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        model = self.model
        was_training = model.training
        model.eval()
        ref, ref_kl = [], []
        starts = range(0, len(dataset), batch_size)
        for start in tqdm(starts, desc=f"reference log-probs ({split})", disable=self.args.disable_tqdm):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(model.device) for k, v in self.data_collator(rows).items()}
            logps, kl_logps = reference_kto_log_probs(model, batch, with_kl=self.with_kl)
            ref.extend(logps.float().cpu().tolist())
            if kl_logps is not None:
                ref_kl.extend(kl_logps.float().cpu().tolist())
        model.train(was_training)
        dataset = dataset.add_column("ref_logps", ref)
        return dataset.add_column("ref_KL_logps", ref_kl) if self.with_kl else dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        split = "train" if model.training else "eval"
        labels = inputs["label"]
        logps, kl_logps = kto_log_probs(model, inputs, with_kl=self.with_kl)
        if "ref_logps" in inputs:
            ref_logps, ref_kl_logps = inputs["ref_logps"], inputs.get("ref_KL_logps")
        else:
            ref_logps, ref_kl_logps = reference_kto_log_probs(model, inputs, with_kl=self.with_kl)
        kl = kl_estimate(kl_logps, ref_kl_logps) if self.with_kl else None
        losses, chosen_rewards, rejected_rewards = kto_loss(
            logps,
            ref_logps.to(logps.device, logps.dtype),
            labels,
            kl,
            beta=self.args.beta,
            loss_type=self.args.loss_type,
            desirable_weight=self.args.desirable_weight,
            undesirable_weight=self.args.undesirable_weight,
        )
        self.record(split, kto_metrics(chosen_rewards, rejected_rewards, logps, labels, kl))
        loss = losses.nanmean()
        if return_outputs:
            return loss, {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}
        return loss
