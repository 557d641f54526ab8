"""One-command GPU check: every Triton kernel against its PyTorch reference, training throughput, memory.

Made for a short loan of a CUDA GPU (a few minutes per command, no network, maybe no virtual environment
of ours and no SmolLM2 model file): one command, under 5 minutes on one H100/H200-class GPU, that writes
everything it measures to ``benchmarks/results/gpu-check.json`` as it goes (a killed run keeps what it had)
and prints a summary table at the end. From the repository root::

    python benchmarks/gpu_check.py                        # default budget: 270 s
    python benchmarks/gpu_check.py --quick                # fewer shapes and steps (~2 minutes)
    python benchmarks/gpu_check.py --budget-s 200 --output /tmp/gpu-check.json
    python benchmarks/gpu_check.py --sections kernels,smart_checkpointing

On a bare GPU machine (its own torch with CUDA, triton, transformers; no ``make setup``, which would install
the CPU build of torch), either install the repository without touching its packages or put it on the path::

    pip install -e . --no-deps && python benchmarks/gpu_check.py
    PYTHONPATH=. python benchmarks/gpu_check.py           # the script also adds the repository root itself

``make gpu-check`` runs the same inside our ``.venv``. Without CUDA it prints one line saying so and exits
with status 2 (nothing run, no file written).

Sections, in the order they run (each wrapped: an exception is recorded with its traceback and the others
still run):

1. ``kernels``: every op of ``kernels/`` on CUDA, compiled Triton (``TRITON_INTERPRET`` is removed from the
   environment before any kernel file is imported, ``ENGINE_KERNELS`` is unset, i.e. automatic), forward and
   gradients against its PyTorch reference in bf16 with the per-dtype tolerances of ``tests/kernels/op_testing.py``,
   at SmolLM2-135M shapes and (budget permitting) Llama-3.1-8B shapes: rms_norm, rope, swiglu, fused linear
   cross-entropy, token_log_probs, NF4 dequantization (bit-exact against the PyTorch path), lora_linear and the
   fused LoRA Functions (dense and NF4 base), the tiled MLP, flash attention varlen (packed documents, GQA,
   sliding window) and the attention dispatch. ``engine_kernels.dispatch.record_backends()`` shows which path each op
   took; each check records max abs / rel error, tolerance, pass/fail and the time (ms) of the op vs its reference.
2. ``training``: a randomly initialised SmolLM2-135M-shaped Llama (the published sizes from
   ``engine/memory/configs.py``), saved as a Hugging Face folder and loaded by ``FastModel.from_pretrained``,
   LoRA r=16 on all 7 projections, bf16, padding-free packed rows (position ids restarting per document),
   ~15 AdamW steps (the first 3 not timed), without and with gradient checkpointing: tokens/s, peak VRAM,
   MFU/HFU (``benchmarks/flops.py``). With ``trl`` (and ``peft``) installed, the same on the Hugging Face side
   (transformers + PEFT, position ids, no attention mask); otherwise recorded as skipped.
3. ``smart_checkpointing``: one step with ``use_gradient_checkpointing="smart"`` (layer inputs offloaded to
   pinned host memory on side streams) against plain checkpointing: loss and every LoRA gradient must be equal
   (bit-identical, or within 1e-6 relative), one input offloaded per layer, and the peak VRAM lower with smart.
4. ``long_context``: ``engine.estimate_memory`` for one long sequence (32,768 tokens; 16,384 with ``--quick``),
   smart checkpointing, then one real training step at that length: measured peak beside the plan, and the ratio.

The run stops starting optional parts (Llama-size kernel shapes, the Hugging Face side) when the time budget
(``--budget-s``) runs low, keeping time for the later sections, and records what it skipped. The exit status
is 0 when every check passed, 1 when a numeric check mismatched or a section raised, 2 without CUDA.

Without a GPU, ``tests/test_gpu_check.py`` runs the training and smart-checkpointing sections on a tiny model on the
CPU through a hidden ``--allow-cpu-dry-run`` flag (the kernel and long-context sections are then recorded as skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the repository's packages (engine, kernels) importable
    sys.path.insert(0, str(ROOT))

DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "gpu-check.json"
DRY_RUN_OUTPUT = ROOT / "benchmarks" / "results" / "gpu-check-cpu-dry-run.json"
DEFAULT_BUDGET_S = 270.0
NO_CUDA_EXIT = 2
MIB = 2**20

#: Section names, in the order they run.
SECTIONS = ("kernels", "training", "smart_checkpointing", "long_context")

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_R = 16
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M"

#: Per-dtype tolerances of ``tests/kernels/op_testing.py`` (kept equal by ``tests/test_gpu_check.py``):
#: ``|actual - expected| <= atol * scale + rtol * |expected|``, ``scale = max(1, max |expected|)``.
ATOL = {"torch.float32": 1e-5, "torch.bfloat16": 2e-2}
RTOL = {"torch.float32": 1e-5, "torch.bfloat16": 2e-2}
#: Both tolerances are multiplied by this for results of long reductions (matmuls, sums over rows).
REDUCTION_FACTOR = 2.0
#: Smart vs plain checkpointing: gradients must be bit-identical or this close (max |a - b| / max |b|).
SMART_GRAD_RTOL = 1e-6

#: Rough cost (seconds, cold Triton cache on an H100-class GPU) of each part, for the budget.
COST_S = {
    "kernel_check": 6.0,
    "model_folder": 10.0,
    "engine_mode": 20.0,
    "hf_mode": 25.0,
    "smart_checkpointing": 20.0,
    "long_context": 45.0,
}


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


# ============================================================================ results file


def _clean(obj: Any) -> Any:
    """``obj`` made JSON-safe: tuples/sets to lists, dtypes/devices/paths to strings, non-finite floats to strings."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_clean(v) for v in obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # 0-d tensors and numpy scalars
        return _clean(obj.item())
    return str(obj)


class Report:
    """The results file, rewritten atomically (temporary file + ``os.replace``) after every change.

    ``data`` holds ``environment``, ``sections`` (name -> dict with ``status``, ``checks``, ...) and
    ``skipped`` (what the budget or the machine left out, with the reason).
    """

    def __init__(self, path: str | os.PathLike, argv: Sequence[str] = ()):
        self.path = Path(path)
        self.data: dict[str, Any] = {
            "tool": "benchmarks/gpu_check.py",
            "schema": 1,
            "status": "running",
            "started": _now(),
            "finished": None,
            "argv": list(argv),
            "environment": {},
            "sections": {},
            "skipped": [],
        }

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(_clean(self.data), f, indent=2)
            f.write("\n")
        os.replace(tmp, self.path)

    def section(self, name: str) -> dict:
        """The dict of section ``name`` (created empty, status ``pending``, on first use)."""
        return self.data["sections"].setdefault(name, {"status": "pending", "checks": []})

    def add_check(self, section: str, check: dict) -> dict:
        """Append one check result to ``section`` and rewrite the file."""
        self.section(section).setdefault("checks", []).append(check)
        self.write()
        return check

    def skip(self, part: str, reason: str) -> None:
        """Record that ``part`` was not run, and why, and rewrite the file."""
        self.data["skipped"].append({"part": part, "reason": reason})
        self.write()


class Budget:
    """Wall-clock budget of the run; parts ask :meth:`allows` before starting.

    Args:
        seconds: the whole run's budget.
        clock: a monotonic clock (injectable for tests).
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = float(seconds)
        self.clock = clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, cost_s: float, reserve_s: float = 0.0) -> bool:
        """Whether a part of about ``cost_s`` seconds fits, keeping ``reserve_s`` for the parts after it."""
        return self.remaining() - reserve_s >= cost_s

    def reason(self, cost_s: float, reserve_s: float = 0.0) -> str:
        kept = f", {reserve_s:.0f} s kept for later sections" if reserve_s else ""
        return f"skipped: time budget (needs ~{cost_s:.0f} s, {max(self.remaining(), 0.0):.0f} s left{kept})"


def check_status(check: dict) -> str:
    """``ok``, ``failed`` (a comparison out of tolerance), ``error`` (raised), ``skipped`` or ``info``."""
    if check.get("error"):
        return "error"
    if check.get("skipped"):
        return "skipped"
    passed = check.get("passed")
    if passed is None:
        return "info"
    return "ok" if passed else "failed"


def section_status(section: dict) -> str:
    """A finished section's status from its checks: ``error`` > ``mismatch`` > ``ok``."""
    statuses = [check_status(c) for c in section.get("checks", [])]
    if "error" in statuses:
        return "error"
    if "failed" in statuses:
        return "mismatch"
    return "ok"


def _traceback_summary(exc: BaseException, limit: int = 12) -> list[str]:
    """The last frames of ``exc``'s traceback as ``file:line in function: code`` lines, then the error."""
    frames = traceback.extract_tb(exc.__traceback__)[-limit:]
    lines = [f"{Path(f.filename).name}:{f.lineno} in {f.name}: {(f.line or '').strip()}" for f in frames]
    return [*lines, f"{type(exc).__name__}: {str(exc)[:500]}"]


