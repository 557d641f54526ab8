"""FSDP2 set-ups the engine refuses with a clear error, and the units it shards (fast, one process).

The numerical check (2 ranks equal 1 process, LoRA and QLoRA) is in test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch

from engine import FastModel, SFTConfig
from engine.distributed import check_trainer_fsdp, fully_shard_model, sharding_units
from engine.errors import ConfigurationError
from engine.models.transformer import DecoderLayer


def _model(hf_folders, lora: bool = True):
    model, _ = FastModel.from_pretrained(str(hf_folders["llama"]), dtype="float32", verbose=False)
    if lora:
        model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, random_state=0)
    return model


def _config(tmp_path, **kwargs):
    return SFTConfig(output_dir=str(tmp_path), report_to=[], **kwargs)


def test_fsdp_on_cpu_is_refused_naming_ddp(hf_folders, tmp_path):
    """accelerate applies FSDP only on accelerators: on CPU the run would silently be DDP, so the trainer refuses."""
    model = _model(hf_folders)
    with pytest.raises(ConfigurationError, match="ddp_backend='gloo'"):
        check_trainer_fsdp(model, _config(tmp_path, fsdp=True, fsdp_config={"version": 2}, use_cpu=True))


def test_no_fsdp_passes(hf_folders, tmp_path):
    check_trainer_fsdp(_model(hf_folders), _config(tmp_path, use_cpu=True))


def test_fully_shard_model_needs_a_process_group(hf_folders):
    assert not torch.distributed.is_initialized()
    with pytest.raises(ConfigurationError, match="torchrun"):
        fully_shard_model(_model(hf_folders))


def test_sharding_units_are_the_decoder_layers_and_the_tail(hf_folders):
    model = _model(hf_folders)
    units = sharding_units(model)
    layers = [u for u in units if isinstance(u, DecoderLayer)]
    assert layers == list(model.model.layers)
    tail = units[-1]
    assert model.model.norm in tail and model.lm_head in tail
    # Tied embedding and head share one unit (a shared parameter may belong to one FSDP group only).
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert (model.get_input_embeddings() in tail) == tied
    assert model._no_split_modules == ["DecoderLayer"]


def test_tie_weights_reties_after_replacement(hf_folders):
    model = _model(hf_folders)
    if not model.args.tie_word_embeddings:
        pytest.fail("the llama test model is expected to tie its embeddings")
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
