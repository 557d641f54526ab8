"""How far the engine's fp32 loss and gradients are from transformers + PEFT, in fp32 and in fp64.

The batch of ``tests/test_smollm2.py::test_lora_loss_and_gradients_equal_peft_on_real_weights``: the real
SmolLM2-135M-Instruct weights (the shipped GGUF, dequantized by transformers and by the engine to the same
fp32 values), LoRA r = 4 (alpha 8) on all 210 projections with equal A and random non-zero B on every side,
three rows (a 23-token text, a 7-token text right-padded and the same left-padded). Three runs:

* the engine in fp32 (its fused, chunked loss),
* transformers + PEFT in fp32 (its ``ForCausalLMLoss`` on fp32 logits),
* transformers + PEFT in fp64, the loss computed from its fp64 logits (``ForCausalLMLoss`` would cast them
  to fp32); its labels lack the first real token of the left-padded row, the target the engine drops.

Printed: the largest difference of each quantity, relative to the reference tensor's largest entry (the
measure of ``tests/test_parity.py::assert_close_rel``), for the loss, d(loss)/d(inputs_embeds) and the worst
of the 420 LoRA gradients.

Run: ``python benchmarks/parity_precision.py`` (CPU, about a minute).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: this repository's engine, not another installed copy
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("ENGINE_CPU_COMPILE", "0")

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from engine import FastModel  # noqa: E402
from engine.assets import smollm2_gguf_path  # noqa: E402
from engine.gguf.reader import load_gguf_tokenizer  # noqa: E402
from engine.peft import lora_modules  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog, and then it runs back into the forest to sleep until morning.",
         "Paris is the capital of France."]


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|a - e| / max|e|`` in fp64."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def peft_copy(base, targets, ours, dtype):
    """``base`` in ``dtype`` with PEFT LoRA on ``targets``, its A and B copied from the engine's ``ours``."""
    model = get_peft_model(copy.deepcopy(base).to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in lora_modules(ours).items():
            params[f"base_model.model.{name}.lora_A.default.weight"].copy_(m.lora_A)
            params[f"base_model.model.{name}.lora_B.default.weight"].copy_(m.lora_B)
    return model.train()


def main() -> None:
    path = smollm2_gguf_path()
    tokenizer = load_gguf_tokenizer(path)
    base = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ours, _ = FastModel.from_pretrained(path, max_seq_length=512, dtype=torch.float32, device="cpu", verbose=False)
    ours = FastModel.get_peft_model(ours, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    g = torch.Generator().manual_seed(7)
    for m in lora_modules(ours).values():
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    ours.train()
    targets = list(ours.lora_settings.target_modules)
    hf32, hf64 = peft_copy(base, targets, ours, torch.float32), peft_copy(base, targets, ours, torch.float64)

    long, short = (tokenizer(t).input_ids for t in TEXTS)
    pads = [tokenizer.pad_token_id] * (len(long) - len(short))
    ids = torch.tensor([long, short + pads, pads + short])
    mask = torch.tensor([[1] * len(long), [1] * len(short) + [0] * len(pads), [0] * len(pads) + [1] * len(short)])
    labels = ids.masked_fill(mask == 0, -100)
    hf_labels = labels.clone()
    hf_labels[2, len(pads)] = -100
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    embeds = ours.get_input_embeddings()(ids).detach()
    e64, e32, e_ours = (embeds.double().requires_grad_(True), embeds.clone().requires_grad_(True),
                        embeds.clone().requires_grad_(True))

    logits = hf64(inputs_embeds=e64, attention_mask=mask, position_ids=positions).logits
    loss64 = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), hf_labels[:, 1:].flatten(),
                                               ignore_index=-100)
    loss32 = hf32(inputs_embeds=e32, attention_mask=mask, position_ids=positions, labels=hf_labels).loss
    loss_ours = ours(inputs_embeds=e_ours, attention_mask=mask, labels=labels).loss
    for loss in (loss64, loss32, loss_ours):
        loss.backward()

    p32, p64 = dict(hf32.named_parameters()), dict(hf64.named_parameters())
    worst = [0.0, 0.0, 0.0]
    for name, m in lora_modules(ours).items():
        for part in ("A", "B"):
            key = f"base_model.model.{name}.lora_{part}.default.weight"
            mine = getattr(m, f"lora_{part}").grad
            errors = (rel(p32[key].grad, p64[key].grad), rel(mine, p64[key].grad), rel(mine, p32[key].grad))
            worst = [max(a, b) for a, b in zip(worst, errors)]
    print("| quantity | transformers fp32 vs fp64 | engine fp32 vs transformers fp64 | engine vs transformers fp32 |")
    print("|---|---|---|---|")
    print(f"| loss | {rel(loss32, loss64):.1e} | {rel(loss_ours, loss64):.1e} | {rel(loss_ours, loss32):.1e} |")
    print(f"| d(loss)/d(inputs_embeds) | {rel(e32.grad, e64.grad):.1e} | {rel(e_ours.grad, e64.grad):.1e} | "
          f"{rel(e_ours.grad, e32.grad):.1e} |")
    print(f"| worst of 420 LoRA gradients | {worst[0]:.1e} | {worst[1]:.1e} | {worst[2]:.1e} |")


if __name__ == "__main__":
    main()
