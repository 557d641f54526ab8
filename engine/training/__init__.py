"""Trainers: supervised fine-tuning, DPO, KTO, ORPO, GRPO and classification on top of :class:`transformers.Trainer`."""

from engine.training.config import ClassificationConfig, DPOConfig, GRPOConfig, KTOConfig, ORPOConfig, SFTConfig
from engine.training.reporting import PeakMemoryMeter, ReportSummary, TrainingReport

__all__ = [
    "ClassificationConfig", "DPOConfig", "GRPOConfig", "KTOConfig", "ORPOConfig", "PeakMemoryMeter", "ReportSummary",
    "SFTConfig", "TrainingReport",
]