def error_record(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {str(exc)[:2000]}", "traceback": _traceback_summary(exc)}


def run_section(
    report: Report,
    name: str,
    fn: Callable[[dict], None],
    *,
    budget: Budget | None = None,
    cost_s: float = 0.0,
    reserve_s: float = 0.0,
    skip_reason: str | None = None,
    cleanup: Callable[[], None] | None = None,
) -> dict:
    """Run ``fn(section_dict)`` as section ``name``; an exception is recorded and does not propagate.

    The section's status becomes ``skipped`` (``skip_reason`` given, or the budget does not allow
    ``cost_s`` + ``reserve_s``), ``error`` (``fn`` raised, or one of its checks did), ``mismatch`` (a check
    out of tolerance) or ``ok``. The file is rewritten when the section starts and when it ends.
    """
    sec = report.section(name)
    if skip_reason is None and budget is not None and not budget.allows(cost_s, reserve_s):
        skip_reason = budget.reason(cost_s, reserve_s)
    if skip_reason is not None:
        sec.update(status="skipped", reason=skip_reason)
        report.skip(name, skip_reason)
        return sec
    sec.update(status="running", started=_now())
    report.write()
    t0 = time.perf_counter()
    try:
        fn(sec)
    except Exception as exc:  # noqa: BLE001 (recorded; the other sections still run)
        sec.update(status="error", **error_record(exc))
    else:
        sec["status"] = section_status(sec)
    finally:
        sec["seconds"] = round(time.perf_counter() - t0, 2)
        if cleanup is not None:
            with contextlib.suppress(Exception):
                cleanup()
        report.write()
    return sec


def exit_code(data: dict) -> int:
    """1 when a section errored or a check mismatched, else 0 (skipped parts are not failures)."""
    bad = [s for s in data.get("sections", {}).values() if s.get("status") in ("error", "mismatch", "running")]
    return 1 if bad else 0


# ============================================================================ comparisons and timing


def tolerances(dtype, reduction: bool = False) -> tuple[float, float]:
    """``(atol, rtol)`` of ``dtype`` as in the kernel tests, widened by :data:`REDUCTION_FACTOR` for reductions."""
    key = str(dtype)
    factor = REDUCTION_FACTOR if reduction else 1.0
    return ATOL[key] * factor, RTOL[key] * factor


def compare(actual, expected, dtype, *, reduction: bool = False, exact: bool = False) -> dict:
    """Compare two tensors like ``tests/kernels/op_testing.assert_close``, returning the numbers instead of raising.

    Args:
        actual, expected: tensors of one shape (and dtype).
        dtype: the dtype whose tolerances apply (the computation's dtype; a fp32 loss of a bf16 op uses bf16's).
        reduction: widen the tolerances for results of long reductions.
        exact: require bit-identical values (``torch.equal``), e.g. NF4 dequantization.

    Returns:
        dict: ``passed``, ``max_abs_err``, ``max_rel_err`` (max abs error / max |expected|), ``atol``, ``rtol``,
        ``scale``, ``bad`` (elements out of tolerance), ``numel``; ``error`` when shapes or dtypes differ.
    """
    import torch

    if actual is None or expected is None:
        return {"passed": False, "error": f"missing tensor (actual {actual is None}, expected {expected is None})"}
    if tuple(actual.shape) != tuple(expected.shape):
        return {"passed": False, "error": f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"}
    a, e = actual.detach().float(), expected.detach().float()
    diff = (a - e).abs()
    finite = torch.isfinite(diff)
    max_abs = float(diff[finite].max()) if bool(finite.any()) else float("nan")
    finite_e = e[torch.isfinite(e)]
    max_e = float(finite_e.abs().max()) if finite_e.numel() else 0.0
    scale = max(1.0, max_e)
    out: dict[str, Any] = {
        "max_abs_err": max_abs,
        "max_rel_err": max_abs / max_e if max_e > 0 else (0.0 if max_abs == 0 else float("inf")),
        "scale": scale,
        "numel": int(e.numel()),
    }
    if exact:
        same = actual.dtype == expected.dtype and bool(torch.equal(actual, expected))
        bad = 0 if same else int((a != e).sum())
        out.update(passed=same, atol=0.0, rtol=0.0, bad=bad if bad or same else 1, exact=True)
    else:
        atol, rtol = tolerances(dtype, reduction)
        allowed = atol * scale + rtol * e.abs()
        nan_mismatch = torch.isnan(a) != torch.isnan(e)
        inf_mismatch = (torch.isinf(a) | torch.isinf(e)) & (a != e)
        both_special = (torch.isnan(a) & torch.isnan(e)) | (torch.isinf(a) & (a == e))
        excess = torch.where(both_special, torch.zeros_like(diff), diff - allowed)
        bad = int(((excess > 0) | nan_mismatch | inf_mismatch).sum())
        out.update(passed=bad == 0, atol=atol, rtol=rtol, bad=bad)
    if actual.dtype != expected.dtype:
        out.update(passed=False, error=f"dtype {actual.dtype} != {expected.dtype}")
    return out


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device, *, warmup_ms: float = 10.0, rep_ms: float = 40.0) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA (CUDA events without triton),
    ``time.perf_counter`` elsewhere."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            result = do_bench(fn, warmup=int(warmup_ms), rep=int(rep_ms), quantiles=[0.5])
            return float(result[0] if isinstance(result, (list, tuple)) else result)
        fn()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        return float(statistics.median(times))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def free_memory(device=None) -> None:
    """Collect garbage and hand cached CUDA blocks back (between parts, so each measures its own memory).
    Without CUDA there is no device memory to measure, and nothing is done."""
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def env_var(name: str, value: str | None) -> Iterator[None]:
    """Set (or, with ``None``, remove) an environment variable inside the block."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# ============================================================================ environment


def package_version(name: str) -> str | None:
    """Installed version of a distribution (None when missing), without importing it."""
    from importlib import metadata

    for dist in (name, {"triton": "pytorch-triton"}.get(name)):
        if dist is None:
            continue
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _command_output(cmd: list[str], timeout: float = 10.0) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def environment(device, original_env: dict) -> dict:
    """Versions, the GPU and how the kernels will dispatch on it."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            name: package_version(name)
            for name in ("torch", "triton", "transformers", "peft", "trl", "accelerate", "safetensors", "flash-attn",
                         "xformers", "bitsandbytes", "numpy")
        },
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "original_env": original_env,
        "env_now": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "ENGINE_KERNELS", "CUDA_VISIBLE_DEVICES")},
        "git_commit": _command_output(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
        "device": str(device),
    }
    env["versions"]["torch"] = torch.__version__
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        env["gpu"] = {
            "name": torch.cuda.get_device_name(device),
            "capability": "{}.{}".format(*torch.cuda.get_device_capability(device)),
            "multiprocessors": props.multi_processor_count,
            "total_memory_mib": round(props.total_memory / MIB, 1),
            "driver_free_mib": round(free / MIB, 1),
            "driver_total_mib": round(total / MIB, 1),
            "device_count": torch.cuda.device_count(),
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "driver_version": _command_output(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"]
            ),
        }
    try:
        from engine_kernels._triton import HAS_TRITON, interpreting
        from engine_kernels.dispatch import describe_backends

        env["kernels"] = {
            "has_triton": HAS_TRITON,
            "triton_interpreter": interpreting(),
            "backends": describe_backends(device, torch.bfloat16),
        }
    except Exception as exc:  # noqa: BLE001 (recorded; the sections report their own errors)
        env["kernels"] = error_record(exc)
    return env


# ============================================================================ section 1: kernels


