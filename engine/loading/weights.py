"""Put checkpoint tensors into a model built on the ``meta`` device, checking every name and shape.

Weights are materialised one tensor at a time, already in the target dtype (and, for
QLoRA, quantized to NF4 as they arrive), so loading never holds the model twice.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from engine.errors import CheckpointError
from engine.models.transformer import CausalLM
from engine.modules.linear import Linear
from engine.modules.moe import EXPERT_PROJECTIONS, Experts
from engine_kernels.nf4 import nf4_quantize

#: Checkpoint entries that carry no weights (derived buffers some exporters write).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _split(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def is_nf4_target(module_name: str, module: nn.Module) -> bool:
    """Whether ``load_in_4bit`` stores ``module``'s weights in NF4: a decoder layer's projection (a
    :class:`~engine.modules.linear.Linear` under ``model.layers.``, routers ``*.mlp.gate`` excepted, kept dense as
    bitsandbytes-based QLoRA keeps them) or an :class:`~engine.modules.moe.Experts` group (one NF4 tensor per
    expert slice). Embeddings, norms and ``lm_head`` stay in the compute dtype."""
    if isinstance(module, Experts):
        return True
    is_router = module_name.endswith(".mlp.gate")
    return isinstance(module, Linear) and module_name.startswith("model.layers.") and not is_router


def quantize_nf4_(model: nn.Module, double_quant: bool = True) -> None:
    """Quantize an already built model's weights to NF4 as :func:`load_weights` with ``load_in_4bit=True`` does
    (see :func:`is_nf4_target`); the memory planner and calibration build their models this way."""
    for name, module in list(model.named_modules()):
        if not is_nf4_target(name, module):
            continue
        if isinstance(module, Experts):
            for projection in EXPERT_PROJECTIONS:
                module.quantize_nf4_(projection, double_quant=double_quant)
        else:
            module.quantize_nf4_(double_quant=double_quant)


def load_weights(
    model: CausalLM,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    load_in_4bit: bool = False,
    double_quant: bool = True,
    source: str = "checkpoint",
) -> None:
    """Fill every parameter of ``model`` (built on the meta device) from ``tensors``.

    Args:
        model (CausalLM): model whose parameters are on the ``meta`` device.
        tensors: ``(hf_name, tensor)`` pairs, in any order.
        dtype: dtype of the materialised floating-point weights.
        device: where they go.
        load_in_4bit (bool): store decoder-layer projection weights as NF4, experts one NF4 tensor per expert
            (embeddings, norms, routers and ``lm_head`` stay in ``dtype``, as bitsandbytes-based QLoRA does).
        double_quant (bool): also quantize the NF4 absmax values (saves ~0.4 bit/param).
        source (str): name of the checkpoint, for error messages.

    Raises:
        CheckpointError: a tensor whose shape disagrees with the config, a missing tensor,
            or a tensor the model has no place for.
    """
    expected = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
    tied = model.args.tie_word_embeddings
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in tensors:
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        if name not in expected:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} but the config implies "
                f"{tuple(expected[name].shape)}. The config.json does not belong to these weights "
                "(or the file is corrupt); use the config that was saved with them."
            )
        if expected[name].is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(
                f"{source}: tensor {name!r} is stored as {tensor.dtype}, but model weights are floating point. "
                "The file is corrupt or was tampered with; download or convert it again."
            )
        module_name, leaf = _split(name)
        module = model.get_submodule(module_name)
        value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        quantize = load_in_4bit and is_nf4_target(module_name, module)
        if quantize and isinstance(module, Linear) and leaf == "weight":
            module.weight = None
            module._set_nf4(nf4_quantize(value, double_quant=double_quant))
        elif quantize and isinstance(module, Experts):
            module.quantize_nf4_(leaf, value, double_quant=double_quant)  # one NF4 tensor per expert slice
        else:
            setattr(module, leaf, nn.Parameter(value, requires_grad=value.is_floating_point()))
        loaded.add(name)
        del tensor, value
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
        raise CheckpointError(
            f"{source} holds {len(unexpected)} tensor(s) the {model.args.model_type} model has no place for: {shown}. "
            "The config.json does not match these weights."
        )
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = sorted(set(expected) - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise CheckpointError(
            f"{source} is missing {len(missing)} tensor(s): {shown}. The download is incomplete or the "
            "checkpoint is of another architecture; download it again."
        )
    model.inv_freq = model.args.inv_freq.clone().to(device)
    for name in ("local_inv_freq", "long_inv_freq"):
        if getattr(model.args, name) is not None:
            setattr(model, name, getattr(model.args, name).clone().to(device))
