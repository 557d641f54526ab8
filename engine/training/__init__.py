"""Trainers: supervised fine-tuning and DPO on top of :class:`transformers.Trainer`."""

from engine.training.config import DPOConfig, KTOConfig, ORPOConfig, SFTConfig
from engine.training.reporting import PeakMemoryMeter, ReportSummary, TrainingReport

__all__ = ["DPOConfig", "KTOConfig", "ORPOConfig", "PeakMemoryMeter", "ReportSummary", "SFTConfig", "TrainingReport"]
