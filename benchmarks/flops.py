"""Model FLOPs of a LoRA training step, and the "model-shape ceiling" they are measured against.

Counting (one multiply-add = 2 FLOPs; ``T`` tokens in the step, ``P`` the base matmul parameters
per token: q/k/v/o, gate/up/down in every layer plus the LM head):

* **forward**: ``2 * P * T`` for the base projections and the LM head, plus attention;
* **backward, frozen base**: only the gradient of the activations flows through a frozen weight,
  ``2 * P * T`` (no weight gradient is computed for it), plus attention's backward;
* **LoRA** on a projection ``in -> out`` with rank ``r``: forward ``2 * r * (in + out)`` per token,
  backward twice that (activation gradient plus the gradients of ``A`` and ``B``);
* **attention**, per document of ``n`` tokens, causal (half the score matrix): forward
  ``2 * n^2 * h * hd`` (``Q K^T`` and ``P V``, each ``n^2 / 2 * hd`` multiply-adds per head), backward
  twice the forward (``dQ``, ``dK``, ``dV``, ``dP``). Documents never attend to each other, so a packed
  row costs ``sum(n_d^2)``, not ``(sum n_d)^2``;
* the LM head is counted for every token (the fused loss computes every row's logits chunk by chunk).

*Model* FLOPs count this work once (MFU); *hardware* FLOPs add what gradient checkpointing recomputes:
one more forward of every checkpointed decoder layer (HFU). Elementwise work (norms, RoPE, SwiGLU,
softmax) is not counted, as is customary.

The ceiling is measured, not taken from a data sheet: :func:`matmul_ceiling` replays this step's own
matmul shapes (every projection's forward ``[T, in] @ [in, out]`` and its activation-gradient
``[T, out] @ [out, in]``, and the LM head's, at the step's token count) back to back in the training dtype
and reports FLOP/s. "MFU" here is model FLOP/s divided by that ceiling: the share of what this hardware
reaches on exactly these shapes, which for small models on CPUs is well below its peak.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch


def projection_shapes(args) -> list[tuple[str, int, int]]:
    """``(name, in_features, out_features)`` of each decoder layer's projections for :class:`ModelArgs` ``args``."""
    d, f, hd = args.hidden_size, args.intermediate_size, args.head_dim
    q, kv = args.num_heads * hd, args.num_kv_heads * hd
    return [
        ("q_proj", d, q),
        ("k_proj", d, kv),
        ("v_proj", d, kv),
        ("o_proj", q, d),
        ("gate_proj", d, f),
        ("up_proj", d, f),
        ("down_proj", f, d),
    ]


@dataclass
class StepFlops:
    """FLOPs of one training step.

    Attributes:
        tokens: tokens in the step (the sum of the document lengths).
        model: forward + backward work counted once (for MFU).
        hardware: ``model`` plus the forward of every recomputed (checkpointed) layer (for HFU).
        base_matmul, lora, attention, lm_head: the parts of ``model``.
    """

    tokens: int
    model: float
    hardware: float
    base_matmul: float
    lora: float
    attention: float
    lm_head: float

    def as_dict(self) -> dict:
        return asdict(self)


def step_flops(
    args,
    doc_lengths: Sequence[int],
    *,
    lora_r: int = 16,
    lora_targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    checkpointed_layers: int = 0,
) -> StepFlops:
    """Model and hardware FLOPs of a LoRA step over documents of ``doc_lengths`` tokens (frozen base).

    Args:
        args: the model's :class:`~engine.models.config.ModelArgs`.
        doc_lengths: tokens of each document in the step (packed or not; padding excluded).
        lora_r: LoRA rank (0: no adapters).
        lora_targets: projections with adapters.
        checkpointed_layers: decoder layers whose forward is recomputed in backward.
    """
    tokens = int(sum(doc_lengths))
    shapes = projection_shapes(args)
    layer_params = sum(i * o for _, i, o in shapes)
    layer_lora = sum(lora_r * (i + o) for name, i, o in shapes if name in lora_targets) if lora_r else 0
    attn_fwd_layer = 2.0 * args.num_heads * args.head_dim * sum(int(n) ** 2 for n in doc_lengths)
    L = args.num_layers
    base = 4.0 * layer_params * tokens * L  # forward + activation gradient
    lora = 6.0 * layer_lora * tokens * L
    attention = 3.0 * attn_fwd_layer * L
    lm_head = 4.0 * args.hidden_size * args.vocab_size * tokens
    model = base + lora + attention + lm_head
    layer_forward = 2.0 * layer_params * tokens + 2.0 * layer_lora * tokens + attn_fwd_layer
    return StepFlops(tokens, model, model + checkpointed_layers * layer_forward, base, lora, attention, lm_head)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(
    args,
    tokens: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    repeats: int = 3,
    lm_head_chunk: int | None = None,
) -> dict:
    """FLOP/s of this step's own matmul shapes replayed back to back (the best of ``repeats`` rounds).

    One round runs, for one decoder layer's projections and for the LM head, the forward product
    ``[T, in] @ [in, out]`` and the activation-gradient product ``[T, out] @ [out, in]`` with ``T = tokens``
    (the LM head in row chunks of ``lm_head_chunk`` when given, as the fused loss runs it). Layers share shapes,
    so one layer stands for all of them; the LM head is weighted by its own share.

    Returns:
        dict with ``flops_per_s`` (the ceiling), ``seconds`` per round, ``flops`` per round, ``dtype``, ``tokens``.
    """
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(device=device, dtype=dtype)

    weights = [(rand(o, i), i, o) for _, i, o in projection_shapes(args)]
    x_in = {i: rand(tokens, i) for _, i, _ in weights}
    g_out = {o: rand(tokens, o) for _, _, o in weights}
    head = rand(args.vocab_size, args.hidden_size)
    chunk = lm_head_chunk or tokens
    h_in = rand(min(chunk, tokens), args.hidden_size)
    g_logits = rand(min(chunk, tokens), args.vocab_size)
    n_chunks = -(-tokens // chunk)

    L = args.num_layers

    def layer_round() -> None:
        for w, i, _ in weights:
            torch.nn.functional.linear(x_in[i], w)  # forward  [T, in] @ [in, out]
            g_out[w.shape[0]] @ w  # activation gradient [T, out] @ [out, in]

    def head_round() -> None:
        for _ in range(n_chunks):
            torch.nn.functional.linear(h_in, head)
            g_logits @ head

    layer_round()  # warm-up (allocations, kernel selection)
    head_round()
    _sync(device)
    best = float("inf")
    for _ in range(max(1, repeats)):
        # One layer stands for all L layers (same shapes): time it once and weight it, then add the LM head.
        t0 = time.perf_counter()
        layer_round()
        _sync(device)
        t1 = time.perf_counter()
        head_round()
        _sync(device)
        best = min(best, (t1 - t0) * L + time.perf_counter() - t1)
    flops = 4.0 * tokens * sum(i * o for _, i, o in weights) * L
    flops += 4.0 * n_chunks * h_in.shape[0] * args.hidden_size * args.vocab_size
    return {
        "flops_per_s": flops / best,
        "seconds": best,
        "flops": flops,
        "dtype": str(dtype).replace("torch.", ""),
        "tokens": int(tokens),
    }
