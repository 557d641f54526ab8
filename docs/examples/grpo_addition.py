"""GRPO on the real SmolLM2-135M-Instruct: learn to answer single-digit additions, from a reward function alone.

Run from the repository root (about 4 minutes on a 2-core CPU)::

    python docs/examples/grpo_addition.py [--steps 20] [--lr 2e-4]

The task and reward are ``engine/data/rewards.py``: prompts such as "What is 7 + 5? Answer with only the number.", the
reward ``0.8 * correct + 0.2 * concise`` (the last integer of the completion is the sum; the answer is short). The
base model's held-out mean reward is low but not zero (it sometimes answers correctly), so groups of completions
differ and GRPO has a signal. The script measures the held-out mean reward and success rate (8 sampled completions
per held-out prompt, temperature 1.0, fixed seeds) before and after ``--steps`` GRPO steps of 4 prompts x 8
generations, and prints the time per step split into generation and training.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from engine import FastModel
from engine.assets import smollm2_gguf_path


def sample_completions(model, tokenizer, rows, *, generations: int, max_new_tokens: int, seed: int,
                       batch_size: int = 32) -> list[list[str]]:
    """``generations`` sampled completions (temperature 1.0) of each row's chat prompt, as strings."""
    tokenizer.padding_side = "left"
    eos = [t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if t is not None]
    texts = [
        tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        for row in rows for _ in range(generations)
    ]
    out: list[str] = []
    FastModel.for_inference(model)
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                             do_sample=True, temperature=1.0, eos_token_id=eos, seed=seed + start)
        out += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    FastModel.for_training(model)
    return [out[i * generations:(i + 1) * generations] for i in range(len(rows))]


def held_out_scores(model, tokenizer, rows, *, generations: int = 8, max_new_tokens: int = 16, seed: int = 1234) -> dict:
    """Mean reward and success rate (correct answers) over ``generations`` samples per held-out row."""
    from engine.data.rewards import addition_reward, correct_reward

    completions = sample_completions(model, tokenizer, rows, generations=generations,
                                     max_new_tokens=max_new_tokens, seed=seed)
    prompts = [row["prompt"] for row in rows for _ in range(generations)]
    answers = [row["answer"] for row in rows for _ in range(generations)]
    flat = [c for group in completions for c in group]
    reward = addition_reward(prompts=prompts, completions=flat, answer=answers)
    correct = correct_reward(prompts=prompts, completions=flat, answer=answers)
    return {"mean_reward": sum(reward) / len(reward), "success_rate": sum(correct) / len(correct),
            "example": (rows[0]["prompt"][0]["content"], completions[0][0])}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=16)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--eval-generations", type=int, default=8, help="sampled completions per held-out prompt")
    args = parser.parse_args(argv)

    from engine.data.rewards import addition_prompts, addition_reward
    from engine import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    train, held_out = addition_prompts(n_eval=args.eval_prompts, seed=0)
    model, tokenizer = FastModel.from_pretrained(smollm2_gguf_path(), max_seq_length=256)
    model = FastModel.get_peft_model(model, r=16, lora_alpha=32, use_gradient_checkpointing=False, random_state=0)

    t0 = time.perf_counter()
    before = held_out_scores(model, tokenizer, held_out, generations=args.eval_generations,
                             max_new_tokens=args.max_completion_length)
    eval_seconds = time.perf_counter() - t0
    print(f"held-out before GRPO: mean reward {before['mean_reward']:.3f}, correct {before['success_rate']:.1%} "
          f"({eval_seconds:.0f} s)  e.g. {before['example']}")

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=args.prompts_per_step * args.generations,
            num_generations=args.generations,
            max_completion_length=args.max_completion_length,
            temperature=1.0,
            beta=0.0,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            logging_steps=5,
            save_strategy="no",
            seed=0,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=addition_reward, args=config, train_dataset=train,
                              tokenizer=tokenizer)
        trainer.train()

    after = held_out_scores(model, tokenizer, held_out, generations=args.eval_generations,
                            max_new_tokens=args.max_completion_length)
    print(f"held-out after GRPO:  mean reward {after['mean_reward']:.3f}, correct {after['success_rate']:.1%}  "
          f"e.g. {after['example']}")
    summary = trainer.training_summary
    generation = summary.generation or {}
    steps = max(summary.steps, 1)
    gen_s = generation.get("seconds", 0.0)
    print(f"time per step: {summary.total_seconds / steps:.1f} s = generation {gen_s / steps:.1f} s "
          f"({generation.get('tokens_per_second', 0.0):.0f} completion tokens/s) + training "
          f"{(summary.total_seconds - gen_s) / steps:.1f} s")
    return {"before": before, "after": after, "summary": summary, "model": model}


if __name__ == "__main__":
    main()
