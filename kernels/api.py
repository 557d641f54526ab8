"""The public ops of the engine's kernels, in one place (``engine_kernels.api.__all__``).

The ops live one per file in the repository's ``kernels/`` folder, each with a PyTorch reference beside it. The
folder is installed as the package ``engine_kernels`` (a namespace package: it has no ``__init__.py``), so that
Hugging Face's ``kernels`` package, which transformers and bitsandbytes import, is never shadowed.

Which implementation runs (PyTorch or Triton) is decided in :mod:`engine_kernels.dispatch`.
"""

from engine_kernels.attention import attention, build_attention_mask
from engine_kernels.cross_entropy import fused_linear_cross_entropy
from engine_kernels.dispatch import describe_backends, select_backend
from engine_kernels.geglu import geglu
from engine_kernels.glu import glu_activation
from engine_kernels.grouped_gemm import grouped_mm, grouped_mm_nf4
from engine_kernels.lora_linear import lora_linear
from engine_kernels.nf4 import NF4Weight, nf4_dequantize, nf4_quantize
from engine_kernels.rms_norm import rms_norm
from engine_kernels.rope import rope, rope_cos_sin
from engine_kernels.swiglu import swiglu
from engine_kernels.token_log_probs import linear_token_entropy, linear_token_log_probs

__all__ = [
    "NF4Weight",
    "attention",
    "build_attention_mask",
    "describe_backends",
    "fused_linear_cross_entropy",
    "geglu",
    "glu_activation",
    "grouped_mm",
    "grouped_mm_nf4",
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
