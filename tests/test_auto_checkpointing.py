"""Gradient checkpointing policies (none, every k-th layer, all, smart) and ``use_gradient_checkpointing="auto"``.

Every policy gives the same loss and gradients; "auto" (the default of ``get_peft_model``) picks the fastest
policy whose planned training step fits the memory budget, in a trainer when training starts and in a user's
own loop at the first training forward. Budgets are pinned (``memory_budget_gb``) so the choices do not depend
on this machine's free memory.
"""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
import transformers

from engine import ConfigurationError, FastModel, SFTConfig, SFTTrainer
from engine.memory import planner
from engine.memory.planner import choose_checkpointing, planned_peaks
from engine.modules import checkpointing
from engine.modules.checkpointing import CheckpointChoice, CheckpointPolicy
from engine.peft import lora_modules
from engine.training.reporting import ReportSummary

GIB = 2**30
NUM_LAYERS = 6


@pytest.fixture(scope="module")
def deep_folder(tmp_path_factory):
    """A tiny random Llama with 6 decoder layers (so every_2, every_3 and every_4 differ)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=211, hidden_size=80, intermediate_size=56, num_hidden_layers=NUM_LAYERS, num_attention_heads=5,
        num_key_value_heads=1, max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("deep_llama")
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


def _model(folder, dropout=0.0, **peft):
    model, _ = FastModel.from_pretrained(str(folder), dtype="float32", device="cpu", max_seq_length=512, verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=dropout, random_state=0, **peft)
    g = torch.Generator().manual_seed(5)
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)  # B = 0 would hide errors in dA
    return model.train()


def _packed_batch():
    """One padding-free row of three documents (7, 9 and 8 tokens), position ids restarting per document."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 211, (1, 24), generator=g)
    positions = torch.cat([torch.arange(7), torch.arange(9), torch.arange(8)])[None]
    return ids, positions


# ---------------------------------------------------------------------------------------------- policies
def test_policy_values_and_layers():
    parse = CheckpointPolicy.parse
    assert parse(False) == parse("none") == CheckpointPolicy("none") and parse(False).value is False
    assert parse(True) == parse("all") == CheckpointPolicy("all") and parse("all").value is True
    assert parse("smart") == parse("unsloth") == CheckpointPolicy("smart") and parse("smart").value == "smart"
    assert parse("every_3") == CheckpointPolicy("every_k", 3) and str(parse("every_3")) == "every_3"
    assert parse("auto") is None
    assert parse("every_3").checkpointed_layers(7) == (0, 3, 6)
    assert parse("every_2").checkpointed_layers(6) == (0, 2, 4)
    assert parse("none").checkpointed_layers(4) == () and parse("all").checkpointed_layers(3) == (0, 1, 2)
    assert parse("smart").offloads(2) and not parse("all").offloads(2) and not parse("every_2").offloads(0)
    for bad in ("always", "every_1", "every_x", 2, None, 1.5):
        with pytest.raises(ConfigurationError, match=r"False, True, 'smart'.*'auto'.*every_<k>"):
            parse(bad)
    with pytest.raises(ConfigurationError, match="every >= 2"):
        CheckpointPolicy("every_k", 1)
    with pytest.raises(ConfigurationError, match="mode"):
        CheckpointPolicy("sometimes")


def test_model_attribute_and_transformers_switches(deep_folder):
    model = _model(deep_folder)
    assert model.gradient_checkpointing == "auto" and model.checkpoint_policy is None  # the default, unresolved
    assert not model.is_gradient_checkpointing
    FastModel.set_gradient_checkpointing(model, "every_2")
    assert model.gradient_checkpointing == "every_2" and model.checkpoint_policy == CheckpointPolicy("every_k", 2)
    assert model.is_gradient_checkpointing
    model.gradient_checkpointing_enable()  # transformers' switch: every layer
    assert model.gradient_checkpointing is True
    FastModel.set_gradient_checkpointing(model, "unsloth")
    model.gradient_checkpointing_enable()
    assert model.gradient_checkpointing == "smart"  # smart stays smart
    FastModel.set_gradient_checkpointing(model, "auto")
    model.gradient_checkpointing_enable()
    assert model.gradient_checkpointing is True
    model.gradient_checkpointing_disable()
    assert model.gradient_checkpointing is False and model.checkpoint_policy == CheckpointPolicy("none")
    # transformers >= 5's names and arguments (TrainingArguments.activation_checkpointing_kwargs)
    model.activation_checkpointing_enable(every_n_layers=3)
    assert model.checkpoint_policy == CheckpointPolicy("every_k", 3)
    model.activation_checkpointing_enable(offload=True)
    assert model.gradient_checkpointing == "smart"
    with pytest.raises(ConfigurationError, match="offload=True applies to every layer"):
        model.activation_checkpointing_enable(every_n_layers=2, offload=True)
    model.activation_checkpointing_disable()
    assert not model.is_gradient_checkpointing


