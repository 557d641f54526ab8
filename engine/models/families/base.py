"""What a model family is: everything the engine knows about one architecture, declared once.

A :class:`Family` answers every family-specific question the engine asks — which Hugging Face
``model_type`` values it serves, which biases and norms its layers carry, which layers slide their
attention window, what llama.cpp calls it and its tensors, whether llama.cpp's converter permutes its
Q/K rows, which projections LoRA targets, and the published configs the memory planner knows offline.
The loader (:mod:`engine.models.config`), the GGUF reader and writer, the LoRA GGUF writer and the
memory planner read these answers from the family; none of them tests ``model_type`` itself.

A Llama-shaped family is one file in this package with one :class:`Family` instance (see
``llama.py``), added to ``FAMILIES`` in ``__init__.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gguf.constants import MODEL_TENSOR, TENSOR_NAMES

from engine.errors import UnsupportedArchitectureError

#: Whole-model tensors: Hugging Face module path -> llama.cpp tensor.
GLOBAL_TENSORS: Mapping[str, MODEL_TENSOR] = {
    "model.embed_tokens": MODEL_TENSOR.TOKEN_EMBD,
    "model.norm": MODEL_TENSOR.OUTPUT_NORM,
    "lm_head": MODEL_TENSOR.OUTPUT,
}

#: Per-layer tensors of a Llama-shaped decoder layer: module path under ``model.layers.N.`` -> llama.cpp
#: tensor (``blk.N.<name>``). The one HF <-> GGUF name map: the reader inverts it, the writer and the
#: LoRA GGUF writer look names up in it.
LLAMA_BLOCK_TENSORS: Mapping[str, MODEL_TENSOR] = {
    "input_layernorm": MODEL_TENSOR.ATTN_NORM,
    "self_attn.q_proj": MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj": MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj": MODEL_TENSOR.ATTN_OUT,
    "self_attn.q_norm": MODEL_TENSOR.ATTN_Q_NORM,
    "self_attn.k_norm": MODEL_TENSOR.ATTN_K_NORM,
    "post_attention_layernorm": MODEL_TENSOR.FFN_NORM,
    "mlp.gate_proj": MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": MODEL_TENSOR.FFN_DOWN,
}

#: The projections of a Llama-shaped layer, by the names PEFT users pass as ``target_modules``.
LLAMA_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


#: What the parity suite checks for every family (``tests/test_parity.py``, ``tests/export/test_gguf_export.py``).
PARITY_VERIFIED = "logits, LoRA loss and gradients, right padding vs transformers + PEFT; GGUF f16/q8_0 written and read back"


def gguf_tensor_name(tensor: MODEL_TENSOR, layer: int | None = None) -> str:
    """llama.cpp's name of ``tensor`` (``"blk.3.attn_q"``; no ``.weight``), in ``layer`` for per-layer ones."""
    name = TENSOR_NAMES[tensor]
    return name.format(bid=layer) if layer is not None else name


@dataclass(frozen=True)
class Biases:
    """Which projections of a layer carry a bias: q/k/v, the attention output, the MLP."""

    qkv: bool = False
    o: bool = False
    mlp: bool = False


