"""Phi-3 beyond the shared parity suite (tests/test_parity.py runs it with LongRoPE switching at 16 positions and
partial rotary): both LongRoPE regimes against transformers, generation across the switch, the sliding window,
QLoRA, and LoRA under the fused projections' real names."""

from __future__ import annotations

import torch
import transformers

from engine import FastModel
from tests.conftest import FAMILY_CONFIGS, make_hf_model, train_losses
from tests.test_parity import assert_close_rel


def _ours(folder, **kwargs):
    model, _ = FastModel.from_pretrained(folder, dtype=torch.float32, device="cpu", verbose=False, **kwargs)
    return model


def test_longrope_regimes_match_transformers(hf_folders):
    """At most 16 positions: the short factors; more: the long ones, for the whole forward (as transformers)."""
    hf, ours = make_hf_model("phi3"), _ours(hf_folders["phi3"])
    assert ours.args.rotary_dim == 12 and ours.args.long_rope_threshold == 16
    ids = torch.randint(0, 211, (2, 30))
    with torch.no_grad():
        for n in (12, 16, 17, 30):
            assert_close_rel(ours(ids[:, :n]).logits, hf(ids[:, :n]).logits, what=f"{n} tokens")
        # The regime is the forward's: the first 12 positions differ between a 12- and a 30-token forward.
        assert (ours(ids[:, :12]).logits - ours(ids).logits[:, :12]).abs().max() > 1e-2


def test_generation_across_the_longrope_switch_matches_transformers(hf_folders):
    """A 12-token prompt decoded to 24 tokens: the prompt pass and the first steps use the short factors; when the
    sequence passes 16 tokens every position switches to the long ones (the cached keys are recomputed once), in
    the engine's generate as in transformers'."""
    hf, ours = make_hf_model("phi3"), _ours(hf_folders["phi3"])
    prompt = torch.randint(3, 211, (1, 12))
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
        mine = ours.generate(prompt, max_new_tokens=12, do_sample=False)
    assert mine[0, :24].tolist() == theirs[0, :24].tolist()


def test_sliding_window_matches_transformers(tmp_path):
    config = FAMILY_CONFIGS["phi3"]()
    config.sliding_window = 6
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "m")
    ours = _ours(tmp_path / "m")
    assert ours.args.sliding_windows == [6, 6]
    ids = torch.randint(0, 211, (2, 15))
    with torch.no_grad():
        assert_close_rel(ours(ids).logits, hf(ids).logits, what="phi3 with a window of 6")


def test_lora_targets_the_fused_projections_and_qlora_trains(hf_folders):
    model = _ours(hf_folders["phi3"], load_in_4bit=True)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".")[-1] for n in names} == {"lora_A", "lora_B"}
    assert {n.split(".")[-2] for n in names} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    losses = train_losses(model, torch.randint(0, 211, (2, 20)))
    assert model.model.layers[0].self_attn.qkv_proj.is_quantized
    assert losses[-1] < 0.8 * losses[0], losses
