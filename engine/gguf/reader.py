"""Read llama.cpp GGUF model files into Hugging Face-style checkpoints.

A GGUF file (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) holds a
model's hyper-parameters as typed key/value metadata and its weights as
(possibly quantized) tensors with llama.cpp names. This module turns one into
what the engine's Llama-family model code expects from a Hugging Face folder:

* a ``transformers`` config object (:class:`~transformers.LlamaConfig`,
  :class:`~transformers.MistralConfig`, :class:`~transformers.Qwen2Config`,
  :class:`~transformers.Qwen3Config`, ... the family's config class; Mixtral and
  Qwen3-MoE with their experts from ``<arch>.expert_count`` and friends) built
  from the metadata;
* a state dict with Hugging Face parameter names and shapes, every tensor
  dequantized with :func:`gguf.quants.dequantize`;
* the raw metadata, decoded to plain Python values.

Only the ``gguf`` package is used to parse the file; transformers' own GGUF
loader is deliberately not used (the tests use it as an independent oracle).

Layout differences undone here:

* GGUF lists tensor dimensions fastest-varying first (``[in, out]`` for a
  linear weight); Hugging Face / PyTorch use ``[out, in]``.
* llama.cpp's converter permutes the rows of the Q and K projections of
  ``llama`` models from Hugging Face's "rotate-half" RoPE layout to the
  interleaved layout ggml's RoPE kernel uses. The permutation is inverted for
  ``llama``/``mistral`` files. Qwen2/Qwen3 files are written with ggml's NEOX
  RoPE mode, which uses the rotate-half layout, so they are not permuted.
* Mixture-of-experts files store each layer's experts as 3-D tensors
  (``ffn_gate_exps``/``ffn_up_exps``/``ffn_down_exps``, ``[E, rows, cols]``); the
  gate and up ones are concatenated back into the engine's ``gate_up_proj``.
* Llama 3.x files store their RoPE scaling as a ``rope_freqs`` tensor of
  per-frequency factors instead of metadata; the ``llama3`` rope parameters are
  recovered from it.

Example:
    >>> ckpt = read_gguf_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> ckpt.config.num_hidden_layers, ckpt.state_dict["model.norm.weight"].shape  # doctest: +SKIP
    (30, torch.Size([576]))
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from gguf import GGUFReader
from gguf.constants import MODEL_TENSOR, TENSOR_NAMES, GGUFValueType, Keys
from gguf.quants import dequantize

from engine.errors import CheckpointError, ConfigurationError
from engine.models.rope import llama3_params_from_factors
from engine.models.families import (
    GLOBAL_TENSORS,
    Family,
    family_for_gguf,
    family_for_model_type,
    gguf_architectures,
    gguf_tensor_name,
)

__all__ = [
    "GGUFCheckpoint",
    "SUPPORTED_ARCHITECTURES",
    "load_gguf_tokenizer",
    "read_gguf_checkpoint",
]

logger = logging.getLogger(__name__)

#: Values of ``general.architecture`` this reader accepts (from the family declarations). llama.cpp writes
#: Mistral models as ``"llama"``; ``"mistral"`` is accepted as well in case a converter writes it (the
#: tensors then follow the ``llama`` conventions).
SUPPORTED_ARCHITECTURES: tuple[str, ...] = gguf_architectures()

_GGUF_MAGIC = b"GGUF"

# Tokenizer arrays that are dropped from ``GGUFCheckpoint.metadata`` (one entry
# per vocabulary item or merge; tens of thousands of items).
_HUGE_TOKENIZER_KEYS = frozenset(
    {
        Keys.Tokenizer.LIST,
        Keys.Tokenizer.TOKEN_TYPE,
        Keys.Tokenizer.SCORES,
        Keys.Tokenizer.MERGES,
        Keys.Tokenizer.PRECOMPILED_CHARSMAP,
    }
)
# Any other ``tokenizer.*`` array longer than this is dropped as well.
_MAX_TOKENIZER_ARRAY_LEN = 1024


# Whole-model tensors: llama.cpp name (without ".weight"/".bias") -> Hugging Face module path. Per-layer
# tensors are mapped by the family (``Family.hf_module``), from the one name map in engine.models.families.
_GLOBAL_TENSORS: dict[str, str] = {gguf_tensor_name(t): module for module, t in GLOBAL_TENSORS.items()}
_ROPE_FREQS = TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight"
#: LongRoPE's per-frequency factors (Phi-3), written by llama.cpp's converter as two whole-model tensors.
_ROPE_LONG = TENSOR_NAMES[MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight"
_ROPE_SHORT = TENSOR_NAMES[MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight"
_ROPE_TENSORS = (_ROPE_FREQS, _ROPE_LONG, _ROPE_SHORT)
_OUTPUT_WEIGHT = TENSOR_NAMES[MODEL_TENSOR.OUTPUT] + ".weight"
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")

@dataclass
class GGUFCheckpoint:
    """A GGUF model file converted to Hugging Face conventions.

    Attributes:
        config: The model config (``LlamaConfig``, ``MistralConfig``,
            ``Qwen2Config`` or ``Qwen3Config``) with the fields a Hugging Face
            ``config.json`` of the same model would have.
        state_dict: Hugging Face parameter names (``"model.embed_tokens.weight"``,
            ``"model.layers.0.self_attn.q_proj.weight"``, ...) mapped to
            dequantized tensors with Hugging Face shapes, in the order a
            ``*ForCausalLM`` module lists them. ``"lm_head.weight"`` is present
            only when the file has its own output matrix, i.e. when
            ``config.tie_word_embeddings`` is False.
        metadata: The file's key/value metadata decoded to Python strings,
            ints, floats, bools and lists, without the per-token tokenizer
            arrays (``tokenizer.ggml.tokens``, ``.token_type``, ``.scores``,
            ``.merges``, ...) and without the reader's ``GGUF.*`` header fields.
    """

    config: transformers.PretrainedConfig
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, object] = field(default_factory=dict)


# --------------------------------------------------------------------------- #
# File access
# --------------------------------------------------------------------------- #


def _check_gguf_path(path: str | os.PathLike) -> Path:
    """Checks that ``path`` names a readable file that starts with the GGUF magic.

    Args:
        path: The path to check.

    Returns:
        The path as a :class:`~pathlib.Path`.

    Raises:
        CheckpointError: The file is missing, is a folder, cannot be read or
            is not a GGUF file.
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise CheckpointError(
            f"GGUF file not found: {p}. Check the path, or download the .gguf file first "
            "(e.g. `huggingface-cli download <repo> <file>.gguf`)."
        )
    if p.is_dir():
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        hint = f" It holds: {', '.join(ggufs)}." if ggufs else ""
        raise CheckpointError(f"{p} is a folder; pass the path of the .gguf file itself.{hint}")
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read GGUF file {p}: {e}. Check the file's permissions.") from e
    if magic != _GGUF_MAGIC:
        raise CheckpointError(
            f"{p} is not a GGUF file: it starts with {magic!r}, not {_GGUF_MAGIC!r}. Pass a llama.cpp "
            ".gguf model file (load safetensors/PyTorch checkpoints with the Hugging Face loader "
            "instead); if it should be a GGUF file, the download is broken - download it again."
        )
    return p


