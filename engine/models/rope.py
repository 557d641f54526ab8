"""RoPE frequencies and their scalings: one module for the model, the GGUF reader and the GGUF writer.

* :func:`rope_parameters` — a config's RoPE settings as one dict, whichever transformers version wrote it
  (per layer type where layer types differ: Gemma 3's local and global layers).
* :func:`rope_inverse_frequencies` — the model's inverse frequencies ``[rotary_dim // 2]`` (default, linear,
  Llama-3.1 ``llama3``, ``yarn`` and ``longrope`` here, computed exactly as transformers does; other types through
  transformers' public ``ROPE_INIT_FUNCTIONS``), per layer type where layer types differ (Gemma 3).
* :func:`llama3_rope_factors` — the same Llama-3.1 scaling in llama.cpp's form: one divisor per frequency
  (the ``rope_freqs`` tensor its converter writes; ``inv_freq = default / factor``).
* :func:`llama3_params_from_factors` — the inverse: ``llama3`` parameters recovered from a ``rope_freqs``
  tensor (the GGUF reader).

``tests/test_rope_scaling.py`` checks that the two Llama-3.1 forms agree and that the inverse recovers them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from engine.errors import UnsupportedArchitectureError


def rope_parameters(hf_config, layer_type: str | None = None) -> dict:
    """RoPE settings as one dict (``rope_type``, ``rope_theta``, scaling fields), from either config layout.

    Configs whose layer types use different RoPE (Gemma 3: ``{"sliding_attention": {...}, "full_attention":
    {...}}``) give the settings of ``layer_type`` (default ``"full_attention"``).
    """
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        key = layer_type or "full_attention"
        if key not in params:
            raise UnsupportedArchitectureError(
                f"the config's rope_parameters have no entry for layer type {key!r} (it has {sorted(params)})"
            )
        return dict(params[key])
    if isinstance(params, dict) and "rope_theta" in params:
        return dict(params)
    scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    scaling["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    return scaling


def _llama3_fields(params: dict) -> tuple[float, float, float, float]:
    """``(factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)`` of ``llama3`` params."""
    return (float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"]),
            float(params["original_max_position_embeddings"]))


def per_layer_type_rope(hf_config) -> bool:
    """Whether the config gives each layer type its own RoPE settings (Gemma 3)."""
    params = getattr(hf_config, "rope_parameters", None)
    return isinstance(params, dict) and bool(params) and all(isinstance(v, dict) for v in params.values())


def rotary_dim(hf_config, head_dim: int) -> int:
    """How many of a head's dimensions RoPE rotates (all of them unless ``partial_rotary_factor`` < 1: Phi-4-mini)."""
    factor = rope_parameters(hf_config).get("partial_rotary_factor")
    if factor is None:
        factor = getattr(hf_config, "partial_rotary_factor", None) or 1.0
    return int(head_dim * float(factor))


