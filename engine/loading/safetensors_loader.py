"""Reading Hugging Face model folders: config, and weights from (sharded) safetensors files.

Only safetensors are read; pickle-based ``.bin`` checkpoints are refused (loading them can
run arbitrary code).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def load_hf_config(folder: str | os.PathLike):
    """The transformers config of a model folder.

    Raises:
        CheckpointError: when ``config.json`` is missing or unreadable.
    """
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder} has no config.json. Point from_pretrained at a Hugging Face model folder "
            "(config.json + *.safetensors), a .gguf file, or a hub id."
        )
    try:
        return AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise CheckpointError(f"could not read {folder / 'config.json'}: {err}. Re-download or fix the file.") from err


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a folder: the shards named in the index, or the single file.

    Raises:
        CheckpointError: no safetensors weights (``.bin`` only, or nothing), a corrupt index,
            or a shard the index names that is missing.
    """
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err}); re-download the model") from err
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{index} names shard(s) that are missing: {', '.join(missing)}. The download is incomplete; "
                "download the model again."
            )
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(
            f"{folder} holds only pickle weights (.bin/.pt). The engine loads safetensors only, because "
            "unpickling can run arbitrary code. Convert once with transformers "
            "(model.save_pretrained(dir, safe_serialization=True)) and load that folder."
        )
    raise CheckpointError(f"no weight files (*.safetensors) found in {folder}")


def iter_safetensors(files: list[Path], device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of every file, one at a time (low peak memory).

    Raises:
        CheckpointError: when a file is truncated or not a safetensors file.
    """
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"{path} could not be read as safetensors ({err}). The file is corrupt or incomplete; download it again."
            ) from err
