"""Phi-3 / Phi-3.5-mini / Phi-4-mini: fused ``qkv_proj`` and ``gate_up_proj`` projections, sliding window on every
layer where the config has one, partial rotary embeddings (Phi-4-mini) and LongRoPE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gguf.constants import MODEL_TENSOR

from engine.models.families.base import PARITY_VERIFIED, Biases, Family
from engine.models.rope import longrope_inverse_frequencies, rope_parameters

#: Phi-3 layers as llama.cpp's ``phi3`` architecture names them (``ffn_up`` holds gate and up rows, gate first).
PHI3_BLOCK_TENSORS = {
    "input_layernorm": MODEL_TENSOR.ATTN_NORM,
    "self_attn.qkv_proj": MODEL_TENSOR.ATTN_QKV,
    "self_attn.o_proj": MODEL_TENSOR.ATTN_OUT,
    "post_attention_layernorm": MODEL_TENSOR.FFN_NORM,
    "mlp.gate_up_proj": MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": MODEL_TENSOR.FFN_DOWN,
}


@dataclass(frozen=True)
class Phi3Family(Family):
    """Phi-3's rules: fused projections, no biases, LongRoPE."""

    def biases(self, hf_config) -> Biases:
        return Biases()

    def model_fields(self, hf_config, head_dim: int) -> dict[str, Any]:
        fields: dict[str, Any] = {"fused_qkv": True, "fused_gate_up": True}
        if rope_parameters(hf_config).get("rope_type") == "longrope":
            _, long, _, original = longrope_inverse_frequencies(hf_config, head_dim)
            fields.update(long_inv_freq=long, long_rope_threshold=original)
        return fields

    def expected_shapes(self, hf_config) -> dict[str, tuple[int, ...]]:
        shapes = super().expected_shapes(hf_config)
        h, i = hf_config.hidden_size, hf_config.intermediate_size
        hd = getattr(hf_config, "head_dim", None) or h // hf_config.num_attention_heads
        kv = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        qkv = (hf_config.num_attention_heads + 2 * kv) * hd
        out: dict[str, tuple[int, ...]] = {}
        for name, shape in shapes.items():
            if name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight")):
                continue
            if name.endswith("self_attn.q_proj.weight"):
                out[name.replace("q_proj", "qkv_proj")] = (qkv, h)
            elif name.endswith("mlp.gate_proj.weight"):
                out[name.replace("gate_proj", "gate_up_proj")] = (2 * i, h)
            else:
                out[name] = shape
        return out

    def gguf_config_fields(self, fields: dict, metadata, *, attention_bias: bool, mlp_bias: bool,
                           sliding_window: int | None) -> dict:
        # llama.cpp's converter writes 0 for "no window" (Phi-4-mini); its phi3 graph ignores windows (see docs).
        fields_out: dict[str, Any] = {"sliding_window": sliding_window or None}
        original = fields["rope_parameters"].get("original_max_position_embeddings")
        if original is not None:  # Phi3Config also keeps it at the top level (default 4096)
            fields_out["original_max_position_embeddings"] = original
        return fields_out


_PHI3_MINI = {"vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000}

PHI3 = Phi3Family(
    name="phi3",
    model_types=("phi3",),
    summary="fused `qkv_proj` / `gate_up_proj`, sliding window on every layer, partial rotary (Phi-4-mini), "
            "LongRoPE (short/long factors per forward)",
    verified=PARITY_VERIFIED + "; packed rows; LongRoPE in both regimes; partial rotary; GGUF f16 in llama.cpp",
    config_class="Phi3Config",
    causal_lm_class="Phi3ForCausalLM",
    gguf_architecture="phi3",  # NEOX RoPE: rows are not permuted
    gguf_sliding_window=True,
    window_every_layer=True,
    block_tensors=PHI3_BLOCK_TENSORS,
    lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    chat_template="phi-3",
    known_configs={
        # Published config.json fields. The LongRoPE models' per-frequency factors are left out: they change the
        # RoPE angles, not any tensor's size, so the planner does not need them.
        "microsoft/Phi-3-mini-4k-instruct": {**_PHI3_MINI, "max_position_embeddings": 4096,
                                             "original_max_position_embeddings": 4096, "sliding_window": 2047},
        "microsoft/Phi-3.5-mini-instruct": {**_PHI3_MINI, "max_position_embeddings": 131072,
                                            "original_max_position_embeddings": 4096, "sliding_window": 262144},
        "microsoft/Phi-4-mini-instruct": {
            "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
            "num_attention_heads": 24, "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75, "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096, "sliding_window": 262144, "tie_word_embeddings": True,
            "bos_token_id": 199999, "eos_token_id": 199999, "pad_token_id": 199999,
        },
    },
)
