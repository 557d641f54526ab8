"""Sequence classification: parity with transformers' *ForSequenceClassification (+ PEFT), saving, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from engine import ConfigurationError, DatasetError, FastModel
from engine.models.classification import CausalLMForSequenceClassification
from engine.peft import lora_modules
from tests.conftest import make_hf_model
from tests.test_parity import assert_close_rel

PAD = 0
NUM_LABELS = 3


def hf_classifier(family: str, num_labels: int = NUM_LABELS, pad_token_id: int | None = PAD):
    """transformers' classification model of ``family`` with the tiny causal model's decoder weights."""
    causal = make_hf_model(family)
    config = copy.deepcopy(causal.config)
    config.num_labels, config.pad_token_id = num_labels, pad_token_id
    hf = transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    hf.model.load_state_dict(causal.model.state_dict())
    return hf.eval()


def load_ours(folder, num_labels: int = NUM_LABELS, pad_token_id: int | None = PAD, **kwargs):
    model, _ = FastModel.from_pretrained(
        folder, dtype=torch.float32, device="cpu", verbose=False, num_labels=num_labels, pad_token_id=pad_token_id,
        **kwargs,
    )
    return model


def lora_pair(family, folder):
    """Ours and transformers + PEFT (task SEQ_CLS: the head in modules_to_save) with equal weights, LoRA B non-zero."""
    ours = load_ours(folder)
    hf = hf_classifier(family)
    with torch.no_grad():
        hf.score.weight.copy_(ours.score.weight)
    ours = FastModel.get_peft_model(ours, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    hf = get_peft_model(hf, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                       target_modules=list(ours.lora_settings.target_modules)))
    peft_params = dict(hf.named_parameters())
    g = torch.Generator().manual_seed(7)
    for name, m in lora_modules(ours).items():
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
            peft_params[f"base_model.model.{name}.lora_A.default.weight"].copy_(m.lora_A)
            peft_params[f"base_model.model.{name}.lora_B.default.weight"].copy_(m.lora_B)
    assert torch.equal(peft_params["base_model.model.score.modules_to_save.default.weight"], ours.score.weight)
    return ours, hf, peft_params


def padded_batch(side: str):
    """Three rows of 9, 6 and 4 tokens, padded with PAD on ``side``; ids never equal PAD inside a row."""
    g = torch.Generator().manual_seed(3)
    lengths, s = (9, 6, 4), 9
    ids = torch.full((3, s), PAD)
    for i, n in enumerate(lengths):
        row = torch.randint(1, 200, (n,), generator=g)
        if side == "right":
            ids[i, :n] = row
        else:
            ids[i, s - n:] = row
    return ids, (ids != PAD).long()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_lora_logits_loss_and_gradients_match_transformers_and_peft(family, side, hf_folders):
    ours, hf, peft_params = lora_pair(family, hf_folders[family])
    ids, mask = padded_batch(side)
    # transformers counts positions 0..s-1 whatever the mask; ours counts from each row's first real token.
    # Give both the same positions so that left-padded rows compare (right padding: identical either way).
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    labels = torch.tensor([2, 0, 1])
    ours.train()
    hf.train()
    out = ours(ids, attention_mask=mask, position_ids=positions, labels=labels)
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels)
    assert out.logits.shape == (3, NUM_LABELS)
    assert_close_rel(out.logits, ref.logits, what="logits")
    assert_close_rel(out.loss, ref.loss, what="loss")
    out.loss.backward()
    ref.loss.backward()
    assert ours.score.weight.grad is not None and ours.score.weight.grad.abs().sum() > 0
    assert_close_rel(ours.score.weight.grad, peft_params["base_model.model.score.modules_to_save.default.weight"].grad,
                     what="score grad")
    for name, m in lora_modules(ours).items():
        for part in ("A", "B"):
            ref_grad = peft_params[f"base_model.model.{name}.lora_{part}.default.weight"].grad
            assert_close_rel(getattr(m, f"lora_{part}").grad, ref_grad, what=f"{name}.lora_{part} grad")


def test_left_padding_pools_the_same_token_as_right_padding(hf_folders):
    model = load_ours(hf_folders["llama"]).eval()
    right, right_mask = padded_batch("right")
    left, left_mask = padded_batch("left")
    with torch.no_grad():
        a = model(right, attention_mask=right_mask).logits
        b = model(left, attention_mask=left_mask).logits
    assert_close_rel(b, a, what="left vs right padding")


@pytest.mark.parametrize(
    "num_labels,labels,problem_type",
    [
        (3, torch.tensor([2, 0, 1]), "single_label_classification"),
        (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]), "multi_label_classification"),
        (1, torch.tensor([0.5, -1.0, 2.0]), "regression"),
    ],
)
def test_problem_type_and_loss_match_transformers(num_labels, labels, problem_type, hf_folders):
    ours = load_ours(hf_folders["llama"], num_labels=num_labels).eval()
    hf = hf_classifier("llama", num_labels)
    with torch.no_grad():
        hf.score.weight.copy_(ours.score.weight)
        ids, mask = padded_batch("right")
        out, ref = ours(ids, attention_mask=mask, labels=labels), hf(input_ids=ids, attention_mask=mask, labels=labels)
    assert ours.problem_type == hf.config.problem_type == problem_type
    assert_close_rel(out.logits, ref.logits, what="logits")
    assert_close_rel(out.loss, ref.loss, what=f"{problem_type} loss")


def test_no_pad_token_accepts_one_row_only(hf_folders):
    ours = load_ours(hf_folders["llama"], pad_token_id=None).eval()
    hf = hf_classifier("llama", pad_token_id=None)
    with torch.no_grad():
        hf.score.weight.copy_(ours.score.weight)
        ids = torch.randint(1, 200, (1, 7))
        assert_close_rel(ours(ids).logits, hf(input_ids=ids).logits, what="one row, no pad token")
        with pytest.raises(ValueError, match="no padding token"):
            hf(input_ids=ids.repeat(2, 1))
        with pytest.raises(ConfigurationError, match="without a pad token"):
            ours(ids.repeat(2, 1))


def test_bad_num_labels_and_labels(hf_folders):
    for bad in (0, -2, True, 2.5):
        with pytest.raises(ConfigurationError, match="num_labels must be a positive integer"):
            load_ours(hf_folders["llama"], num_labels=bad)
    model = load_ours(hf_folders["llama"]).eval()
    ids, mask = padded_batch("right")
    with pytest.raises(DatasetError, match=r"label 3 is outside \[0, 3\).*num_labels"):
        model(ids, attention_mask=mask, labels=torch.tensor([0, 3, 1]))
    with pytest.raises(DatasetError, match=r"label -1 is outside"):
        model(ids, attention_mask=mask, labels=torch.tensor([0, -1, 1]))
    model(ids, attention_mask=mask, labels=torch.tensor([0, -100, 1]))  # -100: the row is ignored, as in transformers
    with pytest.raises(ConfigurationError, match="modules_to_save"):
        FastModel.get_peft_model(model, r=4, modules_to_save=["lm_head"])
    with pytest.raises(ConfigurationError, match="language-model head"):
        model.generate(ids[:1])


def _trained_classifier(folder):
    model = load_ours(folder, id2label={0: "neg", 1: "neutral", 2: "pos"})
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules="all-linear",
                                     use_gradient_checkpointing=False)
    assert [n for n, p in model.named_parameters() if p.requires_grad and "lora" not in n] == ["score.weight"]
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # stand-in for training: non-zero B, a changed head
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
        model.score.weight.add_(torch.randn(model.score.weight.shape, generator=g) * 0.1)
    return FastModel.for_inference(model)


def test_adapter_with_head_loads_in_peft_and_back_into_engine(hf_folders, tmp_path):
    model = _trained_classifier(hf_folders["qwen2"])
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert "base_model.model.score.weight" in keys  # the key PEFT 0.21 writes for a modules_to_save head
    ids, mask = padded_batch("right")
    peft_model = PeftModel.from_pretrained(hf_classifier("qwen2"), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        actual = model(ids, attention_mask=mask).logits
    assert_close_rel(actual, expected, what="adapter logits in PEFT")
    reloaded, _ = FastModel.from_pretrained(tmp_path / "adapter", dtype=torch.float32, device="cpu", verbose=False,
                                            pad_token_id=PAD)
    assert isinstance(reloaded, CausalLMForSequenceClassification) and reloaded.num_labels == NUM_LABELS
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids, attention_mask=mask).logits, actual)


def test_merged_classifier_loads_in_auto_model_for_sequence_classification(hf_folders, tmp_path):
    model = _trained_classifier(hf_folders["llama"])
    model.save_pretrained_merged(tmp_path / "merged", save_method="merged_32bit")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    hf.eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    assert hf.config.num_labels == NUM_LABELS and hf.config.pad_token_id == PAD
    assert hf.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    ids, mask = padded_batch("right")
    with torch.no_grad():
        assert_close_rel(model(ids, attention_mask=mask).logits, hf(input_ids=ids, attention_mask=mask).logits,
                         what="merged logits")


def test_num_items_in_batch_is_ignored_as_in_transformers(hf_folders):
    """transformers' classification loss is the batch mean whatever ``num_items_in_batch`` says; so is ours (and, not
    accepting loss kwargs, ours is divided by the accumulation steps in transformers.Trainer)."""
    ours = load_ours(hf_folders["llama"]).eval()
    hf = hf_classifier("llama")
    with torch.no_grad():
        hf.score.weight.copy_(ours.score.weight)
        ids, mask = padded_batch("right")
        labels = torch.tensor([2, -100, 1])
        out = ours(ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(5))
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(5))
    assert_close_rel(out.loss, ref.loss, what="loss with num_items_in_batch")
    assert not CausalLMForSequenceClassification.accepts_loss_kwargs


def test_auto_gradient_checkpointing_plans_a_classifier(hf_folders):
    model = load_ours(hf_folders["llama"])
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, memory_budget_gb=4.0)
    choice = FastModel.resolve_gradient_checkpointing(model, 2, 16, verbose=False)
    assert choice.policy.mode == "none", choice.reason  # a tiny model fits 4 GiB without recomputation
    ids, mask = padded_batch("right")
    model(ids, attention_mask=mask, labels=torch.tensor([0, 1, 2])).loss.backward()
    assert model.score.weight.grad is not None
