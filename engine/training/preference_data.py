"""Preference data for DPO, KTO and ORPO: tokenization (as TRL 1.16's ``DPOTrainer``), batching, log-probs.

Tokenization (:func:`tokenize_preference_dataset`), one example ``(prompt, chosen, rejected)``:

* **conversational** (``prompt`` a list of messages, ``chosen``/``rejected`` lists of assistant messages)::

      prompt_ids        = chat_template(prompt, add_generation_prompt=True)
      prompt_chosen_ids = chat_template(prompt + chosen)
      prompt_rejected   = chat_template(prompt + rejected)

  The template adds the special tokens (BOS, end-of-turn), so nothing else is added.
* **plain strings**: the EOS token text is appended to ``chosen`` and ``rejected`` unless they already end
  with it, then ``prompt_ids = tokenizer(prompt)``, ``prompt_chosen_ids = tokenizer(prompt + chosen)``, ...
  (``add_special_tokens`` as the tokenizer's default, so a tokenizer that adds BOS adds it once, at the start).
* The completion starts where the prompt's ids and the prompt+completion ids first differ
  (``P = min(common_prefix(prompt_ids, prompt_chosen_ids), common_prefix(prompt_ids, prompt_rejected_ids))``),
  which is not always ``len(prompt_ids)`` (a token can merge across the boundary, or a template renders the
  prompt alone differently). Then ``prompt_ids = prompt_ids[:P]``, ``chosen_ids = prompt_chosen_ids[P:]``,
  ``rejected_ids = prompt_rejected_ids[P:]``.
* **implicit prompt** (no ``prompt`` column): the prompt is the longest common prefix of ``chosen`` and
  ``rejected`` (messages, or characters with a space before the split point left to the completions), as
  TRL's ``extract_prompt``.

Truncation to ``max_length`` tokens per sequence (TRL does it in its collator; the result is the same):

* ``keep_start`` (default): ``prompt + completion`` keeps its first ``max_length`` tokens, i.e. completions are
  cut at ``max_length - len(prompt)``. An example whose prompt alone fills ``max_length`` has nothing left to
  learn from: :class:`~engine.errors.DatasetError` (TRL drops it silently; ``drop_truncated=True`` does that).
* ``keep_end`` (deprecated in TRL): the prompt loses tokens from its start until the prompt and the *longer*
  completion fit, so chosen and rejected keep the same context; a completion longer than ``max_length`` keeps
  its last ``max_length`` tokens. (TRL truncates each sequence on its own, so the shorter completion keeps more
  of the prompt there.)

Batching (:class:`PreferenceCollator`): ``b`` examples become one batch of ``2b`` sequences, chosen first,
``sequence = prompt_ids + completion_ids``, with ``completion_mask = 1`` on the completion tokens; padded on
the right, or (``padding_free``) concatenated into one row whose position ids restart at 0 for each sequence.

Log-probs (:func:`sequence_log_probs`): ``log π(y|x) = Σ_{t: completion_mask[t] = 1} log p(x_t | x_<t)``,
the sum over the completion tokens of the sequence (a completion token at ``t = 0`` has no context and adds
0, as in TRL). ``n = Σ_t completion_mask[t]`` is returned for the IPO loss' length normalisation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import torch

from engine.errors import ConfigurationError, DatasetError
from engine.training.rows import as_dataset, as_text_or_messages, first_format, map_kwargs

__all__ = [
    "PREFERENCE_COLUMNS",
    "collate_sequences",
    "completion_log_prob_sums",
    "prompt_completion_ids",
    "PreferenceCollator",
    "reference_sequence_log_probs",
    "sequence_log_probs",
    "to_conversational_preference",
    "tokenize_preference_dataset",
]

logger = logging.getLogger(__name__)

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
TRUNCATION_MODES = ("keep_start", "keep_end")
_REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
_OK, _EMPTY, _TRUNCATED = 0, 1, 2  # status of a tokenized example


# ---------------------------------------------------------------------------------------------- tokenization
def to_conversational_preference(example: Mapping[str, Any], system_prompt: str | None = None) -> dict[str, Any]:
    """``{"prompt": str, "chosen": str, "rejected": str}`` as messages: a user turn and assistant answers.

    Args:
        example: a row with string ``prompt``, ``chosen`` and ``rejected`` (other keys are dropped).
        system_prompt: if given, a system message placed before the user turn.

    Returns:
        ``{"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}``.
    """
    prompt = [{"role": "user", "content": example["prompt"]}]
    if system_prompt is not None:
        prompt.insert(0, {"role": "system", "content": system_prompt})
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": example["chosen"]}],
        "rejected": [{"role": "assistant", "content": example["rejected"]}],
    }


def _common_prefix_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Split the shared prefix of ``chosen`` and ``rejected`` off as the prompt (TRL's ``extract_prompt``)."""
    n = min(len(chosen), len(rejected))
    idx = _common_prefix_length(chosen, rejected)
    if idx == n:  # one is a prefix of the other: the last element of the shorter one is its completion
        idx = max(n - 1, 0)
    elif idx > 0 and isinstance(chosen, str) and chosen[idx - 1] == " ":
        idx -= 1  # the space before the split point goes to the completions
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _chat_ids(tokenizer, messages: list, **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


def _truncate(
    prompt: list[int], chosen: list[int], rejected: list[int], max_length: int | None, mode: str
) -> tuple[list[int], list[int], list[int]]:
    if max_length is None:
        return prompt, chosen, rejected
    if mode == "keep_start":
        room = max(max_length - len(prompt), 0)
        return prompt[:max_length], chosen[:room], rejected[:room]
    longest = max(len(chosen), len(rejected))
    keep = max(max_length - longest, 0)
    prompt = prompt[len(prompt) - keep :] if keep < len(prompt) else prompt
    return prompt, chosen[-max_length:], rejected[-max_length:]


def prompt_completion_ids(
    tokenizer,
    prompt: Any,
    completions: Sequence[Any],
    *,
    conversational: bool,
    example: Mapping[str, Any],
    index: int | None = None,
) -> tuple[list[int], list[list[int]]]:
    """Token ids of a prompt and of each of its completions, as TRL 1.16's DPO and KTO trainers split them.

    Args:
        tokenizer: the tokenizer (with a chat template when ``conversational``).
        prompt: a string, or a list of messages.
        completions: strings (the EOS text is appended unless they end with it), or lists of assistant messages.
        conversational: whether ``prompt`` and ``completions`` are messages.
        example: the whole row; its optional ``tools`` (list or JSON string) and ``chat_template_kwargs`` go to the
            chat template.
        index: the example's index, named by the DatasetError raised when the chat template rejects it.

    Returns:
        ``(prompt_ids, [completion_ids, ...])``: the prompt keeps the first ``P`` ids, where ``P`` is the shortest
        common prefix of the prompt's ids with each ``prompt + completion``'s ids; each completion is the rest.
    """
    if conversational:
        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
        try:
            prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True, **kwargs)
            full = [_chat_ids(tokenizer, prompt + c, **kwargs) for c in completions]
        except jinja2.TemplateError as exc:  # the template's own checks (raise_exception) and undefined fields
            raise DatasetError(
                f"example {index}: the chat template could not render it: {exc}. Check the roles, their order (many "
                "templates require user/assistant turns to alternate) and the message fields, or fix the example."
            ) from exc
    else:
        eos = tokenizer.eos_token
        if eos is not None:
            completions = [c if c.endswith(eos) else c + eos for c in completions]
        prompt_ids = list(tokenizer(text=prompt)["input_ids"])
        full = [list(tokenizer(text=prompt + c)["input_ids"]) for c in completions]
    p = min(_common_prefix_length(prompt_ids, ids) for ids in full)
    return prompt_ids[:p], [ids[p:] for ids in full]


def _tokenize_example(
    example: dict[str, Any],
    index: int,
    *,
    tokenizer,
    conversational: bool,
    decided_by: int,
    implicit_prompt: bool,
    max_length: int | None,
    truncation_mode: str,
) -> dict[str, Any]:
    keys = ("chosen", "rejected") if implicit_prompt else PREFERENCE_COLUMNS
    values = {k: as_text_or_messages(example[k], index, k, conversational, decided_by) for k in keys}
    chosen, rejected = values["chosen"], values["rejected"]
    prompt = None if implicit_prompt else values["prompt"]
    if implicit_prompt:
        prompt, chosen, rejected = _extract_prompt(chosen, rejected)

    prompt_ids, (chosen_ids, rejected_ids) = prompt_completion_ids(
        tokenizer, prompt, [chosen, rejected], conversational=conversational, example=example, index=index
    )
    status = _EMPTY if not chosen_ids or not rejected_ids else _OK
    prompt_ids, chosen_ids, rejected_ids = _truncate(prompt_ids, chosen_ids, rejected_ids, max_length, truncation_mode)
    if status == _OK and (not chosen_ids or not rejected_ids):
        status = _TRUNCATED
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "_status": status}


