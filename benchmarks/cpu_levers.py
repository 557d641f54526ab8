"""What each CPU speed lever is worth: the engine's training step with each one switched off in turn.

Run from the repository root (about 6 minutes on 2 CPU cores)::

    python benchmarks/cpu_levers.py                 # SmolLM2-135M-Instruct, LoRA r16 on all projections, bf16
    python benchmarks/cpu_levers.py --steps 8 --rounds 2 --batch-size 8

Same model, data and batches as ``benchmarks/run.py`` (the first conversations of the shipped SFT data, 8 per
step, one padding-free row), a plain training loop (forward, backward, AdamW step), no checkpointing. Configurations:

* ``compiled ops``: the default (:mod:`engine_kernels.cpu_fusion`);
* ``eager ops``: without the fused CPU elementwise ops;
* ``compiled ops, denormals flushed``: with the opt-in ``flush_denormals`` (:mod:`engine.runtime`).

Every configuration trains on the same batches; the configurations take turns (``--rounds`` times, one model that
keeps training), so that a slow phase of the machine or of training does not land on one configuration only.

It also times attention alone (forward + backward of one layer on the step's documents): one SDPA call per document
(the CPU path) against the padded batches of :class:`engine_kernels.attention.PackedLayout` (CUDA's PyTorch path).
Results: ``benchmarks/results/cpu-levers.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

#: (name, flush denormals, ENGINE_CPU_COMPILE); the first is the engine's default, the baseline of the table.
CONFIGS = [
    ("compiled ops (default)", False, "1"),
    ("eager ops", False, "0"),
    ("compiled ops, denormals flushed", True, "1"),
]


def batches(tokenizer, batch_size: int, n: int):
    from engine.data.load import load_jsonl
    from engine.training.collators import PaddingFreeCollator

    rows = load_jsonl("train", "sft")[: batch_size * n]
    feats = [{"input_ids": tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False)} for r in rows]
    collate = PaddingFreeCollator(tokenizer.pad_token_id or 0)
    return [collate(feats[i : i + batch_size]) for i in range(0, len(feats), batch_size)]


def time_training(model, opt, data, warmup: int) -> tuple[list[float], list[int]]:
    """Seconds and tokens of each step after the first ``warmup``."""
    model.train()
    seconds, tokens = [], []
    for i, b in enumerate(data):
        start = time.perf_counter()
        out = model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"],
                    cu_seq_lens=b["cu_seq_lens"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
            tokens.append(b["input_ids"].shape[1])
    return seconds, tokens


def time_attention(lengths, heads: int, kv_heads: int, head_dim: int, repeats: int = 10) -> dict:
    """Forward + backward of one layer's attention over the documents, per-document calls vs padded batches."""
    from engine_kernels.attention import _packed_sdpa_attention, _per_document_attention, packed_layout

    g = torch.Generator().manual_seed(0)
    s = sum(lengths)
    q0 = torch.randn(1, s, heads, head_dim, generator=g).to(torch.bfloat16)
    k0 = torch.randn(1, s, kv_heads, head_dim, generator=g).to(torch.bfloat16)
    v0 = torch.randn(1, s, kv_heads, head_dim, generator=g).to(torch.bfloat16)
    layout = packed_layout(lengths)
    scale = head_dim**-0.5
    runs = {
        "one SDPA call per document (CPU path)": lambda q, k, v: _per_document_attention(q, k, v, lengths, scale, None),
        "padded batches (CUDA's PyTorch path)": lambda q, k, v: _packed_sdpa_attention(q, k, v, layout, scale, None),
    }
    out = {}
    for name, fn in runs.items():
        q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))

        def step():
            o = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            o.sum().backward()

        for _ in range(3):
            step()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        out[name] = (time.perf_counter() - start) / repeats * 1000
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="steps per configuration and round (the first 2 not timed)")
    p.add_argument("--rounds", type=int, default=2, help="times each configuration takes its turn")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--results-dir", default=str(RESULTS))
    args = p.parse_args(argv)

    from benchmarks.versions import tested_versions
    from engine import FastModel
    from engine.assets import smollm2_gguf_path
    from engine.runtime import flush_denormals
    from engine_kernels.cpu_fusion import ENV_VAR

    model, tokenizer = FastModel.from_pretrained(str(smollm2_gguf_path()), max_seq_length=2048, verbose=False)
    model = FastModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, use_gradient_checkpointing=False,
                                     random_state=0)
    data = batches(tokenizer, args.batch_size, args.steps)
    results = {"versions": tested_versions(), "batch_size": args.batch_size, "steps": args.steps,
               "rounds": args.rounds, "configs": {}}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    timed: dict[str, tuple[list[float], list[int]]] = {name: ([], []) for name, _, _ in CONFIGS}
    previous = os.environ.get(ENV_VAR)
    try:
        for r in range(args.rounds):
            for name, flush, compile_ops in CONFIGS:
                os.environ[ENV_VAR] = compile_ops
                with flush_denormals(enabled=flush):
                    seconds, tokens = time_training(model, opt, data, warmup=2)
                timed[name][0].extend(seconds)
                timed[name][1].extend(tokens)
                print(f"round {r + 1}, {name}: {sum(tokens) / sum(seconds):.0f} tokens/s", flush=True)
    finally:
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous
    for name, (seconds, tokens) in timed.items():
        results["configs"][name] = {"tokens_per_s": sum(tokens) / sum(seconds), "median_step_s": statistics.median(seconds),
                                    "timed_steps": len(seconds)}
    lengths = [int(n) for n in torch.diff(data[0]["cu_seq_lens"]).tolist()]
    results["attention_ms_per_layer"] = time_attention(lengths, model.args.num_heads, model.args.num_kv_heads,
                                                       model.args.head_dim)
    results["attention_documents"] = lengths

    base = results["configs"][CONFIGS[0][0]]["tokens_per_s"]
    lines = ["| configuration | trained tokens/s | median step (s) | vs default |", "|---|---:|---:|---:|"]
    for name, r in results["configs"].items():
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['median_step_s']:.2f} | {r['tokens_per_s'] / base:.2f}x |")
    lines += ["", f"Attention, one layer forward + backward, documents {lengths} (bf16):", "",
              "| implementation | ms |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["attention_ms_per_layer"].items()]
    md = "\n".join(lines)
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu-levers.json").write_text(json.dumps(results, indent=2))
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    (out / "cpu-levers.md").write_text(f"# CPU levers\n\nversions: {versions}\n\n{md}\n")
    print(f"\nversions: {versions}\n\n{md}")
    return results


if __name__ == "__main__":
    main()
