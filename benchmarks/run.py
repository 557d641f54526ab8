"""Benchmark: the engine vs Hugging Face (transformers + PEFT + TRL) on the same job, set up several ways.

Run from the repository root::

    python benchmarks/run.py                          # SmolLM2-135M-Instruct, every side, ~15 min on 2 CPU cores
    python benchmarks/run.py --packing --batch-size 2 # long rows: both sides pack to --seq-len (BFD)
    python benchmarks/run.py --load-in-4bit           # QLoRA on every side
    python benchmarks/run.py --max-steps 10 --sides engine,hf-padding-free

The sides are described in ``benchmarks/sides.py``; each trains in its own process (so peak memory is its
own) with the same model, data, LoRA settings, seed, number of optimizer steps and examples per step. A side
that fails to install or crashes is reported as failed, with its error, and the others still run.

The headline compares like with like: ``engine-lean`` (checkpointing on) against the fastest HF side with
checkpointing, and ``engine`` (its defaults) against the fastest HF side without. Hardware efficiency: MFU =
model FLOPs of the real tokens (``benchmarks/flops.py``; recomputation not counted) per second divided by the
*model-shape ceiling*, this run's own matmul shapes replayed back to back in the same dtype, measured in the same
run; HFU counts recomputed layers too.

Results go to ``benchmarks/results/<name>.json``, ``<name>.md`` (the tables) and ``<name>.png`` (loss curves and
throughput); the tables are also printed. Step times skip the first ``--warmup-steps`` steps.
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

from benchmarks.sides import SIDES  # noqa: E402  (after the path set-up above)

RESULTS = ROOT / "benchmarks" / "results"
MIB = 1024 * 1024


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder, .gguf file or hub id (default: the shipped SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=1024, help="longest example (and packed row length with --packing)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (packed rows per step with --packing)")
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA (NF4 base weights) on every side")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--packing", action="store_true", help="every side packs examples into --seq-len rows (BFD)")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the timings")
    p.add_argument("--sides", default=None, help=f"comma-separated, from: {', '.join(SIDES)} (default: all for the device)")
    p.add_argument("--name", default=None, help="results file stem (default: derived from the settings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-profile", action="store_true", help="skip the one-step profile of each side")
    p.add_argument("--results-dir", default=str(RESULTS), help="where the JSON, markdown and PNG go")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)  # internal: run one side in this process
    p.add_argument("--side-output", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def select_sides(spec: str | None, device: str) -> list[str]:
    """The sides to run, validated (an unknown name stops the run before anything trains)."""
    if spec is None:
        return [n for n, s in SIDES.items() if not s.cuda_only or device == "cuda"]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in names if s not in SIDES]
    if unknown or not names:
        raise SystemExit(f"unknown side(s) {unknown or spec!r} in --sides; choose from: {', '.join(SIDES)}")
    return list(dict.fromkeys(names))


def hf_folder_for(model: str) -> str:
    """A ``.gguf`` model is converted once to a Hugging Face folder (fp32 safetensors + tokenizer) all sides load.

    transformers refuses to train a model it loaded from GGUF (it counts as quantized), so the
    baseline could not train on the file directly; converting first keeps the sides equal.
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
        profile_step=None if args.no_profile else min(1, args.max_steps - 1),
    )


def run_side_here(args) -> None:
    """Child process: train one side and write its report as JSON."""
    import tempfile

    cfg = bench_config(args)
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.side}-") as tmp:
        result = SIDES[args.side].run(cfg, Path(tmp))
    Path(args.side_output).write_text(json.dumps(result))


