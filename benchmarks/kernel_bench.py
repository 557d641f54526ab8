"""Kernel micro-benchmark: each op's PyTorch and Triton paths against the plain PyTorch reference.

Run from the repository root, on a machine with a CUDA GPU::

    python benchmarks/kernel_bench.py                                  # every op, Llama-3.1-8B and SmolLM2-135M shapes
    python benchmarks/kernel_bench.py --ops rms_norm,rope --dtype bf16
    python benchmarks/kernel_bench.py --out benchmarks/results/kernels-h100.json

For every op and model shape three providers are timed:

* ``reference``: the plain PyTorch ``*_reference`` function through autograd (what Hugging Face runs);
* ``torch``: the engine's PyTorch autograd Function (hand-written backward);
* ``triton``: the engine's Triton autograd Function;

in three modes: ``forward`` (with autograd recording, as in training), ``backward`` (the backward
alone, replayed on one retained graph) and ``full`` (forward + backward). Times are medians (and the
20th / 80th percentiles) of ``triton.testing.do_bench`` in milliseconds; memory is the peak allocated
on top of what was allocated before one full forward + backward. NF4 dequantization is forward only
and also reports bandwidth (bytes read and written / time). The fused cross-entropy computes its
gradients inside the forward (where a chunk's logits exist), so its ``forward`` holds most of its
work and its ``backward`` only scales the stored gradients; the reference materialises all ``[N, V]``
logits, which its peak memory shows.

Without a CUDA GPU nothing is timed and nothing is written: the script says so and exits with
status 0. Correctness of the kernels is covered on CPU by the interpreter tests (``pytest
tests/kernels``, Triton under ``TRITON_INTERPRET=1``) and, for GPU compilation, by ``python -m
engine_kernels.audit``.

Results: the table is printed and written with the run's metadata (GPU name, torch / triton
versions, date, rows) to ``benchmarks/results/kernels-<gpu>.json`` (``--out``), with ``.md``
(the table) and ``.png`` (speedups vs the reference) next to it.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import platform
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Not named benchmarks/kernels.py: run as a script, a file of that name would shadow the ``kernels`` package
# for every script in this folder.

import torch

from engine_kernels._triton import HAS_TRITON, interpreting
from engine_kernels.cross_entropy import (
    FusedLinearCrossEntropyFunction,
    FusedLinearCrossEntropyTritonFunction,
    cross_entropy_reference,
)
from engine_kernels.nf4 import NF4_CODE, NF4Weight, _nf4_dequantize_torch, nf4_quantize
from engine_kernels.nf4_triton import nf4_dequantize_triton
from engine_kernels.rms_norm import RMSNormFunction, RMSNormTritonFunction, rms_norm_reference
from engine_kernels.rope import RoPEFunction, RoPETritonFunction, rope_cos_sin, rope_reference
from engine_kernels.swiglu import SwiGLUFunction, SwiGLUTritonFunction, swiglu_reference

RESULTS = ROOT / "benchmarks" / "results"
MIB = 1024 * 1024

#: Ops this benchmark covers (the ops of :mod:`engine_kernels.dispatch` that have a Triton kernel).
OPS = ("rms_norm", "rope", "swiglu", "cross_entropy", "nf4_dequantize")
#: Providers, the first being the baseline of the speedups.
PROVIDERS = ("reference", "torch", "triton")
MODES = ("forward", "backward", "full")
DTYPES = MappingProxyType({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32})
#: ``triton.testing.do_bench`` quantiles: median first, then the 20th and 80th percentiles.
QUANTILES = (0.5, 0.2, 0.8)

NO_GPU_MESSAGE = (
    "GPU timings need a CUDA GPU: torch.cuda.is_available() is False on this machine, so no kernel was "
    "timed and no result file was written.\n"
    "Correctness of the kernels is covered without a GPU by the interpreter tests "
    "(`python -m pytest tests/kernels`, Triton under TRITON_INTERPRET=1) and their compilation for GPU "
    "targets by `python -m engine_kernels.audit`."
)


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of one model that the ops see, and the batch they are benchmarked on."""

    name: str
    batch: int
    seq: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    nf4_blocksize: int = 64

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


