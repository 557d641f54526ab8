"""Qwen3-MoE: Qwen3's attention (q/k norm) with experts in the layers ``decoder_sparse_step`` and ``mlp_only_layers``
choose (the others keep a dense MLP); top-k weights renormalised only with ``norm_topk_prob``."""

from __future__ import annotations

from dataclasses import dataclass

from engine.models.families.base import Biases
from engine.models.families.moe import MOE_GGUF_VERIFIED, MOE_VERIFIED, MoEFamily


@dataclass(frozen=True)
class _Qwen3Moe(MoEFamily):
    def biases(self, hf_config) -> Biases:
        attention = bool(getattr(hf_config, "attention_bias", False))
        return Biases(qkv=attention, o=attention)

    def gguf_config_fields(self, fields: dict, metadata, *, attention_bias: bool, mlp_bias: bool,
                           sliding_window: int | None) -> dict:
        return {**self.gguf_moe_fields(metadata), "attention_bias": attention_bias}


QWEN3_MOE = _Qwen3Moe(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    summary="Qwen3 attention; experts (router `mlp.gate`, grouped `mlp.experts`) in the layers "
    "`decoder_sparse_step`/`mlp_only_layers` pick; `norm_topk_prob`",
    verified=(
        MOE_VERIFIED + "; dense `mlp_only_layers`, `decoder_sparse_step`; " + MOE_GGUF_VERIFIED + "; GGUF export "
        "refuses `norm_topk_prob=False` and dense layers (llama.cpp's graph has neither)"
    ),
    config_class="Qwen3MoeConfig",
    causal_lm_class="Qwen3MoeForCausalLM",
    gguf_architecture="qwen3moe",  # NEOX RoPE: Q/K rows are not permuted
    qk_norm=True,
    window_every_layer=True,
    chat_template="chatml",
    checkpoint_block="mlp",
    expert_names=("gate_proj", "up_proj", "down_proj"),
    expert_size_field="moe_intermediate_size",
    # Attention only: PEFT 0.21 rewrites `gate_proj`/`up_proj`/`down_proj` in a Qwen3-MoE adapter config into the
    # experts' parameters (its transformers-v5 conversion), so adapters on a dense layer's MLP could not be loaded
    # by PEFT. The experts are targeted through `target_parameters`.
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    known_configs={
        "Qwen/Qwen3-30B-A3B": {
            "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
            "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
            "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
            "router_aux_loss_coef": 0.001, "tie_word_embeddings": False, "bos_token_id": 151643,
            "eos_token_id": 151645,
        },
    },
    aliases={"Qwen/Qwen3-30B-A3B-Instruct-2507": "Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B-Base": "Qwen/Qwen3-30B-A3B"},
)
