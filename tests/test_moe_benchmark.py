"""benchmarks/moe.py: the expert-loop accounting, the truncated tokenizer, and a tiny end-to-end run of two sides."""

from __future__ import annotations

import json

import pytest

from benchmarks import moe


def test_expert_loop_share_counts_loop_functions_and_the_mm_inside_them():
    trace = {"traceEvents": [
        # Two loop calls on two threads (forward on the main thread, backward on autograd's).
        {"cat": "python_function", "name": "kernels/grouped_gemm.py(55): grouped_mm_torch", "tid": 1, "ts": 100,
         "dur": 50},
        {"cat": "python_function", "name": "/x/kernels/grouped_gemm.py(70): grouped_weight_grad_torch", "tid": 2,
         "ts": 300, "dur": 30},
        {"cat": "python_function", "name": "engine/modules/moe.py(180): forward", "tid": 1, "ts": 90, "dur": 400},
        {"cat": "cpu_op", "name": "aten::mm", "tid": 1, "ts": 110, "dur": 20},   # inside the first loop
        {"cat": "cpu_op", "name": "aten::mm", "tid": 2, "ts": 305, "dur": 10},   # inside the second
        {"cat": "cpu_op", "name": "aten::mm", "tid": 1, "ts": 305, "dur": 10},   # other thread's interval: outside
        {"cat": "cpu_op", "name": "aten::mm", "tid": 1, "ts": 200, "dur": 10},   # outside any loop
    ]}
    share = moe.expert_loop_share(trace, step_ms=0.4)
    assert share["loop_ms"] == pytest.approx(0.08) and share["loop_calls"] == 2
    assert share["loop_mm_ms"] == pytest.approx(0.03) and share["mm_calls"] == 2
    assert share["share"] == pytest.approx(0.2)


def test_truncated_tokenizer_keeps_a_complete_bpe_and_the_chat_template():
    tok = moe.truncated_tokenizer(600)
    text = "Sort the list [3, 1, 2] in Python, please — thanks!"
    ids = tok(text)["input_ids"]
    assert max(ids) < 600 and tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, return_dict=False)
    assert tok.convert_tokens_to_ids("<|im_start|>") in chat and max(chat) < 600
    with pytest.raises(SystemExit, match="at least 512"):
        moe.truncated_tokenizer(300)


def test_moe_benchmark_runs_engine_and_hf_on_a_tiny_model(tmp_path, monkeypatch):
    """Two sides, two steps, in process: both train the same tiny Qwen3-MoE and the files are written."""
    result = moe.main([
        "--tiny", "--in-process", "--families", "qwen3_moe", "--sides", "engine-no-ckpt,hf-grouped-mm",
        "--max-steps", "3", "--warmup-steps", "1", "--seq-len", "128", "--batch-size", "1", "--vocab", "600",
        "--rows", "48", "--no-profile", "--name", "tiny", "--results-dir", str(tmp_path),
        "--models-dir", str(tmp_path / "models"),
    ])
    block = result["families"]["qwen3_moe"]
    for side in ("engine-no-ckpt", "hf-grouped-mm"):
        m = block["metrics"][side]
        assert "failed" not in m, m
        assert m["tokens_per_s"] > 0 and m["trained_tokens"] > 100 and m["final_loss"] > 0
    # Same model, same LoRA layout: the same number of trainable parameters, and the same first loss within bf16.
    trainable = {s: block["metrics"][s]["trainable_parameters"] for s in ("engine-no-ckpt", "hf-grouped-mm")}
    assert len(set(trainable.values())) == 1, trainable
    first = [block["reports"][s]["step_records"][0]["loss"] for s in ("engine-no-ckpt", "hf-grouped-mm")]
    assert first[0] == pytest.approx(first[1], rel=0.05), first
    assert block["headline"][0]["hf_side"] == "hf-grouped-mm"
    over = block["loop_overhead"]
    assert over["rows"] == 128 * 2 and over["experts"] == 8 and len(over["products"]) == 6
    assert over["loop_ms"] > 0 and over["single_mm_ms"] > 0
    saved = json.loads((tmp_path / "tiny.json").read_text())
    hf_report = saved["families"]["qwen3_moe"]["reports"]["hf-grouped-mm"]
    assert hf_report["experts_implementation"] == "grouped_mm"
    assert "| trained tokens/s |" in (tmp_path / "tiny.md").read_text()
    assert (tmp_path / "tiny.png").stat().st_size > 5_000


def test_unknown_family_or_side_stops_before_anything_runs(tmp_path):
    with pytest.raises(SystemExit, match="unknown side.*'hf-fast'"):
        moe.main(["--sides", "engine,hf-fast", "--results-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown family.*'llama'"):
        moe.main(["--families", "llama", "--results-dir", str(tmp_path)])
