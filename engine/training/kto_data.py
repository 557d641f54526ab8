"""Unpaired preference data for KTO: tokenization, the mismatched "KL" completions, batching.

A KTO row is ``{"prompt", "completion", "label"}``: one completion judged desirable (``label=True``) or
undesirable (``label=False``); strings, or a list of messages with a list of assistant messages. Paired rows
(``prompt``/``chosen``/``rejected``) are unpaired first, as TRL 1.16's ``unpair_preference_dataset``: within each
block of 1000 rows, the chosen completions (``True``) and then the rejected ones (``False``).

Tokenization is DPO's (:func:`engine.training.preference_data.prompt_completion_ids`): the EOS text is appended
to plain-text completions, the chat template renders conversations, and the completion starts where the ids of
the prompt and of prompt + completion first differ.

**KL completions** (TRL 1.16's ``KTOTrainer``, exactly): the dataset is cut into consecutive blocks of
``per_device_train_batch_size`` rows (the last one may be shorter) and, in each block, row ``i`` gets the
completion of row ``i - 1`` (the first row gets the block's last completion)::

    (x_1, y_1), ..., (x_n, y_n)  ->  (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})

With the sequential sampler that KTO requires, a training batch is exactly one block, so the mismatched pairs use
the batch's own completions with other prompts.

**Truncation** (as TRL): each sequence ``prompt + completion`` (and ``prompt + KL completion``) keeps its first
``max_length`` tokens, at collation. An example whose prompt alone fills ``max_length`` has nothing to learn from:
:class:`~engine.errors.DatasetError` (TRL drops it silently; ``drop_truncated=True`` drops it with a warning).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import ConfigurationError, DatasetError
from engine.training.rows import as_dataset, as_text_or_messages, first_format, map_kwargs
from engine.training.preference_data import _extract_prompt, collate_sequences, prompt_completion_ids

__all__ = ["UNPAIRED_COLUMNS", "UnpairedPreferenceCollator", "add_kl_completions", "tokenize_unpaired_dataset"]

logger = logging.getLogger(__name__)

UNPAIRED_COLUMNS = ("prompt", "completion", "label")
_REF_COLUMNS = ("ref_logps", "ref_KL_logps")
_UNPAIR_BLOCK = 1000  # rows per block when unpairing (datasets' default map batch size, which TRL uses)


def _as_dataset(dataset):
    import datasets

    if isinstance(dataset, datasets.Dataset):
        return dataset
    if isinstance(dataset, (str, bytes, Mapping)) or not isinstance(dataset, Sequence):
        raise DatasetError(
            f"expected a datasets.Dataset or a list of dicts, got {type(dataset).__name__} "
            "(load files with datasets.load_dataset(...) or data.load.load_jsonl(...) first)"
        )
    if len(dataset) == 0:
        raise DatasetError("the KTO dataset is empty; it needs (prompt, completion, label) rows")
    return as_dataset(list(dataset))  # names the first row that breaks the table (engine.training.rows)


def _unpair(dataset):
    """Paired ``prompt``/``chosen``/``rejected`` rows as unpaired rows (TRL's ``unpair_preference_dataset`` order)."""
    import datasets

    columns = dataset.column_names
    rows = dataset.to_list()
    conversational, decided_by = first_format([r["chosen"] for r in rows])
    for index, r in enumerate(rows):
        for key in ("chosen", "rejected") if "prompt" not in columns else ("prompt", "chosen", "rejected"):
            as_text_or_messages(r[key], index, key, conversational, decided_by)
    if "prompt" not in columns:
        rows = [
            dict(r, **dict(zip(("prompt", "chosen", "rejected"), _extract_prompt(r["chosen"], r["rejected"]))))
            for r in rows
        ]
    out = []
    for start in range(0, len(rows), _UNPAIR_BLOCK):
        block = rows[start : start + _UNPAIR_BLOCK]
        for key, label in (("chosen", True), ("rejected", False)):
            for r in block:
                extra = {k: v for k, v in r.items() if k not in ("prompt", "chosen", "rejected")}
                out.append({"prompt": r["prompt"], "completion": r[key], "label": label, **extra})
    return datasets.Dataset.from_list(out)


def _tokenize_row(example: dict[str, Any], index: int, *, tokenizer, conversational: bool, decided_by: int) -> dict:
    prompt, completion = (
        as_text_or_messages(example[k], index, k, conversational, decided_by) for k in ("prompt", "completion")
    )
    prompt_ids, (completion_ids,) = prompt_completion_ids(
        tokenizer, prompt, [completion], conversational=conversational, example=example, index=index
    )
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids}


