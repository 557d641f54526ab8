"""Model configs the planner can use without a network: a name, a folder, a ``.gguf`` file or a config object.

The planner needs only a model's configuration (sizes), never its weights. Well-known models are
listed here with the fields of their published ``config.json`` (so ``estimate_memory("meta-llama/
Llama-3.1-8B", ...)`` works offline); anything else is read from a local folder, a GGUF file, or
the Hugging Face hub.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import ConfigurationError

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

#: ``{hub id: (model_type, config fields)}`` copied from the models' published config.json files.
KNOWN_CONFIGS: dict[str, tuple[str, dict]] = {
    "meta-llama/Llama-3.1-8B": ("llama", {
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0}, "tie_word_embeddings": False, "bos_token_id": 128000,
        "eos_token_id": 128001,
    }),
    "meta-llama/Llama-3.1-70B": ("llama", {
        "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0}, "tie_word_embeddings": False, "bos_token_id": 128000,
        "eos_token_id": 128001,
    }),
    "meta-llama/Llama-3.2-1B": ("llama", {
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0}, "tie_word_embeddings": True, "bos_token_id": 128000,
        "eos_token_id": 128001,
    }),
    "meta-llama/Llama-3.2-3B": ("llama", {
        "vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
        "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0}, "tie_word_embeddings": True, "bos_token_id": 128000,
        "eos_token_id": 128001,
    }),
    "mistralai/Mistral-7B-v0.3": ("mistral", {
        "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    }),
    "Qwen/Qwen2.5-7B": ("qwen2", {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 131072,
        "use_sliding_window": False, "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151643,
    }),
    "Qwen/Qwen3-8B": ("qwen3", {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
    }),
    "HuggingFaceTB/SmolLM2-135M": ("llama", {
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0,
    }),
    "HuggingFaceTB/SmolLM2-360M": ("llama", {
        "vocab_size": 49152, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
        "num_key_value_heads": 5, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0,
    }),
    "HuggingFaceTB/SmolLM2-1.7B": ("llama", {
        "vocab_size": 49152, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
        "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "rope_theta": 130000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0,
    }),
}

#: Variants with the same architecture as a listed model.
_ALIASES = {
    "meta-llama/Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B",
    "meta-llama/Meta-Llama-3.1-8B": "meta-llama/Llama-3.1-8B",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-3.1-70B-Instruct": "meta-llama/Llama-3.1-70B",
    "meta-llama/Llama-3.2-1B-Instruct": "meta-llama/Llama-3.2-1B",
    "meta-llama/Llama-3.2-3B-Instruct": "meta-llama/Llama-3.2-3B",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistralai/Mistral-7B-v0.3",
    "Qwen/Qwen2.5-7B-Instruct": "Qwen/Qwen2.5-7B",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M",
    "HuggingFaceTB/SmolLM2-360M-Instruct": "HuggingFaceTB/SmolLM2-360M",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "HuggingFaceTB/SmolLM2-1.7B",
}


def known_model_names() -> list[str]:
    """Every name :func:`resolve_config` knows without a network."""
    return sorted([*KNOWN_CONFIGS, *_ALIASES])


def _lookup(name: str) -> str | None:
    by_lower = {n.lower(): n for n in known_model_names()}
    # Also accept the name without its organisation ("Llama-3.1-8B").
    by_short = {n.lower().rpartition("/")[2]: n for n in known_model_names()}
    key = name.lower()
    found = by_lower.get(key) or by_short.get(key)
    return _ALIASES.get(found, found) if found else None


def resolve_config(model):
    """A transformers config for ``model``.

    Args:
        model: a transformers ``PretrainedConfig``; an engine model (its ``hf_config``); a local
            model folder (its ``config.json``); a ``.gguf`` file; or a name from
            :func:`known_model_names` (offline) or any other hub id (downloads ``config.json``).

    Raises:
        ConfigurationError: when ``model`` is none of these.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    hf_config = getattr(model, "hf_config", None)
    if hf_config is not None:
        return hf_config
    if not isinstance(model, (str, Path)):
        raise ConfigurationError(
            f"estimate_memory() needs a model name, a folder, a .gguf file, a transformers config or an engine "
            f"model, got {type(model).__name__}"
        )
    path = Path(model).expanduser()
    if path.is_dir():
        from engine.loading.safetensors_loader import load_hf_config

        return load_hf_config(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigurationError(f"{path} does not exist")
        from engine.loading.gguf_reader import read_gguf_config

        return read_gguf_config(path)
    known = _lookup(str(model))
    if known is not None:
        model_type, fields = KNOWN_CONFIGS[known]
        config = AutoConfig.for_model(model_type, **fields)
        config.name_or_path = known
        return config
    try:
        return AutoConfig.from_pretrained(str(model))
    except OSError as err:
        raise ConfigurationError(
            f"no config for {model!r}: it is not a local folder or .gguf file, not one of the models known offline "
            f"({', '.join(sorted(KNOWN_CONFIGS))}), and the hub lookup failed ({err}). Pass a folder with a "
            "config.json or a transformers config object."
        ) from err
