"""Export a model (LoRA merged) as a llama.cpp GGUF file, in pure Python.

``save_pretrained_gguf(model, folder, tokenizer, "q4_k_m")`` writes ``<name>-Q4_K_M.gguf``
that llama.cpp, Ollama, transformers (``gguf_file=``) and our own GGUF reader load.

What is written follows llama.cpp's ``convert_hf_to_gguf.py`` + ``llama-quantize``:

* **architecture**: ``llama`` for Llama, Mistral and Mixtral (as the converter does), ``qwen2``, ``qwen3``,
  ``qwen3moe`` (and the others the families declare). Mixture-of-experts models add ``expert_count``,
  ``expert_used_count`` (Qwen3-MoE: ``expert_feed_forward_length``), the router ``ffn_gate_inp`` (F32) and the
  grouped experts as 3-D ``ffn_gate_exps``/``ffn_up_exps``/``ffn_down_exps`` ``[E, rows, cols]`` tensors.
  Q and K rows of ``llama`` files are permuted from Hugging Face's rotate-half RoPE layout
  to ggml's interleaved layout (``LlamaModel.permute``); Qwen files use NEOX RoPE and are not.
* **hyper-parameters**: context/embedding/feed-forward length, block count, head counts,
  RoPE base and scaling (linear, yarn; Llama-3.1 ``llama3`` scaling as the ``rope_freqs``
  tensor of per-frequency factors), RMSNorm epsilon, key/value length when the head dim
  is not ``hidden / heads``, vocabulary size, sliding window (Mistral).
* **tokenizer**: byte-level BPE as ``gpt2`` (tokens, token types, merges and the
  ``tokenizer.ggml.pre`` id found by hashing the tokenization of llama.cpp's check text),
  SentencePiece BPE (byte fallback) as ``llama`` with scores from the merge ranks; special ids,
  ``add_bos_token``/``add_eos_token`` and the chat template (``{% generation %}`` markers replaced by an
  equivalent ``{% if true %}``, which every Jinja runtime parses). When the template is one of
  :mod:`engine.chat_templates`' formats, its end-of-turn token is written as ``tokenizer.ggml.eot_token_id``
  (the EOS is the tokenizer's: :func:`engine.get_chat_template` makes it the end-of-turn token).
* **tensors**: every LoRA adapter is merged in fp32 (``W + s * B @ A``), one tensor at a time
  while writing, so the model is never held twice; then cast or quantized per tensor
  (:func:`tensor_type` implements llama.cpp's K-quant mixtures and shape fallbacks).

``"not_quantized"`` means ``f16`` (not bf16) for every model: llama.cpp converts to f16 by
default and f16 runs on every backend, while bf16 kernels are missing on some GPUs/CPUs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter, LlamaFileType, TokenType
from gguf.constants import MODEL_TENSOR, TENSOR_NAMES

from engine.chat_templates import CHAT_TEMPLATES, detect_chat_template, without_generation_markers
from engine.errors import CheckpointError, ConfigurationError, UnsupportedArchitectureError
from engine.gguf import quants
from engine.models.families import Family, MoEFamily, family_for_model_type
from engine.models.rope import llama3_rope_factors, rope_parameters
from engine.modules.linear import Linear

__all__ = ["GGUF_METHODS", "METHOD_ALIASES", "save_pretrained_gguf", "tensor_type"]

#: method -> (file type written as ``general.file_type``, base tensor type).
GGUF_METHODS: dict[str, tuple[LlamaFileType, QT]] = {
    "f32": (LlamaFileType.ALL_F32, QT.F32),
    "f16": (LlamaFileType.MOSTLY_F16, QT.F16),
    "bf16": (LlamaFileType.MOSTLY_BF16, QT.BF16),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, QT.Q8_0),
    "q4_0": (LlamaFileType.MOSTLY_Q4_0, QT.Q4_0),
    "q4_1": (LlamaFileType.MOSTLY_Q4_1, QT.Q4_1),
    "q5_0": (LlamaFileType.MOSTLY_Q5_0, QT.Q5_0),
    "q5_1": (LlamaFileType.MOSTLY_Q5_1, QT.Q5_1),
    "q6_k": (LlamaFileType.MOSTLY_Q6_K, QT.Q6_K),
    "q5_k_m": (LlamaFileType.MOSTLY_Q5_K_M, QT.Q5_K),
    "q4_k_m": (LlamaFileType.MOSTLY_Q4_K_M, QT.Q4_K),
    "q4_k_s": (LlamaFileType.MOSTLY_Q4_K_S, QT.Q4_K),
    "q3_k_m": (LlamaFileType.MOSTLY_Q3_K_M, QT.Q3_K),
}
#: Unsloth-style aliases.
METHOD_ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m"}

_FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
# llama-quant.cpp ``tensor_type_fallback`` for the types we write.
_FALLBACK = {QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


# llama.cpp's convert_hf_to_gguf.py check text; its tokenization's sha256 identifies the pre-tokenizer.
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
    "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
    "make it, 'D you like some tea? We'Ve a'lL"
)
# sha256(str(token ids of _CHKTXT)) -> tokenizer.ggml.pre, from llama.cpp's get_vocab_base_pre
# (the subset of pre-tokenizers met with llama / mistral / qwen models).
_PRE_BY_HASH = {
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": "superbpe",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
}


def _tname(tensor: MODEL_TENSOR, bid: int | None = None, suffix: str = "weight") -> str:
    name = TENSOR_NAMES[tensor]
    return (name.format(bid=bid) if bid is not None else name) + f".{suffix}"


# --------------------------------------------------------------------------- methods


def resolve_methods(quantization_method: str | list[str] | tuple[str, ...]) -> list[str]:
    """Normalise one method or a list of methods (aliases resolved, lower case, duplicates removed).

    Raises:
        ConfigurationError: for a method that is not supported, listing the valid ones.
    """
    methods = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    if not methods:
        raise ConfigurationError("quantization_method is empty; pass e.g. 'q8_0' or ['q4_k_m', 'q8_0']")
    out: list[str] = []
    for m in methods:
        key = str(m).lower()
        key = METHOD_ALIASES.get(key, key)
        if key not in GGUF_METHODS:
            valid = ", ".join([*GGUF_METHODS, *METHOD_ALIASES])
            raise ConfigurationError(f"unknown GGUF quantization_method {m!r}. Valid methods: {valid}")
        if key not in out:
            out.append(key)
    return out


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _block_size(qtype: QT) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def tensor_type(
    name: str, shape: tuple[int, ...], method: str, n_layers: int, tied_embeddings: bool, n_expert: int = 0
) -> tuple[QT, QT | None]:
    """The GGUF type of one tensor for ``method``, following llama.cpp's ``llama_tensor_get_type``.

    Args:
        name: llama.cpp tensor name (``"blk.3.attn_v.weight"``).
        shape: PyTorch shape (``[rows, cols]`` for a matrix, ``[E, rows, cols]`` for grouped experts; ``cols`` is
            ggml's ``ne[0]``, and every row of every expert is quantized alike).
        method: a key of :data:`GGUF_METHODS`.
        n_layers: number of blocks (for the per-layer mixtures).
        tied_embeddings: whether ``token_embd`` doubles as the output matrix.
        n_expert: experts per sparse layer (0: dense); llama.cpp gives 8-expert models (Mixtral) more bits.

    Returns:
        ``(type, wanted)``: ``wanted`` is the type the mixture asked for when ``cols`` is not a
        multiple of its block size and ``type`` is the fallback; else ``None``.

    Rules: vectors, norms and ``rope_freqs`` stay F32. For float methods every matrix gets that
    type. For quantized methods: ``output`` (and ``token_embd`` when tied) gets Q6_K (Q8_0 stays
    Q8_0; Q8_0 when ``cols`` is not a multiple of the method's block); Q4_K_M/Q5_K_M give Q6_K to
    ``attn_v`` and ``ffn_down`` of the "more bits" layers (first/last eighth and every third);
    Q4_K_S gives Q5_K to ``attn_v`` of layers 0-3 and ``ffn_down`` of the first eighth; Q3_K_M
    gives ``attn_v`` Q5_K (layers 0-1) else Q4_K, ``ffn_down`` Q5_K (first 1/16) else Q4_K and
    ``attn_output`` Q4_K. The experts' tensors follow the same rules by name (``ffn_down_exps`` is an
    ``ffn_down``); the router ``ffn_gate_inp`` stays F32 (llama.cpp's converter writes it F32 and ``llama-quantize``
    leaves it); with exactly 8 experts ``attn_v`` and ``attn_k`` get Q8_0 and, for Q4_K_M/Q4_K_S/Q3_K_M,
    ``attn_output`` Q5_K. A type whose block does not divide ``cols`` falls back as llama.cpp does
    (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), then to F16.
    """
    base = GGUF_METHODS[method][1]
    if (len(shape) < 2 or not name.endswith(".weight") or name.endswith("_norm.weight") or name.startswith("rope_")
            or name.endswith("ffn_gate_inp.weight")):
        return QT.F32, None
    if base in _FLOAT_TYPES:
        return base, None
    cols = shape[-1]
    new = base
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight" or (tied_embeddings and name == "token_embd.weight"):
        if cols % _block_size(base) != 0:
            new = QT.Q8_0
        elif base != QT.Q8_0:
            new = QT.Q6_K
    elif name.endswith("attn_v.weight"):
        if method == "q3_k_m":
            new = QT.Q5_K if layer < 2 else QT.Q4_K
        elif method in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, n_layers):
            new = QT.Q6_K
        elif method == "q4_k_s" and layer < 4:
            new = QT.Q5_K
        if n_expert == 8:
            new = QT.Q8_0
    elif name.endswith("attn_k.weight") and n_expert == 8:
        new = QT.Q8_0
    elif "ffn_down" in name:  # ffn_down and the experts' ffn_down_exps (llama.cpp matches the substring)
        if method == "q3_k_m":
            new = QT.Q5_K if layer < n_layers // 16 else QT.Q4_K
        elif method in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, n_layers):
            new = QT.Q6_K
        elif method == "q4_k_s" and layer < n_layers // 8:
            new = QT.Q5_K
    elif name.endswith("attn_output.weight") and n_expert == 8:
        if method in ("q4_k_m", "q4_k_s", "q3_k_m"):
            new = QT.Q5_K
    elif name.endswith("attn_output.weight") and method == "q3_k_m":
        new = QT.Q4_K
    if cols % _block_size(new) == 0:
        return new, None
    wanted = new
    fallback = _FALLBACK.get(new, new)
    if cols % _block_size(fallback) != 0:
        fallback = QT.F16
    return fallback, wanted


def _nbytes(shape: tuple[int, ...], qtype: QT) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = math.prod(shape)
    return n // block * type_size


def _quantize(data: np.ndarray, qtype: QT) -> np.ndarray:
    """Encode fp32 ``data [rows, cols]`` (or ``[n]``) as ``qtype``; returns the array the writer stores."""
    if qtype == QT.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == QT.F16:
        return np.ascontiguousarray(data.astype(np.float16))
    if qtype == QT.BF16:
        bits = torch.from_numpy(np.ascontiguousarray(data)).to(torch.bfloat16).view(torch.int16).numpy()
        return bits.view(np.uint8)
    return np.ascontiguousarray(quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype))


# --------------------------------------------------------------------------- tensors


@dataclass
class _Tensor:
    """One tensor to write: its llama.cpp name, PyTorch shape, GGUF type and a producer of fp32 data."""

    name: str
    shape: tuple[int, ...]
    qtype: QT
    produce: Callable[[], np.ndarray]
    wanted: QT | None = None

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shape, self.qtype)


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row permutation (rotate-half -> interleaved RoPE) of ``[out, ...]`` rows.

    Args:
        w: weight ``[n_head * hd, in]``, bias ``[n_head * hd]`` or LoRA B ``[n_head * hd, r]``.
        n_head: heads the rows are split into (the KV heads for K).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_params(model) -> dict:

    if model.hf_config is not None:
        return rope_parameters(model.hf_config)
    # No config: the inverse frequencies are the default ones; recover the base from them.
    inv = model.args.inv_freq.double()
    theta = float(inv[1] ** (-model.args.head_dim / 2.0)) if inv.numel() > 1 else 10000.0
    return {"rope_type": "default", "rope_theta": theta}


def _family(model) -> Family:
    """The model's family (its GGUF architecture, Q/K permutation and name map)."""
    return family_for_model_type(model.args.model_type)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def iter_model_tensors(model) -> Iterator[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """Yield ``(gguf name, torch shape, producer of the fp32 tensor)`` for every tensor of the merged model.

    Producers merge LoRA (``Linear.merged_weight`` in fp32) and apply the Q/K permutation only when
    called, so a caller that writes each result before asking for the next never holds the model twice.
    """
    args = model.args
    family = _family(model)
    permuted_heads = {"self_attn.q_proj": args.num_heads, "self_attn.k_proj": args.num_kv_heads}

    def linear(name: str, mod, perm_heads: int | None):
        w_shape = (mod.out_features, mod.in_features)

        def weight() -> torch.Tensor:
            w = mod.merged_weight(torch.float32)
            return permute_qk(w, perm_heads) if perm_heads else w

        yield name + ".weight", w_shape, weight
        if mod.bias is not None:

            def bias() -> torch.Tensor:
                b = mod.bias.detach().float()
                return permute_qk(b, perm_heads) if perm_heads else b

            yield name + ".bias", (mod.out_features,), bias

    def param(p: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: p.detach().float()

    def norm(p: torch.Tensor) -> Callable[[], torch.Tensor]:
        # Gemma: llama.cpp scales by the stored weight where transformers scales by 1 + w.
        return lambda: p.detach().float() + family.gguf_norm_shift

    emb = model.model.embed_tokens.weight
    yield _tname(MODEL_TENSOR.TOKEN_EMBD), tuple(emb.shape), param(emb)
    params = _rope_params(model)
    if params.get("rope_type") == "llama3":
        factors = llama3_rope_factors(params, args.head_dim)
        yield _tname(MODEL_TENSOR.ROPE_FREQS), tuple(factors.shape), lambda: factors
    if params.get("rope_type") == "longrope":  # Phi-3: both factor sets; llama.cpp picks one by context size
        for kind, key in ((MODEL_TENSOR.ROPE_FACTORS_LONG, "long_factor"), (MODEL_TENSOR.ROPE_FACTORS_SHORT, "short_factor")):
            factors = torch.tensor(params[key], dtype=torch.float32)
            yield _tname(kind), tuple(factors.shape), (lambda f=factors: f)
    for i, layer in enumerate(model.model.layers):
        # Every per-layer tensor, in the family's name-map order; modules a model lacks (q_norm) are skipped.
        for module_path, kind in family.block_tensors.items():
            mod = _submodule(layer, module_path)
            if mod is None:
                continue
            name = TENSOR_NAMES[kind].format(bid=i)
            if isinstance(mod, Linear):
                heads = permuted_heads.get(module_path) if family.gguf_permutes_qk else None
                yield from linear(name, mod, heads)
            else:
                yield name + ".weight", tuple(mod.weight.shape), norm(mod.weight)
        # Grouped experts: one 3-D tensor per part of each parameter (gate_up_proj -> ffn_gate_exps, ffn_up_exps).
        for parameter, kinds in family.expert_tensors.items():
            module_path, projection = parameter.rsplit(".", 1)
            experts = _submodule(layer, module_path)
            if experts is None:  # a dense layer
                continue
            yield from _expert_tensors(experts, projection, family.gguf_expert_names(parameter, i))
    n = model.model.norm.weight
    yield _tname(MODEL_TENSOR.OUTPUT_NORM), tuple(n.shape), norm(n)
    if not args.tie_word_embeddings:
        yield _tname(MODEL_TENSOR.OUTPUT), tuple(model.lm_head.weight.shape), lambda: model.lm_head.merged_weight()


def _expert_tensors(experts, projection: str, names: tuple[str, ...]):
    """``(gguf name, [E, rows, in], producer)`` for each part of the experts' ``projection`` (LoRA merged per expert).

    The parts split every expert's ``out`` rows in equal, consecutive blocks (``gate_up_proj [E, 2I, H]``: the gate
    rows, then the up rows). Each producer merges the whole projection (``Experts.merged_weight``, fp32) and keeps
    its part, so ``gate_up_proj`` is merged once per part.
    """
    out, inp = experts.projection_shape(projection)
    rows = out // len(names)
    for part, name in enumerate(names):

        def produce(part: int = part) -> torch.Tensor:
            merged = experts.merged_weight(projection, torch.float32)
            return merged[:, part * rows:(part + 1) * rows].contiguous()

        yield name + ".weight", (experts.num_experts, rows, inp), produce


def _submodule(layer: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """``layer.<path>`` or ``None`` where the layer has no such module (``self_attn.q_norm`` without qk-norm)."""
    mod = layer
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def _plan(model, method: str) -> list[_Tensor]:
    args = model.args
    plan = []
    for name, shape, produce in iter_model_tensors(model):
        qtype, wanted = tensor_type(name, shape, method, args.num_layers, args.tie_word_embeddings, args.num_experts)
        plan.append(_Tensor(name, shape, qtype, (lambda p=produce: _numpy(p())), wanted))
    return plan


# --------------------------------------------------------------------------- metadata


def model_name(model) -> str:
    """A short model name from ``model.name_or_path`` (folder / file name), ``"model"`` if unknown."""
    source = getattr(model, "name_or_path", None) or ""
    name = Path(str(source).rstrip("/\\")).name
    if name.lower().endswith(".gguf"):
        name = name[: -len(".gguf")]
    return name or "model"


def _add_hparams(writer: GGUFWriter, model, method: str, name: str) -> None:
    args = model.args
    family = _family(model)
    marker = family.gguf_name_marker
    if marker and marker not in name.lower():
        # llama.cpp (and our reader) tell this family from another of the same architecture by the name only.
        name = f"{marker.capitalize()} {name}"
    writer.add_name(name)
    writer.add_file_type(int(GGUF_METHODS[method][0]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(int(args.max_position_embeddings))
    writer.add_embedding_length(args.hidden_size)
    writer.add_feed_forward_length(args.intermediate_size)
    if args.num_experts:
        writer.add_expert_count(args.num_experts)
        writer.add_expert_used_count(args.experts_per_token)
        if isinstance(family, MoEFamily) and family.gguf_expert_feed_forward_length:
            writer.add_expert_feed_forward_length(args.expert_intermediate_size)
    writer.add_block_count(args.num_layers)
    writer.add_head_count(args.num_heads)
    writer.add_head_count_kv(args.num_kv_heads)
    writer.add_layer_norm_rms_eps(float(args.rms_norm_eps))
    writer.add_vocab_size(args.vocab_size)
    writer.add_rope_dimension_count(args.rotary_dim)
    if args.hidden_size % args.num_heads != 0 or args.head_dim != args.hidden_size // args.num_heads:
        writer.add_key_length(args.head_dim)
        writer.add_value_length(args.head_dim)
    params = _rope_params(model)
    writer.add_rope_freq_base(float(params.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params["factor"]))
        if params.get("original_max_position_embeddings") is not None:
            writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
        for key, add in (
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
        ):
            if params.get(key) is not None:
                add(float(params[key]))
    elif rope_type == "longrope":
        writer.add_rope_scaling_orig_ctx_len(int(model.args.long_rope_threshold))
        writer.add_rope_scaling_attn_factors(float(args.rope_attention_scaling))
    elif rope_type not in ("default", "llama3", "dynamic"):
        raise UnsupportedArchitectureError(
            f"RoPE scaling {rope_type!r} cannot be written to GGUF (supported: default, linear, yarn, llama3, "
            "longrope)"
        )
    windows = {w for w in args.sliding_windows if w is not None}
    if windows and family.gguf_sliding_window:
        writer.add_sliding_window(int(max(windows)))
        if family.gguf_sliding_window_pattern:
            writer.add_sliding_window_pattern([w is not None for w in args.sliding_windows])
    if args.local_inv_freq is not None:
        local = rope_parameters(model.hf_config, "sliding_attention")
        if local.get("rope_type", "default") != "default":
            raise UnsupportedArchitectureError(
                f"the sliding-window layers' RoPE scaling {local.get('rope_type')!r} cannot be written to GGUF "
                "(llama.cpp scales only the global layers)"
            )
        writer.add_rope_freq_base_swa(float(local["rope_theta"]))
    if args.attn_softcap is not None:
        writer.add_attn_logit_softcapping(float(args.attn_softcap))
    if args.final_softcap is not None:
        writer.add_final_logit_softcapping(float(args.final_softcap))
    if args.attention_scale is not None:
        _check_attention_scale(model, family)


#: llama.cpp's Gemma 2/3 graphs do not read ``query_pre_attn_scalar``: they scale queries by ``head_dim ** -0.5``,
#: except for the 27B models (recognised by their layer count) where it is ``(hidden / heads) ** -0.5``.
_LLAMA_CPP_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _check_attention_scale(model, family: Family) -> None:
    """Raise when llama.cpp would scale attention scores differently from the model (see above)."""
    args = model.args
    if args.num_layers == _LLAMA_CPP_27B_LAYERS.get(family.gguf_architecture):
        expected = (args.hidden_size / args.num_heads) ** -0.5
    else:
        expected = args.head_dim**-0.5
    if not math.isclose(args.attention_scale, expected, rel_tol=1e-6):
        raise UnsupportedArchitectureError(
            f"this model scales attention scores by {args.attention_scale:.6g} (query_pre_attn_scalar="
            f"{args.attention_scale ** -2:.6g}), but llama.cpp's {family.gguf_architecture} graph uses "
            f"{expected:.6g} for a model of this shape, so the GGUF file would compute different outputs. Export "
            "a model whose query_pre_attn_scalar equals head_dim (every released Gemma 2/3 except 27B, where it "
            "is hidden_size / num_attention_heads)."
        )


def _pre_tokenizer_id(tokenizer) -> str:
    """llama.cpp's ``tokenizer.ggml.pre``: the sha256 of the check text's token ids looked up in its table."""
    ids = tokenizer.encode(_CHKTXT)
    digest = sha256(str(ids).encode()).hexdigest()
    pre = _PRE_BY_HASH.get(digest)
    if pre is None:
        warnings.warn(
            f"this BPE pre-tokenizer is not in llama.cpp's table (hash {digest}); writing "
            "tokenizer.ggml.pre='default', which llama.cpp may tokenize differently from transformers",
            stacklevel=3,
        )
        return "default"
    return pre


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigurationError(
            "GGUF export needs a fast (Rust) tokenizer; load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    return json.loads(backend.to_str())


def _components(node, kind: str) -> list[dict]:
    """Every ``{"type": kind, ...}`` node of a tokenizer.json tree."""
    if isinstance(node, dict):
        found = [node] if node.get("type") == kind else []
        return found + [c for v in node.values() for c in _components(v, kind)]
    if isinstance(node, list):
        return [c for v in node for c in _components(v, kind)]
    return []


def _adds_space_prefix(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer prepends ``▁`` to the text (llama.cpp's ``add_space_prefix``)."""
    if _components(spec.get("normalizer"), "Prepend"):
        return True
    metaspaces = _components(spec.get("pre_tokenizer"), "Metaspace")
    return any(m.get("prepend_scheme", "always") != "never" and m.get("add_prefix_space", True) for m in metaspaces)


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def _merge_scores(merges: list[str], vocab: dict[str, int]) -> dict[int, float]:
    """SentencePiece BPE scores from merge ranks: ``-rank`` of the first merge producing each token.

    llama.cpp's SentencePiece tokenizer repeatedly merges the adjacent pair whose concatenation has the
    highest score; with these scores it applies merges in the order transformers' BPE does.
    """
    scores: dict[int, float] = {}
    for rank, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        token_id = vocab.get(left + right)
        if token_id is not None and token_id not in scores:
            scores[token_id] = -float(rank)
    return scores


def _add_tokenizer(writer: GGUFWriter, tokenizer, model) -> int:
    """Write ``tokenizer.ggml.*`` and the chat template; returns an estimate of the bytes written."""
    vocab_size = model.args.vocab_size
    spec = _backend_json(tokenizer)
    tok_model = spec.get("model", {})
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise ConfigurationError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's vocabulary is {vocab_size}; "
            "pass the tokenizer the model was trained with (or resize the embeddings first)"
        )
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    byte_level = bool(_components(spec.get("pre_tokenizer"), "ByteLevel") or _components(spec.get("decoder"), "ByteLevel"))
    kind = tok_model.get("type")
    if kind == "BPE" and byte_level:
        ggml_model = "gpt2"
    elif kind == "BPE" and tok_model.get("byte_fallback"):
        ggml_model = "llama"
    else:
        raise ConfigurationError(
            f"cannot write a {kind!r} tokenizer to GGUF: supported are byte-level BPE (GPT-2 / Llama-3 / Qwen style) "
            "and SentencePiece BPE with byte fallback (Llama-2 / Mistral style); llama.cpp's 'llama' tokenizer "
            "merges by score and would split a Unigram vocabulary differently from transformers"
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_model.get("merges", [])]
    merge_scores = _merge_scores(merges, vocab) if ggml_model == "llama" else {}
    tokens: list[str] = []
    types: list[int] = []
    scores: list[float] = []
    unk_id = tokenizer.unk_token_id
    for i in range(vocab_size):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            scores.append(-10000.0)
            continue
        if i in added:
            at = added[i]
            types.append(TokenType.CONTROL if at.special or _looks_special(tok) else TokenType.USER_DEFINED)
            scores.append(0.0)
        elif ggml_model == "llama" and i == unk_id:
            types.append(TokenType.UNKNOWN)
            scores.append(0.0)
        elif ggml_model == "llama" and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            types.append(TokenType.BYTE)
            scores.append(0.0)
        else:
            types.append(TokenType.NORMAL)
            scores.append(merge_scores.get(i, -float(len(merges) + i)))
        tokens.append(tok)
    writer.add_tokenizer_model(ggml_model)
    estimate = sum(len(t.encode("utf-8")) + 12 for t in tokens) + 4 * len(types)
    if ggml_model == "gpt2":
        writer.add_tokenizer_pre(_pre_tokenizer_id(tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        estimate += sum(len(m.encode("utf-8")) + 8 for m in merges)
    else:
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(_adds_space_prefix(spec))
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        estimate += 4 * len(scores)

    def first(x):
        return x[0] if isinstance(x, (list, tuple)) else x

    special = {
        "bos": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model.args.bos_token_id,
        "eos": tokenizer.eos_token_id if tokenizer.eos_token_id is not None else first(model.args.eos_token_id),
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.args.pad_token_id,
    }
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for key, value in special.items():
        if value is not None and 0 <= int(value) < vocab_size:
            adders[key](int(value))
    probe = tokenizer("a")["input_ids"]
    bos, eos = special["bos"], special["eos"]
    writer.add_add_bos_token(bool(bos is not None and probe[:1] == [bos]))
    writer.add_add_eos_token(bool(eos is not None and len(probe) > 1 and probe[-1:] == [eos]))
    template = getattr(tokenizer, "chat_template", None)
    eot = _end_of_turn_id(tokenizer, template, vocab_size)
    if eot is not None:
        writer.add_eot_token_id(eot)
    if isinstance(template, dict):
        template = {k: without_generation_markers(v) for k, v in template.items()}
        writer.add_chat_template([{"name": k, "template": v} for k, v in template.items()])
        estimate += sum(len(v) for v in template.values())
    elif template:
        template = without_generation_markers(template)
        writer.add_chat_template(template)
        estimate += len(template)
    return estimate


def _end_of_turn_id(tokenizer, template, vocab_size: int) -> int | None:
    """The id of the end-of-turn token of the chat template's format (``tokenizer.ggml.eot_token_id``), or ``None``."""
    name = detect_chat_template(template)
    if name is None:
        return None
    token = CHAT_TEMPLATES[name].end_of_turn
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(token_id) if 0 <= int(token_id) < vocab_size else None


# --------------------------------------------------------------------------- writing


def _check_disk_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise CheckpointError(
            f"not enough disk space in {folder}: the GGUF file needs about {needed / 2**20:,.1f} MiB ({needed} bytes) "
            f"but only {free / 2**20:,.1f} MiB ({free} bytes) are free. Free some space or choose another folder."
        )


def write_gguf(
    path: Path,
    arch: str,
    add_metadata: Callable[[GGUFWriter], int],
    tensors: list[_Tensor],
    *,
    desc: str = "GGUF",
) -> Path:
    """Write a GGUF file tensor by tensor (each produced, encoded, written and dropped in turn).

    Args:
        path: output file; written as ``<path>.partial`` and renamed when complete.
        arch: ``general.architecture``.
        add_metadata: adds the key/values to the writer; returns an estimate of their size in bytes.
        tensors: the tensors in file order.

    Raises:
        CheckpointError: if the folder does not have room for the estimated file size.
    """
    from tqdm.auto import tqdm

    partial = path.with_name(path.name + ".partial")
    writer = GGUFWriter(partial, arch)
    kv_bytes = add_metadata(writer)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    needed = sum(t.nbytes + 64 for t in tensors) + kv_bytes + 2**20
    _check_disk_space(path.parent, needed)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tqdm(tensors, desc=desc, unit="tensor", disable=None):
            data = t.produce()
            encoded = _quantize(data, t.qtype)
            if encoded.nbytes != t.nbytes:
                raise CheckpointError(
                    f"{t.name}: encoded {t.qtype.name} data has {encoded.nbytes} bytes, expected {t.nbytes}"
                )
            writer.write_tensor_data(encoded)
            del data, encoded
        writer.close()
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    with open(partial, "rb") as f:  # on disk before it takes the final name (crash-safe, see engine.files)
        os.fsync(f.fileno())
    os.replace(partial, path)
    return path


def _warn_fallbacks(plan: list[_Tensor], method: str) -> None:
    fell = [t for t in plan if t.wanted is not None]
    if not fell:
        return
    counts = Counter((t.wanted.name, t.qtype.name) for t in fell)
    detail = ", ".join(f"{n} {a}->{b}" for (a, b), n in sorted(counts.items()))
    warnings.warn(
        f"{method}: {len(fell)} of {len(plan)} tensors have a row length that is not a multiple of the "
        f"quantization block size and fell back to another type ({detail}), as llama.cpp does",
        stacklevel=3,
    )


def save_pretrained_gguf(
    model,
    save_directory: str | os.PathLike,
    tokenizer=None,
    quantization_method: str | list[str] = "q8_0",
    *,
    lora_only: bool = False,
    write_modelfile: bool = True,
) -> list[Path]:
    """Write the model (LoRA merged) as one GGUF file per quantization method.

    Args:
        model (CausalLM): the model (plain, LoRA, QLoRA: NF4 bases are dequantized first).
        save_directory: output folder (created).
        tokenizer: the Hugging Face fast tokenizer; its vocabulary, merges, special tokens and chat
            template go into the file. Without one the file has no vocabulary (a warning says so):
            our reader loads it, llama.cpp does not.
        quantization_method: one of :data:`GGUF_METHODS` (``f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q6_k
            q5_k_m q4_k_m q4_k_s q3_k_m``) or alias (``not_quantized`` = f16, ``fast_quantized`` = q8_0,
            ``quantized`` = q4_k_m), or a list of them.
        lora_only: write only the LoRA adapter as a llama.cpp LoRA GGUF
            (:func:`engine.gguf.lora.save_lora_gguf`) instead.
        write_modelfile: also write an Ollama ``Modelfile`` (``Modelfile-<METHOD>`` when several methods).

    Returns:
        The paths of the written ``<name>-<METHOD>.gguf`` files.

    Raises:
        ConfigurationError: unknown method (the message lists the valid ones); a mixture-of-experts model llama.cpp
            cannot compute (``norm_topk_prob=False``, dense layers from ``mlp_only_layers``/``decoder_sparse_step``;
            the message names the field).
        UnsupportedArchitectureError: a model family or RoPE scaling GGUF cannot describe.
        CheckpointError: not enough disk space for a file.
    """
    _family(model).check_gguf_export(model.args, getattr(model, "hf_config", None))
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    if lora_only:
        from engine.gguf.lora import save_lora_gguf

        return [save_lora_gguf(model, out)]
    methods = resolve_methods(quantization_method)
    arch = _family(model).gguf_architecture
    name = model_name(model)
    if tokenizer is None:
        warnings.warn(
            "save_pretrained_gguf without a tokenizer: the GGUF file has no vocabulary, so llama.cpp and Ollama "
            "cannot run it; pass the tokenizer",
            stacklevel=2,
        )
    paths = []
    for method in methods:
        plan = _plan(model, method)
        _warn_fallbacks(plan, method)
        path = out / f"{name}-{method.upper()}.gguf"

        def metadata(writer: GGUFWriter, method: str = method) -> int:
            _add_hparams(writer, model, method, name)
            return _add_tokenizer(writer, tokenizer, model) if tokenizer is not None else 0

        with torch.no_grad():
            write_gguf(path, arch, metadata, plan, desc=f"GGUF {method.upper()}")
        paths.append(path)
        if write_modelfile and tokenizer is not None:
            from engine.gguf.modelfile import write_modelfile as _write_modelfile

            mf_name = "Modelfile" if len(methods) == 1 else f"Modelfile-{method.upper()}"
            _write_modelfile(path, tokenizer, out / mf_name)
    return paths
