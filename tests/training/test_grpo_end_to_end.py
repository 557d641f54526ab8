"""GRPO on the real SmolLM2-135M-Instruct raises the held-out reward of the shipped addition task
(``engine/data/rewards.py``), through the runnable example ``docs/examples/grpo_addition.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "grpo_addition.py"


def _example():
    spec = importlib.util.spec_from_file_location("grpo_addition", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_grpo_raises_held_out_reward():
    result = _example().main(["--steps", "8", "--lr", "3e-4", "--eval-prompts", "12", "--eval-generations", "4"])
    before, after = result["before"], result["after"]
    # Measured (this 2-core CPU machine, bf16, the suite's eager CPU ops): mean reward 0.171 -> 0.662, correct
    # 16.7% -> 60.4%, 192 s. The full 20-step example: docs/training.md "GRPO end to end".
    assert 0.05 <= before["success_rate"] <= 0.6, before  # the base model partly solves it: GRPO has a signal
    assert after["mean_reward"] >= before["mean_reward"] + 0.3, (before, after)
    summary = result["summary"]
    assert summary.steps == 8 and summary.generation["tokens_per_second"] > 0
