"""What every engine trainer shares, on top of :class:`transformers.Trainer`.

* It trains the engine's own :class:`~engine.models.transformer.CausalLM` (from
  ``FastModel``), saves checkpoints in PEFT adapter format (or the full model without LoRA)
  and resumes from them (``trainer.train(resume_from_checkpoint=True)``).
* It counts the trained (non-padding) tokens of every micro-batch and installs
  :class:`~engine.training.reporting.TrainingReport`, so each run ends with a time/memory
  summary table and ``training_report.json`` next to the checkpoints.
* When training starts it resolves ``use_gradient_checkpointing="auto"`` (the default of
  ``FastModel.get_peft_model``) for the largest step its config allows (:meth:`EngineTrainer.step_shape`),
  prints the chosen policy in one line and puts the choice in the report.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers

from engine.distributed import check_trainer_fsdp, is_fully_sharded
from engine.errors import CheckpointError, ConfigurationError
from engine.files import StagedFolder
from engine.loader import FastModel
from engine.models.transformer import CausalLM
from engine.modules.checkpointing import CheckpointChoice, current_policy
from engine.peft import has_adapters
from engine.runtime import flush_denormals
from engine.training.nonfinite import NonFiniteGuard
from engine.training.reporting import ReportSummary, TrainingReport


def count_trained_tokens(inputs: dict) -> int:
    """Non-padding tokens of a collated batch: the attention mask's sum, or every token when padding-free."""
    if inputs.get("attention_mask") is not None:
        return int(inputs["attention_mask"].sum())
    if "num_tokens" in inputs:
        return int(inputs["num_tokens"])
    return int(inputs["input_ids"].numel())


def resolve_config(args, config_cls: type, trainer_name: str):
    """``args``, or ``config_cls(output_dir="outputs")`` when ``None``; any other config type is refused."""
    args = args if args is not None else config_cls(output_dir="outputs")
    if not isinstance(args, config_cls):
        raise ConfigurationError(f"{trainer_name} needs an engine.{config_cls.__name__}, got {type(args).__name__}")
    return args


def trainer_inputs(name: str, tokenizer, processing_class, train_dataset, *, needs_tokenizer: bool = True):
    """The tokenizer (passed as ``tokenizer=`` or ``processing_class=``), after checking what every trainer needs.

    Raises:
        ConfigurationError: no tokenizer (when ``needs_tokenizer``) or no ``train_dataset``.
    """
    tok = processing_class if processing_class is not None else tokenizer
    if needs_tokenizer and tok is None:
        raise ConfigurationError(f"{name} needs the tokenizer (tokenizer=...)")
    if train_dataset is None:
        raise ConfigurationError(f"{name} needs a train_dataset")
    return tok


def check_reference_policy(name: str, method: str, model, ref_model, precompute: bool) -> None:
    """DPO/KTO: the reference policy is the model with adapters off, or precomputed log-probs; never a 2nd model."""
    if ref_model is not None:
        raise ConfigurationError(
            f"{name} takes no ref_model: the reference policy is the model with its LoRA adapters disabled "
            "(no second copy of the weights), or precomputed log-probs (precompute_ref_log_probs=True)"
        )
    if not has_adapters(model) and not precompute:
        raise ConfigurationError(
            f"{method} without LoRA adapters has no built-in reference policy. Add adapters with "
            f"FastModel.get_peft_model(...) or set {method}Config(precompute_ref_log_probs=True)."
        )


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padded positions are never trained on)."""
    if tokenizer is None:
        return 0
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest-numbered ``checkpoint-<step>`` folder of ``output_dir`` whose save finished, or ``None``.

    transformers writes ``trainer_state.json`` last when it saves a checkpoint, and the engine writes every file
    under a temporary name first (:mod:`engine.files`), so a checkpoint is complete when its ``trainer_state.json``
    parses and its weights (``adapter_model.safetensors``, ``model.safetensors`` or a shard index) are in place.
    Newer, incomplete folders (a save that was killed) are skipped with a warning naming them.
    """
    import json
    import re
    import warnings

    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = sorted(
        ((int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))),
        reverse=True,
    )
    skipped = []
    for _, path in steps:
        try:
            json.loads((path / "trainer_state.json").read_text())
            complete = any((path / name).is_file() for name in (
                "adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json"))
        except (OSError, ValueError):
            complete = False
        if complete:
            if skipped:
                warnings.warn(
                    f"resuming from {path.name}: the newer {', '.join(skipped)} is incomplete (its save was "
                    "interrupted); delete it once training has resumed",
                    stacklevel=3,
                )
            return str(path)
        skipped.append(path.name)
    return None


