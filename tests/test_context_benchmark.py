"""benchmarks/context.py end to end on a tiny model: the search, the table, the JSON and the plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import context


def test_context_table_files(hf_folders, tmp_path, capsys):
    # Budgets a few MiB above the 600 MiB CUDA-context allowance: the tiny model fits thousands of tokens.
    results = context.main([
        "--model", str(hf_folders["llama31"]), "--lora-r", "8", "--sizes", "0.59", "0.6",
        "--granularity", "256", "--high", "65536", "--out", str(tmp_path),
    ])
    paths = context.output_paths(context.parse_args(["--model", str(hf_folders["llama31"]), "--out", str(tmp_path)]))
    data = json.loads(paths["json"].read_text())
    table = paths["md"].read_text()
    assert paths["png"].stat().st_size > 10_000
    assert "planned by simulation" in table and "planned by simulation" in capsys.readouterr().out
    engine, hf = data["engine"]["sizes"], data["hf"]["sizes"]
    assert [r["vram_gb"] for r in engine] == [0.59, 0.6]
    assert 0 < engine[0]["max_tokens"] <= engine[1]["max_tokens"]
    assert 0 < hf[0]["max_tokens"] <= hf[1]["max_tokens"]
    for row in engine + hf:  # the found length fits its GPU size, with the allowances
        plan = row["plan"]
        needed = plan["total"] * 1.05 + 600 * 2**20
        assert needed <= row["vram_gb"] * 2**30
    assert data["published"]["80"] == {"unsloth": 342733, "hf_fa2": 28454}
    assert results["engine"]["settings"]["tiled_mlp"] == "auto"


def test_context_table_runs_for_a_new_family(hf_folders, tmp_path):
    """Gemma 2: GeGLU, soft-capped attention and loss, sandwich norms planned on the simulated GPU."""
    family = "gemma2"
    results = context.main([
        "--model", str(hf_folders[family]), "--lora-r", "8", "--sizes", "0.6", "--granularity", "256",
        "--high", "16384", "--out", str(tmp_path),
    ])
    assert results["engine"]["sizes"][0]["max_tokens"] > 0 and results["hf"]["sizes"][0]["max_tokens"] > 0


def test_measure_needs_a_gpu(monkeypatch):
    monkeypatch.setattr(context.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA GPU"):
        context.measure(context.parse_args(["--measure"]))


def test_output_names_keep_dots(tmp_path):
    paths = context.output_paths(context.parse_args(["--model", "meta-llama/Llama-3.1-8B", "--out", str(tmp_path)]))
    assert paths["json"].name == "context-Llama-3.1-8B.json"
