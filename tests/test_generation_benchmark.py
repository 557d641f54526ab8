"""Smoke test of benchmarks/generation.py: a tiny chat model, both sides, every column, files written."""

from __future__ import annotations

import json

from benchmarks import generation


def test_generation_benchmark_runs_on_a_tiny_model(tiny_chat_folder, tmp_path):
    out = tmp_path / "generation.json"
    result = generation.main([
        "--model", str(tiny_chat_folder), "--dtypes", "float32", "--new-tokens", "3", "--prompts", "2",
        "--generations", "2", "--repeats", "1", "--threads", "1", "--out", str(out),
    ])
    rows = result["rows"]
    assert {r["side"] for r in rows} == {"engine", "transformers (default)", "transformers (static)"}
    assert {r["mode"] for r in rows} == {"sample", "greedy"}
    for r in rows:
        assert r["rows"] == 4 and 1 <= r["steps"] <= 3 and r["new_tokens"] <= 4 * 3
        assert r["new_tokens_per_s"] > 0 and r["ms_per_decode_step"] > 0
    # the same weights and dtype on both sides: greedy decoding picks the same tokens
    assert all(r["greedy_equals_engine"] for r in rows if r["mode"] == "greedy")
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["versions"]["torch"]
    table = out.with_suffix(".md").read_text()
    assert "| float32 | greedy | 3 | transformers (static) |" in table


def test_counted_tokens_stop_at_the_first_eos():
    import torch

    generated = torch.tensor([[5, 2, 2, 0], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert generation.counted_tokens(generated, eos=2) == 2 + 4 + 1