def _worst(values) -> float | None:
    """The largest of ``values`` (NaN counts as the largest; None entries are ignored)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return float("nan") if any(math.isnan(v) for v in values) else max(values)


def _tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _leaves(tensors, requires_grad=True):
    return [t.detach().clone().requires_grad_(requires_grad and t.is_floating_point()) for t in tensors]


def op_check(
    *,
    device,
    dtype,
    inputs: Sequence,
    forward: Callable[[list], Any],
    reference: Callable[[list], Any],
    out_names: Sequence[str],
    grad_outputs: Sequence | None = None,
    grad_names: Sequence[str] = (),
    reduction: Sequence[str] = (),
    expect_backends: dict[str, set[str]] | None = None,
    expect_function: type | None = None,
    exact: bool = False,
    extra_timings: dict[str, Callable[[list], Any]] | None = None,
    time_it: bool = True,
) -> dict:
    """Run ``forward`` (the op under test) and ``reference`` on twin copies of ``inputs``; compare and time them.

    ``inputs`` are tensors; floating ones in ``grad_names`` order receive gradients (``grad_outputs`` given).
    Returns the check's fields: ``comparisons`` (per output / gradient), ``backends`` (recorded by
    ``engine_kernels.dispatch.record_backends``), ``passed``, ``triton_ms`` / ``reference_ms`` (forward + backward).
    """
    import torch

    from engine_kernels.dispatch import record_backends

    want_grad = grad_outputs is not None
    xs = _leaves(inputs, want_grad)
    refs_in = _leaves(inputs, want_grad)
    diff_x = [t for t in xs if t.requires_grad]
    diff_r = [t for t in refs_in if t.requires_grad]

    with record_backends() as used:
        outs = _tuple(forward(xs))
        got = torch.autograd.grad(outs, diff_x, grad_outputs) if want_grad else ()
    refs = _tuple(reference(refs_in))
    want = torch.autograd.grad(refs, diff_r, grad_outputs) if want_grad else ()

    comparisons = {}
    for name, a, e in zip(out_names, outs, refs):
        comparisons[name] = compare(a, e, dtype, reduction=name in reduction, exact=exact)
    for name, a, e in zip(grad_names, got, want):
        comparisons[name] = compare(a, e, dtype, reduction=name in reduction, exact=exact)
    result: dict[str, Any] = {
        "dtype": str(dtype).replace("torch.", ""),
        "backends": {op: sorted(b) for op, b in used.items()},
        "comparisons": comparisons,
    }
    passed = all(c["passed"] for c in comparisons.values()) and len(comparisons) == len(out_names) + len(grad_names)
    problems = []
    for op, expected in (expect_backends or {}).items():
        if used.get(op) != set(expected):
            problems.append(f"{op} took {sorted(used.get(op, ())) or 'no dispatch'}, expected {sorted(expected)}")
    if expect_function is not None:
        fn_cls = getattr(getattr(outs[0], "grad_fn", None), "_forward_cls", None)
        result["autograd_function"] = getattr(fn_cls, "__name__", None)
        if fn_cls is not None and fn_cls is not expect_function:
            problems.append(f"output made by {fn_cls.__name__}, expected {expect_function.__name__}")
    if problems:
        result["backend_problems"] = problems
        passed = False
    result["passed"] = passed
    result["max_abs_err"] = _worst(c.get("max_abs_err") for c in comparisons.values())
    result["max_rel_err"] = _worst(c.get("max_rel_err") for c in comparisons.values())
    del outs, got, refs, want

    if time_it:
        def timed(fn, leaves, diff):
            def run():
                outs_ = _tuple(fn(leaves))
                if want_grad:
                    torch.autograd.grad(outs_, diff, grad_outputs)
            return run

        result["timing"] = "forward + backward" if want_grad else "forward"
        result["triton_ms"] = time_ms(timed(forward, xs, diff_x), device)
        result["reference_ms"] = time_ms(timed(reference, refs_in, diff_r), device)
        result["speedup_vs_reference"] = result["reference_ms"] / result["triton_ms"] if result["triton_ms"] else None
        for label, fn in (extra_timings or {}).items():
            result[f"{label}_ms"] = time_ms(timed(fn, refs_in, diff_r), device)
    return result


def _packed_positions(lengths: Sequence[int], device):
    import torch

    return torch.cat([torch.arange(n, device=device) for n in lengths])


def _cu_seqlens(lengths: Sequence[int], device):
    import itertools

    import torch

    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def kernel_cases(device, quick: bool = False, tiny: bool = False) -> tuple[list, list]:
    """``(required, optional)`` lists of ``(name, op, shape, run)`` kernel checks: SmolLM2-135M shapes (required),
    then Llama-3.1-8B ones (optional: run when the budget allows, none with ``quick``).

    ``tiny``: the same cases on a few dozen tokens and odd small sizes (to check the cases themselves on a CPU,
    under Triton's interpreter); the names still say ``smollm2`` / ``llama-3.1-8b``.
    """
    import torch

    from engine_kernels.attention import attention
    from engine_kernels.cross_entropy import (
        FusedLinearCrossEntropyTritonFunction,
        cross_entropy_reference,
        fused_linear_cross_entropy,
    )
    from engine_kernels.flash_attention import FlashAttentionFunction, flash_attention_reference, flash_attention_varlen
    from engine_kernels.lora_fused import (
        DequantWorkspace,
        LoRAMLPFunction,
        LoRAProjectionsFunction,
        Projection,
        lora_mlp,
        lora_o,
        lora_qkv,
        reference_mlp,
        reference_o,
        reference_qkv,
    )
    from engine_kernels.lora_linear import LoRALinearFunction, lora_linear, lora_linear_reference
    from engine_kernels.nf4 import _nf4_dequantize_torch, nf4_dequantize, nf4_quantize
    from engine_kernels.rms_norm import RMSNormTritonFunction, rms_norm, rms_norm_reference
    from engine_kernels.rope import RoPETritonFunction, rope, rope_cos_sin, rope_reference
    from engine_kernels.swiglu import SwiGLUTritonFunction, swiglu, swiglu_reference
    from engine_kernels.tiled_mlp import TiledMLPFunction, tiled_lora_mlp
    from engine_kernels.token_log_probs import linear_token_log_probs, token_log_probs_reference

    bf16 = torch.bfloat16
    gen = torch.Generator(device="cpu")

    def randn(*shape, scale=1.0, offset=0.0, dtype=bf16):
        return (torch.randn(*shape, generator=gen) * scale + offset).to(device=device, dtype=dtype)

    def labels(n, vocab, ignore_every=7):
        y = torch.randint(0, vocab, (n,), generator=gen)
        y[::ignore_every] = -100
        return y.to(device)

    def inv_freq(head_dim, theta):
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))

    triton = {"triton"}

    def rms_case(tokens, hidden):
        def run():
            gen.manual_seed(1)
            x, w = randn(tokens, hidden, scale=3.0, offset=0.5), randn(hidden, scale=0.1, offset=1.0)
            dy = randn(tokens, hidden)
            return op_check(device=device, dtype=bf16, inputs=[x, w],
                            forward=lambda t: rms_norm(t[0], t[1], 1e-5),
                            reference=lambda t: rms_norm_reference(t[0], t[1], 1e-5),
                            out_names=["y"], grad_outputs=[dy], grad_names=["dx", "dw"], reduction=["dw"],
                            expect_backends={"rms_norm": triton}, expect_function=RMSNormTritonFunction)
        return run

    def rope_case(docs, heads, kv_heads, head_dim, theta):
        def run():
            gen.manual_seed(2)
            tokens = sum(docs)
            pos = _packed_positions(docs, device)[None]
            cos, sin = rope_cos_sin(pos, inv_freq(head_dim, theta), 1.0, bf16)
            q, k = randn(1, tokens, heads, head_dim), randn(1, tokens, kv_heads, head_dim)
            dq, dk = randn(1, tokens, heads, head_dim), randn(1, tokens, kv_heads, head_dim)
            return op_check(device=device, dtype=bf16, inputs=[q, k],
                            forward=lambda t: rope(t[0], t[1], cos, sin),
                            reference=lambda t: rope_reference(t[0], t[1], cos, sin),
                            out_names=["q", "k"], grad_outputs=[dq, dk], grad_names=["dq", "dk"],
                            expect_backends={"rope": triton}, expect_function=RoPETritonFunction)
        return run

    def swiglu_case(tokens, inter):
        def run():
            gen.manual_seed(3)
            g, u, dh = randn(tokens, inter, scale=2.0), randn(tokens, inter), randn(tokens, inter)
            return op_check(device=device, dtype=bf16, inputs=[g, u],
                            forward=lambda t: swiglu(t[0], t[1]), reference=lambda t: swiglu_reference(t[0], t[1]),
                            out_names=["h"], grad_outputs=[dh], grad_names=["dgate", "dup"],
                            expect_backends={"swiglu": triton}, expect_function=SwiGLUTritonFunction)
        return run

    def ce_case(tokens, hidden, vocab):
        def run():
            gen.manual_seed(4)
            h, w, y = randn(tokens, hidden), randn(vocab, hidden, scale=0.02), labels(tokens, vocab)
            one = torch.ones((), device=device)
            return op_check(device=device, dtype=bf16, inputs=[h, w],
                            forward=lambda t: fused_linear_cross_entropy(t[0], t[1], y),
                            reference=lambda t: cross_entropy_reference(t[0], t[1], y),
                            out_names=["loss"], grad_outputs=[one], grad_names=["dhidden", "dweight"],
                            reduction=["loss", "dhidden", "dweight"], expect_backends={"cross_entropy": triton},
                            expect_function=FusedLinearCrossEntropyTritonFunction)
        return run

    def tlp_case(tokens, hidden, vocab):
        def run():
            gen.manual_seed(5)
            h, w, y = randn(tokens, hidden), randn(vocab, hidden, scale=0.02), labels(tokens, vocab, 5)
            g = randn(tokens, dtype=torch.float32)
            return op_check(device=device, dtype=bf16, inputs=[h, w],
                            forward=lambda t: linear_token_log_probs(t[0], t[1], y),
                            reference=lambda t: token_log_probs_reference(t[0], t[1], y),
                            out_names=["logp"], grad_outputs=[g], grad_names=["dhidden", "dweight"],
                            reduction=["logp", "dhidden", "dweight"],
                            expect_backends={"token_log_probs": {"torch"}})  # no Triton kernel: PyTorch on CUDA
        return run

    def nf4_case(out_f, in_f, double_quant, dtype):
        def run():
            gen.manual_seed(6)
            w = nf4_quantize(randn(out_f, in_f, scale=0.02), blocksize=64, double_quant=double_quant)
            return op_check(device=device, dtype=dtype, inputs=[],
                            forward=lambda t: nf4_dequantize(w, dtype),
                            reference=lambda t: _nf4_dequantize_torch(w, dtype, None),
                            out_names=["weight"], exact=True, expect_backends={"nf4_dequantize": triton})
        return run

    def projection(out_f, in_f, base, seed):
        gen.manual_seed(seed)
        w = randn(out_f, in_f, scale=in_f**-0.5)
        weight = w if base == "dense" else nf4_quantize(w, blocksize=64, double_quant=True)
        a, b = randn(LORA_R, in_f, scale=in_f**-0.5), randn(out_f, LORA_R, scale=0.5)  # B != 0: every gradient counts
        return weight, a, b

    def lora_linear_case(tokens, in_f, out_f, base):
        """One projection through engine_kernels.lora_linear, LoRA A/B in fp32 as the engine keeps them."""
        def run():
            weight, a, b = projection(out_f, in_f, base, 50)
            gen.manual_seed(51)
            x, dy = randn(tokens, in_f), randn(tokens, out_f)
            expect = {"lora_linear": {"torch"}} | ({"nf4_dequantize": triton} if base == "nf4" else {})
            return op_check(device=device, dtype=bf16, inputs=[x, a.float(), b.float()],
                            forward=lambda t: lora_linear(t[0], weight, None, t[1], t[2], 2.0 / LORA_R),
                            reference=lambda t: lora_linear_reference(t[0], weight, None, t[1], t[2], 2.0 / LORA_R),
                            out_names=["y"], grad_outputs=[dy], grad_names=["dx", "dA", "dB"],
                            reduction=["y", "dx", "dA", "dB"], expect_backends=expect,
                            expect_function=LoRALinearFunction)
        return run

    def lora_case(kind, tokens, d, q, kv, inter, base):
        scaling = 2.0 / LORA_R  # any non-trivial value

        def build(weights, t):
            return [Projection(wt, None, t[1 + 2 * i], t[2 + 2 * i], scaling) for i, wt in enumerate(weights)]

        def run():
            if kind == "qkv":
                parts = [projection(o, d, base, 10 + i) for i, o in enumerate((q, kv, kv))]
                x_dim, outs = d, ["q", "k", "v"]
            elif kind == "o":
                parts, x_dim, outs = [projection(d, q, base, 20)], q, ["o"]
            else:  # mlp, tiled
                shapes = ((inter, d), (inter, d), (d, inter))
                parts = [projection(o, i, base, 30 + k) for k, (o, i) in enumerate(shapes)]
                x_dim, outs = d, ["y"]
            weights = [p[0] for p in parts]
            lora = [t for p in parts for t in p[1:]]
            gen.manual_seed(40)
            x = randn(tokens, x_dim)
            workspace = DequantWorkspace()
            if kind == "qkv":
                fwd = lambda t: lora_qkv(t[0], *build(weights, t), workspace, training=True)
                ref = lambda t: reference_qkv(t[0], *build(weights, t))
                fn_cls = LoRAProjectionsFunction
            elif kind == "o":
                fwd = lambda t: lora_o(t[0], *build(weights, t), workspace, training=True)
                ref = lambda t: reference_o(t[0], *build(weights, t))
                fn_cls = LoRAProjectionsFunction
            elif kind == "mlp":
                fwd = lambda t: lora_mlp(t[0], *build(weights, t), workspace, training=True)
                ref = lambda t: reference_mlp(t[0], *build(weights, t))
                fn_cls = LoRAMLPFunction
            else:
                fwd = lambda t: tiled_lora_mlp(t[0], *build(weights, t), workspace, training=True,
                                               tile_rows=max(8, tokens // 4))
                ref = lambda t: reference_mlp(t[0], *build(weights, t))
                fn_cls = TiledMLPFunction
            gen.manual_seed(41)
            out_widths = {"qkv": (q, kv, kv), "o": (d,)}.get(kind, (d,))
            dys = [randn(tokens, w) for w in out_widths]
            projections = {"qkv": ("q", "k", "v"), "o": ("o",)}.get(kind, ("gate", "up", "down"))
            grad_names = ["dx"] + [f"{n}.{t}" for n in projections for t in ("dA", "dB")]
            expect = {"lora_linear": {"torch"}}
            if base == "nf4":
                expect["nf4_dequantize"] = triton
            if kind in ("mlp", "tiled"):
                expect["swiglu"] = triton
            return op_check(device=device, dtype=bf16, inputs=[x, *lora], forward=fwd, reference=ref,
                            out_names=outs, grad_outputs=dys, grad_names=grad_names,
                            reduction=[*outs, *grad_names], expect_backends=expect, expect_function=fn_cls)
        return run

    def flash_case(docs, heads, kv_heads, head_dim, window=None):
        def run():
            gen.manual_seed(7)
            total = sum(docs)
            q, k, v = randn(total, heads, head_dim), randn(total, kv_heads, head_dim), randn(total, kv_heads, head_dim)
            do = randn(total, heads, head_dim)
            cu, scale = _cu_seqlens(docs, device), head_dim**-0.5

            def sdpa(t):  # the PyTorch path of engine_kernels.attention (SDPA over the documents)
                with env_var("ENGINE_KERNELS", "torch"):
                    qb, kb, vb = (x.transpose(0, 1)[None] for x in t)
                    out = attention(qb, kb, vb, scale=scale, doc_lengths=tuple(docs), sliding_window=window)
                    return out[0].transpose(0, 1)

            result = op_check(
                device=device, dtype=bf16, inputs=[q, k, v],
                forward=lambda t: flash_attention_varlen(t[0], t[1], t[2], cu, max(docs), scale=scale,
                                                         sliding_window=window),
                reference=lambda t: flash_attention_reference(t[0], t[1], t[2], cu, scale=scale, sliding_window=window),
                out_names=["out"], grad_outputs=[do], grad_names=["dq", "dk", "dv"], reduction=["dq", "dk", "dv"],
                expect_function=FlashAttentionFunction, extra_timings={"torch_path": sdpa})
            result["path"] = "engine_kernels.flash_attention.flash_attention_varlen (Triton, called directly)"
            return result
        return run

    def dispatch_case(batch, docs, heads, kv_heads, head_dim, window, force):
        """engine_kernels.attention.attention (automatic or forced Triton) against its PyTorch (SDPA) path."""
        def run():
            from engine_kernels.dispatch import attention_backend

            gen.manual_seed(8)
            seq = sum(docs)
            q = randn(batch, heads, seq, head_dim)
            k, v = randn(batch, kv_heads, seq, head_dim), randn(batch, kv_heads, seq, head_dim)
            do = randn(batch, heads, seq, head_dim)
            scale = head_dim**-0.5
            if batch == 1:
                kwargs = {"doc_lengths": tuple(docs)}
            else:
                pos = _packed_positions(docs, device)[None].expand(batch, seq)
                kwargs = {"doc_ids": (pos == 0).cumsum(dim=1)}
            mode = "triton" if force else None

            def ours(t):
                with env_var("ENGINE_KERNELS", mode):
                    return attention(t[0], t[1], t[2], scale=scale, sliding_window=window, **kwargs)

            def torch_path(t):
                with env_var("ENGINE_KERNELS", "torch"):
                    return attention(t[0], t[1], t[2], scale=scale, sliding_window=window, **kwargs)

            with env_var("ENGINE_KERNELS", mode):
                expected_backend = attention_backend(device, bf16)
            result = op_check(device=device, dtype=bf16, inputs=[q, k, v], forward=ours, reference=torch_path,
                              out_names=["out"], grad_outputs=[do], grad_names=["dq", "dk", "dv"],
                              reduction=["out", "dq", "dk", "dv"],
                              expect_backends={"attention": {"triton"} if force else {expected_backend}})
            result["attention_backend"] = expected_backend
            result["reference_path"] = "ENGINE_KERNELS=torch (PyTorch SDPA)"
            return result
        return run

    smol = {"tokens": 4096, "hidden": 576, "heads": 9, "kv": 3, "hd": 64, "inter": 1536, "vocab": 49152, "theta": 1e5}
    llama = {"tokens": 2048, "hidden": 4096, "heads": 32, "kv": 8, "hd": 128, "inter": 14336, "vocab": 128256,
             "theta": 5e5}
    smol_docs = [1, 95, 700, 1300, 2000]  # 4096 tokens, a 1-token document included
    llama_docs = [100, 700, 1248]  # 2048 tokens
    rows_docs = [300, 724, 1024]  # two rows of 2048 tokens (b = 2: the document-id path)
    tlp_tokens, window, rows_window, llama_window = 2048, 256, 128, 512
    if tiny:
        smol = {"tokens": 48, "hidden": 80, "heads": 3, "kv": 1, "hd": 16, "inter": 56, "vocab": 300, "theta": 1e4}
        llama = {"tokens": 40, "hidden": 128, "heads": 4, "kv": 2, "hd": 32, "inter": 96, "vocab": 500, "theta": 5e5}
        smol_docs, llama_docs, rows_docs = [1, 7, 25, 15], [9, 31], [5, 11, 8]
        tlp_tokens, window, rows_window, llama_window = 32, 4, 6, 8
    s, ll = smol, llama
    cases = [
        ("rms_norm", "rms_norm", f"smollm2 {s['tokens']}x{s['hidden']}", rms_case(s["tokens"], s["hidden"])),
        ("rope", "rope", f"smollm2 {s['tokens']} tok, {s['heads']}/{s['kv']} heads x {s['hd']}, packed",
         rope_case(smol_docs, s["heads"], s["kv"], s["hd"], s["theta"])),
        ("swiglu", "swiglu", f"smollm2 {s['tokens']}x{s['inter']}", swiglu_case(s["tokens"], s["inter"])),
        ("cross_entropy", "cross_entropy", f"smollm2 {s['tokens']}x{s['hidden']} @ V={s['vocab']}",
         ce_case(s["tokens"], s["hidden"], s["vocab"])),
        ("token_log_probs", "token_log_probs", f"smollm2 {tlp_tokens}x{s['hidden']} @ V={s['vocab']}",
         tlp_case(tlp_tokens, s["hidden"], s["vocab"])),
        ("nf4_dequantize bf16 dq", "nf4_dequantize", f"smollm2 gate {s['inter']}x{s['hidden']} double-quant -> bf16",
         nf4_case(s["inter"], s["hidden"], True, bf16)),
        ("nf4_dequantize fp32", "nf4_dequantize", f"smollm2 q {s['hidden']}x{s['hidden']} -> fp32",
         nf4_case(s["hidden"], s["hidden"], False, torch.float32)),
        ("nf4_dequantize fp16 dq", "nf4_dequantize", f"smollm2 down {s['hidden']}x{s['inter']} double-quant -> fp16",
         nf4_case(s["hidden"], s["inter"], True, torch.float16)),
    ]
    for base in ("dense", "nf4"):
        dims = (s["tokens"], s["hidden"], s["heads"] * s["hd"], s["kv"] * s["hd"], s["inter"], base)
        cases += [
            (f"lora_{kind} {base}", "lora_fused", f"smollm2 {s['tokens']} tok, r={LORA_R}, {base} base",
             lora_case(kind, *dims))
            for kind in ("qkv", "o", "mlp")
        ]
    cases += [
        ("lora_linear nf4", "lora_linear", f"smollm2 q_proj {s['tokens']} tok, r={LORA_R} fp32 adapters, nf4 base",
         lora_linear_case(s["tokens"], s["hidden"], s["heads"] * s["hd"], "nf4")),
        ("tiled_mlp nf4", "tiled_mlp", f"smollm2 {s['tokens']} tok in 4 tiles, nf4 base",
         lora_case("tiled", s["tokens"], s["hidden"], 0, 0, s["inter"], "nf4")),
        ("flash_attention", "flash_attention", f"smollm2 docs {smol_docs}, {s['heads']}/{s['kv']} heads x {s['hd']}",
         flash_case(smol_docs, s["heads"], s["kv"], s["hd"])),
        ("flash_attention window", "flash_attention", f"smollm2 docs {smol_docs}, window {window}",
         flash_case(smol_docs, s["heads"], s["kv"], s["hd"], window=window)),
        ("attention dispatch auto", "attention", f"b=1 packed row, docs {smol_docs}",
         dispatch_case(1, smol_docs, s["heads"], s["kv"], s["hd"], None, force=False)),
        ("attention dispatch triton", "attention",
         f"b=2 packed rows (doc ids), docs {rows_docs}, window {rows_window}",
         dispatch_case(2, rows_docs, s["heads"], s["kv"], s["hd"], rows_window, force=True)),
    ]
    if quick:
        return cases, []
    optional = [
        ("rms_norm llama", "rms_norm", f"llama-3.1-8b {ll['tokens']}x{ll['hidden']}",
         rms_case(ll["tokens"], ll["hidden"])),
        ("rope llama", "rope", f"llama-3.1-8b {ll['tokens']} tok, {ll['heads']}/{ll['kv']} heads x {ll['hd']}",
         rope_case(llama_docs, ll["heads"], ll["kv"], ll["hd"], ll["theta"])),
        ("swiglu llama", "swiglu", f"llama-3.1-8b {ll['tokens']}x{ll['inter']}",
         swiglu_case(ll["tokens"], ll["inter"])),
        ("cross_entropy llama", "cross_entropy", f"llama-3.1-8b {ll['tokens']}x{ll['hidden']} @ V={ll['vocab']}",
         ce_case(ll["tokens"], ll["hidden"], ll["vocab"])),
        ("nf4_dequantize llama", "nf4_dequantize",
         f"llama-3.1-8b gate {ll['inter']}x{ll['hidden']} double-quant -> bf16",
         nf4_case(ll["inter"], ll["hidden"], True, bf16)),
        ("lora_mlp nf4 llama", "lora_fused", f"llama-3.1-8b {ll['tokens']} tok, r={LORA_R}, nf4 base",
         lora_case("mlp", ll["tokens"], ll["hidden"], 0, 0, ll["inter"], "nf4")),
        ("flash_attention llama", "flash_attention",
         f"llama-3.1-8b docs {llama_docs}, {ll['heads']}/{ll['kv']} x {ll['hd']}",
         flash_case(llama_docs, ll["heads"], ll["kv"], ll["hd"])),
        ("flash_attention window llama", "flash_attention", f"mistral-like docs {llama_docs}, window {llama_window}",
         flash_case(llama_docs, ll["heads"], ll["kv"], ll["hd"], window=llama_window)),
    ]
    return cases, optional


def section_kernels(sec: dict, ctx: Context) -> None:
    """Every kernel against its reference on CUDA (see the module docstring)."""
    from engine_kernels._triton import HAS_TRITON, interpreting

    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: the Triton kernels cannot run (pip install triton)")
    if interpreting():
        raise RuntimeError("TRITON_INTERPRET is on: the kernels would run in Triton's CPU interpreter")
    sec["tolerances"] = {"atol": ATOL, "rtol": RTOL, "reduction_factor": REDUCTION_FACTOR,
                         "rule": "|a - e| <= atol * max(1, max|e|) + rtol * |e| (tests/kernels/op_testing.py)"}
    required, optional_cases = kernel_cases(ctx.device, quick=ctx.args.quick)
    for i, (name, op, shape, run) in enumerate(required + optional_cases):
        optional = i >= len(required)
        reserve = ctx.reserve_after("kernels") if optional else 0.0
        check = {"name": name, "op": op, "shape": shape}
        if optional and not ctx.budget.allows(COST_S["kernel_check"], reserve):
            reason = ctx.budget.reason(COST_S["kernel_check"], reserve)
            ctx.report.add_check("kernels", {**check, "skipped": reason, "passed": None})
            ctx.report.skip(f"kernels/{name}", reason)
            continue
        t0 = time.perf_counter()
        try:
            check.update(run())
        except Exception as exc:  # noqa: BLE001 (one op's failure must not hide the others)
            check.update(passed=False, **error_record(exc))
        check["seconds"] = round(time.perf_counter() - t0, 2)
        ctx.report.add_check("kernels", check)
        free_memory()


# ============================================================================ model, data and training loops


def smollm2_config(tiny: bool = False):
    """A transformers ``LlamaConfig`` with SmolLM2-135M's published sizes (``tiny``: hidden 64, 2 layers, for CPU)."""
    import transformers

    from engine.memory.configs import KNOWN_CONFIGS

    fields = dict(KNOWN_CONFIGS[SMOLLM2][1])
    if tiny:
        fields.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return transformers.LlamaConfig(**fields)


def build_model_folder(config, folder: Path, dtype, seed: int = 0) -> Path:
    """Randomly initialise ``config`` as a transformers Llama (on the CPU, seeded) and save it as a model folder."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(str(folder))
    del model
    gc.collect()
    return folder


def packed_rows(n_rows: int, seq_len: int, vocab: int, min_doc: int, max_doc: int, device, seed: int = 0) -> list[dict]:
    """Padding-free rows ``[1, seq_len]`` of several synthetic documents each (position ids restart at 0).

    Labels are the input ids with every document's first token ignored (-100), for both sides alike.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_rows):
        lengths: list[int] = []
        while sum(lengths) < seq_len:
            n = int(torch.randint(min_doc, max_doc + 1, (1,), generator=g))
            lengths.append(min(n, seq_len - sum(lengths)))
        ids = torch.randint(0, vocab, (1, seq_len), generator=g)
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
        rows.append({
            "input_ids": ids.to(device),
            "position_ids": pos.to(device),
            "labels": ids.masked_fill(pos == 0, -100).to(device),
            "doc_lengths": lengths,
        })
    return rows


def _model_inputs(row: dict) -> dict:
    return {k: row[k] for k in ("input_ids", "position_ids", "labels")}


def load_engine_model(folder: Path, *, max_seq_length: int, dtype, device, checkpointing, lora_alpha: float = LORA_R):
    """``FastModel.from_pretrained`` + ``get_peft_model`` (LoRA r=16 on all 7 projections)."""
    from engine import FastModel

    model, _ = FastModel.from_pretrained(str(folder), max_seq_length=max_seq_length, dtype=dtype, device=device,
                                         verbose=False)
    return FastModel.get_peft_model(model, r=LORA_R, lora_alpha=lora_alpha, lora_dropout=0.0,
                                    target_modules=list(LORA_TARGETS), use_gradient_checkpointing=checkpointing)


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore(model, state: dict) -> None:
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])
    model.zero_grad(set_to_none=True)


