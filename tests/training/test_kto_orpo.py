"""KTO and ORPO: formulas by hand, parity with TRL 1.16 (``trl.KTOTrainer``, ``trl.experimental.orpo.ORPOTrainer``),
bad input, and a few training steps of each trainer.

The parity tests run TRL's trainer (transformers + PEFT, fp32) and ours on the same tiny Llama with the same LoRA
weights and the same rows (from ``engine/data/dpo/train.jsonl``, unpaired for KTO), and compare the prepared data, the
collated batch, the loss, the logged metrics and every LoRA gradient (1e-5 relative).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset

from engine.data.load import load_jsonl
from engine import ConfigurationError, DatasetError, FastModel, KTOConfig, KTOTrainer, ORPOConfig, ORPOTrainer
from engine.peft import lora_modules
from engine.training.kto_data import UnpairedPreferenceCollator, add_kl_completions, tokenize_unpaired_dataset
from engine.training.kto import kto_log_probs, reference_kto_log_probs
from engine.training.kto_loss import kl_estimate, kto_loss, kto_metrics
from engine.training.orpo import orpo_log_probs
from engine.training.orpo_loss import log1mexp, orpo_loss
from engine.training.preference_data import (
    PREFERENCE_COLUMNS,
    PreferenceCollator,
    to_conversational_preference,
    tokenize_preference_dataset,
)
from tests.conftest import make_tiny_chat_hf_model

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RTOL = 1e-5
ROW_IDS = (0, 1, 12, 16, 3, 5)
LABELS = (True, False, False, True, True, False)
# TRL logs these from the full logits / entropy, which the chunked log-prob op never builds (see docs/training.md).
TRL_ONLY_METRICS = {"entropy", "num_tokens", "logits/chosen", "logits/rejected"}


def rel_err(actual, expected) -> float:
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def assert_close_rel(actual, expected, what=""):
    err = rel_err(actual, expected)
    assert err <= RTOL, f"{what}: max relative error {err:.3e} > {RTOL:g}"
    return err


def paired_rows(conversational: bool, ids=ROW_IDS) -> list[dict]:
    rows = load_jsonl("train", "dpo")
    rows = [{k: rows[i][k] for k in PREFERENCE_COLUMNS} for i in ids]
    return [to_conversational_preference(r) for r in rows] if conversational else rows


def unpaired_rows(conversational: bool) -> list[dict]:
    """Six KTO rows: row ``i``'s chosen completion if ``LABELS[i]`` else its rejected one."""
    out = []
    for row, label in zip(paired_rows(conversational), LABELS):
        out.append({"prompt": row["prompt"], "completion": row["chosen" if label else "rejected"], "label": label})
    return out


