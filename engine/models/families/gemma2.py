"""Gemma 2: Gemma plus attention- and final-logit soft-capping, norms before and after attention and MLP
("sandwich"), alternating sliding-window / global layers and ``query_pre_attn_scalar``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gguf.constants import MODEL_TENSOR

from engine.models.families.base import LLAMA_BLOCK_TENSORS, PARITY_VERIFIED
from engine.models.families.gemma import GEMMA_ACTIVATION, GemmaFamily

#: Gemma 2/3 layers: ``post_attention_layernorm`` normalises the attention *output* (llama.cpp:
#: ``attn_post_norm``); the MLP's input norm is ``pre_feedforward_layernorm`` (``ffn_norm``).
SANDWICH_BLOCK_TENSORS = {
    **{k: v for k, v in LLAMA_BLOCK_TENSORS.items() if k != "post_attention_layernorm"},
    "post_attention_layernorm": MODEL_TENSOR.ATTN_POST_NORM,
    "pre_feedforward_layernorm": MODEL_TENSOR.FFN_NORM,
    "post_feedforward_layernorm": MODEL_TENSOR.FFN_POST_NORM,
}


@dataclass(frozen=True)
class Gemma2Family(GemmaFamily):
    """Gemma 2 (and the rules Gemma 3 keeps from it).

    Attributes (llama.cpp's values when a GGUF file lacks the key):
        gguf_default_window: attention window.
        gguf_default_pattern: every n-th layer is global (layers ``i % n < n - 1`` slide).
        gguf_default_softcaps: attention and final-logit soft-caps (``None``: off).
        gguf_27b_layers: the layer count llama.cpp recognises the 27B model by (query scale ``(hidden / heads)
            ** -0.5`` instead of ``head_dim ** -0.5``).
    """

    gguf_default_window: int | None = 4096
    gguf_default_pattern: int = 2
    gguf_default_softcaps: tuple[float | None, float | None] = (50.0, 30.0)
    gguf_27b_layers: int = 46

    def model_fields(self, hf_config, head_dim: int) -> dict[str, Any]:
        return {
            **super().model_fields(hf_config, head_dim),
            "attention_scale": float(hf_config.query_pre_attn_scalar) ** -0.5,
            "attn_softcap": _optional_float(getattr(hf_config, "attn_logit_softcapping", None)),
            "final_softcap": _optional_float(getattr(hf_config, "final_logit_softcapping", None)),
            "sandwich_norms": True,
        }


    def gguf_config_fields(self, fields: dict, metadata, *, attention_bias: bool, mlp_bias: bool,
                           sliding_window: int | None) -> dict:
        out = super().gguf_config_fields(fields, metadata, attention_bias=attention_bias, mlp_bias=mlp_bias,
                                         sliding_window=sliding_window)
        n = fields["num_hidden_layers"]
        # What llama.cpp computes when a key is absent (its gemma2 defaults: window 4096, every other layer slides,
        # soft-caps 50 and 30; query scale from the model size, see engine.gguf.writer).
        window = sliding_window if sliding_window is not None else self.gguf_default_window
        pattern = metadata.get("attention.sliding_window_pattern", self.gguf_default_pattern)
        if isinstance(pattern, (list, tuple)):
            sliding = [bool(v) for v in pattern]
        else:
            sliding = [int(pattern) == 0 or i % int(pattern) < int(pattern) - 1 for i in range(n)]
        out.update(
            sliding_window=window,
            layer_types=["sliding_attention" if s and window else "full_attention" for s in sliding],
            query_pre_attn_scalar=(fields["hidden_size"] // fields["num_attention_heads"]
                                   if n == self.gguf_27b_layers else fields["head_dim"]),
            attn_logit_softcapping=_optional_float(metadata.get("attn_logit_softcapping", self.gguf_default_softcaps[0])),
            final_logit_softcapping=_optional_float(
                metadata.get("final_logit_softcapping", self.gguf_default_softcaps[1])
            ),
        )
        return out


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


_GEMMA_2 = {"vocab_size": 256000, "head_dim": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "max_position_embeddings": 8192, "hidden_activation": GEMMA_ACTIVATION, "sliding_window": 4096,
            "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
            "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}

GEMMA2 = Gemma2Family(
    name="gemma2",
    model_types=("gemma2",),
    summary="Gemma + attention/final-logit soft-capping, sandwich norms, alternating sliding/global layers, "
            "`query_pre_attn_scalar`",
    verified=PARITY_VERIFIED + "; packed rows; GGUF f16 in llama.cpp",
    config_class="Gemma2Config",
    causal_lm_class="Gemma2ForCausalLM",
    gguf_architecture="gemma2",
    gguf_norm_shift=1.0,
    gguf_sliding_window=True,
    gguf_sliding_window_pattern=True,
    sandwich_norms=True,
    block_tensors=SANDWICH_BLOCK_TENSORS,
    activation_field="hidden_activation",
    chat_template="gemma",
    known_configs={
        # Published config.json fields of google/gemma-2-2b and google/gemma-2-9b.
        "google/gemma-2-2b": {**_GEMMA_2, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                              "num_attention_heads": 8, "num_key_value_heads": 4},
        "google/gemma-2-9b": {**_GEMMA_2, "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
                              "num_attention_heads": 16, "num_key_value_heads": 8},
    },
    aliases={"google/gemma-2-2b-it": "google/gemma-2-2b", "google/gemma-2-9b-it": "google/gemma-2-9b"},
)