def _open_reader(path: str | os.PathLike) -> tuple[GGUFReader, Path]:
    """Opens a GGUF file with :class:`gguf.GGUFReader`, turning parse failures into errors.

    Args:
        path: The GGUF file.

    Returns:
        The reader (its tensors are memory-mapped views of the file) and the
        checked path.

    Raises:
        CheckpointError: The file is missing, not a GGUF file, truncated,
            corrupt, split into shards, or big-endian.
    """
    p = _check_gguf_path(path)
    size = p.stat().st_size
    try:
        reader = GGUFReader(p, "r")
    except Exception as e:  # the reader raises ValueError, IndexError, KeyError, ... on bad bytes
        raise CheckpointError(
            f"{p} ({size} bytes) is truncated or corrupt: the GGUF header could not be parsed "
            f"({type(e).__name__}: {e}). Download or convert the file again."
        ) from e
    if reader.byte_order == "S":
        raise CheckpointError(
            f"{p} is a big-endian GGUF file, which this reader does not support. "
            "Use the little-endian build of the model."
        )
    for tensor in reader.tensors:
        end = tensor.data_offset + tensor.n_bytes
        if end > size or tensor.data.nbytes != tensor.n_bytes:
            raise CheckpointError(
                f"{p} is truncated: tensor {tensor.name!r} needs bytes up to {end} but the file has "
                f"{size}. Download or convert the file again."
            )
    split_field = reader.fields.get(Keys.Split.LLM_KV_SPLIT_COUNT)
    split_count = int(split_field.parts[-1][0]) if split_field is not None else 1
    if split_count > 1:
        raise CheckpointError(
            f"{p} is one shard of a split GGUF model ({Keys.Split.LLM_KV_SPLIT_COUNT}={split_count}). "
            "Merge the shards first with `llama-gguf-split --merge <first-shard> <merged>.gguf`."
        )
    return reader, p


