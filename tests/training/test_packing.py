"""Packing (BFD), collators, and the exactness of padding-free packed training against per-document runs."""

from __future__ import annotations

import random
import time

import datasets
import pytest
import torch

from engine import FastModel
from engine.errors import ConfigurationError, DatasetError
from engine.training.collators import PaddedCollator, PaddingFreeCollator
from engine.training.packing import cu_seqlens_from_position_ids, pack_bfd, pack_dataset
from engine.training.sft_data import tokenize_sft_dataset


@pytest.fixture(autouse=True)
def _quiet_progress():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


# ------------------------------------------------------------------------------------------------ pack_bfd
def naive_bfd(lengths, capacity):
    """Quadratic reference: longest first (ties by index), into the fullest bin that fits (ties: lowest bin)."""
    bins, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if free[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (free[b], b))
        else:
            b = len(bins)
            bins.append([])
            free.append(capacity)
        bins[b].append(i)
        free[b] -= lengths[i]
    return bins


def optimal_bins(lengths, capacity) -> int:
    """Exact minimum number of bins by exhaustive search (small inputs only)."""
    items = sorted(lengths, reverse=True)
    best = [len(items)]

    def place(k, loads):
        if len(loads) >= best[0]:
            return
        if k == len(items):
            best[0] = len(loads)
            return
        seen = set()
        for j, load in enumerate(loads):
            if load + items[k] <= capacity and load not in seen:
                seen.add(load)
                loads[j] += items[k]
                place(k + 1, loads)
                loads[j] -= items[k]
        loads.append(items[k])
        place(k + 1, loads)
        loads.pop()

    place(0, [])
    return best[0]


def check_valid(bins, lengths, capacity):
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths))), "every index exactly once"
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins), "no bin over capacity"
    assert all(b for b in bins), "no empty bin"


def test_pack_bfd_simple_cases():
    assert pack_bfd([6, 4, 3, 7], 10) == [[3, 2], [0, 1]]  # 7+3 and 6+4: best fit picks the 4-free bin for 4
    assert pack_bfd([5, 5, 5, 5], 10) == [[0, 1], [2, 3]]
    assert pack_bfd([10, 1, 10], 10) == [[0], [2], [1]]
    assert pack_bfd([3], 3) == [[0]]
    assert pack_bfd([], 8) == []


def test_pack_bfd_matches_reference_and_bounds():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(1, 8)
        capacity = rng.randint(4, 20)
        lengths = [rng.randint(1, capacity) for _ in range(n)]
        bins = pack_bfd(lengths, capacity)
        check_valid(bins, lengths, capacity)
        assert bins == naive_bfd(lengths, capacity), (lengths, capacity)
        opt = optimal_bins(lengths, capacity)
        assert opt <= len(bins) <= 11 / 9 * opt + 6 / 9, (lengths, capacity, len(bins), opt)
    for trial in range(20):  # larger cases: still identical to the reference
        capacity = rng.randint(16, 64)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(50, 200))]
        assert pack_bfd(lengths, capacity) == naive_bfd(lengths, capacity)


def test_pack_bfd_deterministic_with_ties_by_index():
    lengths = [4, 4, 4, 4, 4, 4]
    assert pack_bfd(lengths, 8) == [[0, 1], [2, 3], [4, 5]]
    rng = random.Random(1)
    lengths = [rng.randint(1, 50) for _ in range(2000)]
    assert pack_bfd(lengths, 64) == pack_bfd(list(lengths), 64)


def test_pack_bfd_errors():
    with pytest.raises(ConfigurationError, match=r"example 1 has 11 tokens, more than max_length=10"):
        pack_bfd([3, 11], 10)
    with pytest.raises(ConfigurationError, match="example 0 has 0 tokens"):
        pack_bfd([0, 2], 10)
    with pytest.raises(ConfigurationError, match="max_length"):
        pack_bfd([1], 0)


def test_pack_bfd_speed_100k():
    rng = random.Random(2)
    lengths = [rng.randint(1, 2048) for _ in range(100_000)]
    start = time.perf_counter()
    bins = pack_bfd(lengths, 2048)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"pack_bfd took {elapsed:.2f} s for 100k items"
    check_valid(bins, lengths, 2048)
    assert len(bins) <= 1.01 * sum(lengths) / 2048 + 1  # near-perfect fill on uniform lengths


# ------------------------------------------------------------------------------------------------ pack_dataset
def test_pack_dataset_rows():
    rows = [{"input_ids": list(range(100 * i, 100 * i + n)), "labels": [-100] + list(range(100 * i + 1, 100 * i + n))}
            for i, n in enumerate([6, 4, 3, 7])]
    packed = pack_dataset(datasets.Dataset.from_list(rows), max_length=10)
    assert packed.column_names == ["input_ids", "labels", "position_ids", "seq_lengths"]
    assert len(packed) == 2
    first, second = packed[0], packed[1]
    assert first["input_ids"] == rows[3]["input_ids"] + rows[2]["input_ids"]
    assert first["labels"] == rows[3]["labels"] + rows[2]["labels"]
    assert first["position_ids"] == list(range(7)) + list(range(3))
    assert first["seq_lengths"] == [7, 3]
    assert second["input_ids"] == rows[0]["input_ids"] + rows[1]["input_ids"]
    assert second["seq_lengths"] == [6, 4]


