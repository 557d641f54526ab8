"""An end-to-end SFT on each family added after Llama (tiny random models with SmolLM2's tokenizer): the loss falls
and the model then generates the answers it was taught."""

from __future__ import annotations

import pytest
import torch

from engine import FastModel, SFTConfig, SFTTrainer
from tests.conftest import save_family_chat_model

ROWS = [
    {"prompt": "Capital of France?", "completion": " Paris is the capital."},
    {"prompt": "Colour of the sky?", "completion": " The sky is blue."},
]


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3", "phi3"])
def test_sft_teaches_a_tiny_model_of_each_family(family, tmp_path, smollm2_tokenizer):
    # Gemma 2 with its published soft-caps (the parity config's 2.5 final cap bounds the logits too tightly to learn).
    caps = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0} if family == "gemma2" else {}
    folder = save_family_chat_model(family, tmp_path / "model", smollm2_tokenizer, **caps)
    model, tokenizer = FastModel.from_pretrained(str(folder), dtype="float32", max_seq_length=128, verbose=False)
    model = FastModel.get_peft_model(model, r=16, lora_alpha=32, random_state=0)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=25, per_device_train_batch_size=2, learning_rate=3e-2,
        logging_steps=1, save_strategy="no", seed=0, max_length=64, use_cpu=True, disable_tqdm=True,
        packing=False, report_to=[],
    )
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=ROWS * 8, args=args)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < 0.2 * losses[0], losses
    FastModel.for_inference(model)
    for row in ROWS:
        prompt = tokenizer(row["prompt"], return_tensors="pt")["input_ids"]
        answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=len(answer), do_sample=False)
        assert tokenizer.decode(out[0, prompt.shape[1]:]) == row["completion"], family