def _decode_field(f: Any) -> object:
    """Decodes one :class:`gguf.ReaderField` to a plain Python value.

    Args:
        f: The reader field.

    Returns:
        A ``str``, ``int``, ``float``, ``bool`` or a list of those.
    """
    if not f.types:
        return None

    def to_str(part: np.ndarray) -> str:
        return bytes(part).decode("utf-8", errors="replace")

    main = f.types[0]
    if main == GGUFValueType.ARRAY:
        sub = f.types[-1]
        if len(f.types) > 2:  # array of arrays: the reader exposes no structure; keep leaves flat
            return f.contents() if sub != GGUFValueType.STRING else [to_str(f.parts[i]) for i in f.data]
        if sub == GGUFValueType.STRING:
            return [to_str(f.parts[i]) for i in f.data]
        return [v for i in f.data for v in f.parts[i].tolist()]
    if main == GGUFValueType.STRING:
        return to_str(f.parts[-1])
    return f.parts[-1].tolist()[0]


def _array_len(f: Any) -> int:
    """Returns the number of items of an array field (without decoding them)."""
    return len(f.data)


def _decode_metadata(reader: GGUFReader) -> dict[str, object]:
    """Decodes a reader's key/value metadata, dropping the huge tokenizer arrays.

    Args:
        reader: An open GGUF reader.

    Returns:
        Key -> decoded value, in file order.
    """
    meta: dict[str, object] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):  # header fields the reader adds (version, counts)
            continue
        if f.types and f.types[0] == GGUFValueType.ARRAY and key.startswith("tokenizer."):
            if key in _HUGE_TOKENIZER_KEYS or _array_len(f) > _MAX_TOKENIZER_ARRAY_LEN:
                continue
        meta[key] = _decode_field(f)
    return meta


# --------------------------------------------------------------------------- #
# Config
# --------------------------------------------------------------------------- #


class _Meta:
    """Typed look-ups of ``{arch}.*`` metadata keys with errors that name the key.

    Args:
        meta: The decoded metadata.
        arch: The value of ``general.architecture`` (the key prefix).
        path: The file, for error messages.
    """

    def __init__(self, meta: Mapping[str, object], arch: str, path: Path):
        self.meta = meta
        self.arch = arch
        self.path = path

    def key(self, template: str) -> str:
        """Expands a ``gguf.Keys`` template such as ``"{arch}.block_count"``."""
        return template.format(arch=self.arch)

    def has(self, template: str) -> bool:
        """Whether the key is present."""
        return self.key(template) in self.meta

    def _scalar(self, key: str, value: object) -> object:
        if isinstance(value, list):
            if value and all(v == value[0] for v in value):
                return value[0]
            raise CheckpointError(
                f"GGUF metadata key {key!r} in {self.path} holds per-layer values {value}; models "
                "whose layers differ in shape are not supported."
            )
        return value

    def get(self, template: str, default: object = None) -> object:
        """Returns the key's (scalar) value, or ``default`` when it is absent."""
        key = self.key(template)
        if key not in self.meta:
            return default
        return self._scalar(key, self.meta[key])

    def required(self, template: str) -> object:
        """Returns the key's (scalar) value.

        Raises:
            CheckpointError: The key is missing.
        """
        key = self.key(template)
        if key not in self.meta:
            raise CheckpointError(
                f"required GGUF metadata key {key!r} is missing from {self.path}. The file was written "
                "by an incomplete or incompatible converter; convert the model again with llama.cpp's "
                "convert_hf_to_gguf.py."
            )
        return self._scalar(key, self.meta[key])

    def get_int(self, template: str, default: int | None = None, *, required: bool = False) -> int | None:
        """Returns the key as an ``int`` (``default`` when absent and not required)."""
        value = self.required(template) if required else self.get(template, default)
        if value is None:
            return None
        try:
            return int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"GGUF metadata key {self.key(template)!r} in {self.path} should be an integer, "
                f"got {value!r}. The file is corrupt; convert the model again."
            ) from e

    def get_float(self, template: str, default: float | None = None, *, required: bool = False) -> float | None:
        """Returns the key as a ``float`` (``default`` when absent and not required)."""
        value = self.required(template) if required else self.get(template, default)
        if value is None:
            return None
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"GGUF metadata key {self.key(template)!r} in {self.path} should be a number, "
                f"got {value!r}. The file is corrupt; convert the model again."
            ) from e


