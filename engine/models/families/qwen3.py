"""Qwen3 (dense): RMSNorm on each head of q and k (``qk_norm``), explicit ``head_dim``."""

from __future__ import annotations

from dataclasses import dataclass

from engine.models.families.base import PARITY_VERIFIED, Biases, Family


@dataclass(frozen=True)
class _Qwen3(Family):
    def biases(self, hf_config) -> Biases:
        attention = bool(getattr(hf_config, "attention_bias", False))
        return Biases(qkv=attention, o=attention)

    def gguf_config_fields(self, fields: dict, metadata, *, attention_bias: bool, mlp_bias: bool,
                           sliding_window: int | None) -> dict:
        return {"attention_bias": attention_bias}


QWEN3 = _Qwen3(
    name="qwen3",
    model_types=("qwen3",),
    summary="RMSNorm on each head of q and k (`qk_norm`); explicit `head_dim`",
    verified=(
        PARITY_VERIFIED + "; the Triton path (interpreter)"
    ),
    config_class="Qwen3Config",
    causal_lm_class="Qwen3ForCausalLM",
    gguf_architecture="qwen3",  # NEOX RoPE: Q/K rows are not permuted
    qk_norm=True,
    chat_template="chatml",  # Qwen3's thinking blocks are not modelled
    known_configs={
        "Qwen/Qwen3-8B": {
            "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "max_position_embeddings": 40960, "tie_word_embeddings": False,
            "bos_token_id": 151643, "eos_token_id": 151645,
        },
    },
)
