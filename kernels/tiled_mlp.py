"""The fused LoRA GLU MLP (SwiGLU or GeGLU) computed in tiles of rows, forward and backward ("tiled MLP").

Same math as :class:`~engine_kernels.lora_fused.LoRAMLPFunction` (see :mod:`engine_kernels.lora_fused`), applied to
``x [N, d]`` one tile of ``T`` rows at a time (the MLP is row-wise: row ``i`` of ``y`` depends on row ``i`` of
``x`` only)::

    y[t] = down(act(gate(x[t])) * up(x[t]))                      for each tile t = rows [k T, (k + 1) T)
    dx[t] = d y[t] / d x[t] (dy[t])        dA_i = sum_t dA_i[t]        dB_i = sum_t dB_i[t]

Forward runs each tile through ``LoRAMLPFunction`` without autograd and writes its rows into one
preallocated ``y [N, d_out]``. Backward recomputes each tile's forward *with* autograd (the fused Function,
so its own backward: ``h`` recomputed, the activation's backward, NF4 re-dequantized), takes
``torch.autograd.grad(y[t], [x[t], A_i, B_i], dy[t])``, writes ``dx[t]`` into one preallocated ``dx [N, d]``
and accumulates the LoRA gradients over the tiles in fp32 (cast to the parameters' dtype at the end).
LoRA dropout masks are drawn once for the whole ``x`` (as :func:`~engine_kernels.lora_fused.lora_mlp` draws them,
so the same generator state gives the same masks and the same result) and sliced per tile. The activation
(``"silu"``: SwiGLU, default; ``"gelu_tanh"``: GeGLU) is passed through to every tile (:mod:`engine_kernels.glu`).

Saved for backward: ``x [N, d]``, the dropout masks (bool ``[N, d]``, ``[N, d]``, ``[N, inter]``, only with
``p > 0``) and the LoRA ``A``/``B`` (parameters, referenced). Nothing of width ``intermediate``: the untiled
Function keeps ``g`` and ``u`` (plus the ``r``-wide LoRA activations), 65,632 bytes/token/layer for
Llama-3.1-8B in bf16, of which the tiled Function keeps ``x``'s 8,192 (1/8).

Memory per tile (alive only while that tile runs, then freed; one tile at a time in the whole model):
forward at most ``g``, ``u``, ``h`` and the tile output; backward the recomputed ``g``, ``u`` plus ``dh`` and
``dg``, ``du`` (``h`` is recomputed and freed before ``dg``/``du`` exist), about::

    tile_rows * (5 * intermediate + 2 * hidden) * bytes

e.g. Llama-3.1-8B, T = 8192, bf16: 1.2 GiB, once for the whole model, where the untiled MLP keeps ``g``, ``u``
(896 MiB per layer at N = 16384, 28 GiB for 32 layers) and its backward briefly holds the same five tensors
at ``[N, inter]`` (2.2 GiB). The PyTorch SwiGLU backward adds fp32 temporaries of the tile's shape; the Triton
kernel has none.

Cost: one extra forward of the MLP per training step (backward recomputes each tile), i.e. about a third
more MLP FLOPs, plus re-reading (NF4: dequantizing) the three base weights once per tile in forward and
twice per tile in backward (recomputation and gradient) instead of once in each. With gradient checkpointing the layer forward is recomputed
anyway; tiling then still cuts the peak of the recomputed layer's backward from ``[N, inter]`` tensors to
``[T, inter]`` ones, at the price of a third MLP forward.

Only frozen base weights (dense or NF4, through :class:`~engine_kernels.lora_fused.Projection`) are supported, with or
without LoRA: full fine-tuning (trainable dense weights) stays untiled, and :class:`Projection` rejects a
trainable base. ``N <= tile_rows`` calls the untiled :func:`~engine_kernels.lora_fused.lora_mlp` (identical result,
no overhead).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from engine_kernels.errors import ConfigurationError
from engine_kernels.glu import glu_ops
from engine_kernels.lora_fused import (
    DequantWorkspace,
    LoRAMLPFunction,
    Projection,
    from_2d,
    lora_grads_needed,
    prepare_inputs,
    lora_mlp,
)

__all__ = [
    "AUTO_TILES", "DEFAULT_TILE_ROWS", "MAX_TILE_ELEMENTS", "TiledMLPFunction", "auto_tile_rows", "default_tile_rows",
    "tiled_lora_mlp",
]

#: The smallest default tile (and the tile of models with ``hidden_size <= 512``): a ``[T, d] @ [d, inter]`` GEMM
#: with ``T >= 1024`` rows is compute-bound on current GPUs, so smaller tiles would mostly add overhead.
DEFAULT_TILE_ROWS = 1024
#: Upper bound of one default tile's ``[T, intermediate]`` tensor: 2**27 elements (256 MiB in bf16).
MAX_TILE_ELEMENTS = 2**27
#: Default tiles are a multiple of this many rows (GEMM-friendly).
TILE_ROW_MULTIPLE = 256


#: ``tiled_mlp="auto"`` cuts a sequence into about this many tiles (never below :data:`DEFAULT_TILE_ROWS` rows).
AUTO_TILES = 16


def auto_tile_rows(n_rows: int) -> int:
    """Rows per tile for ``tiled_mlp="auto"``: ``n_rows / 16`` rounded up to a multiple of 256, at least
    :data:`DEFAULT_TILE_ROWS`. The memory-lean choice for long contexts: a tile's activations are 1/16 of the
    untiled MLP's (about 11 KB per token for Llama-3.1-8B in bf16), and a sequence is never cut into more than
    16 tiles, so the per-tile overhead (re-reading the three weights) stays small next to the tile's GEMMs."""
    rows = math.ceil(n_rows / AUTO_TILES / TILE_ROW_MULTIPLE) * TILE_ROW_MULTIPLE
    return max(DEFAULT_TILE_ROWS, rows)


