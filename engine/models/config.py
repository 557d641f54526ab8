"""The engine's description of a decoder-only model, built from a Hugging Face config.

Supported families share one implementation (:mod:`engine.models.transformer`); what differs
between them is declared once per family in :mod:`engine.models.families` and captured here as
plain fields of :class:`ModelArgs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.errors import UnsupportedArchitectureError
from engine.models.families import family_for_model_type, supported_model_types
from engine.models.rope import rope_inverse_frequencies, rotary_dim

#: transformers ``model_type`` values the engine implements (from :data:`engine.models.families.FAMILIES`).
SUPPORTED_MODEL_TYPES = supported_model_types()


@dataclass
class ModelArgs:
    """Hyper-parameters of a decoder-only model (all a forward pass needs).

    Attributes:
        model_type: one of :data:`SUPPORTED_MODEL_TYPES`.
        vocab_size, hidden_size, intermediate_size, num_layers: sizes.
        num_heads, num_kv_heads, head_dim: attention geometry (GQA when ``num_kv_heads < num_heads``).
        rms_norm_eps: epsilon of every RMSNorm.
        qkv_bias: bias on q/k/v projections; ``o_bias``: on the output projection; ``mlp_bias``: on the MLP.
        qk_norm: per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3).
        sliding_windows: per layer, the attention window or ``None`` for full causal attention.
        activation: the gated MLP's activation, ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU, Gemma).
        norm_offset: every RMSNorm scales by ``norm_offset + w`` (Gemma: 1.0, multiplied in fp32 before the
            cast back; 0.0: Llama's ``w * cast(xhat)``).
        embed_scale: token embeddings are multiplied by this (cast to the weights' dtype first), or ``None``.
        attention_scale: softmax scale of attention scores; ``None`` means ``head_dim ** -0.5``.
        attn_softcap: attention scores are soft-capped ``c * tanh(s / c)`` before masking, or ``None``.
        final_softcap: logits are soft-capped the same way, or ``None``.
        sandwich_norms: RMSNorm after attention and after the MLP too (Gemma 2/3): ``x + post(attn(pre(x)))``.
        local_inv_freq: RoPE inverse frequencies of the sliding-window layers when they differ (Gemma 3);
            ``local_rope_attention_scaling`` their cos/sin scaling. Layers with a window use them.
        rotary_dim: how many leading dimensions of each head RoPE rotates (``head_dim`` unless partial: Phi-4-mini).
        long_inv_freq: LongRoPE's long-context frequencies (Phi-3), used by a forward whose largest position id is
            at least ``long_rope_threshold`` (the config's ``original_max_position_embeddings``); ``inv_freq`` holds
            the short ones.
        fused_qkv: one ``qkv_proj`` projection ``[(h + 2 kv) * hd, d]`` instead of q/k/v (Phi-3).
        fused_gate_up: one ``gate_up_proj`` projection ``[2 * intermediate, d]`` (gate rows first) instead of two.
        num_experts: experts per sparse layer (0: a dense model); ``experts_per_token``: how many each token is
            routed to (top-k); ``expert_intermediate_size``: one expert's intermediate size.
        sparse_layers: per layer, whether it holds experts (mixture-of-experts families) or a dense MLP.
        norm_topk_prob: the top-k routing weights are renormalised to sum to 1.
        router_aux_loss_coef: weight of the load-balancing loss added to the loss when ``output_router_logits``.
        output_router_logits: the default of ``forward(output_router_logits=...)`` (the config's, off by default).
        tie_word_embeddings: ``lm_head`` shares the input embedding matrix.
        inv_freq: fp32 ``[head_dim // 2]`` RoPE inverse frequencies (scaling already applied).
        rope_attention_scaling: multiplier of cos/sin (1.0 except for some RoPE scalings).
        max_position_embeddings: context length the model was trained with.
        bos/eos/pad_token_id: special token ids from the config (eos may be a list).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    inv_freq: torch.Tensor
    rope_attention_scaling: float = 1.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_windows: list[int | None] = field(default_factory=list)
    activation: str = "silu"
    norm_offset: float = 0.0
    embed_scale: float | None = None
    attention_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sandwich_norms: bool = False
    local_inv_freq: torch.Tensor | None = None
    local_rope_attention_scaling: float = 1.0
    rotary_dim: int | None = None
    long_inv_freq: torch.Tensor | None = None
    long_rope_threshold: int | None = None
    fused_qkv: bool = False
    fused_gate_up: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    sparse_layers: list[bool] = field(default_factory=list)
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.0
    output_router_logits: bool = False

    def __post_init__(self):
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @property
    def family(self):
        """The :class:`~engine.models.families.Family` this model belongs to."""
        return family_for_model_type(self.model_type)


#: Config fields the model code does not implement, with the value it computes: anything else would change the math
#: silently, so loading stops and names the field.
_UNIMPLEMENTED = {
    "use_bidirectional_attention": (None, False),  # Gemma: attention without the causal mask
    "attention_dropout": (None, 0, 0.0),
    "resid_pdrop": (None, 0, 0.0),  # Phi-3: dropout on the residual branches
    "embd_pdrop": (None, 0, 0.0),
}


def _check_unimplemented(hf_config) -> None:
    for name, implemented in _UNIMPLEMENTED.items():
        value = getattr(hf_config, name, None)
        if value not in implemented:
            raise UnsupportedArchitectureError(
                f"{name}={value!r} is not implemented by the engine's model code (it computes {name}="
                f"{implemented[-1]!r}); set it to {implemented[-1]!r} in the config to fine-tune this model, "
                "knowing the results then differ from the original setting"
            )


def model_args_from_hf_config(hf_config) -> ModelArgs:
    """Translate a transformers config into :class:`ModelArgs`.

    Raises:
        UnsupportedArchitectureError: for a ``model_type`` outside :data:`SUPPORTED_MODEL_TYPES`.
    """
    model_type = getattr(hf_config, "model_type", None)
    family = family_for_model_type(model_type)
    _check_unimplemented(hf_config)
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    inv_freq, attention_scaling = rope_inverse_frequencies(hf_config, head_dim)
    biases = family.biases(hf_config)
    return ModelArgs(
        model_type=model_type,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rms_norm_eps=hf_config.rms_norm_eps,
        inv_freq=inv_freq,
        rope_attention_scaling=attention_scaling,
        qkv_bias=biases.qkv,
        o_bias=biases.o,
        mlp_bias=biases.mlp,
        qk_norm=family.qk_norm,
        sliding_windows=family.sliding_windows(hf_config),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        max_position_embeddings=getattr(hf_config, "max_position_embeddings", 2048),
        bos_token_id=getattr(hf_config, "bos_token_id", None),
        eos_token_id=getattr(hf_config, "eos_token_id", None),
        pad_token_id=getattr(hf_config, "pad_token_id", None),
        activation=family.activation(hf_config),
        rotary_dim=rotary_dim(hf_config, head_dim),
        **family.model_fields(hf_config, head_dim),
    )
