"""``torchrun --nproc_per_node 2`` (gloo, CPU) trains like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("distributed_sft.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
def test_two_processes_match_one(tiny_chat_folder, tmp_path):
    single, double = tmp_path / "single.json", tmp_path / "double.json"
    _run([sys.executable, str(SCRIPT), str(tiny_chat_folder), str(single), "4"])
    _run([
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
        str(SCRIPT), str(tiny_chat_folder), str(double), "2",
    ])
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert len(one["losses"]) == len(two["losses"]) == 4
    # Step 1 has identical weights; later steps also match if the gradients were identical.
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-4), (one, two)
    # The losses must move (the test is not comparing constants).
    assert abs(one["losses"][-1] - one["losses"][0]) > 1e-3


def _adapter(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


@pytest.mark.slow
def test_fsdp2_two_ranks_match_one_process_lora_and_qlora(tiny_chat_folder, tmp_path):
    """FSDP2 (fully_shard, gloo): 2 ranks with batch 2 each equal 1 process with batch 4 over 4 AdamW steps, for
    LoRA and QLoRA; the adapter gathered from the shards and saved equals the single process's adapter."""
    single, double = tmp_path / "single.json", tmp_path / "double.json"
    _run([sys.executable, str(SCRIPT), str(tiny_chat_folder), str(single), "4", "fsdp"])
    _run([
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
        str(SCRIPT), str(tiny_chat_folder), str(double), "2", "fsdp",
    ])
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    for kind in ("lora", "qlora"):
        assert len(one[kind]["losses"]) == len(two[kind]["losses"]) == 4
        assert one[kind]["losses"] == pytest.approx(two[kind]["losses"], rel=1e-4), (kind, one, two)
        assert two[kind]["lora_sharded"] and not one[kind]["lora_sharded"]
        a, b = _adapter(one[kind]["adapter"]), _adapter(two[kind]["adapter"])
        assert a.keys() == b.keys() and len(a) > 0
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=f"{kind} {key}")
        # Training moved the adapter (lora_B starts at zero), so the comparison is not between initial values.
        assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-3
    # QLoRA: the NF4 base weights are buffers, replicated on every rank (FSDP2 shards parameters only).
    assert two["qlora"]["nf4_buffers"] > 0 and not two["qlora"]["nf4_sharded"]
