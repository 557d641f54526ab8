"""Compute ops of the engine, one op per file, each with a PyTorch reference beside it.

Which implementation runs (PyTorch or Triton) is decided in :mod:`kernels.dispatch`.
"""

from kernels.attention import attention, build_attention_mask
from kernels.cross_entropy import fused_linear_cross_entropy
from kernels.dispatch import describe_backends, select_backend
from kernels.geglu import geglu
from kernels.glu import glu_activation
from kernels.lora_linear import lora_linear
from kernels.nf4 import NF4Weight, nf4_dequantize, nf4_quantize
from kernels.rms_norm import rms_norm
from kernels.rope import rope, rope_cos_sin
from kernels.swiglu import swiglu
from kernels.token_log_probs import linear_token_entropy, linear_token_log_probs

__all__ = [
    "NF4Weight",
    "attention",
    "build_attention_mask",
    "describe_backends",
    "fused_linear_cross_entropy",
    "geglu",
    "glu_activation",
    "linear_token_entropy",
    "linear_token_log_probs",
    "lora_linear",
    "nf4_dequantize",
    "nf4_quantize",
    "rms_norm",
    "rope",
    "rope_cos_sin",
    "select_backend",
    "swiglu",
]
