"""Load the shipped JSON Lines datasets (paths relative to this file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

DATA_DIR = Path(__file__).resolve().parent
SPLITS = ("train", "eval")
KINDS = ("sft", "dpo", "cls")


def jsonl_path(split: str, kind: str = "sft") -> Path:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return DATA_DIR / kind / f"{split}.jsonl"


def load_jsonl(split: str, kind: str = "sft") -> List[dict]:
    """Rows of ``engine/data/<kind>/<split>.jsonl``, e.g. ``load_jsonl("eval", "sft")`` or ``load_jsonl("train", "cls")``."""
    path = jsonl_path(split, kind)
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
