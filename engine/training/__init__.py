"""Trainers: supervised fine-tuning, DPO, KTO, ORPO and GRPO on top of :class:`transformers.Trainer`."""

from engine.training.config import DPOConfig, GRPOConfig, KTOConfig, ORPOConfig, SFTConfig
from engine.training.reporting import PeakMemoryMeter, ReportSummary, TrainingReport

__all__ = [
    "DPOConfig", "GRPOConfig", "KTOConfig", "ORPOConfig", "PeakMemoryMeter", "ReportSummary", "SFTConfig",
    "TrainingReport",
]
