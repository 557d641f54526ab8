"""GRPO data plumbing: the repeat sampler, prompt tokenization, batch layout, completion log-probs and entropy.

* :class:`RepeatSampler` yields dataset indices in TRL 1.16's ``RepeatSampler`` order: a seeded permutation cut
  into chunks of ``generation_batch_size / num_generations`` prompts; each chunk is yielded ``repeat_count`` times
  (``num_iterations x steps_per_generation``: one per micro-step that uses it) and every index in it
  ``num_generations`` times in a row (``mini_repeat_count``), so a prompt's group is generated together.
* :func:`completion_log_probs` scores the completion tokens of ``prompt (left-padded) + completion
  (right-padded)`` rows with the chunked ``engine_kernels.linear_token_log_probs`` op (never ``[N, V]`` logits), at the
  sampling temperature as TRL does. With ``entropy=True`` it also returns the per-token entropy of the same
  distribution, computed without grad by ``engine_kernels.linear_token_entropy`` over chunks of the scored tokens only
  (``[chunk, V]`` fp32 blocks; ``chunk`` from ``engine_kernels.cross_entropy.default_chunk_size``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Sampler

from engine_kernels.token_log_probs import linear_token_entropy, linear_token_log_probs

__all__ = ["RepeatSampler", "completion_log_probs", "is_conversational", "pad_left", "pad_right"]


class RepeatSampler(Sampler):
    """Indices ``0..n-1`` in TRL's ``RepeatSampler`` order (see the module docstring).

    Args:
        data_source: the dataset (only ``len`` is used).
        mini_repeat_count: repeats of each index in a row (``num_generations``).
        batch_size: distinct prompts per chunk (incomplete last chunks are dropped).
        repeat_count: repeats of each chunk.
        shuffle: permute the dataset first (``torch.randperm`` with a generator seeded by ``seed``).
    """

    def __init__(self, data_source, mini_repeat_count: int, batch_size: int = 1, repeat_count: int = 1,
                 shuffle: bool = True, seed: int | None = None):
        self.num_samples = len(data_source)
        self.mini_repeat_count, self.batch_size, self.repeat_count = mini_repeat_count, batch_size, repeat_count
        self.shuffle = shuffle
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

    def __iter__(self):
        order = torch.randperm(self.num_samples, generator=self.generator).tolist() if self.shuffle else list(
            range(self.num_samples)
        )
        chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for chunk in chunks:
            if len(chunk) != self.batch_size:
                continue
            for _ in range(self.repeat_count):
                for index in chunk:
                    yield from [index] * self.mini_repeat_count

    def __len__(self) -> int:
        return (self.num_samples // self.batch_size) * self.batch_size * self.mini_repeat_count * self.repeat_count


def is_conversational(prompt) -> bool:
    """A prompt given as a list of ``{"role", "content"}`` messages."""
    return isinstance(prompt, list) and (len(prompt) == 0 or isinstance(prompt[0], dict))


def pad_left(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [n, L], mask [n, L])`` int64, rows aligned right (left padding with ``value``)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def pad_right(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [n, L], mask [n, L])`` int64, rows aligned left (right padding with ``value``)."""
    width = max(max(len(r) for r in rows), 1)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
            mask[i, : len(r)] = 1
    return ids, mask


def completion_log_probs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_completion_tokens: int,
    temperature: float = 1.0,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropies) of the last ``C`` columns: the completion tokens.

    Args:
        model: a :class:`~engine.models.transformer.CausalLM`.
        input_ids: int64 ``[B, P + C]``: left-padded prompts then right-padded completions.
        attention_mask: ``[B, P + C]``, 0 on padding (and on masked truncated completions).
        num_completion_tokens: ``C``.
        temperature: the logits are divided by it (the distribution the tokens were sampled from).
        entropy: also return the entropies (no grad).

    Returns:
        ``(logps [B, C], entropies [B, C] or None)`` float32, 0 where ``attention_mask`` is 0.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    c = num_completion_tokens
    # Final-norm hidden states; the position before each completion token predicts it.
    hidden, _ = model._hidden_states(input_ids, attention_mask, None, None, None, None)
    h = hidden[:, -c - 1 : -1]
    b, _, d = h.shape
    scored = attention_mask[:, -c:].bool()
    targets = input_ids[:, -c:].masked_fill(~scored, -100)
    weight, softcap = model.lm_head.weight, model.args.final_softcap
    flat = h.reshape(-1, d)
    logps = linear_token_log_probs(flat, weight, targets.reshape(-1), softcap=softcap, temperature=temperature)
    logps = logps.view(b, c)
    entropies = None
    if entropy:
        rows = scored.reshape(-1).nonzero().squeeze(1)
        values = linear_token_entropy(flat.detach().index_select(0, rows), weight.detach(), softcap, temperature)
        entropies = torch.zeros(b * c, dtype=torch.float32, device=device).index_copy_(0, rows, values).view(b, c)
    return logps, entropies
