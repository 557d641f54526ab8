"""What the preference trainers (DPO, KTO, ORPO) share: per-batch metrics averaged into each log."""

from __future__ import annotations

from collections import defaultdict

import torch

import datasets

from engine.training.base import EngineTrainer
from engine.training.preference_data import tokenize_preference_dataset


class PreferenceTrainer(EngineTrainer):
    """:class:`EngineTrainer` that records per-batch metrics and logs their means (not used directly).

    Subclasses call :meth:`record` from ``compute_loss``; each log adds, per key, the mean of the values recorded
    since the last log (``eval_``-prefixed during evaluation), as TRL's preference trainers do.
    """

    def __init__(self, *args, **kwargs):
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        super().__init__(*args, **kwargs)

    @staticmethod
    def _tokenize_pairs(dataset, tokenizer, args, truncation_mode: str = "keep_start") -> datasets.Dataset:
        """Paired ``prompt``/``chosen``/``rejected`` rows tokenized as DPO does (already tokenized rows pass)."""
        if isinstance(dataset, datasets.Dataset) and {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(
            dataset.column_names
        ):
            return dataset
        return tokenize_preference_dataset(
            dataset,
            tokenizer,
            max_length=args.max_length,
            truncation_mode=truncation_mode,
            num_proc=args.dataset_num_proc,
            drop_truncated=args.drop_truncated,
        )

    def record(self, split: str, metrics: dict[str, float]) -> None:
        """Append one batch's ``metrics`` to ``split`` (``"train"`` or ``"eval"``)."""
        for key, value in metrics.items():
            self._metrics[split][key].append(value)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of the metrics recorded since the last log (``eval_`` prefixed during evaluation)."""
        split = "train" if "loss" in logs else "eval"
        prefix = "eval_" if split == "eval" else ""
        for key, values in self._metrics[split].items():
            if values:
                logs[f"{prefix}{key}"] = sum(values) / len(values)
        self._metrics[split].clear()
        super().log(logs, start_time)
