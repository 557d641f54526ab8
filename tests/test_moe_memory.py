"""The memory planner on mixtures of experts: measured CPU peaks, what the plan counts (NF4 experts as the loader
stores them, expert adapters in PEFT's layout, the grouped rows), depth extrapolation, the published configs."""

from __future__ import annotations

import pytest
import torch
import transformers

from engine import ConfigurationError, FastModel
from engine.loading.weights import quantize_nf4_
from engine.memory import estimate_memory, plan_session, resolve_config
from engine.memory.calibration import storage_bytes
from engine.models.config import model_args_from_hf_config
from engine.models.families import family_for_model_type
from engine.models.transformer import CausalLM
from tests.test_memory_planner import real_engine_step_peak

#: Small enough for CPU, big enough that a step allocates megabytes; Qwen3-MoE with a dense layer (mlp_only_layers).
SMALL_MOE = {
    "mixtral": lambda **kw: transformers.MixtralConfig(**{
        "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 344, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 8192, "sliding_window": None, "tie_word_embeddings": False, **kw}),
    "qwen3_moe": lambda **kw: transformers.Qwen3MoeConfig(**{
        "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 192,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_experts": 8,
        "num_experts_per_tok": 4, "norm_topk_prob": True, "mlp_only_layers": [1], "max_position_embeddings": 8192,
        "tie_word_embeddings": False, **kw}),
}


def tiny_mixtral(num_hidden_layers: int = 2, num_local_experts: int = 4) -> transformers.MixtralConfig:
    """For tests that compare plans with plans: planning time grows with experts x layers, not with sizes."""
    return SMALL_MOE["mixtral"](vocab_size=128, hidden_size=64, intermediate_size=48, num_attention_heads=2,
                                num_key_value_heads=1, num_hidden_layers=num_hidden_layers,
                                num_local_experts=num_local_experts)


def small_model(config, load_in_4bit: bool) -> CausalLM:
    """A bf16 engine model of ``config`` with random weights (routers spread tokens over the experts), NF4 as loaded."""
    torch.manual_seed(0)
    model = CausalLM(model_args_from_hf_config(config), max_seq_length=4096, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    if load_in_4bit:
        quantize_nf4_(model)
    return model


@pytest.mark.parametrize(("kind", "load_in_4bit", "checkpointing"),
                         [("qwen3_moe", False, False), ("mixtral", True, True)])
def test_moe_plan_matches_measured_cpu_peak(kind, load_in_4bit, checkpointing):
    config = SMALL_MOE[kind]()
    model = small_model(config, load_in_4bit)
    measured = real_engine_step_peak(None, 384, 8, load_in_4bit, checkpointing, model=model)
    plan = estimate_memory(config, 384, lora_r=8, load_in_4bit=load_in_4bit, gradient_checkpointing=checkpointing,
                           device="cpu")
    # Measured 0.01-0.02% apart (this 2-core CPU machine); 2% leaves room for routing-dependent group sizes.
    assert plan.total == pytest.approx(measured, rel=0.02)


def test_plan_counts_nf4_experts_and_adapters(moe_folders):
    """Weights as the loader stores them (experts NF4 per expert, routers dense), adapters in PEFT's layout
    (``[r*E, in]``, ``[out, r*E]``)."""
    folder = moe_folders["qwen3_moe"]
    model, _ = FastModel.from_pretrained(str(folder), dtype=torch.float32, device="cpu", load_in_4bit=True,
                                         verbose=False)
    FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    session = plan_session(folder, lora_r=4, lora_alpha=8, gradient_checkpointing=False, device="cpu",
                           dtype=torch.float32)
    plan = session.plan(64)
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    assert plan.weights == pytest.approx(storage_bytes(frozen), rel=0.01)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert plan.lora_parameters == storage_bytes(trainable)
    experts = model.model.layers[0].mlp.experts
    e, r, h = experts.num_experts, 4, experts.hidden_size
    assert experts.lora_factors("gate_up_proj")[0].shape == (r * e, h)
    assert experts.lora_factors("down_proj")[1].shape == (h, r * e)


def test_moe_block_plans_its_grouped_rows():
    """On fake tensors the block keeps for backward what a real one does: per token, ``k`` sorted rows ``[H]``, their
    gate_up output ``[2I]`` and ``h [I]`` (fp32 here), whatever the routing (the planner cannot know it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from engine.memory.tracker import MemoryTracker
    from engine.modules.moe import SparseMoeBlock

    h, e, i, k = 64, 4, 48, 2
    kept = {}
    with FakeTensorMode(allow_non_fake_inputs=True), MemoryTracker("cpu") as tracker:
        block = SparseMoeBlock(h, e, k, i, norm_topk_prob=True)
        block.experts.add_lora(["gate_up_proj", "down_proj"], r=4, alpha=8)
        for tokens in (64, 128):
            x = torch.empty(tokens, h, requires_grad=True)
            before = tracker.live_bytes()
            y = block(x)
            kept[tokens] = tracker.live_bytes() - before
            del x, y
    per_token = (kept[128] - kept[64]) / 64
    grouped = k * (h + 2 * i + i) * 4
    assert grouped <= per_token <= 2 * grouped


def test_extrapolated_plan_equals_the_full_depth_plan():
    config = tiny_mixtral(num_hidden_layers=5, num_local_experts=2)
    kwargs = {"lora_r": 8, "load_in_4bit": False, "gradient_checkpointing": "smart"}
    full = plan_session(config, **kwargs).plan(256)
    extrapolated = plan_session(config, extrapolate=True, **kwargs).plan(256)
    assert extrapolated.settings["depth"] == "extrapolated from 2 and 3 layers"
    for name in (*full.COMPONENTS, "total", "saved_activations", "host_offload"):
        assert getattr(extrapolated, name) == getattr(full, name), name
    # Dense and sparse layers mixed (mlp_only_layers): planned at full depth.
    mixed = SMALL_MOE["qwen3_moe"](num_hidden_layers=6, mlp_only_layers=[3])
    assert plan_session(mixed, lora_r=8, extrapolate=True).settings["depth"] == "all layers planned"
    with pytest.raises(ConfigurationError, match="extrapolate"):
        plan_session(config, baseline="hf", extrapolate=True)


@pytest.mark.parametrize(("name", "params", "experts", "k", "sparse"), [
    ("mistralai/Mixtral-8x7B-v0.1", 46_702_792_704, 8, 2, 32),
    ("Qwen/Qwen3-30B-A3B", 30_532_122_624, 128, 8, 48),
])
def test_published_moe_configs(name, params, experts, k, sparse):
    """The offline configs give the published parameter counts (46.7B, 30.5B) and routing."""
    config = resolve_config(name)
    family = family_for_model_type(config.model_type)
    shapes = family.expected_shapes(config)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == params
    args = model_args_from_hf_config(config)
    assert (args.num_experts, args.experts_per_token, sum(args.sparse_layers)) == (experts, k, sparse)
    assert args.norm_topk_prob


def test_hf_baseline_adapts_experts_and_refuses_the_simulated_gpu():
    config = tiny_mixtral()
    kwargs = {"lora_r": 8, "gradient_checkpointing": True, "load_in_4bit": False}
    hf = estimate_memory(config, 64, baseline="hf", device="cpu", **kwargs)
    # PEFT's adapters in bf16 (as TRL casts them): attention q, k, v, o and both experts' projections, 2 layers.
    h, kv, i, e, r = 64, 32, 48, 4, 8
    attention = r * ((h + h) + 2 * (h + kv) + (h + h))
    experts = r * e * (h + 2 * i) + r * e * (i + h)
    assert hf.lora_parameters == 2 * (attention + experts) * 2
    with pytest.raises(ConfigurationError, match="target_parameters"):
        estimate_memory(config, 64, baseline="hf", **kwargs)


def test_context_benchmark_names_what_it_does_not_plan(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import context

    args = context.parse_args(["--model", "Qwen/Qwen3-30B-A3B", "--sizes", "24", "--out", str(tmp_path)])
    sides = context.sides(args)
    assert sides["engine"]["extrapolate"] and "target_parameters" in context.skip_reason(args, "hf", sides["hf"])
    assert context.skip_reason(context.parse_args(["--model", "meta-llama/Llama-3.1-8B"]), "hf", sides["hf"]) is None
    results = {"engine": {"sizes": [{"vram_gb": 24, "max_tokens": 1024, "plan": {"host_offload": 0}}]},
               "hf": {"skipped": "a reason", "sizes": [{"vram_gb": 24, "max_tokens": None, "plan": None}]}}
    table = context.markdown(results, args)
    assert "| 24 GB | 1,024 | not planned | - | - | - |" in table and "not planned: a reason" in table
    assert not context.published_applies(args.model) and context.published_applies("meta-llama/Llama-3.1-8B")
