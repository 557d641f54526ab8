"""DPO data, log-probs and losses: formulas by hand, and parity with TRL 1.16's ``DPOTrainer``.

The parity tests run TRL's trainer (transformers + PEFT, fp32) and ours on the same tiny Llama with the
same LoRA weights and the same preference rows (from ``engine/data/dpo/train.jsonl``), and compare the tokenized
ids, the collated batch (with truncation), the loss, the logged metrics and every LoRA gradient.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset

from engine.data.load import load_jsonl
from engine import FastModel
from engine.errors import ConfigurationError, DatasetError
from engine.peft import lora_modules
from engine.training.preference_data import (
    PREFERENCE_COLUMNS,
    PreferenceCollator,
    reference_sequence_log_probs,
    sequence_log_probs,
    to_conversational_preference,
    tokenize_preference_dataset,
)
from engine.training.dpo_loss import DPO_LOSS_TYPES, dpo_loss, dpo_metrics
from tests.conftest import make_tiny_chat_hf_model

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BETA = 0.1
RTOL = 1e-5
ROW_IDS = (0, 1, 12, 16)  # four rows of different lengths


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|a - e| / max|e|`` (relative to the tensor's scale)."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def assert_close_rel(actual, expected, rtol=RTOL, what=""):
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what}: max relative error {err:.3e} > {rtol:g}"
    return err


def preference_rows(conversational: bool) -> list[dict]:
    rows = load_jsonl("train", "dpo")
    rows = [{k: rows[i][k] for k in PREFERENCE_COLUMNS} for i in ROW_IDS]
    return [to_conversational_preference(r) for r in rows] if conversational else rows


# ---------------------------------------------------------------------------------------------- loss formulas
def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# r_w = [1, -2], r_l = [-1, 1], Δ = [2, -3]
PC, PR = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
RC, RR = torch.tensor([-11.0, -18.0]), torch.tensor([-11.0, -16.0])


def test_sigmoid_loss_by_hand():
    losses, cr, rr = dpo_loss(PC, PR, RC, RR, beta=0.5)
    torch.testing.assert_close(losses, torch.tensor([-_logsig(1.0), -_logsig(-1.5)]))
    torch.testing.assert_close(cr, torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(rr, torch.tensor([-0.5, 0.5]))


def test_sigmoid_label_smoothing_is_cdpo():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    expected = [-0.9 * _logsig(1.0) - 0.1 * _logsig(-1.0), -0.9 * _logsig(-1.5) - 0.1 * _logsig(1.5)]
    torch.testing.assert_close(losses, torch.tensor(expected))


def test_robust_loss_by_hand():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="robust", label_smoothing=0.1)
    expected = [(-0.9 * _logsig(x) + 0.1 * _logsig(-x)) / 0.8 for x in (1.0, -1.5)]
    torch.testing.assert_close(losses, torch.tensor(expected))


def test_ipo_loss_by_hand():
    # Δ̄ = r_w / n_w - r_l / n_l = [1/2 + 1/1, -2/4 - 1/2] = [1.5, -1.0]; 1 / (2β) = 1
    losses, cr, _ = dpo_loss(
        PC,
        PR,
        RC,
        RR,
        beta=0.5,
        loss_type="ipo",
        chosen_lengths=torch.tensor([2, 4]),
        rejected_lengths=torch.tensor([1, 2]),
    )
    torch.testing.assert_close(losses, torch.tensor([0.25, 4.0]))
    torch.testing.assert_close(cr, torch.tensor([0.5, -1.0]))  # rewards use the summed log-ratios
    zero_len, _, _ = dpo_loss(
        PC,
        PR,
        RC,
        RR,
        beta=0.5,
        loss_type="ipo",
        chosen_lengths=torch.tensor([0, 4]),
        rejected_lengths=torch.tensor([1, 2]),
    )
    torch.testing.assert_close(zero_len[0], torch.tensor((1.0 + 1.0 - 1.0) ** 2))  # lengths clamped to >= 1


def test_hinge_loss_by_hand():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.25, loss_type="hinge")
    torch.testing.assert_close(losses, torch.tensor([0.5, 1.75]))
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=1.0, loss_type="hinge")
    torch.testing.assert_close(losses, torch.tensor([0.0, 4.0]))


def test_sigmoid_gradient_by_hand():
    pc = PC.clone().requires_grad_(True)
    losses, _, _ = dpo_loss(pc, PR, RC, RR, beta=0.5)
    losses.sum().backward()
    # d/dπ_w [-log σ(βΔ)] = -β σ(-βΔ)
    expected = torch.tensor([-0.5 / (1 + math.exp(1.0)), -0.5 / (1 + math.exp(-1.5))])
    torch.testing.assert_close(pc.grad, expected)


def test_metrics_by_hand():
    _, cr, rr = dpo_loss(PC, PR, RC, RR, beta=0.5)
    m = dpo_metrics(cr, rr, PC, PR)
    expected = {
        "rewards/chosen": -0.25,
        "rewards/rejected": 0.0,
        "rewards/margins": -0.25,
        "rewards/accuracies": 0.5,
        "logps/chosen": -15.0,
        "logps/rejected": -13.5,
    }
    assert m.keys() == expected.keys()
    for k, v in expected.items():
        assert m[k] == pytest.approx(v), k


def test_loss_errors():
    with pytest.raises(ConfigurationError, match="supported loss types are .*sigmoid.*ipo.*hinge"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="kto")
    with pytest.raises(ConfigurationError, match="chosen_lengths"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo")
    with pytest.raises(ConfigurationError, match="no effect on the 'hinge' loss"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ConfigurationError, match=r"\[0, 0.5\)"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ConfigurationError, match="beta must be positive"):
        dpo_loss(PC, PR, RC, RR, beta=0.0)
    with pytest.raises(ConfigurationError, match=r"shape \[b\]"):
        dpo_loss(PC, PR[:1], RC, RR, beta=0.1)


# ---------------------------------------------------------------------------------------------- collator
FEATURES = [
    {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
    {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]},
]


def test_collator_padded_matches_trl():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    ours = PreferenceCollator(pad_token_id=0)(FEATURES)
    theirs = DataCollatorForPreference(pad_token_id=0)(copy.deepcopy(FEATURES))
    assert ours["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours[key], theirs[key]), key


def test_collator_padding_free_layout():
    features = [dict(f, ref_chosen_logps=-1.5, ref_rejected_logps=-2.5) for f in FEATURES]
    out = PreferenceCollator(pad_token_id=0, padding_free=True)(features)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8, 9, 1, 2, 3, 6, 7, 8, 10, 11]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3]]
    assert out["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1, 1]]
    assert out["sequence_index"].tolist() == [0] * 5 + [1] * 3 + [2] * 4 + [3] * 4
    assert out["sequence_lengths"].tolist() == [5, 3, 4, 4]
    assert out["ref_chosen_logps"].tolist() == [-1.5, -1.5]
    assert out["ref_rejected_logps"].tolist() == [-2.5, -2.5]


def test_collator_errors():
    with pytest.raises(DatasetError, match="empty list"):
        PreferenceCollator(0)([])
    with pytest.raises(DatasetError, match=r"lacks \['rejected_ids'\]"):
        PreferenceCollator(0)([{"prompt_ids": [1], "chosen_ids": [2]}])
    with pytest.raises(DatasetError, match="empty chosen or rejected"):
        PreferenceCollator(0)([{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": []}])


# ---------------------------------------------------------------------------------------------- tokenization
def test_plain_and_conversational_layout(smollm2_tokenizer):
    tok = smollm2_tokenizer
    plain = tokenize_preference_dataset(preference_rows(False), tok, max_length=None)
    conv = tokenize_preference_dataset(preference_rows(True), tok, max_length=None)
    assert plain.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert len(plain) == len(conv) == len(ROW_IDS)
    for ex in plain:  # the EOS token is appended to plain-text completions
        assert ex["chosen_ids"][-1] == ex["rejected_ids"][-1] == tok.eos_token_id
    row = load_jsonl("train", "dpo")[ROW_IDS[0]]
    expected_prompt = tok.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}], tokenize=True, return_dict=True, add_generation_prompt=True
    )["input_ids"]
    assert conv[0]["prompt_ids"] == list(expected_prompt)
    assert tok.decode(conv[0]["chosen_ids"]) == row["chosen"] + "<|im_end|>\n"


def test_truncation_modes(smollm2_tokenizer):
    rows = [{"prompt": "one two three four five six", "chosen": " seven eight", "rejected": " nine ten eleven twelve"}]
    full = tokenize_preference_dataset(rows, smollm2_tokenizer, max_length=None)[0]
    p, c, r = full["prompt_ids"], full["chosen_ids"], full["rejected_ids"]
    assert len(r) > len(c) > 1
    n = len(p) + 1
    start = tokenize_preference_dataset(rows, smollm2_tokenizer, max_length=n)[0]
    assert start == {"prompt_ids": p, "chosen_ids": c[:1], "rejected_ids": r[:1]}
    n = len(p) + len(r) - 2
    end = tokenize_preference_dataset(rows, smollm2_tokenizer, max_length=n, truncation_mode="keep_end")[0]
    assert end == {"prompt_ids": p[2:], "chosen_ids": c, "rejected_ids": r}
    tiny = tokenize_preference_dataset(rows, smollm2_tokenizer, max_length=2, truncation_mode="keep_end")[0]
    assert tiny == {"prompt_ids": [], "chosen_ids": c[-2:], "rejected_ids": r[-2:]}


def test_implicit_prompt_matches_explicit_and_trl(smollm2_tokenizer):
    from trl.data_utils import extract_prompt

    conv = preference_rows(True)
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in conv]
    a = tokenize_preference_dataset(conv, smollm2_tokenizer, max_length=None)
    b = tokenize_preference_dataset(implicit, smollm2_tokenizer, max_length=None)
    assert a.to_list() == b.to_list()
    text = [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]
    out = tokenize_preference_dataset(text, smollm2_tokenizer, max_length=None)[0]
    trl_split = extract_prompt(text[0])
    assert trl_split["prompt"] == "The sky is"
    assert out["prompt_ids"] == smollm2_tokenizer("The sky is")["input_ids"]
    assert smollm2_tokenizer.decode(out["chosen_ids"]) == trl_split["chosen"] + smollm2_tokenizer.eos_token


def test_dataset_errors(smollm2_tokenizer):
    tok = smollm2_tokenizer
    with pytest.raises(
        DatasetError, match=r"lacks the column\(s\) \['chosen', 'rejected'\]; it has \['prompt', 'answer'\]"
    ):
        tokenize_preference_dataset([{"prompt": "a", "answer": "b"}], tok, max_length=None)
    with pytest.raises(DatasetError, match="empty"):
        tokenize_preference_dataset([], tok, max_length=None)
    with pytest.raises(DatasetError, match="empty"):
        tokenize_preference_dataset(Dataset.from_dict({c: [] for c in PREFERENCE_COLUMNS}), tok, max_length=None)
    no_template = copy.deepcopy(tok)
    no_template.chat_template = None
    with pytest.raises(DatasetError, match="no chat template"):
        tokenize_preference_dataset(preference_rows(True), no_template, max_length=None)
    mixed = [dict(r, chosen=[{"role": "assistant", "content": r["chosen"]}]) for r in preference_rows(False)]
    with pytest.raises(DatasetError, match="'prompt' is a string but the dataset is conversational"):
        tokenize_preference_dataset(mixed, tok, max_length=None)
    empty = preference_rows(True)
    empty[2]["rejected"] = []
    with pytest.raises(DatasetError, match=r"^example 2: 'rejected' is an empty conversation"):
        tokenize_preference_dataset(empty, tok, max_length=None)
    with pytest.raises(ConfigurationError, match="truncation_mode"):
        tokenize_preference_dataset(preference_rows(False), tok, max_length=64, truncation_mode="left")


def test_prompt_filling_max_length_raises_or_drops(smollm2_tokenizer):
    rows = preference_rows(False)
    lengths = [len(x["prompt_ids"]) for x in tokenize_preference_dataset(rows, smollm2_tokenizer, max_length=None)]
    cut = max(lengths)  # the longest prompt fills max_length exactly
    assert sorted(lengths)[-2] < cut
    longest = lengths.index(cut)
    with pytest.raises(DatasetError, match=rf"max_length={cut} tokens or more.*\[{longest}\].*drop_truncated=True"):
        tokenize_preference_dataset(rows, smollm2_tokenizer, max_length=cut)
    kept = tokenize_preference_dataset(rows, smollm2_tokenizer, max_length=cut, drop_truncated=True)
    assert len(kept) == len(rows) - 1


# ---------------------------------------------------------------------------------------------- model parity
@pytest.fixture(scope="module")
def ours_lora(tiny_chat_folder):
    """Our tiny chat model with LoRA on every projection (weights overwritten by each test)."""
    model, _ = FastModel.from_pretrained(
        tiny_chat_folder, max_seq_length=512, dtype="float32", device="cpu", verbose=False
    )
    model = FastModel.get_peft_model(
        model, r=8, lora_alpha=16, target_modules=LORA_TARGETS, use_gradient_checkpointing=False
    )
    return model.train()


def _randomise_lora(model, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
            m.lora_A.grad = m.lora_B.grad = None


def test_padding_free_equals_padded(ours_lora, smollm2_tokenizer):
    _randomise_lora(ours_lora)
    data = list(tokenize_preference_dataset(preference_rows(True), smollm2_tokenizer, max_length=None))
    results = {}
    for padding_free in (False, True):
        batch = PreferenceCollator(smollm2_tokenizer.pad_token_id, padding_free=padding_free)(data)
        chosen, rejected, extra = sequence_log_probs(ours_lora, batch)
        (chosen.sum() - 0.5 * rejected.sum()).backward()
        grads = [m.lora_A.grad.clone() for m in lora_modules(ours_lora).values()]
        for m in lora_modules(ours_lora).values():
            m.lora_A.grad = m.lora_B.grad = None
        results[padding_free] = (chosen.detach(), rejected.detach(), extra, grads)
    (c0, r0, e0, g0), (c1, r1, e1, g1) = results[False], results[True]
    assert_close_rel(c1, c0, what="chosen log-probs")
    assert_close_rel(r1, r0, what="rejected log-probs")
    assert torch.equal(e1["chosen_lengths"], e0["chosen_lengths"])
    assert torch.equal(e1["rejected_lengths"], e0["rejected_lengths"])
    assert e0["chosen_lengths"].tolist() == [len(x["chosen_ids"]) for x in data]
    assert int(e1["num_tokens"]) == int(e0["num_tokens"])
    for a, b in zip(g1, g0):
        assert_close_rel(a, b, what="lora_A grad")
    assert (c0 < 0).all() and (r0 < 0).all()


def _trl_trainer(rows, tokenizer, loss_type: str, max_length: int, output_dir):
    import trl
    from peft import LoraConfig

    args = trl.DPOConfig(
        output_dir=str(output_dir),
        beta=BETA,
        loss_type=loss_type,
        max_length=max_length,
        per_device_train_batch_size=len(rows),
        report_to=[],
        bf16=False,
        use_cpu=True,
        activation_checkpointing=False,
    )
    # Passing a PeftModel would make TRL copy the adapter as the reference ("ref" adapter); with peft_config
    # TRL builds the PeftModel itself and its reference is the model with adapters disabled, like ours.
    return trl.DPOTrainer(
        model=make_tiny_chat_hf_model(),
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0),
    )


@pytest.mark.parametrize(
    ("loss_type", "conversational"), [("sigmoid", True), ("ipo", True), ("hinge", True), ("sigmoid", False)]
)
def test_matches_trl(loss_type, conversational, ours_lora, smollm2_tokenizer, tmp_path):
    assert loss_type in DPO_LOSS_TYPES
    tok = smollm2_tokenizer
    rows = preference_rows(conversational)

    # Tokenization: identical ids before truncation; max_length cuts some completions but no prompt.
    full = tokenize_preference_dataset(rows, tok, max_length=None)
    max_length = max(len(x["prompt_ids"]) for x in full) + 6
    assert any(len(x["prompt_ids"]) + len(x["chosen_ids"]) > max_length for x in full)
    trainer = _trl_trainer(rows, tok, loss_type, max_length, tmp_path)
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert full[key] == trainer.train_dataset[key], key

    # Collated batch (TRL truncates in its collator, we at tokenization): identical tensors.
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    ours_data = list(tokenize_preference_dataset(rows, tok, max_length=max_length))
    batch = PreferenceCollator(tok.pad_token_id)(ours_data)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batch[key], trl_batch[key]), key

    # Same LoRA weights on both sides; non-zero B so the policy differs from the reference.
    _randomise_lora(ours_lora)
    peft_params = dict(trainer.model.named_parameters())
    modules = lora_modules(ours_lora)
    assert len(modules) == sum(".lora_A." in n for n in peft_params) == 7 * 2
    with torch.no_grad():
        for name, m in modules.items():
            peft_params[f"base_model.model.{name}.lora_A.default.weight"].copy_(m.lora_A)
            peft_params[f"base_model.model.{name}.lora_B.default.weight"].copy_(m.lora_B)

    # TRL
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(trl_batch))
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # Ours
    policy_c, policy_r, extra = sequence_log_probs(ours_lora, batch)
    ref_c, ref_r = reference_sequence_log_probs(ours_lora, batch)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_c,
        policy_r,
        ref_c,
        ref_r,
        beta=BETA,
        loss_type=loss_type,
        chosen_lengths=extra["chosen_lengths"],
        rejected_lengths=extra["rejected_lengths"],
    )
    loss = losses.mean()
    loss.backward()
    metrics = dpo_metrics(chosen_rewards, rejected_rewards, policy_c, policy_r)

    assert chosen_rewards.abs().max() > 1e-3, "the policy should differ from the reference"
    loss_err = assert_close_rel(loss.detach(), trl_loss.detach(), what=f"{loss_type} loss")
    for key, value in metrics.items():
        scale = max(abs(trl_metrics[key]), 1e-3)
        assert abs(value - trl_metrics[key]) <= RTOL * scale, f"{key}: ours {value} vs TRL {trl_metrics[key]}"
    grad_err = 0.0
    for name, m in modules.items():
        for part in ("A", "B"):
            ours_grad = getattr(m, f"lora_{part}").grad
            ref_grad = peft_params[f"base_model.model.{name}.lora_{part}.default.weight"].grad
            assert ref_grad is not None and ref_grad.abs().max() > 0, f"{name} lora_{part}: TRL gradient is zero"
            grad_err = max(grad_err, assert_close_rel(ours_grad, ref_grad, what=f"{name} lora_{part} grad"))
    print(
        f"\n{loss_type} conversational={conversational}: loss {loss.item():.6f} (TRL {trl_loss.item():.6f}), "
        f"loss rel err {loss_err:.2e}, max LoRA grad rel err {grad_err:.2e}"
    )
