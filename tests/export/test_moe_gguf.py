"""Mixture-of-experts GGUF (issue 18): Mixtral as llama.cpp's ``llama`` architecture, Qwen3-MoE as ``qwen3moe``, with
the router as ``ffn_gate_inp`` and the grouped experts as 3-D ``ffn_{gate,up,down}_exps`` tensors.

Tiny random models (hidden 96, 3 layers; Mixtral with 8 experts, where llama.cpp's quantization mixture gives
8-expert models more bits, Qwen3-MoE with 5) with odd sizes where llama.cpp allows them: rows of 96 and 160
columns (Q8_0 blocks; Q4_K_M falls back to Q5_0 there, as llama.cpp does) and, in Qwen3-MoE, experts of 256 so that
``ffn_down_exps`` gets real K-quants. A 261-token byte-level BPE vocabulary keeps the files small and quick to read.
Checked: f16/q8_0/q4_k_m load in llama.cpp; f16 picks the engine's top-1 token at every position of three prompts;
our q8_0/q4_k_m files hold the bytes of llama.cpp's own quantization of the same f32 weights (3-D tensors included);
the files read back into the engine; a LoRA GGUF on attention, router and experts applies in llama.cpp; and what
llama.cpp cannot compute (``norm_topk_prob=False``, dense layers) is refused, naming the config field.
"""

from __future__ import annotations

import ctypes
import warnings

import llama_cpp
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QT

from engine import FastModel
from engine.errors import ConfigurationError
from engine.models.families import MIXTRAL, QWEN3_MOE, family_for_gguf
from tests.export.test_gguf_export import tiny_tokenizer
from tests.export.test_llama_cpp import read_blocks

VOCAB = 261  # tiny_tokenizer: 3 specials, the 256 byte symbols, 2 merges
_COMMON = dict(vocab_size=VOCAB, hidden_size=96, num_hidden_layers=3, max_position_embeddings=512,
               initializer_range=0.06, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        **_COMMON, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
        num_experts_per_tok=2, router_jitter_noise=0.0, sliding_window=None, tie_word_embeddings=False,
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **_COMMON, num_attention_heads=3, num_key_value_heads=1, head_dim=24, intermediate_size=26,
        moe_intermediate_size=256, num_experts=5, num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[],
        decoder_sparse_step=1, tie_word_embeddings=True,
    ),
}
METHODS = ("f16", "q8_0", "q4_k_m")
LLAMA_FTYPES = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}
PROMPTS = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(s)).tolist()
           for s, n in ((0, 48), (1, 33), (2, 17))]


def save_moe_folder(family: str, folder):
    """A random transformers model of ``family`` (norms and routers spread as in tests/conftest.py), with the tiny
    tokenizer, saved in ``folder``."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=torch.float32,
                                                          experts_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape) * 0.2)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape) * 0.3)  # router logits of std ~3
    model.save_pretrained(folder)
    tiny_tokenizer(VOCAB).save_pretrained(folder)
    return folder


def llama_logits(path, prompts: list[list[int]], **kwargs) -> list[np.ndarray]:
    """llama.cpp's logits ``[len(tokens), V]`` at every position of each prompt (one model load, the context reset
    between prompts)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, **kwargs)
    out = []
    for tokens in prompts:
        llm.reset()
        llm.eval(tokens)
        out.append(np.array(llm.scores[: len(tokens)], dtype=np.float32))
    llm.close()
    return out


def engine_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def export(model, folder, methods, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny tokenizer's unknown pre-tokenizer, Q4_K fallbacks
        return model.save_pretrained_gguf(folder, tiny_tokenizer(VOCAB), quantization_method=list(methods), **kwargs)


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory):
    """``(family, engine model, {method: our file})`` with f32, f16, q8_0 and q4_k_m files."""
    family = request.param
    root = tmp_path_factory.mktemp(f"moe_gguf_{family}")
    folder = save_moe_folder(family, root / f"tiny-{family.replace('_', '-')}")
    model, _ = FastModel.from_pretrained(str(folder), dtype="float32", verbose=False)
    paths = export(model, root / "gguf", ("f32", *METHODS))
    return family, model, {p.name.rsplit("-", 1)[1].removesuffix(".gguf").lower(): p for p in paths}


