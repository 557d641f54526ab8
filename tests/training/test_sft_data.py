"""SFT dataset tokenization: formats, exact label masks, length policies and every error path."""

from __future__ import annotations

import warnings

import datasets
import pytest

from engine.errors import ConfigurationError, DatasetError, SequenceTooLongError
from engine.training.sft_data import detect_format, tokenize_sft_dataset, train_on_responses_only

CONV = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
]
# A template whose generation prompt ("assistant") differs from how it renders assistant turns ("bot").
BROKEN_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + ('bot' if m['role'] == 'assistant' else m['role']) + '\n' "
    "+ m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


@pytest.fixture(autouse=True)
def _quiet_progress():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def trained_runs(tok, row) -> list[str]:
    """The decoded maximal runs of consecutive trained tokens of a row."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


def chat_ids(tok, messages, **kw) -> list[int]:
    return tok(tok.apply_chat_template(messages, tokenize=False, **kw), add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize(
    "columns, expected",
    [
        (["messages"], "messages"),
        (["conversations", "id"], "messages"),
        (["prompt", "completion"], "prompt_completion"),
        (["text", "meta"], "text"),
        (["input_ids", "labels"], "tokenized"),
    ],
)
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected


def test_detect_format_custom_text_field_and_error():
    assert detect_format(["body"], dataset_text_field="body") == "text"
    with pytest.raises(DatasetError) as e:
        detect_format(["question", "answer"])
    msg = str(e.value)
    assert "['question', 'answer']" in msg and "dataset_text_field" in msg and "messages" in msg and "prompt" in msg
    with pytest.raises(DatasetError, match="no 'completion' column"):
        detect_format(["prompt"])


def test_text_trains_everything_and_appends_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ds = tokenize_sft_dataset([{"text": "The cat sat."}, {"text": "Done<|im_end|>"}], tok, max_length=None)
    assert ds.column_names == ["input_ids", "labels"]
    first, second = ds[0], ds[1]
    assert first["input_ids"] == tok("The cat sat.")["input_ids"] + [tok.eos_token_id]
    assert first["labels"] == first["input_ids"]
    # Already ends with EOS: not doubled.
    assert second["input_ids"] == tok("Done<|im_end|>")["input_ids"]
    assert second["input_ids"].count(tok.eos_token_id) == 1
    no_eos = tokenize_sft_dataset([{"text": "The cat sat."}], tok, max_length=None, add_eos=False)
    assert no_eos[0]["input_ids"] == tok("The cat sat.")["input_ids"]


def test_prompt_completion_strings(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ds = tokenize_sft_dataset(datasets.Dataset.from_list([{"prompt": "What is 2+2?", "completion": " 4"}]), tok,
                              max_length=None)
    row = ds[0]
    prompt_ids = tok("What is 2+2?")["input_ids"]
    assert row["input_ids"] == prompt_ids + tok(" 4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["labels"][: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert trained_runs(tok, row) == [" 4<|im_end|>"]
    everything = tokenize_sft_dataset([{"prompt": "What is 2+2?", "completion": " 4"}], tok, max_length=None,
                                      completion_only_loss=False)
    assert everything[0]["labels"] == everything[0]["input_ids"] == row["input_ids"]


def test_prompt_completion_conversational(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ds = tokenize_sft_dataset([{"prompt": CONV[:1], "completion": CONV[1:2]}], tok, max_length=None)
    row = ds[0]
    assert row["input_ids"] == chat_ids(tok, CONV[:2])
    n_prompt = len(chat_ids(tok, CONV[:1], add_generation_prompt=True))
    assert tok.decode(row["input_ids"][:n_prompt]).endswith("<|im_start|>assistant\n")
    assert trained_runs(tok, row) == ["Hello!<|im_end|>"]
    assert row["labels"].index(row["input_ids"][n_prompt]) == n_prompt  # training starts right after the prompt


def test_messages_trains_everything_by_default(smollm2_tokenizer):
    tok = smollm2_tokenizer
    row = tokenize_sft_dataset([{"messages": CONV}], tok, max_length=None)[0]
    assert row["input_ids"] == tok.apply_chat_template(CONV, tokenize=True)["input_ids"]
    assert row["labels"] == row["input_ids"]


def test_assistant_only_loss_trains_exactly_the_assistant_turns(smollm2_tokenizer):
    tok = smollm2_tokenizer
    row = tokenize_sft_dataset([{"messages": CONV}], tok, max_length=None, assistant_only_loss=True)[0]
    assert row["input_ids"] == chat_ids(tok, CONV)
    assert trained_runs(tok, row) == ["Hello!<|im_end|>", "See you.<|im_end|>"]
    # Each run starts right after the assistant header, which is not trained.
    first = next(i for i, label in enumerate(row["labels"]) if label != -100)
    assert tok.decode(row["input_ids"][:first]).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_sharegpt_conversations_are_converted(smollm2_tokenizer):
    tok = smollm2_tokenizer
    sharegpt = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in CONV]
    row = tokenize_sft_dataset([{"conversations": sharegpt}], tok, max_length=None, assistant_only_loss=True)[0]
    expected = tokenize_sft_dataset([{"messages": CONV}], tok, max_length=None, assistant_only_loss=True)[0]
    assert row == expected


def test_tokenized_rows_pass_through(smollm2_tokenizer):
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}]
    assert tokenize_sft_dataset(rows, smollm2_tokenizer, max_length=None)[0] == rows[0]
    copied = tokenize_sft_dataset([{"input_ids": [5, 6, 7]}], smollm2_tokenizer, max_length=None)[0]
    assert copied["labels"] == [5, 6, 7]


# ------------------------------------------------------------------------------------------------ lengths
def test_truncate_keeps_the_start_with_one_warning(smollm2_tokenizer):
    tok = smollm2_tokenizer
    rows = [{"text": "one two three four five six seven eight nine ten"}, {"text": "short"},
            {"text": "alpha beta gamma delta epsilon zeta eta theta"}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = tokenize_sft_dataset(rows, tok, max_length=5)
    messages = [str(w.message) for w in caught if "max_length" in str(w.message)]
    assert len(messages) == 1 and "2 of 3 examples" in messages[0] and "split" in messages[0]
    assert ds[0]["input_ids"] == tok(rows[0]["text"])["input_ids"][:5]
    assert ds[1]["input_ids"] == tok("short")["input_ids"] + [tok.eos_token_id]
    assert all(len(ids) <= 5 for ids in ds["input_ids"])


def test_split_cuts_into_chunks_and_drops_masked_ones(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "one two three four five six seven eight nine ten eleven"
    full = tok(text)["input_ids"] + [tok.eos_token_id]
    ds = tokenize_sft_dataset([{"text": text}], tok, max_length=4, truncation="split")
    chunks = ds["input_ids"]
    assert [len(c) for c in chunks] == [4] * (len(full) // 4) + ([len(full) % 4] if len(full) % 4 else [])
    assert [t for c in chunks for t in c] == full
    # A long prompt: the chunks that hold only prompt tokens are dropped, the completion's chunk(s) kept.
    prompt = "word " * 12
    pc = tokenize_sft_dataset([{"prompt": prompt, "completion": " yes"}], tok, max_length=4, truncation="split")
    n_prompt = len(tok(prompt)["input_ids"])
    ids = tok(prompt)["input_ids"] + tok(" yes", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labels = [-100] * n_prompt + ids[n_prompt:]
    kept = [i for i in range(0, len(ids), 4) if any(label != -100 for label in labels[i + 1 : i + 4])]
    assert n_prompt >= 8 and len(kept) < len(range(0, len(ids), 4))  # some chunks were dropped
    assert pc["input_ids"] == [ids[i : i + 4] for i in kept]
    assert pc["labels"] == [labels[i : i + 4] for i in kept]


def test_too_long_with_error_names_the_example(smollm2_tokenizer):
    rows = [{"text": "short"}, {"text": "one two three four five six seven eight nine ten"}]
    with pytest.raises(SequenceTooLongError) as e:
        tokenize_sft_dataset(rows, smollm2_tokenizer, max_length=6, truncation="error")
    msg = str(e.value)
    n = len(smollm2_tokenizer(rows[1]["text"])["input_ids"]) + 1
    assert "example 1" in msg and f"{n} tokens" in msg and "max_length=6" in msg
    assert "truncate" in msg and "split" in msg


def test_unknown_truncation_mode(smollm2_tokenizer):
    with pytest.raises(ConfigurationError, match="truncation"):
        tokenize_sft_dataset([{"text": "a b"}], smollm2_tokenizer, max_length=4, truncation="keep_end")


# ------------------------------------------------------------------------------------------------ errors
def test_empty_dataset(smollm2_tokenizer):
    with pytest.raises(DatasetError, match="empty"):
        tokenize_sft_dataset([], smollm2_tokenizer, max_length=None)
    with pytest.raises(DatasetError, match="empty"):
        tokenize_sft_dataset(datasets.Dataset.from_dict({"text": []}), smollm2_tokenizer, max_length=None)


def test_missing_columns(smollm2_tokenizer):
    with pytest.raises(DatasetError, match=r"columns \['question', 'answer'\]"):
        tokenize_sft_dataset([{"question": "q", "answer": "a"}], smollm2_tokenizer, max_length=None)


def test_no_chat_template(smollm2_tokenizer, monkeypatch):
    monkeypatch.setattr(smollm2_tokenizer, "chat_template", None)
    for rows in ([{"messages": CONV}], [{"prompt": CONV[:1], "completion": CONV[1:2]}]):
        with pytest.raises(DatasetError, match="no chat template") as e:
            tokenize_sft_dataset(rows, smollm2_tokenizer, max_length=None)
        assert "tokenizer.chat_template" in str(e.value) and "'text'" in str(e.value)


def test_template_breaking_the_prefix_property(smollm2_tokenizer, monkeypatch):
    monkeypatch.setattr(smollm2_tokenizer, "chat_template", BROKEN_TEMPLATE)
    with pytest.raises(DatasetError, match="example 0: .* not a prefix"):
        tokenize_sft_dataset([{"messages": CONV}], smollm2_tokenizer, max_length=None, assistant_only_loss=True)
    with pytest.raises(DatasetError, match="example 0: .* not a prefix"):
        tokenize_sft_dataset([{"prompt": CONV[:1], "completion": CONV[1:2]}], smollm2_tokenizer, max_length=None)


def test_loss_flags_must_fit_the_format(smollm2_tokenizer):
    with pytest.raises(DatasetError, match="completion_only_loss=True needs a prompt-completion"):
        tokenize_sft_dataset([{"text": "a b"}], smollm2_tokenizer, max_length=None, completion_only_loss=True)
    with pytest.raises(DatasetError, match="assistant_only_loss=True needs a conversational"):
        tokenize_sft_dataset([{"prompt": "a", "completion": "b"}], smollm2_tokenizer, max_length=None,
                             assistant_only_loss=True)


def test_mixed_prompt_completion_types(smollm2_tokenizer):
    with pytest.raises(DatasetError, match="both must be strings, or both lists"):
        tokenize_sft_dataset([{"prompt": CONV[:1], "completion": "Hello"}], smollm2_tokenizer, max_length=None)


def test_fully_masked_example_raises_or_is_dropped(smollm2_tokenizer):
    tok = smollm2_tokenizer
    rows = [{"prompt": "Hi", "completion": " there"}, {"prompt": "word " * 20, "completion": " yes"}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DatasetError) as e:
            tokenize_sft_dataset(rows, tok, max_length=8)
    msg = str(e.value)
    assert "example 1" in msg and "max_length=8" in msg and "drop_fully_masked" in msg
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = tokenize_sft_dataset(rows, tok, max_length=8, drop_fully_masked=True)
    assert len(ds) == 1 and trained_runs(tok, ds[0]) == [" there<|im_end|>"]
    assert sum("dropped 1 of 2" in str(w.message) for w in caught) == 1
    # Every example dropped: nothing left to train on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DatasetError, match="no example is left"):
            tokenize_sft_dataset(rows[1:], tok, max_length=8, drop_fully_masked=True)


def test_conversation_without_assistant_turn(smollm2_tokenizer):
    rows = [{"messages": CONV}, {"messages": [{"role": "user", "content": "Anyone?"}]}]
    with pytest.raises(DatasetError, match="example 1 .* no assistant message"):
        tokenize_sft_dataset(rows, smollm2_tokenizer, max_length=None, assistant_only_loss=True)


# ------------------------------------------------------------------------------------------------ Unsloth helper
def test_train_on_responses_only(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ds = tokenize_sft_dataset([{"messages": CONV}, {"messages": CONV[:2]}], tok, max_length=None)
    masked = train_on_responses_only(ds, tok, instruction_part="<|im_start|>user\n",
                                     response_part="<|im_start|>assistant\n")
    assert masked["input_ids"] == ds["input_ids"]
    # Unsloth semantics: from after the response marker up to the next instruction marker (or the end).
    assert trained_runs(tok, masked[0]) == ["Hello!<|im_end|>\n", "See you.<|im_end|>\n"]
    assert trained_runs(tok, masked[1]) == ["Hello!<|im_end|>\n"]


def test_train_on_responses_only_missing_marker(smollm2_tokenizer):
    tok = smollm2_tokenizer
    rows = [{"input_ids": chat_ids(tok, CONV[:2])}, {"input_ids": tok("no chat here")["input_ids"]}]
    with pytest.raises(DatasetError, match="example 1: response_part='<\\|im_start\\|>assistant\\\\n'"):
        train_on_responses_only(rows, tok, instruction_part="<|im_start|>user\n",
                                response_part="<|im_start|>assistant\n")
    with pytest.raises(DatasetError, match="'input_ids' column"):
        train_on_responses_only([{"text": "a"}], tok, "<|im_start|>user\n", "<|im_start|>assistant\n")
