"""Bad input gets a clear error that says what to do."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from engine import (
    CheckpointError,
    ConfigurationError,
    EngineError,
    FastModel,
    SequenceTooLongError,
    UnsupportedArchitectureError,
)


def _copy(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def _load(folder, **kw):
    return FastModel.from_pretrained(folder, dtype=torch.float32, device="cpu", verbose=False, **kw)[0]


def test_unsupported_architecture_names_supported_ones(tmp_path):
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedArchitectureError, match=r"'gpt2' is not supported.*llama, mistral, qwen2, qwen3"):
        _load(tmp_path / "gpt2")


def test_missing_path_and_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        _load(tmp_path / "nowhere" / "model.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        _load(tmp_path / "empty")


def test_missing_weight_files(hf_folders, tmp_path):
    folder = _copy(hf_folders["llama"], tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weight files"):
        _load(folder)
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="safetensors only"):
        _load(folder)


def test_corrupt_weight_file(hf_folders, tmp_path):
    folder = _copy(hf_folders["llama"], tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        _load(folder)


def test_missing_shard(hf_folders, tmp_path):
    folder = _copy(hf_folders["llama"], tmp_path)
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="shard.*missing"):
        _load(folder)


def test_config_weight_shape_mismatch(hf_folders, tmp_path):
    folder = _copy(hf_folders["llama"], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"has shape .* but the config implies"):
        _load(folder)


def test_missing_tensor(hf_folders, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(hf_folders["llama"], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing 1 tensor.*down_proj"):
        _load(folder)


def test_sequence_longer_than_max_seq_length(hf_folders):
    model = _load(hf_folders["llama"], max_seq_length=16)
    with pytest.raises(SequenceTooLongError, match="longer than max_seq_length=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    model(torch.zeros(1, 16, dtype=torch.long))


def test_unknown_target_module(hf_folders):
    model = _load(hf_folders["llama"])
    with pytest.raises(ConfigurationError, match=r"unknown target module.*'qkv'.*q_proj"):
        FastModel.get_peft_model(model, target_modules=["q_proj", "qkv"])
    with pytest.raises(ConfigurationError, match="positive integer"):
        FastModel.get_peft_model(model, r=0)


def test_all_labels_masked(hf_folders):
    model = _load(hf_folders["llama"])
    ids = torch.randint(0, 200, (2, 6))
    with pytest.raises(ConfigurationError, match="every label in this batch is -100"):
        model(ids, labels=torch.full_like(ids, -100))


def test_bad_dtype_and_kernel_backend(hf_folders, monkeypatch):
    with pytest.raises(ConfigurationError, match="dtype 'float8'"):
        FastModel.from_pretrained(hf_folders["llama"], dtype="float8", verbose=False)
    monkeypatch.setenv("ENGINE_KERNELS", "cuda-magic")
    model = _load(hf_folders["llama"])
    with pytest.raises(ConfigurationError, match="ENGINE_KERNELS"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_all_errors_share_a_base_class():
    for cls in (CheckpointError, ConfigurationError, SequenceTooLongError, UnsupportedArchitectureError):
        assert issubclass(cls, EngineError)


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not download 'some-org/some-model'"):
        FastModel.from_pretrained("some-org/some-model", verbose=False)


def test_default_dtype_follows_the_hardware():
    from engine.loader import resolve_dtype

    cpu_bf16 = torch.cpu._is_avx512_bf16_supported()
    assert resolve_dtype(None, torch.device("cpu")) == (torch.bfloat16 if cpu_bf16 else torch.float32)
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype(torch.float16, torch.device("cpu")) == torch.float16
