"""Flash attention (forward and hand-written backward) over packed variable-length documents, in Triton.

Packing (as ``flash_attn_varlen_func``): the documents of a batch lie one after another along one token
dimension, ``q [total, n_heads, d]``, ``k, v [total, n_kv_heads, d]``; ``cu_seqlens`` (int32 ``[n_docs + 1]``,
``cu_seqlens[0] == 0``, non-decreasing) holds the boundaries, document ``b`` being tokens
``cu_seqlens[b]:cu_seqlens[b + 1]``. Positions restart at 0 in every document and no token attends across
a boundary. Query ``i`` of a document sees key ``j`` of the same document when ``j <= i`` (causal) and
``j > i - window`` (sliding window: the ``window`` most recent keys, itself included). Query head ``h``
reads KV head ``h // (n_heads // n_kv_heads)`` (GQA, MQA). ``max_seqlen`` (the longest document) sizes the grid;
tokens past ``cu_seqlens[-1]`` get zero output and gradients.

Forward, per block of queries, an online softmax over the visible key blocks (fp32 statistics)::

    s_j = scale * q . k_j
    m'  = max(m, max_j s_j),   alpha = exp(m - m')
    l'  = alpha * l + sum_j exp(s_j - m')
    acc'= alpha * acc + sum_j exp(s_j - m') v_j
    out = acc / l,             lse = m + log(l)

(in base 2, ``log2(e)`` folded into the scale). Key blocks past the causal limit or before the window start
are never visited, so the cost is ``sum_b n_b^2 / 2`` (``sum_b n_b * window`` with a window).

Backward, with ``P = exp(S - lse)`` recomputed from Q, K and the saved LSE (never stored)::

    delta_i = sum_d dO_i * O_i                     (preprocess kernel)
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta)
    dQ = scale * dS K,             dK = scale * dS^T Q

As in FlashAttention-2 and Triton's fused-attention tutorial, one kernel owns a key block and walks the query
blocks that can see it (dK, dV), another owns a query block and walks its key blocks (dQ): no atomics. The
dK/dV program loops over all query heads of its KV head, so GQA gradients are summed in registers, without
an fp32 buffer per query head.

Saved for backward: Q, K, V (the inputs, no copies), O and the fp32 LSE ``[n_heads, total]``; beyond the
inputs that is ``n_heads * (2 * d + 4)`` bytes per token in bf16 (8320 B for 32 heads of 128), never the
``[n, n]`` probabilities. The backward allocates delta (fp32, ``4 * n_heads`` B per token) and the gradients.

Score soft-capping (Gemma 2, ``softcap = c``, constexpr ``HAS_SOFTCAP``): the scaled scores are capped before
the mask and the softmax, ``s = c * tanh(scale * q . k / c)`` (``tanh`` from ``exp``, :func:`engine_kernels._triton.tanh`);
the backward recomputes ``t = tanh(.)`` with ``P`` and multiplies ``dS`` by ``1 - t^2`` before ``dQ`` and ``dK``.

Head dims 16..256: tiles are ``BLOCK_D = next_power_of_2(d)`` wide with the padded columns masked (80, 96 -> 128;
Phi-3.5-mini's 96 runs that way); ``d`` is a compile-time constant (one compilation per model). Dots take 16-bit inputs with fp32 accumulation;
fp32 inputs multiply in full fp32 (not TF32). Tiles per head dim: :func:`_launch_config`.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from engine_kernels._triton import (
    AuditLaunch,
    cdiv,
    dtype_signature,
    interpreting,
    jit,
    launchable,
    next_power_of_2,
    tanh,
    tl,
)

#: Head dims the kernels take: ``BLOCK_D = next_power_of_2(head_dim)`` with the padded columns masked.
MAX_HEAD_DIM = 256
MIN_HEAD_DIM = 16


def flash_attention_reference(q, k, v, cu_seqlens, *, scale, causal=True, sliding_window=None, softcap=None):
    """Plain softmax attention document by document, in fp32 (the oracle; autograd does the backward); with
    ``softcap`` the scaled scores are ``softcap * tanh(scores / softcap)`` before the mask.

    Shapes as :func:`flash_attention_varlen`; returns ``[total, n_heads, d]`` in ``q``'s dtype.
    """
    group = q.shape[1] // k.shape[1]
    bounds = [int(b) for b in cu_seqlens.tolist()]
    outputs = [q.new_zeros((0, q.shape[1], v.shape[2]))]
    for start, end in itertools.pairwise(bounds):
        qd = q[start:end].float().transpose(0, 1)  # [h, n, d]
        kd = k[start:end].float().repeat_interleave(group, dim=1).transpose(0, 1)
        vd = v[start:end].float().repeat_interleave(group, dim=1).transpose(0, 1)
        i = torch.arange(end - start, device=q.device)[:, None]
        j = i.T
        hidden = (j > i) if causal else torch.zeros_like(j > i)
        if sliding_window is not None:
            hidden |= j <= i - sliding_window
        scores = (qd @ kd.transpose(1, 2)) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(hidden, float("-inf"))
        outputs.append((scores.softmax(-1) @ vd).transpose(0, 1).to(q.dtype))
    return torch.cat(outputs)


# --------------------------------------------------------------------------- Triton kernels


@jit
def _doc_bounds(CU_SEQLENS, doc):
    """``(first token (int64), length)`` of document ``doc``."""
    start = tl.load(CU_SEQLENS + doc)
    return start.to(tl.int64), tl.load(CU_SEQLENS + doc + 1) - start


@jit
def _load_tile(base, rows, n_rows, stride, cols, n_cols):
    """``[len(rows), len(cols)]`` tile of a row-strided matrix at ``base``; zero outside ``n_rows x n_cols``."""
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return tl.load(base + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@jit
def _store_tile(base, tile, rows, n_rows, stride, cols, n_cols):
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    tl.store(base + rows[:, None] * stride + cols[None, :], tile.to(base.dtype.element_ty), mask=mask)


@jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in fp32. ``UPCAST`` (interpreter only: it multiplies bf16 as its uint16 storage)
    multiplies the operands' exact fp32 values instead, as the GPU's bf16 MMA does."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@jit
def _scores(qk, sm_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """``(s, t)``: the scores in base 2, ``s = log2(e) * scale * qk``, or with ``HAS_SOFTCAP``
    ``s = log2(e) * softcap * t`` with ``t = tanh(scale * qk / softcap)`` (``t`` is for the backward; without
    a cap it is ``s`` itself, unused)."""
    if HAS_SOFTCAP:
        t = tanh(qk * (sm_scale / softcap))
        s = t * (softcap * 1.4426950408889634)
    else:
        s = qk * (sm_scale * 1.4426950408889634)
        t = s
    return s, t


@jit
def _visible(q_pos, k_pos, seqlen, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Mask of visible (query, key) pairs from broadcastable in-document positions (any orientation)."""
    mask = (q_pos < seqlen) & (k_pos < seqlen)
    if CAUSAL:
        mask = mask & (k_pos <= q_pos)
    if WINDOW:
        mask = mask & (k_pos > q_pos - window)
    return mask