# ---------------------------------------------------------------------------------------------- formulas
def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_kto_loss_by_hand():
    policy, ref = torch.tensor([-10.0, -20.0, -5.0]), torch.tensor([-11.0, -18.0, -5.5])  # r = [1, -2, 0.5]
    labels = torch.tensor([True, False, True])
    kl = kl_estimate(torch.tensor([-7.0, -9.0]), torch.tensor([-7.5, -9.1]))  # mean(0.5, 0.1) = 0.3
    assert kl.item() == pytest.approx(0.3)
    assert kl_estimate(torch.tensor([-9.0]), torch.tensor([-8.0])).item() == 0.0  # clamped at 0
    losses, cr, rr = kto_loss(policy, ref, labels, kl, beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)
    expected = [2 * (1 - _sig(0.5 * (1 - 0.3))), 2 * (1 - _sig(0.5 * (0.5 - 0.3))), 0.5 * (1 - _sig(0.5 * (0.3 + 2)))]
    torch.testing.assert_close(losses, torch.tensor(expected))
    torch.testing.assert_close(cr, torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(rr, torch.tensor([-1.0]))
    apo, _, _ = kto_loss(policy, ref, labels, None, beta=0.5, loss_type="apo_zero_unpaired")
    torch.testing.assert_close(apo, torch.tensor([1 - _sig(0.5), 1 - _sig(0.25), _sig(-1.0)]))
    m = kto_metrics(cr, rr, policy, labels, kl)
    assert m == pytest.approx({"kl": 0.3, "rewards/chosen": 0.375, "logps/chosen": -7.5, "rewards/rejected": -1.0,
                               "logps/rejected": -20.0, "rewards/margins": 1.375})
    only_chosen = kto_metrics(cr, rr[:0], policy, torch.tensor([True, True, True]), None)
    assert set(only_chosen) == {"kl", "rewards/chosen", "logps/chosen"} and only_chosen["kl"] == 0.0
    with pytest.raises(ConfigurationError, match="supported loss types are .*kto.*apo_zero_unpaired"):
        kto_loss(policy, ref, labels, kl, beta=0.1, loss_type="bco_pair")
    with pytest.raises(ConfigurationError, match="KL estimate"):
        kto_loss(policy, ref, labels, None, beta=0.1)


def test_orpo_loss_by_hand():
    chosen, rejected = torch.tensor([-0.5, -2.0]), torch.tensor([-1.0, -0.1])
    for x in (-3.0, -0.7, -0.69, -1e-4):
        expected = math.log(1 - math.exp(x))
        assert log1mexp(torch.tensor(x, dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-9)
    pairs = zip([-0.5, -2.0], [-1.0, -0.1])
    log_odds = [(c - r) - (math.log(1 - math.exp(c)) - math.log(1 - math.exp(r))) for c, r in pairs]
    ratio = [math.log(_sig(x)) for x in log_odds]
    loss, m = orpo_loss(chosen, rejected, torch.tensor(1.5), beta=0.2)
    assert loss.item() == pytest.approx(1.5 - 0.2 * sum(ratio) / 2, rel=1e-6)
    assert m["log_odds_chosen"] == pytest.approx(sum(log_odds) / 2, rel=1e-6)
    assert m["log_odds_ratio"] == pytest.approx(sum(ratio) / 2, rel=1e-6)
    assert m["rewards/accuracies"] == 0.5 and m["nll_loss"] == 1.5
    assert m["rewards/margins"] == pytest.approx(0.2 * (0.5 - 1.9) / 2)


# ---------------------------------------------------------------------------------------------- data
def test_kl_completions_rotate_within_blocks():
    ds = Dataset.from_dict({"completion_ids": [[1], [2], [3], [4], [5], [6]]})
    assert add_kl_completions(ds, 4)["KL_completion_ids"] == [[4], [1], [2], [3], [6], [5]]
    with pytest.raises(ConfigurationError, match="at least 2"):
        add_kl_completions(ds, 1)


def test_unpaired_collator_layout():
    features = [
        {"prompt_ids": [1, 2, 3], "completion_ids": [4, 5], "KL_completion_ids": [6], "label": True, "ref_logps": -1.0},
        {"prompt_ids": [7, 8], "completion_ids": [9], "KL_completion_ids": [10, 11], "label": False, "ref_logps": -2.0},
    ]
    out = UnpairedPreferenceCollator(pad_token_id=0, max_length=4)(features)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4], [7, 8, 9, 0]]
    assert out["completion_mask"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 0]]
    assert out["KL_input_ids"].tolist() == [[1, 2, 3, 6], [7, 8, 10, 11]]
    assert out["label"].tolist() == [True, False] and out["ref_logps"].tolist() == [-1.0, -2.0]
    free = UnpairedPreferenceCollator(pad_token_id=0, padding_free=True)(features)
    assert free["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8, 9]]
    assert free["KL_position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]


def test_kto_bad_input(smollm2_tokenizer, ours_lora, tmp_path):
    tok = smollm2_tokenizer
    rows = unpaired_rows(False)
    with pytest.raises(DatasetError, match=r"every one of the 2 examples is desirable.*Add undesirable \(False\)"):
        tokenize_unpaired_dataset([dict(r, label=True) for r in rows[:2]], tok, max_length=None)
    # apo_zero_unpaired has no KL term: one label is allowed there.
    assert len(tokenize_unpaired_dataset(rows[:1], tok, max_length=None, require_both_labels=False)) == 1
    with pytest.raises(DatasetError, match=r"lacks the column\(s\) \['label'\]"):
        tokenize_unpaired_dataset([{"prompt": "a", "completion": "b"}], tok, max_length=None)
    with pytest.raises(DatasetError, match=r"lacks the column\(s\) \['completion', 'label'\]"):
        tokenize_unpaired_dataset([{"prompt": "a", "answer": "b"}], tok, max_length=None)
    with pytest.raises(DatasetError, match=r"'label' must be True .* example 0 has 1 .*cast_column"):
        tokenize_unpaired_dataset([dict(r, label=int(r["label"])) for r in rows], tok, max_length=None)
    with pytest.raises(DatasetError, match="'label' must be True"):
        tokenize_unpaired_dataset([dict(r, label="good") for r in rows], tok, max_length=None)
    with pytest.raises(DatasetError, match="empty"):
        tokenize_unpaired_dataset([], tok, max_length=None)
    mixed = [dict(r, completion=[{"role": "assistant", "content": r["completion"]}]) for r in rows]
    with pytest.raises(DatasetError, match="'prompt' is a string but the dataset is conversational"):
        tokenize_unpaired_dataset(mixed, tok, max_length=None)
    prompt_len = max(len(x) for x in tokenize_unpaired_dataset(rows, tok, max_length=None)["prompt_ids"])
    with pytest.raises(DatasetError, match="drop_truncated=True"):
        tokenize_unpaired_dataset(rows, tok, max_length=prompt_len)
    assert len(tokenize_unpaired_dataset(rows, tok, max_length=prompt_len, drop_truncated=True)) == len(rows) - 1
    # Trainer-level: the same errors, plus the configuration KTO's KL pairing needs.
    model, tok2 = ours_lora, tok
    with pytest.raises(DatasetError, match="needs both"):
        KTOTrainer(model=model, tokenizer=tok2, train_dataset=[dict(r, label=False) for r in rows],
                   args=_kto_args(tmp_path))
    with pytest.raises(ConfigurationError, match="ref_model"):
        KTOTrainer(model=model, ref_model=model, tokenizer=tok2, train_dataset=rows, args=_kto_args(tmp_path))
    with pytest.raises(ConfigurationError, match="train_sampling_strategy='sequential'"):
        KTOConfig(output_dir=str(tmp_path), train_sampling_strategy="random")
    with pytest.raises(ConfigurationError, match="per_device_train_batch_size >= 2"):
        KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=1)
    with pytest.raises(ConfigurationError, match="loss_type must be one of"):
        KTOConfig(output_dir=str(tmp_path), loss_type="bco")
    with pytest.raises(ConfigurationError, match="desirable_weight"):
        KTOConfig(output_dir=str(tmp_path), undesirable_weight=0.0)
    KTOConfig(output_dir=str(tmp_path), loss_type="apo_zero_unpaired", per_device_train_batch_size=1)


def test_paired_rows_are_unpaired_as_trl(smollm2_tokenizer):
    from trl.data_utils import unpair_preference_dataset

    paired = paired_rows(True, ids=(0, 1, 12))
    ours = tokenize_unpaired_dataset(paired, smollm2_tokenizer, max_length=None)
    theirs = unpair_preference_dataset(Dataset.from_list(paired))
    assert ours["label"] == theirs["label"] == [True] * 3 + [False] * 3
    expected = tokenize_unpaired_dataset(theirs, smollm2_tokenizer, max_length=None)
    assert ours.to_list() == expected.to_list()


# ---------------------------------------------------------------------------------------------- parity
@pytest.fixture(scope="module")
def ours_lora(tiny_chat_folder):
    model, _ = FastModel.from_pretrained(tiny_chat_folder, max_seq_length=512, dtype="float32", device="cpu",
                                         verbose=False)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=LORA_TARGETS,
                                     use_gradient_checkpointing=False)
    return model.train()


