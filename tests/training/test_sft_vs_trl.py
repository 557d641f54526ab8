"""The batches our SFTTrainer feeds the model against TRL 1.16's SFTTrainer: same tokenizer, template and rows.

Both trainers are built on the same rows (no training); the first batch is each trainer's collator applied to its
prepared dataset in order: ``input_ids``, ``labels``, ``attention_mask`` (padded) or ``position_ids`` (packed).
Where they differ, the test asserts the difference documented in docs/training.md ("Where our SFT data differs
from TRL"), exactly:

1. padded batches: our collator sets each row's first label to -100 (never predicted: the model shifts labels by
   one, so the loss is the same); TRL keeps it.
2. string prompt + completion: we tokenize the prompt and the completion separately, TRL tokenizes them together and
   starts the completion where the two tokenizations diverge. Identical unless tokens merge across the boundary.
3. conversational prompt + completion with ``completion_only_loss``: we do not train the whitespace the template
   writes after the completion's end-of-turn token (ChatML's ``"\\n"`` after ``<|im_end|>``); TRL does.
"""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
import trl

from engine import FastModel, SFTConfig, SFTTrainer
from engine.chat_templates import get_chat_template
from tests.conftest import make_tiny_chat_hf_model

MAX_LENGTH = 64

TEXT = [
    {"text": "Hello world, this is a test."},
    {"text": "Another one"},
    {"text": "ends with the end token<|im_end|>"},
    {"text": " ".join(f"word{i}" for i in range(60))},  # longer than MAX_LENGTH: truncated by both (keep_start)
]
#: prompt/completion pairs whose tokens do not merge across the boundary
PAIRS = [
    {"prompt": "What is 2+2?", "completion": " It is 4."},
    {"prompt": "Name a colour.", "completion": " Blue."},
    {"prompt": "Translate 'chat' to English:", "completion": " cat"},
]
#: pairs whose tokens merge across the boundary ("wor" + "ld" -> "world"; "hi: " + "hi" -> "hi:" + " hi")
MERGING_PAIRS = [{"prompt": "Hello wor", "completion": "ld"}, {"prompt": "Say hi: ", "completion": "hi"}]
MESSAGES = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
    ]},
]
CONVERSATIONAL_PAIRS = [
    {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
     "completion": [{"role": "assistant", "content": "4"}]},
]


@pytest.fixture(scope="module")
def engine_model(tiny_chat_folder):
    model, _ = FastModel.from_pretrained(str(tiny_chat_folder), dtype="float32", max_seq_length=256, verbose=False)
    return FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, random_state=0)


@pytest.fixture(scope="module")
def chatml_tokenizer(smollm2_tokenizer):
    """SmolLM2's tokenizer with the engine's ChatML template, which has ``{% generation %}`` markers (TRL needs them
    for ``assistant_only_loss``)."""
    return get_chat_template(copy.deepcopy(smollm2_tokenizer), "chatml")


def _first_batch(trainer) -> dict[str, torch.Tensor]:
    """What the trainer's collator makes of its whole prepared dataset, in order (one batch)."""
    ds = trainer.train_dataset
    return trainer.data_collator([ds[i] for i in range(len(ds))])


def trl_batch(rows, tokenizer, tmp_path, **config) -> dict[str, torch.Tensor]:
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], bf16=False, use_cpu=True, max_length=MAX_LENGTH,
        per_device_train_batch_size=len(rows), disable_tqdm=True, **config,
    )
    trainer = trl.SFTTrainer(
        model=make_tiny_chat_hf_model(), args=args, train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    return _first_batch(trainer)


def our_batch(rows, tokenizer, model, tmp_path, **config) -> dict[str, torch.Tensor]:
    config.setdefault("packing", False)  # TRL's default
    args = SFTConfig(
        output_dir=str(tmp_path / "ours"), report_to=[], use_cpu=True, max_length=MAX_LENGTH, save_strategy="no",
        per_device_train_batch_size=len(rows), disable_tqdm=True, **config,
    )
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, args=args, train_dataset=rows)
    return _first_batch(trainer)


def _first_label_masked(labels: torch.Tensor) -> torch.Tensor:
    """Difference 1: our padded collator's labels are TRL's with each row's first label set to -100."""
    out = labels.clone()
    out[:, 0] = -100
    return out


def _assert_same(ours: dict, theirs: dict, keys=("input_ids", "attention_mask", "labels")) -> None:
    for key in keys:
        assert ours[key].shape == theirs[key].shape, f"{key}: {tuple(ours[key].shape)} vs {tuple(theirs[key].shape)}"
        assert torch.equal(ours[key], theirs[key]), f"{key} differs:\nours {ours[key].tolist()}\nTRL  {theirs[key].tolist()}"


def test_text_rows_match_trl(smollm2_tokenizer, engine_model, tmp_path):
    tok = smollm2_tokenizer
    theirs = trl_batch(TEXT, tok, tmp_path)
    ours = our_batch(TEXT, tok, engine_model, tmp_path)
    assert theirs["input_ids"].shape[1] == MAX_LENGTH  # the long row is truncated by both
    _assert_same(ours, {**theirs, "labels": _first_label_masked(theirs["labels"])})


@pytest.mark.parametrize("completion_only_loss", [None, False])
def test_prompt_completion_rows_match_trl(completion_only_loss, smollm2_tokenizer, engine_model, tmp_path):
    tok = smollm2_tokenizer
    theirs = trl_batch(PAIRS, tok, tmp_path, completion_only_loss=completion_only_loss)
    ours = our_batch(PAIRS, tok, engine_model, tmp_path, completion_only_loss=completion_only_loss)
    _assert_same(ours, {**theirs, "labels": _first_label_masked(theirs["labels"])})
    trained = (ours["labels"] != -100).sum(dim=1)
    mask = ours["attention_mask"].sum(dim=1)
    if completion_only_loss is None:  # the default for this format, in both: the prompt is not trained
        assert (trained < mask - 1).all()
    else:
        assert (trained == mask - 1).all()