def train_loop(loss_fn: Callable[[dict], Any], params, rows: list[dict], *, steps: int, warmup: int, device,
               lr: float = 2e-4) -> dict:
    """``steps`` AdamW steps over ``rows`` (cycled); times all, reports the ones after ``warmup``."""
    import torch

    device = torch.device(device)
    optimizer = torch.optim.AdamW(params, lr=lr)
    free_memory()
    cuda = device.type == "cuda"
    base = torch.cuda.memory_allocated(device) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, docs = [], [], []
    for step in range(steps):
        row = rows[step % len(rows)]
        _sync(device)
        t0 = time.perf_counter()
        loss = loss_fn(row)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        _sync(device)
        times.append(time.perf_counter() - t0)
        docs.append(row["doc_lengths"])
        del loss
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    del optimizer
    timed = times[warmup:] if len(times) > warmup else times
    timed_docs = docs[warmup:] if len(times) > warmup else docs
    tokens = sum(sum(d) for d in timed_docs)
    seconds = sum(timed)
    return {
        "steps": steps,
        "warmup_steps": warmup,
        "tokens_per_step": sum(rows[0]["doc_lengths"]),
        "median_step_s": statistics.median(timed),
        "tokens_per_s": tokens / seconds if seconds else None,
        "step_s": [round(t, 4) for t in times],
        "losses": losses,
        "losses_finite": all(math.isfinite(x) for x in losses),
        "peak_vram_mib": peak / MIB if peak is not None else None,
        "base_vram_mib": base / MIB if base is not None else None,
        "added_vram_mib": (peak - base) / MIB if peak is not None else None,
        "_timed_docs": timed_docs,
        "_timed_seconds": seconds,
    }


