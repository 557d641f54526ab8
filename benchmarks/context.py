"""Longest trainable context per GPU size: the engine vs Hugging Face, beside Unsloth's published table.

Llama-3.1-8B, QLoRA (NF4) r=32 on all seven projections, batch 1: the conditions of Unsloth's
published table. For each GPU size the longest sequence whose training step fits is found by
:func:`engine.max_context` (binary/interpolation search over :func:`engine.estimate_memory`), for

* the engine: smart gradient checkpointing (layer inputs offloaded to host memory), tiled MLP
  (``tiled_mlp="auto"``), fused linear cross-entropy, flash attention;
* HF + PEFT as TRL trains it (transformers' gradient checkpointing, flash-attention 2, bitsandbytes
  4-bit, full logits), planned the same way (:mod:`engine.memory.hf_baseline`).

Both sides use the same optimizer (8-bit AdamW by default, as Unsloth's notebooks) and the same
allowance for what the plan does not contain: 600 MiB for the CUDA context and library workspaces
and 5% of the peak for allocator fragmentation. Without a GPU every number of ours is **planned by
simulation** (the real code run on fake tensors), and is labelled so. ``--measure`` (CUDA only)
trains for real at increasing lengths until out-of-memory and reports measured peaks beside the
planned ones.

``--model`` also takes the mixtures of experts ``mistralai/Mixtral-8x7B-v0.1`` and ``Qwen/Qwen3-30B-A3B`` (LoRA on
attention and every expert). Their HF + PEFT column is not planned, and the table says why (PEFT's expert LoRA
cannot run on the ``meta`` tensors that stand for the GPU; see :func:`engine.memory.hf_baseline.unplannable_reason`).
Unsloth's published columns are shown for Llama-3.1-8B only. The engine is planned through two shallow copies and
extrapolated in depth when its layers are all alike (the same plan; ``--exact`` plans every layer).

Run: ``python benchmarks/context.py`` (about 40 minutes on two CPU cores); writes
``benchmarks/results/context-<model>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from engine.memory import max_context, plan_session

SIZES_GB = (8, 12, 16, 24, 40, 48, 80)

#: Unsloth's published max context for Llama-3.1-8B QLoRA r=32, batch 1 (see ../shared/REFERENCES.md):
#: GPU GB -> (Unsloth, HF + FA2); None = out of memory.
PUBLISHED = {
    8: (2972, None),
    12: (21848, 932),
    16: (40724, 2551),
    24: (78475, 5789),
    40: (153977, 12264),
    48: (191728, 15502),
    80: (342733, 28454),
}
GOAL = 1.5  # ours / Unsloth's, at every size


def sides(args) -> dict[str, dict]:
    common = {"lora_r": args.lora_r, "optimizer": args.optimizer, "load_in_4bit": True, "device": "cuda"}
    return {
        # extrapolate: a model of identical layers is planned through two shallow copies (exact; see
        # engine.memory.planner.ExtrapolatedSession), what makes mixtures of experts plannable in minutes
        "engine": dict(common, gradient_checkpointing="smart", tiled_mlp="auto", extrapolate=not args.exact),
        "hf": dict(common, gradient_checkpointing=True, baseline="hf"),
    }


def skip_reason(args, side: str, kwargs: dict) -> str | None:
    """Why ``side`` cannot be planned for ``args.model`` (the HF baseline of a mixture of experts on a GPU)."""
    if side != "hf":
        return None
    from engine.memory.configs import resolve_config
    from engine.memory.hf_baseline import unplannable_reason

    return unplannable_reason(resolve_config(args.model), {"device": kwargs["device"], "target_modules": "all-linear"})


def plan_table(args) -> dict:
    """Max context per size for both sides, with the plan's breakdown at that length."""
    from tqdm.auto import tqdm

    results = {}
    for side, kwargs in sides(args).items():
        reason = skip_reason(args, side, kwargs)
        if reason is not None:
            results[side] = {"skipped": reason, "sizes": [{"vram_gb": gb, "max_tokens": None, "plan": None}
                                                          for gb in args.sizes]}
            continue
        session = plan_session(args.model, **kwargs)
        rows = []
        for gb in tqdm(args.sizes, desc=f"{side}: GPU sizes"):
            start = time.perf_counter()
            tokens = max_context(args.model, gb, session=session, granularity=args.granularity, high=args.high)
            plan = session.plan(tokens).as_dict() if tokens else None
            rows.append({"vram_gb": gb, "max_tokens": tokens, "plan": plan,
                         "search_seconds": round(time.perf_counter() - start, 1)})
        results[side] = {"settings": session.settings, "sizes": rows}
    return results


