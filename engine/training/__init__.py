"""Trainers: supervised fine-tuning, DPO and GRPO on top of :class:`transformers.Trainer`."""

from engine.training.config import DPOConfig, GRPOConfig, SFTConfig
from engine.training.reporting import PeakMemoryMeter, ReportSummary, TrainingReport

__all__ = ["DPOConfig", "GRPOConfig", "PeakMemoryMeter", "ReportSummary", "SFTConfig", "TrainingReport"]
