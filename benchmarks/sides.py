"""The two sides of the benchmark: the engine, and plain Hugging Face (transformers + PEFT + TRL).

Each side runs in its own process (see ``run.py``) so that its peak memory is its own. Both
sides train LoRA with the same rank, alpha, target modules, learning rate, schedule, seed,
batch size, number of optimizer steps and data, and are measured by the same callback
(:class:`engine.training.TrainingReport`): wall time per optimizer step, trained
(non-padding) tokens, peak memory.

The baseline is configured as TRL's documentation shows: ``trl.SFTTrainer`` with a
``peft_config``, a conversational ``messages`` dataset, TRL's defaults (no packing,
gradient checkpointing on, bf16 where supported), the model loaded with
``AutoModelForCausalLM.from_pretrained`` in bf16 where supported.

The engine runs ``engine.SFTTrainer`` with ``padding_free=True`` and ``packing=False`` by
default, so it sees *the same examples in every step* as the baseline (the Trainer's seeded
sampler orders both the same way) and the loss curves are directly comparable; ``--packing``
switches to BFD packing (more examples per step).
"""

from __future__ import annotations

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
    gradient_checkpointing: str = "true"  # engine side: "true" or "smart"
    rows: int = 2000

    def as_dict(self) -> dict:
        return asdict(self)


def bf16_supported(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported()


def training_rows(limit: int) -> list[dict]:
    """The shipped instruction data as conversations (one ``messages`` column)."""
    from data.load import load_jsonl

    return [{"messages": row["messages"]} for row in load_jsonl("train", "sft")[:limit]]


def _summary_dict(trainer_report) -> dict:
    summary = trainer_report.summary
    if summary is None:
        raise RuntimeError("training ended without a report")
    return asdict(summary)


def shared_trainer_args(cfg: BenchConfig, output_dir: Path) -> dict:
    """The Trainer arguments both sides use (TRL's SFTConfig and ours share these names)."""
    return {
        "output_dir": str(output_dir),
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": "linear",
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": cfg.seed,
        "max_length": cfg.seq_len,
        "use_cpu": cfg.device == "cpu",
    }


def run_engine(cfg: BenchConfig, output_dir: Path) -> dict:
    from engine import FastModel, SFTConfig, SFTTrainer

    torch.manual_seed(cfg.seed)
    model, tokenizer = FastModel.from_pretrained(
        cfg.model, max_seq_length=cfg.seq_len, load_in_4bit=cfg.load_in_4bit, device=cfg.device
    )
    model = FastModel.get_peft_model(
        model,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        use_gradient_checkpointing="smart" if cfg.gradient_checkpointing == "smart" else True,
        random_state=cfg.seed,
    )
    args = SFTConfig(**shared_trainer_args(cfg, output_dir), packing=cfg.packing, padding_free=True)
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=training_rows(cfg.rows), args=args)
    trainer.train()
    return _summary_dict(trainer.report)


def _hf_load(cfg: BenchConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(cfg.model)
    dtype = torch.bfloat16 if bf16_supported(cfg.device) else torch.float32
    kwargs = {"dtype": dtype}
    if cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    if path.suffix == ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit(f"{cfg.model}: the tokenizer has no chat template; the benchmark trains on conversations")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(cfg.device), tokenizer, dtype


def run_hf(cfg: BenchConfig, output_dir: Path) -> dict:
    import trl
    from peft import LoraConfig

    from engine.training.base import count_trained_tokens
    from engine.training.reporting import TrainingReport

    class MeasuredSFTTrainer(trl.SFTTrainer):
        """TRL's SFTTrainer, unchanged except that it tells the report how many tokens each batch had."""

        def __init__(self, *args, report: TrainingReport, **kwargs):
            super().__init__(*args, callbacks=[report], **kwargs)
            self.report = report

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.report.add_tokens(count_trained_tokens(inputs))
            return super().training_step(model, inputs, num_items_in_batch)

    torch.manual_seed(cfg.seed)
    model, tokenizer, dtype = _hf_load(cfg)
    peft_config = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
    )
    args = trl.SFTConfig(
        **shared_trainer_args(cfg, output_dir), gradient_checkpointing=True, bf16=dtype == torch.bfloat16, report_to=[]
    )
    report = TrainingReport(torch.device(cfg.device))
    trainer = MeasuredSFTTrainer(
        model=model,
        args=args,
        train_dataset=_as_dataset(training_rows(cfg.rows)),
        processing_class=tokenizer,
        peft_config=peft_config,
        report=report,
    )
    trainer.train()
    return _summary_dict(report)


def _as_dataset(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


SIDES = {"engine": run_engine, "hf": run_hf}