def measure(args) -> list[dict]:
    """On a CUDA GPU: train one step at doubling lengths until out-of-memory; measured vs planned peaks."""
    if not torch.cuda.is_available():
        raise SystemExit("--measure trains on a CUDA GPU and there is none here; the table is planned by simulation.")
    from engine import FastModel
    from engine.memory import estimate_memory

    if not Path(args.model).exists():
        raise SystemExit("--measure needs the model's weights: pass --model as a local folder or .gguf file.")
    model, _ = FastModel.from_pretrained(args.model, max_seq_length=1 << 21, load_in_4bit=True)
    model = FastModel.get_peft_model(model, r=args.lora_r, lora_alpha=args.lora_r, use_gradient_checkpointing="smart",
                                     tiled_mlp="auto")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    rows, tokens = [], 1024
    while True:
        ids = torch.randint(0, model.args.vocab_size, (1, tokens), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        try:
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            rows.append({"tokens": tokens, "measured_peak": None})
            break
        planned = estimate_memory(args.model, tokens, lora_r=args.lora_r, optimizer="adamw",
                                  gradient_checkpointing="smart", tiled_mlp="auto")
        rows.append({"tokens": tokens, "measured_peak": torch.cuda.max_memory_allocated(), "planned_peak": planned.total})
        print(rows[-1], flush=True)
        tokens *= 2
    return rows


def fmt(n) -> str:
    return "OOM" if not n else f"{n:,}"


def markdown(results: dict, args) -> str:
    engine, hf = results["engine"]["sizes"], results["hf"]["sizes"]
    lines = [
        (f"Max trainable context (tokens), {args.model}, QLoRA r={args.lora_r} on all linear layers, batch 1, "
        f"{args.optimizer}. Ours: **planned by simulation** (`python benchmarks/context.py`), not measured on a GPU."),
        "",
        ("| GPU | engine (planned) | HF + PEFT + FA2 (planned) | Unsloth (published) | HF + FA2 (published) "
        "| engine / Unsloth | host RAM for offload (GiB) |"),
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    published = published_applies(args.model)
    skipped = results["hf"].get("skipped")
    for e, h in zip(engine, hf):
        gb = e["vram_gb"]
        unsloth, hf_pub = PUBLISHED.get(gb, (None, None)) if published else (None, None)
        ratio = f"{e['max_tokens'] / unsloth:.2f}x" if unsloth and e["max_tokens"] else "-"
        host = e["plan"]["host_offload"] / 2**30 if e["plan"] else 0
        hf_cell = "not planned" if skipped else fmt(h["max_tokens"])
        pub = (fmt(unsloth), fmt(hf_pub)) if published else ("-", "-")
        lines.append(f"| {gb} GB | {fmt(e['max_tokens'])} | {hf_cell} | {pub[0]} | {pub[1]} | {ratio} | {host:.0f} |")
    if not published:
        lines += ["", "Published columns: Unsloth's table is for Llama-3.1-8B only."]
    if skipped:
        lines += ["", f"HF + PEFT not planned: {skipped}."]
    return "\n".join(lines) + "\n"


def published_applies(model) -> bool:
    """Whether Unsloth's published table (Llama-3.1-8B) is about ``model`` (a name, or a folder of that name)."""
    return Path(str(model).rstrip("/")).name.lower() in ("llama-3.1-8b", "llama-3.1-8b-instruct")


def plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["vram_gb"] for r in results["engine"]["sizes"]]
    fig, ax = plt.subplots(figsize=(8, 5))
    series = [
        ("engine (planned)", [r["max_tokens"] for r in results["engine"]["sizes"]], "o-"),
        ("HF + PEFT + FA2 (planned)", [r["max_tokens"] for r in results["hf"]["sizes"]], "s-"),
    ]
    if published_applies(args.model):
        series += [
            ("Unsloth (published)", [PUBLISHED.get(g, (None, None))[0] for g in sizes], "^--"),
            ("HF + FA2 (published)", [PUBLISHED.get(g, (None, None))[1] for g in sizes], "v--"),
        ]
    for label, values, style in series:
        points = [(g, v) for g, v in zip(sizes, values) if v]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("GPU memory (GB)")
    ax.set_ylabel("max trainable context (tokens)")
    ax.set_yscale("log")
    ax.set_title(f"{args.model.rpartition('/')[2]} QLoRA r={args.lora_r}, batch 1 (ours planned by simulation)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def output_paths(args) -> dict[str, Path]:
    """``{"json" | "md" | "png": path}``: ``context-<model name>.<ext>`` in ``--out`` (names may contain dots)."""
    name = Path(str(args.model).rstrip("/")).name
    return {ext: args.out / f"context-{name}.{ext}" for ext in ("json", "md", "png")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="meta-llama/Llama-3.1-8B", help="name known offline, folder or .gguf")
    parser.add_argument("--lora-r", type=int, default=32)
    parser.add_argument("--optimizer", default="adamw_8bit", choices=("adamw", "adamw_8bit", "sgd"))
    parser.add_argument("--sizes", type=float, nargs="+", default=list(SIZES_GB), help="GPU sizes in GB (GiB)")
    parser.add_argument("--granularity", type=int, default=256, help="answers are multiples of this many tokens")
    parser.add_argument("--high", type=int, default=1 << 21, help="longest length considered")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--measure", action="store_true", help="CUDA only: also train at doubling lengths until OOM")
    parser.add_argument("--exact", action="store_true",
                        help="plan the engine at full depth (default: a model of identical layers is planned through "
                             "two shallow copies and extrapolated, which gives the same plan much faster)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.sizes = [int(s) if float(s).is_integer() else s for s in args.sizes]
    results = {
        "model": args.model,
        "lora_r": args.lora_r,
        "optimizer": args.optimizer,
        "batch_size": 1,
        "method": "planned by simulation: engine.max_context over engine.estimate_memory (fake tensors)",
        "published_source": "Unsloth's long-context table for Llama-3.1-8B QLoRA r=32, batch 1 (see docs/memory.md)",
        "published": {str(k): {"unsloth": v[0], "hf_fa2": v[1]} for k, v in PUBLISHED.items()},
        "goal_vs_unsloth": GOAL,
    }
    results.update(plan_table(args))
    if args.measure:
        results["measured"] = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = output_paths(args)
    table = markdown(results, args)
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    paths["md"].write_text(table)
    plot(results, args, paths["png"])
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return results


if __name__ == "__main__":
    main()
