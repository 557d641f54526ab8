"""The memory planner: calibration against measured CPU peaks, the search, the HF baseline, errors."""

from __future__ import annotations

import pytest
import torch
import transformers

from engine import ConfigurationError, FastModel
from engine.memory import (
    MemoryEstimate,
    PlanningError,
    estimate_memory,
    known_model_names,
    max_context,
    plan_session,
    resolve_config,
)
from engine.memory.calibration import measure_cpu_peak, persistent_tensors, storage_bytes
from engine.memory.planner import search_max_length
from engine.memory.tracker import MemoryTracker
from engine.models.config import model_args_from_hf_config
from engine.models.transformer import CausalLM

#: Small enough for CPU, big enough that a step allocates megabytes (hidden 256, 2 layers, vocab 1000).
SMALL = {
    "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 8192,
}


def small_config(**overrides) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**{**SMALL, **overrides})


def real_engine_step_peak(config, seq_len, lora_r, load_in_4bit, checkpointing, dtype=torch.bfloat16, model=None,
                          tiled_mlp=False):
    """Measured CPU peak of the engine's second training step (AdamW), as the planner plans it."""
    if model is None:
        model = CausalLM(model_args_from_hf_config(config), max_seq_length=seq_len, dtype=dtype)
        if load_in_4bit:
            for name, m in model.named_modules():
                if name.startswith("model.layers.") and hasattr(m, "quantize_nf4_"):
                    m.quantize_nf4_(double_quant=True)
    FastModel.get_peft_model(model, r=lora_r, lora_alpha=lora_r, use_gradient_checkpointing=checkpointing,
                             tiled_mlp=tiled_mlp)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False,
                                  fused=False)

    def step():
        ids = torch.zeros(1, seq_len, dtype=torch.long)
        labels = torch.zeros(1, seq_len, dtype=torch.long)
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer states exist from here on, as in the plan's measured step
    return measure_cpu_peak(step, storage_bytes(persistent_tensors(model, optimizer)))


@pytest.mark.parametrize(("load_in_4bit", "checkpointing"), [(False, False), (True, True)])
def test_plan_matches_measured_cpu_peak_small_config(load_in_4bit, checkpointing):
    config = small_config()
    measured = real_engine_step_peak(config, 384, 8, load_in_4bit, checkpointing)
    plan = estimate_memory(config, 384, lora_r=8, load_in_4bit=load_in_4bit, gradient_checkpointing=checkpointing,
                           device="cpu")
    assert plan.total == pytest.approx(measured, rel=0.10)
    assert plan.total == sum(getattr(plan, c) for c in MemoryEstimate.COMPONENTS)


def test_plan_matches_measured_cpu_peak_with_tiled_mlp():
    config = small_config()
    measured = real_engine_step_peak(config, 1536, 8, True, True, tiled_mlp=512)
    plan = estimate_memory(config, 1536, lora_r=8, gradient_checkpointing=True, device="cpu", tiled_mlp=512)
    untiled = estimate_memory(config, 1536, lora_r=8, gradient_checkpointing=True, device="cpu")
    assert plan.total == pytest.approx(measured, rel=0.10)
    assert plan.total < untiled.total  # the planner sees what tiling saves


@pytest.mark.slow
def test_plan_matches_measured_cpu_peak_smollm2(smollm2_path):
    model, _ = FastModel.from_pretrained(smollm2_path, max_seq_length=256, dtype=torch.bfloat16, device="cpu",
                                         verbose=False)
    measured = real_engine_step_peak(None, 256, 16, False, True, model=model)
    plan = estimate_memory(smollm2_path, 256, lora_r=16, load_in_4bit=False, gradient_checkpointing=True, device="cpu")
    assert plan.total == pytest.approx(measured, rel=0.10)
    # The frozen weights are what the loaded model holds.
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    assert plan.weights == pytest.approx(storage_bytes(frozen), rel=0.01)


def real_hf_step_peak(config, seq_len, lora_r):
    """Measured CPU peak of transformers + PEFT (bf16 LoRA, non-reentrant checkpointing), as the baseline plans it."""
    import peft

    from engine.memory.hf_baseline import ATTENTION_NAME, _register_attention

    _register_attention()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=ATTENTION_NAME)
    lora = peft.LoraConfig(r=lora_r, lora_alpha=lora_r, lora_dropout=0.0, task_type="CAUSAL_LM",
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(model, lora)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.bfloat16)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False,
                                  fused=False)

    def step():
        ids = torch.zeros(1, seq_len, dtype=torch.long)
        model(input_ids=ids, labels=ids.clone()).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    return measure_cpu_peak(step, storage_bytes(persistent_tensors(model, optimizer)))


def test_hf_baseline_plan_matches_measured_cpu_peak():
    config = small_config()
    measured = real_hf_step_peak(config, 384, 8)
    plan = estimate_memory(config, 384, lora_r=8, load_in_4bit=False, gradient_checkpointing=True, device="cpu",
                           baseline="hf")
    assert plan.total == pytest.approx(measured, rel=0.10)


def test_engine_plans_less_than_hf_and_hf_keeps_logits():
    config = small_config(vocab_size=8000)
    kwargs = {"lora_r": 8, "gradient_checkpointing": True, "device": "cuda"}
    engine = estimate_memory(config, 2048, **kwargs)
    hf = estimate_memory(config, 2048, baseline="hf", **kwargs)
    assert engine.total < hf.total
    # HF keeps [tokens, vocab] logits (bf16 and their fp32 upcast); the engine's fused loss never builds them.
    assert hf.total - engine.total > 2048 * 8000 * 4


