"""Built-in benchmarking: per-step wall time, trained tokens per second and peak memory.

Every engine trainer installs :class:`TrainingReport`. At the end of training it prints a
summary table and writes ``training_report.json`` into ``output_dir``.

How memory is measured:

* **CUDA**: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` over the training
  run (the peak counters are reset when training starts).
* **CPU** (Linux): the process's peak resident set size during training. When training starts
  the kernel's high-water mark is reset (``echo 5 > /proc/self/clear_refs``), and at the end
  ``VmHWM`` from ``/proc/self/status`` is read: the true peak of physical memory the process
  used, sampled by the kernel itself, not by polling. ``peak_rss_delta`` subtracts the
  resident size just before training (model, data and libraries already loaded), i.e. the
  memory training itself added: activations, gradients, optimizer states, temporaries.
  Where ``clear_refs`` is unavailable, the high-water mark since process start is reported
  and ``memory_method`` says so.

Gradient checkpointing: the trainer records which policy it trains with and why (for ``"auto"``: the
planned peak of each policy tried and the memory budget), as ``checkpointing`` in the summary.

Step times: on CUDA, CUDA events recorded at the start and end of each optimizer step (the end
event is waited for, so asynchronous kernels count in the step that launched them); on CPU,
``time.perf_counter`` around the step. ``benchmarks/run.py`` leaves out warm-up steps.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from engine.files import write_text

MIB = 1024 * 1024
REPORT_FILENAME = "training_report.json"


def _proc_status_kib(key: str) -> int | None:
    """A ``kB`` value from ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or ``None`` off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


class PeakMemoryMeter:
    """Peak memory of this process between :meth:`start` and :meth:`stop` (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.method = ""
        self.start_rss = 0

    def start(self) -> None:
        self.start_rss = (_proc_status_kib("VmRSS") or 0) * 1024
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated / max_memory_reserved"
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "peak RSS (VmHWM after resetting it via /proc/self/clear_refs)"
        except OSError:
            self.method = "peak RSS since process start (VmHWM; /proc/self/clear_refs not writable)"

    def stop(self) -> dict:
        """``{"peak_memory_bytes", ...}``; on CPU also the RSS at start and the delta."""
        result = {"memory_method": self.method}
        peak_rss = (_proc_status_kib("VmHWM") or 0) * 1024
        result["peak_rss_bytes"] = peak_rss
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
            result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        else:
            result["peak_memory_bytes"] = peak_rss
            result["rss_at_start_bytes"] = self.start_rss
            result["peak_rss_delta_bytes"] = max(0, peak_rss - self.start_rss)
        return result


@dataclass
class StepRecord:
    step: int
    seconds: float
    tokens: int
    loss: float | None = None


@dataclass
class ReportSummary:
    """What :class:`TrainingReport` writes to ``training_report.json``."""

    steps: int
    total_seconds: float
    median_step_seconds: float
    trained_tokens: int
    tokens_per_second: float
    final_loss: float | None
    device: str
    world_size: int
    memory: dict
    step_records: list = field(default_factory=list)
    checkpointing: dict = field(default_factory=dict)
    #: Optimizer steps skipped for non-finite gradients (``nonfinite="skip"``; :mod:`engine.training.nonfinite`).
    skipped_steps: list = field(default_factory=list)
    #: Settings the trainer chose for the user (e.g. ``max_length`` from the model's ``max_seq_length``).
    notes: list = field(default_factory=list)
    #: Trainers that generate (GRPO): ``seconds``, ``completion_tokens``, ``tokens_per_second`` of the rollouts and
    #: ``training_seconds`` (total minus generation). Empty for SFT/DPO.
    generation: dict = field(default_factory=dict)

    def table(self) -> str:
        """A small aligned text table of the headline numbers."""
        mem = self.memory
        rows = [
            ("steps", f"{self.steps}"),
            ("train time", f"{self.total_seconds:.1f} s (median step {self.median_step_seconds * 1000:.0f} ms)"),
            ("trained tokens", f"{self.trained_tokens:,} ({self.tokens_per_second:,.0f} tok/s)"),
            ("peak memory", f"{mem['peak_memory_bytes'] / MIB:,.1f} MiB"),
        ]
        if "peak_rss_delta_bytes" in mem:
            rows.append(("  added by training", f"{mem['peak_rss_delta_bytes'] / MIB:,.1f} MiB"))
        if "peak_reserved_bytes" in mem:
            rows.append(("  reserved", f"{mem['peak_reserved_bytes'] / MIB:,.1f} MiB"))
        if self.final_loss is not None:
            rows.append(("final loss", f"{self.final_loss:.4f}"))
        if self.checkpointing:
            rows.append(("checkpointing", checkpointing_text(self.checkpointing)))
        rows += [("note", note) for note in self.notes]
        if self.skipped_steps:
            rows.append(("skipped steps", f"{len(self.skipped_steps)} (non-finite gradients): {self.skipped_steps}"))
        if self.generation:
            gen = self.generation
            rows.append(("generation", f"{gen['seconds']:.1f} s, {gen['completion_tokens']:,} tokens "
                                       f"({gen['tokens_per_second']:,.0f} tok/s); training {gen['training_seconds']:.1f} s"))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
        rule = "-" * max(len(line) for line in lines)
        return "\n".join([rule, *lines, rule])

    def one_line(self) -> str:
        return (
            f"peak memory {self.memory['peak_memory_bytes'] / 1e9:.2f} GB, {self.tokens_per_second:,.0f} tok/s, "
            f"{self.total_seconds:.0f} s"
        )


def checkpointing_text(choice: dict) -> str:
    """The report's checkpointing row: the policy, and for ``"auto"`` the planned peaks against the budget."""
    if choice.get("requested") != "auto" or not choice.get("plans"):
        return f"{choice['policy']} ({choice.get('reason', '')})"
    peaks = ", ".join(
        f"{p['policy']} {p['planned_peak_bytes'] / 2**30:.2f} GiB{'' if p['fits'] else ' (too much)'}"
        for p in choice["plans"]
    )
    return (
        f"{choice['policy']} (auto for {choice['rows']} x {choice['seq_len']:,} tokens: planned peak {peaks}; "
        f"budget {choice['budget_bytes'] / 2**30:.2f} GiB)"
    )


