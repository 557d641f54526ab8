"""Process settings CPU training gets by default: denormal numbers flushed to zero.

On x86 CPUs an arithmetic instruction that reads or produces a *denormal* float (magnitude below
``1.18e-38`` in fp32 and bf16) takes a slow microcode path, often 10-100x slower than normal. Training
produces such values (tiny gradients, their squares in AdamW's second moment, the tails of activations),
and on some CPUs every op touching them slows down: on this project's Intel Xeon (AMX) development
machine, LoRA on SmolLM2-135M in bf16 ran at 15-37 trained tokens/s with denormals and 183 with them
flushed (see docs/benchmarks.md). Flushing (FTZ/DAZ, ``torch.set_flush_denormal(True)``) treats them
as zero: a result changes only where a value below ``1.18e-38`` would otherwise have survived, which
no loss or update of a model can notice.

The engine's trainers turn it on for the duration of :meth:`~engine.training.base.EngineTrainer.train`
on CPU and restore the previous setting afterwards. A hand-written training loop can use
:func:`flush_denormals` the same way.
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
