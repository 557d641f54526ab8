"""Malformed rows fed to the data preparation of DPO / ORPO, KTO, GRPO and classification (SFT's is in
test_hostile_data.py): each kind of row gets a DatasetError that starts with "example <i>" for the malformed row, or
the handling documented in docs/training.md ("Malformed rows") — never a stack trace from tokenization or collation.

For each trainer a seeded generator builds variants of every kind and places each among well-formed rows at a random
position. DPO and ORPO share one preparation (``tokenize_preference_dataset``); GRPO's is ``GRPOTrainer._as_dataset``
(prompts are tokenized at each rollout, so they are checked up front).
"""

from __future__ import annotations

import random
import warnings

import pytest

from engine.errors import DatasetError
from tests.training.hostile import prepared_or_checked_error
from engine.training.classification import tokenize_classification_dataset
from engine.training.grpo import GRPOTrainer
from engine.training.kto_data import tokenize_unpaired_dataset
from engine.training.preference_data import tokenize_preference_dataset

VARIANTS = 8  # per kind and trainer
MAX_LENGTH = 96


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(1, 12))).strip() or "x"


def _user(rng):
    return [{"role": "user", "content": _word(rng)}]


def _reply(rng):
    return [{"role": "assistant", "content": _word(rng)}]


# ------------------------------------------------------------------------------------------ well-formed rows
def _dpo_conversational(rng):
    return {"prompt": _user(rng), "chosen": _reply(rng), "rejected": _reply(rng)}


def _dpo_text(rng):
    return {"prompt": _word(rng), "chosen": " " + _word(rng), "rejected": " " + _word(rng)}


def _kto_conversational(rng):
    return {"prompt": _user(rng), "completion": _reply(rng), "label": rng.random() < 0.5}


def _grpo_conversational(rng):
    return {"prompt": _user(rng), "answer": _word(rng)}


def _grpo_text(rng):
    return {"prompt": _word(rng), "answer": _word(rng)}


def _classification(rng):
    return {"text": _word(rng), "label": rng.randrange(3)}


# ------------------------------------------------------------------------------------------ malformed rows
# A kind is (row generator, outcome); the generator mutates a well-formed row in one of the trainer's text columns.
# An outcome is ("error", regex the message matches after "example <i>") or ("ok", None).
ARROW = "do not fit the types|own values"


def _set(column_choices, value_fn):
    def make(rng, good):
        row = good(rng)
        row[rng.choice(column_choices)] = value_fn(rng)
        return row
    return make


def _with_message(column_choices, **message):
    def make(rng, good):
        row = good(rng)
        column = rng.choice(column_choices)
        turns = list(row[column])
        turns[rng.randrange(len(turns))] = {k: (v(rng) if callable(v) else v) for k, v in message.items()}
        row[column] = turns
        return row
    return make


def _drop_column(column_choices):
    def make(rng, good):
        row = good(rng)
        del row[rng.choice(column_choices)]
        return row
    return make


def _not_a_dict(rng, good):
    return rng.choice([[1, 2], "row", 5])