@pytest.mark.parametrize("completion_only_loss", [None, False])
def test_prompt_completion_merging_across_the_boundary_is_the_documented_difference(
    completion_only_loss, smollm2_tokenizer, engine_model, tmp_path
):
    """Difference 2, exactly: ours = tokenizer(prompt) + tokenizer(completion) + EOS, completion from the prompt's
    end; TRL = tokenizer(prompt + completion + EOS), completion from where it diverges from tokenizer(prompt)."""
    tok = smollm2_tokenizer
    theirs = trl_batch(MERGING_PAIRS, tok, tmp_path, completion_only_loss=completion_only_loss)
    ours = our_batch(MERGING_PAIRS, tok, engine_model, tmp_path, completion_only_loss=completion_only_loss)
    for i, row in enumerate(MERGING_PAIRS):
        prompt_ids = tok(row["prompt"])["input_ids"]
        separate = prompt_ids + tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        joint = tok(row["prompt"] + row["completion"] + tok.eos_token)["input_ids"]
        assert separate != joint  # the rows are chosen so that tokens merge
        diverge = next(j for j, (a, b) in enumerate(zip(prompt_ids, joint)) if a != b)
        for batch, ids, start in ((ours, separate, len(prompt_ids)), (theirs, joint, diverge)):
            n = int(batch["attention_mask"][i].sum())
            assert batch["input_ids"][i, :n].tolist() == ids
            start = start if completion_only_loss is None else 0
            expected = [-100] * start + ids[start:]
            if batch is ours:
                expected[0] = -100  # difference 1
            assert batch["labels"][i, :n].tolist() == expected
        # The same text either way.
        assert tok.decode(ours["input_ids"][i, : len(separate)]) == tok.decode(theirs["input_ids"][i, : len(joint)])


@pytest.mark.parametrize("template", ["smollm2", "chatml"])
def test_messages_rows_match_trl(template, smollm2_tokenizer, chatml_tokenizer, engine_model, tmp_path):
    tok = smollm2_tokenizer if template == "smollm2" else chatml_tokenizer
    theirs = trl_batch(MESSAGES, tok, tmp_path)
    ours = our_batch(MESSAGES, tok, engine_model, tmp_path)
    _assert_same(ours, {**theirs, "labels": _first_label_masked(theirs["labels"])})


def test_assistant_only_loss_matches_trl(chatml_tokenizer, engine_model, tmp_path):
    """TRL masks with the template's ``{% generation %}`` markers, we by rendering conversation prefixes: the same
    tokens (each assistant reply and its ``<|im_end|>``, not the ``"\\n"`` after it) and the same batch."""
    tok = chatml_tokenizer
    theirs = trl_batch(MESSAGES, tok, tmp_path, assistant_only_loss=True)
    ours = our_batch(MESSAGES, tok, engine_model, tmp_path, assistant_only_loss=True)
    _assert_same(ours, theirs)  # the first label is masked by both here (a system or user turn comes first)
    trained = ours["labels"][1][ours["labels"][1] != -100].tolist()
    assert tok.decode(trained) == "4<|im_end|>6<|im_end|>"


@pytest.mark.parametrize("completion_only_loss", [None, False])
def test_conversational_prompt_completion_is_the_documented_difference(
    completion_only_loss, smollm2_tokenizer, engine_model, tmp_path
):
    """Difference 3, exactly: with completion_only_loss, TRL's labels with the whitespace after the completion's
    end-of-turn token masked; without it, TRL's labels (difference 1 aside)."""
    tok = smollm2_tokenizer
    theirs = trl_batch(CONVERSATIONAL_PAIRS, tok, tmp_path, completion_only_loss=completion_only_loss)
    ours = our_batch(CONVERSATIONAL_PAIRS, tok, engine_model, tmp_path, completion_only_loss=completion_only_loss)
    expected = _first_label_masked(theirs["labels"])
    if completion_only_loss is None:
        newline = tok("\n", add_special_tokens=False)["input_ids"]
        assert len(newline) == 1
        after_end = torch.zeros_like(expected, dtype=torch.bool)
        after_end[:, 1:] = theirs["input_ids"][:, :-1] == tok.eos_token_id
        whitespace = after_end & (theirs["input_ids"] == newline[0]) & (theirs["labels"] != -100)
        assert whitespace.sum(dim=1).tolist() == [1, 1]  # one trailing "\n" per completion
        expected = expected.masked_fill(whitespace, -100)
        decoded = [tok.decode(r[r != -100]) for r in ours["labels"]]
        assert decoded == ["Hello!<|im_end|>", "4<|im_end|>"]
    _assert_same(ours, {**theirs, "labels": expected})


@pytest.mark.parametrize("rows", [TEXT, PAIRS], ids=["text", "prompt_completion"])
def test_packed_batches_match_trl(rows, smollm2_tokenizer, engine_model, tmp_path):
    """Best-fit-decreasing packing, padding-free: the same row, position ids and labels (the first label of every
    document masked by both)."""
    tok = smollm2_tokenizer
    theirs = trl_batch(rows, tok, tmp_path, packing=True)
    ours = our_batch(rows, tok, engine_model, tmp_path, packing=True)
    _assert_same(ours, theirs, keys=("input_ids", "position_ids", "labels"))
    starts = (ours["position_ids"][0] == 0).nonzero().flatten()
    assert torch.equal(ours["cu_seq_lens"][:-1].long(), starts)
    assert torch.equal(ours["cu_seq_lens"], theirs["cu_seq_lens_q"])