def efficiency(result: dict, model_args, ceiling: dict | None, checkpointed_layers: int) -> dict:
    """MFU / HFU of the timed steps against the measured model-shape ceiling (``benchmarks/flops.py``)."""
    from benchmarks.flops import step_flops

    docs, seconds = result.pop("_timed_docs"), result.pop("_timed_seconds")
    model = hardware = 0.0
    for lengths in docs:
        f = step_flops(model_args, lengths, lora_r=LORA_R, lora_targets=LORA_TARGETS,
                       checkpointed_layers=checkpointed_layers)
        model, hardware = model + f.model, hardware + f.hardware
    out = {"model_tflops_per_s": model / seconds / 1e12 if seconds else None,
           "hardware_tflops_per_s": hardware / seconds / 1e12 if seconds else None,
           "checkpointed_layers": checkpointed_layers}
    peak = (ceiling or {}).get("flops_per_s")
    if peak and seconds:
        out["mfu"] = model / seconds / peak
        out["hfu"] = hardware / seconds / peak
    return out


def expected_training_backends(device) -> dict[str, set[str]]:
    """What a CUDA training step must dispatch to (forward-recorded ops)."""
    import torch

    if torch.device(device).type != "cuda":
        return {}
    return {op: {"triton"} for op in ("rms_norm", "rope", "swiglu", "cross_entropy")} | {
        "attention": {"triton", "flash_attn", "xformers"}}


