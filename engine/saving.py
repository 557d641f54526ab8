"""Saving what was trained: a PEFT adapter, or a merged Hugging Face model folder.

* :func:`save_pretrained` writes ``adapter_config.json`` + ``adapter_model.safetensors``, the
  layout ``peft.PeftModel.from_pretrained`` loads onto a transformers model (or, for a
  model without LoRA, the whole model as a Hugging Face folder).
* :func:`save_pretrained_merged` folds each adapter into its base weight (``W + s * B @ A``
  in fp32, then cast) and writes a folder ``transformers.AutoModelForCausalLM`` loads.
  Tensors are merged and written shard by shard, so the model is never held twice.

Both are crash-safe (:mod:`engine.files`): every file is written under a temporary name and renamed into place
when the whole save is written, so a save killed half-way leaves the previous one intact and loadable.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.errors import ConfigurationError
from engine.files import PARTIAL_MARK, StagedFolder
from engine.modules.linear import Linear
from engine.modules.moe import EXPERT_PROJECTIONS, Experts
from engine.peft import adapter_state_dict, has_adapters

SAVE_METHODS = ("merged_16bit", "merged_32bit", "lora")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def save_pretrained(model, save_directory: str | os.PathLike, tokenizer=None, state_dict=None, **kwargs) -> None:
    """Save the LoRA adapter in PEFT format, or the full model when it has no adapter.

    Args:
        model (CausalLM): the model.
        save_directory: folder to create or overwrite files in.
        tokenizer (optional): saved beside the adapter when given.
        state_dict (dict, optional): the adapter values to write, keyed as ``model.state_dict()`` (FSDP2: the full
            tensors gathered from the shards, see :func:`engine.distributed.full_state_dict`). LoRA models only.

    Raises:
        ConfigurationError: ``state_dict`` for a model without LoRA adapters.
    """
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is not None and not has_adapters(model):
        raise ConfigurationError(
            "save_pretrained(state_dict=...) writes LoRA adapters; this model has none. Save the unsharded model "
            "with save_pretrained_merged."
        )
    if not has_adapters(model):
        save_pretrained_merged(model, out, tokenizer, save_method="merged_32bit" if model.dtype == torch.float32 else "merged_16bit", **kwargs)
        return
    config = model.lora_settings.to_peft_config(model.name_or_path)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model, state_dict).items()}
    with StagedFolder(out) as stage:  # crash-safe: files renamed into place once all are written
        stage.write_text("adapter_config.json", json.dumps(config, indent=2) + "\n")
        save_file(tensors, stage.path("adapter_model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            stage.add_folder(tokenizer.save_pretrained)


def _merged_tensors(model, dtype: torch.dtype):
    """Yield ``(hf_name, tensor)`` for every weight of the merged model, in ``dtype``, under the checkpoint's names
    (mixture-of-experts models: one tensor per expert, as the hub's checkpoints and transformers store them)."""
    family = model.args.family
    for name, tensor in _merged_parameters(model, dtype):
        yield from family.saved_tensors(name, tensor)


def _merged_parameters(model, dtype: torch.dtype):
    """``(engine parameter name, merged tensor in dtype)`` for every weight."""
    tied = model.args.tie_word_embeddings
    seen_modules: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            if name == "lm_head" and tied:
                continue
            seen_modules.add(name)
            yield f"{name}.weight", module.merged_weight(dtype)
            if module.bias is not None:
                yield f"{name}.bias", module.bias.detach().to(dtype)
        elif isinstance(module, Experts):
            seen_modules.add(name)
            for projection in EXPERT_PROJECTIONS:
                yield f"{name}.{projection}", module.merged_weight(projection, dtype)
    for name, param in model.named_parameters():
        module_name = name.rpartition(".")[0]
        if module_name in seen_modules or name.split(".")[-1] in ("lora_A", "lora_B"):
            continue
        yield name, param.detach().to(dtype)


def _write_shards(tensors, stage: StagedFolder, limit: int) -> list[tuple[str, list[str], int]]:
    """Write ``(name, tensor)`` pairs into safetensors shards of at most ``limit`` bytes (one tensor may exceed it).

    Each shard is written to a temporary file of ``stage``; :func:`save_pretrained_merged` names them
    (``model.safetensors``, or ``model-00001-of-0000N.safetensors`` when there are several) once all are written.

    Returns:
        ``[(temporary path, tensor names, bytes)]`` per shard.
    """
    shards: list[tuple[str, list[str], int]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal current, size
        path = os.path.join(stage.folder, f".shard-{len(shards) + 1:05d}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}")
        save_file(current, path, metadata={"format": "pt"})
        shards.append((path, list(current), size))
        current, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > limit:
            flush()
        current[name] = tensor.contiguous().cpu()
        size += nbytes
    if current:
        flush()
    return shards


def save_pretrained_merged(
    model,
    save_directory: str | os.PathLike,
    tokenizer=None,
    save_method: str = "merged_16bit",
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write a Hugging Face model folder with LoRA merged into the base weights.

    Args:
        model (CausalLM): the model (LoRA, QLoRA or fully fine-tuned).
        save_directory: output folder.
        tokenizer (optional): saved alongside.
        save_method (str): ``"merged_16bit"`` (the model's 16-bit dtype; bf16 for an fp32 model),
            ``"merged_32bit"``, or ``"lora"`` (adapter only, same as :func:`save_pretrained`).
        dtype (torch.dtype, optional): overrides the dtype chosen by ``save_method``.
        max_shard_size: largest safetensors shard (``"5GB"``, ``"200MB"`` or bytes).
    """
    if save_method not in SAVE_METHODS:
        raise ConfigurationError(f"save_method {save_method!r} is not one of {', '.join(SAVE_METHODS)}")
    if save_method == "lora":
        save_pretrained(model, save_directory, tokenizer)
        return
    if dtype is None:
        if save_method == "merged_32bit":
            dtype = torch.float32
        else:
            dtype = model.dtype if model.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    out = Path(save_directory)
    previous = {p.name for p in out.glob("model*.safetensors*")} if out.is_dir() else set()
    with StagedFolder(out) as stage:  # crash-safe: files renamed into place once all are written
        try:
            shard_files = _write_shards(_merged_tensors(model, dtype), stage, _parse_size(max_shard_size))
        except BaseException:
            for leftover in out.glob(f".shard-*{PARTIAL_MARK}*"):
                leftover.unlink(missing_ok=True)
            raise
        count, weight_map, total = len(shard_files), {}, 0
        for i, (path, keys, size) in enumerate(shard_files, start=1):
            final = "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(path, stage.path(final))
            weight_map.update(dict.fromkeys(keys, final))
            total += size
        written = set(weight_map.values())
        if count > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            stage.write_text("model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
            written.add("model.safetensors.index.json")
        config = model.config.to_dict()  # a classifier's config names its head (num_labels, architectures)
        config["torch_dtype"] = _DTYPE_NAMES[dtype]
        config["dtype"] = _DTYPE_NAMES[dtype]
        config.pop("quantization_config", None)
        stage.write_text("config.json", json.dumps(config, indent=2, default=str) + "\n")
        if tokenizer is not None:
            stage.add_folder(tokenizer.save_pretrained)
    for stale in previous - written:  # weights of an earlier save with another sharding would shadow these
        (out / stale).unlink(missing_ok=True)
