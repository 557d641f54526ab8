"""Kernel-accelerated LoRA/QLoRA fine-tuning engine.

Public API::

    from engine import FastModel
    model, tokenizer = FastModel.from_pretrained(name, max_seq_length=2048, load_in_4bit=False)
    model = FastModel.get_peft_model(model, r=16, lora_alpha=16)
"""

from engine.errors import (
    CheckpointError,
    ConfigurationError,
    EngineError,
    SequenceTooLongError,
    UnsupportedArchitectureError,
)
from engine.loader import FastLanguageModel, FastModel
from engine.peft import disable_adapter

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigurationError",
    "EngineError",
    "FastLanguageModel",
    "FastModel",
    "SequenceTooLongError",
    "UnsupportedArchitectureError",
    "disable_adapter",
]