def _conversation_kinds(columns, prompt="prompt", completions=()):
    """Kinds for trainers whose ``columns`` hold conversations (``prompt`` a user turn, ``completions`` replies)."""
    big = lambda r: "word " * r.randint(300, 1_500)  # noqa: E731
    kinds = {
        "value is None": (_set(columns, lambda r: None), ("error", r" has no '\w+' \(None\)")),
        "value not a list": (_set(columns, lambda r: r.choice([_word(r), 7, 2.5, True])),
                             ("error", r"column '\w+' holds a (str|number|bool), while \d+ of \d+ examples hold a list")),
        "message not a dict": (_set(columns, lambda r: [_word(r), _word(r)]), ("error", ARROW)),
        "message without content": (_with_message(columns, role="user"), ("error", "has no content")),
        "content is None": (_with_message(columns, role="user", content=None), ("error", "has no content")),
        "content not a string": (_with_message(columns, role="user", content=lambda r: r.choice([3, 4.5, {"a": 1}])),
                                 ("error", ARROW + "|has content of type")),
        "message without role": (_with_message(columns, content=_word), ("error", "has no 'role'")),
        "empty conversation": (_set(columns, lambda r: []), ("error", "is an empty conversation")),
        "bytes content": (_with_message(columns, role="user", content=lambda r: _word(r).encode()),
                          ("error", "bytes instead of text")),
        "invalid UTF-8 (lone surrogate)": (_with_message(columns, role="user", content=lambda r: "a\udcff" + _word(r)),
                                           ("error", "not valid UTF-8")),
        "column missing in some rows": (_drop_column(columns), ("error", r"has no '\w+' column, which \d+ of")),
        "not a dict": (_not_a_dict, ("error", "expected a dict of columns")),
        "unknown role": (_with_message([prompt], role=lambda r: r.choice(["wizard", "bot"]), content=_word), ("ok", None)),
        "roles out of order": (_set([prompt], lambda r: _reply(r) + _user(r)), ("ok", None)),
        "only a system message": (_set([prompt], lambda r: [{"role": "system", "content": _word(r)}]), ("ok", None)),
        "enormous prompt": (_set([prompt], lambda r: [{"role": "user", "content": big(r)}]),
                            ("ok", None) if not completions else ("error", f"a prompt of max_length={MAX_LENGTH} tokens or more")),
    }
    if completions:
        kinds["enormous completion"] = (_set(list(completions), lambda r: [{"role": "assistant", "content": big(r)}]), ("ok", None))
    return kinds


def _text_kinds(columns, prompt="prompt", completions=()):
    """Kinds for trainers whose ``columns`` hold strings."""
    big = lambda r: "word " * r.randint(300, 1_500)  # noqa: E731
    kinds = {
        "value is None": (_set(columns, lambda r: None), ("error", r" has no '\w+' \(None\)|holds NoneType")),
        "value not a string": (_set(columns, lambda r: r.choice([7, 2.5, True, [_word(r)]])),
                               ("error", r"column '\w+' holds a (number|bool|list), while \d+ of \d+ examples hold a str")),
        "bytes": (_set(columns, lambda r: _word(r).encode()), ("error", "bytes instead of text")),
        "invalid UTF-8 (lone surrogate)": (_set(columns, lambda r: "a\udcff" + _word(r)), ("error", "not valid UTF-8")),
        "column missing in some rows": (_drop_column(columns), ("error", r"has no '\w+' column, which \d+ of")),
        "not a dict": (_not_a_dict, ("error", "expected a dict of columns")),
        "enormous prompt": (_set([prompt], big),
                            ("ok", None) if not completions else ("error", f"a prompt of max_length={MAX_LENGTH} tokens or more")),
    }
    if completions:
        kinds["enormous completion"] = (_set(list(completions), big), ("ok", None))
    return kinds


def _label_kinds(values_and_outcomes):
    return {
        name: (_set(["label"], lambda r, v=value: v(r) if callable(v) else v), outcome)
        for name, (value, outcome) in values_and_outcomes.items()
    }


KTO_LABELS = _label_kinds({
    "label is None": (None, ("error", "'label' must be True .* has None")),
    "label is a number": (lambda r: r.choice([0, 1, 0.5]), ("error", r"column 'label' holds a number, while")),
    "label is a string": (lambda r: r.choice(["yes", "good"]), ("error", r"column 'label' holds a str, while")),
})
CLASSIFICATION_LABELS = _label_kinds({
    "label is None": (None, ("error", "label None is not a class index")),
    "label is a bool": (lambda r: r.choice([True, False]), ("error", "label (True|False) is not a class index|column .label. holds a bool, while")),
    "label is an unknown name": (lambda r: r.choice(["spam", "ham"]), ("error", "is not a known class name|column .label. holds a str, while")),
    "label out of range": (lambda r: r.choice([3, 7, -1]), ("error", r"label -?\d+ is outside \[0, 3\)")),
    "label is a float among class indices": (lambda r: r.choice([0.5, 1.0]), ("error", r"is a float, while \d+ of \d+ labels are class indices")),
    "label is a list": (lambda r: [0, 1], ("error", r"column 'label' holds a list, while")),
})
CLASSIFICATION_TEXT = {
    **{k: v for k, v in _text_kinds(["text"], prompt="text").items() if k != "enormous prompt"},
    "value is None": (_set(["text"], lambda r: None), ("error", r"column 'text' holds NoneType, expected a string")),
    "empty text": (_set(["text"], lambda r: ""), ("error", "has an empty text")),
    "enormous text": (_set(["text"], lambda r: "word " * r.randint(300, 1_500)), ("ok", None)),
}


