"""Malformed rows fed to the SFT data preparation: each kind of row gets a DatasetError that names the row, or the
handling documented in docs/training.md ("Malformed rows") — never a stack trace from inside tokenization.

The kinds below are the rows of that table; a seeded generator builds hundreds of variants of them and places each
among well-formed rows at a random position.
"""

from __future__ import annotations

import random
import warnings

import pytest

from engine.errors import DatasetError
from tests.training.hostile import prepared_or_checked_error
from engine.training.sft_data import tokenize_sft_dataset


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(1, 12))) or "x"


def _turns(rng: random.Random) -> list[dict]:
    return [{"role": "user", "content": _word(rng)}, {"role": "assistant", "content": _word(rng)}]


def _good(rng):
    return {"messages": _turns(rng)}


def _with_message(rng, **message):
    turns = _turns(rng)
    turns[rng.randrange(2)] = message
    return {"messages": turns}


#: kind -> (row generator, outcome). An outcome is ("error", regex the message matches after "example <i>") or
#: ("ok", rows produced per input row).
KINDS = {
    "messages is None": (lambda r: {"messages": None}, ("error", "holds NoneType, expected a list of chat messages")),
    "messages not a list": (lambda r: {"messages": r.choice([_word(r), 7, 2.5, True])},
                            ("error", "column 'messages' holds a (str|number|bool), while \\d+ of \\d+ examples hold a list")),
    "message not a dict": (lambda r: {"messages": [_word(r), _word(r)]}, ("error", "do not fit the types|own values")),
    "message without content": (lambda r: _with_message(r, role="assistant"), ("error", "has no content")),
    "content is None": (lambda r: _with_message(r, role="user", content=None), ("error", "has no content")),
    "content not a string": (lambda r: _with_message(r, role="user", content=r.choice([3, 4.5, {"a": 1}])),
                             ("error", "do not fit the types|own values|has content of type")),
    "message without role": (lambda r: _with_message(r, content=_word(r)), ("error", "has no 'role'")),
    "empty conversation": (lambda r: {"messages": []}, ("error", "is an empty conversation")),
    "bytes content": (lambda r: _with_message(r, role="user", content=_word(r).encode()), ("error", "bytes instead of text")),
    "invalid UTF-8 (lone surrogate)": (lambda r: _with_message(r, role="user", content="a\udcff" + _word(r)),
                                       ("error", "not valid UTF-8")),
    "column missing in some rows": (lambda r: {"text": _word(r)}, ("error", "has a 'text' column, which only 1 of|has no 'messages' column, which \\d+ of")),
    "not a dict": (lambda r: r.choice([[1, 2], "row", 5]), ("error", "expected a dict of columns")),
    "unknown role": (lambda r: _with_message(r, role=r.choice(["wizard", "bot", "narrator"]), content=_word(r)), ("ok", 1)),
    "roles out of order": (lambda r: {"messages": list(reversed(_turns(r)))}, ("ok", 1)),
    "only a system message": (lambda r: {"messages": [{"role": "system", "content": _word(r)}]}, ("ok", 1)),
    "enormous row": (lambda r: {"messages": [{"role": "user", "content": "word " * r.randint(500, 3_000)},
                                             {"role": "assistant", "content": "ok"}]}, ("ok", 1)),
}


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def _run(rows, tokenizer, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tokenize_sft_dataset(rows, tokenizer, max_length=64, **kwargs)


def test_every_kind_of_malformed_row_has_its_documented_outcome(tokenizer):
    rng = random.Random(0)
    seen = dict.fromkeys(KINDS, 0)
    for trial in range(40 * len(KINDS)):
        kind = list(KINDS)[trial % len(KINDS)]
        make, (outcome, expected) = KINDS[kind]
        rows = [_good(rng) for _ in range(rng.randint(2, 4))]  # well-formed rows are the majority
        position = rng.randint(0, len(rows))
        rows.insert(position, make(rng))
        out = prepared_or_checked_error(lambda: _run(rows, tokenizer), position, outcome, expected, kind)
        if out is not None:
            assert len(out) == len(rows) - 1 + expected
            assert all(len(ids) <= 64 for ids in out["input_ids"])
        seen[kind] += 1
    assert set(seen.values()) == {40}, seen


def test_only_system_message_with_assistant_only_loss_names_the_row(tokenizer):
    rows = [_good(random.Random(1)), {"messages": [{"role": "system", "content": "be brief"}]}]
    with pytest.raises(DatasetError, match=r"^example 1"):
        _run(rows, tokenizer, assistant_only_loss=True)


def test_a_template_that_checks_roles_is_reported_with_the_row(tokenizer):
    template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    )
    original = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        rows = [_good(random.Random(2)), {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}]
        with pytest.raises(DatasetError, match=r"^example 1: the chat template could not render 'messages': Conversation roles"):
            _run(rows, tokenizer)
    finally:
        tokenizer.chat_template = original
