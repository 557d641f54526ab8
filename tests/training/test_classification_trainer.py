"""ClassificationTrainer and transformers.Trainer on a tiny classifier (SmolLM2's tokenizer, random 2-layer Llama)."""

from __future__ import annotations

import pytest
import torch
import transformers

from engine import ClassificationConfig, ClassificationTrainer, ConfigurationError, DatasetError, FastModel
from engine.training.classification import ClassificationCollator

# Two classes told apart by their first word; the model must learn to look back from the pooled last token.
ROWS = [{"text": f"{word} item number {i} of the list", "label": label}
        for i in range(24) for word, label in (("apple", 0), ("stone", 1))]


def _classifier(folder, **kwargs):
    model, tokenizer = FastModel.from_pretrained(folder, dtype=torch.float32, device="cpu", verbose=False,
                                                 num_labels=2, **kwargs)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    return model, tokenizer


def _config(tmp_path, **kwargs):
    return ClassificationConfig(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, per_device_eval_batch_size=16,
        learning_rate=3e-3, logging_steps=4, save_strategy="no", seed=0, max_length=32, **kwargs,
    )


def test_classification_trainer_learns_and_reports_accuracy(tiny_chat_folder, tmp_path):
    model, tokenizer = _classifier(tiny_chat_folder)
    assert model.pad_token_id == tokenizer.pad_token_id is not None
    trainer = ClassificationTrainer(model=model, tokenizer=tokenizer, args=_config(tmp_path, padding_side="left"),
                                    train_dataset=ROWS, eval_dataset=ROWS[:16])
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_accuracy"] == 1.0, after  # 0.5 (chance) or so before; measured 1.0 after 8 steps
    assert trainer.training_summary is not None and trainer.training_summary.trained_tokens > 0
    assert (tmp_path / "training_report.json").is_file()


def test_transformers_trainer_trains_the_classifier(tiny_chat_folder, tmp_path):
    model, tokenizer = _classifier(tiny_chat_folder)
    encoded = [{"input_ids": tokenizer(r["text"])["input_ids"], "labels": r["label"]} for r in ROWS]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8,
                                          learning_rate=3e-3, report_to=[], save_strategy="no", logging_steps=1,
                                          remove_unused_columns=False, use_cpu=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=encoded,
                                   data_collator=ClassificationCollator(model.pad_token_id))
    head_before = model.score.weight.detach().clone()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
    assert not torch.equal(model.score.weight, head_before)  # the head is trained, not frozen


def test_bad_inputs_are_refused(tiny_chat_folder, hf_folders, tmp_path):
    model, tokenizer = _classifier(tiny_chat_folder)
    with pytest.raises(DatasetError, match=r"example 1: label 2 is outside \[0, 2\).*num_labels=2"):
        ClassificationTrainer(model=model, tokenizer=tokenizer, args=_config(tmp_path),
                              train_dataset=[{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    with pytest.raises(DatasetError, match="no column"):
        ClassificationTrainer(model=model, tokenizer=tokenizer, args=_config(tmp_path),
                              train_dataset=[{"sentence": "a", "label": 0}])
    causal, _ = FastModel.from_pretrained(hf_folders["llama"], dtype=torch.float32, device="cpu", verbose=False)
    with pytest.raises(ConfigurationError, match="num_labels"):
        ClassificationTrainer(model=causal, args=_config(tmp_path), train_dataset=ROWS)
    no_pad, _ = FastModel.from_pretrained(hf_folders["llama"], dtype=torch.float32, device="cpu", verbose=False,
                                          num_labels=2)
    with pytest.raises(ConfigurationError, match="no pad token"):
        ClassificationTrainer(model=no_pad, args=_config(tmp_path), train_dataset=[{"input_ids": [1, 2], "labels": 0}])
