"""benchmarks/run.py: the report arithmetic, and a real (tiny) engine-vs-HF run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.run import markdown_table, side_metrics

ROOT = Path(__file__).resolve().parents[1]


def _report(step_seconds, step_tokens, losses, peak=1000, delta=400):
    records = [
        {"step": i + 1, "seconds": s, "tokens": t, "loss": loss}
        for i, (s, t, loss) in enumerate(zip(step_seconds, step_tokens, losses))
    ]
    mib = 1024 * 1024
    return {
        "step_records": records,
        "total_seconds": sum(step_seconds),
        "memory": {"peak_memory_bytes": peak * mib, "peak_rss_delta_bytes": delta * mib},
    }


def test_side_metrics_skip_warmup_steps():
    report = _report([10.0, 1.0, 2.0, 3.0], [100, 100, 300, 600], [2.0, 1.5, 1.2, 1.0])
    m = side_metrics(report, warmup=1)
    assert m["median_step_s"] == 2.0
    assert m["tokens_per_s"] == pytest.approx(1000 / 6.0)
    assert m["trained_tokens"] == 1100
    assert m["final_loss"] == 1.0 and m["peak_memory_mib"] == 1000 and m["peak_added_mib"] == 400


def test_markdown_table_ratios():
    engine = side_metrics(_report([1.0, 1.0], [200, 200], [1.0, 0.5], peak=500, delta=100), warmup=0)
    hf = side_metrics(_report([2.0, 2.0], [200, 200], [1.0, 0.5], peak=1000, delta=400), warmup=0)
    table = markdown_table({"engine": engine, "hf": hf})
    assert "| trained tokens/s | 200 | 100 | 2.00x |" in table
    assert "| memory added by training (MiB) | 100 | 400 | 0.25x |" in table


@pytest.mark.slow
def test_benchmark_runs_both_sides_on_a_tiny_model(tiny_chat_folder, tmp_path):
    cmd = [
        sys.executable, "benchmarks/run.py", "--model", str(tiny_chat_folder), "--device", "cpu", "--max-steps", "3",
        "--batch-size", "2", "--seq-len", "256", "--warmup-steps", "1", "--name", "tiny", "--results-dir", str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "tiny.json").read_text())
    engine, hf = result["metrics"]["engine"], result["metrics"]["hf"]
    # Same examples in every step on both sides: same trained tokens, and the same first loss (same weights).
    assert engine["trained_tokens"] == hf["trained_tokens"] > 0
    first = [result["reports"][s]["step_records"][0]["loss"] for s in ("engine", "hf")]
    assert first[0] == pytest.approx(first[1], rel=1e-3)
    assert (tmp_path / "tiny.md").read_text().count("|") > 20
    assert (tmp_path / "tiny.png").stat().st_size > 10_000
    assert "engine / HF" in proc.stdout
