"""The memory planner against measured CPU peaks: the numbers behind docs/memory.md's calibration table.

For a small Llama (hidden 256, 2 layers, vocabulary 1,000; the config of ``tests/test_memory_planner.py``), LoRA
r=8 on every projection, bf16, batch 1, AdamW: the peak that the CPU allocator reports to PyTorch's profiler during
the engine's second real training step (:func:`engine.memory.calibration.measure_cpu_peak`) beside the plan of
:func:`engine.estimate_memory` for the same step, for 16-bit and NF4 weights, with and without checkpointing, with
the CPU elementwise ops eager (``ENGINE_CPU_COMPILE=0``, as the tests run) and compiled (the default). The planner
plans the eager ops (it runs on fake tensors, which the compiled path never takes). ``tests/test_memory_planner.py``
asserts the eager comparison within 10%; this prints how close each is.

Run: ``python benchmarks/planner_calibration.py`` (about two minutes on two CPU cores); writes
``benchmarks/results/planner-calibration.json`` and ``.md``.

``--moe``: the same comparison for two small mixtures of experts instead (the configs of ``tests/test_moe_memory.py``:
Mixtral-like with 4 experts, top-2; Qwen3-MoE-like with 8 experts, top-4 and one dense layer), random weights and
random token ids (so the routing spreads tokens unevenly over the experts, as in training), eager ops; writes
``planner-calibration-moe.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

#: The small config of tests/test_memory_planner.py.
SMALL = {
    "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 8192,
}
#: The small mixtures of experts of tests/test_moe_memory.py (transformers config class, fields).
MOE = {
    "mixtral": ("MixtralConfig", {
        "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 344, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 8192, "sliding_window": None, "tie_word_embeddings": False}),
    "qwen3_moe": ("Qwen3MoeConfig", {
        "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 192,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_experts": 8,
        "num_experts_per_tok": 4, "norm_topk_prob": True, "mlp_only_layers": [1], "max_position_embeddings": 8192,
        "tie_word_embeddings": False}),
}
CPU_COMPILE = "ENGINE_CPU_COMPILE"
#: (weights, gradient checkpointing)
SETTINGS = ((False, False), (False, True), (True, False), (True, True))


def measured_peak(config, seq_len: int, lora_r: int, load_in_4bit: bool, checkpointing: bool,
                  random_weights: bool = False) -> int:
    """Bytes: the CPU peak of the engine's second training step (the first creates the optimizer states).
    ``random_weights``: normal(0, 0.05) weights and random token ids (routers spread tokens over the experts)."""
    import torch

    from engine import FastModel
    from engine.loading.weights import quantize_nf4_
    from engine.memory.calibration import measure_cpu_peak, persistent_tensors, storage_bytes
    from engine.models.config import model_args_from_hf_config
    from engine.models.transformer import CausalLM

    torch.manual_seed(0)
    model = CausalLM(model_args_from_hf_config(config), max_seq_length=seq_len, dtype=torch.bfloat16)
    if random_weights:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.05)
    if load_in_4bit:  # as the loader stores them: decoder projections and experts NF4, routers dense
        quantize_nf4_(model, double_quant=True)
    FastModel.get_peft_model(model, r=lora_r, lora_alpha=lora_r, use_gradient_checkpointing=checkpointing)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False,
                                  fused=False)

    def step() -> None:
        ids = (torch.randint(0, config.vocab_size, (1, seq_len)) if random_weights
               else torch.zeros(1, seq_len, dtype=torch.long))
        model(input_ids=ids, labels=ids.clone()).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    return measure_cpu_peak(step, storage_bytes(persistent_tensors(model, optimizer)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "planner-calibration.json")
    parser.add_argument("--moe", action="store_true", help="the two small mixtures of experts (eager ops only)")
    args = parser.parse_args(argv)
    if args.moe:
        return main_moe(args, argv)

    import transformers

    from engine.memory import estimate_memory

    config = transformers.LlamaConfig(**SMALL)
    rows = []
    for compiled in ("0", "1"):
        os.environ[CPU_COMPILE] = compiled  # read by engine_kernels.cpu_fusion at every call
        for load_in_4bit, checkpointing in SETTINGS:
            measured = measured_peak(config, args.seq_len, args.lora_r, load_in_4bit, checkpointing)
            plan = estimate_memory(config, args.seq_len, lora_r=args.lora_r, load_in_4bit=load_in_4bit,
                                   gradient_checkpointing=checkpointing, device="cpu")
            rows.append({"cpu_compile": compiled == "1", "load_in_4bit": load_in_4bit, "checkpointing": checkpointing,
                         "measured_bytes": measured, "planned_bytes": plan.total,
                         "relative_difference": (plan.total - measured) / measured})
    command = "python benchmarks/planner_calibration.py" + (" " + " ".join(argv) if argv else "")
    lines = [f"Command: `{command}`. Small Llama (hidden 256, 2 layers), LoRA r={args.lora_r}, bf16, "
             f"batch 1 x {args.seq_len} tokens, CPU.", "",
             "| CPU elementwise ops | setting | measured peak (B) | planned peak (B) | planned / measured - 1 |",
             "|---|---|---:|---:|---:|"]
    for row in rows:
        setting = ("NF4" if row["load_in_4bit"] else "16-bit") + (", checkpointing" if row["checkpointing"]
                                                                   else ", no checkpointing")
        ops = "compiled (default)" if row["cpu_compile"] else "eager (`ENGINE_CPU_COMPILE=0`)"
        lines.append(f"| {ops} | {setting} | {row['measured_bytes']:,} | {row['planned_bytes']:,} | "
                     f"{row['relative_difference']:+.4%} |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "seq_len": args.seq_len, "lora_r": args.lora_r,
                                    "rows": rows}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table + "\n")


def main_moe(args, argv) -> None:
    """``--moe``: measured vs planned peaks of the small mixtures of experts, eager CPU ops."""
    import time

    import transformers

    from engine.memory import estimate_memory

    os.environ[CPU_COMPILE] = "0"
    rows = []
    for family, (config_class, fields) in MOE.items():
        config = getattr(transformers, config_class)(**fields)
        for load_in_4bit, checkpointing in SETTINGS:
            start = time.perf_counter()
            measured = measured_peak(config, args.seq_len, args.lora_r, load_in_4bit, checkpointing,
                                     random_weights=True)
            plan = estimate_memory(config, args.seq_len, lora_r=args.lora_r, load_in_4bit=load_in_4bit,
                                   gradient_checkpointing=checkpointing, device="cpu")
            rows.append({"family": family, "load_in_4bit": load_in_4bit, "checkpointing": checkpointing,
                         "measured_bytes": measured, "planned_bytes": plan.total,
                         "relative_difference": (plan.total - measured) / measured,
                         "seconds": round(time.perf_counter() - start, 1)})
    command = "python benchmarks/planner_calibration.py " + " ".join(argv or ["--moe"])
    lines = [f"Command: `{command}`. Small mixtures of experts (hidden 256, 2 layers; Mixtral-like 4 experts top-2, "
             f"Qwen3-MoE-like 8 experts top-4 with one dense layer), LoRA r={args.lora_r} on attention and experts, "
             f"bf16, batch 1 x {args.seq_len} random tokens, eager CPU ops.", "",
             "| model | setting | measured peak (B) | planned peak (B) | planned / measured - 1 |",
             "|---|---|---:|---:|---:|"]
    for row in rows:
        setting = ("NF4" if row["load_in_4bit"] else "16-bit") + (", checkpointing" if row["checkpointing"]
                                                                   else ", no checkpointing")
        lines.append(f"| {row['family']} | {setting} | {row['measured_bytes']:,} | {row['planned_bytes']:,} | "
                     f"{row['relative_difference']:+.4%} |")
    table = "\n".join(lines)
    print(table)
    out = args.out.with_name("planner-calibration-moe.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "seq_len": args.seq_len, "lora_r": args.lora_r, "rows": rows},
                              indent=1) + "\n")
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