# ---------------------------------------------------------------------------------------------- exactness
POLICIES = [
    False,
    "every_2",
    "every_3",
    "every_4",
    True,
    "smart",
    CheckpointPolicy("smart", _force_copy=True),  # the offload copy path, run on CPU
]


def _loss_and_grads(model, policy, monkeypatch):
    FastModel.set_gradient_checkpointing(model, policy)
    calls = []
    real = checkpointing.checkpoint_layer
    monkeypatch.setattr(checkpointing, "checkpoint_layer", lambda *a, **k: calls.append(k) or real(*a, **k))
    ids, positions = _packed_batch()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # the same dropout masks for every policy
    loss = model(inputs_embeds=embeds, position_ids=positions, labels=ids).loss
    loss.backward()
    monkeypatch.setattr(checkpointing, "checkpoint_layer", real)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), embeds.grad.clone(), grads, calls


def test_every_policy_gives_identical_loss_and_gradients(deep_folder, monkeypatch):
    model = _model(deep_folder, dropout=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == NUM_LAYERS * 7 * 2 and all(".lora_" in n for n in trainable)
    loss0, embed_grad0, grads0, calls = _loss_and_grads(model, False, monkeypatch)
    assert calls == [] and set(grads0) == trainable
    assert embed_grad0.abs().sum() > 0
    for policy in POLICIES[1:]:
        loss, embed_grad, grads, calls = _loss_and_grads(model, policy, monkeypatch)
        expected = CheckpointPolicy.parse(policy).checkpointed_layers(NUM_LAYERS)
        assert len(calls) == len(expected), policy  # exactly the policy's layers were recomputed
        assert all(k["offload"] == (CheckpointPolicy.parse(policy).mode == "smart") for k in calls)
        assert torch.equal(loss, loss0), policy
        assert torch.equal(embed_grad, embed_grad0), policy
        assert grads.keys() == grads0.keys()
        for name in grads0:
            assert torch.equal(grads[name], grads0[name]), (policy, name)


# ---------------------------------------------------------------------------------------------- auto
SEQ = 384  # one row: activations dominate the tiny model's memory, so each policy plans less than the last


@pytest.fixture(scope="module")
def peaks(deep_folder):
    model = _model(deep_folder)
    exact = planned_peaks(model, 1, SEQ, exact=True)
    return exact


def test_planned_peaks_fall_with_each_policy_and_extrapolation_matches(deep_folder, peaks):
    assert list(peaks) == ["none", "every_4", "every_2", "all"]  # smart only on CUDA
    values = list(peaks.values())
    assert all(a > b for a, b in itertools.pairwise(values)), peaks
    # The 6-layer model is planned through 1/2- (none, all) and 2/4-layer (every_2) copies: the same peaks.
    estimated = planned_peaks(_model(deep_folder), 1, SEQ)
    for name, value in peaks.items():
        assert estimated[name] == pytest.approx(value, rel=0.01), name


def test_auto_with_a_large_budget_trains_without_checkpointing(deep_folder, capsys):
    model = _model(deep_folder, memory_budget_gb=1000)
    choice = FastModel.resolve_gradient_checkpointing(model, 1, SEQ)
    assert choice.policy == CheckpointPolicy("none") and model.checkpoint_policy == CheckpointPolicy("none")
    assert [p["policy"] for p in choice.plans] == ["none"]  # the first policy fits: nothing else is planned
    assert choice.budget_bytes == 1000 * GIB and choice.budget_source == "memory_budget_gb=1000"
    assert "gradient checkpointing: none (auto for 1 x 384 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("expected", ["every_4", "every_2", "all"])
def test_auto_picks_the_fastest_policy_that_fits(deep_folder, peaks, expected):
    names = list(peaks)
    above, below = peaks[names[names.index(expected) - 1]], peaks[expected]
    budget_gb = (above + below) / 2 / GIB  # between the previous policy's peak and this one's
    model = _model(deep_folder, memory_budget_gb=budget_gb)
    choice = FastModel.resolve_gradient_checkpointing(model, 1, SEQ, verbose=False)
    assert choice.policy.name == expected
    assert [p["policy"] for p in choice.plans] == names[: names.index(expected) + 1]
    assert [p["fits"] for p in choice.plans] == [False] * names.index(expected) + [True]
    for plan in choice.plans:
        assert plan["planned_peak_bytes"] == pytest.approx(peaks[plan["policy"]], rel=0.01)


def test_auto_when_nothing_fits(deep_folder, peaks):
    model = _model(deep_folder, memory_budget_gb=peaks["all"] / 2 / GIB)
    with pytest.raises(ConfigurationError, match=r"no checkpointing policy fits.*smallest plan is 'all' at 0\.\d+ GiB") as err:
        FastModel.resolve_gradient_checkpointing(model, 1, SEQ)
    message = str(err.value)
    assert f"memory budget of {peaks['all'] / 2 / GIB:.2f} GiB" in message
    assert "per_device_train_batch_size" in message and "memory_budget_gb" in message
    assert model.checkpoint_policy is None  # still unresolved


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "8", True, [8]])
def test_bad_memory_budgets(deep_folder, bad):
    model, _ = FastModel.from_pretrained(str(deep_folder), dtype="float32", device="cpu", verbose=False)
    with pytest.raises(ConfigurationError, match="memory_budget_gb must be a positive number"):
        FastModel.get_peft_model(model, r=4, memory_budget_gb=bad)
    assert not lora_modules(model)  # validated before the model was changed
    with pytest.raises(ConfigurationError, match="memory_budget_gb must be a positive number"):
        FastModel.set_gradient_checkpointing(model, "auto", memory_budget_gb=bad)


