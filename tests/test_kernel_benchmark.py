"""benchmarks/kernel_bench.py: no timings without a GPU, the providers of each case agree, the table's columns.

The case builders run here on tiny CPU tensors; the ``triton`` provider runs under Triton's interpreter
(``TRITON_INTERPRET=1``, set by ``tests/conftest.py`` on machines without CUDA).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from benchmarks import kernel_bench as kb
from engine_kernels._triton import HAS_TRITON, interpreting

#: Odd little sizes: GQA heads, a vocabulary and hidden size that are no powers of two, a partial NF4 block.
TINY = kb.ModelShape("tiny", batch=2, seq=3, hidden=20, intermediate=24, heads=4, kv_heads=2, head_dim=8, vocab=37)

#: (rtol, atol) of each dtype when comparing a provider with the reference.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2)}

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TIMING = re.compile(r"\d+(\.\d+)?\s*ms\b")


@pytest.fixture()
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_main_without_gpu_times_nothing_and_writes_nothing(no_cuda, tmp_path, capsys):
    before = sorted(kb.RESULTS.iterdir()) if kb.RESULTS.exists() else []
    assert kb.main([]) == 0
    out = tmp_path / "kernels-test.json"
    assert kb.main(["--ops", "rms_norm,nf4_dequantize", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "GPU timings need a CUDA GPU" in printed and "engine_kernels.audit" in printed
    assert not TIMING.search(printed), printed
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert (sorted(kb.RESULTS.iterdir()) if kb.RESULTS.exists() else []) == before


def test_unknown_op_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        kb.main(["--ops", "rms_norm,nope"])
    assert exc.value.code == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", kb.OPS)
def test_providers_agree_on_tiny_shapes(op, dtype):
    assert HAS_TRITON and (DEVICE.type == "cuda" or interpreting()), "the triton provider needs the interpreter"
    case = kb.make_case(op, TINY, dtype, DEVICE, train_weights=True)
    assert set(case.providers) == set(kb.PROVIDERS)
    ref_out, ref_grads = kb.run_provider(case, "reference")
    assert ref_out and all(t.isfinite().all() for t in ref_out)
    if case.grad_outputs is not None:
        assert ref_grads and all(g is not None for g in ref_grads)
    rtol, atol = TOLERANCES[dtype]
    for provider in ("torch", "triton"):
        out, grads = kb.run_provider(case, provider)
        assert len(out) == len(ref_out) and len(grads) == len(ref_grads)
        for a, b in zip(out, ref_out):
            if op == "nf4_dequantize":  # the same formula: bit-exact
                assert a.dtype == b.dtype and torch.equal(a, b), provider
            else:
                torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol, msg=f"{provider} output")
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol, msg=f"{provider} gradient")


def test_frozen_weights_get_no_gradient():
    for op in ("rms_norm", "cross_entropy"):
        case = kb.make_case(op, TINY, torch.float32, DEVICE)
        assert len(case.inputs) == 1
        _, grads = kb.run_provider(case, "torch")
        assert grads[0] is not None


def test_case_modes_and_nf4_bytes():
    assert kb.make_case("swiglu", TINY, torch.float32, DEVICE).modes == ("forward", "backward", "full")
    nf4 = kb.make_case("nf4_dequantize", TINY, torch.bfloat16, DEVICE)
    assert nf4.modes == ("forward",) and nf4.grad_outputs is None
    n = TINY.intermediate * TINY.hidden
    assert nf4.bytes_moved > n // 2 + n * 2  # packed codes + block scales read, bf16 written
    with pytest.raises(ValueError, match="unknown op"):
        kb.make_case("attention", TINY, torch.float32, DEVICE)


def test_bench_case_drives_each_mode_with_a_stand_in_timer():
    """The timed closures run repeatedly (the backward replays one retained graph) and leave no gradients."""
    case = kb.make_case("rope", TINY, torch.float32, DEVICE)
    calls = []

    def timer(fn, grad_to_none):
        for _ in range(3):  # as do_bench: clear the gradients, call
            for x in grad_to_none:
                x.grad = None
            fn()
        calls.append(fn)
        return {"reference": (2.0, 1.5, 2.5)}.get(case_provider[0], (1.0, 0.8, 1.2))

    case_provider = [None]
    rows = []
    for provider in case.providers:
        case_provider[0] = provider
        rows += kb.bench_provider(case, provider, timer, memory=lambda step: (step(), 3 * kb.MIB)[1])
    rows = kb.add_speedups(rows)
    assert len(calls) == len(rows) == 9
    assert [(r.provider, r.mode) for r in rows[:3]] == [("reference", m) for m in kb.MODES]
    assert all(x.grad is None for x in case.inputs)
    for r in rows:
        assert r.error is None and r.median_ms is not None
        assert r.speedup == pytest.approx(1.0 if r.provider == "reference" else 2.0)
        assert (r.peak_mib == 3.0) == (r.mode == "full")


def test_add_speedups_and_format_table():
    rows = kb.add_speedups([
        kb.Row("rms_norm", "llama-3.1-8b: 4096x4096", "full", "reference", median_ms=0.5, peak_mib=200.0),
        kb.Row("rms_norm", "llama-3.1-8b: 4096x4096", "full", "triton", median_ms=0.125, peak_mib=96.0),
        kb.Row("nf4_dequantize", "llama-3.1-8b: 14336x4096 b64 dq", "forward", "triton", median_ms=0.1, gbps=1500.0),
        kb.Row("cross_entropy", "llama-3.1-8b: 4096x4096 @ 128256", "full", "reference", error="out of memory"),
    ])
    assert rows[0].speedup == 1.0 and rows[1].speedup == 4.0
    assert rows[2].speedup is None and rows[3].speedup is None  # no reference row / no time
    lines = kb.format_table(rows).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["op", "shape", "mode", "provider", "median ms", "speedup vs reference", "peak MiB", "GB/s"]
    assert set(lines[1]) <= set("|-")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(c) == len(header) for c in cells)
    assert cells[0] == ["rms_norm", "llama-3.1-8b: 4096x4096", "full", "reference", "0.500", "1.00x", "200.0", ""]
    assert cells[1][4:7] == ["0.125", "4.00x", "96.0"]
    assert cells[2][4:] == ["0.100", "", "", "1,500"]
    assert cells[3][4:] == ["out of memory", "", "", ""]


def test_gpu_slug():
    assert kb.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert kb.gpu_slug("NVIDIA GeForce RTX 4090") == "nvidia-geforce-rtx-4090"


def test_write_results(tmp_path):
    rows = kb.add_speedups([
        kb.Row("swiglu", "tiny", mode, provider, median_ms=t, peak_mib=1.0)
        for mode in kb.MODES for provider, t in (("reference", 2.0), ("torch", 1.5), ("triton", 1.0))
    ])
    meta = {"gpu": "Test GPU", "dtype": "bf16", "torch": "x", "triton": "y", "date": "2025-01-01T00:00:00"}
    written = kb.write_results(rows, tmp_path / "sub" / "kernels-test-gpu.json", meta)
    data = json.loads((tmp_path / "sub" / "kernels-test-gpu.json").read_text())
    assert data["gpu"] == "Test GPU" and len(data["rows"]) == 9 and data["rows"][2]["speedup"] == 2.0
    assert {p.suffix for p in written} >= {".json", ".md"}
    assert "| op | shape |" in (tmp_path / "sub" / "kernels-test-gpu.md").read_text()
    assert kb.write_results(rows, tmp_path / "k.json", meta, plot=False) == [tmp_path / "k.json", tmp_path / "k.md"]
