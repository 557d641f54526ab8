"""benchmarks/gpu_check.py on a machine without a GPU: the clean refusal, the pieces that need no CUDA, a CPU dry run.

The CUDA sections themselves cannot run here; the hidden ``--allow-cpu-dry-run`` runs the training and smart
checkpointing sections on a tiny model on the CPU to prove their code paths execute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
no_cuda_only = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs for real")


def _script(args, timeout, prefix=()):
    cmd = [sys.executable, *prefix, *([] if prefix else [str(SCRIPT)]), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


# ----------------------------------------------------------------------------------------------- no CUDA


@no_cuda_only
def test_refuses_without_cuda_in_one_clear_line(tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = _script(["--output", str(out)], timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode == gpu_check.NO_CUDA_EXIT == 2, text
    assert "gpu_check needs a CUDA GPU; none found (torch.cuda.is_available() is False" in text
    assert "Traceback" not in text
    assert len(text.strip().splitlines()) == 1, text
    assert not out.exists()


def test_refusal_without_cuda_writes_nothing(monkeypatch, tmp_path, capsys):
    """The same refusal in-process (also on a GPU machine, with CUDA hidden)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "_prepare_environment", dict)  # leave this test process's TRITON_INTERPRET alone
    out = tmp_path / "gpu-check.json"
    assert gpu_check.main(["--output", str(out), "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu_check needs a CUDA GPU; none found") and err.count("\n") == 1
    assert not out.exists()


def test_without_triton_the_script_imports_and_the_kernel_section_fails_cleanly(tmp_path):
    """No triton: importing gpu_check (and the kernels) works; the kernel section records an error, no crash."""
    code = f"""
import json, sys
sys.modules["triton"] = None  # `import triton` raises ImportError
sys.path.insert(0, {str(ROOT)!r})
from benchmarks import gpu_check
report = gpu_check.Report({str(tmp_path / "r.json")!r})
ctx = None
sec = gpu_check.run_section(report, "kernels", lambda s: gpu_check.section_kernels(s, ctx))
print(json.dumps({{"status": sec["status"], "error": sec.get("error")}}))
"""
    proc = _script([], timeout=120, prefix=("-c", code))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "error"
    assert "triton is not installed" in result["error"]


# ----------------------------------------------------------------------------------------------- results file


def test_report_keeps_earlier_sections_when_a_later_one_raises(tmp_path):
    path = tmp_path / "results" / "gpu-check.json"
    report = gpu_check.Report(path, argv=["--quick"])
    seen_while_running = {}

    def good(sec):
        report.add_check("first", {"name": "a", "passed": True, "max_abs_err": 0.0})
        sec["value"] = 1.5

    def bad(sec):
        report.add_check("second", {"name": "before the crash", "passed": True})
        seen_while_running.update(json.loads(path.read_text()))  # written as it goes
        raise ValueError("boom in the middle")

    def after(sec):
        report.add_check("third", {"name": "still runs", "passed": True})

    assert gpu_check.run_section(report, "first", good)["status"] == "ok"
    assert gpu_check.run_section(report, "second", bad)["status"] == "error"
    assert gpu_check.run_section(report, "third", after)["status"] == "ok"

    # While "second" ran, the file already held "first" complete and "second" as running with its first check.
    assert seen_while_running["sections"]["first"]["status"] == "ok"
    assert seen_while_running["sections"]["second"]["status"] == "running"
    assert seen_while_running["sections"]["second"]["checks"][0]["name"] == "before the crash"

    data = json.loads(path.read_text())
    assert list(data["sections"]) == ["first", "second", "third"]
    assert data["sections"]["first"]["value"] == 1.5
    second = data["sections"]["second"]
    assert second["error"] == "ValueError: boom in the middle"
    assert any("in bad" in line for line in second["traceback"])
    assert second["checks"][0]["passed"] is True and "seconds" in second
    assert data["argv"] == ["--quick"]
    assert [p.name for p in path.parent.iterdir()] == ["gpu-check.json"]  # no temporary file left behind
    assert gpu_check.exit_code(data) == 1
    del data["sections"]["second"]
    assert gpu_check.exit_code(data) == 0


def test_failed_check_makes_a_mismatch_and_non_finite_values_stay_valid_json(tmp_path):
    report = gpu_check.Report(tmp_path / "r.json")

    def fn(sec):
        report.add_check("k", {"name": "ok", "passed": True})
        report.add_check("k", {"name": "off", "passed": False, "max_abs_err": float("nan"), "ratio": float("inf")})
        report.add_check("k", {"name": "info", "passed": None, "dtype": torch.bfloat16, "backends": {"triton"}})

    sec = gpu_check.run_section(report, "k", fn)
    assert sec["status"] == "mismatch"
    data = json.loads((tmp_path / "r.json").read_text())  # strict JSON: NaN/inf/dtypes/sets were converted
    checks = data["sections"]["k"]["checks"]
    assert checks[1]["max_abs_err"] == "nan" and checks[1]["ratio"] == "inf"
    assert checks[2]["dtype"] == "torch.bfloat16" and checks[2]["backends"] == ["triton"]
    assert gpu_check.exit_code(data) == 1
    assert [gpu_check.check_status(c) for c in checks] == ["ok", "failed", "info"]
    table = gpu_check.summary_table(data)
    assert "| k | mismatch |" in table and "k / off" in table


def test_a_check_that_raises_makes_the_section_an_error(tmp_path):
    report = gpu_check.Report(tmp_path / "r.json")
    check = {"name": "x", "passed": False, "error": "E"}
    sec = gpu_check.run_section(report, "k", lambda s: report.add_check("k", check))
    assert sec["status"] == "error"


# ----------------------------------------------------------------------------------------------- budget


def test_budget_allows_keeps_reserve_and_skips_sections():
    clock = FakeClock()
    budget = gpu_check.Budget(100, clock=clock)
    assert budget.allows(100) and not budget.allows(100.5)
    clock.t = 80
    assert budget.remaining() == 20
    assert budget.allows(20) and not budget.allows(21)
    assert budget.allows(10) and not budget.allows(10, reserve_s=15)
    assert "time budget" in budget.reason(30) and "20 s left" in budget.reason(30)


def test_run_section_skips_what_the_budget_cannot_fit(tmp_path):
    clock = FakeClock()
    budget = gpu_check.Budget(60, clock=clock)
    report = gpu_check.Report(tmp_path / "r.json")
    calls = []
    clock.t = 50
    sec = gpu_check.run_section(report, "long_context", calls.append, budget=budget, cost_s=45)
    assert sec["status"] == "skipped" and "time budget" in sec["reason"] and calls == []
    sec = gpu_check.run_section(report, "smart_checkpointing", calls.append, budget=budget, cost_s=5)
    assert sec["status"] == "ok" and len(calls) == 1
    sec = gpu_check.run_section(report, "kernels", calls.append, skip_reason="skipped: no CUDA (CPU dry run)")
    assert sec["status"] == "skipped" and len(calls) == 1
    data = json.loads((tmp_path / "r.json").read_text())
    assert [s["part"] for s in data["skipped"]] == ["long_context", "kernels"]
    assert gpu_check.exit_code(data) == 0  # skipped parts are not failures


def test_kernel_section_runs_required_checks_records_errors_and_skips_optional_ones(tmp_path, monkeypatch):
    """Required checks always run (one raising does not stop the next); optional ones stop when time runs low."""
    import engine_kernels._triton

    monkeypatch.setattr(engine_kernels._triton, "interpreting", lambda: False)  # as on a GPU
    clock = FakeClock()

    def ok():
        clock.t += 10
        return {"passed": True, "max_abs_err": 0.0}

    def boom():
        clock.t += 10
        raise RuntimeError("kernel exploded")

    required = [("a", "op", "s", ok), ("b", "op", "s", boom), ("c", "op", "s", ok)]
    optional = [("d llama", "op", "s", ok), ("e llama", "op", "s", ok)]
    monkeypatch.setattr(gpu_check, "kernel_cases", lambda device, quick=False: (required, optional))
    monkeypatch.setattr(gpu_check, "free_memory", lambda device=None: None)
    report = gpu_check.Report(tmp_path / "r.json")
    budget = gpu_check.Budget(50, clock=clock)
    ctx = gpu_check.Context(SimpleNamespace(quick=False), torch.device("cpu"), torch.float32, report, budget,
                            dry_run=False)
    ctx.selected = ["kernels"]
    # After the 3 required checks (30 s) 20 s are left: one optional check (~6 s planned, 10 s real) fits, then 10 s
    # remain, still >= 6 s: the second runs too; with 45 s reserved for later sections neither would.
    sec = gpu_check.run_section(report, "kernels", lambda s: gpu_check.section_kernels(s, ctx))
    names = {c["name"]: gpu_check.check_status(c) for c in sec["checks"]}
    assert names == {"a": "ok", "b": "error", "c": "ok", "d llama": "ok", "e llama": "ok"}
    assert sec["status"] == "error" and "kernel exploded" in sec["checks"][1]["error"]

    clock.t = 0
    report2 = gpu_check.Report(tmp_path / "r2.json")
    ctx2 = gpu_check.Context(SimpleNamespace(quick=False), torch.device("cpu"), torch.float32, report2,
                      gpu_check.Budget(50, clock=clock), dry_run=False)
    ctx2.selected = ["kernels", "long_context"]  # 45 s kept for the long-context section
    sec = gpu_check.run_section(report2, "kernels", lambda s: gpu_check.section_kernels(s, ctx2))
    statuses = [gpu_check.check_status(c) for c in sec["checks"]]
    assert statuses == ["ok", "error", "ok", "skipped", "skipped"]
    assert all("time budget" in s["reason"] for s in report2.data["skipped"])


# ----------------------------------------------------------------------------------------------- comparisons


def test_tolerances_equal_the_kernel_tests():
    from tests.kernels import op_testing

    for dtype in (torch.float32, torch.bfloat16):
        assert gpu_check.tolerances(dtype) == op_testing.tolerances(dtype)
        assert gpu_check.tolerances(dtype, reduction=True) == op_testing.tolerances(dtype, reduction=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", [False, True])
def test_compare_agrees_with_assert_close(dtype, reduction):
    """``compare`` passes exactly when ``op_testing.assert_close`` does, over perturbations around the tolerance."""
    from tests.kernels import op_testing

    g = torch.Generator().manual_seed(0)
    expected = (torch.randn(64, 33, generator=g) * 3).to(dtype)
    outcomes = set()
    for size in (0.0, 1e-6, 1e-3, 1e-2, 3e-2, 5e-2, 1e-1):
        noise = torch.randn(expected.shape, generator=g) * size * expected.float().abs().max()
        actual = (expected.float() + noise).to(dtype)
        result = gpu_check.compare(actual, expected, dtype, reduction=reduction)
        try:
            op_testing.assert_close(actual, expected, dtype, "x", reduction=reduction)
            agrees = True
        except AssertionError:
            agrees = False
        assert result["passed"] is agrees, (size, result)
        outcomes.add(agrees)
        assert result["max_abs_err"] == pytest.approx(float((actual.float() - expected.float()).abs().max()))
    assert outcomes == {True, False}  # both sides of the tolerance were exercised


def test_compare_exact_nan_shape_and_dtype():
    x = torch.randn(10)
    assert gpu_check.compare(x.clone(), x, torch.float32, exact=True)["passed"]
    y = x.clone()
    y[3] = y[3] * (1 + 1e-6) + 1e-6
    result = gpu_check.compare(y, x, torch.float32, exact=True)
    assert not result["passed"] and result["bad"] == 1 and result["atol"] == 0.0
    assert gpu_check.compare(y, x, torch.float32)["passed"]  # within fp32 tolerance, just not bit-exact
    z = x.clone()
    z[0] = float("nan")
    assert not gpu_check.compare(z, x, torch.float32)["passed"]
    assert not gpu_check.compare(x[:5], x, torch.float32)["passed"]
    assert "dtype" in gpu_check.compare(x.double(), x, torch.float32)["error"]


INTERPRETER_CASES = ["cross_entropy", "lora_linear nf4", "nf4_dequantize bf16 dq", "lora_mlp nf4", "tiled_mlp nf4",
                     "flash_attention window", "attention dispatch triton"]


@pytest.mark.parametrize("name", INTERPRETER_CASES)
def test_kernel_cases_run_at_tiny_shapes(name, monkeypatch):
    """The kernel checks' own code (arguments, references, expected backends) on tiny shapes: Triton forced, on CUDA
    when there is one, else under Triton's interpreter (``TRITON_INTERPRET=1`` from ``tests/conftest.py``)."""
    from engine_kernels._triton import HAS_TRITON, interpreting

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not HAS_TRITON or not (device.type == "cuda" or interpreting()):
        pytest.skip("needs triton (CUDA, or the interpreter)")
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    monkeypatch.setattr(gpu_check, "time_ms", lambda fn, device, **kw: 1.0)
    required, optional = gpu_check.kernel_cases(device, tiny=True)
    assert len(optional) == 8 and len(required) == 20
    assert gpu_check.kernel_cases(device, quick=True, tiny=True)[1] == []
    run = {n: r for n, _, _, r in required + optional}[name]
    result = run()
    assert result["passed"], result
    assert result["comparisons"] and all(c["passed"] for c in result["comparisons"].values())
    assert result["triton_ms"] == 1.0 and result["speedup_vs_reference"] == 1.0


def test_parse_args_defaults_quick_and_unknown_sections():
    a = gpu_check.parse_args([])
    assert (a.steps, a.warmup_steps, a.seq_len, a.long_context, a.budget_s) == (15, 3, 8192, 32768, 270.0)
    assert a.sections == list(gpu_check.SECTIONS)
    q = gpu_check.parse_args(["--quick", "--sections", "long_context,kernels"])
    assert (q.steps, q.long_context) == (8, 16384)
    assert q.sections == ["kernels", "long_context"]  # run in the fixed order
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--sections", "kernels,nonsense"])


def test_packed_rows_restart_positions_and_mask_document_starts():
    rows = gpu_check.packed_rows(2, 100, 50, 7, 30, "cpu", seed=1)
    for row in rows:
        assert sum(row["doc_lengths"]) == 100 and len(row["doc_lengths"]) > 1
        pos = row["position_ids"][0]
        starts = (pos == 0).nonzero().flatten().tolist()
        assert len(starts) == len(row["doc_lengths"]) and starts[0] == 0
        assert (row["labels"][0][pos == 0] == -100).all() and (row["labels"][0][pos != 0] >= 0).all()


# ----------------------------------------------------------------------------------------------- CPU dry run


@no_cuda_only
def test_cpu_dry_run_executes_training_and_smart_checkpointing(tmp_path):
    out = tmp_path / "dry.json"
    proc = _script(["--allow-cpu-dry-run", "--output", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    data = json.loads(out.read_text())
    assert data["dry_run"] is True and data["status"] == "done" and data["exit_code"] == 0
    sections = data["sections"]
    for name in ("kernels", "long_context"):
        assert sections[name]["status"] == "skipped" and "no CUDA" in sections[name]["reason"]
    assert sections["training"]["status"] == "ok" and sections["smart_checkpointing"]["status"] == "ok"

    engine = [c for c in sections["training"]["checks"] if c.get("side") == "engine"]
    assert [c["gradient_checkpointing"] for c in engine] == [False, True]
    for c in engine:
        assert c["passed"] and c["tokens_per_s"] > 0 and len(c["losses"]) == c["steps"] == 3
        assert c["model_tflops_per_s"] > 0 and c["mfu"] > 0
    first = next(c for c in sections["training"]["checks"] if c["name"].startswith("engine first-step loss"))
    assert first["passed"]
    hf = sections["training"]["hf"]
    if isinstance(hf, dict):  # trl and peft installed: the Hugging Face side ran too
        hf_checks = [c for c in sections["training"]["checks"] if c.get("side") == "hf"]
        assert hf_checks and all(c["passed"] for c in hf_checks)
    else:
        assert hf.startswith("skipped: ")

    smart = {c["name"]: c for c in sections["smart_checkpointing"]["checks"]}
    assert smart["LoRA gradients equal (smart vs plain)"]["passed"]
    assert smart["LoRA gradients equal (smart vs plain)"]["tensors"] == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    assert smart["smart offloads one input per layer, plain none"]["smart_offloaded"] == 2
    assert smart["loss equal (smart vs plain)"]["passed"]
    assert data["environment"]["original_env"]["TRITON_INTERPRET"] == "1"  # set by tests/conftest.py, removed
    assert data["environment"]["env_now"]["TRITON_INTERPRET"] is None