def _backend_problems(used: dict, expected: dict) -> list[str]:
    problems = []
    for op, allowed in expected.items():
        got = used.get(op, set())
        if not got or not got <= allowed:
            problems.append(f"{op} took {sorted(got) or 'no dispatch'}, expected one of {sorted(allowed)}")
    return problems


def section_training(sec: dict, ctx: Context) -> None:
    """The engine (without / with gradient checkpointing) and, with trl installed, Hugging Face on the same rows."""
    from benchmarks.flops import matmul_ceiling
    from engine import FastModel
    from engine_kernels.dispatch import record_backends

    a = ctx.args
    folder = ctx.model_folder()
    rows = ctx.rows()
    sec["setup"] = {"model": f"random {SMOLLM2}-shaped Llama" + (" (tiny CPU dry run)" if ctx.dry_run else ""),
                    "config": ctx.config_summary(), "lora": {"r": LORA_R, "alpha": LORA_R, "targets": LORA_TARGETS},
                    "dtype": str(ctx.dtype).replace("torch.", ""), "rows": len(rows), "seq_len": a.seq_len,
                    "doc_lengths": [r["doc_lengths"] for r in rows], "steps": a.steps, "warmup_steps": a.warmup_steps,
                    "optimizer": "torch.optim.AdamW lr 2e-4"}
    model = load_engine_model(folder, max_seq_length=a.seq_len, dtype=ctx.dtype, device=ctx.device,
                              checkpointing=False)
    args = model.args
    state = snapshot(model)
    try:
        tokens = sum(rows[0]["doc_lengths"])
        ceiling = matmul_ceiling(args, tokens, dtype=ctx.dtype, device=ctx.device, repeats=2 if ctx.dry_run else 5)
        sec["ceiling"] = {**ceiling, "tflops_per_s": ceiling["flops_per_s"] / 1e12}
    except Exception as exc:  # noqa: BLE001 (MFU is then missing, the throughput still counts)
        ceiling = None
        sec["ceiling"] = error_record(exc)
    ctx.report.write()

    first_losses = {}
    for mode in (False, True):
        name = f"engine checkpointing={mode}"
        reserve = ctx.reserve_after("training")
        if mode and not ctx.budget.allows(COST_S["engine_mode"], reserve):
            reason = ctx.budget.reason(COST_S["engine_mode"], reserve)
            ctx.report.add_check("training", {"name": name, "skipped": reason, "passed": None})
            ctx.report.skip(f"training/{name}", reason)
            continue
        check: dict[str, Any] = {"name": name, "side": "engine", "gradient_checkpointing": mode}
        try:
            restore(model, state)
            FastModel.set_gradient_checkpointing(model, mode)
            model.train()
            with record_backends() as used:
                result = train_loop(lambda row: model(**_model_inputs(row)).loss, trainable(model), rows,
                                    steps=a.steps, warmup=a.warmup_steps, device=ctx.device)
            result.update(efficiency(result, args, ceiling, args.num_layers if mode else 0))
            check.update(result)
            check["backends"] = {op: sorted(b) for op, b in used.items()}
            problems = _backend_problems(used, expected_training_backends(ctx.device))
            if problems:
                check["backend_problems"] = problems
            check["passed"] = result["losses_finite"] and not problems
            first_losses[mode] = result["losses"][0]
        except Exception as exc:  # noqa: BLE001
            check.update(passed=False, **error_record(exc))
        ctx.report.add_check("training", check)
    if len(first_losses) == 2:
        same = first_losses[False] == first_losses[True]
        ctx.report.add_check("training", {
            "name": "engine first-step loss equal with and without checkpointing", "passed": same,
            "losses": [first_losses[False], first_losses[True]]})
    model = state = None
    free_memory()
    hf_side(sec, ctx, args, ceiling)


def _hf_dtype_kwarg() -> str:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    version = package_version("transformers") or "0"
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def hf_side(sec: dict, ctx: Context, model_args, ceiling) -> None:
    """transformers + PEFT LoRA on the same rows (position ids, no attention mask), when trl is installed."""
    missing = [name for name in ("trl", "peft") if importlib.util.find_spec(name) is None]
    if missing:
        reason = f"skipped: {missing[0]} not installed"
        sec["hf"] = reason
        ctx.report.skip("training/hf", reason)
        return
    import peft
    import transformers

    a = ctx.args
    on_cuda = ctx.device.type == "cuda"
    attn = "flash_attention_2" if on_cuda and importlib.util.find_spec("flash_attn") is not None else "sdpa"
    sec["hf"] = {"attn_implementation": attn, "note": (
        "padding-free through position_ids without an attention mask; with sdpa, transformers builds a "
        "block-diagonal document mask from restarting position ids (recent versions; older ones attend across "
        "documents)")}
    rows = ctx.rows()
    for mode in (False,) if ctx.dry_run else (False, True):  # the dry run only proves the code path
        name = f"hf checkpointing={mode}"
        reserve = ctx.reserve_after("training")
        if not ctx.budget.allows(COST_S["hf_mode"], reserve):
            reason = ctx.budget.reason(COST_S["hf_mode"], reserve)
            ctx.report.add_check("training", {"name": name, "skipped": reason, "passed": None})
            ctx.report.skip(f"training/{name}", reason)
            continue
        check: dict[str, Any] = {"name": name, "side": "hf", "gradient_checkpointing": mode,
                                 "attn_implementation": attn}
        model = None
        try:
            free_memory()
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(ctx.model_folder()), attn_implementation=attn, **{_hf_dtype_kwarg(): ctx.dtype})
            model = model.to(device=ctx.device, dtype=ctx.dtype)
            model.config.use_cache = False
            if mode:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            config = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_R, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                                     bias="none", task_type="CAUSAL_LM")
            model = peft.get_peft_model(model, config)
            model.train()
            result = train_loop(lambda row, m=model: m(**_model_inputs(row), use_cache=False).loss, trainable(model),
                                rows, steps=a.steps, warmup=a.warmup_steps, device=ctx.device)
            result.update(efficiency(result, model_args, ceiling, model_args.num_layers if mode else 0))
            check.update(result)
            check["passed"] = result["losses_finite"]
        except Exception as exc:  # noqa: BLE001
            check.update(passed=False, **error_record(exc))
        finally:
            model = None
            free_memory()
        ctx.report.add_check("training", check)
    engine = {c["gradient_checkpointing"]: c for c in sec.get("checks", []) if c.get("side") == "engine"}
    hf = {c["gradient_checkpointing"]: c for c in sec.get("checks", []) if c.get("side") == "hf"}
    ratios = {}
    for mode in (False, True):
        e, h = engine.get(mode, {}), hf.get(mode, {})
        if e.get("tokens_per_s") and h.get("tokens_per_s"):
            ratios[f"checkpointing={mode}"] = {
                "tokens_per_s_engine_over_hf": e["tokens_per_s"] / h["tokens_per_s"],
                "peak_vram_engine_over_hf": (e["peak_vram_mib"] / h["peak_vram_mib"]
                                             if e.get("peak_vram_mib") and h.get("peak_vram_mib") else None)}
    if ratios:
        sec["engine_vs_hf"] = ratios


# ============================================================================ section 4: smart checkpointing


def _max_rel_diff(a, b) -> float:
    scale = float(b.abs().max())
    diff = float((a.float() - b.float()).abs().max())
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


@contextlib.contextmanager
def forced_offload_copy(enabled: bool) -> Iterator[None]:
    """CPU dry run: make smart checkpointing take its offload copy path (``_force_copy``) although the tensors
    already live in host memory, so its pack/unpack hooks run (plain copies, no streams).

    ``checkpoint_layer`` is replaced where the model looks it up: in :mod:`engine.modules.checkpointing` (called
    by the checkpointing policy) and, where the model imports it by name, in :mod:`engine.models.transformer`.
    """
    if not enabled:
        yield
        return
    from engine.models import transformer
    from engine.modules import checkpointing

    original = checkpointing.checkpoint_layer

    def forced(layer, x, ctx, *, offload, _force_copy=False):
        return original(layer, x, ctx, offload=offload, _force_copy=offload or _force_copy)

    patched = [m for m in (checkpointing, transformer) if getattr(m, "checkpoint_layer", None) is original]
    for module in patched:
        module.checkpoint_layer = forced
    try:
        yield
    finally:
        for module in patched:
            module.checkpoint_layer = original