def _peft_config():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0)


def _copy_random_lora(ours, peft_model, seed: int = 7) -> dict:
    """Random non-zero LoRA B on our model (so the policy differs from the reference), copied into PEFT's."""
    g = torch.Generator().manual_seed(seed)
    params = dict(peft_model.named_parameters())
    modules = lora_modules(ours)
    assert len(modules) == sum(".lora_A." in n for n in params) == 7 * 2
    with torch.no_grad():
        for name, m in modules.items():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
            m.lora_A.grad = m.lora_B.grad = None
            params[f"base_model.model.{name}.lora_A.default.weight"].copy_(m.lora_A)
            params[f"base_model.model.{name}.lora_B.default.weight"].copy_(m.lora_B)
    return params


def _compare_grads(ours, params) -> float:
    worst = 0.0
    for name, m in lora_modules(ours).items():
        for part in ("A", "B"):
            ref_grad = params[f"base_model.model.{name}.lora_{part}.default.weight"].grad
            assert ref_grad is not None and ref_grad.abs().max() > 0, f"{name} lora_{part}: TRL gradient is zero"
            worst = max(worst, assert_close_rel(getattr(m, f"lora_{part}").grad, ref_grad, f"{name} lora_{part}"))
    return worst


def _compare_metrics(ours: dict, theirs: dict) -> None:
    """Same names, values within 1e-5 relative to the scale of what they are computed from.

    ``rewards/margins`` is a difference of rewards, ORPO's ``log_odds_chosen`` one of mean log-probs, and KTO's ``kl``
    and rewards are differences of two log-prob sums of size ``|logps|`` (~200 here), whose fp32 rounding (~1e-7
    relative) sets their scale.
    """
    assert set(ours) == set(theirs) - TRL_ONLY_METRICS, (sorted(ours), sorted(theirs))
    sums = abs(theirs.get("logps/chosen", 0.0)) if "kl" in theirs else 0.0
    for key, value in ours.items():
        scale = max(abs(theirs[key]), 1e-3)
        if key == "rewards/margins":
            scale = max(scale, abs(theirs["rewards/chosen"]), abs(theirs["rewards/rejected"]))
        if key == "log_odds_chosen":
            scale = max(scale, abs(theirs["logps/chosen"]), abs(theirs["logps/rejected"]))
        if key == "kl" or key.startswith("rewards/"):
            scale = max(scale, 0.1 * sums)
        assert abs(value - theirs[key]) <= RTOL * scale, f"{key}: ours {value}, TRL {theirs[key]}"


