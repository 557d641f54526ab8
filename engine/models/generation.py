"""Autoregressive generation with a preallocated KV cache (greedy or sampling, stops at EOS)."""

from __future__ import annotations

import torch

from engine.errors import ConfigurationError


class KVCache:
    """Keys and values of every layer, preallocated for ``max_length`` positions.

    Args:
        num_layers, batch_size, num_kv_heads, head_dim, max_length: sizes.
        device, dtype: storage.

    Each layer's keys are ``[b, kv, max_length, hd]``; ``length`` positions are filled.
    """

    def __init__(self, num_layers, batch_size, num_kv_heads, head_dim, max_length, device, dtype):
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.length = 0
        self.max_length = max_length

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Store new keys/values ``[b, kv, s, hd]`` after the cached ones.

        Returns:
            ``(keys, values, q_offset)``: all keys/values so far ``[b, kv, length + s, hd]`` and the
            slot of the first new token.
        """
        s = k.shape[2]
        end = self.length + s
        if end > self.max_length:
            raise ConfigurationError(f"KV cache holds {self.max_length} positions; {end} were needed")
        self.keys[layer_idx][:, :, self.length : end] = k
        self.values[layer_idx][:, :, self.length : end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end], self.length

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as filled (after every layer stored them)."""
        self.length += n


#: Off CPU, steps between two checks whether every row has ended (each check is a host synchronisation).
SYNC_EVERY = 8


def _as_id_set(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _pick_next(logits, do_sample, temperature, top_k, top_p, generator):
    """Choose next tokens ``[b]`` from ``logits [b, V]``.

    Sampling draws one uniform number per row and inverts the cumulative distribution (``searchsorted``): the
    same distribution as ``torch.multinomial``, but ``b`` random numbers instead of ``b * V`` (multinomial's
    exponential draws over the whole vocabulary cost more than the model's decode step on a CPU). Tokens of
    probability zero (cut by ``top_k``/``top_p``) are never chosen: a row's pick is the first token whose
    cumulative probability exceeds the draw.
    """
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p
        drop = (probs.cumsum(-1) - probs) > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    cdf = logits.softmax(-1).cumsum(-1)
    draw = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, draw, right=True).squeeze(1).clamp_max(cdf.shape[-1] - 1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    **unused,
) -> torch.Tensor:
    """Generate continuations of a (left-padded) batch of prompts.

    Args:
        model (CausalLM): the model.
        input_ids (Tensor): ``[b, s]`` prompts, left-padded when of different lengths.
        attention_mask (Tensor, optional): ``[b, s]``, 0 on padding.
        max_new_tokens (int): most tokens to add.
        do_sample (bool): sample (with ``temperature``, ``top_k``, ``top_p``) instead of greedy argmax.
        eos_token_id: token(s) that end a sequence; defaults to the model config's.
        pad_token_id: written after a sequence ended; defaults to the first EOS id (or 0).
        seed (int, optional): seed of the sampling generator.

    Returns:
        Tensor ``[b, s + n]``: the prompts followed by the generated tokens (``n <= max_new_tokens``; ``n`` is the
        step at which the last row emitted EOS, or ``max_new_tokens``).

    A decode step feeds ``[b, 1]`` tokens with views of one preallocated ``[b, s + max_new_tokens]`` attention mask
    and the positions kept as a running ``[b, 1]`` counter (no mask concatenation or cumulative sum per step). On a
    CPU, whether every row has ended is checked after every step; elsewhere every :data:`SYNC_EVERY` steps (a host
    synchronisation), and the output is cut back to the step the last row ended at, so the result is the same.
    """
    for key in unused:
        if key not in ("use_cache", "streamer", "generation_config", "num_beams"):
            raise ConfigurationError(f"generate() got an unexpected argument {key!r}")
    if unused.get("num_beams", 1) != 1:
        raise ConfigurationError("beam search is not supported; use greedy (do_sample=False) or sampling")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    input_ids = input_ids.to(model.device)
    b, s = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(model.device).long()
    if bool((attention_mask[:, -1] == 0).any()):
        raise ConfigurationError(
            "the prompts are right-padded; generation needs left padding (set tokenizer.padding_side = 'left')"
        )
    eos_ids = _as_id_set(eos_token_id if eos_token_id is not None else model.args.eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    max_new_tokens = min(max_new_tokens, model.max_seq_length - s)
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    args = model.args
    cache = KVCache(args.num_layers, b, args.num_kv_heads, args.head_dim, s + max_new_tokens, model.device, model.dtype)
    padded = not bool(attention_mask.all())
    full_mask = torch.ones(b, s + max_new_tokens, dtype=torch.long, device=model.device)
    full_mask[:, :s] = attention_mask
    # next position of each row: its number of real prompt tokens
    position = attention_mask.sum(-1, keepdim=True)
    sync_every = 1 if model.device.type == "cpu" else SYNC_EVERY
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids, attention_mask=attention_mask if padded else None, cache=cache, logits_to_keep=1)
        cache.advance(s)
        tokens = torch.full((b, max_new_tokens), pad, dtype=torch.long, device=model.device)
        finished = torch.zeros(b, dtype=torch.bool, device=model.device)
        ended_at = torch.full((b,), max_new_tokens - 1, dtype=torch.long, device=model.device)
        eos = torch.tensor(eos_ids, device=model.device, dtype=torch.long)
        n = max_new_tokens
        for step in range(max_new_tokens):
            nxt = _pick_next(out.logits[:, -1], do_sample, temperature, top_k, top_p, generator)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            tokens[:, step] = nxt
            if len(eos_ids):
                ends = torch.isin(nxt, eos) & ~finished
                ended_at = torch.where(ends, step, ended_at)
                finished |= ends
                if (step + 1) % sync_every == 0 and bool(finished.all()):
                    n = int(ended_at.max()) + 1
                    break
            if step == max_new_tokens - 1:
                break
            length = s + step + 1
            threshold = args.long_rope_threshold if args.long_inv_freq is not None else None
            if threshold is not None and cache.length == threshold:
                # LongRoPE (Phi-3): the sequence just passed the original context, so every position switches to the
                # long factors; the cached keys were rotated with the short ones. Recompute them, as transformers'
                # Phi-3 generate does (it drops its cache once at this point).
                cache.length = 0
                seq = torch.cat([input_ids, tokens[:, : step + 1]], dim=1)
                out = model(seq, attention_mask=full_mask[:, :length], cache=cache, logits_to_keep=1)
                cache.advance(length)
                position = position + 1
                continue
            out = model(
                nxt[:, None], attention_mask=full_mask[:, :length] if padded else None, position_ids=position,
                cache=cache, logits_to_keep=1,
            )
            cache.advance(1)
            position = position + 1
        if len(eos_ids) and n == max_new_tokens and bool(finished.all()):
            n = int(ended_at.max()) + 1  # the last check fell between two syncs
    finally:
        model.train(was_training)
    return torch.cat([input_ids, tokens[:, :n]], dim=1)
