"""Training configurations: :class:`SFTConfig` and :class:`DPOConfig`.

Both extend :class:`transformers.TrainingArguments` (so every Trainer option — schedulers,
checkpointing, logging integrations, accelerate/DDP — is available) and add the data and loss
options of TRL's configs **under TRL's names** where the meaning is the same, so a TRL script
ports by changing its imports. Where the engine's default differs from TRL's, the field's
help says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from engine.errors import ConfigurationError

#: What to do with an example longer than ``max_length``.
LONG_EXAMPLE_POLICIES = ("truncate", "split", "error")
PACKING_STRATEGIES = ("bfd",)
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def _engine_defaults(cfg: TrainingArguments) -> None:
    """Defaults that differ from TrainingArguments': log every 10 steps and report nowhere unless asked."""
    if cfg.report_to is None:
        cfg.report_to = []


@dataclass
class EngineTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus what every engine trainer adds (the base of :class:`SFTConfig` and :class:`DPOConfig`)."""

    flush_denormals: bool = field(
        default=False,
        metadata={"help": "On CPU, flush denormal floats to zero while training (engine.runtime; opt-in, no gain measured "
                          "on our CPUs)."},
    )


@dataclass
class SFTConfig(EngineTrainingArguments):
    """Arguments of :class:`engine.SFTTrainer` (``TrainingArguments`` plus the fields below).

    Differences from TRL's ``SFTConfig``: ``packing`` defaults to ``True`` (padding-free
    best-fit-decreasing packing; attention never crosses documents, so the loss is exact),
    and ``long_examples`` chooses how over-long examples are handled. Gradient checkpointing
    is chosen when adding LoRA (``FastModel.get_peft_model(use_gradient_checkpointing=...)``); its
    default ``"auto"`` is resolved when training starts, for ``per_device_train_batch_size x max_length``
    tokens per step. ``gradient_checkpointing=True`` here checkpoints every layer instead.
    """

    learning_rate: float = field(default=2e-4, metadata={"help": "Peak AdamW learning rate (LoRA-typical; TRL: 2e-5)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    dataset_text_field: str = field(default="text", metadata={"help": "Column with raw text (text datasets)."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes used to tokenize."})
    max_length: int | None = field(
        default=1024, metadata={"help": "Longest tokenized example; with packing, the length of a packed row."}
    )
    long_examples: str = field(
        default="truncate",
        metadata={"help": "Examples over max_length: 'truncate' (keep the start, warn), 'split' or 'error'."},
    )
    packing: bool = field(default=True, metadata={"help": "Pack examples into rows of max_length (BFD)."})
    packing_strategy: str = field(default="bfd", metadata={"help": "Only 'bfd' (best-fit decreasing)."})
    padding_free: bool | None = field(
        default=None,
        metadata={"help": "Flatten each batch into one row without padding (default: same as packing)."},
    )
    eval_packing: bool | None = field(default=None, metadata={"help": "Pack the eval set (default: as packing)."})
    completion_only_loss: bool | None = field(
        default=None,
        metadata={"help": "Loss on completions only (None: yes for prompt/completion datasets)."},
    )
    assistant_only_loss: bool = field(
        default=False, metadata={"help": "Loss on assistant turns only (conversational datasets)."}
    )
    drop_fully_masked: bool = field(
        default=False,
        metadata={"help": "Drop (with a warning) examples whose labels are all masked instead of raising."},
    )
    add_eos: bool = field(default=True, metadata={"help": "Append the EOS token to text/completion examples."})

    def __post_init__(self):
        super().__post_init__()
        _engine_defaults(self)
        if self.long_examples not in LONG_EXAMPLE_POLICIES:
            raise ConfigurationError(f"long_examples must be one of {LONG_EXAMPLE_POLICIES}, got {self.long_examples!r}")
        if self.packing_strategy not in PACKING_STRATEGIES:
            raise ConfigurationError(f"packing_strategy must be one of {PACKING_STRATEGIES}, got {self.packing_strategy!r}")
        if self.packing and self.max_length is None:
            raise ConfigurationError("packing needs max_length (the length of a packed row); set max_length or packing=False")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigurationError(f"max_length must be at least 2, got {self.max_length}")
        if self.padding_free is None:
            self.padding_free = self.packing
        if self.eval_packing is None:
            self.eval_packing = self.packing


@dataclass
class DPOConfig(EngineTrainingArguments):
    """Arguments of :class:`engine.DPOTrainer` (``TrainingArguments`` plus TRL's DPO fields below).

    The reference policy is the model with its LoRA adapters disabled (no second copy of the
    weights), or log-probabilities computed once before training (``precompute_ref_log_probs``).
    """

    learning_rate: float = field(default=5e-6, metadata={"help": "Peak AdamW learning rate (TRL's default)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    beta: float = field(default=0.1, metadata={"help": "Strength of the KL penalty towards the reference."})
    loss_type: str = field(default="sigmoid", metadata={"help": "One of 'sigmoid', 'ipo', 'hinge', 'robust'."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Robust/cDPO label smoothing (sigmoid loss)."})
    max_length: int | None = field(default=1024, metadata={"help": "Longest prompt + completion in tokens."})
    truncation_mode: str = field(default="keep_start", metadata={"help": "'keep_start' or 'keep_end'."})
    padding_free: bool = field(
        default=False, metadata={"help": "Flatten chosen and rejected sequences into one row without padding."}
    )
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "Compute reference log-probs once before training."}
    )
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size for precomputing (default: per_device_train_batch_size)."}
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes used to tokenize."})
    drop_truncated: bool = field(
        default=False,
        metadata={"help": "Drop (with a warning) examples whose prompt fills max_length instead of raising."},
    )

    def __post_init__(self):
        super().__post_init__()
        _engine_defaults(self)
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ConfigurationError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ConfigurationError(f"beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigurationError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0 and self.loss_type not in ("sigmoid", "robust"):
            raise ConfigurationError(
                f"label_smoothing applies to the 'sigmoid' (cDPO) and 'robust' losses, not {self.loss_type!r}; "
                "set label_smoothing=0 or change loss_type"
            )
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ConfigurationError(f"truncation_mode must be 'keep_start' or 'keep_end', got {self.truncation_mode!r}")


@dataclass
class ClassificationConfig(EngineTrainingArguments):
    """Arguments of :class:`engine.ClassificationTrainer` (``TrainingArguments`` plus the data fields below).

    Rows are tokenized from ``dataset_text_field`` (no special tokens added beyond the tokenizer's own,
    truncated to ``max_length`` keeping the start) with their class in ``label_field``; batches are padded
    on ``padding_side`` with the model's pad token. Evaluation reports ``eval_accuracy`` (single-label).
    """

    learning_rate: float = field(default=2e-4, metadata={"help": "Peak AdamW learning rate (LoRA-typical)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    dataset_text_field: str = field(default="text", metadata={"help": "Column with the text to classify."})
    label_field: str = field(default="label", metadata={"help": "Column with the class index (or float targets)."})
    max_length: int | None = field(default=512, metadata={"help": "Longest tokenized text; longer ones keep the start."})
    padding_side: str = field(default="right", metadata={"help": "'right' or 'left' (pooling handles both)."})

    def __post_init__(self):
        super().__post_init__()
        _engine_defaults(self)
        if self.padding_side not in ("right", "left"):
            raise ConfigurationError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.max_length is not None and self.max_length < 1:
            raise ConfigurationError(f"max_length must be at least 1, got {self.max_length}")
