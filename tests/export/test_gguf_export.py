"""GGUF export: round trips through our reader and transformers, metadata, tensor types, LoRA, Modelfile, errors."""

from __future__ import annotations

import shutil
import warnings
from collections import namedtuple

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader

from engine import FastModel
from engine.errors import CheckpointError, ConfigurationError
from engine.gguf.writer import GGUF_METHODS, permute_qk, save_pretrained_gguf, tensor_type
from engine.gguf.lora import save_lora_gguf
from engine.gguf.modelfile import modelfile_text
from tests.conftest import FAMILY_CONFIGS

IDS = torch.tensor([[3, 17, 42, 99, 150, 7, 201, 64, 5, 88, 120, 33]])


def tiny_tokenizer(vocab_size: int = 211, chat_template: str | None = None):
    """A byte-level BPE tokenizer with exactly ``vocab_size`` tokens (fits the tiny fixture models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {c: i for i, c in enumerate(specials + alphabet[: vocab_size - len(specials) - 2] + ["ab", "abc"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "c")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    t = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    t.chat_template = chat_template
    return t


def load(path, **kw):
    out = FastModel.from_pretrained(str(path), dtype="float32", verbose=False, **kw)
    return out if not isinstance(out, tuple) else out[0]


def export(model, folder, method, tokenizer=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return save_pretrained_gguf(model, folder, tokenizer or tiny_tokenizer(model.args.vocab_size), method, **kw)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def field(reader: GGUFReader, key: str):
    return reader.get_field(key).contents()


def _fix_llama3_rope(loaded, path) -> None:
    """Use the file's rope_freqs as llama.cpp does (inv_freq = default / factor); our reader's recovery of
    the llama3 parameters from 8 factors is approximate for tiny head dims."""
    reader = GGUFReader(path)
    factors = torch.from_numpy(next(t for t in reader.tensors if t.name == "rope_freqs.weight").data.copy())
    hd, theta = loaded.args.head_dim, float(field(reader, "llama.rope.freq_base"))
    default = 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd))
    loaded.inv_freq.copy_(default / factors)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("method", ["f16", "q8_0"])
@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_round_trip_every_family(hf_folders, tmp_path, family, method):
    model = load(hf_folders[family])
    ref = model(IDS).logits
    (path,) = export(model, tmp_path, method)
    assert path.name == f"{family}-{method.upper()}.gguf"
    loaded = load(path)
    if family == "llama31":
        factors = next(t for t in GGUFReader(path).tensors if t.name == "rope_freqs.weight").data
        hd = model.args.head_dim
        default = 1.0 / (500000.0 ** (torch.arange(0, hd, 2).float() / hd))
        torch.testing.assert_close(default / torch.from_numpy(factors.copy()), model.inv_freq, rtol=1e-5, atol=0)
        _fix_llama3_rope(loaded, path)
    diff = rel_diff(loaded(IDS).logits, ref)
    print(f"{family} {method}: max |dlogit| / max |logit| = {diff:.2e}")
    assert diff < 5e-3  # hidden 80 is not a multiple of 32: q8_0 falls back to F16 here


def _small_model(tmp_path, hidden=64, inter=96, vocab=211):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.05, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "src")
    return load(tmp_path / "src")


def test_q8_0_quantizes_when_shapes_allow(tmp_path):
    model = _small_model(tmp_path)
    ref = model(IDS).logits
    (path,) = export(model, tmp_path / "out", "q8_0")
    types = tensor_types(path)
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["output.weight"] == "Q8_0"
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    diff = rel_diff(load(path)(IDS).logits, ref)
    print(f"q8_0 (hidden 64): {diff:.2e}")
    assert diff < 2e-2


@pytest.mark.parametrize("method", ["q4_0", "q5_1", "q6_k", "q4_k_m"])
def test_block_quants_round_trip(tmp_path, method):
    model = _small_model(tmp_path, hidden=256, inter=512)
    ref = model(IDS).logits
    (path,) = export(model, tmp_path / "out", method)
    types = tensor_types(path)
    if method == "q4_k_m":  # 2 layers: llama.cpp's use_more_bits is true for layer 1 only (i >= 7n/8)
        assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.1.attn_v.weight"] == "Q6_K"
        assert types["blk.0.attn_v.weight"] == "Q4_K" and types["blk.0.ffn_down.weight"] == "Q4_K"
        assert types["blk.1.ffn_down.weight"] == "Q6_K" and types["output.weight"] == "Q6_K"
    elif method == "q4_0":
        assert types["blk.0.attn_q.weight"] == "Q4_0" and types["output.weight"] == "Q6_K"
    loaded = load(path)
    w0, w1 = model.model.layers[0].mlp.up_proj.weight.detach(), loaded.model.layers[0].mlp.up_proj.weight.detach()
    weight_err = float((w0 - w1).pow(2).mean().sqrt() / w0.pow(2).mean().sqrt())
    diff = rel_diff(loaded(IDS).logits, ref)
    print(f"{method} (hidden 256): weight rel. RMS error {weight_err:.3f}, logits {diff:.2e}")
    # Gaussian weights: Q4_0 ~ 8.5%, Q4_K ~ 7%, Q5_1 ~ 4%, Q6_K ~ 2% RMS error (llama.cpp's quantizers give the same)
    assert weight_err < {"q4_0": 0.11, "q5_1": 0.05, "q6_k": 0.025, "q4_k_m": 0.09}[method]
    assert diff < 0.6


def test_tensor_type_rules():
    n = 32
    assert tensor_type("blk.0.attn_v.weight", (512, 512), "q4_k_m", n, False) == (QT.Q6_K, None)
    assert tensor_type("blk.5.attn_v.weight", (512, 512), "q4_k_m", n, False) == (QT.Q4_K, None)
    assert tensor_type("blk.6.ffn_down.weight", (512, 1024), "q4_k_m", n, False) == (QT.Q6_K, None)
    assert tensor_type("blk.3.attn_v.weight", (512, 512), "q4_k_s", n, False) == (QT.Q5_K, None)
    assert tensor_type("blk.2.attn_v.weight", (512, 512), "q3_k_m", n, False) == (QT.Q4_K, None)
    assert tensor_type("blk.9.attn_output.weight", (512, 512), "q3_k_m", n, False) == (QT.Q4_K, None)
    assert tensor_type("token_embd.weight", (1000, 512), "q4_k_m", n, True) == (QT.Q6_K, None)
    assert tensor_type("token_embd.weight", (1000, 512), "q4_k_m", n, False) == (QT.Q4_K, None)
    assert tensor_type("output.weight", (1000, 576), "q4_k_m", n, False) == (QT.Q8_0, None)
    assert tensor_type("blk.9.attn_q.weight", (576, 576), "q4_k_m", n, False) == (QT.Q5_0, QT.Q4_K)
    assert tensor_type("blk.9.ffn_up.weight", (576, 576), "q5_k_m", n, False) == (QT.Q5_1, QT.Q5_K)
    assert tensor_type("blk.9.ffn_up.weight", (576, 80), "q6_k", n, False) == (QT.F16, QT.Q6_K)
    assert tensor_type("blk.9.attn_q_norm.weight", (64,), "q8_0", n, False) == (QT.F32, None)
    assert tensor_type("blk.0.attn_q.weight", (64, 64), "bf16", n, False) == (QT.BF16, None)


# ----------------------------------------------------------------------------- transformers + tokenizer


@pytest.fixture(scope="module")
def chat_export(tiny_chat_folder, smollm2_tokenizer, tmp_path_factory):
    model = load(tiny_chat_folder)
    folder = tmp_path_factory.mktemp("chat_gguf")
    (path,) = export(model, folder, "f16", tokenizer=smollm2_tokenizer)
    return model, path


def test_transformers_loads_our_file(chat_export, smollm2_tokenizer):
    model, path = chat_export
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["Hello world!", "  spaces\tand\nnewlines", "émoji 🦙 3.14 ''' I've", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok(text)["input_ids"] == smollm2_tokenizer(text)["input_ids"], text
    assert tok.chat_template == smollm2_tokenizer.chat_template
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ids = torch.tensor([smollm2_tokenizer("The capital of France is")["input_ids"]])
    diff = rel_diff(hf(ids).logits, model(ids).logits)
    print(f"transformers on our f16 file: {diff:.2e}")
    assert diff < 5e-3


def test_tokenizer_metadata(chat_export, smollm2_tokenizer):
    _, path = chat_export
    r = GGUFReader(path)
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "smollm"
    assert len(field(r, "tokenizer.ggml.tokens")) == 49152
    assert field(r, "tokenizer.ggml.merges")[0] == "Ġ t"
    assert field(r, "tokenizer.ggml.bos_token_id") == smollm2_tokenizer.bos_token_id
    assert field(r, "tokenizer.ggml.eos_token_id") == smollm2_tokenizer.eos_token_id
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    assert field(r, "tokenizer.chat_template") == smollm2_tokenizer.chat_template
    types = field(r, "tokenizer.ggml.token_type")
    assert types[smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")] == 3  # CONTROL
    assert "output.weight" not in tensor_types(path)  # tied embeddings


# ----------------------------------------------------------------------------- metadata


def test_metadata_values(hf_folders, tmp_path):
    model = load(hf_folders["qwen3"])
    (path,) = export(model, tmp_path, "q8_0")
    r = GGUFReader(path)
    assert field(r, "general.architecture") == "qwen3"
    assert field(r, "general.file_type") == int(GGUF_METHODS["q8_0"][0])
    assert field(r, "general.quantization_version") == 2
    expect = {
        "qwen3.block_count": 2, "qwen3.embedding_length": 80, "qwen3.feed_forward_length": 56,
        "qwen3.attention.head_count": 3, "qwen3.attention.head_count_kv": 1, "qwen3.context_length": 128,
        "qwen3.attention.key_length": 24, "qwen3.attention.value_length": 24, "qwen3.vocab_size": 211,
        "qwen3.rope.dimension_count": 24,
    }
    for key, value in expect.items():
        assert field(r, key) == value, key
    assert field(r, "qwen3.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field(r, "qwen3.rope.freq_base") == pytest.approx(model.hf_config.rope_parameters["rope_theta"])
    names = tensor_types(path)
    assert "blk.0.attn_q_norm.weight" in names and "blk.1.attn_k_norm.weight" in names

    qwen2 = load(hf_folders["qwen2"])
    (p2,) = export(qwen2, tmp_path / "q2", "f16")
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= set(tensor_types(p2))
    mistral = load(hf_folders["mistral"])
    (pm,) = export(mistral, tmp_path / "m", "f32")
    rm = GGUFReader(pm)
    assert field(rm, "general.architecture") == "llama" and field(rm, "llama.attention.sliding_window") == 6
    assert "output.weight" in tensor_types(pm)
    q = next(t for t in rm.tensors if t.name == "blk.0.attn_q.weight").data
    w = mistral.model.layers[0].self_attn.q_proj.weight.detach()
    np.testing.assert_array_equal(q, permute_qk(w, 5).numpy())


# ----------------------------------------------------------------------------- LoRA


@pytest.fixture()
def lora_model(hf_folders):
    model = load(hf_folders["llama"])
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if getattr(m, "lora_B", None) is not None:
            m.lora_B.data.normal_(0, 0.1, generator=g)
    return model.eval()


def test_lora_is_merged(lora_model, tmp_path):
    ref = lora_model(IDS).logits
    (path,) = export(lora_model, tmp_path, "f32")
    loaded = load(path)
    q = lora_model.model.layers[1].self_attn.q_proj
    torch.testing.assert_close(loaded.model.layers[1].self_attn.q_proj.weight, q.merged_weight(), rtol=0, atol=1e-6)
    assert not torch.allclose(q.merged_weight(), q.base_weight(torch.float32))
    diff = rel_diff(loaded(IDS).logits, ref)
    print(f"LoRA merged f32: {diff:.2e}")
    assert diff < 1e-5


def test_lora_gguf(lora_model, tmp_path):
    path = save_pretrained_gguf(lora_model, tmp_path, None, lora_only=True)[0]
    assert path == save_lora_gguf(lora_model, tmp_path)
    r = GGUFReader(path)
    assert field(r, "general.type") == "adapter" and field(r, "adapter.type") == "lora"
    assert field(r, "adapter.lora.alpha") == pytest.approx(8.0)
    assert field(r, "general.architecture") == "llama"
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 2 * 7 * 2
    k = lora_model.model.layers[0].self_attn.k_proj
    a, b = tensors["blk.0.attn_k.weight.lora_a"], tensors["blk.0.attn_k.weight.lora_b"]
    assert list(a.shape) == [80, 4] and list(b.shape) == [4, 16]  # ggml ne order: [in, r], [r, out]
    np.testing.assert_array_equal(a.data, k.lora_A.detach().numpy())
    np.testing.assert_array_equal(b.data, permute_qk(k.lora_B.detach(), 1).numpy())
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight.lora_b"].data, lora_model.model.layers[1].mlp.down_proj.lora_B.detach().numpy())


# ----------------------------------------------------------------------------- Modelfile


def test_modelfile_chatml(chat_export, smollm2_tokenizer):
    _, path = chat_export
    text = (path.parent / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{path.name}\n")
    assert "<|im_start|>assistant\n{{ .Response }}<|im_end|>" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text


def test_modelfile_unknown_template_warns():
    tok = tiny_tokenizer(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.warns(UserWarning, match="none of the known formats"):
        text = modelfile_text("m.gguf", tok)
    assert "TEMPLATE" not in text and 'PARAMETER stop "<|im_end|>"' in text
    llama3 = tiny_tokenizer(chat_template="<|start_header_id|>{{ x }}<|end_header_id|><|eot_id|>")
    assert 'PARAMETER stop "<|eot_id|>"' in modelfile_text("m.gguf", llama3)


# ----------------------------------------------------------------------------- errors


def test_unknown_method_lists_valid(hf_folders, tmp_path):
    model = load(hf_folders["llama"])
    with pytest.raises(ConfigurationError, match="q4_k_m.*not_quantized"):
        model.save_pretrained_gguf(tmp_path, tiny_tokenizer(), "q9_9")


def test_unigram_tokenizer_is_refused(hf_folders, tmp_path):
    """llama.cpp's 'llama' tokenizer merges by score: a Unigram vocabulary would tokenize differently, so we refuse."""
    from tokenizers import Tokenizer, models

    pieces = [("<unk>", 0.0)] + [(chr(97 + i), -1.0 - i) for i in range(26)] + [("ab", -0.5)]
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram(pieces, unk_id=0)))
    model = load(hf_folders["llama"])
    with pytest.raises(ConfigurationError, match="Unigram"):
        model.save_pretrained_gguf(tmp_path, tokenizer, "f16")
    assert not list(tmp_path.glob("*.gguf*"))