def test_pack_dataset_respects_select_and_defaults_labels():
    rng = random.Random(3)
    rows = [{"input_ids": [rng.randint(0, 999) for _ in range(rng.randint(1, 12))]} for _ in range(40)]
    ds = datasets.Dataset.from_list(rows).shuffle(seed=0).select(range(30))  # an indices mapping
    expected_docs = sorted(tuple(r) for r in ds["input_ids"])
    packed = pack_dataset(ds, max_length=16)
    docs = []
    for row in packed:
        assert len(row["input_ids"]) <= 16 and row["labels"] == row["input_ids"]
        assert sum(row["seq_lengths"]) == len(row["input_ids"])
        start = 0
        for n in row["seq_lengths"]:
            assert row["position_ids"][start : start + n] == list(range(n))
            docs.append(tuple(row["input_ids"][start : start + n]))
            start += n
    assert sorted(docs) == expected_docs


def test_pack_dataset_errors():
    with pytest.raises(DatasetError, match="'input_ids' column"):
        pack_dataset(datasets.Dataset.from_list([{"text": "a"}]), 8)
    with pytest.raises(ConfigurationError, match="more than max_length=4"):
        pack_dataset(datasets.Dataset.from_list([{"input_ids": [1, 2, 3, 4, 5]}]), 4)
    with pytest.raises(DatasetError, match="same length"):
        pack_dataset(datasets.Dataset.from_list([{"input_ids": [1, 2], "labels": [1]}]), 4)


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu = cu_seqlens_from_position_ids(pos)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 9]
    two_rows = torch.tensor([[0, 1, 0, 1], [2, 3, 0, 1]])  # a row start is a document start
    assert cu_seqlens_from_position_ids(two_rows).tolist() == [0, 2, 4, 6, 8]