def test_budget_without_auto_and_unknown_modes(deep_folder):
    model, _ = FastModel.from_pretrained(str(deep_folder), dtype="float32", device="cpu", verbose=False)
    with pytest.raises(ConfigurationError, match="memory_budget_gb is the budget of use_gradient_checkpointing='auto'"):
        FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=True, memory_budget_gb=8)
    with pytest.raises(ConfigurationError, match=r"use_gradient_checkpointing must be False, True, 'smart'.*got 'always'"):
        FastModel.get_peft_model(model, r=4, use_gradient_checkpointing="always")
    assert not lora_modules(model)
    model = FastModel.get_peft_model(model, r=4).train()
    model.gradient_checkpointing = "sometimes"  # set directly: refused at the next training forward
    with pytest.raises(ConfigurationError, match="use_gradient_checkpointing must be"):
        model(torch.zeros(1, 4, dtype=torch.long), labels=torch.ones(1, 4, dtype=torch.long))


def test_default_budget_is_the_model_plus_a_share_of_the_free_memory(deep_folder, monkeypatch):
    assert planner.available_host_memory() > 0  # MemAvailable (Linux) or psutil
    model = _model(deep_folder)
    monkeypatch.setattr(planner, "available_host_memory", lambda: 10 * GIB)
    budget, source = planner.memory_budget(model)
    assert budget == int(model.get_memory_footprint() + 0.8 * 10 * GIB)
    assert source.startswith("80% of 10.00 GiB available RAM + the model's")
    monkeypatch.setattr(planner, "available_host_memory", lambda: None)
    with pytest.raises(ConfigurationError, match="pass memory_budget_gb"):
        planner.memory_budget(model)