def _quiet(fn):
    def run(rows, tokenizer):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(rows, tokenizer)
    return run


TRAINERS = {
    "dpo/orpo conversational": (
        _dpo_conversational,
        _conversation_kinds(["prompt", "chosen", "rejected"], completions=("chosen", "rejected")),
        lambda rows, tok: tokenize_preference_dataset(rows, tok, max_length=MAX_LENGTH),
    ),
    "dpo/orpo text": (
        _dpo_text,
        _text_kinds(["prompt", "chosen", "rejected"], completions=("chosen", "rejected")),
        lambda rows, tok: tokenize_preference_dataset(rows, tok, max_length=MAX_LENGTH),
    ),
    "kto conversational": (
        _kto_conversational,
        {**_conversation_kinds(["prompt", "completion"], completions=("completion",)), **KTO_LABELS},
        lambda rows, tok: tokenize_unpaired_dataset(rows, tok, max_length=MAX_LENGTH, require_both_labels=False),
    ),
    "grpo conversational": (
        _grpo_conversational,
        _conversation_kinds(["prompt"]),
        lambda rows, tok: GRPOTrainer._as_dataset(rows, "train_dataset"),
    ),
    "grpo text": (
        _grpo_text,
        _text_kinds(["prompt"]),
        lambda rows, tok: GRPOTrainer._as_dataset(rows, "train_dataset"),
    ),
    "classification": (
        _classification,
        {**CLASSIFICATION_TEXT, **CLASSIFICATION_LABELS},
        lambda rows, tok: tokenize_classification_dataset(rows, tok, num_labels=3, max_length=MAX_LENGTH),
    ),
}


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_every_kind_of_malformed_row_has_its_documented_outcome(trainer, smollm2_tokenizer):
    good, kinds, prepare = TRAINERS[trainer]
    prepare = _quiet(prepare)
    rng = random.Random(sum(map(ord, trainer)))
    seen = dict.fromkeys(kinds, 0)
    for trial in range(VARIANTS * len(kinds)):
        kind = list(kinds)[trial % len(kinds)]
        make, (outcome, expected) = kinds[kind]
        rows = [good(rng) for _ in range(rng.randint(2, 4))]  # well-formed rows are the majority
        position = rng.randint(0, len(rows))
        rows.insert(position, make(rng, good))
        out = prepared_or_checked_error(lambda: prepare(rows, smollm2_tokenizer), position, outcome, expected,
                                        f"{trainer}, {kind}")
        if out is not None:
            assert len(out) == len(rows)
            if "input_ids" in out.column_names:  # classification truncates texts
                assert max(len(ids) for ids in out["input_ids"]) <= MAX_LENGTH, (trainer, kind)
            if "chosen_ids" in out.column_names:  # DPO truncates prompt + completion (KTO does it at collation)
                for row in out:
                    assert len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= MAX_LENGTH
        seen[kind] += 1
    assert set(seen.values()) == {VARIANTS}, seen


def test_a_template_that_checks_roles_is_reported_with_the_row(smollm2_tokenizer):
    """DPO and KTO render conversations with the chat template: its own errors name the row."""
    import copy

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    )
    rng = random.Random(3)
    rows = [_dpo_conversational(rng), dict(_dpo_conversational(rng), prompt=_reply(rng) + _user(rng))]
    with pytest.raises(DatasetError, match=r"^example 1: the chat template could not render it: Conversation roles"):
        tokenize_preference_dataset(rows, tok, max_length=None)
    rows = [_kto_conversational(rng), dict(_kto_conversational(rng), prompt=_reply(rng))]
    with pytest.raises(DatasetError, match=r"^example 1: the chat template could not render it: Conversation roles"):
        tokenize_unpaired_dataset(rows, tok, max_length=None, require_both_labels=False)