def _family(arch: str, meta: Mapping[str, object]) -> Family:
    """The family of a GGUF file (llama.cpp writes Mistral and Mixtral as ``llama``: ``<arch>.expert_count`` tells
    Mixtral apart, and, like transformers, the name tells Mistral)."""
    name = meta.get(Keys.General.NAME)
    experts = meta.get(Keys.LLM.EXPERT_COUNT.format(arch=arch))
    experts = int(experts) if isinstance(experts, (int, float)) and not isinstance(experts, bool) else 0
    return family_for_gguf(arch, name if isinstance(name, str) else None, experts)


def _llama3_rope_from_factors(factors: np.ndarray, theta: float, head_dim: int, path: Path) -> dict | None:
    """``llama3`` rope parameters recovered from a ``rope_freqs`` tensor (:func:`engine.models.rope.llama3_params_from_factors`).

    Returns None when every factor is 1; warns when the recovered parameters do not reproduce the tensor.

    Raises:
        CheckpointError: the tensor has the wrong length or a pattern that is not Llama 3 scaling.
    """
    try:
        params, exact = llama3_params_from_factors(factors, theta, head_dim)
    except ValueError as e:
        raise CheckpointError(
            f"tensor {_ROPE_FREQS!r} in {path} is not Llama 3 RoPE scaling: {e}. The file is corrupt or uses "
            "a RoPE scaling the engine does not support; convert it again."
        ) from e
    if not exact:
        warnings.warn(
            f"the rope_freqs tensor of {path} does not match Llama 3 RoPE scaling exactly; using the "
            f"closest llama3 parameters {params}. Long-context outputs may differ from llama.cpp.",
            stacklevel=3,
        )
    return params


def _rope_parameters(m: _Meta, theta: float, head_dim: int, rope_tensors: Mapping[str, np.ndarray],
                     rope_dim: int, max_pos: int) -> dict:
    """Builds a transformers ``rope_parameters`` dict from the ``{arch}.rope.*`` keys.

    Args:
        m: Metadata accessor.
        theta: The RoPE base (``{arch}.rope.freq_base``).
        head_dim: The attention head size.
        rope_tensors: The dequantized ``rope_freqs`` (Llama 3) / ``rope_factors_long`` + ``rope_factors_short``
            (LongRoPE) tensors the file has.
        rope_dim: How many dimensions of each head RoPE rotates (``partial_rotary_factor = rope_dim / head_dim``).
        max_pos: The context length (LongRoPE's ``max_position_embeddings``).

    Returns:
        E.g. ``{"rope_type": "default", "rope_theta": 10000.0}`` or a scaled variant.

    Raises:
        CheckpointError: An unsupported scaling type or a missing factor.
    """
    params: dict[str, object] = {"rope_type": "default", "rope_theta": theta}
    if rope_dim != head_dim:
        params["partial_rotary_factor"] = rope_dim / head_dim
    rope_freqs = rope_tensors.get(_ROPE_FREQS)
    if _ROPE_LONG in rope_tensors and _ROPE_SHORT in rope_tensors:
        original = m.get_int(Keys.Rope.SCALING_ORIG_CTX_LEN, max_pos)
        params.update(rope_type="longrope", original_max_position_embeddings=original,
                      long_factor=[float(v) for v in rope_tensors[_ROPE_LONG].reshape(-1)],
                      short_factor=[float(v) for v in rope_tensors[_ROPE_SHORT].reshape(-1)])
        attn_factor = m.get_float(Keys.Rope.SCALING_ATTN_FACTOR)
        if attn_factor is not None:
            params["attention_factor"] = attn_factor
        return params
    scaling = m.get(Keys.Rope.SCALING_TYPE)
    factor = m.get_float(Keys.Rope.SCALING_FACTOR)
    legacy_linear = m.get_float("{arch}.rope.scale_linear")  # written by old converters
    if scaling is None and legacy_linear is not None and legacy_linear != 1.0:
        scaling, factor = "linear", legacy_linear
    scaling = str(scaling).lower() if scaling is not None else "none"

    if scaling == "none":
        if rope_freqs is not None:
            llama3 = _llama3_rope_from_factors(rope_freqs, theta, head_dim, m.path)
            if llama3 is not None:
                params.update(llama3)
        return params
    if factor is None:
        raise CheckpointError(
            f"{m.path} says {m.key(Keys.Rope.SCALING_TYPE)}={scaling!r} but has no "
            f"{m.key(Keys.Rope.SCALING_FACTOR)!r}; convert the model again."
        )
    if scaling == "linear":
        params.update(rope_type="linear", factor=factor)
    elif scaling == "yarn":
        params.update(rope_type="yarn", factor=factor)
        orig = m.get_int(Keys.Rope.SCALING_ORIG_CTX_LEN)
        if orig is not None:
            params["original_max_position_embeddings"] = orig
        for template, name in (
            (Keys.Rope.SCALING_YARN_BETA_FAST, "beta_fast"),
            (Keys.Rope.SCALING_YARN_BETA_SLOW, "beta_slow"),
        ):
            value = m.get_float(template)
            if value is not None:
                params[name] = value
    else:
        raise CheckpointError(
            f"{m.path} uses RoPE scaling {scaling!r}, which is not supported (supported: none, "
            "linear, yarn, and Llama 3 rope_freqs)."
        )
    return params