def test_disk_space_check(hf_folders, tmp_path, monkeypatch):
    model = load(hf_folders["llama"])
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(CheckpointError, match=r"needs about .* only .* \(1000 bytes\) are free"):
        export(model, tmp_path, "f16")
    assert not list(tmp_path.glob("*.gguf*"))


def test_fallback_warning_and_aliases(hf_folders, tmp_path):
    model = load(hf_folders["llama"])
    with pytest.warns(UserWarning, match=r"q4_k_m: \d+ of \d+ tensors .*fell back"):
        paths = model.save_pretrained_gguf(tmp_path, tiny_tokenizer(), ["quantized", "not_quantized"])
    assert [p.name for p in paths] == ["llama-Q4_K_M.gguf", "llama-F16.gguf"]
    assert set(tensor_types(paths[0]).values()) == {"F16", "F32"}  # 80 and 56 columns: no quant block fits
    assert (tmp_path / "Modelfile-Q4_K_M").is_file()


# ----------------------------------------------------------------------------- real SmolLM2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["f16", "q8_0"])
def test_smollm2_export_round_trip(smollm2_path, smollm2_tokenizer, tmp_path, method):
    model = load(smollm2_path)
    ids = torch.tensor([smollm2_tokenizer("The capital of France is Paris, and the capital of Italy is")["input_ids"]])
    ref = model(ids).logits
    (path,) = export(model, tmp_path, method, tokenizer=smollm2_tokenizer)
    loaded = load(path)
    diff = rel_diff(loaded(ids).logits, ref)
    print(f"SmolLM2 {method}: {diff:.2e}")
    assert diff < (5e-3 if method == "f16" else 5e-2)
    assert loaded(ids).logits[0, -1].argmax() == ref[0, -1].argmax()