# ------------------------------------------------------------------------------------------------ collators
def test_padding_free_collator():
    features = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": torch.tensor([6, 7]), "labels": torch.tensor([-100, 7])},
        {"input_ids": [8, 9, 10], "seq_lengths": [1, 2]},
    ]
    batch = PaddingFreeCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, 7, -100, -100, 10]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5, 7, 8, 10] and batch["cu_seq_lens"].dtype == torch.int32
    assert all(batch[k].dtype == torch.int64 for k in ("input_ids", "labels", "position_ids"))
    assert "attention_mask" not in batch

    padded = PaddingFreeCollator(pad_token_id=0, pad_to_multiple_of=8)(features)
    assert padded["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 0, 0, 0, 0, 0]]
    assert padded["position_ids"][0, 10:].tolist() == list(range(6))
    assert padded["labels"][0, 10:].tolist() == [-100] * 6
    assert padded["cu_seq_lens"].tolist() == [0, 3, 5, 7, 8, 10, 16]


def test_padded_collator():
    features = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": torch.tensor([4])}]
    right = PaddedCollator(pad_token_id=0)(features)
    assert right["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 2, 3], [-100, -100, -100]]
    left = PaddedCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=4)(features)
    assert left["input_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]]
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert left["labels"].tolist() == [[-100, -100, 2, 3], [-100, -100, -100, -100]]  # first tokens: never predicted
    assert all(t.dtype == torch.int64 for t in left.values())
    with pytest.raises(ConfigurationError, match="PaddingFreeCollator"):
        PaddedCollator(pad_token_id=0)([{"input_ids": [1, 2, 3], "position_ids": [0, 1, 0]}])
    with pytest.raises(ConfigurationError, match="padding_side"):
        PaddedCollator(pad_token_id=0, padding_side="middle")


# ------------------------------------------------------------------------------------------------ exactness
@pytest.fixture(scope="module")
def tiny_model(tiny_chat_folder):
    model, tokenizer = FastModel.from_pretrained(str(tiny_chat_folder), dtype="float32", verbose=False)
    return model.eval(), tokenizer


DOCS = [
    {"prompt": "Convert 3 km to meters.", "completion": " 3000 meters."},
    {"prompt": "Hi", "completion": " Hello there, how can I help you today?"},
    {"prompt": "Name a colour that is also a fruit, and say why it is called that.", "completion": " Orange."},
    {"prompt": "2+2=", "completion": " 4"},
]


def n_predicted(labels: torch.Tensor) -> int:
    """Tokens the loss averages over: labels are shifted inside the model, so position 0 is never predicted."""
    return int((labels[..., 1:] != -100).sum())


def per_document(model, docs):
    """``[(loss, n_predicted, logits [len, V]), ...]`` of each document run alone."""
    out = []
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([doc["input_ids"]])
            labels = torch.tensor([doc["labels"]])
            res = model(input_ids=ids, labels=labels, return_logits=True)
            out.append((res.loss.double(), n_predicted(labels), res.logits[0]))
    return out


def test_padding_free_packed_loss_and_logits_equal_per_document_runs(tiny_model):
    model, tokenizer = tiny_model
    docs = tokenize_sft_dataset(DOCS, tokenizer, max_length=None)
    lengths = [len(ids) for ids in docs["input_ids"]]
    assert len(set(lengths)) == len(lengths)  # documents of different lengths
    packed = pack_dataset(docs, max_length=sum(lengths))
    assert len(packed) == 1 and len(packed[0]["seq_lengths"]) == 4
    batch = PaddingFreeCollator(pad_token_id=tokenizer.pad_token_id)([packed[0]])
    assert batch["cu_seq_lens"].tolist()[-1] == sum(lengths)
    inputs = {k: v for k, v in batch.items() if k != "cu_seq_lens"}
    with torch.no_grad():
        res = model(**inputs, num_items_in_batch=None, return_logits=True)

    order = [docs[i] for i in _bfd_order(packed[0]["input_ids"], docs)]
    alone = per_document(model, order)
    n_packed = n_predicted(batch["labels"])
    assert n_packed == sum(n for _, n, _ in alone)
    expected = sum(loss * n for loss, n, _ in alone)
    torch.testing.assert_close(res.loss.double() * n_packed, expected, rtol=1e-5, atol=0)

    start = 0
    for _, _, logits in alone:  # RoPE restarts and no attention crosses a document boundary
        torch.testing.assert_close(res.logits[0, start : start + len(logits)], logits, rtol=0, atol=1e-5)
        start += len(logits)


def test_padding_free_batch_of_packed_rows_with_tail_padding(tiny_model):
    model, tokenizer = tiny_model
    docs = datasets.concatenate_datasets([
        tokenize_sft_dataset(DOCS, tokenizer, max_length=None),
        tokenize_sft_dataset([{"text": "A short plain text document."}], tokenizer, max_length=None),
    ])
    packed = pack_dataset(docs, max_length=max(len(ids) for ids in docs["input_ids"]) + 8)
    assert len(packed) >= 2
    batch = PaddingFreeCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=64)(list(packed))
    assert batch["input_ids"].shape[1] % 64 == 0
    inputs = {k: v for k, v in batch.items() if k != "cu_seq_lens"}
    with torch.no_grad():
        loss = model(**inputs).loss.double()
    alone = per_document(model, list(docs))
    expected = sum(loss_i * n for loss_i, n, _ in alone)
    n_packed = n_predicted(batch["labels"])
    assert n_packed == sum(n for _, n, _ in alone)
    torch.testing.assert_close(loss * n_packed, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_loss_equals_per_document_runs(tiny_model, padding_side):
    model, tokenizer = tiny_model
    # The text document trains its first token: left padding must not predict it from a pad token.
    docs = datasets.concatenate_datasets([
        tokenize_sft_dataset(DOCS, tokenizer, max_length=None),
        tokenize_sft_dataset([{"text": "Plain text."}], tokenizer, max_length=None),
    ])
    batch = PaddedCollator(pad_token_id=tokenizer.pad_token_id, padding_side=padding_side)(list(docs))
    with torch.no_grad():
        loss = model(**batch).loss.double()
    alone = per_document(model, list(docs))
    n_batch = int((batch["labels"][:, 1:] != -100).sum())
    assert n_batch == sum(n for _, n, _ in alone)
    torch.testing.assert_close(loss * n_batch, sum(loss_i * n for loss_i, n, _ in alone), rtol=1e-5, atol=0)


def _bfd_order(packed_ids: list[int], docs: datasets.Dataset) -> list[int]:
    """Indices of ``docs`` in the order they appear in a packed row."""
    order, start, remaining = [], 0, list(range(len(docs)))
    while start < len(packed_ids):
        i = next(i for i in remaining if packed_ids[start : start + len(docs[i]["input_ids"])] == docs[i]["input_ids"])
        order.append(i)
        remaining.remove(i)
        start += len(docs[i]["input_ids"])
    return order


def test_cu_seq_lens_reach_the_model(tiny_model):
    """The collator's document boundaries give the same result as restarting position ids; bad ones are refused."""
    model, tokenizer = tiny_model
    docs = tokenize_sft_dataset(DOCS, tokenizer, max_length=None)
    batch = PaddingFreeCollator(pad_token_id=tokenizer.pad_token_id)([docs[i] for i in range(len(DOCS))])
    without = {k: v for k, v in batch.items() if k != "cu_seq_lens"}
    no_positions = {k: v for k, v in batch.items() if k != "position_ids"}
    with torch.no_grad():
        ref = model(**without, return_logits=True)
        for inputs in (batch, no_positions):  # with cu_seq_lens, positions restart even when not given
            res = model(**inputs, return_logits=True)
            torch.testing.assert_close(res.loss, ref.loss, rtol=0, atol=0)
            torch.testing.assert_close(res.logits, ref.logits, rtol=0, atol=0)
        bad = batch["cu_seq_lens"].clone()
        bad[-1] -= 1
        with pytest.raises(ConfigurationError, match="cu_seq_lens .* are not increasing document boundaries"):
            model(**{**batch, "cu_seq_lens": bad})