def _build_config(
    meta: Mapping[str, object],
    arch: str,
    tensor_shapes: Mapping[str, tuple[int, ...]],
    token_count: int | None,
    rope_tensors: Mapping[str, np.ndarray],
    path: Path,
) -> transformers.PretrainedConfig:
    """Builds the Hugging Face config from GGUF metadata.

    Args:
        meta: Decoded metadata.
        arch: ``general.architecture`` (one of :data:`SUPPORTED_ARCHITECTURES`).
        tensor_shapes: GGUF tensor name -> Hugging Face-order shape.
        token_count: Length of ``tokenizer.ggml.tokens`` (None if absent).
        rope_tensors: The ``rope_freqs`` / ``rope_factors_long`` / ``rope_factors_short`` tensors the file has.
        path: The file, for messages.

    Returns:
        The config object.

    Raises:
        CheckpointError: A required key is missing or the values are inconsistent.
    """
    m = _Meta(meta, arch, path)
    family = _family(arch, meta)
    hidden = m.get_int(Keys.LLM.EMBEDDING_LENGTH, required=True)
    n_layers = m.get_int(Keys.LLM.BLOCK_COUNT, required=True)
    intermediate = m.get_int(Keys.LLM.FEED_FORWARD_LENGTH, required=True)
    n_heads = m.get_int(Keys.Attention.HEAD_COUNT, required=True)
    n_kv_heads = m.get_int(Keys.Attention.HEAD_COUNT_KV, n_heads)
    rms_eps = m.get_float(Keys.Attention.LAYERNORM_RMS_EPS, required=True)
    max_pos = m.get_int(Keys.LLM.CONTEXT_LENGTH, required=True)
    theta = m.get_float(Keys.Rope.FREQ_BASE, 10000.0)
    if min(hidden, n_layers, intermediate, n_heads, n_kv_heads) <= 0 or n_heads % n_kv_heads:
        raise CheckpointError(
            f"{path} has inconsistent sizes (hidden={hidden}, layers={n_layers}, ffn={intermediate}, "
            f"heads={n_heads}, kv_heads={n_kv_heads}); the file is corrupt, convert it again."
        )

    head_dim = m.get_int(Keys.Attention.KEY_LENGTH)
    if head_dim is None:
        q_shape = tensor_shapes.get("blk.0.attn_q.weight")
        head_dim = q_shape[0] // n_heads if q_shape else hidden // n_heads
    rope_dim = m.get_int(Keys.Rope.DIMENSION_COUNT)
    if rope_dim is not None and not 0 < rope_dim <= head_dim:
        raise CheckpointError(
            f"{path} says RoPE rotates {rope_dim} dimensions ({m.key(Keys.Rope.DIMENSION_COUNT)}) of heads of "
            f"{head_dim}; the file is corrupt, convert it again."
        )

    vocab = m.get_int(Keys.LLM.VOCAB_SIZE)
    if vocab is None:
        vocab = token_count
    if vocab is None:
        embd = tensor_shapes.get(TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight")
        if embd is None:
            raise CheckpointError(
                f"cannot tell the vocabulary size of {path}: it has no {m.key(Keys.LLM.VOCAB_SIZE)!r}, no "
                f"{Keys.Tokenizer.LIST!r} and no token_embd tensor. Convert the model again."
            )
        vocab = embd[0]

    def token_id(key: str) -> int | None:
        value = meta.get(key)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def has_block_tensor(base: str, kind: str) -> bool:
        return any(f"blk.{i}.{base}.{kind}" in tensor_shapes for i in range(n_layers))

    kwargs: dict[str, object] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=max_pos,
        rms_norm_eps=rms_eps,
        rope_parameters=_rope_parameters(m, float(theta), head_dim, rope_tensors, rope_dim or head_dim, max_pos),
        tie_word_embeddings=_OUTPUT_WEIGHT not in tensor_shapes,
        bos_token_id=token_id(Keys.Tokenizer.BOS_ID),
        eos_token_id=token_id(Keys.Tokenizer.EOS_ID),
        pad_token_id=token_id(Keys.Tokenizer.PAD_ID),
        architectures=[family.causal_lm_class],
    )
    prefix = f"{arch}."
    arch_meta = {k.removeprefix(prefix): v for k, v in meta.items() if k.startswith(prefix)}
    kwargs.update(family.gguf_config_fields(
        kwargs,
        arch_meta,
        attention_bias=any(has_block_tensor(b, "bias") for b in ("attn_q", "attn_k", "attn_v", "attn_output")),
        mlp_bias=any(has_block_tensor(b, "bias") for b in ("ffn_gate", "ffn_up", "ffn_down")),
        sliding_window=m.get_int(Keys.Attention.SLIDING_WINDOW),
    ))
    return family.config_type()(**kwargs)


