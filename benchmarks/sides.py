"""The sides of the benchmark: the engine, and Hugging Face (transformers + PEFT + TRL) set up several ways.

Each side runs in its own process (see ``run.py``) so that its peak memory is its own. Every side
trains LoRA with the same rank, alpha, target modules, learning rate, schedule, seed, batch size,
number of optimizer steps and data, and is measured by the same callback
(:class:`engine.training.TrainingReport`): wall time per optimizer step, trained (non-padding)
tokens, peak memory. Each side also records the document lengths of every step (for the FLOP count)
and a profile of one step.

| side | what it is |
|---|---|
| ``engine`` | ``engine.SFTTrainer`` with the engine's defaults (padding-free; checkpointing as the engine chooses) |
| ``engine-lean`` | the same with gradient checkpointing on every layer |
| ``hf`` | ``trl.SFTTrainer`` with TRL's defaults: each batch padded to its longest example, checkpointing on |
| ``hf-padding-free`` | TRL with ``padding_free=True`` (and ``max_length=None``, which TRL requires without packing), checkpointing on |
| ``hf-padding-free-no-ckpt`` | the same without gradient checkpointing |
| ``hf-liger`` | CUDA only: ``hf-padding-free`` plus ``use_liger_kernel=True`` (when liger-kernel is installed) |

Every side runs with its library's process settings: neither side flushes denormals (the engine's
``flush_denormals`` is opt-in; ``benchmarks/cpu_levers.py`` measures it).

Without ``--packing`` every side sees *the same examples in every step* (the Trainer's seeded sampler
orders both the same way), so the loss curves are directly comparable. With ``--packing`` both sides pack
examples into rows of ``--seq-len`` tokens by best-fit decreasing (TRL ``packing=True,
packing_strategy="bfd"``; the engine's own BFD packing) and are compared by tokens/s, memory and loss.

The TRL sides are configured as TRL's documentation shows: ``trl.SFTTrainer`` with a ``peft_config``,
a conversational ``messages`` dataset, the model loaded with ``AutoModelForCausalLM.from_pretrained`` in
bf16 where supported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class BenchConfig:
    model: str
    max_steps: int
    seq_len: int
    batch_size: int
    load_in_4bit: bool
    device: str
    seed: int = 0
    lora_r: int = 16
    lora_alpha: int = 32
    learning_rate: float = 2e-4
    packing: bool = False
    rows: int = 2000
    profile_step: int | None = 1  # 0-based optimizer step to profile (None: none)

    def as_dict(self) -> dict:
        return asdict(self)


def bf16_supported(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported()


def training_rows(limit: int) -> list[dict]:
    """The shipped instruction data as conversations (one ``messages`` column)."""
    from engine.data.load import load_jsonl

    return [{"messages": row["messages"]} for row in load_jsonl("train", "sft")[:limit]]


def document_lengths(inputs: dict) -> list[int]:
    """Real (non-padding) tokens of each document of a collated batch.

    Padding-free rows: documents start where ``position_ids`` restart at 0. Padded batches: each row's
    ``attention_mask`` sum. Otherwise each row is one document.
    """
    ids = inputs["input_ids"]
    if inputs.get("attention_mask") is not None:
        return [int(n) for n in inputs["attention_mask"].sum(dim=-1).tolist()]
    pos = inputs.get("position_ids")
    if pos is None:
        return [ids.shape[-1]] * ids.shape[0]
    lengths: list[int] = []
    for row in pos:
        starts = (row == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        bounds = [*starts, row.numel()]
        lengths += [b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return lengths


# ------------------------------------------------------------------------------------------- profiling

#: Profiler op names by category (self CPU/CUDA time is summed per category).
_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation")
_ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention", "_flash_attn", "flash_attn")


def categorize_profile(events, step_seconds: float) -> dict:
    """Milliseconds per category for one profiled step: matmul, attention, elementwise (every other op,
    including fused loops compiled by torch.compile), and Python/framework overhead (wall time not spent inside
    any op on the main thread, e.g. autograd Functions' own Python code).

    ``events`` is ``profiler.key_averages()``: self times are summed, so nested ops are not counted twice.
    Attention taken by SDPA's math backend appears as its matmuls and softmax, not under "attention".
    """
    cats = {"matmul": 0.0, "attention": 0.0, "elementwise": 0.0}
    top: list[tuple[float, str]] = []
    for e in events:
        name = e.key
        self_us = float(getattr(e, "self_cpu_time_total", 0.0))
        self_dev = float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0) or 0.0)
        us = self_dev if self_dev > 0 else self_us
        if us <= 0:
            continue
        compiled = "CompiledFxGraph" in name or "Compiled" in name and "Region" in name
        if not compiled and not name.startswith(("aten::", "mkldnn::", "triton", "void ", "ampere", "sm80", "sm90",
                                                 "cutlass")):
            # Labels (autograd Functions' Python code, record_function ranges): framework overhead, not op work.
            if not any(a in name for a in _ATTENTION):
                continue
        if any(a in name.lower() for a in _ATTENTION):
            cat = "attention"
        elif name in _MATMUL or name.startswith("mkldnn::"):
            cat = "matmul"
        else:
            cat = "elementwise"
        cats[cat] += us / 1000.0
        top.append((us / 1000.0, name))
    total_ops = sum(cats.values())
    cats["python_overhead"] = max(0.0, step_seconds * 1000.0 - total_ops)
    cats["step"] = step_seconds * 1000.0
    cats["top_ops_ms"] = [{"op": n, "ms": round(ms, 2)} for ms, n in sorted(top, reverse=True)[:12]]
    return cats


def forget_profiler_memory() -> bool:
    """Leave the profiled step out of the memory peak (its event records take hundreds of MiB of RSS).

    Frees the profiler's memory back to the OS (glibc ``malloc_trim``) and resets the kernel's high-water mark
    of this process (``/proc/self/clear_refs``), so the peak the report reads covers the steps after the profiled
    one (a warm-up step); everything still allocated (weights, optimizer states) stays counted. Returns whether
    the reset happened (Linux only).
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def make_profile_callback(step: int | None, device: str):
    """A TrainerCallback that profiles optimizer step ``step`` (0-based) and keeps the category summary."""
    from transformers import TrainerCallback

    class ProfileOneStep(TrainerCallback):
        def __init__(self):
            self.summary: dict | None = None
            self._prof = None
            self._start = 0.0
            self._index = 0

        def on_step_begin(self, args, state, control, **kwargs):
            if step is not None and self._index == step:
                import time

                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
                self._prof = profile(activities=acts)
                self._prof.__enter__()
                self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self._prof is not None:
                import time

                if device == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - self._start
                self._prof.__exit__(None, None, None)
                self.summary = categorize_profile(self._prof.key_averages(), seconds)
                self.summary["profiled_step"] = self._index
                self._prof = None
                self.summary["memory_peak_reset"] = forget_profiler_memory()
            self._index += 1

    return ProfileOneStep()


# ------------------------------------------------------------------------------------------- shared


def _summary_dict(trainer_report) -> dict:
    summary = trainer_report.summary
    if summary is None:
        raise RuntimeError("training ended without a report")
    return asdict(summary)


def shared_trainer_args(cfg: BenchConfig, output_dir: Path) -> dict:
    """The Trainer arguments every side uses (TRL's SFTConfig and ours share these names)."""
    return {
        "output_dir": str(output_dir),
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": "linear",
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": cfg.seed,
        "use_cpu": cfg.device == "cpu",
    }


def _finish(report, documents: list[list[int]], profiler, checkpointed_layers: int, extra: dict) -> dict:
    result = _summary_dict(report)
    result["step_documents"] = documents
    result["profile"] = profiler.summary
    result["checkpointed_layers"] = checkpointed_layers
    result.update(extra)
    return result


# ------------------------------------------------------------------------------------------- engine


def checkpointed_layer_count(model) -> int:
    """How many decoder layers the engine model recomputes in backward (its checkpointing policy)."""
    n = len(model.model.layers)
    policy = getattr(model, "checkpoint_policy", None)
    if policy is not None and hasattr(policy, "checkpointed"):
        return sum(1 for i in range(n) if policy.checkpointed(i))
    return n if model.gradient_checkpointing else 0


def run_engine(cfg: BenchConfig, output_dir: Path, *, gradient_checkpointing=None) -> dict:
    """``engine.SFTTrainer``; ``gradient_checkpointing=None`` keeps the engine's default."""
    from engine import FastModel, SFTConfig, SFTTrainer

    documents: list[list[int]] = []

    class MeasuredSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            documents.append(document_lengths(inputs))
            return super().training_step(model, inputs, num_items_in_batch)

    torch.manual_seed(cfg.seed)
    model, tokenizer = FastModel.from_pretrained(
        cfg.model, max_seq_length=cfg.seq_len, load_in_4bit=cfg.load_in_4bit, device=cfg.device
    )
    peft_kwargs = {} if gradient_checkpointing is None else {"use_gradient_checkpointing": gradient_checkpointing}
    model = FastModel.get_peft_model(
        model,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        random_state=cfg.seed,
        **peft_kwargs,
    )
    args = SFTConfig(
        **shared_trainer_args(cfg, output_dir), max_length=cfg.seq_len, packing=cfg.packing, padding_free=True
    )
    profiler = make_profile_callback(cfg.profile_step, cfg.device)
    trainer = MeasuredSFTTrainer(
        model=model, tokenizer=tokenizer, train_dataset=training_rows(cfg.rows), args=args, callbacks=[profiler]
    )
    trainer.train()
    policy = getattr(model, "checkpoint_policy", None)
    extra = {"gradient_checkpointing": str(policy if policy is not None else model.gradient_checkpointing)}
    return _finish(trainer.report, documents, profiler, checkpointed_layer_count(model), extra)


# ------------------------------------------------------------------------------------------- Hugging Face


def _hf_load(cfg: BenchConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if bf16_supported(cfg.device) else torch.float32
    kwargs = {"dtype": dtype}
    if cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit(f"{cfg.model}: the tokenizer has no chat template; the benchmark trains on conversations")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(cfg.device), tokenizer, dtype


def longest_example(tokenizer, rows: list[dict]) -> int:
    """Tokens of the longest conversation once the chat template is applied (as TRL tokenizes it)."""
    return max(len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False)) for r in rows)


