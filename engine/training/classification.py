"""Sequence classification training: :class:`ClassificationTrainer`, its collator and its metric.

Pipeline::

    dataset ──tokenize_classification_dataset──▶ input_ids, labels   (text column + label column)
            ──ClassificationCollator───────────▶ input_ids, attention_mask [b, s] (the model's pad token), labels
            ──CausalLMForSequenceClassification─▶ logits [b, num_labels], loss (transformers' rule)

The model comes from ``FastModel.from_pretrained(..., num_labels=N)`` (usually with
``FastModel.get_peft_model``: LoRA on the decoder, the ``score`` head trained whole). Evaluation
reports ``eval_accuracy`` next to ``eval_loss``; training ends with the engine's time/memory report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch

from engine.errors import ConfigurationError, DatasetError
from engine.models.classification import IGNORE_INDEX, CausalLMForSequenceClassification
from engine.training.base import EngineTrainer, resolve_config
from engine.training.config import ClassificationConfig
from engine.training.rows import as_dataset

__all__ = [
    "ClassificationCollator", "ClassificationTrainer", "classification_accuracy", "tokenize_classification_dataset",
]


def _label_index(value, num_labels: int, label2id: dict | None, row: int):
    """One row's label as the model takes it: a class index (names mapped through ``label2id``) or float targets."""
    if isinstance(value, str):
        if label2id is None or value not in label2id:
            known = f"one of {sorted(label2id)}" if label2id else "an integer (the model has no id2label)"
            raise DatasetError(f"example {row}: label {value!r} is not a known class name; use {known}")
        return label2id[value]
    if isinstance(value, bool) or value is None:
        raise DatasetError(
            f"example {row}: label {value!r} is not a class index; give an integer in [0, {num_labels})"
        )
    if isinstance(value, int):
        if value != IGNORE_INDEX and not 0 <= value < num_labels:
            raise DatasetError(
                f"example {row}: label {value} is outside [0, {num_labels}): the model has num_labels={num_labels}. "
                f"Map the labels to 0..{num_labels - 1}, or load the model with "
                "FastModel.from_pretrained(..., num_labels=<number of classes>)."
            )
        return value
    return value  # float (regression) or a list of floats (multi-label): checked by the model's loss


def _check_label_kinds(values: list) -> None:
    """Class indices (int) and regression targets (float) in one column: name the example that is the odd one out.

    Arrow would store such a column as floats, so every class index would silently become a regression target.
    """
    kinds = ["float" if isinstance(v, float) else "int" if isinstance(v, int) else "other" for v in values]
    n_int, n_float = kinds.count("int"), kinds.count("float")
    if not n_int or not n_float:
        return
    odd, common, count = ("float", "class indices (integers)", n_int) if n_float <= n_int else (
        "int", "regression targets (floats)", n_float)
    index = kinds.index(odd)
    raise DatasetError(
        f"example {index}: label {values[index]!r} is {'a float' if odd == 'float' else 'an integer'}, while "
        f"{count} of {len(values)} labels are {common}; give every example an integer class index "
        "(classification) or a float (regression)"
    )


def _check_texts(texts: list, text_field: str) -> None:
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise DatasetError(
                f"example {index}: column '{text_field}' holds {type(text).__name__}, expected a string; fix or drop "
                "this example"
            )