def test_file_layout_follows_llama_cpps_converter(exported):
    """Architecture and expert keys, the router in F32, the experts as 3-D tensors ``ne = {in, rows, E}``."""
    from gguf import GGUFReader

    family, model, paths = exported
    reader = GGUFReader(paths["f16"])
    arch = {"mixtral": "llama", "qwen3_moe": "qwen3moe"}[family]
    assert reader.get_field("general.architecture").contents() == arch
    e = model.args.num_experts
    assert reader.get_field(f"{arch}.expert_count").contents() == e == {"mixtral": 8, "qwen3_moe": 5}[family]
    assert reader.get_field(f"{arch}.expert_used_count").contents() == model.args.experts_per_token
    ffn = reader.get_field(f"{arch}.expert_feed_forward_length")
    assert (ffn.contents() if ffn else None) == (256 if family == "qwen3_moe" else None)  # Mixtral: feed_forward_length
    tensors = {t.name: t for t in reader.tensors}
    h, i = model.args.hidden_size, model.args.expert_intermediate_size
    for layer in range(3):
        assert tensors[f"blk.{layer}.ffn_gate_inp.weight"].tensor_type == QT.F32
        assert tensors[f"blk.{layer}.ffn_gate_inp.weight"].shape.tolist() == [h, e]
        for kind, ne in (("gate", [h, i, e]), ("up", [h, i, e]), ("down", [i, h, e])):
            assert tensors[f"blk.{layer}.ffn_{kind}_exps.weight"].shape.tolist() == ne
            assert tensors[f"blk.{layer}.ffn_{kind}_exps.weight"].tensor_type == QT.F16
        assert f"blk.{layer}.ffn_gate.weight" not in tensors


def test_every_type_loads_and_f16_agrees_on_every_position(exported):
    """llama.cpp runs the f16, q8_0 and q4_k_m files; f16 picks the engine's top-1 token at every position of three
    prompts; the quantized files' logits stay close to the f16 file's (relative RMS over all logits)."""
    family, model, paths = exported
    worst = {method: 0.0 for method in METHODS}
    logits = {method: llama_logits(paths[method], PROMPTS) for method in METHODS}
    for n, tokens in enumerate(PROMPTS):
        ours = engine_logits(model, tokens)
        theirs = {method: logits[method][n] for method in METHODS}
        scale = float(np.abs(ours).max())
        f16 = theirs["f16"]
        assert (f16.argmax(-1) == ours.argmax(-1)).all(), (family, len(tokens))
        worst["f16"] = max(worst["f16"], float(np.abs(f16 - ours).max()) / scale)
        for method in ("q8_0", "q4_k_m"):
            assert np.isfinite(theirs[method]).all()
            rms = float(np.sqrt(np.mean((theirs[method] - f16) ** 2) / np.mean(f16**2)))
            worst[method] = max(worst[method], rms)
    print(f"\n{family}: f16 max |dlogit| / max |logit| {worst['f16']:.4f}; relative RMS vs f16: "
          f"q8_0 {worst['q8_0']:.4f}, q4_k_m {worst['q4_k_m']:.4f}")
    # Measured on this 2-core CPU machine (pytest tests/export/test_moe_gguf.py -s): f16 0.0015 (Mixtral) / 0.0030
    # (Qwen3-MoE); q8_0 0.045 / 0.039; q4_k_m 0.129 / 0.182 (quantization noise moves routing at near-ties).
    assert worst["f16"] < 1e-2
    assert worst["q8_0"] < 0.08 and worst["q4_k_m"] < 0.35