def tokenize_preference_dataset(
    dataset,
    tokenizer,
    *,
    max_length: int | None,
    truncation_mode: str = "keep_start",
    num_proc: int | None = None,
    drop_truncated: bool = False,
):
    """Tokenize a preference dataset as TRL 1.16's ``DPOTrainer`` does (see the module docstring).

    Args:
        dataset: a ``datasets.Dataset`` or a list of dicts with ``prompt``, ``chosen``, ``rejected`` (all strings,
            or all lists of ``{"role", "content"}`` messages), or only ``chosen``/``rejected`` holding whole
            conversations/texts that share the prompt as a prefix. Optional ``tools`` and ``chat_template_kwargs``
            columns are passed to the chat template. ``ref_chosen_logps``/``ref_rejected_logps`` columns are kept.
        tokenizer: a transformers tokenizer (with a chat template for conversational data).
        max_length: longest ``prompt + completion`` in tokens, or ``None`` for no truncation.
        truncation_mode: ``"keep_start"`` or ``"keep_end"``.
        num_proc: processes used by ``Dataset.map``.
        drop_truncated: drop (with a warning) the examples whose prompt alone fills ``max_length`` instead of
            raising, as TRL does.

    Returns:
        ``datasets.Dataset`` with list-of-int columns ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (and the
        reference log-prob columns if the input had them).

    Raises:
        DatasetError: empty dataset; missing columns; mixed formats; conversational data with a tokenizer that has
            no chat template; an example with an empty completion (before or after truncation).
        ConfigurationError: bad ``max_length`` or ``truncation_mode``.
    """
    import datasets

    if truncation_mode not in TRUNCATION_MODES:
        raise ConfigurationError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if max_length is not None and max_length < 2:
        raise ConfigurationError(f"max_length must be at least 2 (or None for no truncation), got {max_length}")
    if not isinstance(dataset, datasets.Dataset):
        if isinstance(dataset, (str, bytes, Mapping)) or not isinstance(dataset, Sequence):
            raise DatasetError(
                f"expected a datasets.Dataset or a list of dicts, got {type(dataset).__name__} "
                "(load files with datasets.load_dataset(...) or data.load.load_jsonl(...) first)"
            )
        if len(dataset) == 0:
            raise DatasetError("the preference dataset is empty; it needs at least one (prompt, chosen, rejected) row")
        dataset = as_dataset(list(dataset))  # names the first row that breaks the table (engine.training.rows)
    if len(dataset) == 0:
        raise DatasetError("the preference dataset is empty; it needs at least one (prompt, chosen, rejected) row")

    columns = list(dataset.column_names)
    implicit_prompt = "prompt" not in columns and "chosen" in columns and "rejected" in columns
    missing = [c for c in PREFERENCE_COLUMNS if c not in columns and not (c == "prompt" and implicit_prompt)]
    if missing:
        raise DatasetError(
            f"the preference dataset lacks the column(s) {missing}; it has {columns}. DPO and ORPO need 'prompt', "
            "'chosen' and 'rejected' (or only 'chosen' and 'rejected' sharing the prompt as a prefix); rename the "
            "columns with dataset.rename_column(old, new)."
        )
    conversational, decided_by = first_format(dataset["chosen"])
    if conversational and getattr(tokenizer, "chat_template", None) is None:
        raise DatasetError(
            "the dataset is conversational (lists of messages) but the tokenizer has no chat template. Set "
            "tokenizer.chat_template (e.g. from the instruct model's tokenizer) or pass plain-string prompt/chosen/"
            "rejected."
        )

    keep = [c for c in _REF_COLUMNS if c in columns]
    tokenized = dataset.map(
        _tokenize_example,
        with_indices=True,
        fn_kwargs={
            "tokenizer": tokenizer,
            "conversational": conversational,
            "decided_by": decided_by,
            "implicit_prompt": implicit_prompt,
            "max_length": max_length,
            "truncation_mode": truncation_mode,
        },
        remove_columns=[c for c in columns if c not in keep],
        num_proc=num_proc,
        desc="Tokenizing preference data",
        **map_kwargs(dataset),
    )

    status = tokenized["_status"]
    empty = [i for i, s in enumerate(status) if s == _EMPTY]
    if empty:
        raise DatasetError(
            f"example {empty[0]}: an empty chosen or rejected completion after tokenization ({len(empty)} such "
            f"example(s), first indices: {empty[:10]}); every completion needs at least one token. Remove these "
            "examples."
        )
    truncated = [i for i, s in enumerate(status) if s == _TRUNCATED]
    if truncated and not drop_truncated:
        raise DatasetError(
            f"example {truncated[0]}: a prompt of max_length={max_length} tokens or more, so truncation leaves no "
            f"completion token to learn from ({len(truncated)} such example(s), first indices: {truncated[:10]}). Raise max_length, shorten "
            "or remove these prompts, use truncation_mode='keep_end', or drop them (drop_truncated=True, as TRL)."
        )
    if truncated:
        logger.warning(
            "dropping %d example(s) whose prompt alone fills max_length=%s (first indices: %s)",
            len(truncated),
            max_length,
            truncated[:10],
        )
        dropped = set(truncated)
        tokenized = tokenized.select([i for i in range(len(tokenized)) if i not in dropped])
        if len(tokenized) == 0:
            raise DatasetError(f"every example's prompt fills max_length={max_length}; raise max_length")
    return tokenized.remove_columns("_status")


