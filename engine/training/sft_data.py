"""Supervised fine-tuning data: dataset formats, tokenization and label masking.

:func:`tokenize_sft_dataset` turns a raw SFT dataset into rows of ``input_ids`` and ``labels``
(``-100`` on tokens that are not trained on), following TRL's ``SFTTrainer`` conventions. The format
is detected from the column names (:func:`detect_format`):

``"messages"``
    A ``messages`` column of chat messages (``{"role", "content"}`` dicts), or a ShareGPT-style
    ``conversations`` column (``{"from": "human"|"gpt"|..., "value"}`` dicts, converted to roles).
    Rendered with ``tokenizer.apply_chat_template``; every token is trained unless
    ``assistant_only_loss=True``, which trains only the assistant turns: each turn's content and the
    end-of-turn token(s) the template writes after it (``<|im_end|>`` in ChatML), not the assistant
    header (``<|im_start|>assistant\\n``, the generation prompt) nor whitespace after the end-of-turn
    token. The turns are found without ``{% generation %}`` tags: for each assistant message ``i``
    the conversation prefix ``messages[:i]`` is rendered with the generation prompt and
    ``messages[:i + 1]`` without it; both must tokenize to prefixes of the whole conversation (true
    for ChatML, Llama 3, Mistral, ...), else a :class:`~engine.errors.DatasetError` says so.

``"prompt_completion"``
    ``prompt`` and ``completion`` columns, both strings or both lists of chat messages
    (conversational prompt-completion). Strings: ``tokenizer(prompt)`` (with the tokenizer's special
    tokens, e.g. a BOS) followed by the completion's tokens and EOS. The two parts are tokenized
    separately so the trained context is exactly the prompt's tokenization at inference (TRL
    tokenizes ``prompt + completion`` jointly and may merge tokens across the boundary).
    Conversational: the prompt is rendered with ``add_generation_prompt=True``, the whole
    conversation without it; the completion is the difference (the rendered prompt must be a token
    prefix of the whole, else a DatasetError). ``completion_only_loss`` (default ``True`` for this
    format, as in TRL) masks the prompt.

``"text"``
    The ``dataset_text_field`` column (``"text"`` by default), tokenized with the tokenizer's
    special tokens, EOS appended when missing; every token is trained.

``"tokenized"``
    Already tokenized rows (an ``input_ids`` column, ``labels`` optional: a copy of ``input_ids``
    when missing). Only the length policy and the checks below apply.

Length policy for examples longer than ``max_length`` (``truncation``): ``"truncate"`` keeps the
first ``max_length`` tokens (one warning counts them), ``"split"`` cuts the example into consecutive
chunks of ``max_length`` tokens (chunks without a trained label are dropped), ``"error"`` raises
:class:`~engine.errors.SequenceTooLongError`.

An example "has no trained label" when ``labels[1:]`` is all ``-100``: the label at position 0 is
never predicted (the model shifts labels by one), so such an example contributes no loss. It raises
a DatasetError naming the example, or is dropped with one warning when ``drop_fully_masked=True``.

:func:`train_on_responses_only` is Unsloth's helper: on an already tokenized dataset, keep the
labels only after each response marker (e.g. ``"<|im_start|>assistant\\n"``) up to the next
instruction marker (e.g. ``"<|im_start|>user\\n"``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import datasets
import jinja2

from engine.errors import ConfigurationError, DatasetError, SequenceTooLongError
from engine.training.rows import as_dataset, as_messages, map_kwargs

__all__ = ["FORMATS", "TRUNCATION_MODES", "detect_format", "tokenize_sft_dataset", "train_on_responses_only"]

IGNORE_INDEX = -100
FORMATS = ("messages", "prompt_completion", "text", "tokenized")
TRUNCATION_MODES = ("truncate", "split", "error")


# ---------------------------------------------------------------------------------------------- formats
def detect_format(column_names: Iterable[str], dataset_text_field: str = "text") -> str:
    """The SFT format of a dataset, from its column names.

    Args:
        column_names: the dataset's columns.
        dataset_text_field (str): the column holding raw text for the ``"text"`` format.

    Returns:
        ``"tokenized"`` (an ``input_ids`` column), ``"messages"`` (``messages`` or ``conversations``),
        ``"prompt_completion"`` (``prompt`` and ``completion``) or ``"text"`` (``dataset_text_field``),
        checked in this order.

    Raises:
        DatasetError: if no format matches; the message lists the columns found and expected.
    """
    columns = list(column_names)
    present = set(columns)
    if "input_ids" in present:
        return "tokenized"
    if "messages" in present or "conversations" in present:
        return "messages"
    if "prompt" in present and "completion" in present:
        return "prompt_completion"
    if dataset_text_field in present:
        return "text"
    hint = ""
    if "prompt" in present:
        hint = " The dataset has a 'prompt' column but no 'completion' column."
    elif "completion" in present:
        hint = " The dataset has a 'completion' column but no 'prompt' column."
    raise DatasetError(
        f"cannot tell the SFT format of a dataset with columns {columns}.{hint} Expected one of: "
        "'messages' (or 'conversations') holding lists of chat messages; 'prompt' and 'completion' "
        f"(strings or lists of chat messages); a text column named by dataset_text_field (now "
        f"{dataset_text_field!r}); or an already tokenized 'input_ids' column. Rename your columns "
        "(dataset.rename_column), or set dataset_text_field to the name of your text column."
    )


def _is_conversational(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], dict)


# ---------------------------------------------------------------------------------------------- rendering
class _TemplateRejected(Exception):
    """The chat template raised while rendering one example (re-raised as a DatasetError naming the example)."""


class _Encoder:
    """Tokenizer helpers shared by every example of one call."""

    def __init__(self, tokenizer, add_eos: bool):
        self.tokenizer = tokenizer
        self.add_eos = add_eos
        self.eos_id = tokenizer.eos_token_id
        self.special_ids = set(getattr(tokenizer, "all_special_ids", None) or [])
        if self.eos_id is not None:
            self.special_ids.add(self.eos_id)
        self._blank: dict[int, bool] = {}

    def check_chat_template(self) -> None:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise DatasetError(
                "the dataset is conversational (lists of chat messages) but the tokenizer has no chat template. "
                "Set tokenizer.chat_template to a Jinja template (e.g. copy one from the instruct version of your "
                "model), or use a 'text' or string 'prompt'/'completion' dataset instead."
            )

    def render(self, messages: list[dict], *, add_generation_prompt: bool, tools=None) -> str:
        """The chat template's text for ``messages``."""
        kwargs = {"tools": tools} if tools else {}
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except jinja2.TemplateError as exc:  # the template's own checks (raise_exception) and undefined fields
            raise _TemplateRejected(str(exc)) from exc

    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of rendered chat text (its special tokens come from the template, none are added)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def with_eos(self, ids: list[int]) -> list[int]:
        if not self.add_eos:
            return ids
        if self.eos_id is None:
            raise ConfigurationError(
                "add_eos=True but the tokenizer has no eos_token. Set tokenizer.eos_token, or pass add_eos=False."
            )
        return ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id]

    def _is_blank(self, token_id: int) -> bool:
        if token_id not in self._blank:
            self._blank[token_id] = self.tokenizer.decode([token_id]).strip() == ""
        return self._blank[token_id]

    def trained_end(self, ids: Sequence[int], start: int, end: int) -> int:
        """End of the trained part of a turn ``ids[start:end]``: drops whitespace after its last special token.

        ChatML writes ``<|im_end|>\\n`` after each turn; the model stops at ``<|im_end|>`` and never
        generates the newline, so it is not trained.
        """
        j = end
        while j > start and ids[j - 1] not in self.special_ids and self._is_blank(ids[j - 1]):
            j -= 1
        if start < j < end and ids[j - 1] in self.special_ids:
            return j
        return end