@pytest.mark.parametrize("method", list(LLAMA_FTYPES))
def test_quantized_bytes_equal_llama_cpps_own_quantization(exported, tmp_path, method):
    """``llama_model_quantize`` of our f32 file gives every tensor (3-D experts included) our type and our bytes."""
    family, _model, paths = exported
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[method]
    params.nthread = 2
    theirs_path = tmp_path / f"llama-cpp-{method}.gguf"
    assert llama_cpp.llama_model_quantize(str(paths["f32"]).encode(), str(theirs_path).encode(),
                                          ctypes.byref(params)) == 0
    mine, theirs = read_blocks(paths[method]), read_blocks(theirs_path)
    assert set(mine) == set(theirs)
    types = {}
    for name, (their_type, their_blocks) in theirs.items():
        my_type, my_blocks = mine[name]
        assert my_type == their_type, f"{method} {name}: ours {my_type.name}, llama.cpp {their_type.name}"
        assert np.array_equal(my_blocks, their_blocks), f"{method} {name} ({my_type.name})"
        if "_exps" in name:
            types[name] = my_type.name
    print(f"\n{family} {method} experts: {sorted(set(types.values()))}")
    quantized = {t for t in types.values() if t not in ("F16", "F32")}
    assert quantized  # the 3-D tensors were quantized, not only fallbacks
    if family == "qwen3_moe" and method == "q4_k_m":  # experts of 256: K-quants in 3-D (Q6_K: use_more_bits layers)
        assert {"Q4_K", "Q6_K"} <= quantized
    if family == "mixtral":  # 8 experts: attn_k/attn_v Q8_0; q4_k_m's attn_output wants Q5_K (rows of 96: Q5_1)
        assert mine["blk.0.attn_k.weight"][0] == mine["blk.1.attn_v.weight"][0] == QT.Q8_0
        assert mine["blk.0.attn_output.weight"][0] == (QT.Q5_1 if method == "q4_k_m" else QT.Q8_0)


def test_gguf_reads_back_into_the_engine(exported):
    family, model, paths = exported
    loaded, _ = FastModel.from_pretrained(str(paths["f16"]), dtype="float32", verbose=False)
    assert loaded.args.family is model.args.family
    for field in ("num_experts", "experts_per_token", "expert_intermediate_size", "sparse_layers", "norm_topk_prob",
                  "intermediate_size", "qk_norm", "tie_word_embeddings", "head_dim"):
        assert getattr(loaded.args, field) == getattr(model.args, field), field
    experts, back = model.model.layers[1].mlp.experts, loaded.model.layers[1].mlp.experts
    torch.testing.assert_close(back.gate_up_proj, experts.gate_up_proj.half().float(), rtol=0, atol=0)
    torch.testing.assert_close(back.down_proj, experts.down_proj.half().float(), rtol=0, atol=0)
    for tokens in PROMPTS:
        a, b = engine_logits(loaded, tokens), engine_logits(model, tokens)
        assert float(np.abs(a - b).max() / np.abs(b).max()) < 5e-3  # f16 rounding of the weights


def test_family_is_told_by_expert_count():
    """llama.cpp writes Llama, Mistral and Mixtral as ``llama``: the expert count decides, the name only among dense
    families."""
    assert family_for_gguf("llama", "tiny", expert_count=8) is MIXTRAL
    assert family_for_gguf("llama", "Mistral 8x7B", expert_count=8) is MIXTRAL
    assert family_for_gguf("llama", "Mixtral 8x7B", expert_count=0).name == "llama"
    assert family_for_gguf("qwen3moe", "Qwen3 30B A3B", expert_count=128) is QWEN3_MOE


