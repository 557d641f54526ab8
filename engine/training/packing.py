"""Packing tokenized examples into rows of at most ``max_length`` tokens.

Packing puts several short documents into one training row so that no compute is spent on padding.
The documents of a row never attend to each other: each row carries ``position_ids`` that restart at 0
at every document, which the model turns into a block-diagonal causal mask (see
``packed_document_ids`` in :mod:`engine.models.transformer`) and flash-attention kernels into
cumulative sequence lengths (:func:`cu_seqlens_from_position_ids`).

Which documents share a row is decided by best-fit decreasing (BFD) bin packing (:func:`pack_bfd`):
documents are taken longest first (ties by index) and each goes into the open row with the least
room left that still fits it, or into a new row. BFD uses at most ``11/9 OPT + 6/9`` rows (Dósa 2007),
and in practice within a few percent of optimal. To find the best-fitting row in ``O(log max_length)``
a segment tree is kept over the possible remaining capacities ``0..max_length``: leaf ``c`` holds
``c`` when some open row has exactly ``c`` free tokens (else 0), inner nodes the maximum of their
children, so "the smallest capacity >= length" is a single descent. Among rows with equal remaining
capacity the lowest-numbered one is used (a min-heap per capacity), so the result is deterministic.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from engine.errors import ConfigurationError, DatasetError

__all__ = ["cu_seqlens_from_position_ids", "pack_bfd", "pack_dataset"]


class _CapacityTree:
    """Max segment tree over capacities ``0..size-1``: finds the smallest present capacity >= a request."""

    def __init__(self, size: int):
        self.n = 1
        while self.n < size:
            self.n *= 2
        self.tree = [0] * (2 * self.n)

    def set(self, capacity: int, present: bool) -> None:
        i = capacity + self.n
        self.tree[i] = capacity if present else 0
        i //= 2
        tree = self.tree
        while i:
            value = max(tree[2 * i], tree[2 * i + 1])
            if tree[i] == value:
                break
            tree[i] = value
            i //= 2

    def smallest_at_least(self, length: int) -> int:
        """The smallest present capacity ``>= length`` (``length >= 1``), or -1 if none."""
        tree = self.tree
        if tree[1] < length:
            return -1
        i = 1
        while i < self.n:
            i = 2 * i if tree[2 * i] >= length else 2 * i + 1
        return i - self.n


def pack_bfd(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example indices into bins of ``max_length`` tokens.

    Args:
        lengths: ``[n]`` token count of each example (each ``1 <= length <= max_length``).
        max_length (int): capacity of a bin (a packed row).

    Returns:
        the bins, in the order they were opened; each a list of example indices in the order they were
        placed (longest first). Every index appears exactly once, and the lengths of a bin sum to at most
        ``max_length``. Deterministic: ties in length are broken by index.

    Raises:
        ConfigurationError: ``max_length < 1``, or a length outside ``1..max_length``.

    Cost: ``O(n log n)`` for the sort plus ``O(n log max_length)`` for the placement.
    """
    if not isinstance(max_length, (int, np.integer)) or max_length < 1:
        raise ConfigurationError(f"max_length must be a positive integer, got {max_length!r}")
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lens.size == 0:
        return []
    too_long = np.flatnonzero(lens > max_length)
    if too_long.size:
        i = int(too_long[0])
        raise ConfigurationError(
            f"example {i} has {int(lens[i])} tokens, more than max_length={max_length} ({too_long.size} examples are "
            "too long). Truncate or split them first (tokenize_sft_dataset(..., max_length=...)), or raise max_length."
        )
    empty = np.flatnonzero(lens < 1)
    if empty.size:
        raise ConfigurationError(
            f"example {int(empty[0])} has {int(lens[empty[0]])} tokens; every packed example needs at least one. "
            "Remove empty examples before packing."
        )
    # Longest first; a stable sort of -length keeps equal lengths in index order.
    order = np.argsort(-lens, kind="stable").tolist()
    lens_list = lens.tolist()

    tree = _CapacityTree(max_length + 1)
    rows_by_free: dict[int, list[int]] = {}  # remaining capacity -> min-heap of row numbers
    bins: list[list[int]] = []
    for index in order:
        length = lens_list[index]
        free = tree.smallest_at_least(length)
        if free < 0:
            row, free = len(bins), max_length
            bins.append([])
        else:
            heap = rows_by_free[free]
            row = heapq.heappop(heap)
            if not heap:
                del rows_by_free[free]
                tree.set(free, False)
        bins[row].append(index)
        left = free - length
        if left > 0:
            heap = rows_by_free.get(left)
            if heap is None:
                rows_by_free[left] = heap = []
                tree.set(left, True)
            heapq.heappush(heap, row)
    return bins