def _check_prefix(prefix: list[int], whole: list[int], index: int, what: str) -> None:
    if whole[: len(prefix)] != prefix:
        raise DatasetError(
            f"example {index}: the tokenized {what} is not a prefix of the tokenized whole conversation, so the "
            "trained tokens cannot be located. The chat template renders a conversation prefix differently from "
            "the full conversation (e.g. it drops or rewrites earlier turns, such as thinking blocks), or tokens "
            "merge across the turn boundary. Use a template that renders prefixes consistently, or pre-render the "
            "data into 'prompt'/'completion' strings."
        )


def _template_error(index: int, column: str, exc: _TemplateRejected) -> DatasetError:
    return DatasetError(
        f"example {index}: the chat template could not render '{column}': {exc}. Check the roles, their order "
        "(many templates require user/assistant turns to alternate) and the message fields, or fix the example."
    )


def _tokenize_messages(enc: _Encoder, value: Any, index: int, column: str, assistant_only: bool, tools) -> tuple:
    try:
        return _tokenize_messages_unchecked(enc, value, index, column, assistant_only, tools)
    except _TemplateRejected as exc:
        raise _template_error(index, column, exc) from exc


def _tokenize_messages_unchecked(enc, value, index, column, assistant_only, tools) -> tuple:
    messages = as_messages(value, index, column)
    if not messages:
        raise DatasetError(f"example {index}: '{column}' is an empty conversation")
    ids = enc.encode_rendered(enc.render(messages, add_generation_prompt=False, tools=tools))
    if not assistant_only:
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = enc.encode_rendered(enc.render(messages[:i], add_generation_prompt=True, tools=tools))
        upto = enc.encode_rendered(enc.render(messages[: i + 1], add_generation_prompt=False, tools=tools))
        _check_prefix(before, upto, index, f"conversation up to the generation prompt of assistant turn {i}")
        _check_prefix(upto, ids, index, f"conversation up to assistant turn {i}")
        start, end = len(before), enc.trained_end(ids, len(before), len(upto))
        labels[start:end] = ids[start:end]
    return ids, labels