@contextlib.contextmanager
def count_offloads() -> Iterator[dict]:
    """Count the tensors (and bytes) smart checkpointing's pack hook moves to host memory inside the block."""
    from engine.modules import checkpointing

    counts = {"tensors": 0, "bytes": 0}
    original = checkpointing._pack_to_host

    def counting(x):
        counts["tensors"] += 1
        counts["bytes"] += x.numel() * x.element_size()
        return original(x)

    checkpointing._pack_to_host = counting
    try:
        yield counts
    finally:
        checkpointing._pack_to_host = original


def section_smart(sec: dict, ctx: Context) -> None:
    """One step with smart checkpointing vs plain: equal loss and LoRA gradients, lower peak VRAM on CUDA."""
    import torch

    from engine import FastModel

    row = ctx.rows()[0]
    model = load_engine_model(ctx.model_folder(), max_seq_length=ctx.args.seq_len, dtype=ctx.dtype,
                              device=ctx.device, checkpointing=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B = 0 (the initialisation) would make every dA zero and hide differences
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    state = snapshot(model)
    cuda = ctx.device.type == "cuda"
    sec["setup"] = {"tokens": sum(row["doc_lengths"]), "documents": len(row["doc_lengths"]),
                    "layers": model.args.num_layers, "note": "each mode runs the step twice; the second is measured"}
    if not cuda:
        sec["setup"]["cpu"] = ("no CUDA: smart's offload copy path is forced (_force_copy: plain host copies, "
                               "no streams); no VRAM to measure")
    from engine_kernels.dispatch import attention_backend

    backend = attention_backend(ctx.device, ctx.dtype)
    # flash-attn's (and possibly xformers') backward accumulates dQ with atomics: gradients then differ from run
    # to run whatever the checkpointing. Our Triton kernel has no atomics, so it is used here when they are installed.
    pin = "triton" if backend in ("flash_attn", "xformers") else os.environ.get("ENGINE_KERNELS")
    sec["setup"]["attention_backend"] = "triton" if pin == "triton" else backend
    if pin == "triton":
        sec["setup"]["note_attention"] = (f"ENGINE_KERNELS=triton for this section: {backend}'s backward is not "
                                          "deterministic")
    runs: dict[str, dict] = {}
    with forced_offload_copy(not cuda), env_var("ENGINE_KERNELS", pin):
        for mode in (True, "smart"):
            FastModel.set_gradient_checkpointing(model, mode)
            model.train()
            for _ in range(2):
                restore(model, state)
                free_memory()
                base = torch.cuda.memory_allocated(ctx.device) if cuda else None
                if cuda:
                    torch.cuda.reset_peak_memory_stats(ctx.device)
                _sync(ctx.device)
                t0 = time.perf_counter()
                with count_offloads() as offloaded:
                    loss = model(**_model_inputs(row)).loss
                    loss.backward()
                _sync(ctx.device)
                seconds = time.perf_counter() - t0
                peak = torch.cuda.max_memory_allocated(ctx.device) if cuda else None
            label = "smart" if mode == "smart" else "plain"
            runs[label] = {
                "loss": loss.detach().float().cpu(),
                "grads": {n: p.grad.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                          if p.requires_grad and p.grad is not None},
                "step_s": seconds,
                "peak_vram_mib": peak / MIB if peak is not None else None,
                "peak_added_mib": (peak - base) / MIB if peak is not None else None,
                "offloaded_tensors": offloaded["tensors"],
                "offloaded_mib": offloaded["bytes"] / MIB,
            }
            del loss
            sec[label] = {k: v for k, v in runs[label].items() if k not in ("loss", "grads")} | {
                "loss": float(runs[label]["loss"])}
            ctx.report.write()
    model = state = None
    free_memory()

    plain, smart = runs["plain"], runs["smart"]
    layers = sec["setup"]["layers"]
    ctx.report.add_check("smart_checkpointing", {
        "name": "smart offloads one input per layer, plain none",
        "passed": smart["offloaded_tensors"] == layers and plain["offloaded_tensors"] == 0,
        "layers": layers, "smart_offloaded": smart["offloaded_tensors"], "plain_offloaded": plain["offloaded_tensors"],
        "smart_offloaded_mib": smart["offloaded_mib"]})
    loss_equal = bool(torch.equal(plain["loss"], smart["loss"]))
    loss_close = loss_equal or _max_rel_diff(smart["loss"], plain["loss"]) <= SMART_GRAD_RTOL
    ctx.report.add_check("smart_checkpointing", {
        "name": "loss equal (smart vs plain)", "passed": loss_close,
        "bit_identical": loss_equal, "losses": [float(plain["loss"]), float(smart["loss"])]})
    names = sorted(plain["grads"])
    identical = [n for n in names if n in smart["grads"] and torch.equal(plain["grads"][n], smart["grads"][n])]
    worst = max((_max_rel_diff(smart["grads"][n], plain["grads"][n]) for n in names if n in smart["grads"]),
                default=0.0)
    same_set = set(names) == set(smart["grads"]) and len(names) > 0
    ctx.report.add_check("smart_checkpointing", {
        "name": "LoRA gradients equal (smart vs plain)", "passed": same_set and worst <= SMART_GRAD_RTOL,
        "tensors": len(names), "bit_identical": len(identical), "max_rel_diff": worst, "rtol": SMART_GRAD_RTOL})
    if cuda:
        lower = smart["peak_vram_mib"] < plain["peak_vram_mib"]
        ctx.report.add_check("smart_checkpointing", {
            "name": "peak VRAM lower with smart", "passed": lower,
            "plain_peak_mib": plain["peak_vram_mib"], "smart_peak_mib": smart["peak_vram_mib"],
            "saved_mib": plain["peak_vram_mib"] - smart["peak_vram_mib"],
            "plain_step_s": plain["step_s"], "smart_step_s": smart["step_s"]})
    else:
        ctx.report.add_check("smart_checkpointing", {
            "name": "peak VRAM lower with smart", "passed": None, "skipped": "no CUDA: no VRAM to measure"})


# ============================================================================ section 3: long context


def section_long_context(sec: dict, ctx: Context) -> None:
    """The planner's peak for one long sequence beside one real training step at that length."""
    import torch

    import engine

    n = ctx.args.long_context
    config = ctx.config()
    t0 = time.perf_counter()
    estimate = engine.estimate_memory(config, max_seq_length=n, batch_size=1, lora_r=LORA_R, load_in_4bit=False,
                                      gradient_checkpointing="smart", device="cuda")
    sec["plan_seconds"] = round(time.perf_counter() - t0, 2)
    planned = estimate.as_dict()
    sec["planned"] = {k: (v / MIB if isinstance(v, int) else v) for k, v in planned.items() if k != "settings"}
    sec["planned"]["unit"] = "MiB"
    sec["plan_settings"] = planned.get("settings")
    ctx.report.write()

    free_memory()
    base = torch.cuda.memory_allocated(ctx.device)
    model = load_engine_model(ctx.model_folder(), max_seq_length=n, dtype=torch.bfloat16, device=ctx.device,
                              checkpointing="smart")
    model.train()
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False, fused=False)  # as the planner's "adamw"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.args.vocab_size, (1, n), generator=g).to(ctx.device)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    step()  # the first step allocates the optimizer states, as in the plan
    free_memory()
    torch.cuda.reset_peak_memory_stats(ctx.device)
    _sync(ctx.device)
    t1 = time.perf_counter()
    loss = step()
    _sync(ctx.device)
    seconds = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated(ctx.device) - base
    reserved = torch.cuda.max_memory_reserved(ctx.device)
    model = optimizer = params = ids = None
    free_memory()
    ratio = peak / estimate.total if estimate.total else None
    ctx.report.add_check("long_context", {
        "name": f"planned vs measured peak, {n} tokens, smart checkpointing", "passed": None,
        "tokens": n, "planned_total_mib": estimate.total / MIB, "measured_peak_mib": peak / MIB,
        "measured_over_planned": ratio, "planned_required_mib": estimate.required_bytes() / MIB,
        "max_reserved_mib": reserved / MIB, "step_s": seconds, "tokens_per_s": n / seconds if seconds else None,
        "loss": loss,
        "note": "measured: torch.cuda.max_memory_allocated during the second step minus what was allocated before "
                "the model was loaded; informational (not a pass/fail check)"})


# ============================================================================ orchestration


