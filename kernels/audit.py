"""Ahead-of-time audit of every Triton kernel for real GPUs, without a GPU.

``python -m engine_kernels.audit`` compiles each kernel in the launch configurations its wrapper picks for
representative model shapes (each kernel file's ``audit_launches()``) for sm_80 (A100), sm_86
(RTX 30xx), sm_89 (RTX 40xx / L4) and sm_90 (H100) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, reads the resource usage of
the produced cubin with ``cuobjdump --dump-resource-usage`` (shipped with triton), and prints a
table: registers per thread, spill (local memory) bytes, shared memory, warps. Pointer arguments
are compiled as 16-byte aligned, as Triton specialises them at a real launch on torch tensors.

It exits with status 1 if any launch spills registers to local memory, needs more shared memory
than the target offers per block, or more registers than a multiprocessor has for the block.

Options: ``--markdown PATH`` also writes the table as markdown, ``--json PATH`` as JSON,
``--targets 80,90`` restricts the targets, ``--ops rms_norm,rope`` the ops, ``--jobs N`` sets the
number of compiler processes (default: one per CPU).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

#: Modules whose ``audit_launches()`` list the kernels to audit.
KERNEL_MODULES = (
    "engine_kernels.rms_norm",
    "engine_kernels.rope",
    "engine_kernels.swiglu",
    "engine_kernels.geglu",
    "engine_kernels.cross_entropy",
    "engine_kernels.nf4_triton",
    "engine_kernels.flash_attention",
    "engine_kernels.grouped_gemm_triton",
)

#: Compute capability -> (name, max shared memory per block in bytes with opt-in, registers per SM).
TARGETS = {
    80: ("A100", 166912, 65536),
    86: ("RTX 30xx", 101376, 65536),
    89: ("RTX 40xx", 101376, 65536),
    90: ("H100", 232448, 65536),
}


@dataclass
class AuditRow:
    op: str
    kernel: str
    shape: str
    cc: int
    num_warps: int
    registers: int
    spill_bytes: int
    stack_bytes: int
    shared_bytes: int
    problems: str

    @property
    def ok(self) -> bool:
        return not self.problems


def parse_resource_usage(text: str) -> dict[str, int]:
    """``REG``, ``STACK``, ``SHARED`` and ``LOCAL`` of the (single) function in cuobjdump's resource report."""
    found = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        match = re.search(rf"\b{key}:(\d+)", text)
        if match is None:
            raise RuntimeError(f"cuobjdump's resource report has no {key} entry:\n{text}")
        found[key] = int(match.group(1))
    return found


def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.is_file():
        raise RuntimeError(f"cuobjdump not found at {path}: the audit needs the CUDA tools that ship with triton")
    return str(path)


def resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {out.stderr}")
    return parse_resource_usage(out.stdout)


def problems_of(registers: int, spill: int, stack: int, shared: int, num_warps: int, cc: int) -> list[str]:
    """Why a compiled launch is unacceptable on ``cc`` (empty when it is fine)."""
    _, max_shared, regs_per_sm = TARGETS[cc]
    found = []
    if spill or stack:
        found.append(f"spills ({spill} B local, {stack} B stack)")
    if shared > max_shared:
        found.append(f"shared memory {shared} B > {max_shared} B")
    if registers * num_warps * 32 > regs_per_sm:
        found.append(f"{registers} registers x {num_warps * 32} threads > {regs_per_sm}")
    return found


def compile_launch(launch, cc: int) -> AuditRow:
    """Compile one :class:`~engine_kernels._triton.AuditLaunch` for compute capability ``cc`` and measure it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = dict(launch.signature)
    signature.update({name: "constexpr" for name in launch.constexprs})
    # As at a real launch: torch allocations are 16-byte aligned, and Triton specialises on that (and on
    # integers that are multiples of 16, which a launch declares in ``divisible_by_16``).
    attrs = {
        (launch.kernel.arg_names.index(name),): [["tt.divisibility", 16]]
        for name, kind in launch.signature.items()
        if kind.startswith("*") or name in launch.divisible_by_16
    }
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=dict(launch.constexprs), attrs=attrs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": launch.num_warps, "num_stages": launch.num_stages, **launch.options},
    )
    usage = resource_usage(compiled.asm["cubin"])
    shared = int(compiled.metadata.shared) + usage["SHARED"]
    found = problems_of(usage["REG"], usage["LOCAL"], usage["STACK"], shared, launch.num_warps, cc)
    return AuditRow(
        op=launch.op,
        kernel=launch.name,
        shape=launch.shape,
        cc=cc,
        num_warps=launch.num_warps,
        registers=usage["REG"],
        spill_bytes=usage["LOCAL"],
        stack_bytes=usage["STACK"],
        shared_bytes=shared,
        problems="; ".join(found),
    )


def _compile_job(job: tuple[str, int, int]) -> AuditRow:
    """Worker: compile launch ``index`` of ``module``'s ``audit_launches()`` for ``cc`` (picklable arguments)."""
    module, index, cc = job
    return compile_launch(importlib.import_module(module).audit_launches()[index], cc)


def run_audit(
    ccs=tuple(TARGETS), ops: set[str] | None = None, progress: bool = True, jobs: int = 1
) -> list[AuditRow]:
    """Compile every launch for every target; ``jobs`` worker processes (compiling is CPU-bound)."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    work = []
    for name in KERNEL_MODULES:
        for index, launch in enumerate(importlib.import_module(name).audit_launches()):
            if ops is None or launch.op in ops:
                work.extend((name, index, cc) for cc in ccs)
    if jobs <= 1:
        return [_compile_job(job) for job in tqdm(work, desc="compiling", disable=not progress)]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(tqdm(pool.map(_compile_job, work), total=len(work), desc="compiling", disable=not progress))


HEADER = ("op", "kernel", "launch", "target", "warps", "regs/thread", "spill B", "shared B", "status")


def _cells(row: AuditRow) -> tuple[str, ...]:
    target = f"sm_{row.cc} ({TARGETS[row.cc][0]})"
    status = "ok" if row.ok else f"FAIL: {row.problems}"
    spill = row.spill_bytes + row.stack_bytes
    return (row.op, row.kernel, row.shape, target, str(row.num_warps), str(row.registers), str(spill),
            str(row.shared_bytes), status)


def format_table(rows: list[AuditRow]) -> str:
    """A fixed-width table for the terminal."""
    cells = [HEADER, *(_cells(r) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(HEADER))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: list[AuditRow]) -> str:
    cells = [HEADER, tuple("---" for _ in HEADER), *(_cells(r) for r in rows)]
    return "\n".join("| " + " | ".join(c) + " |" for c in cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine_kernels.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(str(cc) for cc in TARGETS), help="compute capabilities")
    parser.add_argument("--ops", default=None, help="comma-separated ops (default: all)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table as markdown here")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: CPUs)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the audit compiles real GPU code, not interpreted kernels")
    ccs = [int(cc) for cc in args.targets.split(",")]
    unknown = [cc for cc in ccs if cc not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {sorted(TARGETS)}")
    ops = set(args.ops.split(",")) if args.ops else None
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    rows = run_audit(ccs, ops, jobs=args.jobs)
    print(format_table(rows))
    if args.markdown:
        args.markdown.write_text(format_markdown(rows) + "\n")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows)} compiled launches, {len(failed)} failing")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
