"""Gemma (1): GeGLU MLP, embeddings scaled by sqrt(hidden), RMSNorm scaling by ``1 + w``, tied embeddings.

The rules Gemma 2 and 3 share with it live here too (:class:`GemmaFamily`); their own files add what
changes (soft-capping, sandwich norms, q/k norms, local RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.errors import UnsupportedArchitectureError
from engine.models.families.base import PARITY_VERIFIED, Biases, Family

#: The activation every Gemma was trained with (transformers' name): tanh-approximate GELU.
GEMMA_ACTIVATION = "gelu_pytorch_tanh"


@dataclass(frozen=True)
class GemmaFamily(Family):
    """Rules common to Gemma 1/2/3.

    Attributes (in addition to :class:`~engine.models.families.base.Family`'s):
        activation_field: the config field naming the MLP activation (``hidden_act`` in Gemma 1,
            ``hidden_activation`` in Gemma 2/3).
    """

    activation_field: str = "hidden_act"

    def biases(self, hf_config) -> Biases:
        attention = bool(getattr(hf_config, "attention_bias", False))
        return Biases(qkv=attention, o=attention)

    def gguf_config_fields(self, fields: dict, metadata, *, attention_bias: bool, mlp_bias: bool,
                           sliding_window: int | None) -> dict:
        # llama.cpp's Gemma graphs use tanh GELU whatever the original config said.
        return {"attention_bias": attention_bias, "hidden_act": GEMMA_ACTIVATION, self.activation_field: GEMMA_ACTIVATION}

    def activation(self, hf_config) -> str:
        act = getattr(hf_config, self.activation_field, None)
        if act != GEMMA_ACTIVATION:
            raise UnsupportedArchitectureError(
                f"{self.activation_field}={act!r} is not supported for {self.name}: the engine implements Gemma's "
                f"GeGLU with tanh-approximate GELU ({self.activation_field}={GEMMA_ACTIVATION!r}, what Gemma was "
                "trained with). Set that value in the config."
            )
        return "gelu_tanh"

    def model_fields(self, hf_config, head_dim: int) -> dict[str, Any]:
        return {"norm_offset": 1.0, "embed_scale": float(hf_config.hidden_size) ** 0.5}


_GEMMA_1 = {"vocab_size": 256000, "head_dim": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "max_position_embeddings": 8192, "hidden_act": GEMMA_ACTIVATION, "tie_word_embeddings": True,
            "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}

GEMMA = GemmaFamily(
    name="gemma",
    model_types=("gemma",),
    summary="GeGLU (tanh GELU) MLP, embeddings x sqrt(hidden), RMSNorm x (1 + w), head_dim 256, tied embeddings",
    verified=PARITY_VERIFIED + "; packed rows; GGUF f16 in llama.cpp",
    config_class="GemmaConfig",
    causal_lm_class="GemmaForCausalLM",
    gguf_architecture="gemma",  # NEOX RoPE: Q/K rows are not permuted
    gguf_norm_shift=1.0,
    chat_template="gemma",
    known_configs={
        # Published config.json fields of google/gemma-2b and google/gemma-7b.
        "google/gemma-2b": {**_GEMMA_1, "hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18,
                            "num_attention_heads": 8, "num_key_value_heads": 1},
        "google/gemma-7b": {**_GEMMA_1, "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
                            "num_attention_heads": 16, "num_key_value_heads": 16},
    },
    aliases={"google/gemma-2b-it": "google/gemma-2b", "google/gemma-7b-it": "google/gemma-7b",
             "google/gemma-1.1-2b-it": "google/gemma-2b", "google/gemma-1.1-7b-it": "google/gemma-7b"},
)
