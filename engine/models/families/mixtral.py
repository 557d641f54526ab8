"""Mixtral: Mistral's attention with a sparse mixture of experts in every layer (top-k routing, always renormalised)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.models.families.base import Biases
from engine.models.families.moe import MOE_GGUF_VERIFIED, MOE_VERIFIED, MoEFamily


@dataclass(frozen=True)
class _Mixtral(MoEFamily):
    def biases(self, hf_config) -> Biases:
        return Biases()

    def gguf_config_fields(self, fields: dict, metadata, *, attention_bias: bool, mlp_bias: bool,
                           sliding_window: int | None) -> dict:
        return {**self.gguf_moe_fields(metadata), "sliding_window": sliding_window}


MIXTRAL = _Mixtral(
    name="mixtral",
    model_types=("mixtral",),
    summary="experts in every layer: router `mlp.gate`, grouped `mlp.experts` (top-k, renormalised)",
    verified=MOE_VERIFIED + "; " + MOE_GGUF_VERIFIED,
    config_class="MixtralConfig",
    causal_lm_class="MixtralForCausalLM",
    # llama.cpp's converter writes Mixtral as `llama` (with `llama.expert_count`), Q/K rows permuted.
    gguf_architecture="llama",
    gguf_name_marker="mixtral",
    gguf_permutes_qk=True,
    gguf_sliding_window=True,
    window_every_layer=True,
    chat_template="mistral",
    checkpoint_block="block_sparse_moe",
    expert_names=("w1", "w3", "w2"),
    expert_size_field="intermediate_size",
    expert_count_field="num_local_experts",
    gguf_expert_feed_forward_length=False,  # `llama.feed_forward_length` is the experts' size
    always_normalize_top_k=True,
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    known_configs={
        "mistralai/Mixtral-8x7B-v0.1": {
            "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
            "sliding_window": None, "router_aux_loss_coef": 0.02, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2,
        },
    },
    aliases={"mistralai/Mixtral-8x7B-Instruct-v0.1": "mistralai/Mixtral-8x7B-v0.1"},
)
