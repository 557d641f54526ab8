"""Sparse mixture-of-experts block: a top-k router and grouped experts, with LoRA and NF4 on the experts.

Shapes: ``T`` tokens (``b * s``), ``H`` hidden size, ``E`` experts, ``I`` one expert's intermediate size, ``k``
experts per token, ``r`` LoRA rank.

The experts are stored as transformers 5 stores them: ``gate_up_proj [E, 2I, H]`` (gate rows first) and
``down_proj [E, H, I]``. A forward sorts the ``T * k`` (token, expert) pairs by expert and runs one grouped
matmul per projection (:func:`engine_kernels.grouped_gemm.grouped_mm`): no loop over tokens.

LoRA on the experts is PEFT's ``target_parameters`` form (``LoraConfig(target_parameters=["experts.gate_up_proj",
"experts.down_proj"])``): for a projection ``[E, out, in]``, ``lora_A [r * E, in]`` (expert ``e`` owns rows
``e*r:(e+1)*r``) and ``lora_B [out, r * E]`` (column ``j * E + e`` is rank ``j`` of expert ``e``), so expert ``e``'s
weight is ``W[e] + scaling * B_e @ A_e``. The adapter is applied low-rank (``x A_e^T B_e^T``), never merged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch._subclasses.fake_tensor import FakeTensor

from engine.errors import ConfigurationError
from engine.modules.linear import Linear, project
from engine_kernels.glu import glu_activation
from engine_kernels.grouped_gemm import grouped_mm, grouped_mm_nf4
from engine_kernels.lora_fused import DequantWorkspace
from engine_kernels.nf4 import NF4Weight, nf4_dequantize, nf4_quantize
from engine_kernels.tiled_mlp import auto_tile_rows

#: The experts' grouped projections, in registration order (PEFT wraps them in this order).
EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")
_NF4_FIELDS = ("packed", "absmax", "absmax_code", "absmax_scale", "absmax_offset")


def _planning(x: torch.Tensor) -> bool:
    """Whether ``x`` has no values (``meta``, or a fake tensor of the memory planner): routing cannot be read, so
    the rows are taken as split evenly over the experts."""
    return x.device.type == "meta" or isinstance(x, FakeTensor)


class Experts(nn.Module):
    """``E`` gated MLPs stored grouped: ``down_e(act(gate_e(x)) * up_e(x))`` for the tokens routed to expert ``e``.

    Args:
        num_experts, hidden_size, intermediate_size: ``E``, ``H``, ``I``.
        activation: the GLU activation (``"silu"``).

    Attributes:
        gate_up_proj (Parameter or None): ``[E, 2I, H]``; ``None`` once quantized to NF4.
        down_proj (Parameter or None): ``[E, H, I]``; ``None`` once quantized.
        lora (dict): per targeted projection, ``{"A": [r*E, in], "B": [out, r*E]}`` parameters (PEFT layout),
            registered as ``<proj>_lora_A`` / ``<proj>_lora_B``.
        lora_scaling (float): ``alpha / r`` (or ``alpha / sqrt(r)``).
        adapter_enabled (bool): when false the adapters are skipped (DPO's reference policy).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "silu",
                 device=None, dtype=None):
        super().__init__()
        e, h, i = num_experts, hidden_size, intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = e, h, i
        self.activation = activation
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h, device=device, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(e, h, i, device=device, dtype=dtype))
        self.lora_targets: tuple[str, ...] = ()
        self.lora_r = 0
        self.lora_alpha = 0.0
        self.lora_scaling = 0.0
        self.adapter_enabled = True
        self._nf4: dict[str, tuple[torch.Size, torch.dtype, int, bool]] = {}

    # ------------------------------------------------------------------ shapes
    def projection_shape(self, name: str) -> tuple[int, int]:
        """``(out, in)`` of one expert's ``name`` projection."""
        h, i = self.hidden_size, self.intermediate_size
        return {"gate_up_proj": (2 * i, h), "down_proj": (h, i)}[name]

    # ------------------------------------------------------------------ NF4 (QLoRA)
    def is_quantized(self, name: str) -> bool:
        return name in self._nf4

    def quantize_nf4_(self, name: str, weight: torch.Tensor | None = None, double_quant: bool = True,
                      blocksize: int = 64) -> None:
        """Store projection ``name`` as one NF4 tensor per expert slice (bitsandbytes' ``quantize_4bit`` of
        ``weight[e]``), as stacked buffers ``<name>_nf4_<field> [E, ...]``; frees the dense copy.

        Args:
            weight: ``[E, out, in]`` to quantize (default: the module's own parameter).
        """
        if self.is_quantized(name):
            return
        w = (getattr(self, name) if weight is None else weight).detach()
        slices = [nf4_quantize(w[x], blocksize=blocksize, double_quant=double_quant) for x in range(w.shape[0])]
        setattr(self, name, None)
        for field in _NF4_FIELDS:
            values = [getattr(q, field) for q in slices]
            stacked = None if values[0] is None else torch.stack(values)
            self.register_buffer(f"{name}_nf4_{field}", stacked, persistent=True)
        self._nf4[name] = (slices[0].shape, slices[0].dtype, blocksize, double_quant)

    def nf4_experts(self, name: str) -> list[NF4Weight]:
        """Projection ``name`` as one :class:`NF4Weight` view per expert."""
        shape, dtype, blocksize, _ = self._nf4[name]
        fields = {f: getattr(self, f"{name}_nf4_{f}") for f in _NF4_FIELDS}
        return [
            NF4Weight(
                packed=fields["packed"][x],
                absmax=fields["absmax"][x],
                shape=shape,
                dtype=dtype,
                blocksize=blocksize,
                absmax_code=None if fields["absmax_code"] is None else fields["absmax_code"][x],
                absmax_scale=None if fields["absmax_scale"] is None else fields["absmax_scale"][x],
                absmax_offset=None if fields["absmax_offset"] is None else fields["absmax_offset"][x],
            )
            for x in range(self.num_experts)
        ]

    def base_weight(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[E, out, in]`` base of projection ``name`` (dequantized if NF4), without adapters."""
        if self.is_quantized(name):
            _, stored, _, _ = self._nf4[name]
            return torch.stack([nf4_dequantize(q, dtype=dtype or stored) for q in self.nf4_experts(name)])
        w = getattr(self, name).detach()
        return w if dtype is None else w.to(dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        for name in EXPERT_PROJECTIONS:
            if self.is_quantized(name):
                return self._nf4[name][1]
            return getattr(self, name).dtype
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ LoRA
    @property
    def has_lora(self) -> bool:
        return bool(self.lora_targets)

    def lora_factors(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """``(lora_A [r*E, in], lora_B [out, r*E])`` of projection ``name`` (PEFT's layout)."""
        return getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B")

    def add_lora(self, names, r: int, alpha: float, use_rslora: bool = False,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> None:
        """Attach adapters to the projections ``names`` (A Kaiming-uniform as PEFT, B zeros); freeze the bases."""
        device = next(t for t in (*self.parameters(), *self.buffers()) if t is not None).device
        for name in names:
            out, inp = self.projection_shape(name)
            a = torch.empty(r * self.num_experts, inp, dtype=torch.float32)
            bound = 1.0 / math.sqrt(inp)  # PEFT: kaiming_uniform_(a=sqrt(5)) on an nn.Linear(in, r * E)
            a.uniform_(-bound, bound, generator=generator)
            self.register_parameter(f"{name}_lora_A", nn.Parameter(a.to(device=device, dtype=dtype)))
            self.register_parameter(
                f"{name}_lora_B", nn.Parameter(torch.zeros(out, r * self.num_experts, device=device, dtype=dtype))
            )
        self.lora_targets = tuple(n for n in EXPERT_PROJECTIONS if n in names or n in self.lora_targets)
        self.lora_r, self.lora_alpha = r, float(alpha)
        self.lora_scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        for name in EXPERT_PROJECTIONS:
            if getattr(self, name, None) is not None:
                getattr(self, name).requires_grad_(False)

    def lora_delta(self, name: str) -> torch.Tensor:
        """``scaling * B_e @ A_e`` for every expert: fp32 ``[E, out, in]`` (what merging adds)."""
        a, b = self.lora_factors(name)
        e, r = self.num_experts, self.lora_r
        a3 = a.detach().float().reshape(e, r, -1)
        b3 = b.detach().float().reshape(b.shape[0], r, e).permute(2, 0, 1)
        return torch.bmm(b3, a3) * self.lora_scaling

    def merged_weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W + scaling * B_e @ A_e`` per expert, computed in fp32, returned in ``dtype`` ``[E, out, in]``."""
        w = self.base_weight(name, torch.float32).clone()
        if name in self.lora_targets and self.adapter_enabled:
            w += self.lora_delta(name)
        return w.to(dtype)

    # ------------------------------------------------------------------ forward
    def _project(self, name: str, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        """Projection ``name`` of rows sorted by expert: ``x [N, in] -> [N, out]``."""
        if self.is_quantized(name):
            y = grouped_mm_nf4(x, self.nf4_experts(name), sizes)
        else:
            y = grouped_mm(x, getattr(self, name).to(x.dtype), sizes)
        if name in self.lora_targets and self.adapter_enabled:
            a, b = self.lora_factors(name)
            e, r = self.num_experts, self.lora_r
            a3 = a.to(x.dtype).reshape(e, r, a.shape[1])  # [E, r, in]
            b3 = b.to(x.dtype).reshape(b.shape[0], r, e).permute(2, 0, 1)  # [E, out, r]
            y = y + grouped_mm(grouped_mm(x, a3, sizes), b3, sizes) * self.lora_scaling
        return y

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Args:
            x (Tensor): ``[T, H]``.
            top_k_index (Tensor): int64 ``[T, k]``, the experts each token is routed to.
            top_k_weights (Tensor): float ``[T, k]``, their weights.

        Returns:
            Tensor ``[T, H]``: ``sum_j weights[t, j] * expert_{index[t, j]}(x[t])``.
        """
        t, k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        if _planning(x):  # memory planning: the grouped rows have the same size however tokens route
            order = torch.arange(t * k, device=x.device)
            per, extra = divmod(t * k, self.num_experts)
            sizes = tuple(per + (1 if g < extra else 0) for g in range(self.num_experts))
        else:
            order = torch.argsort(flat, stable=True)
            sizes = tuple(torch.bincount(flat, minlength=self.num_experts).tolist())  # one host copy per layer
        token = order // k
        rows = x.index_select(0, token)  # [T*k, H], sorted by expert
        gate, up = self._project("gate_up_proj", rows, sizes).chunk(2, dim=-1)
        h = glu_activation(self.activation)(gate, up)
        y = self._project("down_proj", h, sizes)
        weights = top_k_weights.reshape(-1).index_select(0, order)
        y = (y.float() * weights.float()[:, None]).to(x.dtype)
        return torch.zeros_like(x).index_add(0, token, y)

    def extra_repr(self) -> str:
        parts = [f"experts={self.num_experts}", f"hidden={self.hidden_size}", f"intermediate={self.intermediate_size}"]
        if self._nf4:
            parts.append("nf4")
        if self.has_lora:
            parts.append(f"lora_r={self.lora_r} on {', '.join(self.lora_targets)}")
        return ", ".join(parts)


class SparseMoeBlock(nn.Module):
    """Router + experts: ``x -> sum over the top-k experts of weight * expert(x)``.

    Routing as transformers computes it: ``p = softmax(gate(x))`` in fp32, the ``k`` largest ``p`` (ties broken
    as ``torch.topk`` does), renormalised to sum to 1 when ``norm_topk_prob``.

    Attributes:
        gate (Linear): the router ``[E, H]`` (LoRA-able: PEFT's ``target_parameters=["gate.weight"]``).
        experts (Experts): the grouped experts.
        tile_rows (int, "auto" or None): as :attr:`engine.models.transformer.MLP.tile_rows` (``FastModel.set_tiled_mlp``):
            a training forward over more tokens than this routes and runs the experts tile by tile, each tile
            recomputed in backward (``torch.utils.checkpoint``), so only the block's input is saved and one tile's
            grouped rows (``[rows * k, H]``, ``[rows * k, 2I]``, ...) exist at a time.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, norm_topk_prob: bool,
                 activation: str = "silu", device=None, dtype=None):
        super().__init__()
        self.tile_rows: int | str | None = None
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.gate = Linear(hidden_size, num_experts, False, device, dtype)
        self.experts = Experts(num_experts, hidden_size, intermediate_size, activation, device, dtype)

    def route(self, x: torch.Tensor, workspace: DequantWorkspace | None = None):
        """Args: x (Tensor): ``[T, H]``. Returns: ``(router_logits [T, E], top_k_weights fp32 [T, k],
        top_k_index [T, k])``."""
        logits = project(x, (self.gate,), workspace, self.training)[0]
        probs = F.softmax(logits.float(), dim=-1)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, index

    def forward(self, x: torch.Tensor, workspace: DequantWorkspace | None = None,
                router_logits: list | None = None) -> torch.Tensor:
        """Args:
            x (Tensor): ``[..., H]``.
            router_logits (list, optional): this layer's ``[T, E]`` router logits are appended to it.

        Returns:
            Tensor ``[..., H]``.
        """
        flat = x.reshape(-1, x.shape[-1])
        t = flat.shape[0]
        rows = auto_tile_rows(t) if self.tile_rows == "auto" else self.tile_rows
        if self.training and rows and t > rows and torch.is_grad_enabled():
            tiles = [
                checkpoint(self._tokens_forward, chunk, workspace, use_reentrant=False) for chunk in flat.split(rows)
            ]
            out, logits = torch.cat([o for o, _ in tiles]), torch.cat([g for _, g in tiles])
        else:
            out, logits = self._tokens_forward(flat, workspace)
        if router_logits is not None:
            router_logits.append(logits)
        return out.view_as(x)

    def _tokens_forward(self, flat: torch.Tensor, workspace: DequantWorkspace | None):
        """``flat [T, H] -> (out [T, H], router logits [T, E])``."""
        logits, weights, index = self.route(flat, workspace)
        return self.experts(flat, index, weights), logits


def load_balancing_loss(
    router_logits: list[torch.Tensor], num_experts: int, top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The auxiliary load-balancing loss of Switch Transformers, as transformers' Mixtral/Qwen3-MoE compute it.

    Over every layer's rows together (padding excluded by ``attention_mask``): ``f_e`` = share of top-k
    assignments that went to expert ``e`` (each row counts ``k`` times), ``P_e`` = mean routing probability of
    ``e``; the loss is ``E * sum_e f_e * P_e`` (1 for perfectly even routing; only ``P`` carries gradient).

    Args:
        router_logits: per sparse layer, ``[T, E]``.
        attention_mask (Tensor, optional): ``[b, s]`` with ``b * s == T``, 1 for real tokens.

    Returns:
        fp32 scalar.
    """
    if not router_logits:
        raise ConfigurationError("load_balancing_loss needs the router logits of at least one sparse layer")
    device = router_logits[0].device
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices  # [T, k]
        row_weight = torch.ones(probs.shape[0], device=device) if mask is None else mask
        counts = counts.index_add(0, chosen.reshape(-1), row_weight.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * row_weight[:, None]).sum(dim=0)
        rows = rows + row_weight.sum()
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))
