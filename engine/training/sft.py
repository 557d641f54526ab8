"""Supervised fine-tuning: :class:`SFTTrainer`.

Pipeline (each step in its own module)::

    dataset ──tokenize_sft_dataset──▶ input_ids, labels         (engine.training.sft_data)
            ──pack_dataset (BFD)────▶ rows of ≤ max_length      (engine.training.packing)
            ──PaddingFreeCollator───▶ one row per batch, position ids restarting per document
            ──CausalLM.forward──────▶ loss (fused linear cross-entropy, no full logits)

With packing, attention never crosses a document boundary and RoPE positions restart at
every document, so the loss equals the token-weighted mean of the documents' losses run
one by one (tested).
"""

from __future__ import annotations

import datasets
import torch

from engine.errors import ConfigurationError
from engine.training.rows import as_dataset
from engine.training.base import EngineTrainer, pad_token_id, resolve_config, trainer_inputs
from engine.training.collators import PaddedCollator, PaddingFreeCollator
from engine.training.config import SFTConfig
from engine.training.packing import pack_dataset
from engine.training.sft_data import tokenize_sft_dataset

#: Batch keys the model's forward takes (cu_seq_lens: the padding-free collator's document boundaries).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels", "cu_seq_lens")


class SFTTrainer(EngineTrainer):
    """Fine-tune on text, prompt/completion or chat (``messages``) data.

    Args:
        model (CausalLM): from :class:`engine.FastModel` (usually with LoRA).
        args (SFTConfig, optional): defaults to ``SFTConfig(output_dir="outputs")``.
        train_dataset / eval_dataset: a :class:`datasets.Dataset` or a list of dicts, either raw
            (``text`` / ``prompt`` + ``completion`` / ``messages`` columns) or already tokenized
            (an ``input_ids`` column, optional ``labels``).
        tokenizer / processing_class: the tokenizer (needed for raw datasets).
        data_collator: overrides the collator chosen from ``packing`` / ``padding_free``.

    Example::

        trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=rows,
                             args=SFTConfig(output_dir="out", max_steps=60, per_device_train_batch_size=4))
        trainer.train()   # prints a time/memory summary and writes out/training_report.json
    """

    def __init__(
        self,
        model=None,
        args: SFTConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        *,
        tokenizer=None,
        processing_class=None,
        data_collator=None,
        **kwargs,
    ):
        args = resolve_config(args, SFTConfig, "SFTTrainer")
        tok = trainer_inputs("SFTTrainer", tokenizer, processing_class, train_dataset, needs_tokenizer=False)
        seq_limit = getattr(model, "max_seq_length", None)
        note = None
        if args.max_length is None and seq_limit is not None:
            args.max_length = seq_limit
            note = f"max_length={seq_limit}: the model's max_seq_length (SFTConfig.max_length was not set)"
            print(f"engine: {note}")
        max_length = args.max_length
        if max_length is not None and seq_limit is not None and max_length > seq_limit:
            raise ConfigurationError(
                f"SFTConfig.max_length={max_length} is longer than the model's max_seq_length={seq_limit}. "
                f"Lower max_length or load the model with FastModel.from_pretrained(..., max_seq_length={max_length})."
            )
        train_dataset = self._prepare(train_dataset, tok, args, packing=args.packing, split="train")
        if eval_dataset is not None:
            eval_dataset = self._prepare(eval_dataset, tok, args, packing=args.eval_packing, split="eval")
        if data_collator is None:
            pad_id = pad_token_id(tok)
            if args.padding_free or args.packing:
                data_collator = PaddingFreeCollator(pad_token_id=pad_id)
            else:
                data_collator = PaddedCollator(pad_token_id=pad_id)
        super().__init__(
            model=model,
            args=args,
            processing_class=tok,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=data_collator,
            **kwargs,
        )
        if note:
            self.report.notes.append(note)

    @staticmethod
    def _prepare(dataset, tokenizer, args: SFTConfig, *, packing: bool, split: str) -> datasets.Dataset:
        if isinstance(dataset, list):
            dataset = as_dataset(dataset)
        if "input_ids" in dataset.column_names:
            if "labels" not in dataset.column_names:
                dataset = dataset.map(lambda row: {"labels": list(row["input_ids"])}, desc=f"labels ({split})")
        else:
            if tokenizer is None:
                raise ConfigurationError("SFTTrainer needs a tokenizer (tokenizer=...) to tokenize a raw dataset")
            dataset = tokenize_sft_dataset(
                dataset,
                tokenizer,
                max_length=args.max_length,
                dataset_text_field=args.dataset_text_field,
                completion_only_loss=args.completion_only_loss,
                assistant_only_loss=args.assistant_only_loss,
                truncation=args.long_examples,
                add_eos=args.add_eos,
                drop_fully_masked=args.drop_fully_masked,
                num_proc=args.dataset_num_proc,
            )
        if packing:
            dataset = pack_dataset(dataset, args.max_length)
        return dataset

    def step_shape(self) -> tuple[int, int]:
        """Padding-free batches (packing or ``padding_free``) are one row of up to ``batch x max_length`` tokens;
        padded batches ``batch`` rows of up to ``max_length``."""
        rows, length = super().step_shape()
        collator = self.data_collator
        if isinstance(collator, PaddingFreeCollator):
            total = rows * length
            multiple = collator.pad_to_multiple_of or 1
            return 1, -(-total // multiple) * multiple
        return rows, length

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k in MODEL_INPUTS}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss only when only the loss is wanted (``evaluate()`` without ``compute_metrics``: the fused loss
        never materialises logits); otherwise transformers' ``prediction_step``, with the logits the model returns
        in eval mode (``[b, s, V]`` per batch, for ``compute_metrics``)."""
        if not prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