def longrope_inverse_frequencies(hf_config, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """LongRoPE (Phi-3/3.5/4-mini): ``(short, long, attention_scaling, original_max_position_embeddings)``.

    ``short`` and ``long`` are the inverse frequencies ``[rotary_dim // 2]`` divided by the config's per-frequency
    ``short_factor`` / ``long_factor``; a forward whose largest position id + 1 exceeds
    ``original_max_position_embeddings`` uses ``long``, any other ``short`` (transformers decides per forward, from
    the positions; llama.cpp decides once, from the context size). Both are scaled by ``attention_scaling``:
    ``sqrt(1 + ln(f) / ln(original))`` with ``f = max_position_embeddings / original`` unless the config gives
    ``factor`` or ``attention_factor`` (1 when ``f <= 1``).
    """
    params = rope_parameters(hf_config)
    dim = rotary_dim(hf_config, head_dim)
    base = float(params["rope_theta"])
    original = params.get("original_max_position_embeddings") or getattr(hf_config, "original_max_position_embeddings")
    original = int(original)
    factor = params.get("factor")
    if factor is None:
        factor = hf_config.max_position_embeddings / original
    scaling = params.get("attention_factor")
    if scaling is None:
        scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    short, long = (1.0 / (torch.tensor(params[k], dtype=torch.float32) * base**shape)
                   for k in ("short_factor", "long_factor"))
    if short.shape != shape.shape or long.shape != shape.shape:
        raise UnsupportedArchitectureError(
            f"rope_parameters short_factor/long_factor have {len(params['short_factor'])}/{len(params['long_factor'])} "
            f"entries, expected rotary_dim / 2 = {dim // 2}"
        )
    return short, long, float(scaling), original


def yarn_inverse_frequencies(hf_config, params: dict, dim: int) -> tuple[torch.Tensor, float]:
    """YaRN (Qwen2.5/Qwen3 long context): ``[dim // 2]`` frequencies blended between interpolated (``/ factor``) and
    original ones by a linear ramp over the dimensions whose rotations at the original context fall between
    ``beta_slow`` and ``beta_fast``, and the cos/sin scaling ``0.1 ln(factor) + 1`` (or the ``mscale`` ratio, or
    ``attention_factor``), computed as transformers does, op for op."""
    base = float(params["rope_theta"])
    original = params.get("original_max_position_embeddings") or getattr(
        hf_config, "original_max_position_embeddings", None) or hf_config.max_position_embeddings
    factor = params.get("factor")
    if factor is None:
        factor = hf_config.max_position_embeddings / original

    def mscale_of(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    scaling = params.get("attention_factor")
    if scaling is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            scaling = float(mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim))
        else:
            scaling = mscale_of(factor)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over the context
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(scaling)


def rope_inverse_frequencies(hf_config, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies ``[rotary_dim // 2]`` (fp32) and the cos/sin scaling for a config
    (for ``layer_type``'s settings where layer types differ, see :func:`rope_parameters`). ``longrope`` gives its
    short frequencies here (see :func:`longrope_inverse_frequencies`).

    Raises:
        UnsupportedArchitectureError: a RoPE type neither this module nor transformers implements.
    """
    params = rope_parameters(hf_config, layer_type)
    rope_type = params.get("rope_type", "default")
    base = float(params["rope_theta"])
    dim = rotary_dim(hf_config, head_dim)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_type == "longrope":
        short, _, scaling, _ = longrope_inverse_frequencies(hf_config, head_dim)
        return short, scaling
    if rope_type == "yarn":
        return yarn_inverse_frequencies(hf_config, params, dim)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(params["factor"]), 1.0
    if rope_type == "llama3":
        # transformers' _compute_llama3_parameters, op for op (the parity tests compare bit-close logits).
        factor, low, high, old_context = _llama3_fields(params)
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise UnsupportedArchitectureError(f"RoPE scaling type {rope_type!r} is not supported")
    kwargs = {"layer_type": layer_type} if per_layer_type_rope(hf_config) else {}
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu", **kwargs)
    return inv.float(), float(scaling)


def _llama3_divisors(inv_freq: np.ndarray, factor: float, low: float, high: float, old: float) -> np.ndarray:
    """Llama-3.1 scaling as a divisor per frequency: 1 (short wavelengths), ``factor`` (long), smooth between."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (old / wavelen - low) / (high - low)
    return np.where(wavelen < old / high, 1.0,
                    np.where(wavelen > old / low, factor, 1.0 / ((1.0 - smooth) / factor + smooth)))


def llama3_rope_factors(params: dict, head_dim: int) -> torch.Tensor:
    """llama.cpp's ``rope_freqs`` tensor ``[head_dim // 2]`` (fp32) for ``llama3`` RoPE ``params``.

    As llama.cpp's converter computes it: fp32 default frequencies, the divisors in double precision.
    """
    base = float(params.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    divisors = _llama3_divisors(freqs.double().numpy(), *_llama3_fields(params))
    return torch.from_numpy(divisors).float()


def llama3_params_from_factors(factors: np.ndarray, theta: float, head_dim: int) -> tuple[dict | None, bool]:
    """``llama3`` RoPE parameters recovered from a ``rope_freqs`` tensor, and whether they reproduce it.

    llama.cpp stores, per frequency, 1, ``factor`` or ``1 / ((1 - s) / factor + s)`` with
    ``s = (L / wavelen - lo) / (hi - lo)``. ``factor`` is the largest entry; assuming ``lo = 1`` (every
    released Llama 3.x) ``s`` is linear in ``1 / wavelen``, and a line fit over the smoothed entries gives
    ``hi`` and ``L`` (Llama-3.1's 4 and 8192 when fewer than two entries are smoothed).

    Returns:
        ``(params, exact)``: ``params`` is None when every factor is 1 (no scaling); ``exact`` says whether
        :func:`llama3_rope_factors` of ``params`` reproduces ``factors`` (rtol 1e-3).

    Raises:
        ValueError: the tensor has the wrong length or factors below 1 (not Llama 3 scaling).
    """
    rf = np.asarray(factors, dtype=np.float64).reshape(-1)
    if rf.size != head_dim // 2:
        raise ValueError(f"it has {rf.size} entries, expected head_dim/2 = {head_dim // 2}")
    if np.all(np.abs(rf - 1.0) < 1e-6):
        return None, True
    if rf.min() < 1.0 - 1e-4:
        raise ValueError(f"it holds factors below 1 (min {rf.min():.4g}), which is not Llama 3 RoPE scaling")
    factor = float(rf.max())
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    x = inv_freq / (2 * np.pi)  # 1 / wavelength
    smooth = (rf > 1.0 + 1e-4) & (rf < factor * (1.0 - 1e-4))
    low, high, orig_ctx = 1.0, 4.0, 8192
    if smooth.sum() >= 2:
        s = (1.0 / rf[smooth] - 1.0 / factor) / (1.0 - 1.0 / factor)
        a, b = np.polyfit(x[smooth], s, 1)
        if b < 0 and a > 0:
            high = round(float(1.0 - 1.0 / b), 3)
            orig_ctx = int(round(float(-a / b)))
    params = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig_ctx,
    }
    expected = _llama3_divisors(inv_freq, factor, low, high, float(orig_ctx))
    return params, bool(np.allclose(expected, rf, rtol=1e-3, atol=1e-4))