KTO_CASES = [("kto", True), ("apo_zero_unpaired", False)]  # both loss types, both data formats


@pytest.mark.parametrize(("loss_type", "conversational"), KTO_CASES)
def test_kto_matches_trl(loss_type, conversational, ours_lora, smollm2_tokenizer, tmp_path):
    import trl

    tok = smollm2_tokenizer
    rows = unpaired_rows(conversational)
    full = tokenize_unpaired_dataset(rows, tok, max_length=None)
    max_length = max(len(p) for p in full["prompt_ids"]) + 4  # cuts some completions (and KL completions)
    assert any(len(p) + len(c) > max_length for p, c in zip(full["prompt_ids"], full["completion_ids"]))
    common = dict(beta=0.2, loss_type=loss_type, max_length=max_length, per_device_train_batch_size=4,
                  desirable_weight=1.3, undesirable_weight=0.7)
    trl_args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), report_to=[], bf16=False, use_cpu=True,
                             gradient_checkpointing=False, **common)
    theirs = trl.KTOTrainer(model=make_tiny_chat_hf_model(), args=trl_args, train_dataset=Dataset.from_list(rows),
                            processing_class=tok, peft_config=_peft_config())
    ours = KTOTrainer(model=ours_lora, tokenizer=tok, train_dataset=rows,
                      args=KTOConfig(output_dir=str(tmp_path / "ours"), use_cpu=True, disable_tqdm=True, **common))

    # Prepared data (six rows: a block of 4 and a block of 2 for the KL rotation) and the first batch.
    columns = ["prompt_ids", "completion_ids", "label"] + (["KL_completion_ids"] if loss_type == "kto" else [])
    for key in columns:
        assert ours.train_dataset[key] == theirs.train_dataset[key], key
    assert type(ours._get_train_sampler()).__name__ == "SequentialSampler"
    trl_batch = theirs.data_collator([theirs.train_dataset[i] for i in range(4)])
    batch = ours.data_collator([ours.train_dataset[i] for i in range(4)])
    assert set(batch) == set(trl_batch)
    for key in trl_batch:
        assert torch.equal(batch[key], trl_batch[key]), key

    params = _copy_random_lora(ours_lora, theirs.model)
    theirs.model.train()
    trl_loss = theirs.compute_loss(theirs.model, theirs._prepare_inputs(trl_batch))
    trl_loss.backward()
    loss = ours.compute_loss(ours_lora, batch)
    loss.backward()

    loss_err = assert_close_rel(loss.detach(), trl_loss.detach(), f"{loss_type} loss")
    _compare_metrics({k: v[-1] for k, v in ours._metrics["train"].items()},
                     {k: v[-1] for k, v in theirs._metrics["train"].items()})
    if loss_type == "kto":
        assert ours._metrics["train"]["kl"][-1] > 0, "the KL estimate should be non-trivial"
    grad_err = _compare_grads(ours_lora, params)
    print(f"\nKTO {loss_type} conversational={conversational}: loss {loss.item():.6f} (TRL {trl_loss.item():.6f}), "
          f"loss rel err {loss_err:.2e}, max LoRA grad rel err {grad_err:.2e}")


