"""Memory of the loss at large vocabularies: the fused linear cross-entropy against materialised logits.

Gemma 3's 262,144-token vocabulary (hidden 1,152 as Gemma-3-1B) and Gemma 2's 256,000 with its final-logit
soft-cap (30, hidden 2,304 as Gemma-2-2B): for each number of tokens in a step, the peak memory that one loss
forward + backward adds on top of the inputs, on this CPU, bf16:

* ``fused``: :func:`engine_kernels.fused_linear_cross_entropy` (logits exist one chunk at a time);
* ``logits``: what a plain causal-LM head does (``[N, V]`` logits, soft-capped, upcast to fp32, cross-entropy).

The output head is frozen (LoRA/QLoRA). Each measurement runs in its own process: the peak RSS (reset once the
inputs exist) minus the RSS at that point.

Run: ``python benchmarks/vocab_memory.py`` (about 5 minutes on two CPU cores); writes
``benchmarks/results/vocab-memory.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

#: (name, vocabulary, hidden size, final-logit soft-cap)
CASES = (("gemma-3 (1B)", 262144, 1152, None), ("gemma-2 (2B), softcap 30", 256000, 2304, 30.0))
TOKENS = (1024, 2048, 4096)


def _reset_peak() -> None:
    """Start a new peak-RSS measurement (Linux: writing 5 to clear_refs resets VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}; this benchmark needs Linux")


def measure(side: str, vocab: int, hidden: int, softcap: float | None, tokens: int) -> dict:
    """Run one loss forward + backward in this process; the peak RSS it added (bytes) and the loss.

    The output head is frozen, as in LoRA/QLoRA training (no ``[V, d]`` weight gradient); the hidden states get
    their gradient (what flows back into the model).
    """
    import torch

    from engine_kernels.cross_entropy import fused_linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=g) * 0.5).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(torch.bfloat16)
    y = torch.randint(0, vocab, (tokens,), generator=g)
    before = _status_bytes("VmRSS")
    _reset_peak()
    if side == "fused":
        loss = fused_linear_cross_entropy(h, w, y, softcap=softcap)
    else:
        logits = h @ w.t()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
    loss.backward()
    return {"added_bytes": _status_bytes("VmHWM") - before, "loss": float(loss)}


def run_all(tokens: tuple[int, ...]) -> list[dict]:
    rows = []
    for name, vocab, hidden, softcap in CASES:
        for n in tokens:
            row = {"case": name, "vocab": vocab, "hidden": hidden, "softcap": softcap, "tokens": n}
            for side in ("fused", "logits"):
                cmd = [sys.executable, __file__, "--one", side, str(vocab), str(hidden), str(softcap), str(n)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                result = json.loads(out)
                row[f"{side}_mib"] = result["added_bytes"] / 2**20
                row[f"{side}_loss"] = result["loss"]
            print(f"{name:28s} {n:6d} tokens: fused {row['fused_mib']:8.0f} MiB, logits {row['logits_mib']:8.0f} MiB",
                  flush=True)
            rows.append(row)
    return rows


def write(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": "python benchmarks/vocab_memory.py", "rows": rows},
                                                   indent=2))
    lines = ["| case | tokens | fused CE added MiB | logits added MiB | ratio | loss (fused / logits) |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['tokens']:,} | {r['fused_mib']:,.0f} | {r['logits_mib']:,.0f} | "
                     f"{r['logits_mib'] / max(r['fused_mib'], 1):.1f}x | {r['fused_loss']:.4f} / {r['logits_loss']:.4f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, *_ in CASES:
        sub = [r for r in rows if r["case"] == name]
        ax.plot([r["tokens"] for r in sub], [r["logits_mib"] for r in sub], "o--", label=f"{name}: logits")
        ax.plot([r["tokens"] for r in sub], [r["fused_mib"] for r in sub], "o-", label=f"{name}: fused CE")
    ax.set_xlabel("tokens per step")
    ax.set_ylabel("peak memory added by the loss (MiB)")
    ax.set_title("Loss memory at Gemma vocabularies (bf16, CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated tokens per step")
    parser.add_argument("--out", default=str(HERE / "results" / "vocab-memory.json"))
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = parser.parse_args(argv)
    if args.one:
        side, vocab, hidden, softcap, n = args.one
        result = measure(side, int(vocab), int(hidden), None if softcap == "None" else float(softcap), int(n))
        print(json.dumps(result))
        return
    rows = run_all(tuple(int(t) for t in args.tokens.split(",")))
    write(rows, Path(args.out))


if __name__ == "__main__":
    main()
