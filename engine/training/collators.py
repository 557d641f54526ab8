"""Batch collators for SFT: padding-free (one concatenated row) and padded.

:class:`PaddingFreeCollator` concatenates every row of a batch, packed or not, into a single row
``[1, N]``. Documents are told apart by ``position_ids`` that restart at 0 at each document: the model
builds a block-diagonal causal mask from them (``packed_document_ids`` in
:mod:`engine.models.transformer`), and ``cu_seq_lens`` gives the same boundaries in flash-attention's
varlen convention. The first label of every document is set to -100 so that no document is trained to
predict its first token from the end of the previous one (the model shifts labels by one). No padding
is computed on, except an optional dummy tail document (``pad_to_multiple_of``) whose labels are all
-100 and which, being a separate document, changes nothing for the real ones.

:class:`PaddedCollator` pads rows to the longest one of the batch and returns an ``attention_mask``
(labels -100 on padding). It cannot separate packed documents (the model ignores restarting
``position_ids`` when an attention mask is given), so it refuses packed rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from engine.errors import ConfigurationError, DatasetError

__all__ = ["PaddedCollator", "PaddingFreeCollator"]

IGNORE_INDEX = -100


def _as_1d(value: Any, name: str, index: int) -> torch.Tensor:
    """A feature value (list or tensor) as an int64 vector."""
    try:
        tensor = torch.as_tensor(value, dtype=torch.long)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DatasetError(f"feature {index}: '{name}' is not a sequence of integers ({exc})") from exc
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 1:
        raise DatasetError(f"feature {index}: '{name}' has shape {tuple(tensor.shape)}, expected a flat sequence")
    return tensor


def _ids_and_labels(feature: dict[str, Any], index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if "input_ids" not in feature:
        raise DatasetError(f"feature {index} has no 'input_ids' (keys: {sorted(feature)}); tokenize the dataset first")
    ids = _as_1d(feature["input_ids"], "input_ids", index)
    labels = _as_1d(feature["labels"], "labels", index) if feature.get("labels") is not None else ids.clone()
    if labels.shape != ids.shape:
        raise DatasetError(
            f"feature {index}: 'labels' has {labels.numel()} tokens but 'input_ids' has {ids.numel()}"
        )
    return ids, labels


def _positions(feature: dict[str, Any], n: int, index: int) -> torch.Tensor:
    """Position ids of a row: its own ``position_ids``, else from ``seq_lengths``, else ``0..n-1``."""
    if feature.get("position_ids") is not None:
        pos = _as_1d(feature["position_ids"], "position_ids", index)
        if pos.numel() != n:
            raise DatasetError(f"feature {index}: 'position_ids' has {pos.numel()} entries for {n} tokens")
        return pos
    if feature.get("seq_lengths") is not None:
        lengths = _as_1d(feature["seq_lengths"], "seq_lengths", index)
        if int(lengths.sum()) != n or bool((lengths < 1).any()):
            raise DatasetError(f"feature {index}: 'seq_lengths' {lengths.tolist()} do not split its {n} tokens")
        starts = torch.cumsum(lengths, 0) - lengths
        return torch.arange(n) - torch.repeat_interleave(starts, lengths)
    return torch.arange(n)


class PaddingFreeCollator:
    """Concatenate a batch into one row with restarting position ids (no padding, no attention mask).

    Args:
        pad_token_id (int): token used for the optional tail padding.
        pad_to_multiple_of (int, optional): pad the row's length up to a multiple of this with a dummy
            document (pad tokens, labels -100, position ids ``0..k-1``).
        return_cu_seq_lens (bool): include ``cu_seq_lens`` in the batch (drop it before calling a model
            that does not accept it).

    ``__call__(features)`` takes dicts with ``input_ids`` and optionally ``labels``, ``position_ids``
    (packed rows) or ``seq_lengths`` (lists or tensors) and returns int64 ``input_ids``, ``labels`` and
    ``position_ids`` of shape ``[1, N]`` and int32 ``cu_seq_lens`` ``[n_docs + 1]`` (0, ..., N).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, return_cu_seq_lens: bool = True):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ConfigurationError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
        if pad_token_id is None:
            raise ConfigurationError("pad_token_id is None; set tokenizer.pad_token (e.g. to tokenizer.eos_token)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_cu_seq_lens = return_cu_seq_lens

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise DatasetError("cannot collate an empty batch")
        all_ids, all_labels, all_pos = [], [], []
        for index, feature in enumerate(features):
            ids, labels = _ids_and_labels(feature, index)
            if ids.numel() == 0:
                raise DatasetError(f"feature {index} has no tokens; remove empty examples")
            all_ids.append(ids)
            all_labels.append(labels)
            pos = _positions(feature, ids.numel(), index)
            pos = pos.clone()
            pos[0] = 0  # every row starts a document
            all_pos.append(pos)
        total = sum(t.numel() for t in all_ids)
        if self.pad_to_multiple_of:
            pad = -total % self.pad_to_multiple_of
            if pad:
                all_ids.append(torch.full((pad,), self.pad_token_id, dtype=torch.long))
                all_labels.append(torch.full((pad,), IGNORE_INDEX, dtype=torch.long))
                all_pos.append(torch.arange(pad))
        input_ids = torch.cat(all_ids)[None]
        position_ids = torch.cat(all_pos)[None]
        labels = torch.cat(all_labels)[None].masked_fill(position_ids == 0, IGNORE_INDEX)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.return_cu_seq_lens:
            from engine.training.packing import cu_seqlens_from_position_ids

            batch["cu_seq_lens"] = cu_seqlens_from_position_ids(position_ids)
        return batch


class PaddedCollator:
    """Pad a batch to its longest row: ``input_ids``, ``attention_mask`` and ``labels`` of shape ``[b, s]``.

    Args:
        pad_token_id (int): token written in padding slots.
        padding_side (str): ``"right"`` (training) or ``"left"``.
        pad_to_multiple_of (int, optional): round ``s`` up to a multiple of this.

    ``__call__(features)`` takes dicts with ``input_ids`` and optionally ``labels`` (lists or tensors)
    and returns int64 tensors; labels are -100 on padding and on each row's first token (never predicted
    without padding; with left padding it would otherwise be predicted from a pad token). Packed rows (several documents, as said by
    ``seq_lengths`` or restarting ``position_ids``) are refused: use :class:`PaddingFreeCollator`.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if padding_side not in ("right", "left"):
            raise ConfigurationError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ConfigurationError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
        if pad_token_id is None:
            raise ConfigurationError("pad_token_id is None; set tokenizer.pad_token (e.g. to tokenizer.eos_token)")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise DatasetError("cannot collate an empty batch")
        rows = []
        for index, feature in enumerate(features):
            ids, labels = _ids_and_labels(feature, index)
            self._refuse_packed(feature, ids.numel(), index)
            rows.append((ids, labels))
        s = max(ids.numel() for ids, _ in rows)
        if self.pad_to_multiple_of:
            s += -s % self.pad_to_multiple_of
        b = len(rows)
        input_ids = torch.full((b, s), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, s), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((b, s), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            n = ids.numel()
            sl = slice(0, n) if self.padding_side == "right" else slice(s - n, s)
            input_ids[i, sl] = ids
            labels[i, sl] = lab
            labels[i, sl.start] = IGNORE_INDEX  # never predicted unpadded; left padding must not predict it from pads
            attention_mask[i, sl] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    @staticmethod
    def _refuse_packed(feature: dict[str, Any], n: int, index: int) -> None:
        packed = False
        if feature.get("seq_lengths") is not None:
            packed = _as_1d(feature["seq_lengths"], "seq_lengths", index).numel() > 1
        elif feature.get("position_ids") is not None and n > 1:
            packed = bool((_as_1d(feature["position_ids"], "position_ids", index)[1:] == 0).any())
        if packed:
            raise ConfigurationError(
                f"feature {index} is a packed row (several documents), which padded batches cannot keep apart: "
                "the attention mask would let documents attend to each other. Use PaddingFreeCollator for packed "
                "datasets (padding_free=True), or turn packing off."
            )
