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
    nonfinite: str = field(
        default="error",
        metadata={"help": "A step with NaN/inf gradients: 'error' (stop, naming the step) or 'skip' (counted in the "
                          "report). Engine-only."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.nonfinite not in ("error", "skip"):
            raise ConfigurationError(f"nonfinite must be 'error' or 'skip', got {self.nonfinite!r}")


@dataclass
class SFTConfig(EngineTrainingArguments):
    """Arguments of :class:`engine.SFTTrainer` (``TrainingArguments`` plus the fields below).

    Differences from TRL's ``SFTConfig``: ``max_length`` defaults to the model's ``max_seq_length`` (TRL: 1024;
    the trainer fills it in and the report says so); ``packing`` defaults to ``True`` (padding-free
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
        default=None,
        metadata={"help": "Longest tokenized example; with packing, the length of a packed row. None (default): the "
                          "model's max_seq_length, filled in by SFTTrainer (TRL: 1024)."},
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
        if self.max_length is not None and self.max_length < 2:
            raise ConfigurationError(f"max_length must be at least 2, got {self.max_length}")
        if self.padding_free is None:
            self.padding_free = self.packing
        if self.eval_packing is None:
            self.eval_packing = self.packing


@dataclass
class PreferenceArguments(EngineTrainingArguments):
    """The preference-data and reference-policy fields :class:`DPOConfig` and :class:`KTOConfig` share."""

    max_length: int | None = field(default=1024, metadata={"help": "Longest prompt + completion in tokens."})
    padding_free: bool = field(
        default=False, metadata={"help": "Flatten each batch's sequences into one row without padding."}
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


@dataclass
class DPOConfig(PreferenceArguments):
    """Arguments of :class:`engine.DPOTrainer` (``TrainingArguments`` plus TRL's DPO fields below).

    The reference policy is the model with its LoRA adapters disabled (no second copy of the
    weights), or log-probabilities computed once before training (``precompute_ref_log_probs``).
    """

    learning_rate: float = field(default=5e-6, metadata={"help": "Peak AdamW learning rate (TRL's default)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    beta: float = field(default=0.1, metadata={"help": "Strength of the KL penalty towards the reference."})
    loss_type: str = field(default="sigmoid", metadata={"help": "One of 'sigmoid', 'ipo', 'hinge', 'robust'."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Robust/cDPO label smoothing (sigmoid loss)."})
    truncation_mode: str = field(default="keep_start", metadata={"help": "'keep_start' or 'keep_end'."})

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


#: GRPO losses we implement (TRL 1.16's normalisations); the other TRL loss types are refused by name.
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
GRPO_UNSUPPORTED_TRL_LOSS_TYPES = ("cispo", "sapo", "luspo", "vespo")
GRPO_SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class GRPOConfig(EngineTrainingArguments):
    """Arguments of :class:`engine.GRPOTrainer` (``TrainingArguments`` plus TRL 1.16's GRPO fields below).

    Field names, defaults and meanings are TRL's, except: ``max_prompt_length`` is ours (TRL has none);
    ``bf16`` and ``gradient_checkpointing`` keep ``TrainingArguments``' defaults (False: the model's dtype and
    the checkpointing chosen by ``FastModel.get_peft_model`` apply; TRL turns both on). The reference policy
    (``beta > 0``) is the model with its LoRA adapters disabled.
    """

    learning_rate: float = field(default=1e-6, metadata={"help": "Peak AdamW learning rate (TRL's default)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    num_generations: int = field(default=8, metadata={"help": "Completions sampled per prompt (a group)."})
    max_completion_length: int = field(default=512, metadata={"help": "Most tokens generated per completion."})
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Ours (not TRL's): keep only the last N prompt tokens; None keeps whole prompts."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (also used to score tokens)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass in (0, 1]; 1 keeps every token."})
    top_k: int = field(default=0, metadata={"help": "Keep the k most likely tokens; 0 disables top-k."})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient; 0 skips the reference forward pass."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping bound of the importance ratio (1 - eps)."})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "Upper clipping bound (1 + eps_high); None: same as epsilon."}
    )
    loss_type: str = field(default="dapo", metadata={"help": "One of 'grpo', 'dr_grpo', 'dapo', 'bnpo'."})
    scale_rewards: str = field(
        default="group", metadata={"help": "Divide advantages by the std of the 'group', the 'batch', or 'none'."}
    )
    num_iterations: int = field(default=1, metadata={"help": "Optimisation passes per generation batch (mu)."})
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "Leave completions that did not end (no EOS) out of the loss."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function (default: all 1.0)."}
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={"help": "Completions per generation (default per_device_train_batch_size x steps_per_generation)."},
    )
    steps_per_generation: int | None = field(
        default=None, metadata={"help": "Micro-batches per generation (default gradient_accumulation_steps)."}
    )
    use_bias_correction_kl: bool = field(
        default=True, metadata={"help": "Multiply the per-token KL by the importance ratio (TRL's default)."}
    )
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle the prompts (seeded by seed)."})

    def __post_init__(self):
        super().__post_init__()
        _engine_defaults(self)
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        if self.loss_type in GRPO_UNSUPPORTED_TRL_LOSS_TYPES:
            raise ConfigurationError(
                f"loss_type={self.loss_type!r} (a TRL loss) is not supported by engine.GRPOTrainer; "
                f"use one of {GRPO_LOSS_TYPES}"
            )
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ConfigurationError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in GRPO_SCALE_REWARDS:
            raise ConfigurationError(
                f"scale_rewards must be one of {GRPO_SCALE_REWARDS} (or True/False), got {self.scale_rewards!r}"
            )
        if self.num_generations < 2:
            raise ConfigurationError(
                f"num_generations must be at least 2 (advantages compare completions of one prompt), got "
                f"{self.num_generations}"
            )
        if self.max_completion_length < 1:
            raise ConfigurationError(f"max_completion_length must be at least 1, got {self.max_completion_length}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ConfigurationError(f"max_prompt_length must be at least 1 or None, got {self.max_prompt_length}")
        if not self.temperature > 0:
            raise ConfigurationError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigurationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.beta < 0 or self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ConfigurationError("beta, epsilon and epsilon_high must be non-negative")
        if self.num_iterations < 1:
            raise ConfigurationError(f"num_iterations must be at least 1, got {self.num_iterations}")
        if self.auto_find_batch_size:
            raise ConfigurationError(
                "auto_find_batch_size is not supported by GRPO (the generation batch must hold whole prompt groups); "
                "lower per_device_train_batch_size instead"
            )
        global_batch = self.per_device_train_batch_size * self.world_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ConfigurationError("set generation_batch_size or steps_per_generation, not both")
        if self.generation_batch_size is None:
            self.steps_per_generation = self.steps_per_generation or self.gradient_accumulation_steps
            self.generation_batch_size = global_batch * self.steps_per_generation
        else:
            if self.generation_batch_size % global_batch:
                raise ConfigurationError(
                    f"generation_batch_size ({self.generation_batch_size}) must be a multiple of the global batch size "
                    f"({global_batch} = per_device_train_batch_size x processes)"
                )
            self.steps_per_generation = self.generation_batch_size // global_batch
        if self.generation_batch_size % self.num_generations:
            raise ConfigurationError(
                f"num_generations ({self.num_generations}) must divide the generation batch "
                f"({self.generation_batch_size} = per_device_train_batch_size x processes x steps_per_generation), "
                "so that every prompt's group of completions is generated together. Change num_generations, "
                "per_device_train_batch_size or gradient_accumulation_steps/steps_per_generation."
            )
        if self.do_eval and self.eval_strategy != "no":
            if (self.per_device_eval_batch_size * self.world_size) % self.num_generations:
                raise ConfigurationError(
                    f"per_device_eval_batch_size x processes ({self.per_device_eval_batch_size * self.world_size}) must "
                    f"be a multiple of num_generations ({self.num_generations})"
                )


KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass
class KTOConfig(PreferenceArguments):
    """Arguments of :class:`engine.KTOTrainer` (``TrainingArguments`` plus TRL's KTO fields below).

    The reference policy is the model with its LoRA adapters disabled, or log-probabilities computed once before
    training (``precompute_ref_log_probs``). ``train_sampling_strategy`` defaults to ``"sequential"`` (TRL's
    default too): the KL estimate pairs each prompt with a completion of the same batch, fixed when the data is
    prepared, so ``loss_type="kto"`` refuses any other sampler.
    """

    learning_rate: float = field(default=1e-6, metadata={"help": "Peak AdamW learning rate (TRL's default)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    train_sampling_strategy: str = field(
        default="sequential", metadata={"help": "Must stay 'sequential' for loss_type='kto' (the KL pairing)."}
    )
    beta: float = field(default=0.1, metadata={"help": "Strength of the pull towards the reference."})
    loss_type: str = field(default="kto", metadata={"help": "One of 'kto', 'apo_zero_unpaired'."})
    desirable_weight: float = field(default=1.0, metadata={"help": "Weight of the desirable examples' losses."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "Weight of the undesirable examples' losses."})

    def __post_init__(self):
        super().__post_init__()
        _engine_defaults(self)
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ConfigurationError(f"loss_type must be one of {KTO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ConfigurationError(f"beta must be positive, got {self.beta}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ConfigurationError(
                f"desirable_weight and undesirable_weight must be positive, got {self.desirable_weight} and "
                f"{self.undesirable_weight}"
            )
        if self.max_length is not None and self.max_length < 2:
            raise ConfigurationError(f"max_length must be at least 2 (or None), got {self.max_length}")
        if self.loss_type == "kto":
            if self.train_sampling_strategy != "sequential":
                raise ConfigurationError(
                    f"loss_type='kto' pairs each prompt with a completion of the same batch for its KL estimate, "
                    f"fixed when the data is prepared, so it needs train_sampling_strategy='sequential' (got "
                    f"{self.train_sampling_strategy!r}); shuffle the dataset beforehand instead"
                )
            if self.per_device_train_batch_size < 2:
                raise ConfigurationError(
                    "loss_type='kto' needs per_device_train_batch_size >= 2: with one row per batch the KL pair would "
                    "be the row itself and the KL term would equal the reward"
                )


@dataclass
class ORPOConfig(EngineTrainingArguments):
    """Arguments of :class:`engine.ORPOTrainer` (``TrainingArguments`` plus TRL's ORPO fields below).

    ORPO has no reference model. ``beta`` is the weight of the odds-ratio term (the paper's λ).
    """

    learning_rate: float = field(default=1e-6, metadata={"help": "Peak AdamW learning rate (TRL's default)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    beta: float = field(default=0.1, metadata={"help": "Weight of the odds-ratio term (the paper's lambda)."})
    max_length: int | None = field(default=1024, metadata={"help": "Longest prompt + completion in tokens."})
    padding_free: bool = field(
        default=False, metadata={"help": "Flatten chosen and rejected sequences into one row without padding."}
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes used to tokenize."})
    drop_truncated: bool = field(
        default=False,
        metadata={"help": "Drop (with a warning) examples whose prompt fills max_length instead of raising."},
    )

    def __post_init__(self):
        super().__post_init__()
        _engine_defaults(self)
        if self.beta <= 0:
            raise ConfigurationError(f"beta must be positive, got {self.beta}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigurationError(f"max_length must be at least 2 (or None), got {self.max_length}")


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
