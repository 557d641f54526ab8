"""Loading refuses tampered files with a CheckpointError, without large allocations: safetensors with wrong
offsets or an integer dtype, GGUF files claiming absurd tensor counts or sizes, adapters whose shapes do not match
the base model."""

from __future__ import annotations

import json
import resource
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine import CheckpointError, FastModel


def _header(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path, header, data):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _copy_model(hf_folders, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(hf_folders["llama"], folder)
    return folder


def test_safetensors_with_offsets_past_the_end_is_refused(hf_folders, tmp_path):
    folder = _copy_model(hf_folders, tmp_path)
    header, data = _header(folder / "model.safetensors")
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, end + 10**12]  # claims a terabyte
    _write(folder / "model.safetensors", header, data)
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        FastModel.from_pretrained(str(folder), dtype="float32", verbose=False)


def test_safetensors_with_an_integer_dtype_is_refused(hf_folders, tmp_path):
    folder = _copy_model(hf_folders, tmp_path)
    header, data = _header(folder / "model.safetensors")
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    header[name]["dtype"] = "I32"  # same byte size: safetensors itself cannot tell
    _write(folder / "model.safetensors", header, data)
    with pytest.raises(CheckpointError, match=r"is stored as torch.int32, but model weights are floating point"):
        FastModel.from_pretrained(str(folder), dtype="float32", verbose=False)


def _tiny_gguf(path):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("field", ["tensor_count", "tensor_size"])
def test_gguf_with_absurd_counts_or_sizes_is_refused_without_allocating(tmp_path, field):
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    raw = bytearray(path.read_bytes())
    if field == "tensor_count":
        raw[8:16] = struct.pack("<Q", 2**40)  # after magic and version
    else:
        name = b"token_embd.weight"
        at = raw.index(name) + len(name)
        n_dims = struct.unpack("<I", raw[at:at + 4])[0]
        assert n_dims == 2
        raw[at + 4:at + 12] = struct.pack("<Q", 2**40)  # the first dimension: 4 -> 2**40 rows
    path.write_bytes(bytes(raw))
    assert path.stat().st_size < 2048
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        FastModel.from_pretrained(str(path), verbose=False)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 256 * 1024, f"peak RSS grew by {grown_kib} KiB reading a 2 KiB file"


def test_adapter_with_mismatched_shapes_is_refused(hf_folders, tmp_path):
    model, _ = FastModel.from_pretrained(str(hf_folders["llama"]), dtype="float32", verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, random_state=0)
    model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    state = load_file(str(path))
    key = next(k for k in state if "lora_A" in k)
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="has shape"):
        FastModel.from_pretrained(str(tmp_path / "adapter"), dtype="float32", verbose=False)
