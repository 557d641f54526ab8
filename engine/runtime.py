"""An opt-in process setting for CPU training: denormal numbers flushed to zero.

On x86 CPUs an arithmetic instruction that reads or produces a *denormal* float (magnitude below
``1.18e-38`` in fp32 and bf16) can take a slow microcode path. Training produces such values (tiny
gradients, their squares in AdamW's second moment, the tails of activations). Flushing (FTZ/DAZ,
``torch.set_flush_denormal(True)``) treats them as zero: a result changes only where a value below
``1.18e-38`` would otherwise have survived.

It is off by default: on this project's Intel Xeon (AMX) machine, A/B runs of the same LoRA training
(SmolLM2-135M, bf16, fresh processes) measured no gain (``python benchmarks/cpu_levers.py``; see
docs/benchmarks.md), and a setting that changes results without a measured gain should not be a default.
``SFTConfig(flush_denormals=True)`` / ``DPOConfig(flush_denormals=True)`` turn it on for the duration of
:meth:`~engine.training.base.EngineTrainer.train` on CPU (the previous setting is restored afterwards);
a hand-written loop can use :func:`flush_denormals` the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: The smallest normal fp32; anything nonzero below it is denormal.
_DENORMAL = 1e-39


def denormals_flushed() -> bool:
    """Whether this thread currently flushes denormals to zero (tested, since torch has no getter)."""
    return float(torch.tensor([_DENORMAL], dtype=torch.float32).mul(1.0)) == 0.0


@contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[bool]:
    """Flush denormal floats to zero inside the block (CPU, this thread); yields whether the CPU supports it.

    The previous setting is restored on exit.
    """
    before = denormals_flushed()
    supported = torch.set_flush_denormal(enabled) if enabled != before else True
    try:
        yield supported
    finally:
        if enabled != before:
            torch.set_flush_denormal(before)