def _tokenize_conversational_pc(enc: _Encoder, prompt: Any, completion: Any, index: int, tools) -> tuple:
    try:
        return _tokenize_conversational_pc_unchecked(enc, prompt, completion, index, tools)
    except _TemplateRejected as exc:
        raise _template_error(index, "prompt' + 'completion", exc) from exc


def _tokenize_conversational_pc_unchecked(enc, prompt, completion, index, tools) -> tuple:
    prompt_msgs = as_messages(prompt, index, "prompt")
    completion_msgs = as_messages(completion, index, "completion")
    prompt_ids = enc.encode_rendered(enc.render(prompt_msgs, add_generation_prompt=True, tools=tools))
    ids = enc.encode_rendered(enc.render(prompt_msgs + completion_msgs, add_generation_prompt=False, tools=tools))
    _check_prefix(prompt_ids, ids, index, "prompt (rendered with add_generation_prompt=True)")
    return ids, len(prompt_ids), enc.trained_end(ids, len(prompt_ids), len(ids))


# ---------------------------------------------------------------------------------------------- main entry
def _has_target(labels: Sequence[int]) -> bool:
    """Whether any label is predicted: position 0 never is (the model shifts labels by one)."""
    return any(label != IGNORE_INDEX for label in labels[1:])


def tokenize_sft_dataset(
    dataset: datasets.Dataset | Sequence[dict[str, Any]],
    tokenizer,
    *,
    max_length: int | None,
    dataset_text_field: str = "text",
    completion_only_loss: bool | None = None,
    assistant_only_loss: bool = False,
    truncation: str = "truncate",
    add_eos: bool = True,
    drop_fully_masked: bool = False,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Tokenize an SFT dataset into ``input_ids`` and ``labels`` (see the module docstring for the formats).

    Args:
        dataset: a ``datasets.Dataset`` or a list of dicts (one per example).
        tokenizer: a transformers tokenizer (with a chat template for conversational data).
        max_length (int | None): longest example kept whole; ``None`` for no limit.
        dataset_text_field (str): the text column of ``"text"`` datasets.
        completion_only_loss (bool | None): train on the completion only (prompt-completion datasets);
            ``None`` means ``True`` for them. ``True`` on another format is an error.
        assistant_only_loss (bool): train on assistant turns only (``messages`` datasets only).
        truncation (str): ``"truncate"``, ``"split"`` or ``"error"`` for examples over ``max_length``.
        add_eos (bool): append EOS to text and string completions that do not end with it.
        drop_fully_masked (bool): drop examples without a trained label (with a warning) instead of raising.
        num_proc (int | None): processes for ``datasets.map``.

    Returns:
        ``datasets.Dataset`` with columns ``input_ids`` and ``labels`` (``list[int]`` of equal length per row;
        with ``truncation="split"`` one input example may give several rows).

    Raises:
        DatasetError: empty dataset, unknown columns, no chat template, a template that breaks the prefix
            property, loss flags that do not fit the format, or an example without a trained label.
        SequenceTooLongError: an example over ``max_length`` with ``truncation="error"``.
        ConfigurationError: an unknown ``truncation`` or a non-positive ``max_length``.
    """
    if truncation not in TRUNCATION_MODES:
        raise ConfigurationError(f"truncation={truncation!r} is not one of {list(TRUNCATION_MODES)}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ConfigurationError(f"max_length must be an integer >= 2 or None, got {max_length!r}")
    dataset = as_dataset(dataset)
    if len(dataset) == 0:
        raise DatasetError("the dataset is empty (0 examples); there is nothing to train on")
    fmt = detect_format(dataset.column_names, dataset_text_field)
    if completion_only_loss and fmt != "prompt_completion":
        raise DatasetError(
            f"completion_only_loss=True needs a prompt-completion dataset ('prompt' and 'completion' columns), but "
            f"this dataset is in the {fmt!r} format (columns {dataset.column_names}). Use assistant_only_loss=True "
            "for 'messages' datasets, or leave completion_only_loss=None."
        )
    if assistant_only_loss and fmt != "messages":
        raise DatasetError(
            f"assistant_only_loss=True needs a conversational 'messages' dataset, but this dataset is in the {fmt!r} "
            f"format (columns {dataset.column_names}). For prompt-completion data use completion_only_loss instead."
        )
    completion_only = fmt == "prompt_completion" and completion_only_loss is not False

    enc = _Encoder(tokenizer, add_eos)
    encode = _make_encoder(fmt, enc, dataset, dataset_text_field, completion_only, assistant_only_loss)

    def process(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "_truncated": [], "_drop": []}
        for index, (ids, labels) in zip(indices, encode(batch, indices)):
            if len(ids) != len(labels):
                raise DatasetError(
                    f"example {index}: 'input_ids' has {len(ids)} tokens but 'labels' has {len(labels)}; "
                    "they must have the same length"
                )
            chunks, truncated = _apply_length_policy(ids, labels, max_length, truncation, index)
            chunks = [c for c in chunks if _has_target(c[1])] if len(chunks) > 1 else chunks
            if not chunks or not _has_target(chunks[0][1]):
                if not drop_fully_masked:
                    raise DatasetError(_fully_masked_message(fmt, index, ids, labels, max_length, truncated))
                out["input_ids"].append([])
                out["labels"].append([])
                out["_truncated"].append(False)
                out["_drop"].append(True)
                continue
            for k, (c_ids, c_labels) in enumerate(chunks):
                out["input_ids"].append(c_ids)
                out["labels"].append(c_labels)
                out["_truncated"].append(truncated and k == 0)
                out["_drop"].append(False)
        return out

    features = datasets.Features({
        "input_ids": datasets.List(datasets.Value("int64")),
        "labels": datasets.List(datasets.Value("int64")),
        "_truncated": datasets.Value("bool"),
        "_drop": datasets.Value("bool"),
    })
    result = dataset.map(
        process,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=features,
        num_proc=num_proc,
        desc=f"Tokenizing SFT dataset ({fmt})",
        **map_kwargs(dataset),
    )
    n_truncated = _count_true(result, "_truncated")
    n_dropped = _count_true(result, "_drop")
    if n_dropped:
        result = result.filter(lambda drop: not drop, input_columns="_drop", num_proc=num_proc, **map_kwargs(result))
    result = result.remove_columns(["_truncated", "_drop"])
    if n_truncated and truncation == "truncate":
        warnings.warn(
            f"{n_truncated} of {len(dataset)} examples were longer than max_length={max_length} tokens and were "
            f"truncated to their first {max_length} tokens. Increase max_length, or pass truncation='split' to keep "
            "the rest as separate examples.",
            stacklevel=2,
        )
    if n_dropped:
        warnings.warn(
            f"dropped {n_dropped} of {len(dataset)} examples that have no trained label (every label is -100 after "
            "masking and truncation).",
            stacklevel=2,
        )
    if len(result) == 0:
        raise DatasetError(
            "no example is left to train on: every example was dropped because none of its labels is trained. "
            "Check the loss masking options and max_length."
        )
    return result


def _count_true(ds: datasets.Dataset, column: str) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(ds.with_format("arrow")[column]).as_py() or 0)


def _make_encoder(
    fmt: str, enc: _Encoder, dataset: datasets.Dataset, text_field: str, completion_only: bool, assistant_only: bool
) -> Callable[[dict[str, list], list[int]], list[tuple[list[int], list[int]]]]:
    """A function mapping a batch of raw examples to ``[(input_ids, labels), ...]``."""
    columns = set(dataset.column_names)
    tokenizer = enc.tokenizer

    def tools_of(batch, j):
        if "tools" not in batch:
            return None
        tools = batch["tools"][j]
        return json.loads(tools) if isinstance(tools, str) else tools

    if fmt == "tokenized":
        def encode_tokenized(batch, indices):
            all_labels = batch["labels"] if "labels" in columns else batch["input_ids"]
            return [(list(ids), list(labels)) for ids, labels in zip(batch["input_ids"], all_labels)]
        return encode_tokenized

    if fmt == "text":
        def encode_text(batch, indices):
            texts = batch[text_field]
            for index, text in zip(indices, texts):
                if not isinstance(text, str):
                    raise DatasetError(
                        f"example {index}: column '{text_field}' holds {type(text).__name__}, expected a string"
                    )
            out = []
            for ids in tokenizer(texts)["input_ids"]:
                ids = enc.with_eos(list(ids))
                out.append((ids, list(ids)))
            return out
        return encode_text

    if fmt == "messages":
        column = "messages" if "messages" in columns else "conversations"
        enc.check_chat_template()

        def encode_messages(batch, indices):
            return [
                _tokenize_messages(enc, value, index, column, assistant_only, tools_of(batch, j))
                for j, (index, value) in enumerate(zip(indices, batch[column]))
            ]
        return encode_messages

    def encode_prompt_completion(batch, indices):
        out = []
        for j, (index, prompt, completion) in enumerate(zip(indices, batch["prompt"], batch["completion"])):
            if isinstance(prompt, str) and isinstance(completion, str):
                prompt_ids = list(tokenizer(prompt)["input_ids"])
                ids = enc.with_eos(prompt_ids + list(tokenizer(completion, add_special_tokens=False)["input_ids"]))
                start, end = len(prompt_ids), len(ids)
            elif _is_conversational(prompt) and _is_conversational(completion):
                enc.check_chat_template()
                ids, start, end = _tokenize_conversational_pc(enc, prompt, completion, index, tools_of(batch, j))
            else:
                missing = " (a missing value: every example of a dataset must have the same format)" if (
                    prompt is None or completion is None) else ""
                raise DatasetError(
                    f"example {index}: 'prompt' is {type(prompt).__name__} and 'completion' is "
                    f"{type(completion).__name__}{missing}; both must be strings, or both lists of chat messages"
                )
            if completion_only:
                labels = [IGNORE_INDEX] * start + ids[start:end] + [IGNORE_INDEX] * (len(ids) - end)
            else:
                labels = list(ids)
            out.append((ids, labels))
        return out
    return encode_prompt_completion


def _apply_length_policy(
    ids: list[int], labels: list[int], max_length: int | None, truncation: str, index: int
) -> tuple[list[tuple[list[int], list[int]]], bool]:
    """``([(ids, labels), ...], was_too_long)`` after applying the length policy to one example."""
    if max_length is None or len(ids) <= max_length:
        return [(ids, labels)], False
    if truncation == "error":
        raise SequenceTooLongError(
            f"example {index} has {len(ids)} tokens, more than max_length={max_length}. Increase max_length, or "
            "pass truncation='truncate' (keep the first max_length tokens) or truncation='split' (cut it into "
            "chunks of max_length tokens)."
        )
    if truncation == "truncate":
        return [(ids[:max_length], labels[:max_length])], True
    return [(ids[i : i + max_length], labels[i : i + max_length]) for i in range(0, len(ids), max_length)], True


def _fully_masked_message(
    fmt: str, index: int, ids: list[int], labels: list[int], max_length: int | None, truncated: bool
) -> str:
    n_ids = len(ids)
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX and i > 0), None)
    if truncated and first is not None:
        cause = (
            f"its first trained token is at position {first} but max_length={max_length} cuts it off (the prompt "
            "fills max_length); increase max_length or shorten the prompt"
        )
    elif fmt == "prompt_completion":
        cause = "the completion is empty"
    elif fmt == "messages":
        cause = "the conversation has no assistant message with content (assistant_only_loss=True)"
    elif fmt == "text":
        cause = f"the text tokenizes to {n_ids} token(s); at least 2 are needed to predict one"
    else:
        cause = "its 'labels' are all -100 (check the response markers, e.g. of train_on_responses_only)"
    return (
        f"example {index} ({n_ids} tokens) has no trained label (every label after the first is -100): {cause}. "
        "Fix or remove the example, or pass drop_fully_masked=True to drop such examples."
    )


# ---------------------------------------------------------------------------------------------- Unsloth helper
def _find(seq: Sequence[int], pattern: Sequence[int], start: int = 0) -> int:
    """Index of the first occurrence of ``pattern`` in ``seq`` at or after ``start``, or -1."""
    m, first = len(pattern), pattern[0]
    for i in range(start, len(seq) - m + 1):
        if seq[i] == first and list(seq[i : i + m]) == list(pattern):
            return i
    return -1


def train_on_responses_only(
    dataset: datasets.Dataset | Sequence[dict[str, Any]],
    tokenizer,
    instruction_part: str,
    response_part: str,
    *,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Mask every label outside the responses of a tokenized chat dataset (Unsloth's helper).

    A response starts right after each occurrence of the ``response_part`` tokens and runs up to the next
    occurrence of the ``instruction_part`` tokens (excluded) or the end of the row. Labels there keep their
    value (``input_ids`` when the dataset has no ``labels``); every other label becomes -100.

    Args:
        dataset: rows with ``input_ids`` (``list[int]``) and optionally ``labels``.
        tokenizer: the tokenizer that produced ``input_ids``; the parts are tokenized with
            ``add_special_tokens=False`` and matched as exact token sequences.
        instruction_part (str): the text that opens a user turn, e.g. ``"<|im_start|>user\\n"``.
        response_part (str): the text that opens an assistant turn, e.g. ``"<|im_start|>assistant\\n"``.
        num_proc (int | None): processes for ``datasets.map``.

    Returns:
        the dataset with its ``labels`` column replaced (other columns kept).

    Raises:
        DatasetError: no ``input_ids`` column, or an example in which ``response_part`` never occurs.
        ConfigurationError: a part that tokenizes to nothing.
    """
    dataset = as_dataset(dataset)
    if "input_ids" not in dataset.column_names:
        raise DatasetError(
            f"train_on_responses_only needs a tokenized dataset with an 'input_ids' column, got columns "
            f"{dataset.column_names}. Tokenize it first (tokenize_sft_dataset)."
        )
    instruction_ids = list(tokenizer(instruction_part, add_special_tokens=False)["input_ids"])
    response_ids = list(tokenizer(response_part, add_special_tokens=False)["input_ids"])
    for name, part, part_ids in (("instruction_part", instruction_part, instruction_ids),
                                 ("response_part", response_part, response_ids)):
        if not part_ids:
            raise ConfigurationError(f"{name}={part!r} tokenizes to no tokens; pass the text that opens a turn")
    has_labels = "labels" in dataset.column_names

    def mask(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out = []
        all_labels = batch["labels"] if has_labels else batch["input_ids"]
        for index, ids, labels in zip(indices, batch["input_ids"], all_labels):
            ids = list(ids)
            new = [IGNORE_INDEX] * len(ids)
            pos = _find(ids, response_ids)
            if pos < 0:
                raise DatasetError(
                    f"example {index}: response_part={response_part!r} (tokens {response_ids}) never occurs in its "
                    f"input_ids, so nothing would be trained. Check the markers against "
                    f"tokenizer.decode(input_ids), or that truncation did not cut the response off."
                )
            while pos >= 0:
                start = pos + len(response_ids)
                end = _find(ids, instruction_ids, start)
                end = len(ids) if end < 0 else end
                new[start:end] = list(labels[start:end])
                pos = _find(ids, response_ids, end)
            out.append(new)
        return {"labels": out}

    return dataset.map(
        mask, batched=True, with_indices=True, num_proc=num_proc, desc="Masking everything but the responses"
    )
