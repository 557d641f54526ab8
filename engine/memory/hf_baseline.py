"""The plain Hugging Face baseline planned the same way as the engine: transformers + PEFT on fake tensors.

The model is transformers' own ``AutoModelForCausalLM`` built from the config, with PEFT's LoRA on
the same projections, set up as ``trl.SFTTrainer`` trains a QLoRA model: bf16 base, LoRA weights
cast to bf16 (TRL does this for 4-bit bases), transformers' gradient checkpointing (non-reentrant),
transformers' loss (full ``[tokens, vocab]`` logits, upcast to fp32). That loss is the one a plain
transformers + PEFT loop computes; TRL 1.16's ``SFTTrainer`` replaces it with its own fused LM head
(log-probs in tiles of up to 4,096 positions x 32,768 vocabulary entries; see docs/benchmarks.md), so for a
TRL run this part of the plan is an upper bound. All of that code runs for real
on fake tensors. Two pieces cannot, because they are CUDA extensions; they are replaced by stand-ins
that allocate and save exactly what the originals do:

* **bitsandbytes 4-bit linear** (``bnb.matmul_4bit`` / ``MatMul4Bit``): forward dequantizes the
  weight into a temporary ``[out, in]`` tensor of the compute dtype and multiplies; it saves no
  activation (only the quantized weight, by reference); backward dequantizes again for ``dX``.
  Storage per weight: packed 4-bit codes (``numel / 2`` bytes), 8-bit absmax per 64 values and an
  fp32 scale per 256 absmax values (double quantization), as bitsandbytes stores them.
* **flash-attention 2** (``attn_implementation="flash_attention_2"``, which Unsloth's published
  "HF + FA2" figures use): the engine's own flash-attention Function, which saves the same tensors
  (``q``, ``k``, ``v``, the output and the log-sum-exp) and needs no ``[s, s]`` mask. It is
  registered with transformers' public ``AttentionInterface`` under :data:`ATTENTION_NAME`.

Mixtures of experts: PEFT adapts the experts' grouped 3-D weights through ``target_parameters`` (as the engine's
defaults do), which folds ``W + scaling * B @ A`` into a full copy of each layer's expert stack every forward; the
bitsandbytes stand-in, like transformers' bitsandbytes integration, converts ``nn.Linear`` layers only, so expert
weights stay 16-bit under ``load_in_4bit``. That fold cannot run on ``meta`` tensors (see :func:`unplannable_reason`),
so such a baseline is planned with ``device="cpu"`` only.

Autocast is not simulated: with every weight already bf16 (base and LoRA) it changes no dtype that
matters for memory.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from engine.errors import ConfigurationError
from engine.memory.planner import make_optimizer, materialize_fake

#: Name of the flash-attention stand-in in transformers' attention registry.
ATTENTION_NAME = "engine_planner_fa2"  # no "flash" in it: transformers would look for a flash-attn package



def _flash_attention_standin(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             sliding_window=None, **kwargs):
    """transformers attention function: ``query [b, h, s, d]`` (keys/values ``[b, kv, s, d]``) -> ``([b, s, h, d], None)``."""
    from engine_kernels.attention import attention

    if attention_mask is not None:
        raise ConfigurationError("the flash-attention stand-in plans unpadded batches only (no attention_mask)")
    out = attention(query, key, value, scale=scaling, sliding_window=sliding_window)
    return out.transpose(1, 2), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTENTION_NAME, _flash_attention_standin)
    AttentionMaskInterface.register(ATTENTION_NAME, flash_attention_mask)


class _MatMul4BitStandIn(torch.autograd.Function):
    """Memory behaviour of bitsandbytes' ``MatMul4Bit``: dequantize to a temporary, matmul, save nothing."""

    @staticmethod
    def forward(ctx, x, packed, shape, bias):
        weight = torch.empty(shape, dtype=x.dtype, device=x.device)  # the dequantized weight, freed on return
        ctx.shape = shape
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        weight = torch.empty(ctx.shape, dtype=dy.dtype, device=dy.device)
        return dy @ weight, None, None, None