#: Real model shapes, 4096 tokens per batch.
MODELS: tuple[ModelShape, ...] = (
    ModelShape("llama-3.1-8b", batch=1, seq=4096, hidden=4096, intermediate=14336, heads=32, kv_heads=8,
               head_dim=128, vocab=128256, rope_theta=500000.0),
    ModelShape("smollm2-135m", batch=4, seq=1024, hidden=576, intermediate=1536, heads=9, kv_heads=3,
               head_dim=64, vocab=49152, rope_theta=100000.0),
)


@dataclass(frozen=True)
class Case:
    """One op on one shape: a forward closure per provider over shared inputs.

    Attributes:
        op, shape: what the table shows.
        providers: ``{provider: fn}``; ``fn()`` runs the forward on :attr:`inputs` (autograd recording
            when they require grad) and returns a tensor or a tuple of tensors.
        inputs: the leaf tensors that receive gradients (cleared between timed calls).
        grad_outputs: one gradient per output for the backward; None for a forward-only op.
        bytes_moved: bytes one forward reads and writes (for the bandwidth column), or None.
    """

    op: str
    shape: str
    providers: dict[str, Callable[[], Any]]
    inputs: tuple[torch.Tensor, ...] = ()
    grad_outputs: tuple[torch.Tensor, ...] | None = None
    bytes_moved: int | None = None

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES if self.grad_outputs is not None else ("forward",)


@dataclass
class Row:
    """One table row: one provider timed in one mode on one case."""

    op: str
    shape: str
    mode: str
    provider: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    speedup: float | None = None
    peak_mib: float | None = None
    gbps: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- cases


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    return HAS_TRITON and (device.type == "cuda" or interpreting())


def _randn(shape, dtype, device, gen, scale=1.0, offset=0.0, requires_grad=False) -> torch.Tensor:
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(scale).add_(offset).to(dtype)
    return t.requires_grad_(requires_grad)


