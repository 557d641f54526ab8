"""engine.DPOTrainer end to end on the tiny chat model."""

from __future__ import annotations

import json

import pytest

from engine.data.load import load_jsonl
from engine import ConfigurationError, DatasetError, DPOConfig, DPOTrainer, FastModel


def _rows(n: int = 16) -> list[dict]:
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in load_jsonl("train", "dpo")[:n]]


def _model(folder, lora: bool = True):
    model, tokenizer = FastModel.from_pretrained(str(folder), dtype="float32", max_seq_length=512, verbose=False)
    if lora:
        model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, random_state=0)
    return model, tokenizer


def _args(tmp_path, **overrides) -> DPOConfig:
    base = {
        "output_dir": str(tmp_path / "out"), "max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
        "logging_steps": 1, "save_strategy": "no", "seed": 0, "max_length": 256, "use_cpu": True, "disable_tqdm": True,
    }
    return DPOConfig(**{**base, **overrides})


def _losses(trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


@pytest.mark.parametrize("padding_free", [False, True])
def test_dpo_trains_and_logs_metrics(tiny_chat_folder, tmp_path, padding_free):
    model, tok = _model(tiny_chat_folder)
    # The same 4 pairs every step: the preference margin must grow.
    args = _args(tmp_path, padding_free=padding_free, max_steps=5, learning_rate=2e-3)
    trainer = DPOTrainer(model=model, tokenizer=tok, train_dataset=_rows(4), args=args)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start (lora_B = 0)
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.01
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert key in logs[-1]
    assert logs[-1]["rewards/margins"] > 0
    report = json.loads((tmp_path / "out" / "training_report.json").read_text())
    assert report["steps"] == 5 and report["trained_tokens"] > 0


def test_precomputed_reference_equals_disabled_adapters(tiny_chat_folder, tmp_path):
    runs = {}
    for precompute in (False, True):
        model, tok = _model(tiny_chat_folder)
        trainer = DPOTrainer(
            model=model, tokenizer=tok, train_dataset=_rows(),
            args=_args(tmp_path / str(precompute), precompute_ref_log_probs=precompute, loss_type="ipo"),
        )
        if precompute:
            assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(trainer.train_dataset.column_names)
        trainer.train()
        runs[precompute] = _losses(trainer)
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)


def test_full_finetuning_needs_precomputed_reference(tiny_chat_folder, tmp_path):
    model, tok = _model(tiny_chat_folder, lora=False)
    with pytest.raises(ConfigurationError, match="precompute_ref_log_probs"):
        DPOTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=_args(tmp_path))
    trainer = DPOTrainer(
        model=model, tokenizer=tok, train_dataset=_rows(8),
        args=_args(tmp_path, precompute_ref_log_probs=True, max_steps=2, learning_rate=1e-4),
    )
    trainer.train()
    assert _losses(trainer)[0] == pytest.approx(0.6931, abs=1e-3)


def test_evaluate_reports_reward_accuracy(tiny_chat_folder, tmp_path):
    model, tok = _model(tiny_chat_folder)
    trainer = DPOTrainer(model=model, tokenizer=tok, train_dataset=_rows(), eval_dataset=_rows(8), args=_args(tmp_path))
    metrics = trainer.evaluate()
    assert "eval_rewards/accuracies" in metrics and metrics["eval_loss"] == pytest.approx(0.6931, abs=1e-3)


def test_dpo_bad_input(tiny_chat_folder, tmp_path):
    model, tok = _model(tiny_chat_folder)
    with pytest.raises(ConfigurationError, match="ref_model"):
        DPOTrainer(model=model, ref_model=model, tokenizer=tok, train_dataset=_rows(), args=_args(tmp_path))
    with pytest.raises(DatasetError, match="rejected"):
        DPOTrainer(model=model, tokenizer=tok, train_dataset=[{"prompt": "a", "chosen": "b"}], args=_args(tmp_path))
    with pytest.raises(DatasetError):
        DPOTrainer(model=model, tokenizer=tok, train_dataset=[], args=_args(tmp_path))
    with pytest.raises(ConfigurationError, match="loss_type"):
        DPOConfig(output_dir=str(tmp_path), loss_type="kto")
    with pytest.raises(ConfigurationError, match="label_smoothing"):
        DPOConfig(output_dir=str(tmp_path), loss_type="ipo", label_smoothing=0.1)