class Linear4bitStandIn(nn.Module):
    """A frozen 4-bit base layer with bitsandbytes' storage (NF4, double quantization, blocks of 64)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        out_features, in_features = base.weight.shape
        n = out_features * in_features
        device = base.weight.device
        self.shape = (out_features, in_features)
        self.register_buffer("packed", torch.empty((n + 1) // 2, dtype=torch.uint8, device=device))
        blocks = -(-n // 64)
        self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
        self.register_buffer("absmax_scale", torch.empty(-(-blocks // 256), dtype=torch.float32, device=device))
        self.bias = base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MatMul4BitStandIn.apply(x, self.packed, self.shape, self.bias)


def _quantize_base_layers(model: nn.Module) -> None:
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module.base_layer, nn.Linear):
            module.base_layer = Linear4bitStandIn(module.base_layer)


def _expert_targets(config, target_modules) -> list[str]:
    """The PEFT ``target_parameters`` the baseline adapts: the experts' projections, as the engine's defaults."""
    from engine.models.families import family_for_model_type
    from engine.peft import resolve_target_parameters

    family = family_for_model_type(config.model_type)
    return resolve_target_parameters(None, family.lora_parameters, 0.0, target_modules)


def unplannable_reason(config, s: dict) -> str | None:
    """Why the baseline cannot be planned for ``config`` with settings ``s`` (a sentence), or ``None``.

    PEFT's LoRA on experts (``target_parameters``) folds ``W + scaling * B @ A`` inside
    ``torch.autocast(device_type=W.device.type, enabled=False)``, and autocast does not accept the ``meta`` device
    that stands for the GPU in a plan: a mixture of experts with expert adapters is planned for the GPU by the engine
    only (``device="cpu"`` plans the baseline).
    """
    if s["device"] == "cuda" and _expert_targets(config, s["target_modules"]):
        return (
            "the Hugging Face baseline of a mixture of experts cannot be planned for a GPU: PEFT's expert LoRA "
            "(target_parameters) enters torch.autocast on the weights' device, which is 'meta' in a simulated-GPU "
            "plan; plan it with device='cpu', or target attention only (target_modules=[...] without experts)"
        )
    return None


def hf_builder(config, s: dict):
    """``build(fake_device) -> (model, optimizer)`` for transformers + PEFT (see the module docstring).

    Raises:
        ConfigurationError: the baseline cannot be planned for these settings (:func:`unplannable_reason`).
    """
    import peft
    from transformers import AutoModelForCausalLM

    from engine.peft import resolve_target_modules

    reason = unplannable_reason(config, s)
    if reason is not None:
        raise ConfigurationError(reason)
    _register_attention()
    config = copy.deepcopy(config)
    config.use_cache = False

    # Built on meta, outside the fake session (PEFT moves tensors between devices while it wraps layers).
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=s["dtype"], attn_implementation=ATTENTION_NAME)
    # Mixture of experts: the experts' grouped projections get PEFT's target_parameters adapters, as the engine's
    # defaults give them (transformers' bitsandbytes integration converts nn.Linear only: experts stay 16-bit).
    target_parameters = _expert_targets(config, s["target_modules"])
    lora = peft.LoraConfig(
        r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=resolve_target_modules(s["target_modules"]),
        **({"target_parameters": target_parameters} if target_parameters else {}),
    )
    model = peft.get_peft_model(model, lora)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(s["dtype"])  # TRL casts the adapters to bf16 for a 4-bit base; same for 16-bit

    def build(fake_device):
        materialize_fake(model, fake_device)
        if s["load_in_4bit"]:
            _quantize_base_layers(model)
        if s["gradient_checkpointing"]:  # transformers has no offloading in TRL's setup: "smart" plans plain
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        return model, make_optimizer(s["optimizer"], [p for p in model.parameters() if p.requires_grad])

    return build


__all__ = ["ATTENTION_NAME", "Linear4bitStandIn", "hf_builder", "unplannable_reason"]
