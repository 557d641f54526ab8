"""Deterministic generator for the shipped SFT, DPO and classification datasets.

Usage (from the repository root)::

    python -m engine.data.generate [--seed 0] [--out engine/data] \
        [--sizes sft_train=2000,sft_eval=200,dpo_train=1000,dpo_eval=100,cls_train=1050,cls_eval=140]

Writes ``<out>/sft/{train,eval}.jsonl``, ``<out>/dpo/{train,eval}.jsonl`` and
``<out>/cls/{train,eval}.jsonl``. The same seed and sizes give byte-identical
files.  Prompts are unique across the four SFT/DPO files, so both eval splits
are held out from both train splits; the classification files (prompt -> task,
see ``engine/data/classification.py``) are unique between themselves.
Each split draws from its own RNG (seeded by seed and split name) and eval
splits are drawn first, so changing a train size leaves the eval files as
they are.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from engine.data.classification import generate_cls_split
from engine.data.tasks import (
    TASK_NAMES,
    TASK_WEIGHTS,
    generate_example,
    is_correct,
    make_rejected,
)

DEFAULT_SEED = 0
DEFAULT_SIZES: Dict[str, int] = {
    "sft_train": 2000,
    "sft_eval": 200,
    "dpo_train": 1000,
    "dpo_eval": 100,
    "cls_train": 1050,
    "cls_eval": 140,
}
# Generation order: eval splits first so they do not depend on train sizes. The classification
# splits keep their own set of used prompts, so they neither change nor depend on the others.
SPLIT_ORDER = ("sft_eval", "dpo_eval", "sft_train", "dpo_train", "cls_eval", "cls_train")
MAX_TRIES = 10_000


def split_path(out: Path, split: str) -> Path:
    kind, name = split.split("_", 1)
    return Path(out) / kind / f"{name}.jsonl"


def task_counts(n: int) -> Dict[str, int]:
    """Rows per task for a split of n rows (largest remainder, >= 1 each when n allows)."""
    total = sum(TASK_WEIGHTS[t] for t in TASK_NAMES)
    exact = {t: n * TASK_WEIGHTS[t] / total for t in TASK_NAMES}
    counts = {t: int(exact[t]) for t in TASK_NAMES}
    by_remainder = sorted(TASK_NAMES, key=lambda t: (-(exact[t] - counts[t]), TASK_NAMES.index(t)))
    for t in by_remainder[: n - sum(counts.values())]:
        counts[t] += 1
    if n >= len(TASK_NAMES):
        for t in TASK_NAMES:  # every task at least once
            while counts[t] == 0:
                donor = max(TASK_NAMES, key=lambda d: counts[d])
                counts[donor] -= 1
                counts[t] += 1
    return counts


def _rng(seed: int, split: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
    return random.Random(f"lora-engine-data:{seed}:{split}")


def generate_split(split: str, n: int, seed: int, seen: set) -> List[dict]:
    rng = _rng(seed, split)
    if split.startswith("cls"):
        return generate_cls_split(n, rng, seen)
    counts = task_counts(n)
    order = [t for t in TASK_NAMES for _ in range(counts[t])]
    rng.shuffle(order)
    rows = []
    for task in order:
        for _ in range(MAX_TRIES):
            ex = generate_example(task, rng)
            if ex.prompt not in seen:
                break
        else:
            raise RuntimeError(f"could not find a new {task!r} prompt for {split}")
        seen.add(ex.prompt)
        assert is_correct(task, ex.prompt, ex.completion), ex
        if split.startswith("sft"):
            rows.append({
                "task": task,
                "prompt": ex.prompt,
                "completion": ex.completion,
                "messages": [
                    {"role": "user", "content": ex.prompt},
                    {"role": "assistant", "content": ex.completion},
                ],
            })
        else:
            rejected = make_rejected(ex, rng)
            assert not is_correct(task, ex.prompt, rejected), (ex, rejected)
            rows.append({"task": task, "prompt": ex.prompt, "chosen": ex.completion,
                         "rejected": rejected})
    return rows


def generate_all(seed: int = DEFAULT_SEED, sizes: Optional[Dict[str, int]] = None) -> Dict[str, List[dict]]:
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise ValueError(f"unknown split(s): {sorted(unknown)}")
    seen: set = set()
    cls_seen: set = set()
    return {split: generate_split(split, sizes[split], seed, cls_seen if split.startswith("cls") else seen)
            for split in SPLIT_ORDER}


def dumps_jsonl(rows: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def write_all(out: Path, seed: int = DEFAULT_SEED, sizes: Optional[Dict[str, int]] = None) -> Dict[str, Path]:
    data = generate_all(seed, sizes)
    paths = {}
    for split in sorted(DEFAULT_SIZES):
        path = split_path(Path(out), split)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(dumps_jsonl(data[split]))
        paths[split] = path
    return paths


def _parse_sizes(text: str) -> Dict[str, int]:
    sizes = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = item.partition("=")
        if key not in DEFAULT_SIZES or not value.isdigit():
            raise argparse.ArgumentTypeError(
                f"bad size {item!r}; expected e.g. sft_train=2000 (splits: {', '.join(DEFAULT_SIZES)})")
        sizes[key] = int(value)
    return sizes


def summarize(out: Path) -> str:
    lines = []
    for split in sorted(DEFAULT_SIZES):
        path = split_path(Path(out), split)
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        if split.startswith("cls"):
            lengths = sorted(len(r["text"]) for r in rows)
            mix = Counter(r["label_name"] for r in rows)
            lines.append(f"{path}: {len(rows)} rows, {path.stat().st_size} bytes, chars(text) min={lengths[0]} "
                         f"median={lengths[len(lengths) // 2]} max={lengths[-1]}; "
                         + ", ".join(f"{t}={mix[t]}" for t in TASK_NAMES))
            continue
        key = "completion" if split.startswith("sft") else "chosen"
        lengths = sorted(len(r["prompt"]) + len(r[key]) for r in rows)
        mix = Counter(r["task"] for r in rows)
        lines.append(
            f"{path}: {len(rows)} rows, {path.stat().st_size} bytes, chars(prompt+{key}) "
            f"min={lengths[0]} median={lengths[len(lengths) // 2]} "
            f"p90={lengths[int(len(lengths) * 0.9)]} max={lengths[-1]}; "
            + ", ".join(f"{t}={mix[t]}" for t in TASK_NAMES))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                    help="output folder (default: the engine/data/ folder of this script)")
    ap.add_argument("--sizes", type=_parse_sizes, default={},
                    help="comma-separated overrides, e.g. sft_train=2000,sft_eval=200,"
                         "dpo_train=1000,dpo_eval=100,cls_train=1050,cls_eval=140")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    write_all(args.out, args.seed, args.sizes)
    if not args.quiet:
        print(summarize(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