def default_tile_rows(hidden_size: int, intermediate_size: int) -> int:
    """Rows per tile for a model of these dimensions: ``2 * hidden_size`` rounded up to a multiple of 256,
    at least :data:`DEFAULT_TILE_ROWS`, at most ``MAX_TILE_ELEMENTS / intermediate_size`` (rounded down to a
    multiple of 256, never below :data:`DEFAULT_TILE_ROWS`).

    Why: each tile re-reads (NF4: re-dequantizes) the three base weights, ``3 * d * inter`` elements, while it
    reads and writes about ``3 * T * inter`` activation elements; the weight traffic relative to the activation
    traffic is ``d / T``, so ``T >= 2 d`` keeps it at most half (and the GEMMs of ``T >= 1024`` rows are
    compute-bound, hiding most of it). Tiles are kept as small as that allows because every tile's
    intermediates are the only ``[., inter]`` tensors alive, and the cap bounds them for very wide MLPs.
    Examples: SmolLM2-135M (576, 1536) -> 1280; Llama-3.2-1B (2048, 8192) -> 4096; Llama-3.1-8B
    (4096, 14336) -> 8192; Llama-3.1-70B (8192, 28672) -> 4608 (capped).
    """
    if hidden_size <= 0 or intermediate_size <= 0:
        raise ConfigurationError(
            f"hidden and intermediate sizes must be positive, got {hidden_size} and {intermediate_size}"
        )
    m = TILE_ROW_MULTIPLE
    rows = max(DEFAULT_TILE_ROWS, -(-2 * hidden_size // m) * m)
    cap = max(DEFAULT_TILE_ROWS, MAX_TILE_ELEMENTS // intermediate_size // m * m)
    return min(rows, cap)


def _check_tile_rows(tile_rows) -> int:
    if isinstance(tile_rows, bool) or not isinstance(tile_rows, int) or tile_rows <= 0:
        raise ConfigurationError(f"tile_rows must be a positive int, got {tile_rows!r}")
    return tile_rows


def _tile(tensors, start: int, stop: int, detach: bool = False) -> list[torch.Tensor | None]:
    """``(A, B, mask)`` per projection with each mask cut to rows ``[start, stop)`` (A/B detached if asked)."""
    out: list[torch.Tensor | None] = []
    for k, t in enumerate(tensors):
        if t is None:
            out.append(None)
        elif k % 3 == 2:  # a dropout mask [N, in_i]
            out.append(t[start:stop])
        else:
            out.append(t.detach() if detach else t)
    return out


#: Index of the first LoRA tensor among :class:`TiledMLPFunction`'s arguments.
_FIRST_TENSOR = 5


class TiledMLPFunction(torch.autograd.Function):
    """``y = down(act(gate(x)) * up(x))`` over ``x [N, d]`` in tiles of ``tile_rows`` rows; see the module docstring.

    ``forward(x, (gate, up, down), workspace, tile_rows, activation, a_g, b_g, m_g, a_u, b_u, m_u, a_d, b_d, m_d)``
    (the arguments of :class:`~engine_kernels.lora_fused.LoRAMLPFunction` plus ``tile_rows``; masks ``[N, in_i]`` or
    ``None``) returns ``y [N, d_out]``. Saves ``x``, the masks and the LoRA A/B; no ``[N, intermediate]`` tensor.
    """

    @staticmethod
    def forward(ctx, x, projs, workspace, tile_rows, activation, *tensors):
        n = x.shape[0]
        y = None
        with torch.no_grad():
            for start in range(0, n, tile_rows):
                stop = min(start + tile_rows, n)
                # Detached x and A/B: the inner Function sees nothing requiring grad and keeps nothing.
                x_t = x[start:stop].detach()
                y_t = LoRAMLPFunction.apply(x_t, projs, workspace, activation, *_tile(tensors, start, stop, True))
                if y is None:
                    y = y_t.new_empty((n, y_t.shape[1]))
                y[start:stop] = y_t
                del y_t  # this tile's g, u, h are already gone with the inner Function's ctx
        ctx.projs, ctx.workspace, ctx.tile_rows, ctx.activation = projs, workspace, tile_rows, activation
        ctx.save_for_backward(x, *tensors)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, *tensors = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_a, need_b = lora_grads_needed(ctx, 3, first=_FIRST_TENSOR)
        need = [flag for i in range(3) for flag in (need_a[i], need_b[i], False)]  # per flat tensor
        n, tile_rows = x.shape[0], ctx.tile_rows
        dx = torch.empty_like(x) if need_dx else None
        acc: list[torch.Tensor | None] = [None] * len(tensors)  # fp32 sums of dA/dB over the tiles
        for start in range(0, n, tile_rows):
            stop = min(start + tile_rows, n)
            with torch.enable_grad():
                x_t = x[start:stop].detach().requires_grad_(need_dx)
                flat = _tile(tensors, start, stop, True)
                for k, flag in enumerate(need):
                    if flag:
                        flat[k] = flat[k].requires_grad_(True)  # a fresh leaf (detached view of the parameter)
                y_t = LoRAMLPFunction.apply(x_t, ctx.projs, ctx.workspace, ctx.activation, *flat)
                inputs = ([x_t] if need_dx else []) + [flat[k] for k, flag in enumerate(need) if flag]
                grads = list(torch.autograd.grad(y_t, inputs, dy[start:stop]))
            del y_t  # frees the recomputed g, u of this tile
            if need_dx:
                dx[start:stop] = grads.pop(0)
            for k, flag in enumerate(need):
                if flag:
                    g = grads.pop(0)
                    acc[k] = g.float() if acc[k] is None else acc[k].add_(g)
        flat_grads = [None if g is None else g.to(t.dtype) for g, t in zip(acc, tensors)]
        return dx, None, None, None, None, *flat_grads


def tiled_lora_mlp(
    x: torch.Tensor,
    gate: Projection,
    up: Projection,
    down: Projection,
    workspace: DequantWorkspace | None = None,
    training: bool = False,
    generator: torch.Generator | None = None,
    tile_rows: int | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """GLU MLP ``down(act(gate(x)) * up(x))`` of ``x [..., d]`` -> ``[..., d_out]`` in tiles of rows.

    Same arguments and result as :func:`~engine_kernels.lora_fused.lora_mlp` (same dropout masks for the same
    ``generator`` state), with ``tile_rows`` rows per tile (``None``: :func:`default_tile_rows` of ``d`` and the
    gate's output width). Base weights must be frozen (dense or NF4), with or without LoRA; full fine-tuning is
    not tiled. When ``x`` has at most ``tile_rows`` rows this is :func:`~engine_kernels.lora_fused.lora_mlp` itself.
    ``activation``: ``"silu"`` (SwiGLU, the default) or ``"gelu_tanh"`` (GeGLU, Gemma); see :mod:`engine_kernels.glu`.

    Raises:
        ConfigurationError: ``tile_rows`` is not a positive int, or an unknown ``activation``.
    """
    glu_ops(activation)
    if tile_rows is None:
        tile_rows = default_tile_rows(x.shape[-1], gate.weight.shape[0])
    tile_rows = _check_tile_rows(tile_rows)
    rows = math.prod(x.shape[:-1])
    if rows <= tile_rows:
        return lora_mlp(x, gate, up, down, workspace, training, generator, activation)
    projections = (gate, up, down)
    x2, tensors = prepare_inputs(x, projections, training, generator)  # masks drawn once for all rows
    return from_2d(TiledMLPFunction.apply(x2, projections, workspace, tile_rows, activation, *tensors), x)