# ---------------------------------------------------------------------------------------------- where it resolves
def test_user_loop_resolves_at_the_first_training_forward(deep_folder, peaks, monkeypatch, capsys):
    budget_gb = (peaks["every_2"] + peaks["all"]) / 2 / GIB
    model = _model(deep_folder, memory_budget_gb=budget_gb)
    planned = []
    real = planner.choose_checkpointing
    monkeypatch.setattr(planner, "choose_checkpointing", lambda *a, **k: planned.append(a[1:3]) or real(*a, **k))
    ids = torch.randint(0, 211, (1, SEQ))
    with torch.no_grad():
        model(ids, labels=ids)  # no gradients: nothing to checkpoint, nothing planned
    model.eval()
    model(ids, labels=ids)
    assert planned == [] and model.checkpoint_policy is None
    model.train()
    calls = []
    real_layer = checkpointing.checkpoint_layer
    monkeypatch.setattr(checkpointing, "checkpoint_layer", lambda *a, **k: calls.append(1) or real_layer(*a, **k))
    model(ids, labels=ids).loss.backward()
    assert planned == [(1, SEQ)]  # planned for this batch's shape
    assert model.checkpoint_policy == CheckpointPolicy("all") and len(calls) == NUM_LAYERS
    choice = model._auto_checkpoint_choice
    assert choice.when == "first training forward" and (choice.rows, choice.seq_len) == (1, SEQ)
    assert "engine: gradient checkpointing: all (auto for 1 x 384 tokens" in capsys.readouterr().out
    model(ids[:, :64], labels=ids[:, :64]).loss.backward()
    assert planned == [(1, SEQ)]  # resolved once


def test_a_planner_failure_warns_and_checkpoints_every_layer(deep_folder, monkeypatch):
    model = _model(deep_folder)

    def broken(*args, **kwargs):
        raise RuntimeError("no fake kernel")

    monkeypatch.setattr(planner, "choose_checkpointing", broken)
    with pytest.warns(UserWarning, match="could not plan a step of 1 x 64 tokens.*no fake kernel.*every layer"):
        choice = FastModel.resolve_gradient_checkpointing(model, 1, 64, verbose=False)
    assert choice.policy == CheckpointPolicy("all") == model.checkpoint_policy


def test_plans_are_cached_per_model_shape(deep_folder, monkeypatch):
    model = _model(deep_folder, memory_budget_gb=1000)
    choose_checkpointing(model, 1, 200)
    runs = []
    real = planner.PlanSession._run
    monkeypatch.setattr(planner.PlanSession, "_run", lambda self, *a: runs.append(a) or real(self, *a))
    second = choose_checkpointing(_model(deep_folder, memory_budget_gb=1000), 1, 200)  # a new model of the same shape
    assert runs == [] and second.policy.name == "none"


def _rows(n: int = 16) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i % 7}?", "completion": f"{i} plus {i % 7} is {i + i % 7}."} for i in range(n)]


def test_trainer_resolves_for_its_step_shape_and_reports_it(tiny_chat_folder, tmp_path, capsys):
    model, tok = FastModel.from_pretrained(str(tiny_chat_folder), dtype="float32", max_seq_length=256, verbose=False)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, max_length=64, save_strategy="no",
        use_cpu=True, disable_tqdm=True, report_to=[],
    )
    # Packing (the default) gives one padding-free row of up to batch x max_length tokens.
    peaks_2x64 = planned_peaks(FastModel.get_peft_model(
        FastModel.from_pretrained(str(tiny_chat_folder), dtype="float32", max_seq_length=256, verbose=False)[0], r=4
    ), 1, 128, exact=True)
    assert list(peaks_2x64) == ["none", "every_4", "every_2", "all"]
    budget_gb = (peaks_2x64["every_4"] + peaks_2x64["all"]) / 2 / GIB  # 2 layers: every_2 is every_4 ({0})
    model = FastModel.get_peft_model(model, r=4, memory_budget_gb=budget_gb)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(), args=args)
    assert trainer.step_shape() == (1, 128)
    capsys.readouterr()
    trainer.train()
    out = capsys.readouterr().out
    assert "engine: gradient checkpointing: all (auto for 1 x 128 tokens: planned peak none" in out
    summary = trainer.training_summary
    assert summary.checkpointing["policy"] == "all" and summary.checkpointing["when"] == "trainer start"
    assert [p["policy"] for p in summary.checkpointing["plans"]] == ["none", "every_4", "all"]
    assert "checkpointing" in summary.table() and "budget" in summary.table()
    written = json.loads((tmp_path / "out" / "training_report.json").read_text())
    assert written["checkpointing"]["policy"] == "all"
    assert written["checkpointing"]["budget_bytes"] == int(budget_gb * GIB)
    assert written["checkpointing"]["plans"][0]["planned_peak_bytes"] == pytest.approx(peaks_2x64["none"], rel=0.01)