def pack_dataset(tokenized: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Pack a tokenized dataset into rows of at most ``max_length`` tokens with BFD (:func:`pack_bfd`).

    Args:
        tokenized: rows with ``input_ids`` (``list[int]``) and optionally ``labels`` (a copy of ``input_ids``
            when missing); other columns are dropped. Every row must have ``1..max_length`` tokens.
        max_length (int): tokens per packed row at most.

    Returns:
        ``datasets.Dataset`` with, per packed row: ``input_ids`` and ``labels`` (the documents concatenated,
        no padding), ``position_ids`` (``0..len-1`` within each document) and ``seq_lengths`` (the document
        lengths, summing to the row's length).

    Raises:
        DatasetError: no ``input_ids`` column, or ``labels`` of a different length than ``input_ids``.
        ConfigurationError: a row longer than ``max_length`` or empty.
    """
    if "input_ids" not in tokenized.column_names:
        raise DatasetError(
            f"pack_dataset needs a tokenized dataset with an 'input_ids' column, got columns "
            f"{tokenized.column_names}. Tokenize it first (tokenize_sft_dataset)."
        )
    if len(tokenized) == 0:
        raise DatasetError("cannot pack an empty dataset (0 rows)")
    columns = ["input_ids", "labels"] if "labels" in tokenized.column_names else ["input_ids"]
    table = tokenized.select_columns(columns).with_format("arrow")[:]  # honours an indices mapping
    ids_col = table.column("input_ids").combine_chunks()
    labels_col = table.column("labels").combine_chunks() if "labels" in columns else ids_col
    lengths = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False).astype(np.int64)
    if labels_col is not ids_col:
        label_lengths = pc.list_value_length(labels_col).to_numpy(zero_copy_only=False).astype(np.int64)
        bad = np.flatnonzero(label_lengths != lengths)
        if bad.size:
            i = int(bad[0])
            raise DatasetError(
                f"row {i}: 'labels' has {int(label_lengths[i])} tokens but 'input_ids' has {int(lengths[i])}; "
                "they must have the same length"
            )

    bins = pack_bfd(lengths, max_length)
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(lengths))
    docs_per_row = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))

    doc_lengths = lengths[order]
    row_offsets = np.zeros(len(bins) + 1, dtype=np.int64)
    row_doc_end = np.cumsum(docs_per_row)
    doc_ends = np.cumsum(doc_lengths)
    row_offsets[1:] = doc_ends[row_doc_end - 1]
    doc_starts = doc_ends - doc_lengths
    positions = np.arange(int(doc_ends[-1]), dtype=np.int64) - np.repeat(doc_starts, doc_lengths)

    take = pa.array(order)

    def flat(col: pa.Array) -> pa.Array:
        return col.take(take).flatten()

    offsets = pa.array(row_offsets, type=pa.int64())
    packed = pa.table({
        "input_ids": pa.LargeListArray.from_arrays(offsets, flat(ids_col)).cast(pa.list_(ids_col.type.value_type)),
        "labels": pa.LargeListArray.from_arrays(offsets, flat(labels_col)).cast(pa.list_(labels_col.type.value_type)),
        "position_ids": pa.LargeListArray.from_arrays(offsets, pa.array(positions)).cast(pa.list_(pa.int64())),
        "seq_lengths": pa.ListArray.from_arrays(
            pa.array(np.concatenate([[0], row_doc_end]).astype(np.int32)), pa.array(doc_lengths)
        ),
    })
    return datasets.Dataset(packed)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative document lengths of packed rows, in flash-attention's ``cu_seqlens`` convention.

    A document starts at every position id 0 and at the start of every row; the rows are taken as one
    concatenated sequence (padding-free batching).

    Args:
        position_ids (Tensor): int ``[1, n]`` or ``[b, n]`` (or ``[n]``), restarting at 0 per document.

    Returns:
        int32 ``[n_docs + 1]``: ``0, end of document 1, ..., b * n``.
    """
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() != 2:
        raise ConfigurationError(f"position_ids must be [b, n], got shape {tuple(position_ids.shape)}")
    b, n = position_ids.shape
    starts = position_ids == 0
    if n:
        starts = starts.clone()
        starts[:, 0] = True
    flat_starts = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
    total = torch.tensor([b * n], device=position_ids.device, dtype=flat_starts.dtype)
    return torch.cat([flat_starts, total]).to(torch.int32)