# --------------------------------------------------------------------------- #
# Tensors
# --------------------------------------------------------------------------- #


def _hf_name(gguf_name: str, family: Family) -> tuple[str, int, int] | None:
    """Maps a llama.cpp tensor name to ``(Hugging Face parameter name, part, parts)`` (None if unknown).

    ``parts`` is 1 except for the parts of a grouped expert parameter (``blk.N.ffn_up_exps.weight`` is part 1 of 2
    of ``model.layers.N.mlp.experts.gate_up_proj``: the second half of its rows).
    """
    if mb := _BLOCK_RE.fullmatch(gguf_name):
        module = family.hf_module(mb.group(2))
        if module:
            return f"model.layers.{mb.group(1)}.{module}.{mb.group(3)}", 0, 1
        expert = family.hf_expert_parameter(mb.group(2))
        if expert and mb.group(3) == "weight":
            return f"model.layers.{mb.group(1)}.{expert[0]}", expert[1], expert[2]
        return None
    if mg := _GLOBAL_RE.fullmatch(gguf_name):
        module = _GLOBAL_TENSORS.get(mg.group(1))
        return (f"{module}.{mg.group(2)}", 0, 1) if module else None
    return None


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverts llama.cpp's Q/K row permutation (interleaved RoPE -> rotate-half).

    llama.cpp writes ``w.reshape(n_head, 2, d // n_head // 2, *rest).swapaxes(1, 2)``;
    this applies the inverse reshape/swap. Works for weights ``(out, in)`` and
    biases ``(out,)``.

    Args:
        w: The tensor as stored in the GGUF file, rows first.
        n_head: Number of heads the rows are split into.

    Returns:
        The rows in Hugging Face order.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor: Any, shape: tuple[int, ...], path: Path) -> np.ndarray:
    """Dequantizes one reader tensor to a float32 array of ``shape``.

    Args:
        tensor: A :class:`gguf.ReaderTensor`.
        shape: The Hugging Face-order shape (GGUF dims reversed).
        path: The file, for messages.

    Returns:
        A C-contiguous float32 array.

    Raises:
        CheckpointError: The type cannot be dequantized or the data is malformed.
    """
    try:
        arr = dequantize(tensor.data, tensor.tensor_type)
        arr = np.asarray(arr, dtype=np.float32).reshape(shape)
    except NotImplementedError as e:
        raise CheckpointError(
            f"tensor {tensor.name!r} of {path} uses GGML type {tensor.tensor_type.name}, which the installed "
            f"gguf package cannot dequantize ({e}). Upgrade gguf (`pip install -U gguf`) or use a file "
            "quantized to another type."
        ) from e
    except (ValueError, TypeError) as e:
        raise CheckpointError(
            f"tensor {tensor.name!r} of {path} is malformed ({e}); download or convert the file again."
        ) from e
    return arr


