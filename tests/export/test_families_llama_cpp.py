"""Every family beyond Llama runs in llama.cpp: GGUF f16 / q8_0 / q4_k_m files load, f16 logits pick the engine's
top-1 token at every position, the file reads back into the engine, and a LoRA GGUF applies.

Tiny random models (hidden 80, 2 layers, head_dim 24, windows of 6 tokens on 48-token inputs) with SmolLM2's
tokenizer so that the files carry a real vocabulary.
"""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest
import torch

from engine import FastModel, get_chat_template
from engine.chat_templates import chat_template_for
from tests.conftest import FAMILY_CONFIGS, save_family_chat_model
from tests.export.test_llama_cpp import held_out_tokens, lora_gguf_difference


def llama_logits(path, tokens: list[int], n_ctx: int = 256, **kwargs) -> np.ndarray:
    """llama.cpp's logits ``[len(tokens), V]`` with a context of ``n_ctx`` (256: Phi-3's short LongRoPE factors)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, **kwargs)
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return out

FAMILIES = ["gemma", "gemma2", "gemma3", "phi3"]
NEAR_TIE = 0.05  # f16 weights and KV cache in llama.cpp: top-1 may swap only between logits this close


def _folder(family, tmp_path_factory, tokenizer):
    # Not named after the family: llama.cpp gives Phi-3's special tokens (</s>, <unk>, <s>, <|endoftext|>) extra
    # attributes when general.name contains "phi3" and fails to load a vocabulary without them (SmolLM2's here).
    folder = tmp_path_factory.mktemp(f"tiny_model_{FAMILIES.index(family)}")
    if family == "phi3":  # LongRoPE switching at 256 positions (llama.cpp's smallest context is 256)
        rope = {**FAMILY_CONFIGS["phi3"]().rope_parameters, "original_max_position_embeddings": 256}
        return save_family_chat_model(family, folder, tokenizer, original_max_position_embeddings=256,
                                      rope_parameters=rope)
    return save_family_chat_model(family, folder, tokenizer)


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory, smollm2_tokenizer):
    """``(family, engine model, tokenizer, {method: gguf path})`` for one family (tests must not change the model)."""
    family = request.param
    folder = _folder(family, tmp_path_factory, smollm2_tokenizer)
    model, tokenizer = FastModel.from_pretrained(str(folder), dtype="float32", verbose=False)
    # The family's own chat format (its turn tokens are added to SmolLM2's vocabulary, the model grows).
    tokenizer = get_chat_template(tokenizer, model.args.family.chat_template, model=model)
    model.save_pretrained_merged(folder, tokenizer, save_method="merged_32bit")
    model.source_folder = folder
    out = tmp_path_factory.mktemp(f"{family}_gguf")
    paths = model.save_pretrained_gguf(out, tokenizer, quantization_method=["f16", "q8_0", "q4_k_m"])
    return family, model, tokenizer, {p.name.rsplit("-", 1)[1].removesuffix(".gguf").lower(): p for p in paths}


def test_every_type_loads_and_f16_agrees_on_every_position(exported):
    family, model, tokenizer, paths = exported
    tokens = held_out_tokens(tokenizer, 48)
    with torch.no_grad():
        ours = model(torch.tensor([tokens])).logits[0].numpy()
    theirs = llama_logits(paths["f16"], tokens)
    top_ours, top_theirs = ours.argmax(-1), theirs.argmax(-1)
    gap = ours[np.arange(len(tokens)), top_ours] - ours[np.arange(len(tokens)), top_theirs]
    scale = float(np.abs(ours).max())
    print(f"\n{family} f16 in llama.cpp: top-1 equal at {(top_ours == top_theirs).mean():.0%} of positions, "
          f"max |dlogit| {np.abs(theirs - ours).max():.4f} (logit scale {scale:.2f})")
    assert ((top_ours == top_theirs) | (gap < NEAR_TIE)).all()
    assert np.abs(theirs - ours).max() < 2e-2 * max(1.0, scale)
    for method in ("q8_0", "q4_k_m"):
        quantized = llama_logits(paths[method], tokens)
        assert np.isfinite(quantized).all()
        agree = (quantized.argmax(-1) == top_ours).mean()
        print(f"{family} {method}: top-1 agreement {agree:.0%}")
        assert agree > 0.5


def test_modelfile_carries_the_family_chat_template(exported):
    family, model, tokenizer, paths = exported
    template = chat_template_for(model.args.family.chat_template)
    modelfile = (paths["f16"].parent / "Modelfile-F16").read_text()
    assert template.ollama in modelfile
    assert f'PARAMETER stop "{template.end_of_turn}"' in modelfile, modelfile
    assert tokenizer.eos_token == template.end_of_turn


def test_gguf_reads_back_into_the_engine(exported):
    family, model, _, paths = exported
    loaded, _ = FastModel.from_pretrained(str(paths["f16"]), dtype="float32", verbose=False)
    assert loaded.args.model_type == model.args.model_type
    for field in ("norm_offset", "embed_scale", "attention_scale", "attn_softcap", "final_softcap", "sandwich_norms",
                  "sliding_windows", "qk_norm", "activation", "rotary_dim", "fused_qkv", "fused_gate_up",
                  "long_rope_threshold"):
        assert getattr(loaded.args, field) == getattr(model.args, field), field
    for table in ("local_inv_freq", "long_inv_freq"):
        if getattr(model, table) is not None:
            torch.testing.assert_close(getattr(loaded, table), getattr(model, table))
    torch.testing.assert_close(loaded.inv_freq, model.inv_freq)
    ids = torch.randint(0, model.args.vocab_size, (1, 20))
    with torch.no_grad():
        a, b = loaded(ids).logits, model(ids).logits
    assert float((a - b).abs().max() / b.abs().max()) < 5e-3  # f16 rounding of the weights


@pytest.mark.slow
def test_lora_gguf_applies_in_llama_cpp(exported, tmp_path):
    family, shared, tokenizer, _ = exported
    diff, effect = lora_gguf_difference(shared.source_folder, tmp_path, 32, llama_logits, tokenizer)
    print(f"\n{family} LoRA GGUF: max |adapter - merged| {diff:.4f}, adapter effect {effect:.4f}")
    assert effect > 0.1 and diff < 0.05 * effect


@pytest.mark.parametrize("exported", ["phi3"], indirect=True)
def test_phi3_long_factors_past_the_original_length(exported):
    """LongRoPE regimes: transformers (and the engine) use the long factors when a forward's positions pass
    original_max_position_embeddings (256 here), llama.cpp when its context size n_ctx does. The test above is the
    short regime (48 tokens, n_ctx 256); here 300 tokens with n_ctx 512 use the long factors on both sides, and
    the first 48 positions then differ from the short-regime logits (the regime is per forward, not per position)."""
    _, model, tokenizer, paths = exported
    tokens = held_out_tokens(tokenizer, 300)
    theirs = llama_logits(paths["f16"], tokens, n_ctx=512)
    with torch.no_grad():
        long = model(torch.tensor([tokens])).logits[0].numpy()
        short = model(torch.tensor([tokens[:48]])).logits[0].numpy()
    scale = max(1.0, float(np.abs(long).max()))
    print(f"\nphi3 long regime: max |dlogit| {np.abs(theirs - long).max():.4f} (scale {scale:.2f}), "
          f"short vs long on the first 48 positions {np.abs(long[:48] - short).max():.4f}")
    assert np.abs(theirs - long).max() < 2e-2 * scale
    assert (theirs.argmax(-1) == long.argmax(-1)).mean() > 0.97
    assert np.abs(long[:48] - short).max() > 10 * np.abs(theirs - long).max()


def test_query_scale_llama_cpp_cannot_express_is_refused(hf_folders, tmp_path):
    from engine.errors import UnsupportedArchitectureError

    model, _ = FastModel.from_pretrained(hf_folders["gemma2"], dtype="float32", verbose=False)
    model.args.attention_scale = 0.5  # query_pre_attn_scalar 4 != head_dim 24
    with pytest.raises(UnsupportedArchitectureError, match="query_pre_attn_scalar"):
        model.save_pretrained_gguf(tmp_path, None, quantization_method="f16")


assert llama_cpp  # the binding is a test dependency; a missing one fails here, not as a skip
