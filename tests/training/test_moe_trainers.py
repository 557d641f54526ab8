"""The trainers on tiny mixture-of-experts models (SmolLM2's tokenizer): SFT with the load-balancing loss in its loss
trains, and DPO trains the expert adapters (the reference is the model with every adapter, experts' too, off)."""

from __future__ import annotations

import pytest

from engine import DPOConfig, DPOTrainer, FastModel, SFTConfig, SFTTrainer
from engine.data.load import load_jsonl
from engine.modules.moe import Experts
from tests.conftest import save_family_chat_model

ROWS = [
    {"prompt": "Capital of France?", "completion": " Paris is the capital."},
    {"prompt": "Colour of the sky?", "completion": " The sky is blue."},
]


def test_sft_with_router_aux_loss_trains_a_tiny_mixtral(tmp_path, smollm2_tokenizer):
    folder = save_family_chat_model("mixtral", tmp_path / "model", smollm2_tokenizer, output_router_logits=True,
                                    router_aux_loss_coef=0.01)
    model, tokenizer = FastModel.from_pretrained(str(folder), dtype="float32", max_seq_length=128, verbose=False)
    assert model.args.output_router_logits  # the loss includes router_aux_loss_coef * aux_loss
    model = FastModel.get_peft_model(model, r=16, lora_alpha=32, random_state=0)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=10, per_device_train_batch_size=2, learning_rate=3e-2,
        logging_steps=1, save_strategy="no", seed=0, max_length=64, use_cpu=True, disable_tqdm=True,
        packing=False, report_to=[],
    )
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=ROWS * 8, args=args)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < 0.6 * losses[0], losses
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert experts and all(m.gate_up_proj_lora_B.abs().sum() > 0 for m in experts)


def test_dpo_trains_expert_adapters(tmp_path, smollm2_tokenizer):
    folder = save_family_chat_model("qwen3_moe", tmp_path / "model", smollm2_tokenizer)
    model, tokenizer = FastModel.from_pretrained(str(folder), dtype="float32", max_seq_length=256, verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, random_state=0)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in load_jsonl("train", "dpo")[:2]]
    args = DPOConfig(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2, learning_rate=2e-3,
        logging_steps=1, save_strategy="no", seed=0, max_length=256, use_cpu=True, disable_tqdm=True,
        padding_free=True, report_to=[],
    )
    trainer = DPOTrainer(model=model, tokenizer=tokenizer, train_dataset=rows, args=args)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: every adapter starts at B = 0
    assert logs[-1]["loss"] < logs[0]["loss"]
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert experts and all(m.down_proj_lora_B.abs().sum() > 0 for m in experts)