def tokenize_unpaired_dataset(
    dataset,
    tokenizer,
    *,
    max_length: int | None,
    num_proc: int | None = None,
    drop_truncated: bool = False,
    require_both_labels: bool = True,
):
    """Tokenize KTO data as TRL 1.16's ``KTOTrainer`` does (see the module docstring).

    Args:
        dataset: a ``datasets.Dataset`` or a list of dicts with ``prompt``, ``completion`` and a bool ``label``, or
            paired ``prompt``/``chosen``/``rejected`` rows (unpaired here). Optional ``tools`` and
            ``chat_template_kwargs`` columns go to the chat template; ``ref_logps``/``ref_KL_logps`` are kept.
        tokenizer: a transformers tokenizer (with a chat template for conversational data).
        max_length: longest ``prompt + completion`` in tokens (truncated at collation), or ``None``.
        num_proc: processes used by ``Dataset.map``.
        drop_truncated: drop (with a warning) the examples whose prompt alone fills ``max_length`` instead of raising.
        require_both_labels: raise if every label is the same (KTO's loss needs desirable and undesirable examples).

    Returns:
        ``datasets.Dataset`` with ``prompt_ids``, ``completion_ids`` (lists of int, not truncated) and ``label``
        (bool), plus the reference log-prob columns if the input had them.

    Raises:
        DatasetError: empty data, missing columns, a label that is not a bool, only one kind of label (with
            ``require_both_labels``), mixed formats, conversational data without a chat template, an empty
            completion, a prompt that fills ``max_length`` (unless ``drop_truncated``).
        ConfigurationError: ``max_length`` below 2.
    """
    if max_length is not None and max_length < 2:
        raise ConfigurationError(f"max_length must be at least 2 (or None for no truncation), got {max_length}")
    dataset = _as_dataset(dataset)
    if len(dataset) == 0:
        raise DatasetError("the KTO dataset is empty; it needs (prompt, completion, label) rows")
    columns = list(dataset.column_names)
    if "chosen" in columns and "rejected" in columns and "completion" not in columns:
        dataset = _unpair(dataset)
        columns = list(dataset.column_names)
    missing = [c for c in UNPAIRED_COLUMNS if c not in columns]
    if missing:
        raise DatasetError(
            f"the KTO dataset lacks the column(s) {missing}; it has {columns}. KTO needs 'prompt', 'completion' and a "
            "bool 'label' (True = desirable) per row, or paired 'prompt'/'chosen'/'rejected' rows; rename columns with "
            "dataset.rename_column(old, new)."
        )
    labels = list(dataset["label"])
    bad = [i for i, v in enumerate(labels) if not isinstance(v, bool)]
    if bad:
        raise DatasetError(
            f"example {bad[0]}: 'label' must be True (desirable) or False (undesirable); example {bad[0]} has "
            f"{labels[bad[0]]!r} "
            f"({len(bad)} such example(s), first indices {bad[:10]}). Convert the labels, e.g. "
            "dataset.map(lambda r: {'label': r['label'] == 1}) or dataset.cast_column('label', datasets.Value('bool'))."
        )
    if require_both_labels and len(set(labels)) < 2:
        kinds = ("desirable (True)", "undesirable (False)")
        only, other = kinds if labels[0] else kinds[::-1]
        raise DatasetError(
            f"every one of the {len(labels)} examples is {only}; KTO's loss weighs desirable against undesirable "
            f"completions and needs both. Add {other} examples (or unpair a prompt/chosen/rejected dataset), or use "
            "loss_type='apo_zero_unpaired', which has no KL term."
        )
    conversational, decided_by = first_format(dataset["completion"])
    if conversational and getattr(tokenizer, "chat_template", None) is None:
        raise DatasetError(
            "the dataset is conversational (lists of messages) but the tokenizer has no chat template. Set "
            "tokenizer.chat_template (e.g. from the instruct model's tokenizer) or pass plain-string prompt/completion."
        )
    keep = [c for c in (*_REF_COLUMNS, "label") if c in columns]
    tokenized = dataset.map(
        _tokenize_row,
        with_indices=True,
        fn_kwargs={"tokenizer": tokenizer, "conversational": conversational, "decided_by": decided_by},
        remove_columns=[c for c in columns if c not in keep],
        num_proc=num_proc,
        desc="Tokenizing unpaired preference data",
        **map_kwargs(dataset),
    )
    empty = [i for i, ids in enumerate(tokenized["completion_ids"]) if not ids]
    if empty:
        raise DatasetError(
            f"example {empty[0]}: an empty completion after tokenization ({len(empty)} such example(s), first "
            f"indices: {empty[:10]}); every completion needs at least one token. Remove these examples."
        )
    if max_length is None:
        return tokenized
    full = [i for i, ids in enumerate(tokenized["prompt_ids"]) if len(ids) >= max_length]
    if full and not drop_truncated:
        raise DatasetError(
            f"example {full[0]}: a prompt of max_length={max_length} tokens or more, so truncation leaves no "
            f"completion token to learn from ({len(full)} such example(s), first indices: {full[:10]}). Raise max_length, shorten or remove these "
            "prompts, or drop them (drop_truncated=True, as TRL)."
        )
    if full:
        logger.warning("dropping %d example(s) whose prompt alone fills max_length=%s (first indices: %s)",
                       len(full), max_length, full[:10])
        dropped = set(full)
        tokenized = tokenized.select([i for i in range(len(tokenized)) if i not in dropped])
        if len(tokenized) == 0:
            raise DatasetError(f"every example's prompt fills max_length={max_length}; raise max_length")
    return tokenized


