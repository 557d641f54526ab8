"""Our model equals transformers (+ PEFT) in fp32: logits, loss, and gradients w.r.t. input
embeddings and LoRA weights, for every supported family, with and without padding."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from engine import FastModel
from engine.peft import lora_modules
from tests.conftest import FAMILY_CONFIGS, make_hf_model

FAMILIES = list(FAMILY_CONFIGS)
RTOL = 1e-5


def assert_close_rel(actual, expected, rtol=RTOL, what=""):
    """``|a - e| <= rtol * max|e|`` elementwise (relative to the tensor's scale)."""
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:g} x scale {scale:.3e}"


def load_pair(family, folder, lora: bool):
    hf = make_hf_model(family)
    ours, _ = FastModel.from_pretrained(folder, dtype=torch.float32, device="cpu", verbose=False)
    if not lora:
        return hf, ours
    ours = FastModel.get_peft_model(ours, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    hf = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=list(ours.lora_settings.target_modules)))
    # Non-zero B so that every gradient is informative; same values on both sides.
    g = torch.Generator().manual_seed(7)
    peft_params = dict(hf.named_parameters())
    for name, m in lora_modules(ours).items():
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
            peft_params[f"base_model.model.{name}.lora_A.default.weight"].copy_(m.lora_A)
            peft_params[f"base_model.model.{name}.lora_B.default.weight"].copy_(m.lora_B)
    hf.train()
    ours.train()
    return hf, ours


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, hf_folders):
    hf, ours = load_pair(family, hf_folders[family], lora=False)
    ids = torch.randint(0, hf.config.vocab_size, (2, 19))
    with torch.no_grad():
        expected = hf(ids).logits
        actual = ours(ids).logits
    assert_close_rel(actual, expected, what=f"{family} logits")


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_loss_and_gradients_match_peft(family, hf_folders):
    hf, ours = load_pair(family, hf_folders[family], lora=True)
    ids = torch.randint(0, hf.config.vocab_size, (2, 23))
    labels = ids.clone()
    labels[0, :5] = -100
    embeds = hf.get_input_embeddings()(ids).detach()
    e_hf = embeds.clone().requires_grad_(True)
    e_ours = embeds.clone().requires_grad_(True)
    out_hf = hf(inputs_embeds=e_hf, labels=labels)
    out_ours = ours(inputs_embeds=e_ours, labels=labels)
    assert_close_rel(out_ours.loss, out_hf.loss, what=f"{family} loss")
    out_hf.loss.backward()
    out_ours.loss.backward()
    assert_close_rel(e_ours.grad, e_hf.grad, what=f"{family} d(loss)/d(inputs_embeds)")
    peft_params = dict(hf.named_parameters())
    modules = lora_modules(ours)
    assert len(modules) == len(ours.args.family.lora_targets) * hf.config.num_hidden_layers
    for name, m in modules.items():
        for part in ("A", "B"):
            ours_grad = getattr(m, f"lora_{part}").grad
            ref_grad = peft_params[f"base_model.model.{name}.lora_{part}.default.weight"].grad
            assert_close_rel(ours_grad, ref_grad, what=f"{family} {name} lora_{part} grad")


@pytest.mark.parametrize("family", FAMILIES)
def test_right_padding_matches_transformers(family, hf_folders):
    hf, ours = load_pair(family, hf_folders[family], lora=True)
    ids = torch.randint(0, hf.config.vocab_size, (3, 14))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    ref = hf(ids, attention_mask=mask, labels=labels)
    got = ours(ids, attention_mask=mask, labels=labels, return_logits=True)
    valid = mask.bool()
    assert_close_rel(got.logits[valid], ref.logits[valid], what=f"{family} padded logits")
    assert_close_rel(got.loss, ref.loss, what=f"{family} padded loss")
    ref.loss.backward()
    got.loss.backward()
    peft_params = dict(hf.named_parameters())
    for name, m in lora_modules(ours).items():
        for part in ("A", "B"):
            ref_grad = peft_params[f"base_model.model.{name}.lora_{part}.default.weight"].grad
            assert_close_rel(getattr(m, f"lora_{part}").grad, ref_grad, what=f"{family} padded {name} lora_{part} grad")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_left_padding_matches_unpadded_rows(family, hf_folders):
    """A left-padded row gives the same logits as the same tokens alone (positions from the mask)."""
    _, ours = load_pair(family, hf_folders[family], lora=False)
    short = torch.randint(0, 200, (1, 6))
    long = torch.randint(0, 200, (1, 10))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    with torch.no_grad():
        padded = ours(batch, attention_mask=mask).logits
        alone = ours(short).logits
    assert_close_rel(padded[0, 4:], alone[0], what="left-padded row")
    assert torch.isfinite(padded).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_equals_each_document_alone_in_transformers(family, hf_folders):
    """One padding-free row of three documents (restarting position ids), with LoRA: per-document logits, the
    loss and every LoRA gradient equal transformers + PEFT run on each document by itself (the loss summed over
    documents and divided by all predicted tokens; documents longer than the sliding window of 6)."""
    hf, ours = load_pair(family, hf_folders[family], lora=True)
    docs = [torch.randint(0, 211, (1, n)) for n in (9, 4, 13)]
    row = torch.cat(docs, 1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    got = ours(row, position_ids=positions, labels=row, return_logits=True)
    count = sum(d.shape[1] - 1 for d in docs)
    total, start = 0.0, 0
    for d in docs:
        n = d.shape[1]
        ref = hf(d, labels=d)
        assert_close_rel(got.logits[0, start:start + n], ref.logits[0], what=f"{family} packed document")
        total = total + ref.loss * (n - 1) / count
        start += n
    assert_close_rel(got.loss, total, what=f"{family} packed loss")
    got.loss.backward()
    total.backward()
    peft_params = dict(hf.named_parameters())
    for name, m in lora_modules(ours).items():
        for part in ("A", "B"):
            ref_grad = peft_params[f"base_model.model.{name}.lora_{part}.default.weight"].grad
            assert_close_rel(getattr(m, f"lora_{part}").grad, ref_grad, what=f"{family} packed {name} lora_{part} grad")


def test_sliding_window_changes_attention(hf_folders):
    """Mistral's window (6) is active on 19 tokens: logits differ from the same weights without a window."""
    hf, ours = load_pair("mistral", hf_folders["mistral"], lora=False)
    ids = torch.randint(0, 200, (1, 19))
    with torch.no_grad():
        windowed = ours(ids).logits
        for layer in ours.model.layers:
            layer.self_attn.sliding_window = None
        full = ours(ids).logits
    assert not torch.allclose(windowed[:, 6:], full[:, 6:], atol=1e-4)
    assert torch.allclose(windowed[:, :6], full[:, :6], atol=1e-6)
