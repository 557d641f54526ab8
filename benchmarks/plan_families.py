"""Planned training memory of the published models of the families added after Llama (Gemma 2/3, Phi-3.5/4-mini).

For each model the planner (:func:`engine.estimate_memory`, the engine's real training step run on fake tensors
standing for an sm_90 GPU) gives the peak of one QLoRA step (NF4 base, LoRA r=16 on every projection, batch 1,
smart checkpointing, AdamW) at ``--seq-len`` tokens, and :func:`engine.max_context` the longest trainable context
on a 24 GB GPU. Without a GPU these are **planned by simulation**, not measured.

Run: ``python benchmarks/plan_families.py`` (about 30 minutes on two CPU cores); writes
``benchmarks/results/plan-families.json`` and ``.md``. A model whose decoder layers are all alike is planned
through two shallow copies and extrapolated (``extrapolate=True``: the same plan, much faster; ``--exact`` plans
every layer). The mixtures of experts: ``--models mistralai/Mixtral-8x7B-v0.1 Qwen/Qwen3-30B-A3B --out
benchmarks/results/plan-families-moe.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from engine.memory import estimate_memory, max_context, plan_session

MODELS = ("google/gemma-2-2b", "google/gemma-2-9b", "google/gemma-3-1b-pt", "google/gemma-3-4b-pt",
          "google/gemma-3-12b-pt", "microsoft/Phi-3.5-mini-instruct", "microsoft/Phi-4-mini-instruct")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--vram-gb", type=float, default=24.0, help="GPU size for max_context (0: skip)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "plan-families.json")
    parser.add_argument("--exact", action="store_true", help="plan every layer (no depth extrapolation)")
    args = parser.parse_args(argv)
    rows = []
    for model in args.models:
        start = time.time()
        plan = estimate_memory(model, args.seq_len, lora_r=16, extrapolate=not args.exact)
        row = {"model": model, "seq_len": args.seq_len, "depth": plan.settings["depth"],
               "total_gib": plan.total / 2**30,
               **{c + "_gib": getattr(plan, c) / 2**30 for c in plan.COMPONENTS}}
        if args.vram_gb:
            session = plan_session(model, lora_r=16, extrapolate=not args.exact)
            row["max_context"] = max_context(model, args.vram_gb, session=session)
        row["seconds"] = time.time() - start
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python benchmarks/plan_families.py " + " ".join(argv or []),
                                    "planned_by_simulation": True, "rows": rows}, indent=2))
    lines = [f"| model | planned peak at {args.seq_len:,} tokens (GiB) | weights | LoRA + grads + optimizer | "
             "activations | transient |" + (f" max context on {args.vram_gb:g} GB |" if args.vram_gb else ""),
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if args.vram_gb else "")]
    for r in rows:
        trained = r["lora_parameters_gib"] + r["gradients_gib"] + r["optimizer_states_gib"]
        lines.append(f"| {r['model']} | {r['total_gib']:.2f} | {r['weights_gib']:.2f} | {trained:.2f} | "
                     f"{r['activations_gib']:.2f} | {r['transient_gib']:.2f} |"
                     + (f" {r['max_context']:,} |" if args.vram_gb else ""))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
