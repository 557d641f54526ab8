"""One RoPE module: the model's frequencies equal transformers', and llama.cpp's factor form agrees with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.models.rope import (
    llama3_params_from_factors,
    llama3_rope_factors,
    rope_inverse_frequencies,
    rope_parameters,
)

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def _config(rope: dict | None, head_dim=128, theta=500000.0):
    return transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                    rope_theta=theta, rope_scaling=rope, max_position_embeddings=131072)


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA31,
                                  {**LLAMA31, "factor": 32.0}, {"rope_type": "yarn", "factor": 4.0,
                                                                  "original_max_position_embeddings": 8192},
                                  # YaRN as Qwen3 / DeepSeek configs write it: betas, mscale ratio, no truncation
                                  {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                                   "beta_fast": 16, "beta_slow": 2},
                                  {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                   "mscale": 1.0, "mscale_all_dim": 0.707, "truncate": False},
                                  {"rope_type": "longrope", "original_max_position_embeddings": 4096,
                                   "short_factor": [1.0 + i / 64 for i in range(64)],
                                   "long_factor": [1.0 + i / 8 for i in range(64)]}])
def test_inverse_frequencies_equal_transformers(rope):
    config = _config(rope)
    ours, scaling = rope_inverse_frequencies(config, 128)
    rope_type = rope_parameters(config)["rope_type"]
    if rope_type == "default":
        theirs, their_scaling = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128)), 1.0
    else:
        theirs, their_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=0)
    assert scaling == pytest.approx(their_scaling)


@pytest.mark.parametrize("params", [LLAMA31, {**LLAMA31, "factor": 32.0},
                                    {**LLAMA31, "high_freq_factor": 2.0, "original_max_position_embeddings": 4096}])
def test_llama_cpp_factor_form_agrees_with_the_model_form(params):
    """llama.cpp applies ``inv_freq = default / rope_freqs``; that must be the model's llama3 frequencies."""
    theta, hd = 500000.0, 128
    config = _config(params, hd, theta)
    ours, _ = rope_inverse_frequencies(config, hd)
    default = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    factors = llama3_rope_factors({**params, "rope_theta": theta}, hd)
    assert factors.dtype == torch.float32 and factors.shape == (hd // 2,)
    torch.testing.assert_close(default / factors, ours, rtol=1e-6, atol=0)
    # The inverse recovers the parameters (low_freq_factor 1, as in every released Llama 3.x).
    recovered, exact = llama3_params_from_factors(factors.numpy(), theta, hd)
    assert exact
    assert recovered["factor"] == pytest.approx(params["factor"])
    assert recovered["high_freq_factor"] == pytest.approx(params["high_freq_factor"], rel=1e-3)
    assert recovered["original_max_position_embeddings"] == pytest.approx(params["original_max_position_embeddings"],
                                                                          rel=1e-3)


def test_factor_recovery_rejects_what_is_not_llama3():
    assert llama3_params_from_factors(np.ones(64, np.float32), 500000.0, 128) == (None, True)
    with pytest.raises(ValueError, match="entries"):
        llama3_params_from_factors(np.ones(10, np.float32), 500000.0, 128)
    with pytest.raises(ValueError, match="below 1"):
        llama3_params_from_factors(np.full(64, 0.5, np.float32), 500000.0, 128)
    noisy = llama3_rope_factors({**LLAMA31, "rope_theta": 500000.0}, 128).numpy().copy()
    noisy[40] *= 1.5
    assert llama3_params_from_factors(noisy, 500000.0, 128)[1] is False
