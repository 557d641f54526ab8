"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the engine's :class:`~engine.models.transformer.CausalLM`.

Two ways in:

* ``transformers.Trainer`` / the engine's trainers with ``fsdp=True, fsdp_config={"version": 2}`` (or
  ``accelerate launch`` with an FSDP2 config): accelerate shards the model. It reads the model's
  ``_no_split_modules`` (``["DecoderLayer"]``: one unit per decoder layer), puts the final norm and the output
  head (with the embedding when they are tied) in one unit, and the rest in the root unit. Accelerate does this
  only on GPUs and other accelerators; on CPU it silently trains with DDP, so the engine's trainers refuse
  ``fsdp`` there (:func:`check_trainer_fsdp`).
* Your own training loop: :func:`fully_shard_model` applies the same units.

What gets sharded: every ``nn.Parameter`` (dense base weights, norms, embedding, LoRA ``lora_A``/``lora_B``).
FSDP2 shards per parameter, so frozen base weights and trainable LoRA weights share a unit without flattening
(what ``use_orig_params=True`` gave FSDP1); only the trainable ones get gradients and optimizer state.
QLoRA's NF4 base weights are *buffers* (``weight_nf4_*``): FSDP2 never shards buffers, so each rank holds a full
copy of the 4-bit weights (replicated, as with DDP) and only the LoRA weights, norms, embedding and head are
sharded. The NF4 bytes never cross the network.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine.errors import ConfigurationError


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` has been applied to ``model`` (it is then an ``FSDPModule``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def sharding_units(model: nn.Module) -> list[nn.Module | list[nn.Module]]:
    """The FSDP2 units of ``model``, innermost first (the root, ``model`` itself, is last).

    Each decoder layer, then the tail: ``[final norm, embedding, lm_head]`` when the embedding and head share their
    weight (one unit, so the shared parameter belongs to one group), else ``embedding`` and ``[final norm,
    lm_head]``. This is the layout accelerate's FSDP2 plugin builds from ``_no_split_modules``.
    """
    inner = model.model
    units: list[nn.Module | list[nn.Module]] = list(inner.layers)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed.weight is head.weight:
        units.append([inner.norm, embed, head])
    else:
        units += [embed, [inner.norm, head]]
    return units


def fully_shard_model(model: nn.Module, mesh=None, *, reshard_after_forward: bool = True, mp_policy=None):
    """Shard ``model`` in place with FSDP2 over ``mesh`` (default: all ranks of the process group), for your own loop.

    Args:
        model (CausalLM): from :class:`engine.FastModel` (with or without LoRA, dense or NF4). Add LoRA before
            sharding: adapters added afterwards would not be sharded.
        mesh (DeviceMesh, optional): 1-D mesh of the data-parallel ranks; default ``init_device_mesh`` over the
            whole world on the model's device type.
        reshard_after_forward (bool): free each layer's gathered weights after its forward (ZeRO-3 style);
            ``False`` keeps them until backward (ZeRO-2 style, more memory, less communication).
        mp_policy (MixedPrecisionPolicy, optional): FSDP2 mixed precision; default none.

    Returns:
        The same ``model`` (now also an ``FSDPModule``): parameters are ``DTensor`` shards between steps.
        Build the optimizer *after* this call. FSDP2 averages gradients over the ranks; with the loss normalised
        by the global token count, multiply each rank's loss by the world size (as transformers' Trainer does).

    Raises:
        ConfigurationError: no process group (run under ``torchrun``), or the model is already sharded.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise ConfigurationError(
            "fully_shard_model needs a process group: launch with torchrun (or accelerate launch) and call "
            "torch.distributed.init_process_group() first"
        )
    if is_fully_sharded(model):
        raise ConfigurationError("the model is already sharded with fully_shard; shard it once")
    if mesh is None:
        mesh = init_device_mesh(model.device.type, (dist.get_world_size(),))
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    units = sharding_units(model)
    for unit in units[:-1]:
        fully_shard(unit, **kwargs)
    fully_shard(units[-1], **{**kwargs, "reshard_after_forward": False})  # used at the end of forward, start of backward
    fully_shard(model, **{k: v for k, v in kwargs.items() if k != "reshard_after_forward"})
    return model


def check_trainer_fsdp(model: nn.Module, args) -> None:
    """Refuse the FSDP set-ups that would not do what they say, before ``transformers.Trainer`` starts.

    Raises:
        ConfigurationError: ``fsdp`` on CPU (accelerate applies FSDP only on GPUs and other accelerators, so the run
            would silently be DDP); ``fsdp_config["version"] == 1`` (FSDP1's flat parameters are not supported);
            ``fsdp`` with full fine-tuning (the trainer saves LoRA adapters from the gathered state, not whole
            models); a model sharded with :func:`fully_shard_model` without ``fsdp`` (accelerate would wrap its
            ``DTensor`` parameters in DDP).
    """
    fsdp = bool(getattr(args, "fsdp", None))
    if not fsdp:
        if is_fully_sharded(model):
            raise ConfigurationError(
                "the model was sharded with fully_shard but the trainer's config has no fsdp: pass the unsharded "
                "model and set fsdp=True, fsdp_config={'version': 2} (the trainer shards it), or train it in your "
                "own loop"
            )
        return
    on_cpu = getattr(args, "use_cpu", False) or model.device.type == "cpu"
    if on_cpu:
        raise ConfigurationError(
            "fsdp was requested on CPU, where accelerate does not apply FSDP (the run would silently be DDP). "
            "On CPU use DDP instead: drop fsdp and launch with torchrun and ddp_backend='gloo'. To shard a model on "
            "CPU in your own training loop, use engine.distributed.fully_shard_model."
        )
    config = getattr(args, "fsdp_config", None) or {}
    if int(config.get("version", config.get("fsdp_version", 2))) != 2:
        raise ConfigurationError(
            "the engine supports FSDP2 only (fsdp_config={'version': 2}); FSDP1's flattened parameters are not "
            "supported. Use FSDP2, or DDP (drop fsdp)."
        )
    from engine.peft import has_adapters

    if not has_adapters(model):
        raise ConfigurationError(
            "fsdp with full fine-tuning is not supported by the engine's trainers (checkpoints are saved as LoRA "
            "adapters from the gathered state). Add LoRA with FastModel.get_peft_model, or use DDP (drop fsdp)."
        )


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank's shards gathered into full CPU tensors (a collective: call it on every rank).

    Returns ``{parameter name: tensor}`` on every rank (buffers included), as ``model.state_dict()`` names them.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
