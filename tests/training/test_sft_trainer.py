"""engine.SFTTrainer end to end on the tiny chat model: training, reporting, checkpoints, errors."""

from __future__ import annotations

import json

import pytest
import torch

from engine import ConfigurationError, DatasetError, FastModel, SFTConfig, SFTTrainer
from engine.peft import adapter_state_dict


def _rows(n: int = 24) -> list[dict]:
    return [
        {"prompt": f"What is {i} plus {i % 7}?", "completion": f"{i} plus {i % 7} is {i + i % 7}." + " Yes." * (i % 4)}
        for i in range(n)
    ]


def _model(folder, **lora):
    model, tokenizer = FastModel.from_pretrained(str(folder), dtype="float32", max_seq_length=256, verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, random_state=0, **lora)
    return model, tokenizer


def _args(tmp_path, **overrides) -> SFTConfig:
    base = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 0,
        "max_length": 64,
        "use_cpu": True,
        "disable_tqdm": True,
    }
    return SFTConfig(**{**base, **overrides})


def test_trains_and_reports(tiny_chat_folder, tmp_path, capsys):
    model, tok = _model(tiny_chat_folder)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=_args(tmp_path, max_steps=6))
    # Packing is on by default: 24 short examples fit in fewer rows of 64 tokens.
    assert len(trainer.train_dataset) < 24
    assert set(trainer.train_dataset.column_names) >= {"input_ids", "labels", "position_ids"}
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0]
    summary = trainer.training_summary
    assert summary.steps == 6 and summary.trained_tokens > 0 and summary.tokens_per_second > 0
    assert summary.memory["peak_memory_bytes"] > 0
    written = json.loads((tmp_path / "out" / "training_report.json").read_text())
    assert written["trained_tokens"] == summary.trained_tokens
    assert len(written["step_records"]) == 6
    out = capsys.readouterr().out
    assert "training summary" in out and "tok/s" in out and "peak memory" in out


def test_trained_tokens_are_the_real_tokens(tiny_chat_folder, tmp_path):
    """Padding is not counted: padded and padding-free runs count the same tokens."""
    counts = {}
    for padding_free in (True, False):
        model, tok = _model(tiny_chat_folder)
        args = _args(tmp_path / str(padding_free), packing=False, padding_free=padding_free, max_steps=2)
        trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=args)
        trainer.train()
        counts[padding_free] = trainer.training_summary.trained_tokens
    assert counts[True] == counts[False] > 0


def test_gradient_accumulation_equals_big_batch(tiny_chat_folder, tmp_path):
    """Batch 4 equals 2 micro-batches of 2: the loss is normalised over the whole accumulated batch."""
    weights = {}
    for name, (batch, accum) in {"big": (4, 1), "accum": (2, 2)}.items():
        model, tok = _model(tiny_chat_folder)
        args = _args(tmp_path / name, packing=False, per_device_train_batch_size=batch, gradient_accumulation_steps=accum)
        SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=args).train()
        weights[name] = adapter_state_dict(model)
    for key, value in weights["big"].items():
        torch.testing.assert_close(weights["accum"][key], value, rtol=1e-4, atol=1e-6)


def test_checkpoint_and_resume(tiny_chat_folder, tmp_path):
    model, tok = _model(tiny_chat_folder)
    args = _args(tmp_path / "full", save_strategy="steps", save_steps=2)
    SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=args).train()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "adapter_config.json").is_file()
    uninterrupted = adapter_state_dict(model)

    resumed_model, tok = _model(tiny_chat_folder)
    trainer = SFTTrainer(model=resumed_model, tokenizer=tok, train_dataset=_rows(), args=args)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    for key, value in adapter_state_dict(resumed_model).items():
        torch.testing.assert_close(value, uninterrupted[key], rtol=1e-5, atol=1e-7)


def test_evaluate(tiny_chat_folder, tmp_path):
    model, tok = _model(tiny_chat_folder)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), eval_dataset=_rows(8), args=_args(tmp_path))
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"])) and metrics["eval_loss"] > 0


