"""Llama (1/2/3/3.1/3.2) and Llama-shaped models (SmolLM2, TinyLlama): the reference family."""

from __future__ import annotations

from engine.models.families.base import PARITY_VERIFIED, Family

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_SMOLLM2 = {"vocab_size": 49152, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": True,
            "bos_token_id": 0, "eos_token_id": 0}

LLAMA = Family(
    name="llama",
    model_types=("llama",),
    summary="(reference) Llama 1/2/3/3.1/3.2, SmolLM2, TinyLlama, ...",
    verified=(
        PARITY_VERIFIED + "; Llama-3.1 RoPE and the Triton path (interpreter); real SmolLM2-135M weights; "
        "f16/q8_0/K-quant GGUF and LoRA GGUF run in llama.cpp"
    ),
    config_class="LlamaConfig",
    causal_lm_class="LlamaForCausalLM",
    gguf_architecture="llama",
    gguf_permutes_qk=True,
    chat_template="llama-3",
    # Published config.json fields (hub ids as listed on huggingface.co).
    known_configs={
        "meta-llama/Llama-3.1-8B": {
            "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 131072, "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0},
            "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
        },
        "meta-llama/Llama-3.1-70B": {
            "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
            "num_attention_heads": 64, "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 131072, "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0},
            "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
        },
        "meta-llama/Llama-3.2-1B": {
            "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": 131072, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
            "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001,
        },
        "meta-llama/Llama-3.2-3B": {
            "vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
            "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": 131072, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
            "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001,
        },
        "HuggingFaceTB/SmolLM2-135M": {
            **_SMOLLM2, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000.0,
        },
        "HuggingFaceTB/SmolLM2-360M": {
            **_SMOLLM2, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
            "num_attention_heads": 15, "num_key_value_heads": 5, "rope_theta": 100000.0,
        },
        "HuggingFaceTB/SmolLM2-1.7B": {
            **_SMOLLM2, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
            "num_attention_heads": 32, "num_key_value_heads": 32, "rope_theta": 130000.0,
        },
    },
    aliases={
        "meta-llama/Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B",
        "meta-llama/Meta-Llama-3.1-8B": "meta-llama/Llama-3.1-8B",
        "meta-llama/Meta-Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B",
        "meta-llama/Llama-3.1-70B-Instruct": "meta-llama/Llama-3.1-70B",
        "meta-llama/Llama-3.2-1B-Instruct": "meta-llama/Llama-3.2-1B",
        "meta-llama/Llama-3.2-3B-Instruct": "meta-llama/Llama-3.2-3B",
        "HuggingFaceTB/SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M",
        "HuggingFaceTB/SmolLM2-360M-Instruct": "HuggingFaceTB/SmolLM2-360M",
        "HuggingFaceTB/SmolLM2-1.7B-Instruct": "HuggingFaceTB/SmolLM2-1.7B",
    },
)
