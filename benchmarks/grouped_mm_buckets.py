"""Why the CPU bf16 path of ``grouped_mm`` pads each expert's rows to a multiple of 64 (``RowBuckets``).

Run from the repository root (about a minute)::

    python benchmarks/grouped_mm_buckets.py

oneDNN (PyTorch's CPU bf16 matmul) builds a kernel for every new matrix shape; in training the rows per expert
change every step, so an unpadded loop pays that build on almost every product. Per shape this times, in bf16 with
new random routing every call (as in training; the first call is not counted): the per-expert loop on the exact row
counts, and on row counts padded to multiples of ``ROW_BUCKET`` (including the padding copies), for the forward
product and the weight gradient. Prints milliseconds per call (mean of ``--calls``).
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

from engine_kernels.grouped_gemm import RowBuckets, _grouped_mm_loop, _weight_grad_loop  # noqa: E402

#: (in features K, out features N): LoRA factors (rank 16) and base projections of a small MoE.
SHAPES = ((512, 16), (16, 1024), (512, 1024), (512, 512))


def _sides(w):
    def plain(x, dy, sizes):
        return _grouped_mm_loop(x, w, sizes, True)

    def bucketed(x, dy, sizes):
        b = RowBuckets(sizes, x.device)
        return b.unpad(_grouped_mm_loop(b.pad(x), w, b.sizes, True))

    def wgrad_plain(x, dy, sizes):
        return _weight_grad_loop(dy, x, sizes)

    def wgrad_bucketed(x, dy, sizes):
        b = RowBuckets(sizes, x.device)
        return _weight_grad_loop(b.pad(dy), b.pad(x), b.sizes)

    return {"forward, exact rows": plain, "forward, padded rows": bucketed,
            "weight grad, exact rows": wgrad_plain, "weight grad, padded rows": wgrad_bucketed}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--rows", type=int, default=4096, help="tokens x top-k per call")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"bf16, {args.experts} experts, {args.rows} rows, new routing per call, mean of {args.calls} calls (ms)")
    print("| K | N | " + " | ".join(_sides(None)) + " |")
    print("|---|---|" + "---:|" * 4)
    for k, n in SHAPES:
        w = torch.randn(args.experts, n, k, dtype=torch.bfloat16)
        row = []
        for fn in _sides(w).values():
            total = 0.0
            for call in range(args.calls + 1):
                probs = torch.rand(args.experts)
                sizes = tuple(torch.multinomial(probs, args.rows, replacement=True).bincount(
                    minlength=args.experts).tolist())
                x = torch.randn(args.rows, k, dtype=torch.bfloat16)
                dy = torch.randn(args.rows, n, dtype=torch.bfloat16)
                start = time.perf_counter()
                fn(x, dy, sizes)
                if call:
                    total += time.perf_counter() - start
            row.append(f"{total / args.calls * 1e3:.1f}")
        print(f"| {k} | {n} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
