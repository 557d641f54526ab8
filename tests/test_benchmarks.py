"""benchmarks/run.py: the report arithmetic, FLOP counting, and a real (tiny) run of every side end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from benchmarks.flops import matmul_ceiling, step_flops
from benchmarks.run import efficiency, headline, markdown_table, select_sides, side_metrics
from benchmarks.sides import SIDES, categorize_profile, document_lengths
from engine.models.config import model_args_from_hf_config

ROOT = Path(__file__).resolve().parents[1]


def _report(step_seconds, step_tokens, losses, peak=1000, delta=400, docs=None, ckpt=0):
    records = [
        {"step": i + 1, "seconds": s, "tokens": t, "loss": loss}
        for i, (s, t, loss) in enumerate(zip(step_seconds, step_tokens, losses))
    ]
    mib = 1024 * 1024
    return {
        "step_records": records,
        "total_seconds": sum(step_seconds),
        "memory": {"peak_memory_bytes": peak * mib, "peak_rss_delta_bytes": delta * mib},
        "step_documents": docs if docs is not None else [[t] for t in step_tokens],
        "checkpointed_layers": ckpt,
    }


def test_side_metrics_skip_warmup_steps():
    report = _report([10.0, 1.0, 2.0, 3.0], [100, 100, 300, 600], [2.0, 1.5, 1.2, 1.0])
    m = side_metrics(report, warmup=1)
    assert m["median_step_s"] == 2.0
    assert m["tokens_per_s"] == pytest.approx(1000 / 6.0)
    assert m["trained_tokens"] == 1100
    assert m["final_loss"] == 1.0 and m["peak_memory_mib"] == 1000 and m["peak_added_mib"] == 400


def _metrics(tok_s, added, loss=1.0):
    return {"tokens_per_s": tok_s, "peak_added_mib": added, "peak_memory_mib": added + 1000, "mean_loss_last5": loss}


def test_headline_compares_like_with_like():
    metrics = {
        "engine": _metrics(300, 1600, 1.50),
        "engine-lean": _metrics(260, 560, 1.50),
        "hf": _metrics(60, 4900),
        "hf-padding-free": _metrics(140, 2200, 1.49),
        "hf-padding-free-no-ckpt": _metrics(165, 3600, 1.49),
    }
    rows = {r["engine_side"]: r for r in headline(metrics)}
    # engine-lean against the fastest HF side WITH checkpointing (not TRL's padded default).
    assert rows["engine-lean"]["hf_side"] == "hf-padding-free"
    assert rows["engine-lean"]["tokens_per_s_ratio"] == pytest.approx(260 / 140)
    assert rows["engine-lean"]["added_memory_ratio"] == pytest.approx(560 / 2200)
    assert rows["engine-lean"]["loss_last5_diff"] == pytest.approx(0.01)
    assert rows["engine"]["hf_side"] == "hf-padding-free-no-ckpt"
    assert rows["engine"]["tokens_per_s_ratio"] == pytest.approx(300 / 165)
    # A failed HF side is left out of the comparison; the table says "failed".
    metrics["hf-padding-free"] = {"failed": "ImportError: boom"}
    rows = {r["engine_side"]: r for r in headline(metrics)}
    assert rows["engine-lean"]["hf_side"] == "hf"
    table = markdown_table(metrics)
    assert "| trained tokens/s | 300 | 260 | 60 | failed | 165 |" in table


def test_select_sides_validates_names():
    assert select_sides("engine, hf", "cpu") == ["engine", "hf"]
    assert "hf-liger" not in select_sides(None, "cpu") and "hf-liger" in select_sides(None, "cuda")
    with pytest.raises(SystemExit, match="unknown side.*'hf-fast'.*choose from: engine, engine-lean"):
        select_sides("engine,hf-fast", "cpu")
    with pytest.raises(SystemExit, match="unknown side"):
        select_sides(" , ", "cpu")


def test_document_lengths_of_each_batch_layout():
    padded = {"input_ids": torch.zeros(2, 5), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    assert document_lengths(padded) == [3, 5]
    packed = {"input_ids": torch.zeros(1, 7), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1]])}
    assert document_lengths(packed) == [3, 2, 2]
    assert document_lengths({"input_ids": torch.zeros(2, 4)}) == [4, 4]


def _smollm2_args():
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    return model_args_from_hf_config(cfg)


def test_step_flops_counts_the_frozen_base_twice_and_attention_per_document():
    args = _smollm2_args()
    # SmolLM2-135M: 106.2M matmul parameters in the layers + 28.3M in the LM head; a frozen base costs
    # forward + activation gradient = 4 FLOPs per parameter and token: ~538M per token without attention/LoRA.
    f = step_flops(args, [1000], lora_r=0)
    per_token = (f.base_matmul + f.lm_head) / 1000
    assert per_token == pytest.approx(4 * (30 * 3_538_944 + 576 * 49152))
    assert 537e6 < per_token < 539e6
    # Attention grows with the square of each document, so two halves cost half of one whole.
    whole, halves = step_flops(args, [1000], lora_r=0), step_flops(args, [500, 500], lora_r=0)
    assert halves.attention == pytest.approx(whole.attention / 2)
    assert halves.base_matmul == whole.base_matmul
    # LoRA r=16 on all 7 projections: 6 FLOPs per adapter parameter and token.
    lora = step_flops(args, [1000], lora_r=16).lora
    assert lora == pytest.approx(6 * 16 * 30 * (576 * 2 + 576 * 2 + 576 + 192 + 576 + 192 + 3 * (576 + 1536)) * 1000)
    # Hardware FLOPs add one forward of every recomputed layer, nothing else.
    ck = step_flops(args, [1000], lora_r=16, checkpointed_layers=30)
    layer_forward = (ck.hardware - ck.model) / 30
    assert layer_forward == pytest.approx(ck.base_matmul / 30 / 2 + ck.lora / 30 / 3 + ck.attention / 30 / 3)


def test_efficiency_divides_model_flops_by_the_ceiling():
    args = _smollm2_args()
    report = _report([9.0, 2.0, 2.0], [100, 400, 400], [1.0, 1.0, 1.0], docs=[[100], [200, 200], [400]], ckpt=30)
    e = efficiency(report, 1, args, ceiling_flops_per_s=1e12, lora_r=16)
    model = step_flops(args, [200, 200]).model + step_flops(args, [400]).model
    assert e["model_gflops_per_s"] == pytest.approx(model / 4.0 / 1e9)
    assert e["mfu"] == pytest.approx(model / 4.0 / 1e12)
    assert e["hfu"] > e["mfu"]


def test_matmul_ceiling_measures_positive_flops():
    args = model_args_from_hf_config(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    c = matmul_ceiling(args, 64, dtype=torch.float32, repeats=2)
    assert c["flops"] == pytest.approx(4 * 64 * 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) + 4 * 64 * 64 * 512)
    assert c["flops_per_s"] > 0 and c["seconds"] > 0 and c["dtype"] == "float32"


def test_categorize_profile_splits_self_times():
    class Ev:
        def __init__(self, key, us):
            self.key, self.self_cpu_time_total, self.self_device_time_total = key, us, 0.0

    events = [Ev("aten::mm", 4000), Ev("aten::addmm", 1000), Ev("aten::_scaled_dot_product_flash_attention_for_cpu", 500),
              Ev("aten::mul", 300), Ev("aten::add_", 200), Ev("## Call CompiledFxGraph fab12 ##", 1000),
              Ev("LoRAMLPFunctionBackward", 700), Ev("ProfilerStep", 99999)]
    p = categorize_profile(events, step_seconds=0.01)
    assert p["matmul"] == pytest.approx(5.0) and p["attention"] == pytest.approx(0.5)
    # Fused compiled loops are elementwise work; an autograd Function's own Python time is overhead.
    assert p["elementwise"] == pytest.approx(1.5) and p["python_overhead"] == pytest.approx(3.0)
    assert p["top_ops_ms"][0] == {"op": "aten::mm", "ms": 4.0}


@pytest.mark.slow
def test_benchmark_runs_every_side_on_a_tiny_model(tiny_chat_folder, tmp_path):
    """Every CPU side trains; a side that cannot run (Liger's kernels on CPU) is reported as failed, the rest go on."""
    cmd = [
        sys.executable, "benchmarks/run.py", "--model", str(tiny_chat_folder), "--device", "cpu", "--max-steps", "3",
        "--batch-size", "2", "--seq-len", "1024", "--warmup-steps", "1", "--name", "tiny", "--results-dir", str(tmp_path),
        "--sides", ",".join([*(s for s in SIDES if not SIDES[s].cuda_only), "hf-liger"]),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "tiny.json").read_text())
    metrics = result["metrics"]
    assert "failed" in metrics["hf-liger"]
    ok_sides = [s for s in SIDES if not SIDES[s].cuda_only]
    assert all("failed" not in metrics[s] for s in ok_sides), {s: metrics[s] for s in ok_sides}
    ok = [s for s in SIDES if not SIDES[s].cuda_only]
    # Same examples in every step on every side: same trained tokens, and the same first loss (same weights).
    tokens = {s: metrics[s]["trained_tokens"] for s in ok}
    assert len(set(tokens.values())) == 1 and tokens["engine"] > 0, tokens
    first = {s: result["reports"][s]["step_records"][0]["loss"] for s in ok}
    for s in ok:
        assert first[s] == pytest.approx(first["engine"], rel=2e-3), first
    for s in ok:
        assert 0 < metrics[s]["mfu"] <= metrics[s]["hfu"], (s, metrics[s])
        assert result["reports"][s]["profile"]["step"] > 0
    assert result["reports"]["hf"]["checkpointed_layers"] == 2
    assert result["reports"]["hf-padding-free-no-ckpt"]["checkpointed_layers"] == 0
    assert {r["engine_side"] for r in result["headline"]} == {"engine", "engine-lean"}
    assert result["versions"]["transformers"] and result["versions"]["trl"]
    md = (tmp_path / "tiny.md").read_text()
    assert "MFU" in md and "versions:" in md and "failed" in md
    assert (tmp_path / "tiny.png").stat().st_size > 10_000
    assert "versions:" in proc.stdout


