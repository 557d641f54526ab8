"""Shared fixtures: tiny random models of every supported family, saved as Hugging Face folders."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Triton kernels are tested on CPU under Triton's interpreter; it must be on before any kernel file is
# imported (its @triton.jit decorators read it). With a GPU, the compiled kernels run on CUDA tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# CPU elementwise ops run eagerly in the suite (every parametrized dtype and shape would compile anew);
# tests/kernels/test_cpu_fusion.py turns compiling on and checks it against the eager ops and transformers.
os.environ.setdefault("ENGINE_CPU_COMPILE", "0")
# Nothing reaches the Hub: bitsandbytes asks Hugging Face's `kernels` for a Hub kernel at import on some CPUs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import transformers

from engine.assets import smollm2_gguf_path

# Tiny odd-sized configs: hidden not a power of two, 5 heads / 1 KV head (MQA), odd vocab.
_COMMON = dict(
    vocab_size=211,
    hidden_size=80,
    intermediate_size=56,
    num_hidden_layers=2,
    num_attention_heads=5,
    num_key_value_heads=1,
    max_position_embeddings=128,
    initializer_range=0.2,
    rms_norm_eps=1e-5,
)

FAMILY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON, tie_word_embeddings=True),
    "llama31": lambda: transformers.LlamaConfig(
        **_COMMON,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        rope_theta=500000.0,
    ),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, sliding_window=6, tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**{**_COMMON, "num_attention_heads": 3, "num_key_value_heads": 1}, head_dim=24, tie_word_embeddings=True),
    # Gemma: explicit head_dim unlike hidden / heads; query_pre_attn_scalar = head_dim (what llama.cpp assumes);
    # soft-caps small enough that tanh bends the tiny model's scores and logits.
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, head_dim=24, hidden_act="gelu_pytorch_tanh",
                                              tie_word_embeddings=True),
    "gemma2": lambda: transformers.Gemma2Config(
        **_COMMON, head_dim=24, query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=3.0,
        final_logit_softcapping=2.5, layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
    ),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **_COMMON, head_dim=24, query_pre_attn_scalar=24, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
    ),
    # Phi-4-mini-like: fused projections, partial rotary (12 of 16 dims), LongRoPE switching at 16 positions.
    "phi3": lambda: transformers.Phi3Config(
        **{**_COMMON, "num_key_value_heads": 5}, tie_word_embeddings=False, original_max_position_embeddings=16,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                         "long_factor": [1.5, 2.0, 3.0, 4.5, 6.5, 9.0],
                         "original_max_position_embeddings": 16},
    ),
}


# Mixture of experts (issue 18): odd sizes, 5 experts; Qwen3-MoE with a dense layer (mlp_only_layers) and, in the
# second variant, unnormalised top-k weights and experts every other layer (decoder_sparse_step=2).
_MOE_COMMON = dict(vocab_size=67, hidden_size=48, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=1,
                   max_position_embeddings=128, initializer_range=0.2, rms_norm_eps=1e-6)

MOE_CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        **_MOE_COMMON, intermediate_size=22, num_local_experts=5, num_experts_per_tok=2, router_jitter_noise=0.0,
        sliding_window=None, tie_word_embeddings=False, router_aux_loss_coef=0.3,
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **_MOE_COMMON, head_dim=16, intermediate_size=26, moe_intermediate_size=14, num_experts=5,
        num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=False,
        router_aux_loss_coef=0.3,
    ),
    "qwen3_moe_step2": lambda: transformers.Qwen3MoeConfig(
        **_MOE_COMMON, head_dim=16, intermediate_size=26, moe_intermediate_size=14, num_experts=5,
        num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=2, tie_word_embeddings=True,
        router_aux_loss_coef=0.3,
    ),
}


def make_hf_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A random transformers model of ``family`` (a key of ``FAMILY_CONFIGS`` or ``MOE_CONFIGS``) in fp32, eval mode
    (the test oracle)."""
    torch.manual_seed(seed)
    config = {**FAMILY_CONFIGS, **MOE_CONFIGS}[family]()
    # Experts: transformers' default "grouped_mm" needs 16-byte-aligned strides that odd sizes do not have on CPU.
    extra = {"experts_implementation": "eager"} if family in MOE_CONFIGS else {}
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, **extra)
    with torch.no_grad():  # norms initialise to a constant; random ones make the norm math visible
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape) * 0.2)
            elif name.endswith("mlp.gate.weight"):  # routers: spread the routing over every expert
                p.copy_(torch.randn(p.shape))
    return model.eval()


def _saved_models(root: Path, names) -> dict[str, Path]:
    """``{name: folder}``: each tiny transformers model of ``names`` saved under ``root`` (config + safetensors)."""
    folders = {}
    for name in names:
        folders[name] = root / name
        make_hf_model(name).save_pretrained(folders[name], safe_serialization=True)
    return folders


@pytest.fixture(scope="session")
def moe_folders(tmp_path_factory) -> dict[str, Path]:
    """``{family: folder}`` with each tiny mixture-of-experts model saved by transformers (one tensor per expert)."""
    return _saved_models(tmp_path_factory.mktemp("moe_models"), MOE_CONFIGS)


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory) -> dict[str, Path]:
    """``{family: folder}`` with each tiny model saved as config.json + model.safetensors."""
    return _saved_models(tmp_path_factory.mktemp("hf_models"), FAMILY_CONFIGS)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    """The real SmolLM2 tokenizer (with its chat template), read from the shipped GGUF file."""
    from engine.gguf.reader import load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(smollm2_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def make_tiny_chat_hf_model(seed: int = 0) -> transformers.PreTrainedModel:
    """A random 2-layer Llama with SmolLM2's vocabulary (49152), so the real tokenizer fits it."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**_COMMON, "vocab_size": 49152, "max_position_embeddings": 512}, tie_word_embeddings=True)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def train_losses(model, ids: torch.Tensor, steps: int = 12, lr: float = 3e-2) -> list[float]:
    """Train ``model``'s trainable parameters on ``ids`` (labels = ids) with AdamW; the loss of every step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def save_family_chat_model(family: str, folder: Path, tokenizer, **config_overrides) -> Path:
    """A tiny random model of ``family`` (``FAMILY_CONFIGS`` or ``MOE_CONFIGS``) sized for ``tokenizer``'s vocabulary
    (512 positions), saved with it."""
    config = {**FAMILY_CONFIGS, **MOE_CONFIGS}[family]()
    config.vocab_size = len(tokenizer)
    config.max_position_embeddings = 512
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape) * 0.2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_chat_folder(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A Hugging Face folder: tiny random Llama (hidden 80, 2 layers) + SmolLM2's tokenizer and chat template."""
    folder = tmp_path_factory.mktemp("tiny_chat")
    make_tiny_chat_hf_model().save_pretrained(folder, safe_serialization=True)
    smollm2_tokenizer.save_pretrained(folder)
    return folder