def nf4_dequantize_naive(w: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """Straightforward PyTorch dequantization, the formula of :mod:`engine_kernels.nf4` op by op.

    Unpacks the nibbles (high first), looks up ``NF4_CODE``, repeats each block scale over its block,
    multiplies in fp32 and casts: the temporaries a direct implementation makes.
    """
    n = w.numel
    device = w.packed.device
    packed = w.packed.reshape(-1)
    codes = torch.stack((packed >> 4, packed & 0xF), dim=-1).reshape(-1)[:n].long()
    values = NF4_CODE.to(device)[codes]
    scales = w.block_absmax().to(device=device, dtype=torch.float32).repeat_interleave(w.blocksize)[:n]
    return (values * scales).to(dtype).reshape(w.shape)


def make_case(op: str, shape: ModelShape, dtype: torch.dtype, device: torch.device | str,
              train_weights: bool = False, seed: int = 0) -> Case:
    """Build the inputs of ``op`` at ``shape`` and the forward closure of each provider.

    Args:
        op: one of :data:`OPS`.
        shape: the model dimensions (tiny ones work too, e.g. on CPU for tests).
        dtype: activation / weight dtype.
        device: where the tensors live. The ``triton`` provider is included when Triton can run there
            (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        train_weights: also compute gradients of the RMSNorm weight and of ``lm_head`` (LoRA freezes both,
            the default).
        seed: of the random inputs.

    Returns:
        A :class:`Case`.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with_triton = _triton_usable(device)
    b, s, t = shape.batch, shape.seq, shape.tokens

    if op == "rms_norm":
        x = _randn((b, s, shape.hidden), dtype, device, gen, requires_grad=True)
        w = _randn((shape.hidden,), dtype, device, gen, scale=0.1, offset=1.0, requires_grad=train_weights)
        eps = shape.rms_eps
        providers = {
            "reference": lambda: rms_norm_reference(x, w, eps),
            "torch": lambda: RMSNormFunction.apply(x, w, eps),
            "triton": lambda: RMSNormTritonFunction.apply(x, w, eps),
        }
        inputs = (x, w) if train_weights else (x,)
        grads = (_randn((b, s, shape.hidden), dtype, device, gen),)
        label = f"{shape.name}: {t}x{shape.hidden}"
    elif op == "rope":
        d = shape.head_dim
        q = _randn((b, s, shape.heads, d), dtype, device, gen, requires_grad=True)
        k = _randn((b, s, shape.kv_heads, d), dtype, device, gen, requires_grad=True)
        positions = torch.arange(s, device=device).expand(b, s)
        inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        cos, sin = rope_cos_sin(positions, inv_freq, 1.0, dtype)
        providers = {
            "reference": lambda: rope_reference(q, k, cos, sin),
            "torch": lambda: RoPEFunction.apply(q, k, cos, sin),
            "triton": lambda: RoPETritonFunction.apply(q, k, cos, sin),
        }
        inputs = (q, k)
        grads = (_randn(q.shape, dtype, device, gen), _randn(k.shape, dtype, device, gen))
        label = f"{shape.name}: {b}x{s}, q {shape.heads}x{d}, k {shape.kv_heads}x{d}"
    elif op == "swiglu":
        gate = _randn((b, s, shape.intermediate), dtype, device, gen, requires_grad=True)
        up = _randn((b, s, shape.intermediate), dtype, device, gen, requires_grad=True)
        providers = {
            "reference": lambda: swiglu_reference(gate, up),
            "torch": lambda: SwiGLUFunction.apply(gate, up),
            "triton": lambda: SwiGLUTritonFunction.apply(gate, up),
        }
        inputs = (gate, up)
        grads = (_randn(gate.shape, dtype, device, gen),)
        label = f"{shape.name}: {t}x{shape.intermediate}"
    elif op == "cross_entropy":
        hidden = _randn((t, shape.hidden), dtype, device, gen, requires_grad=True)
        weight = _randn((shape.vocab, shape.hidden), dtype, device, gen, scale=0.02, requires_grad=train_weights)
        labels = torch.randint(0, shape.vocab, (t,), generator=gen, device=device)

        def fused(function):
            # Arguments: ignore_index, reduction, softcap, num_items_in_batch, chunk_size, grad_enabled.
            return lambda: function.apply(hidden, weight, labels, -100, "mean", None, None, None,
                                          torch.is_grad_enabled())

        providers = {
            "reference": lambda: cross_entropy_reference(hidden, weight, labels),
            "torch": fused(FusedLinearCrossEntropyFunction),
            "triton": fused(FusedLinearCrossEntropyTritonFunction),
        }
        inputs = (hidden, weight) if train_weights else (hidden,)
        grads = (torch.ones((), dtype=torch.float32, device=device),)
        label = f"{shape.name}: {t}x{shape.hidden} @ {shape.vocab}"
    elif op == "nf4_dequantize":
        dense = _randn((shape.intermediate, shape.hidden), torch.float32, device, gen, scale=0.02)
        w = nf4_quantize(dense, blocksize=shape.nf4_blocksize, double_quant=True)
        del dense
        n = w.numel
        out_bytes = n * torch.empty((), dtype=dtype).element_size()
        providers = {
            "reference": lambda: nf4_dequantize_naive(w, dtype),
            "torch": lambda: _nf4_dequantize_torch(w, dtype, None),
            "triton": lambda: nf4_dequantize_triton(w, dtype, torch.empty(w.shape, dtype=dtype, device=device)),
        }
        return Case(op, f"{shape.name}: {shape.intermediate}x{shape.hidden} b{w.blocksize} dq",
                    _only_usable(providers, with_triton), bytes_moved=w.nbytes + out_bytes)
    else:
        raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    return Case(op, label, _only_usable(providers, with_triton), inputs, grads)


def _only_usable(providers: dict[str, Callable], with_triton: bool) -> dict[str, Callable]:
    return {name: fn for name, fn in providers.items() if with_triton or name != "triton"}


def run_provider(case: Case, provider: str) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
    """One forward (and backward, unless forward-only) of ``provider``: ``(outputs, input gradients)``, detached.

    The inputs' gradients are cleared before and after, so providers can be compared one after another.
    """
    for x in case.inputs:
        x.grad = None
    outputs = _as_tuple(case.providers[provider]())
    if case.grad_outputs is not None:
        torch.autograd.backward(outputs, case.grad_outputs)
    grads = tuple(None if x.grad is None else x.grad.detach().clone() for x in case.inputs)
    for x in case.inputs:
        x.grad = None
    return tuple(o.detach() for o in outputs), grads


# --------------------------------------------------------------------------- measurement


def do_bench_timer(fn: Callable[[], Any], grad_to_none: Sequence[torch.Tensor] | None, warmup: int = 25,
                   rep: int = 100) -> tuple[float, float, float]:
    """``(median, p20, p80)`` milliseconds of ``fn`` by ``triton.testing.do_bench`` (CUDA only)."""
    from triton.testing import do_bench

    times = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=list(grad_to_none) or None, quantiles=list(QUANTILES))
    return tuple(float(v) for v in times)


def cuda_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by ``step`` on top of what was allocated before it (CUDA only)."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _device_of(case: Case) -> torch.device:
    if case.inputs:
        return case.inputs[0].device
    if case.grad_outputs:
        return case.grad_outputs[0].device
    return torch.device("cuda")


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _time_mode(case: Case, fn: Callable, mode: str, timer: Callable, full: Callable) -> tuple[float, float, float]:
    """``timer`` on the forward, the backward alone, or both (``full``)."""
    if mode == "forward":
        return timer(fn, case.inputs)
    if mode == "full":
        return timer(full, case.inputs)
    # Backward alone: one graph, replayed. retain_graph keeps its saved tensors; grad_to_none resets the
    # leaves' gradients before each call, so every call writes them afresh (no accumulation).
    outputs = _as_tuple(fn())
    return timer(lambda: torch.autograd.backward(outputs, case.grad_outputs, retain_graph=True), case.inputs)


def bench_provider(case: Case, provider: str, timer: Callable, memory: Callable) -> list[Row]:
    """Rows of one provider on ``case``: one per mode, the peak memory on the ``full`` (or only) mode.

    Args:
        timer: ``timer(fn, grad_to_none) -> (median, p20, p80)`` in ms (:func:`do_bench_timer`).
        memory: ``memory(step) -> bytes`` (peak of one full step, e.g. :func:`cuda_peak_bytes`).
    """
    fn = case.providers[provider]
    inputs = list(case.inputs)
    rows = []

    def clear_grads():
        for x in inputs:
            x.grad = None

    def full():
        outputs = _as_tuple(fn())
        if case.grad_outputs is not None:
            torch.autograd.backward(outputs, case.grad_outputs)

    for mode in case.modes:
        row = Row(case.op, case.shape, mode, provider)
        rows.append(row)
        try:
            row.median_ms, row.p20_ms, row.p80_ms = _time_mode(case, fn, mode, timer, full)
            clear_grads()
            if mode == case.modes[-1]:
                row.peak_mib = memory(full) / MIB
            if case.bytes_moved is not None and mode == "forward":
                row.gbps = case.bytes_moved / (row.median_ms * 1e-3) / 1e9
                row.extra["bytes_moved"] = case.bytes_moved
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc):
                raise
            row.median_ms = row.p20_ms = row.p80_ms = row.peak_mib = row.gbps = None
            row.error = "out of memory"
        finally:
            clear_grads()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def bench_case(case: Case, timer: Callable | None = None, memory: Callable | None = None) -> list[Row]:
    """Time every provider of ``case`` in every mode it has; speedups are vs the ``reference`` provider.

    ``timer`` and ``memory`` default to :func:`do_bench_timer` and :func:`cuda_peak_bytes` (a GPU).
    """
    timer = timer or do_bench_timer
    if memory is None:
        memory = functools.partial(cuda_peak_bytes, device=_device_of(case))
    rows = [row for provider in case.providers for row in bench_provider(case, provider, timer, memory)]
    return add_speedups(rows)


def add_speedups(rows: list[Row]) -> list[Row]:
    """Set each row's ``speedup`` to reference median / its median on the same op, shape and mode."""
    baseline = {(r.op, r.shape, r.mode): r.median_ms for r in rows if r.provider == PROVIDERS[0]}
    for r in rows:
        ref = baseline.get((r.op, r.shape, r.mode))
        r.speedup = ref / r.median_ms if ref and r.median_ms else None
    return rows


# --------------------------------------------------------------------------- reporting

TABLE_COLUMNS = ("op", "shape", "mode", "provider", "median ms", "speedup vs reference", "peak MiB", "GB/s")


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table (:data:`TABLE_COLUMNS`); blank cells where a value does not apply."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        cells = [
            r.op,
            r.shape,
            r.mode,
            r.provider,
            r.error or ("" if r.median_ms is None else f"{r.median_ms:.3f}"),
            "" if r.speedup is None else f"{r.speedup:.2f}x",
            "" if r.peak_mib is None else f"{r.peak_mib:,.1f}",
            "" if r.gbps is None else f"{r.gbps:,.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gpu_slug(name: str) -> str:
    """File-name form of a GPU name: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def plot_speedups(rows: Sequence[Row], path: Path) -> bool:
    """Bar chart of the speedups vs the reference, one panel per mode; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    others = [p for p in PROVIDERS[1:] if any(r.provider == p for r in rows)]
    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    fig, axes = plt.subplots(len(modes), 1, figsize=(12, 3.5 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        cases = list(dict.fromkeys((r.op, r.shape) for r in rows if r.mode == mode))
        width = 0.8 / max(len(others), 1)
        for i, provider in enumerate(others):
            values = {(r.op, r.shape): r.speedup for r in rows if r.mode == mode and r.provider == provider}
            xs = [j + (i - (len(others) - 1) / 2) * width for j in range(len(cases))]
            bars = ax.bar(xs, [values.get(c) or 0.0 for c in cases], width, label=provider)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{op}\n{shape}" for op, shape in cases], fontsize=7)
        ax.set_ylabel("speedup vs reference")
        ax.set_title(mode)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(rows: Sequence[Row], out: Path, meta: dict[str, Any], plot: bool = True) -> list[Path]:
    """Write the JSON (metadata and rows), the markdown table and the chart; return the files written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2))
    md = out.with_suffix(".md")
    md.write_text(f"# Kernel benchmark on {meta['gpu']}\n\ndtype {meta['dtype']}, torch {meta['torch']}, "
                  f"triton {meta['triton']}, {meta['date']}\n\n{format_table(rows)}\n")
    written = [out, md]
    png = out.with_suffix(".png")
    if plot and plot_speedups(rows, png):
        written.append(png)
    return written


# --------------------------------------------------------------------------- CLI


def _csv(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(value: str) -> list[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        unknown = [v for v in items if v not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"unknown {unknown or value!r}; choose from {', '.join(allowed)}")
        return items

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", type=_csv(OPS), default=list(OPS), help=f"comma-separated, of: {', '.join(OPS)}")
    p.add_argument("--models", type=_csv([m.name for m in MODELS]), default=[m.name for m in MODELS],
                   help="comma-separated model shapes, of: " + ", ".join(m.name for m in MODELS))
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/kernels-<gpu>.json)")
    p.add_argument("--train-weights", action="store_true",
                   help="also compute the RMSNorm weight and lm_head gradients (LoRA freezes them)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    return p.parse_args(argv)


def _cannot_time_reason() -> str | None:
    """Why GPU timings cannot be taken here, or None when they can."""
    if not torch.cuda.is_available():
        return NO_GPU_MESSAGE
    if not HAS_TRITON:
        return "triton is not installed: the Triton providers and triton.testing.do_bench need it (pip install triton)."
    if interpreting():
        return "TRITON_INTERPRET is set: Triton kernels would run in the CPU interpreter; unset it to time them."
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status (0 also when there is no GPU: nothing to time)."""
    args = parse_args(argv)
    reason = _cannot_time_reason()
    if reason is not None:
        print(reason)
        return 0 if not torch.cuda.is_available() else 1

    import triton

    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    gpu = torch.cuda.get_device_name(device)
    out = Path(args.out) if args.out else RESULTS / f"kernels-{gpu_slug(gpu)}.json"
    timer = functools.partial(do_bench_timer, warmup=args.warmup, rep=args.rep)
    shapes = [m for m in MODELS if m.name in args.models]
    print(f"{gpu}: ops {', '.join(args.ops)}; shapes {', '.join(m.name for m in shapes)}; {args.dtype}", flush=True)

    rows: list[Row] = []
    for op in args.ops:
        for shape in shapes:
            case = make_case(op, shape, dtype, device, train_weights=args.train_weights)
            print(f"  {op} {case.shape}", flush=True)
            rows += bench_case(case, timer=timer)
            del case
            gc.collect()
            torch.cuda.empty_cache()

    print("\n" + format_table(rows))
    meta = {
        "gpu": gpu,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "dtype": args.dtype,
        "train_weights": args.train_weights,
        "do_bench": {"warmup_ms": args.warmup, "rep_ms": args.rep, "quantiles": list(QUANTILES)},
        "shapes": [asdict(m) for m in shapes],
        "notes": "median/p20/p80 in ms from triton.testing.do_bench; peak_mib: peak allocated above the "
                 "allocation before one full forward+backward; speedup: reference median / median.",
    }
    written = write_results(rows, out, meta, plot=not args.no_plot)
    print("\nwritten: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
