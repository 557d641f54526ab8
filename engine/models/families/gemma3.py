"""Gemma 3 (text): Gemma 2's layers without attention soft-capping, plus RMSNorm on each head of q and k, and
separate RoPE for the sliding-window ("local") layers and the global ones (linear scaling on the global layers
of the 4B+ models). Serves ``gemma3_text`` checkpoints and the text tower of multimodal ``gemma3`` ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.models.families.base import PARITY_VERIFIED
from engine.models.families.gemma import GEMMA_ACTIVATION
from engine.models.families.gemma2 import SANDWICH_BLOCK_TENSORS, Gemma2Family
from engine.models.rope import per_layer_type_rope, rope_inverse_frequencies


#: Where multimodal ``gemma3`` checkpoints keep the text model (transformers 5 / earlier layouts) -> our names.
_TEXT_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                  "language_model.lm_head.": "lm_head."}
#: The rest of a multimodal checkpoint: the vision tower and its projector, skipped.
_VISION_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")


@dataclass(frozen=True)
class Gemma3Family(Gemma2Family):
    """Gemma 3's text model (``gemma3_text``, or the text tower of a multimodal ``gemma3`` checkpoint)."""

    def text_config(self, hf_config):
        return hf_config.text_config if getattr(hf_config, "model_type", None) == "gemma3" else hf_config

    def checkpoint_name(self, name: str) -> str | None:
        if name.startswith(_VISION_PREFIXES):
            return None
        for prefix, ours in _TEXT_PREFIXES.items():
            if name.startswith(prefix):
                return ours + name[len(prefix):]
        return name

    def model_fields(self, hf_config, head_dim: int) -> dict[str, Any]:
        fields = super().model_fields(hf_config, head_dim)
        if per_layer_type_rope(hf_config):
            local, scaling = rope_inverse_frequencies(hf_config, head_dim, "sliding_attention")
            fields.update(local_inv_freq=local, local_rope_attention_scaling=scaling)
        return fields

    def gguf_config_fields(self, fields: dict, metadata, *, attention_bias: bool, mlp_bias: bool,
                           sliding_window: int | None) -> dict:
        out = super().gguf_config_fields(fields, metadata, attention_bias=attention_bias, mlp_bias=mlp_bias,
                                         sliding_window=sliding_window)
        local = {"rope_type": "default", "rope_theta": float(metadata.get("rope.freq_base_swa", 10000.0))}
        out["rope_parameters"] = {"full_attention": dict(fields["rope_parameters"]), "sliding_attention": local}
        return out


_GEMMA_3 = {"head_dim": 256, "rms_norm_eps": 1e-6, "hidden_activation": GEMMA_ACTIVATION,
            "query_pre_attn_scalar": 256, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "sliding_window_pattern": 6, "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1,
            "pad_token_id": 0}
_LINEAR_8 = {"rope_type": "linear", "factor": 8.0}

GEMMA3 = Gemma3Family(
    name="gemma3",
    model_types=("gemma3_text", "gemma3"),
    summary="Gemma 2's layers without attention soft-capping + q/k RMSNorm, local/global RoPE bases, "
            "262k vocabulary; multimodal `gemma3` checkpoints: the text tower",
    verified=PARITY_VERIFIED + "; packed rows; local/global RoPE with linear scaling; GGUF f16 in llama.cpp",
    config_class="Gemma3TextConfig",
    causal_lm_class="Gemma3ForCausalLM",
    gguf_architecture="gemma3",
    gguf_norm_shift=1.0,
    gguf_sliding_window=True,
    gguf_sliding_window_pattern=True,
    gguf_default_window=None,  # llama.cpp: no window unless the file gives one
    gguf_default_pattern=6,
    gguf_default_softcaps=(None, None),
    gguf_27b_layers=62,
    qk_norm=True,
    sandwich_norms=True,
    block_tensors=SANDWICH_BLOCK_TENSORS,
    activation_field="hidden_activation",
    chat_template="gemma",
    known_configs={
        # Published config.json fields (the text_config of the multimodal 4B/12B checkpoints).
        "google/gemma-3-1b-pt": {**_GEMMA_3, "vocab_size": 262144, "hidden_size": 1152, "intermediate_size": 6912,
                                 "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
                                 "sliding_window": 512, "max_position_embeddings": 32768},
        "google/gemma-3-4b-pt": {**_GEMMA_3, "vocab_size": 262208, "hidden_size": 2560, "intermediate_size": 10240,
                                 "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4,
                                 "sliding_window": 1024, "max_position_embeddings": 131072,
                                 "rope_scaling": _LINEAR_8},
        "google/gemma-3-12b-pt": {**_GEMMA_3, "vocab_size": 262208, "hidden_size": 3840,
                                  "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16,
                                  "num_key_value_heads": 8, "sliding_window": 1024,
                                  "max_position_embeddings": 131072, "rope_scaling": _LINEAR_8},
    },
    aliases={"google/gemma-3-1b-it": "google/gemma-3-1b-pt", "google/gemma-3-4b-it": "google/gemma-3-4b-pt",
             "google/gemma-3-12b-it": "google/gemma-3-12b-pt"},
)
