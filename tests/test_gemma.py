"""Gemma 1/2/3 beyond the shared parity suite (tests/test_parity.py runs every family, packed rows included):
the scaled embedding, soft-capping doing something, the text tower of a
multimodal Gemma 3 checkpoint, QLoRA, and the errors for what the engine does not implement."""

from __future__ import annotations

import pytest
import torch
import transformers

from engine import FastModel
from engine.errors import UnsupportedArchitectureError
from engine.models.config import model_args_from_hf_config
from tests.conftest import FAMILY_CONFIGS, make_hf_model, train_losses
from tests.test_parity import assert_close_rel

GEMMAS = ["gemma", "gemma2", "gemma3"]


def _ours(folder, **kwargs):
    model, _ = FastModel.from_pretrained(folder, dtype=torch.float32, device="cpu", **{"verbose": False, **kwargs})
    return model


@pytest.mark.parametrize("family", GEMMAS)
def test_input_embeddings_are_scaled_as_in_transformers(family, hf_folders):
    hf = make_hf_model(family)
    ours = _ours(hf_folders[family])
    ids = torch.randint(0, 211, (1, 7))
    with torch.no_grad():
        theirs, mine = hf.get_input_embeddings()(ids), ours.get_input_embeddings()(ids)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
        raw = torch.nn.functional.embedding(ids, ours.model.embed_tokens.weight)
        torch.testing.assert_close(mine, raw * 80**0.5)
        # inputs_embeds are used as given (already scaled), as transformers does.
        assert_close_rel(ours(inputs_embeds=mine).logits, hf(inputs_embeds=theirs).logits, what="inputs_embeds")


def test_gemma2_soft_caps_bound_the_logits(hf_folders):
    ours = _ours(hf_folders["gemma2"])
    assert ours.args.final_softcap == 2.5 and ours.args.attn_softcap == 3.0
    with torch.no_grad():
        logits = ours(torch.randint(0, 211, (1, 12))).logits
        assert logits.abs().max() < 2.5
        ours.args.final_softcap = None
        assert ours(torch.randint(0, 211, (1, 12))).logits.abs().max() > 2.5  # the cap was doing something


def test_gemma3_local_layers_use_their_own_rope(hf_folders):
    ours = _ours(hf_folders["gemma3"])
    attn = [layer.self_attn for layer in ours.model.layers]
    assert [a.local_rope for a in attn] == [True, False] and [a.sliding_window for a in attn] == [6, None]
    expected_local = 1.0 / (10000.0 ** (torch.arange(0, 24, 2).float() / 24))
    expected_global = 1.0 / (1e6 ** (torch.arange(0, 24, 2).float() / 24)) / 8.0
    torch.testing.assert_close(ours.local_inv_freq, expected_local)
    torch.testing.assert_close(ours.inv_freq, expected_global)


def _multimodal_gemma3(folder):
    text = FAMILY_CONFIGS["gemma3"]().to_dict()
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=210, boi_token_index=208, eoi_token_index=209)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape) * 0.2)
    model.save_pretrained(folder)
    return model


def test_multimodal_gemma3_checkpoint_loads_its_text_model(tmp_path, capsys):
    hf = _multimodal_gemma3(tmp_path / "mm")
    ours = _ours(tmp_path / "mm")
    assert "vision tower is skipped" in capsys.readouterr().out
    assert ours.hf_config.model_type == "gemma3_text"
    ids = torch.randint(0, 200, (2, 15))
    with torch.no_grad():
        assert_close_rel(ours(ids).logits, hf(input_ids=ids).logits, what="text tower of a multimodal Gemma 3")


def test_qlora_trains_a_gemma2(hf_folders):
    model, _ = FastModel.from_pretrained(hf_folders["gemma2"], dtype=torch.float32, device="cpu", verbose=False,
                                         load_in_4bit=True)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    losses = train_losses(model, torch.randint(0, 211, (2, 16)))
    assert model.model.layers[0].self_attn.q_proj.is_quantized
    assert losses[-1] < 0.8 * losses[0], losses


def test_unsupported_gemma_settings_name_the_field():
    config = FAMILY_CONFIGS["gemma"]()
    config.hidden_act = "gelu"
    with pytest.raises(UnsupportedArchitectureError, match="hidden_act='gelu'"):
        model_args_from_hf_config(config)
    config = FAMILY_CONFIGS["gemma2"]()
    config.hidden_activation = "relu"
    with pytest.raises(UnsupportedArchitectureError, match="hidden_activation='relu'"):
        model_args_from_hf_config(config)
    config = FAMILY_CONFIGS["gemma3"]()
    config.use_bidirectional_attention = True
    with pytest.raises(UnsupportedArchitectureError, match="use_bidirectional_attention=True"):
        model_args_from_hf_config(config)
    config = FAMILY_CONFIGS["phi3"]()
    config.resid_pdrop = 0.1
    with pytest.raises(UnsupportedArchitectureError, match="resid_pdrop=0.1"):
        model_args_from_hf_config(config)
    config = FAMILY_CONFIGS["gemma3"]()
    config.rope_parameters["full_attention"] = {"rope_type": "no-such-scaling", "rope_theta": 1e6}
    with pytest.raises(UnsupportedArchitectureError, match="no-such-scaling"):
        model_args_from_hf_config(config)