def test_smart_checkpointing_trains_like_plain(tiny_chat_folder, tmp_path):
    weights = {}
    for mode in (False, True, "smart"):
        model, tok = _model(tiny_chat_folder)
        FastModel.set_gradient_checkpointing(model, mode)
        SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=_args(tmp_path / str(mode), max_steps=2)).train()
        weights[mode] = adapter_state_dict(model)
    for mode in (True, "smart"):
        for key, value in weights[False].items():
            torch.testing.assert_close(weights[mode][key], value, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- bad input
def test_missing_columns(tiny_chat_folder, tmp_path):
    model, tok = _model(tiny_chat_folder)
    with pytest.raises(DatasetError, match="question"):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=[{"question": "a", "answer": "b"}], args=_args(tmp_path))


def test_empty_dataset(tiny_chat_folder, tmp_path):
    model, tok = _model(tiny_chat_folder)
    with pytest.raises(DatasetError):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=[], args=_args(tmp_path))


def test_max_length_over_model_limit(tiny_chat_folder, tmp_path):
    model, tok = _model(tiny_chat_folder)
    with pytest.raises(ConfigurationError, match="max_seq_length"):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=_args(tmp_path, max_length=1000))


def test_not_an_engine_model(tiny_chat_folder, tmp_path):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_chat_folder))
    _, tok = _model(tiny_chat_folder)
    with pytest.raises(ConfigurationError, match="FastModel"):
        SFTTrainer(model=hf, tokenizer=tok, train_dataset=_rows(), args=_args(tmp_path))


def test_no_trainable_parameters(tiny_chat_folder, tmp_path):
    model, tok = FastModel.from_pretrained(str(tiny_chat_folder), dtype="float32", verbose=False)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigurationError, match="trainable"):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=_args(tmp_path))


def test_bad_config_values(tmp_path):
    with pytest.raises(ConfigurationError):
        SFTConfig(output_dir=str(tmp_path), long_examples="drop")
    with pytest.raises(ConfigurationError, match="max_length must be at least 2"):
        SFTConfig(output_dir=str(tmp_path), max_length=1)


def test_cpu_training_flushes_denormals_on_request_and_restores_the_setting(tiny_chat_folder, tmp_path):
    from transformers import TrainerCallback

    from engine.runtime import denormals_flushed, flush_denormals

    assert SFTConfig(output_dir=str(tmp_path)).flush_denormals is False  # opt-in: no measured gain
    assert not denormals_flushed()
    with flush_denormals() as supported:
        assert supported and denormals_flushed()
    assert not denormals_flushed()

    seen = []

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append(denormals_flushed())

    for flush in (True, False):
        model, tok = _model(tiny_chat_folder)
        args = _args(tmp_path / str(flush), max_steps=2, flush_denormals=flush)
        SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=args, callbacks=[Probe()]).train()
        assert seen[-2:] == [flush, flush]
        assert not denormals_flushed()  # restored after training


def test_max_length_defaults_to_the_models_max_seq_length(tiny_chat_folder, tmp_path):
    model, tok = FastModel.from_pretrained(str(tiny_chat_folder), dtype="float32", max_seq_length=96, verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, random_state=0)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, save_strategy="no",
                     use_cpu=True, report_to=[])
    assert args.max_length is None  # TRL's default would be 1024, longer than this model's 96
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=args)
    assert trainer.args.max_length == 96
    trainer.train()
    assert trainer.training_summary.notes == ["max_length=96: the model's max_seq_length (SFTConfig.max_length was not set)"]


def test_eval_mode_returns_logits_with_the_loss_and_compute_metrics_works(tiny_chat_folder, tmp_path):
    import numpy as np

    model, tok = _model(tiny_chat_folder)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    model.train()
    assert model(ids, labels=ids).logits is None  # training: fused loss, no [N, V] logits
    model.eval()
    with torch.no_grad():
        out = model(ids, labels=ids)
        plain = model(ids).logits
    torch.testing.assert_close(out.logits, plain)
    assert model(ids, labels=ids, return_logits=False).logits is None

    def token_accuracy(prediction):
        logits, labels = prediction.predictions, prediction.label_ids
        predicted, target = logits[..., :-1, :].argmax(-1), labels[..., 1:]
        mask = target != -100
        return {"token_accuracy": float((predicted[mask] == target[mask]).mean())}

    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), eval_dataset=_rows(8), args=_args(tmp_path),
                         compute_metrics=token_accuracy)
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_token_accuracy"] <= 1.0 and np.isfinite(metrics["eval_loss"])