# ---------------------------------------------------------------------------------------------- batching
def collate_sequences(
    sequences: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], *, pad_token_id: int, padding_free: bool
) -> dict[str, torch.Tensor]:
    """``n`` token sequences and their completion masks as one batch, padded on the right or padding-free.

    Returns:
        padded: int64 ``input_ids``, ``attention_mask``, ``completion_mask`` ``[n, s]`` (``s`` = longest sequence);
        ``padding_free``: int64 ``input_ids``, ``position_ids`` (restarting at 0 for each sequence),
        ``completion_mask`` ``[1, T]`` (``T`` = total tokens), ``sequence_index`` ``[T]`` (the sequence of each
        token) and ``sequence_lengths`` ``[n]``.
    """
    lengths = [len(s) for s in sequences]
    if padding_free:
        return {
            "input_ids": torch.tensor([[t for s in sequences for t in s]], dtype=torch.long),
            "position_ids": torch.tensor([[p for n in lengths for p in range(n)]], dtype=torch.long),
            "completion_mask": torch.tensor([[m for mask in masks for m in mask]], dtype=torch.long),
            "sequence_index": torch.repeat_interleave(
                torch.arange(len(sequences)), torch.tensor(lengths, dtype=torch.long)
            ),
            "sequence_lengths": torch.tensor(lengths, dtype=torch.long),
        }
    width = max(lengths)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (seq, mask) in enumerate(zip(sequences, masks)):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
        completion_mask[row, : len(seq)] = torch.tensor(mask, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


@dataclass
class PreferenceCollator:
    """Batch tokenized preference examples for one forward pass over chosen and rejected sequences.

    Args:
        pad_token_id (int): id used for right padding (never attended to nor scored).
        padding_free (bool): concatenate all sequences into one row instead of padding.

    Calling it on ``b`` examples (dicts with ``prompt_ids``, ``chosen_ids``, ``rejected_ids``) returns, with
    sequence ``i < b`` = ``prompt_i + chosen_i`` and ``b + i`` = ``prompt_i + rejected_i``:

    * padded: ``input_ids``, ``attention_mask``, ``completion_mask``: int64 ``[2b, s]`` (``s`` = longest sequence);
    * ``padding_free``: ``input_ids``, ``position_ids`` (restarting at 0 for each sequence), ``completion_mask``:
      int64 ``[1, T]`` with ``T`` the total number of tokens; ``sequence_index``: int64 ``[T]``, the sequence
      (``0 .. 2b-1``) of each token; ``sequence_lengths``: int64 ``[2b]``;
    * ``ref_chosen_logps``, ``ref_rejected_logps``: float32 ``[b]`` if the examples carry them.
    """

    pad_token_id: int
    padding_free: bool = False

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(features) == 0:
            raise DatasetError("PreferenceCollator got an empty list of examples")
        for i, f in enumerate(features):
            missing = [k for k in ("prompt_ids", "chosen_ids", "rejected_ids") if k not in f]
            if missing:
                raise DatasetError(
                    f"example {i} lacks {missing} (has {sorted(f)}); tokenize the data with "
                    "tokenize_preference_dataset first"
                )
            if len(f["chosen_ids"]) == 0 or len(f["rejected_ids"]) == 0:
                raise DatasetError(f"example {i} has an empty chosen or rejected completion; nothing to score")
        sequences = [list(f["prompt_ids"]) + list(f["chosen_ids"]) for f in features]
        sequences += [list(f["prompt_ids"]) + list(f["rejected_ids"]) for f in features]
        masks = [[0] * len(f["prompt_ids"]) + [1] * len(f["chosen_ids"]) for f in features]
        masks += [[0] * len(f["prompt_ids"]) + [1] * len(f["rejected_ids"]) for f in features]
        out = collate_sequences(sequences, masks, pad_token_id=self.pad_token_id, padding_free=self.padding_free)
        for key in _REF_COLUMNS:
            if key in features[0]:
                out[key] = torch.tensor([float(f[key]) for f in features], dtype=torch.float32)
        return out


# ---------------------------------------------------------------------------------------------- log-probs
def completion_log_prob_sums(
    model, batch: Mapping[str, torch.Tensor], *, prefix: str = "", whole_sequence: bool = False
) -> dict[str, torch.Tensor]:
    """Per-sequence sums of token log-probs of a collated batch, from one ``model.token_log_probs`` call.

    Args:
        model: a :class:`~engine.models.transformer.CausalLM` (with or without LoRA).
        batch: padded (``input_ids``, ``attention_mask``, ``completion_mask``: ``[n, s]``) or padding-free
            (``input_ids``, ``position_ids``, ``completion_mask``: ``[1, T]``; ``sequence_index`` ``[T]``;
            ``sequence_lengths`` ``[n]``); with ``prefix`` (e.g. ``"KL_"``) the keys ``prefix + key`` are read.
        whole_sequence: also score the prompt tokens (ORPO's NLL term); otherwise only completion tokens get a
            log-prob (no work is spent on the others' labels).

    Returns:
        float32 ``logps`` ``[n]``: ``Σ_{t: completion_mask[t]=1} log p(x_t | x_<t)`` (a completion token at a
        sequence's first position has no context and adds 0, as in TRL); int64 ``lengths`` ``[n]`` (completion
        tokens), ``scored_lengths`` ``[n]`` (completion tokens that have a context, i.e. not first in their
        sequence), ``num_tokens`` (scalar, real tokens in the batch); with ``whole_sequence`` also ``all_logps``
        ``[n]`` (the sum over every token after the first) and ``all_scored`` ``[n]`` (``length - 1``).
        Differentiable w.r.t. the trainable parameters when grad is enabled.
    """
    device = next(model.parameters()).device
    input_ids = batch[prefix + "input_ids"].to(device)
    completion_mask = batch[prefix + "completion_mask"].to(device)
    padding_free = prefix + "sequence_index" in batch
    if padding_free:
        position_ids = batch[prefix + "position_ids"].to(device)
        real = torch.ones_like(input_ids)
        has_context = (position_ids != 0).long()
    else:
        real = batch[prefix + "attention_mask"].to(device)
        has_context = torch.nn.functional.pad(real[:, 1:], (1, 0), value=0)
    labels = input_ids.masked_fill((real if whole_sequence else completion_mask) == 0, -100)
    if padding_free:
        token_logps = model.token_log_probs(input_ids, labels, position_ids=position_ids)
        index = batch[prefix + "sequence_index"].to(device)
        n = batch[prefix + "sequence_lengths"].numel()

        def per_sequence(values: torch.Tensor) -> torch.Tensor:
            return values.new_zeros(n).index_add(0, index, values[0])

        num_tokens = batch[prefix + "sequence_lengths"].sum()
    else:
        token_logps = model.token_log_probs(input_ids, labels, attention_mask=real)

        def per_sequence(values: torch.Tensor) -> torch.Tensor:
            return values.sum(dim=-1)

        num_tokens = real.sum()
    out = {
        "logps": per_sequence(token_logps * completion_mask),
        "lengths": per_sequence(completion_mask),
        "scored_lengths": per_sequence(completion_mask * has_context),
        "num_tokens": num_tokens,
    }
    if whole_sequence:
        out["all_logps"] = per_sequence(token_logps)
        out["all_scored"] = per_sequence(real * has_context)
    return out


def sequence_log_probs(model, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Summed completion log-probs of the chosen and rejected sequences of a :class:`PreferenceCollator` batch.

    One call of ``model.token_log_probs`` (no full logits) serves chosen and rejected sequences together
    (:func:`completion_log_prob_sums`).

    Args:
        model: a :class:`~engine.models.transformer.CausalLM` (with or without LoRA).
        batch: the collator's output (padded or padding-free), on any device.

    Returns:
        ``(chosen_logps [b], rejected_logps [b], extra)``: float32, differentiable w.r.t. the trainable
        parameters when grad is enabled. ``extra`` holds ``chosen_lengths`` and ``rejected_lengths`` (int64
        ``[b]``, completion tokens per sequence, the IPO normaliser; TRL counts them from the unshifted
        completion mask) and ``num_tokens`` (int64 scalar, real tokens in the batch).
    """
    sums = completion_log_prob_sums(model, batch)
    logps, lengths = sums["logps"], sums["lengths"]
    if logps.shape[0] % 2:
        raise DatasetError(f"a preference batch holds chosen and rejected sequences (2b), got {logps.shape[0]}")
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    extra = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths, "num_tokens": sums["num_tokens"]}
    return chosen_logps, rejected_logps, extra


def reference_sequence_log_probs(model, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference policy's ``(chosen_logps [b], rejected_logps [b])``: ``model`` with its LoRA adapters off.

    Without grad. Only valid for a LoRA model (without adapters this is the policy itself).
    """
    from engine.peft import disable_adapter

    with torch.no_grad(), disable_adapter(model):
        chosen, rejected, _ = sequence_log_probs(model, batch)
    return chosen, rejected