@pytest.mark.slow
def test_benchmark_packing_packs_both_sides(tiny_chat_folder, tmp_path):
    cmd = [
        sys.executable, "benchmarks/run.py", "--model", str(tiny_chat_folder), "--device", "cpu", "--max-steps", "2",
        "--batch-size", "1", "--seq-len", "512", "--warmup-steps", "0", "--packing", "--name", "tinypack",
        "--results-dir", str(tmp_path), "--sides", "engine,hf-padding-free", "--no-profile",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "tinypack.json").read_text())
    for side in ("engine", "hf-padding-free"):
        docs = result["reports"][side]["step_documents"]
        # Packed: one row of several documents per step, filled close to --seq-len.
        assert all(len(step) > 1 and 400 < sum(step) <= 512 for step in docs), (side, docs)
    assert result["reports"]["hf-padding-free"]["trl_config"]["packing_strategy"] == "bfd"


def test_unknown_side_stops_before_training(tmp_path):
    cmd = [sys.executable, "benchmarks/run.py", "--model", str(tmp_path), "--sides", "engine,nope", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert "unknown side(s) ['nope']" in proc.stderr


def test_vocab_memory_benchmark_measures_both_sides(tmp_path):
    """benchmarks/vocab_memory.py on a small vocabulary: both sides run, agree on the loss, and the files are written."""
    from benchmarks import vocab_memory

    rows = []
    for side in ("fused", "logits"):
        result = vocab_memory.measure(side, 5000, 64, 30.0, 256)
        assert result["added_bytes"] >= 0
        rows.append(result)
    assert abs(rows[0]["loss"] - rows[1]["loss"]) < 1e-2
    row = {"case": "small", "vocab": 5000, "hidden": 64, "softcap": 30.0, "tokens": 256,
           "fused_mib": rows[0]["added_bytes"] / 2**20, "logits_mib": rows[1]["added_bytes"] / 2**20,
           "fused_loss": rows[0]["loss"], "logits_loss": rows[1]["loss"]}
    vocab_memory.write([row], tmp_path / "vocab.json")
    assert "| small | 256 |" in (tmp_path / "vocab.md").read_text()
    assert (tmp_path / "vocab.png").stat().st_size > 5_000
