"""Kernel-accelerated LoRA/QLoRA fine-tuning engine.

Public API::

    from engine import FastModel
    model, tokenizer = FastModel.from_pretrained(name, max_seq_length=2048, load_in_4bit=False)
    model = FastModel.get_peft_model(model, r=16, lora_alpha=16)
    engine.estimate_memory("meta-llama/Llama-3.1-8B", max_seq_length=8192)   # plan GPU memory, no GPU needed
    engine.max_context("meta-llama/Llama-3.1-8B", vram_gb=24)                 # longest context that fits
    tokenizer = engine.get_chat_template(tokenizer, "chatml", model=model)     # a prompt format that stops
"""

from engine.chat_templates import get_chat_template
from engine.errors import (
    CheckpointError,
    ConfigurationError,
    DatasetError,
    EngineError,
    SequenceTooLongError,
    UnsupportedArchitectureError,
)
from engine.loader import FastLanguageModel, FastModel
from engine.peft import disable_adapter

__version__ = "0.1.0"

#: Trainers import transformers.Trainer (slow); they load on first use: ``from engine import SFTTrainer``.
_LAZY = {
    "SFTTrainer": "engine.training.sft",
    "DPOTrainer": "engine.training.dpo",
    "SFTConfig": "engine.training.config",
    "DPOConfig": "engine.training.config",
    "GRPOTrainer": "engine.training.grpo",
    "GRPOConfig": "engine.training.config",
    "ClassificationTrainer": "engine.training.classification",
    "ClassificationConfig": "engine.training.config",
    "train_on_responses_only": "engine.training.sft_data",
    "estimate_memory": "engine.memory",
    "max_context": "engine.memory",
    "KTOTrainer": "engine.training.kto",
    "KTOConfig": "engine.training.config",
    "ORPOTrainer": "engine.training.orpo",
    "ORPOConfig": "engine.training.config",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")

__all__ = [
    "CheckpointError",
    "ClassificationConfig",
    "ClassificationTrainer",
    "DPOConfig",
    "DPOTrainer",
    "SFTConfig",
    "SFTTrainer",
    "ConfigurationError",
    "DatasetError",
    "EngineError",
    "FastLanguageModel",
    "FastModel",
    "GRPOConfig",
    "GRPOTrainer",
    "SequenceTooLongError",
    "UnsupportedArchitectureError",
    "disable_adapter",
    "estimate_memory",
    "get_chat_template",
    "max_context",
    "train_on_responses_only",
    "KTOConfig",
    "KTOTrainer",
    "ORPOConfig",
    "ORPOTrainer",
]