class EngineTrainer(transformers.Trainer):
    """Base class of :class:`~engine.SFTTrainer` and :class:`~engine.DPOTrainer` (not used directly).

    Args:
        model (CausalLM): a model from :class:`engine.FastModel` (with or without LoRA).
        args (TrainingArguments): an :class:`~engine.SFTConfig` / :class:`~engine.DPOConfig`.
        tokenizer / processing_class: the tokenizer (either name works).
        Other arguments are passed to :class:`transformers.Trainer`.
    """

    def __init__(self, model=None, args=None, *, tokenizer=None, processing_class=None, callbacks=None, **kwargs):
        if not isinstance(model, CausalLM):
            raise ConfigurationError(
                f"{type(self).__name__} trains models loaded with engine.FastModel.from_pretrained, got "
                f"{type(model).__name__}. Load the model with FastModel (and add LoRA with FastModel.get_peft_model)."
            )
        if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
            raise ConfigurationError("pass the tokenizer once, as tokenizer= or processing_class=")
        processing_class = processing_class if processing_class is not None else tokenizer
        check_trainer_fsdp(model, args)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigurationError(
                "the model has no trainable parameters. Add LoRA adapters with FastModel.get_peft_model(model, ...) "
                "or load it with full_finetuning=True."
            )
        # Our collators produce exactly the columns the model needs.
        args.remove_unused_columns = False
        if model.device.type != "cuda":
            args.dataloader_pin_memory = False  # pinning only helps host-to-GPU copies
        self.report = TrainingReport(model.device)
        guard = NonFiniteGuard(getattr(args, "nonfinite", "error"), on_skip=self.report.add_skipped_step)
        super().__init__(
            model=model,
            args=args,
            processing_class=processing_class,
            callbacks=[*(callbacks or []), self.report, guard],
            **kwargs,
        )

    # ------------------------------------------------------------------ gradient checkpointing
    def step_shape(self) -> tuple[int, int]:
        """``(rows, tokens per row)`` of the largest batch one training step gets, which ``"auto"`` plans for.

        Here: ``per_device_train_batch_size`` rows of ``max_length`` tokens (the model's ``max_seq_length`` when
        ``max_length`` is ``None``); the trainers refine it for their collators (one padding-free row; DPO's
        chosen and rejected sequences).
        """
        length = getattr(self.args, "max_length", None) or self.model.max_seq_length
        return self.args.per_device_train_batch_size, length

    def train(self, *args, **kwargs):
        """:meth:`transformers.Trainer.train`, after choosing the gradient checkpointing policy.

        With ``use_gradient_checkpointing="auto"`` the memory planner picks the fastest policy whose planned step
        of :meth:`step_shape` fits the memory budget (see ``FastModel.resolve_gradient_checkpointing``). The
        choice is printed in one line and recorded in the report (``training_report.json``, ``checkpointing``).
        ``gradient_checkpointing=True`` in the config checkpoints every layer (``"smart"`` stays smart).
        With ``args.flush_denormals`` (off by default; see :mod:`engine.runtime`), CPU training runs with denormal
        floats flushed to zero; the previous setting is restored when training ends.
        """
        if args and args[0] is not None:
            args = (self._resolve_resume(args[0]), *args[1:])
        elif kwargs.get("resume_from_checkpoint") is not None:
            kwargs["resume_from_checkpoint"] = self._resolve_resume(kwargs["resume_from_checkpoint"])
        self._choose_checkpointing()
        with flush_denormals(enabled=self.model.device.type == "cpu" and self.args.flush_denormals):
            return super().train(*args, **kwargs)

    def _choose_checkpointing(self) -> CheckpointChoice:
        model = self.model
        requested = model.gradient_checkpointing
        args = self.args
        on = getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
        if on:  # the Trainer turns it on later; do it now, so that the report says so
            kwargs = dict(getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs or {})
            model.gradient_checkpointing_enable(
                every_n_layers=kwargs.pop("every_n_layers", 1), offload=kwargs.pop("offload", False)
            )
            choice = CheckpointChoice(
                current_policy(model), str(requested),
                f"gradient_checkpointing=True in the trainer's config (use_gradient_checkpointing was {requested!r})",
            )
        else:
            rows, seq_len = self.step_shape()
            optim = getattr(self.args.optim, "value", self.args.optim)
            choice = FastModel.resolve_gradient_checkpointing(
                model, rows, seq_len, optimizer=str(optim), when="trainer start", verbose=False
            )
        self.report.checkpointing = choice.as_dict()
        if self.is_world_process_zero():
            print(f"engine: {choice.summary()}")
        return choice

    @property
    def training_summary(self) -> ReportSummary | None:
        """Time and memory summary of the last :meth:`train` call (``None`` before training)."""
        return self.report.summary

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.report.add_tokens(count_trained_tokens(inputs))
        inputs = {k: v for k, v in inputs.items() if k != "num_tokens"}
        return super().training_step(model, inputs, num_items_in_batch)

    # ------------------------------------------------------------------ checkpoints
    def _resolve_resume(self, resume):
        """``resume_from_checkpoint=True`` means the last *complete* checkpoint of ``output_dir`` (see
        :func:`last_complete_checkpoint`), not the highest-numbered folder, which may be a save that was killed."""
        if resume is not True:
            return resume
        found = last_complete_checkpoint(self.args.output_dir)
        if found is None:
            raise CheckpointError(
                f"resume_from_checkpoint=True but {self.args.output_dir} holds no complete checkpoint-* folder "
                "(one whose trainer_state.json and weights were fully written). Start without resuming, or pass the "
                "path of a checkpoint folder."
            )
        return found

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        # FSDP2 (and DeepSpeed): transformers gathers the full state dict on every rank and passes it here; the
        # adapter is written from it. Without LoRA the model's own (unsharded) parameters are written.
        gathered = state_dict if has_adapters(model) else None
        model.save_pretrained(output_dir, state_dict=gathered)  # crash-safe (engine.files)
        with StagedFolder(output_dir) as stage:
            if self.processing_class is not None:
                stage.add_folder(self.processing_class.save_pretrained)
            torch.save(self.args, stage.path("training_args.bin"))  # written for transformers' tools; never loaded

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from safetensors.torch import load_file

        from engine.loading.safetensors_loader import iter_safetensors, safetensors_files
        from engine.peft import load_adapter_state_dict

        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        if is_fully_sharded(model):
            raise CheckpointError(
                "resuming an FSDP run is not supported by the engine's trainers yet. Resume with DDP (drop fsdp), or "
                f"load the adapter from {resume_from_checkpoint} with FastModel.from_pretrained and start a new run."
            )
        folder = Path(resume_from_checkpoint)
        adapter = folder / "adapter_model.safetensors"
        if has_adapters(model):
            if not adapter.is_file():
                raise CheckpointError(f"{folder} has no adapter_model.safetensors to resume the LoRA adapters from")
            load_adapter_state_dict(model, load_file(str(adapter)), source=str(adapter))
            return
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in iter_safetensors(safetensors_files(folder)):
                if name in params:
                    params[name].copy_(tensor)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
