"""The projection layer of every model: a base weight (dense or NF4 4-bit) plus an optional LoRA adapter.

One class covers the three ways a projection is used:

* full fine-tuning: a trainable dense ``weight``; plain ``F.linear``;
* LoRA: a frozen dense weight and trainable ``lora_A [r, in]``, ``lora_B [out, r]``;
* QLoRA: the frozen weight stored as NF4 (``weight_nf4_*`` buffers) and LoRA on top.

The LoRA math and its hand-written backward live in :mod:`engine_kernels.lora_fused` (one path for every projection;
:mod:`engine_kernels.lora_linear` is the single-projection reference the tests compare with).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine_kernels.glu import glu_activation
from engine_kernels.lora_fused import DequantWorkspace, Projection, lora_mlp, lora_projections
from engine_kernels.nf4 import NF4Weight, nf4_dequantize, nf4_quantize
from engine_kernels.tiled_mlp import tiled_lora_mlp

_NF4_FIELDS = ("packed", "absmax", "absmax_code", "absmax_scale", "absmax_offset")


class Linear(nn.Module):
    """``y = x @ W.T (+ bias) (+ scaling * dropout(x) @ A.T @ B.T)``.

    Args:
        in_features (int): input width.
        out_features (int): output width.
        bias (bool): whether the layer has a bias.
        device, dtype: where and how the dense weight is created.

    Attributes:
        weight (Parameter or None): dense ``[out, in]``; ``None`` once quantized.
        lora_A, lora_B (Parameter or None): the adapter, fp32 by default.
        lora_scaling (float): ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
        lora_dropout (float): dropout probability of the adapter's input.
        adapter_enabled (bool): when false the adapter is skipped (reference policy in DPO).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.lora_r = 0
        self.lora_alpha = 0.0
        self.lora_scaling = 0.0
        self.lora_dropout = 0.0
        self.adapter_enabled = True
        self._nf4_shape: torch.Size | None = None
        self._nf4_dtype: torch.dtype | None = None
        self._nf4_blocksize = 64

    # ------------------------------------------------------------------ quantization
    @property
    def is_quantized(self) -> bool:
        return self._nf4_shape is not None

    def quantize_nf4_(self, double_quant: bool = True, blocksize: int = 64) -> None:
        """Replace the dense weight with its NF4 form (bitsandbytes layout); frees the dense copy."""
        if self.is_quantized:
            return
        q = nf4_quantize(self.weight.data, blocksize=blocksize, double_quant=double_quant)
        self.weight = None
        self._set_nf4(q)

    def _set_nf4(self, q: NF4Weight) -> None:
        for name in _NF4_FIELDS:
            value = getattr(q, name)
            self.register_buffer(f"weight_nf4_{name}", value, persistent=True)
        self._nf4_shape, self._nf4_dtype, self._nf4_blocksize = q.shape, q.dtype, q.blocksize

    def nf4_weight(self) -> NF4Weight:
        """The base weight as an :class:`NF4Weight` view of this module's buffers."""
        return NF4Weight(
            packed=self.weight_nf4_packed,
            absmax=self.weight_nf4_absmax,
            shape=self._nf4_shape,
            dtype=self._nf4_dtype,
            blocksize=self._nf4_blocksize,
            absmax_code=self.weight_nf4_absmax_code,
            absmax_scale=self.weight_nf4_absmax_scale,
            absmax_offset=self.weight_nf4_absmax_offset,
        )

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._nf4_dtype if self.is_quantized else self.weight.dtype

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense base weight ``[out, in]`` (dequantized if stored as NF4), without the adapter."""
        if self.is_quantized:
            return nf4_dequantize(self.nf4_weight(), dtype=dtype or self._nf4_dtype)
        w = self.weight.detach()
        return w if dtype is None else w.to(dtype)

    # ------------------------------------------------------------------ LoRA
    @property
    def has_lora(self) -> bool:
        return self.lora_A is not None

    def add_lora(
        self,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Attach a LoRA adapter initialised as PEFT does (A: Kaiming-uniform, B: zeros), and freeze the base."""
        device = self.weight_nf4_packed.device if self.is_quantized else self.weight.device
        a = torch.empty(r, self.in_features, dtype=torch.float32)
        # PEFT: nn.init.kaiming_uniform_(A, a=sqrt(5)) -> bound = 1 / sqrt(fan_in)
        bound = 1.0 / math.sqrt(self.in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        self.lora_r, self.lora_alpha, self.lora_dropout = r, float(alpha), float(dropout)
        self.lora_scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        if self.weight is not None:
            self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W + scaling * B @ A`` computed in fp32, returned in ``dtype`` (the base weight if no adapter or disabled)."""
        w = self.base_weight(torch.float32).clone()
        if self.has_lora and self.adapter_enabled:
            w.addmm_(self.lora_B.detach().float(), self.lora_A.detach().float(), alpha=self.lora_scaling)
        return w.to(dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (Tensor): ``[..., in]``. Returns: Tensor ``[..., out]``."""
        use_lora = self.has_lora and self.adapter_enabled
        if not self.is_quantized and not use_lora:
            return F.linear(x, self.weight, self.bias)
        # The one LoRA path: the fused Function, here with a single projection (engine_kernels.lora_linear is its reference).
        return lora_projections(x, [Projection.from_module(self)], None, self.training)[0]

    def extra_repr(self) -> str:
        parts = [f"in={self.in_features}", f"out={self.out_features}", f"bias={self.bias is not None}"]
        if self.is_quantized:
            parts.append("nf4")
        if self.has_lora:
            parts.append(f"lora_r={self.lora_r}, alpha={self.lora_alpha:g}, dropout={self.lora_dropout:g}")
        return ", ".join(parts)


def _plain(modules: tuple[Linear, ...]) -> bool:
    """Dense base weights and no active adapter: ``F.linear`` is all there is to do."""
    return all(not m.is_quantized and not (m.has_lora and m.adapter_enabled) for m in modules)


def project(
    x: torch.Tensor, modules: tuple[Linear, ...], workspace: DequantWorkspace | None, training: bool
) -> tuple[torch.Tensor, ...]:
    """``x`` through several projections that share it (Q/K/V, or O alone) with one fused Function.

    One backward accumulates ``dx`` once; NF4 bases are dequantized into ``workspace``
    (see :mod:`engine_kernels.lora_fused`). Plain dense layers without adapters take ``F.linear``.
    """
    if _plain(modules):
        return tuple(m(x) for m in modules)
    return lora_projections(x, [Projection.from_module(m) for m in modules], workspace, training)


def glu_mlp(
    x: torch.Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    workspace: DequantWorkspace | None,
    training: bool,
    activation: str = "silu",
) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` as one fused Function (``h`` recomputed in backward, not saved);
    plain dense layers without adapters compose ``F.linear`` with the dispatched GLU op.

    Args:
        activation: ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU); see :func:`engine_kernels.glu_activation`.
    """
    if _plain((gate, up, down)):
        return down(glu_activation(activation)(gate(x), up(x)))
    projections = [Projection.from_module(m) for m in (gate, up, down)]
    return lora_mlp(x, *projections, workspace=workspace, training=training, activation=activation)


def _trainable_base(modules: tuple[Linear, ...]) -> bool:
    """A dense base weight or a bias that trains (full fine-tuning): the fused Functions treat bases as frozen."""
    return any(
        (m.weight is not None and m.weight.requires_grad) or (m.bias is not None and m.bias.requires_grad)
        for m in modules
    )


def tiled_glu_mlp(
    x: torch.Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    workspace: DequantWorkspace | None,
    training: bool,
    activation: str,
    tile_rows: int,
) -> torch.Tensor:
    """:func:`glu_mlp` computed in tiles of ``tile_rows`` rows (:func:`engine_kernels.tiled_mlp.tiled_lora_mlp`):
    only ``x`` is saved for backward and one tile's ``[tile_rows, intermediate]`` activations exist at a time.

    Frozen bases (dense or NF4) with or without adapters are tiled; a trainable base weight or bias (full
    fine-tuning) is not supported by the fused Functions and takes the untiled :func:`glu_mlp`.
    """
    modules = (gate, up, down)
    if _trainable_base(modules):
        return glu_mlp(x, gate, up, down, workspace, training, activation)
    projections = [Projection.from_module(m) for m in modules]
    return tiled_lora_mlp(
        x, *projections, workspace=workspace, training=training, tile_rows=tile_rows, activation=activation
    )