class TrainingReport(TrainerCallback):
    """Trainer callback that times every optimizer step and measures peak memory.

    The trainer tells it how many non-padding tokens each micro-batch trained on through
    :meth:`add_tokens`. Per-step losses come from the Trainer's logs (``logging_steps``).
    """

    def __init__(self, device: torch.device, print_summary: bool = True):
        self.device = torch.device(device)
        self.meter = PeakMemoryMeter(self.device)
        self.print_summary = print_summary
        self.records: list[StepRecord] = []
        self.summary: ReportSummary | None = None
        self._pending_tokens = 0
        self._step_start = 0.0
        self._events: tuple | None = None
        self._losses: dict[int, float] = {}
        #: Set by the trainer when training starts: :meth:`CheckpointChoice.as_dict` of the policy in use.
        self.checkpointing: dict = {}
        self.skipped_steps: list[int] = []
        #: Settings the trainer chose for the user, one sentence each (shown in the table and the JSON).
        self.notes: list[str] = []
        #: Set by generating trainers (GRPO): ``{"seconds": ..., "completion_tokens": ...}`` so far.
        self.generation: dict = {}

    def add_skipped_step(self, step: int) -> None:
        self.skipped_steps.append(int(step))

    def add_tokens(self, n: int) -> None:
        self._pending_tokens += int(n)

    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    # -- TrainerCallback hooks
    def on_train_begin(self, args, state, control, **kwargs):
        self.records, self._losses, self._pending_tokens, self.skipped_steps = [], {}, 0, []
        self.meter.start()

    def on_step_begin(self, args, state, control, **kwargs):
        if self._cuda():
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._cuda():
            self._events[1].record()
            self._events[1].synchronize()
            seconds = self._events[0].elapsed_time(self._events[1]) / 1000.0
        else:
            seconds = time.perf_counter() - self._step_start
        self.records.append(StepRecord(state.global_step, seconds, self._pending_tokens))
        self._pending_tokens = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._losses[state.global_step] = float(logs["loss"])

    def _generation_summary(self, total_seconds: float) -> dict:
        if not self.generation:
            return {}
        seconds, tokens = float(self.generation["seconds"]), int(self.generation["completion_tokens"])
        return {
            "seconds": seconds,
            "completion_tokens": tokens,
            "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
            "training_seconds": max(total_seconds - seconds, 0.0),
        }

    def on_train_end(self, args, state, control, **kwargs):
        memory = self.meter.stop()
        for record in self.records:
            record.loss = self._losses.get(record.step)
        seconds = [r.seconds for r in self.records]
        total = sum(seconds)
        tokens = sum(r.tokens for r in self.records)
        world_size = max(1, int(getattr(args, "world_size", 1)))
        self.summary = ReportSummary(
            steps=len(self.records),
            total_seconds=total,
            median_step_seconds=statistics.median(seconds) if seconds else 0.0,
            trained_tokens=tokens,
            tokens_per_second=tokens / total if total > 0 else 0.0,
            final_loss=self._losses[max(self._losses)] if self._losses else None,
            device=str(self.device),
            world_size=world_size,
            memory=memory,
            step_records=[asdict(r) for r in self.records],
            checkpointing=dict(self.checkpointing),
            skipped_steps=list(self.skipped_steps),
            notes=list(self.notes),
            generation=self._generation_summary(total),
        )
        if state.is_world_process_zero:
            if args.output_dir:
                out = Path(args.output_dir)
                out.mkdir(parents=True, exist_ok=True)
                write_text(out / REPORT_FILENAME, json.dumps(asdict(self.summary), indent=2))
            if self.print_summary:
                suffix = " (this process; tokens are per process)" if world_size > 1 else ""
                print(f"engine: training summary{suffix}\n{self.summary.table()}")