def run_side_subprocess(side: str, argv: list[str], out: Path) -> dict:
    """Run one side in a child process; a failure comes back as ``{"failed": <error>}``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--side", side, "--side-output", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print(f"\n=== {side}: {SIDES[side].label} ===", flush=True)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True, check=False)
    sys.stderr.write(proc.stderr[-20000:])
    if proc.returncode != 0 or not out.is_file():
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        error = lines[-1] if lines else f"exit code {proc.returncode}"
        print(f"side {side} FAILED: {error}", flush=True)
        return {"failed": error, "returncode": proc.returncode, "stderr_tail": proc.stderr[-4000:]}
    result = json.loads(out.read_text())
    out.unlink()
    return result


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


def efficiency(report: dict, warmup: int, model_args, ceiling_flops_per_s: float, lora_r: int) -> dict:
    """Model and hardware FLOP/s of the timed steps, and MFU/HFU against the measured ceiling."""
    from benchmarks.flops import step_flops
    from benchmarks.sides import LORA_TARGETS

    records, docs = report["step_records"], report.get("step_documents") or []
    if len(docs) != len(records):
        return {}
    pairs = list(zip(records, docs))[warmup:] if len(records) > warmup else list(zip(records, docs))
    seconds = sum(r["seconds"] for r, _ in pairs)
    model = hardware = 0.0
    for _, lengths in pairs:
        f = step_flops(model_args, lengths, lora_r=lora_r, lora_targets=LORA_TARGETS,
                       checkpointed_layers=report.get("checkpointed_layers", 0))
        model, hardware = model + f.model, hardware + f.hardware
    tokens = sum(sum(lengths) for _, lengths in pairs)
    achieved = model / seconds if seconds else 0.0
    return {
        "model_flops_per_token": model / tokens if tokens else 0.0,
        "model_gflops_per_s": achieved / 1e9,
        "hardware_gflops_per_s": (hardware / seconds if seconds else 0.0) / 1e9,
        "mfu": achieved / ceiling_flops_per_s if ceiling_flops_per_s else 0.0,
        "hfu": (hardware / seconds if seconds else 0.0) / ceiling_flops_per_s if ceiling_flops_per_s else 0.0,
    }


ROWS = [
    ("median time per step (s)", "median_step_s", "{:.2f}"),
    ("trained tokens/s", "tokens_per_s", "{:,.0f}"),
    ("trained tokens (all steps)", "trained_tokens", "{:,}"),
    ("peak memory, RSS (MiB)", "peak_memory_mib", "{:,.0f}"),
    ("memory added by training (MiB)", "peak_added_mib", "{:,.0f}"),
    ("final loss", "final_loss", "{:.4f}"),
    ("mean loss, last 5 steps", "mean_loss_last5", "{:.4f}"),
    ("model GFLOP/s", "model_gflops_per_s", "{:.0f}"),
    ("MFU (of the model-shape ceiling)", "mfu", "{:.0%}"),
    ("HFU (recomputation counted)", "hfu", "{:.0%}"),
    ("train time (s)", "total_s", "{:.1f}"),
]


def markdown_table(metrics: dict[str, dict]) -> str:
    """One column per side (failed sides say so), one row per metric."""
    sides = list(metrics)
    lines = ["| metric | " + " | ".join(f"`{s}`" for s in sides) + " |", "|" + "---|" * (len(sides) + 1)]
    for label, key, fmt in ROWS:
        cells = []
        for s in sides:
            m = metrics[s]
            if "failed" in m:
                cells.append("failed")
            else:
                cells.append(fmt.format(m[key]) if m.get(key) is not None else "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(metrics: dict[str, dict]) -> list[dict]:
    """Like with like: engine-lean vs the fastest HF side with checkpointing, engine vs the fastest without."""
    out = []
    ok = {s: m for s, m in metrics.items() if "failed" not in m}
    for ours, ckpt in (("engine-lean", True), ("engine", False)):
        peers = [s for s in ok if SIDES[s].hf and SIDES[s].checkpointing is ckpt]
        if ours not in ok or not peers:
            continue
        best = max(peers, key=lambda s: ok[s]["tokens_per_s"])
        a, b = ok[ours], ok[best]
        out.append({
            "engine_side": ours,
            "hf_side": best,
            "checkpointing": "on" if ckpt else "off (HF side)",
            "tokens_per_s_ratio": a["tokens_per_s"] / b["tokens_per_s"] if b["tokens_per_s"] else None,
            "added_memory_ratio": a["peak_added_mib"] / b["peak_added_mib"] if b["peak_added_mib"] else None,
            "peak_memory_ratio": a["peak_memory_mib"] / b["peak_memory_mib"] if b["peak_memory_mib"] else None,
            "loss_last5_diff": (a["mean_loss_last5"] - b["mean_loss_last5"])
            if a["mean_loss_last5"] is not None and b["mean_loss_last5"] is not None else None,
        })
    return out


def headline_table(rows: list[dict]) -> str:
    lines = [
        "| comparison | tokens/s | memory added by training | peak RSS | loss diff (last 5) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        def f(x, fmt):
            return fmt.format(x) if x is not None else "n/a"

        lines.append(
            f"| `{r['engine_side']}` / `{r['hf_side']}` | {f(r['tokens_per_s_ratio'], '{:.2f}x')} | "
            f"{f(r['added_memory_ratio'], '{:.2f}x')} | {f(r['peak_memory_ratio'], '{:.2f}x')} | "
            f"{f(r['loss_last5_diff'], '{:+.4f}')} |"
        )
    return "\n".join(lines)


def profile_table(reports: dict[str, dict]) -> str:
    rows = ["| side | step (ms) | matmul | attention | elementwise | Python/framework |", "|---|---:|---:|---:|---:|---:|"]
    for side, r in reports.items():
        p = r.get("profile")
        if not p:
            continue
        rows.append(
            f"| `{side}` | {p['step']:,.0f} | {p['matmul']:,.0f} | {p['attention']:,.0f} | {p['elementwise']:,.0f} | "
            f"{p['python_overhead']:,.0f} |"
        )
    return "\n".join(rows)


def plot(reports: dict[str, dict], metrics: dict[str, dict], path: Path, warmup: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_tok) = plt.subplots(1, 2, figsize=(13, 4.5))
    for side, report in reports.items():
        if "failed" in report:
            continue
        steps = [r["step"] for r in report["step_records"] if r["loss"] is not None]
        losses = [r["loss"] for r in report["step_records"] if r["loss"] is not None]
        ax_loss.plot(steps, losses, label=side, marker=".")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("Loss")
    ax_loss.legend(fontsize=8)
    names = [s for s in metrics if "failed" not in metrics[s]]
    values = [metrics[s]["tokens_per_s"] for s in names]
    colors = ["tab:blue" if not SIDES[s].hf else "tab:orange" for s in names]
    bars = ax_tok.bar(range(len(names)), values, color=colors)
    ax_tok.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax_tok.bar_label(bars, fmt="%.0f")
    ax_tok.set_ylabel(f"trained tokens/s (steps > {warmup})")
    ax_tok.set_title("Throughput (blue: engine, orange: HF)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure_ceiling(cfg, reports: dict[str, dict], warmup: int) -> tuple[object, dict]:
    """The model's ModelArgs and the model-shape ceiling at the median real tokens per timed step."""
    import torch
    from transformers import AutoConfig

    from benchmarks.flops import matmul_ceiling
    from benchmarks.sides import bf16_supported
    from engine.models.config import model_args_from_hf_config

    args = model_args_from_hf_config(AutoConfig.from_pretrained(cfg.model))
    tokens = [r["tokens"] for rep in reports.values() if "failed" not in rep for r in rep["step_records"][warmup:]]
    median_tokens = int(statistics.median(tokens)) if tokens else cfg.batch_size * 128
    dtype = torch.bfloat16 if bf16_supported(cfg.device) else torch.float32
    ceiling = matmul_ceiling(args, median_tokens, dtype=dtype, device=cfg.device, repeats=5)
    return args, ceiling