def _trl_orpo_rows_as_ours(theirs, n: int) -> list[dict]:
    """TRL ORPO's tokenized rows in our ``prompt_ids``/``chosen_ids``/``rejected_ids`` form."""
    out = []
    for i in range(n):
        row = theirs.train_dataset[i]
        p = sum(1 for t in row["chosen_labels"] if t == -100)
        assert row["rejected_input_ids"][:p] == row["chosen_input_ids"][:p]
        out.append({"prompt_ids": row["chosen_input_ids"][:p], "chosen_ids": row["chosen_input_ids"][p:],
                    "rejected_ids": row["rejected_input_ids"][p:]})
    return out


@pytest.mark.parametrize("conversational", [True, False])
def test_orpo_matches_trl(conversational, ours_lora, smollm2_tokenizer, tmp_path):
    from trl.experimental.orpo import ORPOConfig as TRLORPOConfig
    from trl.experimental.orpo import ORPOTrainer as TRLORPOTrainer

    tok = smollm2_tokenizer
    rows = paired_rows(conversational)[:3]
    common = dict(beta=0.3, max_length=512, per_device_train_batch_size=3)  # no truncation (DPO's tests cover it)
    theirs = TRLORPOTrainer(
        model=make_tiny_chat_hf_model(), processing_class=tok, peft_config=_peft_config(),
        train_dataset=Dataset.from_list(rows),
        args=TRLORPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], bf16=False, use_cpu=True,
                           gradient_checkpointing=False, remove_unused_columns=False, **common),
    )
    ours = ORPOTrainer(model=ours_lora, tokenizer=tok, train_dataset=rows,
                       args=ORPOConfig(output_dir=str(tmp_path / "ours"), use_cpu=True, disable_tqdm=True, **common))

    # Tokenization: ours is DPO's; TRL's legacy ORPO tokenizer adds a BOS the tokenizer does not add to plain
    # prompts, and an EOS after the chat template's end-of-turn "\n". Otherwise the ids agree.
    trl_rows = _trl_orpo_rows_as_ours(theirs, len(rows))
    for mine, other in zip(ours.train_dataset, trl_rows):
        for key in ("chosen_ids", "rejected_ids"):
            if conversational:
                assert mine["prompt_ids"] == other["prompt_ids"]
                assert other[key] == mine[key] + [tok.eos_token_id]
            else:
                assert other["prompt_ids"] == [tok.bos_token_id] + mine["prompt_ids"]
                assert other[key] == mine[key]
    # The loss is compared on TRL's own token ids.
    trl_batch = theirs._prepare_inputs(theirs.data_collator([theirs.train_dataset[i] for i in range(len(rows))]))
    batch = PreferenceCollator(tok.pad_token_id)(trl_rows)
    concatenated = theirs.concatenated_inputs(trl_batch, padding_value=theirs.padding_value)
    assert torch.equal(batch["input_ids"], concatenated["concatenated_input_ids"])
    assert torch.equal(batch["attention_mask"], concatenated["concatenated_attention_mask"])

    params = _copy_random_lora(ours_lora, theirs.model)
    theirs.model.train()
    trl_loss = theirs.compute_loss(theirs.model, trl_batch)
    trl_loss.backward()
    loss = ours.compute_loss(ours_lora, batch)
    loss.backward()

    loss_err = assert_close_rel(loss.detach(), trl_loss.detach(), "ORPO loss")
    _compare_metrics({k: v[-1] for k, v in ours._metrics["train"].items()},
                     {k: v[-1] for k, v in theirs._stored_metrics["train"].items()})
    grad_err = _compare_grads(ours_lora, params)
    print(f"\nORPO conversational={conversational}: loss {loss.item():.6f} (TRL {trl_loss.item():.6f}), "
          f"loss rel err {loss_err:.2e}, max LoRA grad rel err {grad_err:.2e}")