def _read_config(reader: GGUFReader, p: Path):
    """``(metadata, architecture, tensors by name, HF-order shapes, config)`` of an open GGUF file."""
    meta = _decode_metadata(reader)

    arch = meta.get(Keys.General.ARCHITECTURE)
    if arch is None:
        raise CheckpointError(
            f"required GGUF metadata key {Keys.General.ARCHITECTURE!r} is missing from {p}; the file was "
            "written by an incomplete converter. Convert the model again with llama.cpp's convert_hf_to_gguf.py."
        )
    _family(str(arch), meta)  # raises for an architecture no family serves
    arch = str(arch)

    tensors = {t.name: t for t in reader.tensors}
    shapes = {name: tuple(int(d) for d in reversed(t.shape.tolist())) for name, t in tensors.items()}
    tokens_field = reader.fields.get(Keys.Tokenizer.LIST)
    token_count = _array_len(tokens_field) if tokens_field is not None else None
    rope_tensors = {n: _dequantize(tensors[n], shapes[n], p) for n in _ROPE_TENSORS if n in tensors}
    config = _build_config(meta, arch, shapes, token_count, rope_tensors, p)
    return meta, arch, tensors, shapes, config


def read_gguf_config(path: str | os.PathLike) -> transformers.PretrainedConfig:
    """The Hugging Face config of a GGUF model file, without dequantizing its tensors.

    Raises:
        CheckpointError, UnsupportedArchitectureError: as :func:`read_gguf_checkpoint`.
    """
    reader, p = _open_reader(path)
    return _read_config(reader, p)[4]