def tokenize_classification_dataset(
    dataset, tokenizer, *, num_labels: int, text_field: str = "text", label_field: str = "label",
    max_length: int | None = None, label2id: dict | None = None,
) -> datasets.Dataset:
    """Tokenize ``text_field`` and validate ``label_field`` of every row.

    Args:
        dataset: a :class:`datasets.Dataset` or a list of dicts.
        tokenizer: a transformers tokenizer (its special tokens are added as it adds them).
        num_labels (int): the model's classes (labels are checked against ``[0, num_labels)``; -100 skips a row).
        max_length (int, optional): truncate longer texts, keeping the start.
        label2id (dict, optional): maps string labels to class indices.

    Returns:
        Dataset with ``input_ids`` (list of int) and ``labels``.

    Raises:
        DatasetError: an empty dataset, a missing column, an empty text, or a label outside ``[0, num_labels)``.
    """
    rows = list(dataset) if isinstance(dataset, (list, tuple)) else None
    if rows is not None and not rows:
        raise DatasetError("the classification dataset is empty")
    dataset = as_dataset(dataset)  # rows that are not dicts, columns missing in some rows, invalid UTF-8, ...
    if len(dataset) == 0:
        raise DatasetError("the classification dataset is empty")
    missing = [c for c in (text_field, label_field) if c not in dataset.column_names]
    if missing:
        raise DatasetError(
            f"the dataset has no column(s) {missing} (columns: {dataset.column_names}); set "
            "ClassificationConfig(dataset_text_field=..., label_field=...) to the text and label columns"
        )
    raw_labels = [row[label_field] for row in rows] if rows is not None else list(dataset[label_field])
    labels = [_label_index(v, num_labels, label2id, i) for i, v in enumerate(raw_labels)]
    _check_label_kinds(labels)
    texts = list(dataset[text_field])
    _check_texts(texts, text_field)
    encoded = tokenizer(texts, truncation=max_length is not None, max_length=max_length)
    empty = [i for i, ids in enumerate(encoded["input_ids"]) if not ids]
    if empty:
        raise DatasetError(f"example {empty[0]} has an empty text ({len(empty)} such examples); drop them")
    return datasets.Dataset.from_dict({"input_ids": encoded["input_ids"], "labels": labels})


