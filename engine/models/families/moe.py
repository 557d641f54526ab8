"""What mixture-of-experts families (Mixtral, Qwen3-MoE) add to a family: experts, a router, and their names.

A sparse decoder layer replaces the gated MLP with ``mlp.gate`` (the router, ``[E, hidden]``) and ``mlp.experts``,
whose weights are stored grouped as transformers 5 stores them: ``gate_up_proj [E, 2 * I, hidden]`` (gate rows
first) and ``down_proj [E, hidden, I]``. Checkpoints on the hub (and what transformers 5 writes with
``save_pretrained``) keep one tensor per expert and projection instead; :meth:`MoEFamily.checkpoint_tensors` stacks
them as they stream in and :meth:`MoEFamily.saved_tensors` splits them again for saving.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from gguf.constants import MODEL_TENSOR

from engine.errors import CheckpointError, ConfigurationError, UnsupportedArchitectureError
from engine.models.families.base import LLAMA_BLOCK_TENSORS, Family

#: The PEFT ``target_parameters`` names of a sparse layer's weights (what ``LoraConfig(target_parameters=...)``
#: matches): the experts' two grouped projections, and the router.
EXPERT_PARAMETERS: tuple[str, ...] = ("experts.gate_up_proj", "experts.down_proj")
ROUTER_PARAMETER = "gate.weight"

#: What the MoE tests check (tests/test_moe.py, tests/test_moe_peft.py).
MOE_VERIFIED = (
    "logits, router logits, aux loss, LoRA loss and gradients (attention, experts, router) with padding and packing "
    "vs transformers + PEFT `target_parameters`; adapters load both ways; merged folders load in transformers; "
    "per-expert NF4 = bitsandbytes"
)

#: A sparse layer's per-layer llama.cpp names: Llama's, plus the router ``mlp.gate`` ``[E, H]`` as ``ffn_gate_inp``
#: (a dense layer's ``mlp.gate_proj``/``up_proj``/``down_proj`` keep ``ffn_gate``/``ffn_up``/``ffn_down``).
MOE_BLOCK_TENSORS = {**LLAMA_BLOCK_TENSORS, "mlp.gate": MODEL_TENSOR.FFN_GATE_INP}
#: The grouped experts in llama.cpp's 3-D tensors (as ``convert_hf_to_gguf.py`` writes Mixtral and Qwen3-MoE):
#: ``gate_up_proj [E, 2I, H]`` is split into ``ffn_gate_exps [E, I, H]`` (its first ``I`` rows of every expert) and
#: ``ffn_up_exps [E, I, H]``; ``down_proj [E, H, I]`` is ``ffn_down_exps``. (GGUF lists dimensions reversed:
#: ``ne = {H, I, E}``.)
MOE_EXPERT_TENSORS = {
    "mlp.experts.gate_up_proj": (MODEL_TENSOR.FFN_GATE_EXP, MODEL_TENSOR.FFN_UP_EXP),
    "mlp.experts.down_proj": (MODEL_TENSOR.FFN_DOWN_EXP,),
}

#: What the GGUF tests check (tests/export/test_moe_gguf.py).
MOE_GGUF_VERIFIED = (
    "GGUF f16/q8_0/q4_k_m in llama.cpp (f16 top-1 on every position, quantized bytes equal llama.cpp's own) and LoRA "
    "GGUF on attention, router and experts"
)


@dataclass(frozen=True)
class MoEFamily(Family):
    """A :class:`Family` whose decoder layers may hold experts.

    Attributes:
        checkpoint_block: the checkpoint's module name of the sparse block under ``model.layers.N.``
            (Mixtral: ``"block_sparse_moe"``; Qwen3-MoE: ``"mlp"``). The engine's name is always ``"mlp"``.
        expert_names: the checkpoint's per-expert names of the gate, up and down projections
            (Mixtral ``("w1", "w3", "w2")``; Qwen3-MoE ``("gate_proj", "up_proj", "down_proj")``).
        expert_size_field: the config field of one expert's intermediate size.
        always_normalize_top_k: the top-k routing weights are always renormalised to sum to 1 (Mixtral); otherwise
            the config's ``norm_topk_prob`` decides (Qwen3-MoE).
        expert_count_field: the config field of the number of experts (Mixtral ``num_local_experts``).
        gguf_expert_feed_forward_length: GGUF files record one expert's size as
            ``<arch>.expert_feed_forward_length`` (Qwen3-MoE, whose ``feed_forward_length`` is the dense MLP's);
            otherwise ``feed_forward_length`` is the experts' size (Mixtral as ``llama``).
    """

    checkpoint_block: str = "mlp"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    expert_size_field: str = "moe_intermediate_size"
    always_normalize_top_k: bool = False
    expert_count_field: str = "num_experts"
    gguf_expert_feed_forward_length: bool = True
    lora_parameters: tuple[str, ...] = (*EXPERT_PARAMETERS, ROUTER_PARAMETER)
    block_tensors: Mapping[str, MODEL_TENSOR] = field(default_factory=lambda: dict(MOE_BLOCK_TENSORS))
    expert_tensors: Mapping[str, tuple[MODEL_TENSOR, ...]] = field(default_factory=lambda: dict(MOE_EXPERT_TENSORS))

    # ------------------------------------------------------------------ config
    def num_experts(self, hf_config) -> int:
        n = getattr(hf_config, "num_local_experts", None)
        return int(n if n is not None else getattr(hf_config, "num_experts", 0) or 0)

    def sparse_layers(self, hf_config) -> list[bool]:
        """Per layer, whether it holds experts (else a dense gated MLP of ``intermediate_size``)."""
        n = hf_config.num_hidden_layers
        step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
        dense = set(getattr(hf_config, "mlp_only_layers", None) or ())
        experts = self.num_experts(hf_config)
        return [experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(n)]

    def check_routing(self, hf_config) -> None:
        """Refuse routing settings the engine does not implement, naming the config field.

        Raises:
            UnsupportedArchitectureError: router jitter, more experts per token than experts, an expert layout
                with shared experts or biases.
        """
        jitter = float(getattr(hf_config, "router_jitter_noise", 0.0) or 0.0)
        if jitter:
            raise UnsupportedArchitectureError(
                f"router_jitter_noise={jitter} is not implemented (the engine routes without noise, as transformers "
                "does in eval mode); set router_jitter_noise=0.0 in the config to fine-tune this model"
            )
        e, k = self.num_experts(hf_config), int(getattr(hf_config, "num_experts_per_tok", 0) or 0)
        if e <= 0:
            raise UnsupportedArchitectureError(f"num_experts={e}: a {self.name} model needs experts; check the config")
        if not 0 < k <= e:
            raise UnsupportedArchitectureError(
                f"num_experts_per_tok={k} must be between 1 and the {e} experts; fix the config"
            )
        for field_name in ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts"):
            if getattr(hf_config, field_name, None):
                raise UnsupportedArchitectureError(
                    f"{field_name}={getattr(hf_config, field_name)!r}: shared experts are not implemented for "
                    f"{self.name}; the engine's experts are routed only"
                )
        step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
        if step < 1:
            raise UnsupportedArchitectureError(f"decoder_sparse_step={step} must be at least 1; fix the config")

    def moe_fields(self, hf_config) -> dict[str, Any]:
        """The :class:`~engine.models.config.ModelArgs` fields of the experts and router."""
        self.check_routing(hf_config)
        return {
            "num_experts": self.num_experts(hf_config),
            "experts_per_token": int(hf_config.num_experts_per_tok),
            "expert_intermediate_size": int(getattr(hf_config, self.expert_size_field)),
            "sparse_layers": self.sparse_layers(hf_config),
            "norm_topk_prob": self.always_normalize_top_k or bool(getattr(hf_config, "norm_topk_prob", False)),
            "router_aux_loss_coef": float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0),
            "output_router_logits": bool(getattr(hf_config, "output_router_logits", False)),
        }

    def model_fields(self, hf_config, head_dim: int) -> dict[str, Any]:
        return self.moe_fields(hf_config)

    # ------------------------------------------------------------------ GGUF
    def check_gguf_export(self, args, hf_config=None) -> None:
        """Refuse what llama.cpp's ``llama`` (Mixtral) and ``qwen3moe`` graphs cannot compute.

        Both graphs (``build_moe_ffn`` in llama.cpp's ``src/models/llama.cpp`` and ``qwen3moe.cpp``) renormalise the
        top-k routing weights (``norm_w = true``, no metadata key changes it) and put experts in every layer (no
        per-layer dense MLP), so a file of a model without either would compute other outputs.

        Raises:
            ConfigurationError: naming ``norm_topk_prob`` and/or ``mlp_only_layers``/``decoder_sparse_step``.
        """
        arch = self.gguf_architecture
        problems = []
        if not args.norm_topk_prob:
            problems.append(
                f"norm_topk_prob=False: llama.cpp's {arch!r} graph always renormalises the top-k routing weights to "
                "sum to 1"
            )
        dense = [i for i, sparse in enumerate(args.sparse_layers) if not sparse]
        if dense:
            fields = ", ".join(
                f"{name}={getattr(hf_config, name)!r}"
                for name in ("mlp_only_layers", "decoder_sparse_step")
                if hf_config is not None and hasattr(hf_config, name)
            ) or "mlp_only_layers / decoder_sparse_step"
            problems.append(
                f"layers {dense} have a dense MLP ({fields}): llama.cpp's {arch!r} graph has experts in every layer"
            )
        if problems:
            raise ConfigurationError(
                f"this {self.name} model cannot be written to GGUF, llama.cpp would compute different outputs: "
                + "; ".join(problems) + ". Save it with save_pretrained_merged and serve it with transformers or "
                "vLLM instead (a model trained with norm_topk_prob=True and experts in every layer exports)."
            )

    def gguf_moe_fields(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """The experts' config fields from a GGUF file's ``<arch>.*`` metadata (keys without the prefix).

        Raises:
            CheckpointError: ``expert_count`` or ``expert_used_count`` is missing.
        """
        for key in ("expert_count", "expert_used_count"):
            if not metadata.get(key):
                raise CheckpointError(
                    f"GGUF metadata key '{self.gguf_architecture}.{key}' is missing or 0 in a {self.name} file; the "
                    "file was written by an incomplete converter, convert the model again"
                )
        fields: dict[str, Any] = {
            self.expert_count_field: int(metadata["expert_count"]),
            "num_experts_per_tok": int(metadata["expert_used_count"]),
        }
        if self.gguf_expert_feed_forward_length and metadata.get("expert_feed_forward_length"):
            fields[self.expert_size_field] = int(metadata["expert_feed_forward_length"])
        if not self.always_normalize_top_k:  # what llama.cpp computes (see check_gguf_export)
            fields.update(norm_topk_prob=True, mlp_only_layers=[], decoder_sparse_step=1)
        return fields

    def expected_shapes(self, hf_config) -> dict[str, tuple[int, ...]]:
        """The engine's parameters (grouped experts) for ``hf_config``: name -> shape."""
        shapes = super().expected_shapes(hf_config)
        h, e = hf_config.hidden_size, self.num_experts(hf_config)
        i = int(getattr(hf_config, self.expert_size_field))
        out: dict[str, tuple[int, ...]] = {}
        sparse = self.sparse_layers(hf_config)
        for name, shape in shapes.items():
            match = re.match(r"model\.layers\.(\d+)\.mlp\.(\w+)\.weight$", name)
            if match and sparse[int(match.group(1))]:
                if match.group(2) == "gate_proj":
                    prefix = f"model.layers.{match.group(1)}.mlp."
                    out[prefix + "gate.weight"] = (e, h)
                    out[prefix + "experts.gate_up_proj"] = (e, 2 * i, h)
                    out[prefix + "experts.down_proj"] = (e, h, i)
                continue
            out[name] = shape
        return out

    # ------------------------------------------------------------------ checkpoint names
    def checkpoint_tensors(
        self, tensors: Iterable[tuple[str, torch.Tensor]], hf_config
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors under the engine's names, per-expert tensors stacked into the grouped ones.

        Accepts both layouts: one tensor per expert (the hub's, and what transformers writes) and the grouped one
        (``mlp.experts.gate_up_proj``). A layer's grouped tensors are yielded once all its experts have arrived.

        Raises:
            CheckpointError: a layer whose experts are incomplete at the end of the checkpoint.
        """
        e = self.num_experts(hf_config)
        gate, up, down = self.expert_names
        pattern = re.compile(
            rf"model\.layers\.(\d+)\.{re.escape(self.checkpoint_block)}\.experts\.(\d+)\.({gate}|{up}|{down})\.weight$"
        )
        pending: dict[int, dict[tuple[str, int], torch.Tensor]] = {}
        block = f".{self.checkpoint_block}."
        for name, tensor in tensors:
            match = pattern.match(name)
            if match is None:
                if block != ".mlp." and block in name:
                    name = name.replace(block, ".mlp.", 1)
                yield name, tensor
                continue
            layer, expert, proj = int(match.group(1)), int(match.group(2)), match.group(3)
            parts = pending.setdefault(layer, {})
            parts[(proj, expert)] = tensor
            if len(parts) == 3 * e:
                del pending[layer]
                prefix = f"model.layers.{layer}.mlp.experts."
                try:
                    gate_up = torch.stack([torch.cat([parts[(gate, x)], parts[(up, x)]]) for x in range(e)])
                    stacked_down = torch.stack([parts[(down, x)] for x in range(e)])
                except KeyError as err:
                    raise CheckpointError(f"layer {layer}: expert tensor {err} is missing from the checkpoint") from err
                except RuntimeError as err:
                    raise CheckpointError(f"layer {layer}: the expert tensors have different shapes ({err})") from err
                yield prefix + "gate_up_proj", gate_up
                yield prefix + "down_proj", stacked_down
        if pending:
            layer, parts = next(iter(pending.items()))
            raise CheckpointError(
                f"layer {layer} has {len(parts)} of its {3 * e} expert tensors ({self.checkpoint_block}.experts.N."
                f"{{{gate},{up},{down}}}.weight); the checkpoint is incomplete or num_experts is wrong"
            )

    def saved_tensors(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """A tensor under the checkpoint's names (per-expert for the grouped ones), for saving a model folder."""
        match = re.match(r"(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
        prefix = None
        if match is None:
            layer = re.match(r"(model\.layers\.\d+)\.mlp\.gate\.weight$", name)
            if layer is not None:
                yield f"{layer.group(1)}.{self.checkpoint_block}.gate.weight", tensor
            else:
                yield name, tensor
            return
        prefix = f"{match.group(1)}.{self.checkpoint_block}.experts"
        gate, up, down = self.expert_names
        for x in range(tensor.shape[0]):
            if match.group(2) == "gate_up_proj":
                g, u = tensor[x].chunk(2, dim=0)
                yield f"{prefix}.{x}.{gate}.weight", g.contiguous()
                yield f"{prefix}.{x}.{up}.weight", u.contiguous()
            else:
                yield f"{prefix}.{x}.{down}.weight", tensor[x].contiguous()
