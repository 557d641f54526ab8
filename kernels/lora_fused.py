"""Fused LoRA autograd Functions for a decoder layer: Q/K/V (one shared input), O, and the whole GLU MLP.

Each projection ``i`` (a :class:`Projection`) has a frozen base ``W_i [out_i, in]`` (dense, or NF4 and
dequantized on the fly), an optional frozen bias, an optional LoRA ``A_i [r, in]``, ``B_i [out_i, r]``,
scale ``s_i`` and dropout ``p_i`` on the LoRA branch only (as PEFT: each adapter has its own mask ``m_i``)::

    y_i  = x @ W_i.T + b_i + s_i * xa_i @ B_i.T,     xa_i = drop_i(x) @ A_i.T,   drop_i(x) = x * m_i / (1 - p_i)
    dxa_i = s_i * dy_i @ B_i        dB_i = s_i * dy_i.T @ xa_i        dA_i = dxa_i.T @ drop_i(x)
    dx    = sum_i dy_i @ W_i  +  sum_i (dxa_i @ A_i) * m_i / (1 - p_i)

:class:`LoRAProjectionsFunction` runs 1..n projections of one input (Q/K/V: 3, O: 1). ``dx`` is one buffer
accumulated with ``addmm_``; the LoRA ``A`` of the projections without dropout are concatenated, so their
``xa``, ``dA`` and LoRA part of ``dx`` take one matmul each. :class:`LoRAMLPFunction` runs
``y = down(act(gate(x)) * up(x))`` with the GLU activation named by ``activation`` (:mod:`engine_kernels.glu`:
``"silu"``, SwiGLU, the default; ``"gelu_tanh"``, GeGLU for Gemma); its backward recomputes ``h = act(g) * u``
(only when ``dA_down`` is needed) and applies the matching backward (:mod:`engine_kernels.swiglu` or
:mod:`engine_kernels.geglu`), e.g. for SwiGLU::

    dh = dy @ W_d (+ LoRA of down)    du = dh * silu(g)    dg = dh * u * sig(g) * (1 + g * (1 - sig(g)))

Base weights are never saved: they are dequantized (or cast) again in backward, each into a
:class:`DequantWorkspace` buffer when one is given. NF4 dequantization is :func:`engine_kernels.nf4.nf4_dequantize`
(the Triton kernel on CUDA / ``ENGINE_KERNELS=triton``). Frozen tensors get no gradient.

Saved for backward, bytes per token, Llama-3.1-8B dims (d 4096, q 4096, kv 1024, inter 14336, r 16, bf16),
LoRA on every projection; each tensor only when a gradient needs it (``x`` for ``dA``, ``xa`` for ``dB``)::

                fused (here)                        current modules (*)    autograd of the reference (**)
    QKV  p = 0  x, xa [3r]                 =  8288   8288                   8288
         p > 0  x, 3 masks [d], xa [3r]    = 20576   20576                  36960  (3 x*m/(1-p) instead of x)
    O    p = 0  x, xa [r]                  =  8224   8224                   8224
         p > 0  x, mask [q], xa [r]        = 12320   12320                  12320  (x*m/(1-p) instead of x)
    MLP  p = 0  x, g, u, xa [3r]           = 65632   94304  (+ h)           122976 (+ h, silu(g))
         p > 0  + masks [d], [d], [inter]  = 88160   116832 (+ h)           153696 (+ silu(g), h*m/(1-p), and
                                                                                    x*m/(1-p) twice instead of x)

(*) one :class:`~engine_kernels.lora_linear.LoRALinearFunction` per projection and :class:`~engine_kernels.swiglu.SwiGLUFunction`.
(**) ``lora_linear_reference`` + ``swiglu_reference``: a frozen base ``F.linear`` saves only its weight, the
LoRA ``F.linear`` its (dropped-out) input, ``x * m`` the bool mask, ``silu`` ``g``, the product ``silu(g)``
and ``u``. Counted once per storage (autograd saves references: the ``x`` shared by q/k/v is one tensor).
Masks are bool (1 byte), everything else 2 bytes. So for attention the fused Functions save the same as
autograd (less with dropout); the gains there are one ``dx`` buffer instead of n summed by autograd, one
LoRA-A matmul for all projections without dropout, and no dequantized weight kept alive: with an NF4 base the
reference's ``F.linear`` saves the dense ``[out, in]`` weight, 416 MiB per 8B layer in bf16. The MLP saves one
``[N, inter]`` tensor (``h``, 28672 B/token: 30% at p = 0) less than the current modules and two (plus the dropped-out
copies) less than autograd. LoRA A/B and base weights are per layer, saved by reference, not per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from engine_kernels.dispatch import select_backend
from engine_kernels.errors import ConfigurationError
from engine_kernels.lora_linear import lora_linear_reference
from engine_kernels.nf4 import NF4Weight, nf4_dequantize
from engine_kernels.glu import glu_ops

__all__ = [  # noqa: RUF022 (grouped by role)
    "DequantWorkspace", "Projection", "LoRAProjectionsFunction", "LoRAQKVFunction", "LoRAMLPFunction",
    "dropout_masks", "lora_projections", "lora_qkv", "lora_o", "lora_mlp", "reference_qkv", "reference_o", "reference_mlp",
    # shared with engine_kernels.tiled_mlp
    "from_2d", "lora_grads_needed", "prepare_inputs",
]


class DequantWorkspace:
    """Reusable flat buffers, one per ``(device, dtype)``, that base weights are dequantized (or cast) into.

    :meth:`get` returns a view of the buffer, grown (reallocated bigger, never shrunk) to the largest size
    asked for, so once it has seen the largest weight no call allocates. One buffer holds ONE weight at a
    time: the Functions here issue each weight's matmul before dequantizing the next weight into the same
    buffer. That is safe because all of it runs in order on one CUDA stream (and synchronously on CPU); do
    not share a workspace between streams or threads running concurrently. The owner (the model) keeps it.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @staticmethod
    def _key(dtype: torch.dtype, device: torch.device | str) -> tuple[torch.device, torch.dtype]:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device, dtype

    def get(self, shape: int | Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A contiguous ``shape`` (or ``[numel]``) view of the ``(device, dtype)`` buffer; contents undefined."""
        size = torch.Size((shape,) if isinstance(shape, int) else shape)
        key = self._key(dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < size.numel():
            buf = torch.empty(size.numel(), dtype=dtype, device=key[0])
            self._buffers[key] = buf
        return buf[: size.numel()].view(size)

    def buffer(self, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor | None:
        """The whole flat buffer of ``(device, dtype)``, or ``None`` before the first :meth:`get`."""
        return self._buffers.get(self._key(dtype, device))

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


@dataclass(frozen=True)
class Projection:
    """One projection's parameters: frozen base ``weight [out, in]`` (tensor or NF4), ``bias [out]``,
    LoRA ``lora_a [r, in]`` / ``lora_b [out, r]`` (both or neither), ``scaling`` and LoRA ``dropout_p``."""

    weight: torch.Tensor | NF4Weight
    bias: torch.Tensor | None = None
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scaling: float = 1.0
    dropout_p: float = 0.0

    def __post_init__(self):
        if (self.lora_a is None) != (self.lora_b is None):
            raise ConfigurationError("lora_a and lora_b must be given together")
        if (isinstance(self.weight, torch.Tensor) and self.weight.requires_grad) or (
            self.bias is not None and self.bias.requires_grad
        ):
            raise ConfigurationError("fused LoRA treats the base weight and bias as frozen; use F.linear to train them")
        if not 0.0 <= self.dropout_p < 1.0:
            raise ConfigurationError(f"lora dropout must be in [0, 1), got {self.dropout_p}")

    @classmethod
    def from_module(cls, linear) -> Projection:
        """From an :class:`engine.modules.linear.Linear` (duck-typed); the adapter is dropped when disabled."""
        weight = linear.nf4_weight() if linear.is_quantized else linear.weight
        if not (linear.has_lora and linear.adapter_enabled):
            return cls(weight, linear.bias)
        return cls(weight, linear.bias, linear.lora_A, linear.lora_B, linear.lora_scaling, linear.lora_dropout)

    @property
    def has_lora(self) -> bool:
        return self.lora_a is not None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0] if self.lora_a is not None else 0

    def dense(self, dtype: torch.dtype, workspace: DequantWorkspace | None = None) -> torch.Tensor:
        """The base weight ``[out, in]`` in ``dtype``: as is, else dequantized/cast into ``workspace`` (if given)."""
        w = self.weight
        if isinstance(w, NF4Weight):
            out = None if workspace is None else workspace.get(w.shape, dtype, w.device)
            return nf4_dequantize(w, dtype=dtype, out=out)
        if w.dtype == dtype:
            return w
        return w.to(dtype) if workspace is None else workspace.get(w.shape, dtype, w.device).copy_(w)

    def linear(self, x: torch.Tensor, workspace: DequantWorkspace | None) -> torch.Tensor:
        """``x @ W.T + bias`` for 2-D ``x``; the matmul is issued before ``workspace`` is reused."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense(x.dtype, workspace), bias)


# --------------------------------------------------------------------------- shared helpers


def _drop(x: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    """``x * m / (1 - p)`` (the reference's rounding order), or ``x`` without a mask."""
    return x if mask is None else x * mask / (1.0 - p)


def _groups(projs: Sequence[Projection], masks: Sequence[torch.Tensor | None]) -> tuple[list[int], list[int]]:
    """Indices of the LoRA projections without dropout (one concatenated A) and of those with a mask."""
    fused = [i for i, p in enumerate(projs) if p.has_lora and masks[i] is None]
    masked = [i for i, p in enumerate(projs) if p.has_lora and masks[i] is not None]
    return fused, masked


def _cat_a(projs: Sequence[Projection], idx: list[int], dtype: torch.dtype) -> torch.Tensor:
    """``cat(A_i for i in idx)`` in ``dtype``: ``[sum r, in]`` (a small copy, never a base weight)."""
    if len(idx) == 1:
        return projs[idx[0]].lora_a.to(dtype)
    return torch.cat([projs[i].lora_a.to(dtype) for i in idx])


def _shared_forward(x, projs, masks, workspace):
    """Outputs ``y_i [N, out_i]`` and the LoRA activations ``xa_i [N, r_i]`` (``None`` without LoRA)."""
    outs = [p.linear(x, workspace) for p in projs]  # each dequantized weight consumed before the next
    xas: list[torch.Tensor | None] = [None] * len(projs)
    fused, masked = _groups(projs, masks)
    if fused:
        xa_all = F.linear(x, _cat_a(projs, fused, x.dtype))  # one matmul for every A without dropout
        for i, chunk in zip(fused, xa_all.split([projs[i].rank for i in fused], dim=1)):
            xas[i] = chunk
    for i in masked:
        xas[i] = F.linear(_drop(x, masks[i], projs[i].dropout_p), projs[i].lora_a.to(x.dtype))
    for i in fused + masked:
        outs[i].addmm_(xas[i], projs[i].lora_b.to(x.dtype).t(), alpha=projs[i].scaling)
    return outs, xas


def _shared_backward(x, dys, projs, xas, masks, workspace, need_dx, need_a, need_b):
    """Gradients of :func:`_shared_forward`: ``dx`` (or ``None``) and ``[(dA_i, dB_i)]``.

    ``x`` is only read for ``dA`` (it may be ``None`` when no ``need_a``). ``dx`` is one buffer:
    ``dy_0 @ W_0``, then ``addmm_`` of every other base and of the LoRA terms.
    """
    dtype = dys[0].dtype
    dx = None
    if need_dx:
        for dy, p in zip(dys, projs):
            w = p.dense(dtype, workspace)
            dx = torch.mm(dy, w) if dx is None else dx.addmm_(dy, w)
    grads: list[tuple[torch.Tensor | None, torch.Tensor | None]] = [(None, None)] * len(projs)
    fused, masked = _groups(projs, masks)
    dxas = {i: torch.mm(dys[i], projs[i].lora_b.to(dtype)).mul_(projs[i].scaling) for i in fused + masked}
    d_as: dict[int, torch.Tensor] = {}
    if fused:
        dxa_all = dxas[fused[0]] if len(fused) == 1 else torch.cat([dxas[i] for i in fused], dim=1)
        if any(need_a[i] for i in fused):
            d_as.update(zip(fused, torch.mm(dxa_all.t(), x).split([projs[i].rank for i in fused])))
        if need_dx:
            dx.addmm_(dxa_all, _cat_a(projs, fused, dtype))
    for i in masked:
        p = projs[i]
        if need_a[i]:
            d_as[i] = torch.mm(dxas[i].t(), _drop(x, masks[i], p.dropout_p))
        if need_dx:
            dx.add_(torch.mm(dxas[i], p.lora_a.to(dtype)).div_(1.0 - p.dropout_p).mul_(masks[i]))
    for i in fused + masked:
        p = projs[i]
        d_a = d_as[i].to(p.lora_a.dtype) if need_a[i] else None
        d_b = torch.mm(dys[i].t(), xas[i]).mul_(p.scaling).to(p.lora_b.dtype) if need_b[i] else None
        grads[i] = (d_a, d_b)
    return dx, grads


def _flat_tensors(projs, masks) -> list[torch.Tensor | None]:
    """``(lora_a, lora_b, mask)`` of each projection, as separate Function arguments autograd sees."""
    return [t for p, m in zip(projs, masks) for t in (p.lora_a, p.lora_b, m)]


def _flat_grads(grads) -> list[torch.Tensor | None]:
    return [g for d_a, d_b in grads for g in (d_a, d_b, None)]


def lora_grads_needed(ctx, n: int, first: int = 3) -> tuple[list[bool], list[bool]]:
    """``needs_input_grad`` of each projection's A and B (arguments laid out by :func:`_flat_tensors`)."""
    flags = ctx.needs_input_grad
    return [flags[first + 3 * i] for i in range(n)], [flags[first + 3 * i + 1] for i in range(n)]


def _needs_dh(ctx) -> bool:
    """Whether the MLP backward needs ``dh`` (for ``dx`` or a gate/up LoRA gradient)."""
    flags = ctx.needs_input_grad
    first = _MLP_FIRST_TENSOR
    return flags[0] or any(flags[first : first + 6 : 3]) or any(flags[first + 1 : first + 6 : 3])


def _if(t: torch.Tensor | None, needed: bool) -> torch.Tensor | None:
    """``t`` when backward needs it, else ``None`` (not saved)."""
    return t if needed else None


# --------------------------------------------------------------------------- autograd Functions


class LoRAProjectionsFunction(torch.autograd.Function):
    """1..n LoRA projections of one input ``x [N, in]`` (Q/K/V, or O alone); see the module docstring.

    ``forward(x, projs, workspace, a_0, b_0, m_0, a_1, ...)`` returns ``(y_0 [N, out_0], ...)``. Saves ``x``,
    ``xa_i`` (when needed) and the masks; the base weights by reference (on ``ctx``), dequantized again in backward.
    """

    @staticmethod
    def forward(ctx, x, projs, workspace, *tensors):
        masks = tensors[2::3]
        outs, xas = _shared_forward(x, projs, masks, workspace)
        need_a, need_b = lora_grads_needed(ctx, len(projs))
        ctx.projs, ctx.workspace = projs, workspace
        ctx.save_for_backward(_if(x, any(need_a)), *tensors, *map(_if, xas, need_b))
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *dys):
        n = len(ctx.projs)
        x, *rest = ctx.saved_tensors
        masks, xas = rest[2 : 3 * n : 3], rest[3 * n :]
        need_a, need_b = lora_grads_needed(ctx, n)
        dx, grads = _shared_backward(
            x, dys, ctx.projs, xas, masks, ctx.workspace, ctx.needs_input_grad[0], need_a, need_b
        )
        return dx, None, None, *_flat_grads(grads)


#: Q, K and V are three projections of one input: the generic Function with three.
LoRAQKVFunction = LoRAProjectionsFunction


#: Index of the first LoRA tensor among :class:`LoRAMLPFunction`'s arguments (after x, projs, workspace, activation).
_MLP_FIRST_TENSOR = 4


class LoRAMLPFunction(torch.autograd.Function):
    """``y = down(act(gate(x)) * up(x))`` with LoRA on each; see the module docstring.

    ``forward(x, (gate, up, down), workspace, activation, a_g, b_g, m_g, a_u, b_u, m_u, a_d, b_d, m_d)``;
    ``activation`` is a name of :data:`engine_kernels.glu.GLU_ACTIVATIONS` (``"silu"``, ``"gelu_tanh"``). Saves ``x``,
    ``g``, ``u``, the ``xa``'s and masks, not ``h`` (recomputed from ``g`` and ``u`` when ``dA_down`` needs it).
    """

    @staticmethod
    def forward(ctx, x, projs, workspace, activation, *tensors):
        act = glu_ops(activation)
        masks = tensors[2::3]
        (g, u), xas_gu = _shared_forward(x, projs[:2], masks[:2], workspace)
        h = act.forward(g, u)
        (y,), (xa_d,) = _shared_forward(h, projs[2:], masks[2:], workspace)
        need_a, need_b = lora_grads_needed(ctx, 3, first=_MLP_FIRST_TENSOR)
        need_gu = _needs_dh(ctx) or need_a[2]  # for dg/du, or to recompute h for dA_down
        ctx.projs, ctx.workspace, ctx.act = projs, workspace, act
        ctx.save_for_backward(
            _if(x, any(need_a[:2])), _if(g, need_gu), _if(u, need_gu), *tensors, *map(_if, [*xas_gu, xa_d], need_b)
        )
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, g, u, *rest = ctx.saved_tensors
        masks, xas = rest[2:9:3], rest[9:]
        gate, up, down = ctx.projs
        need_a, need_b = lora_grads_needed(ctx, 3, first=_MLP_FIRST_TENSOR)
        need_dh = _needs_dh(ctx)
        h = ctx.act.forward(g, u) if need_a[2] and down.has_lora else None  # recomputed, never saved
        dh, grads_d = _shared_backward(
            h, [dy], [down], xas[2:], masks[2:], ctx.workspace, need_dh, need_a[2:], need_b[2:]
        )
        del h
        grads_gu = [(None, None)] * 2
        dx = None
        if need_dh:
            dg, du = ctx.act.backward(dh, g, u)
            del dh
            dx, grads_gu = _shared_backward(
                x, [dg, du], [gate, up], xas[:2], masks[:2], ctx.workspace,
                ctx.needs_input_grad[0], need_a[:2], need_b[:2],
            )
        return dx, None, None, None, *_flat_grads(grads_gu + grads_d)


# --------------------------------------------------------------------------- public API


def dropout_masks(
    x: torch.Tensor, projections: Sequence[Projection], training: bool, generator: torch.Generator | None = None
) -> tuple[torch.Tensor | None, ...]:
    """Bool keep-masks ``[..., in_i]`` (``x``'s leading dims), one per projection with LoRA and ``p > 0``
    when ``training`` (else ``None``), drawn in order. With the same ``generator`` state the public
    functions draw the very same masks, so a test can hand them to the ``reference_*`` oracles."""
    masks = []
    for p in projections:
        if not (training and p.has_lora and p.dropout_p > 0.0):
            masks.append(None)
            continue
        m = torch.empty(*x.shape[:-1], p.in_features, dtype=torch.bool, device=x.device)
        masks.append(m.bernoulli_(1.0 - p.dropout_p, generator=generator))
    return tuple(masks)


def _to_2d(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.dim() == 2 else t.reshape(-1, t.shape[-1])


def from_2d(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y [N, out]`` back to ``[..., out]`` with ``x``'s leading dims (no view node for 2-D ``x``)."""
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def prepare_inputs(x, projections, training, generator):
    select_backend("lora_linear", x.device)  # records the path; inner ops dispatch themselves
    masks = [_to_2d(m) for m in dropout_masks(x, projections, training, generator)]
    return _to_2d(x), _flat_tensors(projections, masks)


def lora_projections(
    x: torch.Tensor,
    projections: Sequence[Projection],
    workspace: DequantWorkspace | None = None,
    training: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, ...]:
    """Projections of one input ``x [..., in]`` -> ``(y_i [..., out_i], ...)`` in ``x.dtype``.

    ``workspace=None`` dequantizes into a fresh tensor per call; ``training`` turns LoRA dropout on.
    """
    projections = tuple(projections)
    x2, tensors = prepare_inputs(x, projections, training, generator)
    outs = LoRAProjectionsFunction.apply(x2, projections, workspace, *tensors)
    return tuple(from_2d(y, x) for y in outs)


def lora_qkv(x, q: Projection, k: Projection, v: Projection, workspace=None, training=False, generator=None):
    """``(q [..., out_q], k [..., out_k], v [..., out_v])`` of ``x [..., d]``; one ``dx`` in backward."""
    return lora_projections(x, (q, k, v), workspace, training, generator)


def lora_o(x, o: Projection, workspace=None, training=False, generator=None) -> torch.Tensor:
    """The output projection ``[..., out]`` of ``x [..., in]``."""
    return lora_projections(x, (o,), workspace, training, generator)[0]


def lora_mlp(
    x: torch.Tensor,
    gate: Projection,
    up: Projection,
    down: Projection,
    workspace: DequantWorkspace | None = None,
    training: bool = False,
    generator: torch.Generator | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """GLU MLP ``down(act(gate(x)) * up(x))`` of ``x [..., d]`` -> ``[..., d_out]``.

    ``activation``: ``"silu"`` (SwiGLU, the default) or ``"gelu_tanh"`` (GeGLU, Gemma); see :mod:`engine_kernels.glu`.

    Raises:
        ConfigurationError: an unknown ``activation``.
    """
    glu_ops(activation)  # an unknown name fails here, before any work
    projections = (gate, up, down)
    x2, tensors = prepare_inputs(x, projections, training, generator)
    # The down mask covers h [..., inter]: dropout_masks drew it with down.in_features columns.
    return from_2d(LoRAMLPFunction.apply(x2, projections, workspace, activation, *tensors), x)


# --------------------------------------------------------------------------- autograd oracles


def _reference(x, p: Projection, mask) -> torch.Tensor:
    return lora_linear_reference(x, p.weight, p.bias, p.lora_a, p.lora_b, p.scaling, mask, p.dropout_p)


def reference_qkv(x, q, k, v, masks=(None, None, None)):
    """Plain-autograd composition of :func:`lora_qkv` (``masks`` from :func:`dropout_masks`)."""
    return tuple(_reference(x, p, m) for p, m in zip((q, k, v), masks))


def reference_o(x, o, mask=None):
    """Plain-autograd composition of :func:`lora_o`."""
    return _reference(x, o, mask)


def reference_mlp(x, gate, up, down, masks=(None, None, None), activation="silu"):
    """Plain-autograd composition of :func:`lora_mlp`: two LoRA linears, the activation's reference
    (``swiglu_reference`` or ``geglu_reference``), one more LoRA linear."""
    h = glu_ops(activation).reference(_reference(x, gate, masks[0]), _reference(x, up, masks[1]))
    return _reference(h, down, masks[2])
