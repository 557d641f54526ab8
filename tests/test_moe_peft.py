"""Mixture of experts: adapters move between the engine and PEFT both ways, merged folders load in transformers,
QLoRA quantizes each expert slice exactly as bitsandbytes does, and unsupported routing is refused by name."""

from __future__ import annotations

import json

import bitsandbytes.functional as bnb_functional  # the QLoRA oracle
import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

from engine import FastModel
from engine.errors import CheckpointError, ConfigurationError, UnsupportedArchitectureError
from engine.models.config import model_args_from_hf_config
from engine.modules.linear import Linear
from engine.modules.moe import EXPERT_PROJECTIONS, Experts
from engine_kernels.nf4 import nf4_dequantize
from tests.conftest import MOE_CONFIGS, make_hf_model
from tests.test_moe import EXPERTS, assert_close_rel, lora_pair

IDS = torch.randint(0, 67, (2, 15), generator=torch.Generator().manual_seed(3))


def _load(folder, **kwargs):
    return FastModel.from_pretrained(str(folder), dtype=torch.float32, device="cpu", verbose=False, **kwargs)[0]


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_saved_adapter_loads_in_peft_with_identical_logits(name, moe_folders, tmp_path):
    _, ours = lora_pair(name, moe_folders[name], router=True)
    ours.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted([*EXPERTS, "gate.weight"])
    peft_model = PeftModel.from_pretrained(make_hf_model(name), tmp_path / "adapter").eval()
    ours.eval()
    with torch.no_grad():
        assert_close_rel(ours(IDS).logits, peft_model(IDS).logits, what=f"{name} logits through PEFT")


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe_step2"])
def test_peft_adapter_loads_in_the_engine_with_identical_logits(name, moe_folders, tmp_path):
    torch.manual_seed(11)
    peft_model = get_peft_model(
        make_hf_model(name), LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"],
                                        target_parameters=EXPERTS)
    )
    with torch.no_grad():
        for key, p in peft_model.named_parameters():
            if "lora_B" in key:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = FastModel.load_adapter(_load(moe_folders[name]), tmp_path / "peft").eval()
    with torch.no_grad():
        assert_close_rel(ours(IDS).logits, peft_model.eval()(IDS).logits, what=f"{name} PEFT adapter in the engine")


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_merged_model_loads_in_transformers_with_identical_logits(name, moe_folders, tmp_path):
    _, ours = lora_pair(name, moe_folders[name], router=True)
    ours.eval()
    ours.save_pretrained_merged(tmp_path / "merged", save_method="merged_32bit")
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", dtype=torch.float32, experts_implementation="eager"
    ).eval()
    with torch.no_grad():
        assert_close_rel(merged(IDS).logits, ours(IDS).logits, what=f"{name} merged logits")
    # and back: the merged folder (one tensor per expert, as the hub stores them) loads in the engine
    with torch.no_grad():
        assert_close_rel(_load(tmp_path / "merged")(IDS).logits, ours(IDS).logits, what=f"{name} merged, reloaded")


@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_quantizes_each_expert_slice_as_bitsandbytes(double_quant, moe_folders):
    dense = _load(moe_folders["qwen3_moe"])
    quantized = _load(moe_folders["qwen3_moe"], load_in_4bit=True, double_quant=double_quant)
    compared = 0
    for (name, experts), (_, q_experts) in zip(dense.named_modules(), quantized.named_modules()):
        if not isinstance(experts, Experts):
            continue
        assert q_experts.is_quantized("gate_up_proj") and q_experts.is_quantized("down_proj")
        assert q_experts.gate_up_proj is None and q_experts.down_proj is None
        for projection in EXPERT_PROJECTIONS:
            weight = getattr(experts, projection).detach()
            for e, q in enumerate(q_experts.nf4_experts(projection)):
                packed, state = bnb_functional.quantize_4bit(
                    weight[e], blocksize=64, quant_type="nf4", compress_statistics=double_quant
                )
                assert torch.equal(q.packed, packed.reshape(-1))
                assert torch.equal(q.absmax, state.absmax)
                if double_quant:
                    assert torch.equal(q.absmax_scale, state.state2.absmax)
                    assert torch.equal(q.absmax_offset, state.offset)
                compared += 1
    assert compared == 2 * 2 * 5  # 2 sparse layers x 2 projections x 5 experts
    # the QLoRA model computes with the dequantized experts; the router stays dense
    assert all(not m.is_quantized for n, m in quantized.named_modules() if n.endswith(".mlp.gate"))
    with torch.no_grad():
        for (name, experts), (_, q_experts) in zip(dense.named_modules(), quantized.named_modules()):
            if isinstance(experts, Experts):
                for projection in EXPERT_PROJECTIONS:
                    deq = torch.stack([nf4_dequantize(q) for q in q_experts.nf4_experts(projection)])
                    getattr(experts, projection).copy_(deq)
            elif isinstance(q_experts, Linear) and q_experts.is_quantized:  # attention: NF4 too
                experts.weight.copy_(q_experts.base_weight())
        assert_close_rel(quantized(IDS).logits, dense(IDS).logits, what="QLoRA logits vs dequantized dense model")


def test_qlora_expert_lora_trains(moe_folders):
    model = _load(moe_folders["mixtral"], load_in_4bit=True)
    model = FastModel.get_peft_model(model, r=2, lora_alpha=4, use_gradient_checkpointing=True)
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    grads = [m.gate_up_proj_lora_B.grad for m in model.modules() if isinstance(m, Experts)]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"router_jitter_noise": 0.1}, "router_jitter_noise"),
        ({"num_experts_per_tok": 6}, "num_experts_per_tok"),
        ({"num_local_experts": 0}, "num_experts"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_routing_is_refused_by_name(change, field):
    config = MOE_CONFIGS["mixtral"]()
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(UnsupportedArchitectureError, match=field):
        model_args_from_hf_config(config)


def test_shared_experts_are_refused_by_name():
    config = MOE_CONFIGS["qwen3_moe"]()
    config.shared_expert_intermediate_size = 32
    with pytest.raises(UnsupportedArchitectureError, match="shared_expert_intermediate_size"):
        model_args_from_hf_config(config)


def test_expert_lora_settings_are_checked(moe_folders, tmp_path):
    model = _load(moe_folders["mixtral"])
    with pytest.raises(ConfigurationError, match="lora_dropout"):
        FastModel.get_peft_model(model, r=2, lora_dropout=0.1, use_gradient_checkpointing=False)
    with pytest.raises(ConfigurationError, match="unknown target parameter"):
        FastModel.get_peft_model(model, r=2, target_parameters=["experts.up_proj"], use_gradient_checkpointing=False)
    # attention-only with dropout is fine: no expert adapters then
    FastModel.get_peft_model(model, r=2, lora_dropout=0.1, target_modules=["q_proj"], use_gradient_checkpointing=False)
    assert not any(m.has_lora for m in model.modules() if isinstance(m, Experts))
    # a PEFT adapter whose fused expert rank differs (rank_pattern) is refused by name, not loaded wrongly
    peft_model = get_peft_model(make_hf_model("mixtral"), LoraConfig(r=2, target_modules=["w1", "w2", "w3"]))
    peft_model.save_pretrained(tmp_path / "patterned")
    with pytest.raises(CheckpointError, match="rank_pattern"):
        FastModel.load_adapter(_load(moe_folders["mixtral"]), tmp_path / "patterned")
