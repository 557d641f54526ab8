"""Raw dataset rows shared by every trainer's data preparation: tables and chat messages, checked with errors
that name the example.

* :func:`as_dataset` turns a ``datasets.Dataset`` or a list of dicts into a ``datasets.Dataset``. For a list it
  first checks every row (:func:`check_rows`): a row that is not a dict, a column missing from some rows, a column
  whose values change kind (text in one row, a list in another), bytes or text that is not valid UTF-8. When Arrow
  still refuses the table (a nested field that changes type), a binary search finds the first row that breaks it.
* :func:`as_messages` checks one conversation: a list of ``{"role", "content"}`` dicts (ShareGPT
  ``{"from", "value"}`` converted), each with a string role and content (``None`` only next to ``tool_calls``;
  a list of content parts is passed to the template as is).

* :func:`as_text_or_messages` checks one prompt or completion cell (SFT's, DPO's, ORPO's, KTO's, GRPO's) against
  the dataset's format, decided by :func:`first_format`: a string, or a non-empty conversation (:func:`as_messages`).

Each problem is a :class:`~engine.errors.DatasetError` that starts with ``example <index>``. The table of row kinds
and outcomes is in ``docs/training.md`` ("Malformed rows").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
import uuid
from typing import Any

import datasets

from engine.errors import DatasetError

__all__ = ["as_dataset", "as_messages", "as_text_or_messages", "check_rows", "first_format", "map_kwargs"]

# ShareGPT speaker names -> chat-template roles (TRL's ``maybe_convert_to_chatml`` mapping).
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}

def _value_kind(value: Any) -> str:
    """A coarse type name used to compare one column's values across examples."""
    if value is None:
        return "missing"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def _find_bad_text(value: Any) -> str | None:
    """A description of text in ``value`` that cannot be stored or tokenized (bytes, invalid UTF-8), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"text that is not valid UTF-8 ({exc.reason} at character {exc.start})"
        return None
    if isinstance(value, (bytes, bytearray)):
        return "bytes instead of text (decode them to str first, e.g. value.decode('utf-8'))"
    if isinstance(value, dict):
        return next((bad for v in value.values() if (bad := _find_bad_text(v))), None)
    if isinstance(value, (list, tuple)):
        return next((bad for v in value if (bad := _find_bad_text(v))), None)
    return None


def check_rows(rows: list[dict]) -> None:
    """Find an example that cannot share a table with the others, and say which and why.

    Arrow builds a dataset column by column and reports a type clash without the example's index; this check runs
    first on lists of dicts so that the error names the example. The odd one out is measured against the majority:
    a column most examples have and this one lacks (or the reverse), a column whose value is of another kind than
    in most examples (text vs a list of messages, ...), bytes, or text that is not valid UTF-8.
    """
    n = len(rows)
    for index, row in enumerate(rows):
        for column, value in row.items():
            bad = _find_bad_text(value)
            if bad:
                raise DatasetError(f"example {index}: column '{column}' holds {bad}")
    presence = Counter(column for row in rows for column in row)
    for column, count in presence.items():
        if count == n:
            continue
        if 2 * count > n:
            index = next(i for i, row in enumerate(rows) if column not in row)
            raise DatasetError(
                f"example {index} has no '{column}' column, which {count} of {n} examples have; every example must "
                "have the same columns (fix or drop this example)"
            )
        index = next(i for i, row in enumerate(rows) if column in row)
        raise DatasetError(
            f"example {index} has a '{column}' column, which only {count} of {n} examples have; every example must "
            "have the same columns (fix or drop this example)"
        )
    for column in presence:
        kinds = [_value_kind(row[column]) for row in rows]
        counts = Counter(k for k in kinds if k != "missing")
        if len(counts) <= 1:
            continue
        (common, count), = counts.most_common(1)
        index = next(i for i, k in enumerate(kinds) if k not in ("missing", common))
        raise DatasetError(
            f"example {index}: column '{column}' holds a {kinds[index]}, while {count} of {n} examples hold a "
            f"{common}; every example must store the same kind of value in a column (fix or drop this example)"
        )


def map_kwargs(dataset: datasets.Dataset) -> dict[str, str]:
    """Extra ``Dataset.map``/``filter`` arguments: for a dataset held only in memory, a fresh fingerprint.

    ``datasets`` names the cache file of a transform after a hash of the function, which pickles everything it
    references (the tokenizer included: about 0.25 s a call). A dataset without cache files (built from a list,
    or already transformed in memory) writes no cache, so the hash buys nothing; a random fingerprint skips it.
    Datasets loaded from files keep the hash, so their cached transforms stay correct.
    """
    return {} if dataset.cache_files else {"new_fingerprint": uuid.uuid4().hex}


def as_dataset(dataset: datasets.Dataset | Sequence[dict[str, Any]]) -> datasets.Dataset:
    if isinstance(dataset, datasets.Dataset):
        return dataset
    if isinstance(dataset, (datasets.IterableDataset, datasets.DatasetDict)):
        raise DatasetError(
            f"expected a datasets.Dataset or a list of dicts, got {type(dataset).__name__}. "
            "Pick a split (dataset['train']) or materialise a streaming dataset (Dataset.from_list(list(ds)))."
        )
    if isinstance(dataset, (str, bytes, dict)):
        raise DatasetError(
            f"expected a datasets.Dataset or a list of dicts, got a {type(dataset).__name__}. Load files with "
            "datasets.load_dataset(...)['train'] and pass the split."
        )
    rows = list(dataset)
    if rows and not all(isinstance(row, dict) for row in rows):
        bad = next(i for i, row in enumerate(rows) if not isinstance(row, dict))
        raise DatasetError(f"example {bad} is a {type(rows[bad]).__name__}, expected a dict of columns")
    check_rows(rows)
    try:
        return datasets.Dataset.from_list(rows)
    except _ARROW_ERRORS as exc:
        bad = _first_unstorable(rows)
        clash = "its own values clash" if bad == 0 else "its values do not fit the types of the examples before it"
        raise DatasetError(
            f"example {bad}: {clash} ({exc}). Every example must "
            "store the same kind of value in each column and field (e.g. message content always a string); fix or "
            "drop this example."
        ) from exc


_ARROW_ERRORS = (TypeError, ValueError, OverflowError)  # pyarrow.ArrowInvalid / ArrowTypeError subclass these


def _builds(rows: list[dict]) -> bool:
    try:
        datasets.Dataset.from_list(rows)
    except _ARROW_ERRORS:
        return False
    return True


def _first_unstorable(rows: list[dict]) -> int:
    """The index of an example that keeps ``rows`` from becoming one table (called only after that failed).

    A failing prefix stays failing when it grows, and so does a failing suffix, so two binary searches (``O(log n)``
    table builds) find the first row that breaks the prefixes and the last row that breaks the suffixes. With one
    odd row both name it, except at the ends (the odd row first or last), where the candidate whose removal lets the
    rest build is the one.
    """
    if not _builds(rows[:1]):
        return 0
    lo, hi = 1, len(rows)  # rows[:lo] builds, rows[:hi] fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _builds(rows[:mid]) else (lo, mid)
    first = hi - 1
    lo, hi = 0, len(rows) - 1  # rows[lo:] fails, rows[hi:] builds
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _builds(rows[mid:]) else (mid, hi)
    last = lo
    if first == last:
        return first
    for candidate in (first, last):
        if _builds(rows[:candidate] + rows[candidate + 1:]):
            return candidate
    return first


def as_messages(value: Any, index: int, column: str) -> list[dict[str, Any]]:
    """Chat messages as ``{"role", "content", ...}`` dicts (ShareGPT ``from``/``value`` converted).

    Args:
        value: the column's value for one example.
        index (int): the example's index (for the error).
        column (str): the column's name (for the error).

    Raises:
        DatasetError: naming the example and the message: not a list of dicts, a message without a role or with a
            role that is not a string, a message without content (``None`` content is allowed only next to
            ``tool_calls``), content that is neither a string nor a list of content parts.
    """
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, dict) for m in value):
        raise DatasetError(
            f"example {index}: column '{column}' holds {type(value).__name__}, expected a list of chat messages "
            "(dicts with 'role' and 'content')"
        )
    messages = []
    for j, m in enumerate(value):
        if m.get("role") is None and "from" in m:
            role = _SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                raise DatasetError(
                    f"example {index}: unknown ShareGPT speaker {m['from']!r} in '{column}'; "
                    f"expected one of {sorted(_SHAREGPT_ROLES)}"
                )
            m = {"role": role, "content": m.get("value")}
        elif m.get("role") is None:
            raise DatasetError(f"example {index}: message {j} of '{column}' has no 'role' (keys: {sorted(m)})")
        else:
            # Arrow fills keys that other messages have with None; drop them so templates see clean dicts.
            m = {k: v for k, v in m.items() if v is not None or k == "content"}
        where = f"example {index}: message {j} of '{column}' (role {m['role']!r})"
        if not isinstance(m["role"], str) or not m["role"]:
            raise DatasetError(f"{where} has a role that is not a non-empty string")
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            raise DatasetError(f"{where} has no content; give it a string (an empty string is allowed) or drop it")
        if content is not None and not isinstance(content, (str, list, tuple)):
            raise DatasetError(
                f"{where} has content of type {type(content).__name__}; expected a string (or a list of content "
                "parts for multimodal templates)"
            )
        messages.append(m)
    return messages


def first_format(values: Sequence[Any]) -> tuple[bool, int]:
    """Whether a column holds conversations, decided by its first value that is not ``None``.

    Args:
        values: one column's values (e.g. ``dataset["prompt"]``).

    Returns:
        ``(conversational, index)``: ``True`` when that value is a list (of messages), and the example it was read
        from (``0`` when every value is ``None``; :func:`as_text_or_messages` then names the first row).
    """
    for index, value in enumerate(values):
        if value is not None:
            return isinstance(value, (list, tuple)), index
    return False, 0


def as_text_or_messages(value: Any, index: int, column: str, conversational: bool, decided_by: int = 0):
    """One prompt or completion: a string, or a non-empty list of chat messages, as the dataset's format says.

    Args:
        value: the column's value for one example.
        index (int): the example's index (for the error).
        column (str): the column's name (for the error).
        conversational (bool): the dataset's format (from :func:`first_format`): lists of messages, or strings.
        decided_by (int): the example the format was read from (for the error).

    Returns:
        the string, or the messages checked by :func:`as_messages`.

    Raises:
        DatasetError: naming the example: ``None``, a value that is neither a string nor a list, a format other than
            the dataset's, an empty conversation, or a malformed message.
    """
    if value is None:
        raise DatasetError(
            f"example {index} has no {column!r} (None); every example needs a {column} "
            f"({'a list of chat messages' if conversational else 'a string'}); fix or drop this example"
        )
    is_list = isinstance(value, (list, tuple))
    if not is_list and not isinstance(value, str):
        raise DatasetError(
            f"example {index}: column '{column}' holds {type(value).__name__}, expected a string or a list of chat "
            "messages"
        )
    if is_list != conversational:
        raise DatasetError(
            f"example {index}: {column!r} is {'a list of messages' if is_list else 'a string'} but the dataset is "
            f"{'conversational' if conversational else 'plain text'} (decided by example {decided_by}). Use one "
            "format in every example: all strings, or all lists of messages (completions as "
            "[{'role': 'assistant', 'content': ...}])."
        )
    if not is_list:
        return value
    messages = as_messages(value, index, column)
    if not messages:
        raise DatasetError(f"example {index}: '{column}' is an empty conversation")
    return messages