def versions_block() -> dict:
    from benchmarks.versions import tested_versions

    return tested_versions()


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.side:
        run_side_here(args)
        return {}
    cfg = bench_config(args)
    sides = select_sides(args.sides, cfg.device)
    versions = versions_block()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    name = args.name or (
        f"{Path(cfg.model).stem}-{cfg.device}-{'qlora' if cfg.load_in_4bit else 'lora'}-"
        f"b{cfg.batch_size}-s{cfg.max_steps}{'-packing' if cfg.packing else ''}"
    )
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    reports = {}
    start = time.time()
    for side in sides:
        reports[side] = run_side_subprocess(side, argv, results / f".{name}.{side}.json")
    model_args, ceiling = measure_ceiling(cfg, reports, args.warmup_steps)
    metrics = {}
    for side, r in reports.items():
        if "failed" in r:
            metrics[side] = {"failed": r["failed"]}
            continue
        metrics[side] = side_metrics(r, args.warmup_steps)
        metrics[side].update(efficiency(r, args.warmup_steps, model_args, ceiling["flops_per_s"], cfg.lora_r))
    heads = headline(metrics)
    table, head_md, prof_md = markdown_table(metrics), headline_table(heads), profile_table(reports)
    result = {
        "config": cfg.as_dict(),
        "sides": {s: SIDES[s].label for s in sides},
        "warmup_steps": args.warmup_steps,
        "versions": versions,
        "ceiling": ceiling,
        "headline": heads,
        "metrics": metrics,
        "reports": reports,
        "wall_seconds": time.time() - start,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (results / f"{name}.json").write_text(json.dumps(result, indent=2))
    settings = ", ".join(f"{k}={v}" for k, v in cfg.as_dict().items() if k != "model")
    version_line = ", ".join(f"{k} {v}" for k, v in versions.items())
    legend = "\n".join(f"- `{s}`: {SIDES[s].label}" for s in sides)
    ceiling_line = (
        f"model-shape ceiling: {ceiling['flops_per_s'] / 1e9:.0f} GFLOP/s ({ceiling['dtype']}, "
        f"{ceiling['tokens']} tokens per step)"
    )
    md = (
        f"# {name}\n\nmodel: `{Path(cfg.model).name}`; {settings}\n\nversions: {version_line}\n\n{legend}\n\n"
        f"{head_md}\n\n{table}\n\n{ceiling_line}\n\nProfile of one step (ms):\n\n{prof_md}\n"
    )
    (results / f"{name}.md").write_text(md)
    plot(reports, metrics, results / f"{name}.png", args.warmup_steps)
    print(f"\nversions: {version_line}\n\n{head_md}\n\n{table}\n\n{ceiling_line}\n\n{prof_md}\n")
    print(f"written: {results / name}.json, .md, .png ({time.time() - start:.0f} s in all)")
    return result


if __name__ == "__main__":
    main()
