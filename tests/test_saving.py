"""Saving: PEFT-format adapters load in PEFT with identical logits, merged folders load in
transformers with identical logits, and both load back into the engine."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from peft import PeftModel

from engine import FastModel
from engine.models.families import family_for_model_type
from engine.peft import lora_modules
from tests.conftest import make_hf_model
from tests.test_parity import assert_close_rel


def _trained_lora_model(folder, family="llama", dtype=torch.float32):
    model, tokenizer = FastModel.from_pretrained(folder, dtype=dtype, device="cpu", verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules="all-linear", use_gradient_checkpointing=False)
    g = torch.Generator().manual_seed(11)
    for m in lora_modules(model).values():  # stand-in for training: non-zero B
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
    return FastModel.for_inference(model)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3", "phi3"])
def test_adapter_loads_in_peft_with_identical_logits(family, hf_folders, tmp_path):
    model = _trained_lora_model(hf_folders[family], family)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    peft_model = PeftModel.from_pretrained(make_hf_model(family), tmp_path / "adapter").eval()
    ids = torch.randint(0, 200, (2, 11))
    with torch.no_grad():
        expected = peft_model(ids).logits
        actual = model(ids).logits
    assert_close_rel(actual, expected, what="adapter logits")


def test_adapter_loads_back_into_engine(hf_folders, tmp_path):
    model = _trained_lora_model(hf_folders["qwen3"], "qwen3")
    model.save_pretrained(tmp_path / "adapter")
    reloaded, _ = FastModel.from_pretrained(tmp_path / "adapter", dtype=torch.float32, device="cpu", verbose=False)
    ids = torch.randint(0, 200, (1, 9))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids).logits, model(ids).logits)
    # Also into an already-loaded base model.
    base, _ = FastModel.from_pretrained(hf_folders["qwen3"], dtype=torch.float32, device="cpu", verbose=False)
    FastModel.load_adapter(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(base.eval()(ids).logits, model(ids).logits)


@pytest.mark.parametrize("save_method,dtype", [("merged_32bit", torch.float32), ("merged_16bit", torch.bfloat16)])
def test_merged_folder_loads_in_transformers(hf_folders, tmp_path, save_method, dtype):
    model = _trained_lora_model(hf_folders["llama31"], "llama31")
    out = tmp_path / "merged"
    model.save_pretrained_merged(out, None, save_method=save_method, max_shard_size="150KB")
    assert (out / "model.safetensors.index.json").is_file()  # small shards force the sharded layout
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    engine_model, _ = FastModel.from_pretrained(out, dtype=torch.float32, device="cpu", verbose=False)
    ids = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        from_hf = hf(ids).logits
        from_engine = engine_model(ids).logits
        unmerged = model(ids).logits
    # The saved folder means the same thing to transformers and to the engine ...
    assert_close_rel(from_engine, from_hf, what="merged folder: engine vs transformers")
    # ... and it is the LoRA model, up to the rounding of the saved dtype.
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close_rel(from_hf, unmerged, rtol=rtol, what="merged vs adapter model")
    saved_dtype = json.loads((out / "config.json").read_text())["torch_dtype"]
    assert saved_dtype == str(dtype).replace("torch.", "")


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3", "phi3"])
def test_merged_folder_of_each_new_family_loads_in_transformers(hf_folders, tmp_path, family):
    model = _trained_lora_model(hf_folders[family], family)
    model.save_pretrained_merged(tmp_path / "merged", None, save_method="merged_32bit")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(hf).__name__ == family_for_model_type(model.args.model_type).causal_lm_class
    ids = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        assert_close_rel(hf(ids).logits, model(ids).logits, what=f"{family} merged folder in transformers")


def test_full_finetuned_model_saves_whole_folder(hf_folders, tmp_path):
    model, _ = FastModel.from_pretrained(hf_folders["qwen2"], dtype=torch.float32, device="cpu", verbose=False)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.05)
    model.save_pretrained(tmp_path / "full")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32).eval()
    ids = torch.randint(0, 200, (1, 8))
    with torch.no_grad():
        assert_close_rel(model.eval()(ids).logits, hf(ids).logits, what="full model")