def run_hf(cfg: BenchConfig, output_dir: Path, *, padding_free: bool, gradient_checkpointing: bool,
           liger: bool = False) -> dict:
    """``trl.SFTTrainer`` with a PEFT LoRA config.

    ``padding_free`` without packing needs ``max_length=None`` in TRL (it refuses truncation there), so the
    examples are checked against ``--seq-len`` first: no side may train on tokens another side never sees.
    """
    import trl
    from peft import LoraConfig

    from engine.training.base import count_trained_tokens
    from engine.training.reporting import TrainingReport

    documents: list[list[int]] = []

    class MeasuredSFTTrainer(trl.SFTTrainer):
        """TRL's SFTTrainer, unchanged except that it tells the report what each batch held."""

        def __init__(self, *args, report: TrainingReport, **kwargs):
            super().__init__(*args, callbacks=[report, profiler], **kwargs)
            self.report = report

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.report.add_tokens(count_trained_tokens(inputs))
            documents.append(document_lengths(inputs))
            return super().training_step(model, inputs, num_items_in_batch)

    torch.manual_seed(cfg.seed)
    model, tokenizer, dtype = _hf_load(cfg)
    rows = training_rows(cfg.rows)
    peft_config = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
    )
    kwargs = {"gradient_checkpointing": gradient_checkpointing, "bf16": dtype == torch.bfloat16, "report_to": []}
    if cfg.packing:
        kwargs.update(packing=True, packing_strategy="bfd", max_length=cfg.seq_len)
        if padding_free:
            kwargs["padding_free"] = True
    elif padding_free:
        longest = longest_example(tokenizer, rows)
        if longest > cfg.seq_len:
            raise SystemExit(
                f"the longest example has {longest} tokens, more than --seq-len {cfg.seq_len}; TRL's padding_free "
                "without packing cannot truncate (max_length=None), so the sides would train on different tokens. "
                "Raise --seq-len."
            )
        kwargs.update(padding_free=True, max_length=None)
    else:
        kwargs["max_length"] = cfg.seq_len
    if liger:
        kwargs["use_liger_kernel"] = True
    args = trl.SFTConfig(**shared_trainer_args(cfg, output_dir), **kwargs)
    report = TrainingReport(torch.device(cfg.device))
    profiler = make_profile_callback(cfg.profile_step, cfg.device)
    trainer = MeasuredSFTTrainer(
        model=model,
        args=args,
        train_dataset=_as_dataset(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        report=report,
    )
    trainer.train()
    n_layers = model.config.num_hidden_layers
    extra = {"gradient_checkpointing": str(gradient_checkpointing), "trl_config": {k: str(v) for k, v in kwargs.items()}}
    return _finish(report, documents, profiler, n_layers if gradient_checkpointing else 0, extra)


def _as_dataset(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


@dataclass(frozen=True)
class Side:
    """One benchmarked configuration: a label, a runner and what it compares with."""

    label: str
    run: Callable[[BenchConfig, Path], dict]
    checkpointing: bool | None  # True/False: fixed; None: the engine decides
    hf: bool
    cuda_only: bool = False


def _engine(ckpt):
    return lambda cfg, out: run_engine(cfg, out, gradient_checkpointing=ckpt)


def _hf(padding_free, ckpt, liger=False):
    return lambda cfg, out: run_hf(cfg, out, padding_free=padding_free, gradient_checkpointing=ckpt, liger=liger)


SIDES: dict[str, Side] = {
    "engine": Side("engine (defaults)", _engine(None), None, hf=False),
    "engine-lean": Side("engine, checkpointing on", _engine(True), True, hf=False),
    "hf": Side("TRL defaults (padded, ckpt on)", _hf(False, True), True, hf=True),
    "hf-padding-free": Side("TRL padding_free, ckpt on", _hf(True, True), True, hf=True),
    "hf-padding-free-no-ckpt": Side("TRL padding_free, ckpt off", _hf(True, False), False, hf=True),
    "hf-liger": Side("TRL padding_free + Liger, ckpt on", _hf(True, True, liger=True), True, hf=True, cuda_only=True),
}
