"""Labelled classification rows: which task does a prompt belong to?

Each row is one prompt of the instruction tasks in :mod:`data.tasks` labelled with the
task it was generated for (7 classes, in ``TASK_NAMES`` order). Splits are balanced:
every class gets ``n // 7`` rows, the first ``n % 7`` classes one more. Prompts are unique
within and across the classification splits (the eval split is drawn first), drawn from
their own RNG streams, so the SFT/DPO files do not change when these do and vice versa.
Standard library only.
"""

from __future__ import annotations

import random
from typing import Dict, List

from engine.data.tasks import TASK_NAMES, generate_example

__all__ = ["CLS_LABELS", "class_counts", "generate_cls_split"]

#: Class index -> name (the task a prompt belongs to).
CLS_LABELS = TASK_NAMES
MAX_TRIES = 10_000


def class_counts(n: int) -> Dict[str, int]:
    """Rows per class for a balanced split of ``n`` rows."""
    k = len(CLS_LABELS)
    return {name: n // k + (i < n % k) for i, name in enumerate(CLS_LABELS)}


def generate_cls_split(n: int, rng: random.Random, seen: set) -> List[dict]:
    """``n`` rows ``{"text", "label", "label_name"}`` in a seeded random order, none of whose prompts is in ``seen``
    (each drawn prompt is added to it)."""
    counts = class_counts(n)
    order = [name for name in CLS_LABELS for _ in range(counts[name])]
    rng.shuffle(order)
    rows = []
    for task in order:
        for _ in range(MAX_TRIES):
            prompt = generate_example(task, rng).prompt
            if prompt not in seen:
                break
        else:
            raise RuntimeError(f"could not find a new {task!r} prompt for the classification data")
        seen.add(prompt)
        rows.append({"text": prompt, "label": CLS_LABELS.index(task), "label_name": task})
    return rows
