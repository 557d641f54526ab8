"""What the CPU path of ``grouped_mm`` pays for looping over experts: one ``torch.mm`` per expert against one dense
matmul over all rows with the same FLOPs.

Run from the repository root (a few seconds)::

    python benchmarks/grouped_mm_cpu.py
    python benchmarks/grouped_mm_cpu.py --repeats 15 --threads 2

Per shape it times forward (``x_g @ w[g].T``), input gradient (``dy_g @ w[g]``) and weight gradient
(``dy_g.T @ x_g``) of the PyTorch path (:func:`engine_kernels.grouped_gemm.grouped_mm_torch`,
:func:`~engine_kernels.grouped_gemm.grouped_weight_grad_torch`) with tokens routed uniformly at random, and the same
three products as single dense matmuls (as if every row used one expert). The two take turns (``--repeats`` times)
and the fastest of each is printed, so that a slow phase of the machine does not land on one side only. The weight
gradient also writes ``E`` times more output than the dense one (one ``[N, K]`` matrix per expert).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine_kernels.grouped_gemm import grouped_mm_torch, grouped_weight_grad_torch  # noqa: E402

#: (label, experts, rows (tokens x top-k), in features K, out features N): small CPU-sized MoE projections.
SHAPES = (
    ("8 experts (Mixtral-like routing)", 8, 2048, 512, 1024),
    ("128 experts (Qwen3-MoE-like routing)", 128, 4096, 256, 384),
)


def _passes(x, w, dy, sizes):
    """``{pass: (grouped fn, dense fn)}``; the dense side multiplies every row by expert 0's weight."""
    w0 = w[0]
    return {
        "fwd": (lambda: grouped_mm_torch(x, w, sizes), lambda: torch.mm(x, w0.T)),
        "dx": (lambda: grouped_mm_torch(dy, w, sizes, transpose_w=False), lambda: torch.mm(dy, w0)),
        "dw": (lambda: grouped_weight_grad_torch(dy, x, sizes), lambda: torch.mm(dy.T, x)),
    }


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="alternating timings per side (default 7)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for label, experts, rows, k, n in SHAPES:
        counts = torch.bincount(torch.randint(0, experts, (rows,)), minlength=experts)
        sizes = tuple(int(c) for c in counts)
        x, w, dy = torch.randn(rows, k), torch.randn(experts, n, k), torch.randn(rows, n)
        cells = []
        for name, (grouped_fn, dense_fn) in _passes(x, w, dy, sizes).items():
            grouped = dense = float("inf")
            for _ in range(args.repeats):
                grouped = min(grouped, _seconds(grouped_fn))
                dense = min(dense, _seconds(dense_fn))
            cells.append(f"{name} {grouped * 1e3:.1f} vs {dense * 1e3:.1f} ms ({grouped / dense:.2f}x)")
        print(f"{label}, rows={rows} K={k} N={n} fp32, grouped vs one dense matmul: {'; '.join(cells)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
