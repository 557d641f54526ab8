"""A NaN injected into one step's forward pass stops training with an error naming the step (default), or the step
is skipped — weights and optimizer state untouched — and counted in the report (``nonfinite="skip"``)."""

from __future__ import annotations

import json

import pytest
import torch

from engine import ConfigurationError, FastModel, SFTConfig, SFTTrainer
from engine.peft import adapter_state_dict
from engine.training.nonfinite import NonFiniteError


def _rows(n: int = 24) -> list[dict]:
    return [{"prompt": f"What is {i} plus 2?", "completion": f"{i + 2}."} for i in range(n)]


def _trainer(folder, tmp_path, **overrides):
    model, tok = FastModel.from_pretrained(str(folder), dtype="float32", max_seq_length=64, verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, random_state=0)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, save_strategy="no", seed=0, max_length=64, use_cpu=True, report_to=[],
                     lr_scheduler_type="constant",
                     **overrides)
    return SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=args)


def _poison_forward(model, at_call: int) -> list[int]:
    """Make the ``at_call``-th forward pass (1-based) of the first decoder layer output NaN."""
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1
        if calls[0] == at_call:
            return output * float("nan") if torch.is_tensor(output) else (output[0] * float("nan"), *output[1:])
        return output

    model.model.layers[0].register_forward_hook(hook)
    return calls


def test_nan_stops_training_naming_the_step(tiny_chat_folder, tmp_path):
    trainer = _trainer(tiny_chat_folder, tmp_path)
    _poison_forward(trainer.model, at_call=3)
    with pytest.raises(NonFiniteError, match=r"optimizer step 3: the gradients .* NaN or infinite") as info:
        trainer.train()
    assert "nonfinite='skip'" in str(info.value)
    for name, value in adapter_state_dict(trainer.model).items():
        assert torch.isfinite(value).all(), f"{name} was updated with NaN gradients"


def test_skip_leaves_weights_and_counts_the_step(tiny_chat_folder, tmp_path):
    clean = _trainer(tiny_chat_folder, tmp_path / "clean", nonfinite="skip")
    clean.args.max_steps = 2
    clean.train()
    after_two_clean_steps = adapter_state_dict(clean.model)

    trainer = _trainer(tiny_chat_folder, tmp_path, nonfinite="skip")
    trainer.args.max_steps = 3
    _poison_forward(trainer.model, at_call=3)  # step 3's forward
    with pytest.warns(UserWarning, match="optimizer step 3 skipped"):
        trainer.train()
    assert trainer.training_summary.skipped_steps == [3]
    report = json.loads((tmp_path / "out" / "training_report.json").read_text())
    assert report["skipped_steps"] == [3]
    # Step 3 was skipped: the adapter is exactly the one after two clean steps.
    for name, value in adapter_state_dict(trainer.model).items():
        torch.testing.assert_close(value, after_two_clean_steps[name], rtol=0, atol=0)


def test_unknown_policy_is_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="nonfinite must be 'error' or 'skip'"):
        SFTConfig(output_dir=str(tmp_path), nonfinite="ignore")