@jit
def _key_range(start_m, seqlen, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """``[lo, hi)`` of the keys that queries ``start_m .. start_m + BLOCK_M - 1`` may see (lo block-aligned)."""
    lo = 0
    hi = seqlen
    if CAUSAL:
        hi = tl.minimum(seqlen, start_m + BLOCK_M)
    if WINDOW:
        lo = tl.maximum(start_m - window + 1, 0) // BLOCK_N * BLOCK_N
    return lo, hi


@jit
def _query_range(start_n, seqlen, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """``[lo, hi)`` of the queries that may see keys ``start_n .. start_n + BLOCK_N - 1`` (lo block-aligned)."""
    lo = 0
    hi = seqlen
    if CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
    if WINDOW:
        hi = tl.minimum(seqlen, start_n + BLOCK_N - 1 + window)
    return lo, hi


@jit
def _flash_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total, group, window, sm_scale, softcap,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Program ``(query block, doc, head)``: ``O [BLOCK_M, d]`` by online softmax, and the rows' LSE."""
    start_m = tl.program_id(0) * BLOCK_M
    doc = tl.program_id(1)
    head = tl.program_id(2)
    seq_start, seqlen = _doc_bounds(CU_SEQLENS, doc)
    if start_m >= seqlen:
        return
    kv_head = head // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + seq_start * stride_qt + head * stride_qh, offs_m, seqlen, stride_qt, offs_d, HEAD_DIM)
    k_base = K + seq_start * stride_kt + kv_head * stride_kh
    v_base = V + seq_start * stride_vt + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a row with no key in a block stays NaN-free
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(start_m, seqlen, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, seqlen, stride_kt, offs_d, HEAD_DIM)
        v = _load_tile(v_base, offs_n, seqlen, stride_vt, offs_d, HEAD_DIM)
        s, _ = _scores(_dot(q, tl.trans(k), PRECISION, UPCAST_DOT), sm_scale, softcap, HAS_SOFTCAP)
        s = tl.where(_visible(offs_m[:, None], offs_n[None, :], seqlen, window, CAUSAL, WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST_DOT)
        m_i = m_new
    l_i = tl.where(l_i > 0.0, l_i, 1.0)  # rows past the document end (never stored)
    _store_tile(O + seq_start * stride_ot + head * stride_oh, acc / l_i[:, None], offs_m, seqlen, stride_ot,
                offs_d, HEAD_DIM)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log
    tl.store(LSE + head.to(tl.int64) * total + seq_start + offs_m, lse, mask=offs_m < seqlen)


@jit
def _flash_bwd_preprocess_kernel(
    O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, total,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Program ``(token block, head)``: ``delta [h, t] = sum_d dO * O`` in fp32."""
    head = tl.program_id(1)
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + head * stride_oh, offs_t, total, stride_ot, offs_d, HEAD_DIM).to(tl.float32)
    do = _load_tile(DO + head * stride_doh, offs_t, total, stride_dot, offs_d, HEAD_DIM).to(tl.float32)
    tl.store(DELTA + head.to(tl.int64) * total + offs_t, tl.sum(o * do, 1), mask=offs_t < total)


@jit
def _flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    total, group, window, sm_scale, softcap,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Program ``(key block, doc, kv head)``: ``dK, dV [BLOCK_N, d]`` summed over the group's query heads."""
    start_n = tl.program_id(0) * BLOCK_N
    doc = tl.program_id(1)
    kv_head = tl.program_id(2)
    seq_start, seqlen = _doc_bounds(CU_SEQLENS, doc)
    if start_n >= seqlen:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + seq_start * stride_kt + kv_head * stride_kh, offs_n, seqlen, stride_kt, offs_d, HEAD_DIM)
    v = _load_tile(V + seq_start * stride_vt + kv_head * stride_vh, offs_n, seqlen, stride_vt, offs_d, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, hi = _query_range(start_n, seqlen, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for g in range(group):
        head = kv_head * group + g
        q_base = Q + seq_start * stride_qt + head * stride_qh
        do_base = DO + seq_start * stride_dot + head * stride_doh
        rows = head.to(tl.int64) * total + seq_start
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_tile(q_base, offs_m, seqlen, stride_qt, offs_d, HEAD_DIM)
            do = _load_tile(do_base, offs_m, seqlen, stride_dot, offs_d, HEAD_DIM)
            lse = tl.load(LSE + rows + offs_m, mask=offs_m < seqlen, other=0.0)
            delta = tl.load(DELTA + rows + offs_m, mask=offs_m < seqlen, other=0.0)
            st, tt = _scores(_dot(k, tl.trans(q), PRECISION, UPCAST_DOT), sm_scale, softcap, HAS_SOFTCAP)  # S^T
            pt = tl.exp2(st - lse[None, :] * 1.4426950408889634)
            pt = tl.where(_visible(offs_m[None, :], offs_n[:, None], seqlen, window, CAUSAL, WINDOW), pt, 0.0)
            dv += _dot(pt.to(do.dtype), do, PRECISION, UPCAST_DOT)
            dpt = _dot(v, tl.trans(do), PRECISION, UPCAST_DOT)
            dst = pt * (dpt - delta[None, :])
            if HAS_SOFTCAP:
                dst = dst * (1.0 - tt * tt)  # through the cap: d(c tanh(x / c)) / dx
            dk += _dot(dst.to(q.dtype), q, PRECISION, UPCAST_DOT)
    _store_tile(DK + seq_start * stride_dkt + kv_head * stride_dkh, dk * sm_scale, offs_n, seqlen, stride_dkt,
                offs_d, HEAD_DIM)
    _store_tile(DV + seq_start * stride_dvt + kv_head * stride_dvh, dv, offs_n, seqlen, stride_dvt, offs_d, HEAD_DIM)


@jit
def _flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    total, group, window, sm_scale, softcap,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Program ``(query block, doc, head)``: ``dQ [BLOCK_M, d]`` over the key blocks the queries see."""
    start_m = tl.program_id(0) * BLOCK_M
    doc = tl.program_id(1)
    head = tl.program_id(2)
    seq_start, seqlen = _doc_bounds(CU_SEQLENS, doc)
    if start_m >= seqlen:
        return
    kv_head = head // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + seq_start * stride_qt + head * stride_qh, offs_m, seqlen, stride_qt, offs_d, HEAD_DIM)
    do = _load_tile(DO + seq_start * stride_dot + head * stride_doh, offs_m, seqlen, stride_dot, offs_d, HEAD_DIM)
    rows = head.to(tl.int64) * total + seq_start
    lse = tl.load(LSE + rows + offs_m, mask=offs_m < seqlen, other=0.0)
    delta = tl.load(DELTA + rows + offs_m, mask=offs_m < seqlen, other=0.0)
    k_base = K + seq_start * stride_kt + kv_head * stride_kh
    v_base = V + seq_start * stride_vt + kv_head * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(start_m, seqlen, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, seqlen, stride_kt, offs_d, HEAD_DIM)
        v = _load_tile(v_base, offs_n, seqlen, stride_vt, offs_d, HEAD_DIM)
        s, t = _scores(_dot(q, tl.trans(k), PRECISION, UPCAST_DOT), sm_scale, softcap, HAS_SOFTCAP)
        p = tl.exp2(s - lse[:, None] * 1.4426950408889634)
        p = tl.where(_visible(offs_m[:, None], offs_n[None, :], seqlen, window, CAUSAL, WINDOW), p, 0.0)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST_DOT)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST_DOT)
    _store_tile(DQ + seq_start * stride_dqt + head * stride_dqh, dq * sm_scale, offs_m, seqlen, stride_dqt,
                offs_d, HEAD_DIM)


# --------------------------------------------------------------------------- launch configuration


class KernelConfig(NamedTuple):
    """Tile and schedule of one kernel: ``block_m`` queries (tokens for the preprocess) x ``block_n`` keys."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


class LaunchConfig(NamedTuple):
    """The four kernels' configurations for one head dim and dtype."""

    forward: KernelConfig
    preprocess: KernelConfig
    dkdv: KernelConfig
    dq: KernelConfig


def _launch_config(head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """Tiles, warps and stages that fit 99 KiB of shared memory (sm_86/89) and compile without register spills
    on sm_80/86/89/90 (``python -m engine_kernels.audit``); the kernels need ~170-250 registers per thread.

    16-bit inputs, ``(block_m, block_n, warps, stages)``: forward 64 x 64 with 4 warps at ``BLOCK_D = 64``,
    64 x 32 with 8 warps at ``BLOCK_D = 128`` (d = 80, 96, 128); dK/dV 32 queries x 32 keys with 8 warps (it
    holds K, V, dK and dV of its key block); dQ like the forward but 32 keys wide. ``BLOCK_D = 256`` (Gemma):
    :data:`_LARGE_HEAD_DIM` (32-query blocks). Two pipeline stages. fp32 inputs (tests, debugging) take 16-32 wide
    tiles.
    """
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"flash attention supports head_dim {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, got {head_dim}")
    preprocess = KernelConfig(32, 1, 4, 1)
    dkdv = KernelConfig(32, 32, 8, 2)
    if dtype == torch.float32:  # FMA dots (no TF32): small tiles keep them spill-free
        return LaunchConfig(KernelConfig(16, 16, 4, 2), preprocess, KernelConfig(32, 16, 8, 2),
                            KernelConfig(16, 32, 4, 2))
    if next_power_of_2(head_dim) <= 64:
        return LaunchConfig(KernelConfig(64, 64, 4, 2), preprocess, dkdv, KernelConfig(64, 32, 4, 2))
    if next_power_of_2(head_dim) <= 128:
        return LaunchConfig(KernelConfig(64, 32, 8, 2), preprocess, dkdv, KernelConfig(64, 32, 8, 2))
    return LaunchConfig(*_LARGE_HEAD_DIM)


#: Tiles of ``BLOCK_D = 256`` (Gemma's head_dim 256), 16-bit inputs: 32 queries per forward and dQ program (32 keys
#: per step), 32 queries x 16 keys for dK/dV, 16 tokens for the preprocess. A query block keeps its ``[rows, 256]``
#: Q tile in registers for the whole loop, so the 64-query tiles of d <= 128 reach the 255-register limit and spill on
#: sm_90 (forward with a window) and sm_80 (dQ with a softcap); these compile without spills on sm_80..sm_90.
_LARGE_HEAD_DIM = (KernelConfig(32, 32, 8, 2), KernelConfig(16, 1, 4, 1), KernelConfig(32, 16, 8, 2),
                   KernelConfig(32, 32, 8, 2))


def _dot_options(dtype: torch.dtype, interpreted: bool | None = None) -> dict[str, object]:
    """``PRECISION``: fp32 inputs multiply in full fp32 (``ieee``), not TF32 (16-bit inputs are unaffected).
    ``UPCAST_DOT``: bf16 operands go to fp32 before ``tl.dot`` under the interpreter (see :func:`_dot`)."""
    interpreted = interpreting() if interpreted is None else interpreted
    return {"PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "UPCAST_DOT": interpreted and dtype == torch.bfloat16}


def _window(sliding_window: int | None, causal: bool) -> int:
    """The window as the kernels take it (0: none)."""
    if sliding_window is None:
        return 0
    if sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if not causal:
        raise ValueError("sliding_window needs causal=True")
    return int(sliding_window)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int]:
    return t.stride(0), t.stride(1)


def _softcap(softcap: float | None) -> float:
    """The cap as the kernels take it (``HAS_SOFTCAP`` is ``softcap is not None``; 1.0 when unused)."""
    if softcap is None:
        return 1.0
    if not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    return float(softcap)


def flash_attention_forward(q, k, v, cu_seqlens, max_seqlen, scale, causal=True, sliding_window=None, config=None,
                            softcap=None):
    """Launch the forward kernel.

    Args:
        q (Tensor): ``[total, n_heads, d]``; k, v (Tensor): ``[total, n_kv_heads, d]`` (last dim contiguous).
        cu_seqlens (Tensor): int32 ``[n_docs + 1]`` document boundaries; max_seqlen (int): longest document.
        config (LaunchConfig, optional): overrides :func:`_launch_config` (tests use small blocks).
        softcap (float, optional): scores become ``softcap * tanh(scale * q.k / softcap)``.

    Returns:
        ``(out [total, n_heads, d] in q's dtype, lse fp32 [n_heads, total])``.
    """
    total, n_heads, head_dim = q.shape
    assert k.shape == v.shape and k.shape[0] == total and k.shape[2] == head_dim, "q/k/v shapes differ"
    assert n_heads % k.shape[1] == 0, f"n_heads {n_heads} is not a multiple of n_kv_heads {k.shape[1]}"
    assert q.dtype == k.dtype == v.dtype, "q, k, v dtypes differ"
    window = _window(sliding_window, causal)
    cap = _softcap(softcap)
    cfg = (config or _launch_config(head_dim, q.dtype)).forward
    out = torch.zeros((total, n_heads, head_dim), dtype=q.dtype, device=q.device)  # zero past cu_seqlens[-1]
    lse = torch.zeros((n_heads, total), dtype=torch.float32, device=q.device)
    n_docs = cu_seqlens.numel() - 1
    if total == 0 or n_docs == 0 or max_seqlen == 0:
        return out, lse
    grid = (cdiv(max_seqlen, cfg.block_m), n_docs, n_heads)
    if launchable(q):
        _flash_fwd_kernel[grid](
            q, k, v, out, lse, cu_seqlens, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            total, n_heads // k.shape[1], window, scale, cap,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=next_power_of_2(head_dim), HEAD_DIM=head_dim, CAUSAL=causal,
            WINDOW=window > 0, **_dot_options(q.dtype), HAS_SOFTCAP=softcap is not None, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return out, lse


def flash_attention_backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal=True,
                             sliding_window=None, config=None, softcap=None):
    """Launch the backward kernels: ``(dq, dk, dv)`` in the shapes and dtypes of ``q, k, v``."""
    total, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    window = _window(sliding_window, causal)
    cap = _softcap(softcap)
    cfgs = config or _launch_config(head_dim, q.dtype)
    do = _rows(do)
    dq, dk, dv = (torch.zeros((total, t.shape[1], head_dim), dtype=t.dtype, device=t.device) for t in (q, k, v))
    n_docs = cu_seqlens.numel() - 1
    if total == 0 or n_docs == 0 or max_seqlen == 0:
        return dq, dk, dv
    block_d = next_power_of_2(head_dim)
    delta = torch.empty((n_heads, total), dtype=torch.float32, device=q.device)
    pre = cfgs.preprocess
    if launchable(out):
        _flash_bwd_preprocess_kernel[(cdiv(total, pre.block_m), n_heads)](
            out, do, delta, *_strides(out), *_strides(do), total,
            BLOCK_T=pre.block_m, BLOCK_D=block_d, HEAD_DIM=head_dim, num_warps=pre.num_warps, num_stages=pre.num_stages,
        )
    common = dict(BLOCK_D=block_d, HEAD_DIM=head_dim, CAUSAL=causal, WINDOW=window > 0, **_dot_options(q.dtype),
                  HAS_SOFTCAP=softcap is not None)
    sizes = (total, n_heads // n_kv_heads, window, scale, cap)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    c = cfgs.dkdv
    if launchable(q):
        _flash_bwd_dkdv_kernel[(cdiv(max_seqlen, c.block_n), n_docs, n_kv_heads)](
            q, k, v, do, lse, delta, dk, dv, cu_seqlens, *strides, *_strides(dk), *_strides(dv), *sizes,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages, **common,
        )
    c = cfgs.dq
    if launchable(q):
        _flash_bwd_dq_kernel[(cdiv(max_seqlen, c.block_m), n_docs, n_heads)](
            q, k, v, do, lse, delta, dq, cu_seqlens, *strides, *_strides(dq), *sizes,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages, **common,
        )
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd Function of :func:`flash_attention_varlen`; saves Q, K, V, O and LSE, recomputes P."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale, causal=True, sliding_window=None, config=None,
                softcap=None):
        q, k, v = _rows(q), _rows(k), _rows(v)
        cu_seqlens = cu_seqlens.to(torch.int32)
        out, lse = flash_attention_forward(q, k, v, cu_seqlens, max_seqlen, scale, causal, sliding_window, config,
                                           softcap)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.options = (max_seqlen, scale, causal, sliding_window, config, softcap)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(dout, q, k, v, out, lse, cu_seqlens, *ctx.options)
        return dq, dk, dv, None, None, None, None, None, None, None


def flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, scale, causal=True, sliding_window=None, softcap=None):
    """Attention over packed documents (see the module docstring), differentiable w.r.t. ``q, k, v``.

    Args:
        q (Tensor): ``[total, n_heads, d]``, ``d`` in 16..256 (e.g. 64, 80, 96, 128, 256).
        k, v (Tensor): ``[total, n_kv_heads, d]``, ``n_heads % n_kv_heads == 0``.
        cu_seqlens (Tensor): int32 ``[n_docs + 1]``, document ``b`` is tokens ``cu_seqlens[b]:cu_seqlens[b+1]``.
        max_seqlen (int): length of the longest document (at least; it sizes the grid).
        scale (float): softmax scale, usually ``d ** -0.5``.
        causal (bool): queries see only earlier keys of their document (and themselves).
        sliding_window (int, optional): number of most recent keys a query sees, itself included (causal only).
        softcap (float, optional): score soft-capping (Gemma 2): ``softcap * tanh(scale * q.k / softcap)``.

    Returns:
        Tensor ``[total, n_heads, d]`` in ``q``'s dtype.
    """
    return FlashAttentionFunction.apply(q, k, v, cu_seqlens, max_seqlen, scale, causal, sliding_window, None, softcap)


# --------------------------------------------------------------------------- audit

#: Launches the audit compiles: (head dim, models, dtypes, (window, softcap) variants). Phi-3.5-mini (32 heads of
#: 96) runs d = 96 in 128-wide tiles; Gemma-2-9B (16 heads, 8 KV heads, 256, softcap 50, sliding window on every
#: other layer) and Gemma-3-12B (16/8 heads of 256, sliding window, no softcap) run d = 256.
_AUDIT_LAUNCHES = (
    (64, "smollm2 / llama-3.2-1b", (torch.bfloat16,), ((False, False),)),
    (80, "phi-2", (torch.bfloat16,), ((False, False),)),
    (96, "phi-3.5-mini", (torch.bfloat16,), ((False, False), (True, False))),
    (128, "llama-3.1-8b / mistral", (torch.bfloat16, torch.float16), ((False, False), (True, False))),
    (256, "gemma-2-9b / gemma-3-12b", (torch.bfloat16, torch.float16),
     ((False, False), (True, False), (False, True), (True, True))),
)


def _audit_signatures(ptr: str) -> dict[str, dict[str, str]]:
    """Runtime-parameter signature of each kernel for pointers of type ``ptr`` (``"*bf16"``)."""
    i32 = "i32"
    qkv = {"stride_qt": i32, "stride_qh": i32, "stride_kt": i32, "stride_kh": i32, "stride_vt": i32, "stride_vh": i32}
    sizes = {"total": i32, "group": i32, "window": i32, "sm_scale": "fp32", "softcap": "fp32"}
    return {
        "forward": {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "LSE": "*fp32", "CU_SEQLENS": "*i32", **qkv,
                    "stride_ot": i32, "stride_oh": i32, **sizes},
        "preprocess": {"O": ptr, "DO": ptr, "DELTA": "*fp32", "stride_ot": i32, "stride_oh": i32, "stride_dot": i32,
                       "stride_doh": i32, "total": i32},
        "dkdv": {"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DK": ptr, "DV": ptr,
                 "CU_SEQLENS": "*i32", **qkv, "stride_dot": i32, "stride_doh": i32, "stride_dkt": i32,
                 "stride_dkh": i32, "stride_dvt": i32, "stride_dvh": i32, **sizes},
        "dq": {"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DQ": ptr,
               "CU_SEQLENS": "*i32", **qkv, "stride_dot": i32, "stride_doh": i32, "stride_dqt": i32,
               "stride_dqh": i32, **sizes},
    }


def audit_launches() -> list[AuditLaunch]:
    """Forward, preprocess, dK/dV and dQ launches in the configurations :func:`_launch_config` picks, for the head
    dims, dtypes and (sliding window, softcap) variants of :data:`_AUDIT_LAUNCHES`; fp16, the window and the softcap
    share the tiles of their bf16 / plain launches. The window and softcap variants run in bf16 only."""
    kernels = {"forward": _flash_fwd_kernel, "dkdv": _flash_bwd_dkdv_kernel, "dq": _flash_bwd_dq_kernel}
    launches = []
    for head_dim, model, dtypes, variants in _AUDIT_LAUNCHES:
        block_d = next_power_of_2(head_dim)
        for dtype in dtypes:
            cfgs = _launch_config(head_dim, dtype)
            signatures = _audit_signatures(dtype_signature(dtype))
            tag = f"{model} d={head_dim} {str(dtype).removeprefix('torch.')}"
            pre = cfgs.preprocess
            launches.append(AuditLaunch("attention", _flash_bwd_preprocess_kernel, signatures["preprocess"],
                                        {"BLOCK_T": pre.block_m, "BLOCK_D": block_d, "HEAD_DIM": head_dim}, pre.num_warps,
                                        f"{tag} bwd preprocess", pre.num_stages))
            for window, softcap in variants if dtype == torch.bfloat16 else ((False, False),):
                for name, kernel in kernels.items():
                    c = getattr(cfgs, name)
                    constexprs = {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_D": block_d,
                                  "HEAD_DIM": head_dim, "CAUSAL": True, "WINDOW": window,
                                  **_dot_options(dtype, interpreted=False), "HAS_SOFTCAP": softcap}
                    shape = f"{tag} {name}{' window' if window else ''}{' softcap' if softcap else ''}"
                    launches.append(AuditLaunch("attention", kernel, signatures[name], constexprs, c.num_warps,
                                                shape, c.num_stages))
    return launches