class Context:
    """What the sections share: arguments, device, budget, report, and the random model folder (built once)."""

    def __init__(self, args, device, dtype, report: Report, budget: Budget, dry_run: bool):
        self.args, self.device, self.dtype = args, device, dtype
        self.report, self.budget, self.dry_run = report, budget, dry_run
        self._config = None
        self._folder: Path | None = None
        self._tmp: str | None = None
        self._rows: list[dict] | None = None
        self.selected = list(SECTIONS)

    def config(self):
        if self._config is None:
            self._config = smollm2_config(tiny=self.dry_run)
        return self._config

    def config_summary(self) -> dict:
        c = self.config()
        return {k: getattr(c, k, None) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")}

    def model_folder(self) -> Path:
        if self._folder is None:
            self._tmp = tempfile.mkdtemp(prefix="gpu-check-model-")
            self._folder = build_model_folder(self.config(), Path(self._tmp), self.dtype)
        return self._folder

    def rows(self) -> list[dict]:
        if self._rows is None:
            a = self.args
            self._rows = packed_rows(a.rows, a.seq_len, self.config().vocab_size, a.min_doc, a.max_doc, self.device)
        return self._rows

    def reserve_after(self, section: str) -> float:
        """Seconds to keep for the selected sections after ``section`` (their required parts)."""
        later = self.selected[self.selected.index(section) + 1:] if section in self.selected else []
        cost = {"training": 2 * COST_S["engine_mode"], "smart_checkpointing": COST_S["smart_checkpointing"],
                "long_context": COST_S["long_context"], "kernels": 0.0}
        return sum(cost[s] for s in later if not (self.dry_run and s in ("kernels", "long_context")))

    def close(self) -> None:
        self._rows = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = self._folder = None


NO_CUDA_MESSAGE = (
    "gpu_check needs a CUDA GPU; none found (torch.cuda.is_available() is False{detail}): nothing was run and no "
    "result file was written. Run `python benchmarks/gpu_check.py` on a machine with an NVIDIA GPU."
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default=None, help=f"results JSON (default: {DEFAULT_OUTPUT.relative_to(ROOT)})")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="time budget in seconds; optional parts are skipped when it runs low (default 270)")
    p.add_argument("--quick", action="store_true",
                   help="SmolLM2 kernel shapes only, 8 training steps, 16,384-token long-context point")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of: {', '.join(SECTIONS)}")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per training run (default 15; quick 8)")
    p.add_argument("--warmup-steps", type=int, default=3, help="first steps left out of the timings")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per packed row (default 8192)")
    p.add_argument("--rows", type=int, default=4, help="distinct packed rows, cycled over the steps")
    p.add_argument("--min-doc", type=int, default=None, help="shortest synthetic document (default 64)")
    p.add_argument("--max-doc", type=int, default=None, help="longest synthetic document (default 2048)")
    p.add_argument("--long-context", type=int, default=None, help="tokens of the long-context point (default 32768)")
    p.add_argument("--allow-cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        p.error(f"unknown section(s) {unknown or args.sections!r}; choose from {', '.join(SECTIONS)}")
    args.sections = [s for s in SECTIONS if s in sections]
    dry = args.allow_cpu_dry_run
    defaults = {"steps": (3 if dry else 8 if args.quick else 15), "seq_len": (128 if dry else 8192),
                "min_doc": (16 if dry else 64), "max_doc": (48 if dry else 2048),
                "long_context": (16384 if args.quick else 32768)}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if dry:
        args.warmup_steps = min(args.warmup_steps, 1)
        args.rows = min(args.rows, 2)
    return args


def summary_table(data: dict) -> str:
    """The human-readable summary printed at the end."""
    env = data.get("environment", {})
    gpu = env.get("gpu", {})
    versions = env.get("versions", {})
    head = (f"gpu_check: {gpu.get('name', env.get('device', '?'))}"
            f"{' (sm ' + gpu['capability'] + ')' if gpu.get('capability') else ''}, torch {versions.get('torch')}, "
            f"triton {versions.get('triton')}, transformers {versions.get('transformers')}")
    lines = [head, "", "| section | status | seconds | checks ok / failed / error / skipped | notes |",
             "|---|---|---:|---|---|"]
    failures = []
    for name, sec in data.get("sections", {}).items():
        counts = {"ok": 0, "failed": 0, "error": 0, "skipped": 0}
        for c in sec.get("checks", []):
            st = check_status(c)
            if st in counts:
                counts[st] += 1
            if st in ("failed", "error"):
                failures.append((name, c))
        notes = _section_notes(name, sec)
        lines.append(f"| {name} | {sec.get('status')} | {sec.get('seconds', '')} | "
                     f"{counts['ok']} / {counts['failed']} / {counts['error']} / {counts['skipped']} | {notes} |")
        if sec.get("error"):
            failures.append((name, {"name": "(section)", "error": sec["error"]}))
    if failures:
        lines += ["", "Failures:"]
        for name, c in failures:
            detail = c.get("error") or "; ".join(
                [f"{k}: max abs {v.get('max_abs_err', float('nan')):.3g} (atol {v.get('atol')}, rtol {v.get('rtol')}, "
                 f"{v.get('bad')} bad)" for k, v in c.get("comparisons", {}).items() if not v.get("passed")]
                + c.get("backend_problems", []))
            lines.append(f"  {name} / {c.get('name')}: {detail or 'failed'}")
    if data.get("skipped"):
        lines += ["", "Skipped:"] + [f"  {s['part']}: {s['reason']}" for s in data["skipped"]]
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None or isinstance(value, str) else format(value, spec)


def _section_notes(name: str, sec: dict) -> str:
    checks = sec.get("checks", [])
    if sec.get("status") == "skipped":
        return sec.get("reason", "")
    if name == "kernels":
        timed = [c for c in checks if c.get("speedup_vs_reference")]
        if timed:
            speedups = [c["speedup_vs_reference"] for c in timed]
            return f"speedup vs reference {min(speedups):.2f}x..{max(speedups):.2f}x over {len(timed)} timed checks"
    if name == "training":
        parts = []
        for c in checks:
            if c.get("tokens_per_s"):
                parts.append(f"{c['name']}: {_fmt(c['tokens_per_s'], ',.0f')} tok/s, peak "
                             f"{_fmt(c.get('peak_vram_mib'), ',.0f')} MiB, MFU {_fmt(c.get('mfu'), '.0%')}")
        if isinstance(sec.get("hf"), str):
            parts.append(f"hf {sec['hf']}")
        return "; ".join(parts)
    if name == "smart_checkpointing":
        plain, smart = sec.get("plain", {}), sec.get("smart", {})
        if plain.get("peak_vram_mib") is not None and smart.get("peak_vram_mib") is not None:
            return f"peak {plain['peak_vram_mib']:,.0f} MiB plain -> {smart['peak_vram_mib']:,.0f} MiB smart"
    if name == "long_context":
        for c in checks:
            if c.get("measured_peak_mib") is not None:
                return (f"{c['tokens']} tokens: planned {c['planned_total_mib']:,.0f} MiB, measured "
                        f"{c['measured_peak_mib']:,.0f} MiB ({_fmt(c.get('measured_over_planned'), '.2f')}x)")
    return ""


def _prepare_environment() -> dict:
    """Compiled Triton, automatic dispatch: drop TRITON_INTERPRET and ENGINE_KERNELS before any kernel import."""
    original = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "ENGINE_KERNELS")}
    for key in original:
        os.environ.pop(key, None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return original


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; return the exit status (0 all passed, 1 a mismatch or an error, 2 no CUDA)."""
    args = parse_args(argv)
    budget = Budget(args.budget_s)  # counts from here, imports included
    original_env = _prepare_environment()
    try:
        import torch
    except ImportError as exc:
        print(NO_CUDA_MESSAGE.format(detail=f"; torch is not importable: {exc}"), file=sys.stderr)
        return NO_CUDA_EXIT
    dry_run = bool(args.allow_cpu_dry_run) and not torch.cuda.is_available()
    if not torch.cuda.is_available() and not dry_run:
        detail = "; this torch build has no CUDA support" if torch.version.cuda is None else ""
        print(NO_CUDA_MESSAGE.format(detail=detail), file=sys.stderr)
        return NO_CUDA_EXIT

    device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.float32 if dry_run else torch.bfloat16
    output = Path(args.output) if args.output else (DRY_RUN_OUTPUT if dry_run else DEFAULT_OUTPUT)
    report = Report(output, argv=list(sys.argv[1:] if argv is None else argv))
    report.data.update(budget_s=args.budget_s, quick=args.quick, dry_run=dry_run, sections_selected=args.sections)
    try:
        report.data["environment"] = environment(device, original_env)
    except Exception as exc:  # noqa: BLE001
        report.data["environment"] = {"device": str(device), **error_record(exc)}
    report.write()
    print(f"gpu_check: writing {output} as it goes (budget {args.budget_s:.0f} s)", flush=True)

    ctx = Context(args, device, dtype, report, budget, dry_run)
    ctx.selected = list(args.sections)
    runners = {
        "kernels": (section_kernels, 0.0),
        "training": (section_training, COST_S["model_folder"] + COST_S["engine_mode"]),
        "smart_checkpointing": (section_smart, COST_S["smart_checkpointing"]),
        "long_context": (section_long_context, COST_S["long_context"]),
    }
    try:
        for name in SECTIONS:
            fn, cost = runners[name]
            skip = None
            if name not in args.sections:
                skip = "skipped: not selected (--sections)"
            elif dry_run and name in ("kernels", "long_context"):
                skip = "skipped: no CUDA (CPU dry run)"
            print(f"gpu_check: {name} ...", flush=True)
            sec = run_section(report, name, lambda s, fn=fn: fn(s, ctx), budget=budget, cost_s=cost,
                              reserve_s=0.0, skip_reason=skip, cleanup=free_memory)
            print(f"gpu_check: {name}: {sec['status']} ({sec.get('seconds', 0)} s)", flush=True)
    finally:
        ctx.close()
        code = exit_code(report.data)
        interrupted = any(s.get("status") == "running" for s in report.data["sections"].values())
        report.data.update(status="interrupted" if interrupted else "done", finished=_now(),
                           elapsed_s=round(budget.elapsed(), 1), exit_code=code)
        report.write()
    print()
    print(summary_table(report.data))
    print(f"\nresults: {output}\nexit status {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