@dataclass(frozen=True)
class Family:
    """One model family, as every part of the engine needs it.

    Attributes:
        name: the family's name (``"llama"``); also the ``model_type`` the engine records for it.
        model_types: the transformers ``model_type`` values it serves.
        summary: how it differs from Llama, in a few words (the docs' supported-models table).
        verified: what the tests check for it, against which oracle (the same table).
        config_class: transformers config class (the oracle's, and what GGUF files are read into).
        causal_lm_class: transformers ``*ForCausalLM`` class name (the tests' oracle; ``architectures``).
        gguf_architecture: llama.cpp's ``general.architecture`` for it.
        gguf_name_marker: when several families share a GGUF architecture, the word in ``general.name`` that
            tells this one apart (llama.cpp writes Mistral as ``llama`` and tells them apart by name).
        gguf_permutes_qk: llama.cpp's converter permutes Q/K rows from rotate-half to interleaved RoPE
            (``llama``); NEOX-RoPE architectures (Qwen) are written as they are.
        gguf_sliding_window: the GGUF file records the attention window (``<arch>.attention.sliding_window``).
        gguf_sliding_window_pattern: it also records which layers slide (``<arch>.attention.sliding_window_pattern``,
            one bool per layer; Gemma 2/3).
        gguf_norm_shift: added to every RMSNorm weight in GGUF files (llama.cpp's Gemma graphs scale by ``w``
            where transformers scales by ``1 + w``: its converter stores ``w + 1``); the reader subtracts it.
        qk_norm: per-head RMSNorm on q and k before RoPE.
        sandwich_norms: layers also normalise the attention output and have a norm before and after the MLP
            (``pre_feedforward_layernorm``, ``post_feedforward_layernorm``; Gemma 2/3).
        window_every_layer: a config's ``sliding_window`` applies to every layer when the config has no
            ``layer_types`` (Mistral); otherwise only ``layer_types``' sliding layers use it.
        block_tensors: the HF <-> GGUF per-layer name map.
        expert_tensors: the per-layer name map of grouped expert parameters (mixture-of-experts families; empty
            for dense ones): parameter path under ``model.layers.N.`` (``"mlp.experts.gate_up_proj"``, ``[E, out,
            in]``) -> the llama.cpp tensors its ``out`` rows are split into, in order (``ffn_gate_exps``,
            ``ffn_up_exps``), each ``[E, out / parts, in]``.
        lora_targets: projections LoRA can target (``target_modules``).
        lora_parameters: weights LoRA can target in PEFT's ``target_parameters`` form (mixture-of-experts families:
            the grouped experts and the router); empty for dense families.
        chat_template: the name of the family's instruct prompt format in :mod:`engine.chat_templates`
            (``"llama-3"``, ``"qwen"``, ...; ``None``: no single format), for
            ``engine.get_chat_template(tokenizer, family.chat_template, model)``.
        known_configs: ``{hub id: config.json fields}`` the memory planner knows offline (copied from the
            models' published config.json files); ``aliases``: ``{hub id: listed hub id}`` of the same shape.
    """

    name: str
    model_types: tuple[str, ...]
    summary: str
    verified: str
    config_class: str
    causal_lm_class: str
    gguf_architecture: str
    gguf_permutes_qk: bool = False
    gguf_name_marker: str | None = None
    gguf_sliding_window: bool = False
    gguf_sliding_window_pattern: bool = False
    gguf_norm_shift: float = 0.0
    qk_norm: bool = False
    sandwich_norms: bool = False
    window_every_layer: bool = False
    block_tensors: Mapping[str, MODEL_TENSOR] = field(default_factory=lambda: dict(LLAMA_BLOCK_TENSORS))
    expert_tensors: Mapping[str, tuple[MODEL_TENSOR, ...]] = field(default_factory=dict)
    lora_targets: tuple[str, ...] = LLAMA_LORA_TARGETS
    lora_parameters: tuple[str, ...] = ()
    chat_template: str | None = None
    known_configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ per-config rules (override per family)

    def biases(self, hf_config) -> Biases:
        """The biases a model of this family with ``hf_config`` carries (Llama: from ``attention_bias``/``mlp_bias``)."""
        attention = bool(getattr(hf_config, "attention_bias", False))
        return Biases(qkv=attention, o=attention, mlp=bool(getattr(hf_config, "mlp_bias", False)))

    def text_config(self, hf_config):
        """The config of the language model inside ``hf_config`` (itself, except for multimodal checkpoints)."""
        return hf_config

    def checkpoint_name(self, name: str) -> str | None:
        """The engine's parameter name of a checkpoint tensor, or ``None`` for a tensor the engine skips (the vision
        tower of a multimodal checkpoint). Text checkpoints keep their names."""
        return name

    def checkpoint_tensors(self, tensors, hf_config):
        """A checkpoint's ``(name, tensor)`` stream under the engine's parameter names (mixture-of-experts families
        stack per-expert tensors here); dense families keep the stream as it is."""
        return iter(tensors)

    def saved_tensors(self, name: str, tensor):
        """The ``(name, tensor)`` pairs a model folder stores for the engine's parameter ``name`` (the inverse of
        :meth:`checkpoint_tensors`); dense families store it as it is."""
        yield name, tensor

    def activation(self, hf_config) -> str:
        """The gated MLP's activation for :class:`~engine.models.config.ModelArgs` (Llama: SwiGLU, ``"silu"``).

        Raises:
            UnsupportedArchitectureError: the config's ``hidden_act`` is another activation.
        """
        act = getattr(hf_config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedArchitectureError(
                f"hidden_act={act!r} is not supported for {self.name} (its MLP is SwiGLU: hidden_act='silu')"
            )
        return "silu"

    def model_fields(self, hf_config, head_dim: int) -> dict[str, Any]:
        """Family-specific :class:`~engine.models.config.ModelArgs` fields (norm offset, scales, soft-caps, local
        RoPE); Llama-shaped families have none."""
        return {}

    def sliding_windows(self, hf_config) -> list[int | None]:
        """Per layer, the attention window or ``None`` (full causal attention)."""
        n = hf_config.num_hidden_layers
        window = getattr(hf_config, "sliding_window", None)
        layer_types = getattr(hf_config, "layer_types", None)
        if window is None:
            return [None] * n
        if layer_types is not None:
            return [window if t == "sliding_attention" else None for t in layer_types]
        return [window] * n if self.window_every_layer else [None] * n

    def gguf_config_fields(self, fields: dict, metadata: Mapping[str, Any], *, attention_bias: bool, mlp_bias: bool,
                           sliding_window: int | None) -> dict:
        """Family-specific fields of the transformers config built from a GGUF file's metadata and tensors.

        Args:
            fields: the config fields every family shares, as read so far (sizes, ``rope_parameters``, ...).
            metadata: the file's ``<architecture>.*`` keys without that prefix (``"attention.sliding_window"``).
            attention_bias, mlp_bias: whether the file has attention / MLP bias tensors.
            sliding_window: ``attention.sliding_window``, or ``None``.

        Returns:
            Fields to add to (or replace in) ``fields``.
        """
        return {"attention_bias": attention_bias, "mlp_bias": mlp_bias}

    def check_gguf_export(self, args, hf_config=None) -> None:
        """Refuse a model llama.cpp's graph for :attr:`gguf_architecture` cannot compute (dense families: none).

        Args:
            args (ModelArgs): the model's arguments. hf_config: its transformers config (``None`` when loaded from
                a GGUF file), for naming the config fields in the message.
        """

    def expected_shapes(self, hf_config) -> dict[str, tuple[int, ...]]:
        """Every parameter of the transformers ``*ForCausalLM`` for ``hf_config``: name -> shape, in registration order.

        Llama-shaped layers here; a family with other layers (fused projections, extra norms) overrides it.
        The GGUF reader checks a file's tensors against it before dequantizing anything.
        """
        h, i, v = hf_config.hidden_size, hf_config.intermediate_size, hf_config.vocab_size
        hd = getattr(hf_config, "head_dim", None) or h // hf_config.num_attention_heads
        q = hf_config.num_attention_heads * hd
        kv = (getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads) * hd
        b = self.biases(hf_config)
        layer: dict[str, tuple[int, ...] | None] = {
            "self_attn.q_proj.weight": (q, h),
            "self_attn.q_proj.bias": (q,) if b.qkv else None,
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.k_proj.bias": (kv,) if b.qkv else None,
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.v_proj.bias": (kv,) if b.qkv else None,
            "self_attn.o_proj.weight": (h, q),
            "self_attn.o_proj.bias": (h,) if b.o else None,
            "self_attn.q_norm.weight": (hd,) if self.qk_norm else None,
            "self_attn.k_norm.weight": (hd,) if self.qk_norm else None,
            "mlp.gate_proj.weight": (i, h),
            "mlp.gate_proj.bias": (i,) if b.mlp else None,
            "mlp.up_proj.weight": (i, h),
            "mlp.up_proj.bias": (i,) if b.mlp else None,
            "mlp.down_proj.weight": (h, i),
            "mlp.down_proj.bias": (h,) if b.mlp else None,
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "pre_feedforward_layernorm.weight": (h,) if self.sandwich_norms else None,
            "post_feedforward_layernorm.weight": (h,) if self.sandwich_norms else None,
        }
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
        for n in range(hf_config.num_hidden_layers):
            shapes.update({f"model.layers.{n}.{k}": s for k, s in layer.items() if s is not None})
        shapes["model.norm.weight"] = (h,)
        if not getattr(hf_config, "tie_word_embeddings", False):
            shapes["lm_head.weight"] = (v, h)
        return shapes

    # ------------------------------------------------------------------ derived

    def config_type(self):
        """The transformers config class (imported on first use)."""
        import transformers

        return getattr(transformers, self.config_class)

    def hf_module(self, gguf_block_name: str) -> str | None:
        """The module path under ``model.layers.N.`` of a per-layer llama.cpp name (``"attn_q"``), or ``None``."""
        for module, tensor in self.block_tensors.items():
            if TENSOR_NAMES[tensor].removeprefix("blk.{bid}.") == gguf_block_name:
                return module
        return None

    def hf_expert_parameter(self, gguf_block_name: str) -> tuple[str, int, int] | None:
        """``(parameter path under model.layers.N., part, parts)`` of a per-layer llama.cpp expert tensor
        (``"ffn_up_exps"`` -> ``("mlp.experts.gate_up_proj", 1, 2)``: the second half of its rows), or ``None``."""
        for parameter, tensors in self.expert_tensors.items():
            for part, tensor in enumerate(tensors):
                if TENSOR_NAMES[tensor].removeprefix("blk.{bid}.") == gguf_block_name:
                    return parameter, part, len(tensors)
        return None

    def gguf_expert_names(self, parameter: str, layer: int) -> tuple[str, ...]:
        """llama.cpp's names of the parts of a grouped expert parameter (``"mlp.experts.gate_up_proj"``, 3 ->
        ``("blk.3.ffn_gate_exps", "blk.3.ffn_up_exps")``); empty for a parameter the family does not map."""
        return tuple(gguf_tensor_name(t, layer) for t in self.expert_tensors.get(parameter, ()))

    def gguf_block_name(self, module: str, layer: int) -> str | None:
        """llama.cpp's name of a per-layer module (``"self_attn.q_proj"``, 3 -> ``"blk.3.attn_q"``), or ``None``."""
        tensor = self.block_tensors.get(module)
        return gguf_tensor_name(tensor, layer) if tensor is not None else None
