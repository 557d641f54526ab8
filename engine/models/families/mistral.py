"""Mistral: Llama with sliding-window attention on every layer (``sliding_window``), no biases."""

from __future__ import annotations

from dataclasses import dataclass

from engine.models.families.base import PARITY_VERIFIED, Biases, Family


@dataclass(frozen=True)
class _Mistral(Family):
    def biases(self, hf_config) -> Biases:
        return Biases()

    def gguf_config_fields(self, fields: dict, metadata, *, attention_bias: bool, mlp_bias: bool,
                           sliding_window: int | None) -> dict:
        return {"sliding_window": sliding_window}


MISTRAL = _Mistral(
    name="mistral",
    model_types=("mistral",),
    summary="sliding-window attention on every layer (`sliding_window`)",
    verified=(
        PARITY_VERIFIED + "; sliding window"
    ),
    config_class="MistralConfig",
    causal_lm_class="MistralForCausalLM",
    # llama.cpp's converter writes Mistral as `llama` and tells the two apart by the model name.
    gguf_architecture="llama",
    gguf_name_marker="mistral",
    gguf_permutes_qk=True,
    gguf_sliding_window=True,
    window_every_layer=True,
    chat_template="mistral",
    known_configs={
        "mistralai/Mistral-7B-v0.3": {
            "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0, "max_position_embeddings": 32768, "sliding_window": None,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        },
    },
    aliases={"mistralai/Mistral-7B-Instruct-v0.3": "mistralai/Mistral-7B-v0.3"},
)