def add_kl_completions(dataset, batch_size: int):
    """Add ``KL_completion_ids``: within each block of ``batch_size`` rows, row ``i`` gets row ``i - 1``'s completion.

    Args:
        dataset: tokenized rows (``completion_ids``), in training order.
        batch_size: ``per_device_train_batch_size`` (the sequential sampler makes each batch one block).

    Returns:
        the dataset with the extra list-of-int column ``KL_completion_ids``.
    """
    if batch_size < 2:
        raise ConfigurationError(
            f"the KL estimate pairs each prompt with another row's completion in the same batch, so "
            f"per_device_train_batch_size must be at least 2, got {batch_size}"
        )
    completions = list(dataset["completion_ids"])
    kl = []
    for start in range(0, len(completions), batch_size):
        block = completions[start : start + batch_size]
        kl.extend([block[-1], *block[:-1]])
    return dataset.add_column("KL_completion_ids", kl)


@dataclass
class UnpairedPreferenceCollator:
    """Batch tokenized KTO examples: the matched sequences and (if present) the mismatched KL sequences.

    Args:
        pad_token_id (int): id used for right padding (never attended to nor scored).
        max_length (int | None): each ``prompt + completion`` keeps its first ``max_length`` tokens (TRL's truncation).
        padding_free (bool): concatenate the sequences into one row instead of padding.

    Calling it on ``b`` examples (``prompt_ids``, ``completion_ids``, ``label``, optionally ``KL_completion_ids``,
    ``ref_logps``, ``ref_KL_logps``) returns the :func:`~engine.training.preference_data.collate_sequences` layout of
    ``prompt_i + completion_i`` (``input_ids``, ``completion_mask``, ... ``[b, s]`` or ``[1, T]``), the same under
    ``KL_``-prefixed keys for ``prompt_i + KL_completion_i``, ``label`` (bool ``[b]``) and the float32 ``[b]``
    reference columns.
    """

    pad_token_id: int
    max_length: int | None = None
    padding_free: bool = False

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(features) == 0:
            raise DatasetError("UnpairedPreferenceCollator got an empty list of examples")
        for i, f in enumerate(features):
            missing = [k for k in ("prompt_ids", "completion_ids", "label") if k not in f]
            if missing:
                raise DatasetError(
                    f"example {i} lacks {missing} (has {sorted(f)}); tokenize the data with tokenize_unpaired_dataset"
                )
        out = {}
        for prefix in ("", "KL_"):
            key = f"{prefix}completion_ids"
            if key not in features[0]:
                continue
            sequences, masks = [], []
            for f in features:
                seq = list(f["prompt_ids"]) + list(f[key])
                mask = [0] * len(f["prompt_ids"]) + [1] * len(f[key])
                sequences.append(seq[: self.max_length] if self.max_length is not None else seq)
                masks.append(mask[: self.max_length] if self.max_length is not None else mask)
            batch = collate_sequences(sequences, masks, pad_token_id=self.pad_token_id, padding_free=self.padding_free)
            out.update({prefix + k: v for k, v in batch.items()})
        out["label"] = torch.tensor([bool(f["label"]) for f in features], dtype=torch.bool)
        for key in _REF_COLUMNS:
            if key in features[0]:
                out[key] = torch.tensor([float(f[key]) for f in features], dtype=torch.float32)
        return out