@pytest.mark.slow
def test_lora_gguf_applies_in_llama_cpp(exported, tmp_path):
    """Attention, router and expert adapters: base f16 + our LoRA GGUF in llama.cpp equals our merged f16 file."""
    family, _, paths = exported
    folder = paths["f16"].parent.parent / f"tiny-{family.replace('_', '-')}"
    model, _ = FastModel.from_pretrained(str(folder), dtype="float32", verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0, use_gradient_checkpointing=False,
                                     target_parameters=["experts.gate_up_proj", "experts.down_proj", "gate.weight"])
    torch.manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    from engine.peft import disable_adapter

    with disable_adapter(model):
        (base,) = export(model, tmp_path / "base", ["f16"])
    (merged,) = export(model, tmp_path / "merged", ["f16"])
    (adapter,) = export(model, tmp_path / "lora", ["f16"], lora_only=True)
    from gguf import GGUFReader

    names = {t.name for t in GGUFReader(adapter).tensors}
    for kind in ("attn_q", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        assert f"blk.0.{kind}.weight.lora_a" in names, kind
    with_adapter = np.concatenate(llama_logits(base, PROMPTS, lora_path=str(adapter)))
    merged_logits = np.concatenate(llama_logits(merged, PROMPTS))
    base_logits = np.concatenate(llama_logits(base, PROMPTS))
    diff = float(np.abs(with_adapter - merged_logits).max())
    effect = float(np.abs(merged_logits - base_logits).max())
    print(f"\n{family} LoRA GGUF: max |adapter - merged| {diff:.4f}, adapter effect {effect:.4f}")
    assert effect > 0.1 and diff < 0.05 * effect


def test_what_llama_cpp_cannot_compute_is_refused(moe_folders, tmp_path):
    """llama.cpp's qwen3moe graph renormalises the top-k weights and has experts in every layer."""
    model, _ = FastModel.from_pretrained(str(moe_folders["qwen3_moe"]), dtype=torch.float32, device="cpu",
                                         verbose=False)
    with pytest.raises(ConfigurationError, match=r"layers \[1\] have a dense MLP \(mlp_only_layers=\[1\]"):
        model.save_pretrained_gguf(tmp_path, None, quantization_method="f16")
    model, _ = FastModel.from_pretrained(str(moe_folders["qwen3_moe_step2"]), dtype=torch.float32, device="cpu",
                                         verbose=False)
    with pytest.raises(ConfigurationError, match=r"norm_topk_prob=False.*decoder_sparse_step=2"):
        model.save_pretrained_gguf(tmp_path, None, quantization_method="q8_0")
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    with pytest.raises(ConfigurationError, match="norm_topk_prob=False"):
        model.save_pretrained_gguf(tmp_path, None, lora_only=True)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("exported", ["qwen3_moe"], indirect=True)
def test_unnormalised_routing_alone_is_refused(exported, tmp_path):
    """(Mixtral always renormalises: it has no norm_topk_prob field.)"""
    _, model, _ = exported
    model.args.norm_topk_prob = False
    try:
        with pytest.raises(ConfigurationError, match="norm_topk_prob=False: llama.cpp's 'qwen3moe' graph"):
            model.save_pretrained_gguf(tmp_path, None, quantization_method="f16")
    finally:
        model.args.norm_topk_prob = True


assert llama_cpp  # the binding is a test dependency; a missing one fails here, not as a skip


def test_qlora_experts_are_merged_into_the_file(exported, tmp_path):
    """NF4 experts (quantized per expert slice) plus expert LoRA: the file holds the dequantized, merged weights."""
    family, _, paths = exported
    folder = paths["f16"].parent.parent / f"tiny-{family.replace('_', '-')}"
    model, _ = FastModel.from_pretrained(str(folder), dtype="float32", load_in_4bit=True, verbose=False)
    assert model.model.layers[0].mlp.experts.is_quantized("gate_up_proj")
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0, use_gradient_checkpointing=False)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    (path,) = export(model, tmp_path, ["f16"])
    loaded, _ = FastModel.from_pretrained(str(path), dtype="float32", verbose=False)
    for tokens in PROMPTS:
        a, b = engine_logits(loaded, tokens), engine_logits(model, tokens)
        assert float(np.abs(a - b).max() / np.abs(b).max()) < 5e-3