def test_orpo_padding_free_equals_padded(ours_lora, smollm2_tokenizer):
    data = list(tokenize_preference_dataset(paired_rows(True)[:3], smollm2_tokenizer, max_length=None))
    results = {}
    for padding_free in (False, True):
        batch = PreferenceCollator(smollm2_tokenizer.pad_token_id, padding_free=padding_free)(data)
        chosen, rejected, nll = orpo_log_probs(ours_lora, batch)
        results[padding_free] = (torch.cat([chosen, rejected]).detach(), nll.detach())
    assert_close_rel(results[True][0], results[False][0], "mean log-probs")
    assert_close_rel(results[True][1], results[False][1], "NLL")
    assert (results[False][0] < 0).all() and results[False][1] > 0


# ---------------------------------------------------------------------------------------------- trainers
def _model(folder):
    model, tokenizer = FastModel.from_pretrained(str(folder), dtype="float32", max_seq_length=512, verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, random_state=0)
    return model, tokenizer


def _kto_args(tmp_path, **overrides) -> KTOConfig:
    base = {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
            "learning_rate": 2e-3, "logging_steps": 1, "save_strategy": "no", "seed": 0, "max_length": 256,
            "use_cpu": True, "disable_tqdm": True}
    return KTOConfig(**{**base, **overrides})


def test_kto_trains_and_writes_report(tiny_chat_folder, tmp_path):
    model, tok = _model(tiny_chat_folder)
    rows = unpaired_rows(True)[:4]
    trainer = KTOTrainer(model=model, tokenizer=tok, train_dataset=rows, eval_dataset=rows,
                         args=_kto_args(tmp_path, padding_free=True))
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2
    assert logs[0]["loss"] == pytest.approx(0.5, abs=1e-4)  # policy == reference at the start: 1 - σ(0)
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"} <= set(logs[-1])
    assert logs[-1]["rewards/margins"] > 0
    assert "eval_kl" in trainer.evaluate()
    report = json.loads((tmp_path / "out" / "training_report.json").read_text())
    assert report["steps"] == 2 and report["trained_tokens"] > 0


def test_kto_precomputed_reference_equals_disabled_adapters(ours_lora, smollm2_tokenizer, tmp_path):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in lora_modules(ours_lora).values():  # policy != reference
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    args = _kto_args(tmp_path, precompute_ref_log_probs=True, precompute_ref_batch_size=3)
    trainer = KTOTrainer(model=ours_lora, tokenizer=smollm2_tokenizer, train_dataset=unpaired_rows(False), args=args)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    live = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    ref, ref_kl = reference_kto_log_probs(ours_lora, live, with_kl=True)
    assert_close_rel(batch["ref_logps"], ref, "ref_logps")
    assert_close_rel(batch["ref_KL_logps"], ref_kl, "ref_KL_logps")
    policy, _ = kto_log_probs(ours_lora, live, with_kl=False)
    assert rel_err(policy, ref) > 1e-3, "the policy should differ from the reference"
    with torch.no_grad():
        assert_close_rel(trainer.compute_loss(ours_lora, batch), trainer.compute_loss(ours_lora, live), "loss")


def test_orpo_trains_and_writes_report(tiny_chat_folder, tmp_path):
    model, tok = _model(tiny_chat_folder)
    args = ORPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=2e-3,
                      logging_steps=1, save_strategy="no", seed=0, max_length=256, use_cpu=True, disable_tqdm=True)
    trainer = ORPOTrainer(model=model, tokenizer=tok, train_dataset=paired_rows(True)[:4], args=args)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and logs[-1]["loss"] < logs[0]["loss"]
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/accuracies"} <= set(logs[-1])
    report = json.loads((tmp_path / "out" / "training_report.json").read_text())
    assert report["steps"] == 2 and report["trained_tokens"] > 0
    with pytest.raises(DatasetError, match="rejected"):
        ORPOTrainer(model=model, tokenizer=tok, train_dataset=[{"prompt": "a", "chosen": "b"}], args=args)
    with pytest.raises(ConfigurationError, match="beta"):
        ORPOConfig(output_dir=str(tmp_path), beta=0.0)
