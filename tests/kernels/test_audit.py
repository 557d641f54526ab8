"""The ahead-of-time GPU audit (``python -m engine_kernels.audit``): it compiles every kernel for sm_80/86/89/90.

Compiling needs Triton's real compiler, not the interpreter this test process runs under, so the
compiling tests run in a subprocess without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine_kernels import audit

ROOT = Path(__file__).resolve().parents[2]


def _compiler_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_parse_resource_usage():
    report = (
        "Resource usage:\n Common:\n  GLOBAL:11 CONSTANT[4]:8\n Function _k:\n"
        "  REG:40 STACK:8 SHARED:1024 LOCAL:16 CONSTANT[0]:576 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
    )
    assert audit.parse_resource_usage(report) == {"REG": 40, "STACK": 8, "SHARED": 1024, "LOCAL": 16}
    with pytest.raises(RuntimeError, match="no REG"):
        audit.parse_resource_usage("Function _k:\n STACK:0 SHARED:0 LOCAL:0")


def test_problems_of():
    assert audit.problems_of(64, 0, 0, 4096, 8, 90) == []
    assert "spills" in audit.problems_of(64, 16, 0, 0, 8, 90)[0]
    assert "spills" in audit.problems_of(64, 0, 24, 0, 8, 90)[0]
    assert "shared memory" in audit.problems_of(64, 0, 0, 120_000, 8, 86)[0]  # fits sm_80/90, not sm_86
    assert audit.problems_of(64, 0, 0, 120_000, 8, 90) == []
    assert "registers" in audit.problems_of(255, 0, 0, 0, 16, 90)[0]  # 255 x 512 threads > 65536


def test_audit_passes_for_every_kernel_and_target(tmp_path):
    """CI's audit: every launch of every kernel compiles for all four targets with no spills."""
    out = subprocess.run(
        [sys.executable, "-m", "engine_kernels.audit", "--json", str(tmp_path / "audit.json"),
         "--markdown", str(tmp_path / "audit.md")],
        capture_output=True, text=True, env=_compiler_env(), cwd=ROOT, timeout=900, check=False,
    )
    print(out.stdout[-3000:])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "audit.json").read_text())
    assert {r["op"] for r in rows} == {"rms_norm", "rope", "swiglu", "geglu", "cross_entropy", "nf4_dequantize",
                                       "attention", "grouped_mm"}
    assert {r["cc"] for r in rows} == {80, 86, 89, 90}
    assert all(r["problems"] == "" and r["registers"] > 0 for r in rows)
    assert (tmp_path / "audit.md").read_text().count("\n") == len(rows) + 2


SPILLING_KERNEL = '''
import triton
import triton.language as tl

from engine_kernels._triton import AuditLaunch


@triton.jit
def _hog(X, Y, BLOCK: tl.constexpr):
    x = tl.load(X + tl.arange(0, BLOCK))
    tl.store(Y + tl.arange(0, BLOCK), x * tl.sum(x, axis=0) + tl.cumsum(x, axis=0))


LAUNCH = AuditLaunch("hog", _hog, {"X": "*fp32", "Y": "*fp32"}, {"BLOCK": 16384}, 1, "16384 values per warp")
'''


def test_audit_catches_a_spilling_kernel(tmp_path):
    """A kernel holding 16,384 fp32 values in one warp must spill: the audit has to say so."""
    (tmp_path / "hog_kernel.py").write_text(SPILLING_KERNEL)
    script = textwrap.dedent(
        """
        from hog_kernel import LAUNCH
        from engine_kernels.audit import compile_launch
        row = compile_launch(LAUNCH, 90)
        print(row.spill_bytes + row.stack_bytes, "|", row.problems)
        """
    )
    env = _compiler_env()
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    spilled, problems = out.stdout.strip().splitlines()[-1].split(" | ")
    assert int(spilled) > 0 and "spills" in problems
