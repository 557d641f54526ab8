"""Qwen2 / Qwen2.5: bias on the q/k/v projections; an optional sliding window on the upper layers."""

from __future__ import annotations

from dataclasses import dataclass

from engine.models.families.base import PARITY_VERIFIED, Biases, Family


@dataclass(frozen=True)
class _Qwen2(Family):
    def biases(self, hf_config) -> Biases:
        return Biases(qkv=True)

    def gguf_config_fields(self, fields: dict, metadata, *, attention_bias: bool, mlp_bias: bool,
                           sliding_window: int | None) -> dict:
        # GGUF files do not record which layers slide (transformers' use_sliding_window/max_window_layers).
        return {"use_sliding_window": False, "sliding_window": sliding_window}


QWEN2 = _Qwen2(
    name="qwen2",
    model_types=("qwen2",),
    summary="bias on q/k/v projections; optional sliding window on upper layers",
    verified=(
        PARITY_VERIFIED + " (q/k/v biases)"
    ),
    config_class="Qwen2Config",
    causal_lm_class="Qwen2ForCausalLM",
    gguf_architecture="qwen2",  # NEOX RoPE: Q/K rows are not permuted
    chat_template="qwen",
    known_configs={
        "Qwen/Qwen2.5-7B": {
            "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 131072, "use_sliding_window": False, "tie_word_embeddings": False,
            "bos_token_id": 151643, "eos_token_id": 151643,
        },
    },
    aliases={"Qwen/Qwen2.5-7B-Instruct": "Qwen/Qwen2.5-7B"},
)