def read_gguf_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> GGUFCheckpoint:
    """Reads a llama.cpp GGUF model file into a Hugging Face-style checkpoint.

    Every tensor is dequantized (any type ``gguf.quants.dequantize`` knows)
    and converted to ``dtype``. Q/K rows of ``llama``/``mistral`` files are put
    back into Hugging Face order. Tensor names, shapes and the set of tensors
    are checked against the config before anything is dequantized.

    Args:
        path: The ``.gguf`` file (a single file, not a split shard).
        dtype: Floating-point dtype of the returned tensors.

    Returns:
        The config, state dict and metadata.

    Raises:
        CheckpointError: The file is missing, not GGUF, truncated or corrupt,
            lacks a required metadata key (the message names it), or its
            tensors do not match its metadata.
        UnsupportedArchitectureError: ``general.architecture`` is not one of
            :data:`SUPPORTED_ARCHITECTURES`.
        ConfigurationError: ``dtype`` is not a floating-point dtype.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigurationError(f"dtype must be a floating-point torch.dtype, got {dtype!r}.")
    reader, p = _open_reader(path)
    meta, arch, tensors, shapes, config = _read_config(reader, p)

    # Map and validate every tensor before the (slow) dequantization.
    family = family_for_model_type(config.model_type)
    expected = family.expected_shapes(config)
    parts: dict[str, dict[int, str]] = {}  # HF name -> {part: GGUF name}
    counts: dict[str, int] = {}
    unknown: list[str] = []
    for name in tensors:
        if name in _ROPE_TENSORS:
            continue
        mapped = _hf_name(name, family)
        if mapped is None or mapped[0] not in expected:
            unknown.append(name)
        else:
            parts.setdefault(mapped[0], {})[mapped[1]] = name
            counts[mapped[0]] = mapped[2]
    # Grouped expert parameters are read from all their parts (a file lacking one lacks the parameter).
    hf_to_gguf = {hf: [got[i] for i in range(counts[hf])] for hf, got in parts.items() if len(got) == counts[hf]}
    if unknown:
        raise CheckpointError(
            f"{p} holds tensors that have no place in a {type(config).__name__} model: "
            f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}. The file's tensors do not match its "
            f"architecture {arch!r}; it is not a plain {arch} model or was converted incorrectly."
        )
    missing = [hf for hf in expected if hf not in hf_to_gguf]
    if missing:
        raise CheckpointError(
            f"{p} lacks tensors a {type(config).__name__} model with this metadata needs: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}. Download or convert the file again."
        )
    for hf, want in expected.items():
        names = hf_to_gguf[hf]
        part = (want[0], want[1] // len(names), *want[2:]) if len(names) > 1 else want
        for name in names:
            got = shapes[name]
            if got != part:
                raise CheckpointError(
                    f"tensor {name!r} of {p} has shape {list(got)} (HF order) but the metadata implies "
                    f"{list(part)} for {hf}. The file's metadata and tensors disagree; convert the model again."
                )

    permute = family.gguf_permutes_qk
    state_dict: dict[str, torch.Tensor] = {}
    for hf, want in expected.items():
        names = hf_to_gguf[hf]
        if len(names) == 1:
            arr = _dequantize(tensors[names[0]], want, p)
        else:  # a grouped expert parameter: its parts' rows, concatenated per expert
            arr = np.concatenate([_dequantize(tensors[n], shapes[n], p) for n in names], axis=1)
        if family.gguf_norm_shift and hf.endswith("norm.weight"):
            arr = arr - np.float32(family.gguf_norm_shift)  # stored as w + shift (Gemma's 1 + w)
        if permute and (".self_attn.q_proj." in hf or ".self_attn.k_proj." in hf):
            n = config.num_attention_heads if ".q_proj." in hf else config.num_key_value_heads
            arr = _unpermute_rows(arr, n)
        if not arr.flags.writeable or not arr.flags.c_contiguous or arr.base is not None:
            arr = np.array(arr, dtype=np.float32, order="C", copy=True)  # detach from the file mapping
        t = torch.from_numpy(arr)
        state_dict[hf] = t if dtype == torch.float32 else t.to(dtype)
    del tensors, reader  # release the memory map
    logger.info("read %d tensors from %s (%s, %s)", len(state_dict), p, arch, type(config).__name__)
    return GGUFCheckpoint(config=config, state_dict=state_dict, metadata=meta)


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #


def _chat_templates(reader: GGUFReader) -> str | dict[str, str] | None:
    """Returns the file's chat template(s): one string, or a name -> template dict."""
    fields = reader.fields
    main = fields.get(Keys.Tokenizer.CHAT_TEMPLATE)
    default = _decode_field(main) if main is not None else None
    prefix = Keys.Tokenizer.CHAT_TEMPLATE + "."
    named = {k[len(prefix) :]: _decode_field(f) for k, f in fields.items() if k.startswith(prefix)}
    if not named:
        return default  # type: ignore[return-value]
    templates = {"default": default} if default else {}
    templates.update(named)  # type: ignore[arg-type]
    return templates  # type: ignore[return-value]


def load_gguf_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
    """Builds the Hugging Face tokenizer described by a GGUF file's tokenizer metadata.

    Uses ``transformers.PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name)``
    (which rebuilds a fast tokenizer from ``tokenizer.ggml.*``) and makes sure
    the file's ``tokenizer.chat_template`` (and any named templates) is set.

    Args:
        path: The ``.gguf`` file.

    Returns:
        The tokenizer.

    Raises:
        CheckpointError: The file is missing, not GGUF, or its tokenizer
            metadata cannot be turned into a tokenizer.
    """
    p = _check_gguf_path(path)
    try:
        # The tokenizer class directly, not AutoTokenizer: AutoTokenizer first builds a model config from the file
        # and refuses architectures transformers cannot load (gemma); the tokenizer is built the same way.
        tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as e:
        raise CheckpointError(
            f"cannot build a tokenizer from {p} ({type(e).__name__}: {e}). The file needs llama.cpp tokenizer "
            "metadata (tokenizer.ggml.*) of a type transformers supports; otherwise load the tokenizer from the "
            "original Hugging Face repository."
        ) from e
    if not getattr(tokenizer, "chat_template", None):
        reader, _ = _open_reader(p)
        templates = _chat_templates(reader)
        if templates:
            tokenizer.chat_template = templates
    return tokenizer
