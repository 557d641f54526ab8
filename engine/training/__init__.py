"""Trainers: supervised fine-tuning and DPO on top of :class:`transformers.Trainer`."""

from engine.training.config import ClassificationConfig, DPOConfig, SFTConfig
from engine.training.reporting import PeakMemoryMeter, ReportSummary, TrainingReport

__all__ = ["ClassificationConfig", "DPOConfig", "PeakMemoryMeter", "ReportSummary", "SFTConfig", "TrainingReport"]