def test_trainer_config_gradient_checkpointing_overrides_auto(tiny_chat_folder, tmp_path, capsys):
    model, tok = FastModel.from_pretrained(str(tiny_chat_folder), dtype="float32", max_seq_length=256, verbose=False)
    model = FastModel.get_peft_model(model, r=4)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, max_length=64, save_strategy="no",
        use_cpu=True, disable_tqdm=True, report_to=[], gradient_checkpointing=True,
    )
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=_rows(8), args=args)
    trainer.train()
    assert model.gradient_checkpointing is True
    assert trainer.training_summary.checkpointing["policy"] == "all"
    assert "gradient_checkpointing=True in the trainer's config" in capsys.readouterr().out


def test_step_shapes_of_the_trainers():
    from engine.training.collators import PaddedCollator, PaddingFreeCollator
    from engine.training.dpo import DPOTrainer
    from engine.training.preference_data import PreferenceCollator

    def fake(cls, collator, max_length=100, batch=3):
        trainer = object.__new__(cls)  # only what step_shape reads
        trainer.args = SimpleNamespace(per_device_train_batch_size=batch, max_length=max_length)
        trainer.model = SimpleNamespace(max_seq_length=512)
        trainer.data_collator = collator
        return trainer.step_shape()

    assert fake(SFTTrainer, PaddingFreeCollator(0)) == (1, 300)
    assert fake(SFTTrainer, PaddingFreeCollator(0, pad_to_multiple_of=64)) == (1, 320)
    assert fake(SFTTrainer, PaddedCollator(0)) == (3, 100)
    assert fake(SFTTrainer, PaddedCollator(0), max_length=None) == (3, 512)
    assert fake(DPOTrainer, PreferenceCollator(0)) == (6, 100)  # chosen and rejected rows
    assert fake(DPOTrainer, PreferenceCollator(0, padding_free=True)) == (1, 600)


def test_report_row_and_json():
    choice = CheckpointChoice(
        CheckpointPolicy("every_k", 2), "auto", "auto ...", 1, 8192, 3 * GIB, "memory_budget_gb=3",
        [{"policy": "none", "planned_peak_bytes": 4 * GIB, "fits": False},
         {"policy": "every_4", "planned_peak_bytes": int(3.5 * GIB), "fits": False},
         {"policy": "every_2", "planned_peak_bytes": int(2.5 * GIB), "fits": True}],
    )
    summary = ReportSummary(
        steps=1, total_seconds=1.0, median_step_seconds=1.0, trained_tokens=10, tokens_per_second=10.0,
        final_loss=None, device="cpu", world_size=1, memory={"peak_memory_bytes": MIB_100}, checkpointing=choice.as_dict(),
    )
    row = next(line for line in summary.table().splitlines() if line.startswith("checkpointing"))
    assert "every_2 (auto for 1 x 8,192 tokens: planned peak none 4.00 GiB (too much), every_4 3.50 GiB" in row
    assert row.endswith("every_2 2.50 GiB; budget 3.00 GiB)")
    fixed = CheckpointChoice(CheckpointPolicy("all"), "True", "use_gradient_checkpointing=True").as_dict()
    assert ReportSummary(**{**summary.__dict__, "checkpointing": fixed}).table().count("all (use_gradient_checkpointing=True)")
    assert json.loads(json.dumps(choice.as_dict()))["plans"][2]["fits"] is True
    assert not math.isnan(choice.as_dict()["planning_seconds"])


MIB_100 = 100 * 2**20