class ClassificationCollator:
    """Pad a list of ``{"input_ids", "labels"}`` rows into a batch.

    Args:
        pad_token_id (int): the token padding is made of (must be the model's ``pad_token_id``: the model
            classifies each row at its rightmost non-pad token).
        padding_side (str): ``"right"`` or ``"left"``.

    Returns (from ``__call__``): ``input_ids`` and ``attention_mask`` int64 ``[b, s]``, ``labels`` ``[b]``
    int64 (class indices) or float32 (``[b]`` regression values, ``[b, num_labels]`` multi-label targets).
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        if padding_side not in ("right", "left"):
            raise ConfigurationError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id, self.padding_side = pad_token_id, padding_side

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise DatasetError("cannot collate an empty batch")
        rows = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        longest = max(r.numel() for r in rows)
        ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(0, row.numel()) if self.padding_side == "right" else slice(longest - row.numel(), longest)
            ids[i, span], mask[i, span] = row, 1
        values = [f["labels"] for f in features]
        integer = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        labels = torch.tensor(values, dtype=torch.long if integer else torch.float32)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def classification_accuracy(eval_pred) -> dict[str, float]:
    """``{"accuracy": ...}``: argmax equals the class (rows labelled -100 skipped); for multi-label targets,
    the share of (row, class) decisions ``logit > 0`` that equal ``target > 0.5``."""
    logits, labels = np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids)
    if labels.ndim == 2:
        return {"accuracy": float(((logits > 0) == (labels > 0.5)).mean())}
    keep = labels != IGNORE_INDEX
    return {"accuracy": float((logits.argmax(-1)[keep] == labels[keep]).mean())}


class ClassificationTrainer(EngineTrainer):
    """Fine-tune a sequence classifier (LoRA on the decoder, the ``score`` head trained whole).

    Args:
        model (CausalLMForSequenceClassification): from ``FastModel.from_pretrained(..., num_labels=N)``.
        args (ClassificationConfig, optional): defaults to ``ClassificationConfig(output_dir="outputs")``.
        train_dataset / eval_dataset: a :class:`datasets.Dataset` or a list of dicts, raw (``text`` and
            ``label`` columns, see the config's ``dataset_text_field`` / ``label_field``) or tokenized
            (``input_ids`` and ``labels``).
        tokenizer / processing_class: the tokenizer (needed for raw datasets).
        data_collator: default :class:`ClassificationCollator` with the model's pad token.
        compute_metrics: default :func:`classification_accuracy` (``eval_accuracy``); none for regression.

    Example::

        model, tok = FastModel.from_pretrained(path, num_labels=7)
        model = FastModel.get_peft_model(model, r=16, lora_alpha=16)
        trainer = ClassificationTrainer(model=model, tokenizer=tok, train_dataset=rows, eval_dataset=held_out,
                                        args=ClassificationConfig(output_dir="out", max_steps=60))
        trainer.train(); trainer.evaluate()["eval_accuracy"]
    """

    def __init__(
        self,
        model=None,
        args: ClassificationConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        *,
        tokenizer=None,
        processing_class=None,
        data_collator=None,
        compute_metrics=None,
        **kwargs,
    ):
        args = resolve_config(args, ClassificationConfig, "ClassificationTrainer")
        if not isinstance(model, CausalLMForSequenceClassification):
            raise ConfigurationError(
                f"ClassificationTrainer trains a classifier, got {type(model).__name__}. Load it with "
                "FastModel.from_pretrained(..., num_labels=<number of classes>)."
            )
        if train_dataset is None:
            raise ConfigurationError("ClassificationTrainer needs a train_dataset")
        if args.max_length is not None and args.max_length > model.max_seq_length:
            raise ConfigurationError(
                f"ClassificationConfig.max_length={args.max_length} is longer than the model's max_seq_length="
                f"{model.max_seq_length}; lower max_length or load the model with a larger max_seq_length"
            )
        largest = max(args.per_device_train_batch_size, args.per_device_eval_batch_size)
        if model.pad_token_id is None and largest > 1:
            raise ConfigurationError(
                "the model has no pad token, so it can classify one row at a time only; give the tokenizer a pad "
                "token before loading, pass FastModel.from_pretrained(..., pad_token_id=...), or use batch size 1"
            )
        tok = processing_class if processing_class is not None else tokenizer
        train_dataset = self._prepare(train_dataset, tok, args, model)
        if eval_dataset is not None:
            eval_dataset = self._prepare(eval_dataset, tok, args, model)
        if data_collator is None:
            pad = model.pad_token_id if model.pad_token_id is not None else 0
            data_collator = ClassificationCollator(pad, args.padding_side)
        if compute_metrics is None and model.num_labels > 1:
            compute_metrics = classification_accuracy
        super().__init__(
            model=model, args=args, processing_class=tok, train_dataset=train_dataset, eval_dataset=eval_dataset,
            data_collator=data_collator, compute_metrics=compute_metrics, **kwargs,
        )

    @staticmethod
    def _prepare(dataset, tokenizer, args: ClassificationConfig, model) -> datasets.Dataset:
        if isinstance(dataset, list) and dataset and isinstance(dataset[0], dict) and "input_ids" in dataset[0]:
            dataset = as_dataset(dataset)
        if isinstance(dataset, datasets.Dataset) and "input_ids" in dataset.column_names:
            if "labels" not in dataset.column_names:
                raise DatasetError("a tokenized classification dataset needs a 'labels' column next to 'input_ids'")
            for i, value in enumerate(dataset["labels"]):
                _label_index(value, model.num_labels, None, i)
            return dataset
        if tokenizer is None:
            raise ConfigurationError(
                "ClassificationTrainer needs a tokenizer (tokenizer=...) to tokenize a raw dataset"
            )
        label2id = {name: i for i, name in model.id2label.items()} if model.id2label else None
        return tokenize_classification_dataset(
            dataset, tokenizer, num_labels=model.num_labels, text_field=args.dataset_text_field,
            label_field=args.label_field, max_length=args.max_length, label2id=label2id,
        )
