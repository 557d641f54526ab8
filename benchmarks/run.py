"""Benchmark: the engine vs plain Hugging Face (transformers + PEFT + TRL) on the same job.

Run from the repository root::

    python benchmarks/run.py                      # SmolLM2-135M-Instruct, CPU or CUDA, ~10 min on 2 CPU cores
    python benchmarks/run.py --load-in-4bit       # QLoRA on both sides
    python benchmarks/run.py --max-steps 10 --sides engine

Each side trains in its own process (so peak memory is its own) with the same model, data,
LoRA settings, seed and number of optimizer steps; see ``benchmarks/sides.py``. Results go to
``benchmarks/results/<name>.json``, ``<name>.md`` (the table) and ``<name>.png`` (loss curves
and throughput); the table is also printed. Step times skip ``--warmup-steps`` first steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the repository's packages (engine, data) importable
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
MIB = 1024 * 1024
SIDE_NAMES = {"engine": "engine", "hf": "HF (transformers + PEFT + TRL)"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder, .gguf file or hub id (default: the shipped SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=1024, help="max_length of both trainers")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA (NF4 base weights) on both sides")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--packing", action="store_true", help="engine packs examples (BFD) instead of same batches as HF")
    p.add_argument("--gradient-checkpointing", default="true", choices=["true", "smart"], help="engine side")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the timings")
    p.add_argument("--sides", default="engine,hf", help="comma-separated: engine, hf")
    p.add_argument("--name", default=None, help="results file stem (default: derived from the settings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", default=str(RESULTS), help="where the JSON, markdown and PNG go")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)  # internal: run one side in this process
    p.add_argument("--side-output", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def hf_folder_for(model: str) -> str:
    """A ``.gguf`` model is converted once to a Hugging Face folder (fp32 safetensors + tokenizer) both sides load.

    transformers refuses to train a model it loaded from GGUF (it counts as quantized), so the
    baseline could not train on the file directly; converting first keeps both sides equal.
    """
    path = Path(model)
    if path.suffix != ".gguf":
        return model
    folder = ROOT / "benchmarks" / ".cache" / path.stem
    if not (folder / "config.json").is_file():
        from engine import FastModel

        print(f"converting {path.name} to a Hugging Face folder in {folder} (once)")
        base, tokenizer = FastModel.from_pretrained(str(path), dtype="float32", verbose=False)
        base.save_pretrained_merged(folder, tokenizer, save_method="merged_32bit")
    return str(folder)


def bench_config(args):
    import torch

    from benchmarks.sides import BenchConfig
    from engine.assets import smollm2_gguf_path

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return BenchConfig(
        model=hf_folder_for(str(args.model or smollm2_gguf_path())),
        max_steps=args.max_steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        load_in_4bit=args.load_in_4bit,
        device=device,
        seed=args.seed,
        packing=args.packing,
        gradient_checkpointing=args.gradient_checkpointing,
    )


def run_side_here(args) -> None:
    """Child process: train one side and write its report as JSON."""
    import tempfile

    from benchmarks.sides import SIDES

    cfg = bench_config(args)
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.side}-") as tmp:
        result = SIDES[args.side](cfg, Path(tmp))
    Path(args.side_output).write_text(json.dumps(result))


def run_side_subprocess(side: str, argv: list[str], out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--side", side, "--side-output", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print(f"\n=== {SIDE_NAMES[side]} ===", flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return json.loads(out.read_text())


def side_metrics(report: dict, warmup: int) -> dict:
    """Headline numbers of one side, timings without the first ``warmup`` steps."""
    records = report["step_records"]
    timed = records[warmup:] if len(records) > warmup else records
    seconds = sum(r["seconds"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    mem = report["memory"]
    losses = [r["loss"] for r in records if r["loss"] is not None]
    return {
        "median_step_s": statistics.median(r["seconds"] for r in timed),
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "trained_tokens": sum(r["tokens"] for r in records),
        "peak_memory_mib": mem["peak_memory_bytes"] / MIB,
        "peak_added_mib": mem.get("peak_rss_delta_bytes", mem["peak_memory_bytes"]) / MIB,
        "final_loss": losses[-1] if losses else None,
        "mean_loss_last5": statistics.mean(losses[-5:]) if losses else None,
        "total_s": report["total_seconds"],
    }


ROWS = [
    ("median time per step (s)", "median_step_s", "{:.2f}"),
    ("trained tokens/s", "tokens_per_s", "{:,.0f}"),
    ("trained tokens (all steps)", "trained_tokens", "{:,}"),
    ("peak memory (MiB)", "peak_memory_mib", "{:,.0f}"),
    ("memory added by training (MiB)", "peak_added_mib", "{:,.0f}"),
    ("final loss", "final_loss", "{:.4f}"),
    ("mean loss, last 5 steps", "mean_loss_last5", "{:.4f}"),
    ("train time (s)", "total_s", "{:.1f}"),
]


def markdown_table(metrics: dict[str, dict]) -> str:
    sides = list(metrics)
    header = "| metric | " + " | ".join(SIDE_NAMES[s] for s in sides)
    ratio = "engine" in metrics and "hf" in metrics
    header += " | engine / HF |" if ratio else " |"
    lines = [header, "|" + "---|" * (len(sides) + 1 + int(ratio))]
    for label, key, fmt in ROWS:
        cells = [fmt.format(metrics[s][key]) if metrics[s][key] is not None else "n/a" for s in sides]
        line = f"| {label} | " + " | ".join(cells)
        if ratio:
            a, b = metrics["engine"][key], metrics["hf"][key]
            line += f" | {a / b:.2f}x |" if a is not None and b else " | |"
        else:
            line += " |"
        lines.append(line)
    return "\n".join(lines)


def plot(reports: dict[str, dict], metrics: dict[str, dict], path: Path, warmup: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_tok) = plt.subplots(1, 2, figsize=(11, 4))
    for side, report in reports.items():
        steps = [r["step"] for r in report["step_records"] if r["loss"] is not None]
        losses = [r["loss"] for r in report["step_records"] if r["loss"] is not None]
        ax_loss.plot(steps, losses, label=SIDE_NAMES[side], marker=".")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("Loss")
    ax_loss.legend()
    names = [SIDE_NAMES[s].split(" (")[0] for s in metrics]
    values = [metrics[s]["tokens_per_s"] for s in metrics]
    bars = ax_tok.bar(names, values, color=["tab:blue", "tab:orange"][: len(values)])
    ax_tok.bar_label(bars, fmt="%.0f")
    ax_tok.set_ylabel(f"trained tokens/s (steps > {warmup})")
    ax_tok.set_title("Throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.side:
        run_side_here(args)
        return {}
    cfg = bench_config(args)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDE_NAMES]
    if unknown:
        raise SystemExit(f"unknown side(s) {unknown}; choose from {list(SIDE_NAMES)}")
    name = args.name or (
        f"{Path(cfg.model).stem}-{cfg.device}-{'qlora' if cfg.load_in_4bit else 'lora'}-"
        f"b{cfg.batch_size}-s{cfg.max_steps}{'-packing' if cfg.packing else ''}"
    )
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    reports = {}
    start = time.time()
    for side in sides:
        side_file = results / f".{name}.{side}.json"
        reports[side] = run_side_subprocess(side, argv, side_file)
        side_file.unlink()
    metrics = {side: side_metrics(r, args.warmup_steps) for side, r in reports.items()}
    table = markdown_table(metrics)
    result = {
        "config": cfg.as_dict(),
        "warmup_steps": args.warmup_steps,
        "metrics": metrics,
        "reports": reports,
        "wall_seconds": time.time() - start,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (results / f"{name}.json").write_text(json.dumps(result, indent=2))
    settings = ", ".join(f"{k}={v}" for k, v in cfg.as_dict().items() if k != "model")
    (results / f"{name}.md").write_text(f"# {name}\n\nmodel: `{Path(cfg.model).name}`; {settings}\n\n{table}\n")
    plot(reports, metrics, results / f"{name}.png", args.warmup_steps)
    print(f"\n{table}\n\nwritten: {results / name}.json, .md, .png ({time.time() - start:.0f} s in all)")
    return result


if __name__ == "__main__":
    main()