def test_gpu_plan_offloads_layer_inputs_to_host():
    config = small_config()
    plain = estimate_memory(config, 1024, lora_r=8, gradient_checkpointing=True)
    smart = estimate_memory(config, 1024, lora_r=8, gradient_checkpointing="smart")
    layer_inputs = 2 * 1024 * 256 * 2  # two layers' [s, d] bf16 inputs
    assert plain.host_offload < 1024  # a few bytes of document lengths built on the host
    assert smart.host_offload >= layer_inputs
    assert smart.saved_activations <= plain.saved_activations - layer_inputs // 2


def test_plan_session_caches_and_grows_with_length():
    session = plan_session(small_config(), lora_r=8)
    a, b = session.plan(512), session.plan(1024)
    assert session.plan(512) is a
    assert b.total > a.total
    assert session.planned_lengths == [512, 1024]


def test_search_max_length_finds_the_boundary():
    budget = 10_000_000
    calls = []

    def need(n):  # piecewise linear, like a real plan
        calls.append(n)
        return 3_000_000 + 700 * n + (50_000 if n > 4096 else 0)

    best = search_max_length(need, budget, low=1024, granularity=64)
    assert need(best) <= budget < need(best + 64)
    assert best % 64 == 0
    assert len(set(calls)) <= 12
    assert search_max_length(need, 1_000_000, granularity=64) == 0
    assert search_max_length(lambda n: 0, budget, high=1 << 16, granularity=64) == 1 << 16


def test_max_context_fits_and_next_length_does_not():
    config = small_config()
    session = plan_session(config, lora_r=8, gradient_checkpointing=True)
    gb = (session.plan(1024).required_bytes() + 3 * 2**20) / 2**30
    tokens = max_context(config, gb, session=session, granularity=128)
    assert tokens >= 1024
    assert session.plan(tokens).fits(gb)
    assert not session.plan(tokens + 128).fits(gb)
    assert max_context(config, 0.1, session=session, granularity=128) == 0  # the CUDA context alone does not fit


def test_known_models_resolve_offline():
    assert "meta-llama/Llama-3.1-8B" in known_model_names()
    config = resolve_config("Llama-3.1-8B-Instruct")
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 14336, 32)
    args = model_args_from_hf_config(resolve_config("Qwen/Qwen3-8B"))
    assert args.qk_norm and args.head_dim == 128


def test_config_from_gguf_and_folder(smollm2_path, hf_folders):
    assert resolve_config(smollm2_path).hidden_size == 576
    assert resolve_config(hf_folders["mistral"]).model_type == "mistral"


def test_errors_are_clear(tmp_path):
    with pytest.raises(ConfigurationError, match="max_seq_length"):
        estimate_memory(small_config(), 0)
    with pytest.raises(ConfigurationError, match="optimizer"):
        estimate_memory(small_config(), 64, optimizer="lion")
    with pytest.raises(ConfigurationError, match="gradient_checkpointing"):
        estimate_memory(small_config(), 64, gradient_checkpointing="always")
    with pytest.raises(ConfigurationError, match="device"):
        estimate_memory(small_config(), 64, device="tpu")
    with pytest.raises(ConfigurationError, match="tiled_mlp"):
        estimate_memory(small_config(), 64, baseline="hf", tiled_mlp=True)
    with pytest.raises(ConfigurationError, match="does not exist"):
        estimate_memory(tmp_path / "missing.gguf", 64)
    with pytest.raises(ConfigurationError, match="vram_gb"):
        max_context(small_config(), 0)


def test_values_of_activations_are_refused_but_token_values_are_known():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), MemoryTracker("cpu") as tracker:
        ids = torch.arange(10).view(2, 5)
        assert int(ids.max()) == 9  # computed from factory values: the shadow answers
        assert (ids != 3).nonzero().shape == (9, 2)
        tracker.phase("x")
        weights = torch.empty(64, 64)  # too big for a float shadow, like every weight and activation
        with pytest.raises(PlanningError, match="floating-point"):
            float(weights.sum())


def test_tracker_counts_live_bytes_and_frees():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), MemoryTracker("cpu") as tracker:
        start = tracker.clock
        a = torch.empty(1000, dtype=torch.float32)
        b = torch.empty(500, dtype=torch.float32)
        del a
        c = torch.empty(200, dtype=torch.float32)
        peak, _ = tracker.peak(start)
        assert peak == 6000
        assert tracker.live_bytes() == 2800
        del b, c


def test_simulated_gpu_takes_the_gpu_decisions():
    from engine_kernels._triton import launchable, multiprocessor_count
    from engine_kernels.dispatch import TRITON_OPS, describe_backends, is_gpu, simulate_gpu

    meta = torch.empty(2, device="meta")
    assert not is_gpu("meta") and describe_backends("meta")["rms_norm"] == "torch"
    with simulate_gpu() as gpu:
        backends = describe_backends("meta", torch.bfloat16)
        assert is_gpu("meta") and not is_gpu("cpu")
        assert all(backends[op] == "triton" for op in TRITON_OPS)
        assert multiprocessor_count("meta") == gpu.multiprocessors
    assert not launchable(meta) and launchable(torch.empty(2))
