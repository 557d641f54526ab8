"""Causal self-attention with padding, packing (document boundaries) and sliding windows.

For queries at positions ``i`` and keys at cache slots ``j``::

    out_i = sum_j softmax_j(q_i . k_j * scale + mask_ij) v_j

A key is visible to a query when all of these hold:

* causal: ``j <= i + q_offset`` (``q_offset`` = number of cached keys before the queries);
* padding: ``key_padding_mask[b, j]`` is true;
* packing: key and query belong to the same document (``doc_ids`` equal);
* sliding window (Mistral): ``j > i + q_offset - window``.

A query that sees no key at all (a padding position) is allowed to see itself so
that its output is finite; such rows are ignored by the loss anyway.

Score soft-capping (Gemma 2, ``softcap = c``): the scaled scores are capped before the mask
and the (fp32) softmax, as transformers' ``eager_attention_forward`` of Gemma 2 does::

    s_ij = c * tanh(q_i . k_j * scale / c)

SDPA cannot do this, so with a softcap the PyTorch path is :class:`SoftcapAttentionFunction`:
an explicit computation in fp32 over chunks of queries (about :data:`SOFTCAP_CHUNK_SCORES`
scores at a time) with a hand-written backward that recomputes each chunk's scores from
``q``, ``k`` and the saved log-sum-exp (``d s / d raw = 1 - tanh^2``). It supports every
option above; packed documents (``doc_lengths``) are attended one document at a time.
The GPU backends take the softcap natively: our Triton flash attention, and flash-attn 2.6+
(xformers cannot, so it is never chosen with a softcap; see :mod:`engine_kernels.dispatch`).

The PyTorch path calls ``scaled_dot_product_attention`` (flash/efficient kernels
where available, fused backward). It takes the plain causal fast path when
nothing but causality applies. A padding-free row of packed documents given by
``doc_lengths`` is variable-length attention: no attention crosses a document and
no ``[s, s]`` mask is built, and the cost is about ``sum_d n_d^2``, not ``(sum_d n_d)^2``:

* on CPU, one causal SDPA call per document (SDPA's math kernel up to
  :data:`CPU_MATH_MAX_KEYS` keys, its flash kernel beyond). Measured on the benchmark's
  documents (8 of 45-142 tokens, 9 query / 3 key-value heads of 64, bf16, forward +
  backward, 2 cores): 23 ms per layer, against 51 ms for the padded batches below run
  through SDPA's CPU flash kernel and 42 ms through its math kernel: short documents are
  cheap one by one on a CPU, and the CPU flash kernel is slow in bf16;
* elsewhere (CUDA without Triton), the documents are gathered into a few padded batches
  ``[n_docs, h, L, d]`` of similar lengths (:class:`PackedLayout`, built once per forward
  and shared by every layer) and each batch is ONE causal SDPA call: a handful of kernel
  launches per layer instead of one per document (each batch pads its documents to at
  most twice their length). Padding slots sit after each document's last token, so
  causality alone keeps real queries off them; their outputs are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine_kernels.dispatch import attention_backend

#: Scores (``batch * heads * chunk * keys``) one chunk of :class:`SoftcapAttentionFunction` holds; a handful of
#: fp32 buffers of this size (64 MiB each) exist at a time, whatever the sequence length.
SOFTCAP_CHUNK_SCORES = 1 << 24


def build_attention_mask(
    q_len: int,
    kv_len: int,
    *,
    q_offset: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Boolean visibility mask (True = may attend).

    Args:
        q_len, kv_len (int): number of queries and of keys.
        q_offset (int): slot of the first query among the keys (keys ``< q_offset`` are cached).
        key_padding_mask (Tensor, optional): bool/int ``[b, kv_len]``, true for real tokens.
        doc_ids (Tensor, optional): int ``[b, kv_len]`` document index of each key slot (the
            queries are the last ``q_len`` slots).
        sliding_window (int, optional): number of most recent keys a query may see (itself included).

    Returns:
        Bool tensor ``[b or 1, 1, q_len, kv_len]``.
    """
    return _mask_rows(0, q_len, q_len, kv_len, q_offset, key_padding_mask, doc_ids, sliding_window, device)


def _mask_rows(start, stop, q_len, kv_len, q_offset, key_padding_mask, doc_ids, sliding_window, device):
    """Rows ``[start, stop)`` (queries) of :func:`build_attention_mask`: ``[b or 1, 1, stop - start, kv_len]``."""
    qi = torch.arange(start, stop, device=device)[:, None] + q_offset
    kj = torch.arange(kv_len, device=device)[None, :]
    allowed = kj <= qi
    if sliding_window is not None:
        allowed = allowed & (kj > qi - sliding_window)
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, None, :]
    if doc_ids is not None:
        q_docs = doc_ids[:, kv_len - q_len + start : kv_len - q_len + stop]
        allowed = allowed & (q_docs[:, None, :, None] == doc_ids[:, None, None, :])
    # A query with no visible key (left padding) attends to itself so its output stays finite.
    self_slot = (kj == qi)[None, None]
    empty = ~allowed.any(dim=-1, keepdim=True)
    return allowed | (empty & self_slot)


def attention_reference(q, k, v, mask: torch.Tensor, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Plain softmax attention (fp32 softmax), the oracle for every attention implementation.

    Args:
        q (Tensor): ``[b, hq, s_q, d]``; k, v: ``[b, hkv, s_k, d]``; mask: bool broadcastable to ``[b, hq, s_q, s_k]``.
        softcap (float, optional): scores become ``softcap * tanh(scores / softcap)`` before the mask.
    """
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


#: On CPU, sequences up to this many keys run SDPA's math backend: for short documents its batched
#: matmuls are about 2x faster (forward + backward) than the CPU flash kernel, which wins beyond ~400.
CPU_MATH_MAX_KEYS = 256


def _sdpa(q, k, v, mask, scale, is_causal):
    def run():
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )

    if q.device.type == "cpu" and k.shape[2] <= CPU_MATH_MAX_KEYS:
        with sdpa_kernel(SDPBackend.MATH):
            return run()
    return run()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_offset: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    doc_lengths: tuple[int, ...] | None = None,
    layout: PackedLayout | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention with grouped-query heads.

    Args:
        q (Tensor): ``[b, n_heads, s_q, head_dim]``.
        k, v (Tensor): ``[b, n_kv_heads, s_k, head_dim]``; ``n_heads`` is a multiple of ``n_kv_heads``.
        scale (float): softmax scale, usually ``head_dim ** -0.5``.
        q_offset, key_padding_mask, doc_ids, sliding_window: see :func:`build_attention_mask`.
        doc_lengths (tuple of int, optional): for ``b == 1`` without cache or padding, the lengths of
            the packed documents that make up the row, in order (they sum to ``s``). Then ``doc_ids``
            is not needed and each document is attended on its own.
        layout (PackedLayout, optional): :func:`packed_layout` of ``doc_lengths``, built once per forward by the
            caller so that the layers share it (built here when missing). Stands for ``doc_lengths`` when that is
            not given.
        softcap (float, optional): attention-score soft-capping (Gemma 2: 50): the scaled scores become
            ``softcap * tanh(scores / softcap)`` before masking and softmax (see the module docstring).

    Returns:
        Tensor ``[b, n_heads, s_q, head_dim]``.

    Raises:
        ValueError: inconsistent ``doc_lengths``, or a ``softcap`` that is not a positive number.
    """
    q_len, kv_len = q.shape[2], k.shape[2]
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be a positive number (Gemma 2 uses 50.0) or None, got {softcap!r}")
    if layout is not None and doc_lengths is None:
        doc_lengths = layout.lengths
    backend = attention_backend(q.device, q.dtype, softcap=softcap is not None)
    varlen_layout = q_offset == 0 and q_len == kv_len and key_padding_mask is None
    if backend != "torch" and varlen_layout:
        lengths = _document_lengths(q.shape[0], q_len, doc_ids, doc_lengths)
        return _varlen_attention(backend, q, k, v, lengths, scale, sliding_window, softcap)
    if doc_lengths is not None and len(doc_lengths) > 1:
        if q.shape[0] != 1 or not varlen_layout:
            raise ValueError("doc_lengths needs one row (b == 1) of packed documents without cache or padding")
        if sum(doc_lengths) != q_len:
            raise ValueError(f"doc_lengths sum to {sum(doc_lengths)}, the row has {q_len} tokens")
        if q.device.type == "cpu" or softcap is not None:
            return _per_document_attention(q, k, v, doc_lengths, scale, sliding_window, softcap)
        if layout is None or layout.lengths != tuple(doc_lengths):
            layout = packed_layout(doc_lengths, q.device)
        return _packed_sdpa_attention(q, k, v, layout, scale, sliding_window)
    if softcap is not None:
        return softcap_attention(q, k, v, scale=scale, softcap=softcap, q_offset=q_offset,
                                 key_padding_mask=key_padding_mask, doc_ids=doc_ids, sliding_window=sliding_window)
    return _sdpa_attention(q, k, v, scale, q_offset, key_padding_mask, doc_ids, sliding_window)


# --------------------------------------------------------------------------- packed documents, PyTorch path


@dataclass(frozen=True)
class PackedLayout:
    """How the documents of one padding-free row are gathered into padded batches (see the module docstring).

    The batches' slots are laid out one after the other, document-major (``n_docs * length`` slots per batch).

    Attributes:
        lengths: the documents' lengths in row order (they sum to ``s``).
        groups: per batch ``(n_docs, length)``.
        slot_token: int64 ``[n_slots]``: the token row each slot holds, ``s`` for a padding slot.
        token_slot: int64 ``[s]``: the slot of each token (the inverse of ``slot_token``).
    """

    lengths: tuple[int, ...]
    groups: tuple[tuple[int, int], ...]
    slot_token: torch.Tensor
    token_slot: torch.Tensor


#: A padded batch holds documents at least this fraction of its longest one (padding at most doubles a document).
PACK_GROUP_RATIO = 0.5


def packed_layout(lengths, device: torch.device | str = "cpu") -> PackedLayout:
    """Group the documents of a row by length (longest first; a group keeps documents longer than
    :data:`PACK_GROUP_RATIO` of its longest) and build the gather indices. Build it once per forward."""
    lengths = tuple(int(n) for n in lengths)
    s = sum(lengths)
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] > PACK_GROUP_RATIO * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    token_slot = torch.empty(s, dtype=torch.long)
    slot_token, shapes, offset = [], [], 0
    for members in groups:
        width = lengths[members[0]]
        index = torch.full((len(members), width), s, dtype=torch.long)
        for row, i in enumerate(members):
            n, start = lengths[i], starts[i]
            index[row, :n] = torch.arange(start, start + n)
            token_slot[start : start + n] = offset + row * width + torch.arange(n)
        slot_token.append(index.reshape(-1))
        shapes.append((len(members), width))
        offset += len(members) * width
    return PackedLayout(lengths, tuple(shapes), torch.cat(slot_token).to(device), token_slot.to(device))


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [n, ...]`` plus a zero row ``n`` at the end, rows picked by ``index``."""
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])]).index_select(0, index)


class _Regroup(torch.autograd.Function):
    """Rows of ``x`` rearranged by a one-to-one index (plus zero padding rows), whose backward is the inverse
    gather: no scatter-add, because every row lands in exactly one place."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return _gather_rows(x, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _gather_rows(grad, inverse), None, None


def _per_document_attention(q, k, v, lengths, scale, sliding_window, softcap=None):
    """``[1, h, s, d]`` packed documents attended one causal call each (the CPU choice, and the PyTorch path of
    every device with a softcap; module docstring): SDPA, or :func:`softcap_attention` with a softcap."""
    outputs, start = [], 0
    for n in lengths:
        q_d, k_d, v_d = (t[:, :, start : start + n] for t in (q, k, v))
        if softcap is None:
            outputs.append(_sdpa_attention(q_d, k_d, v_d, scale, 0, None, None, sliding_window))
        else:
            outputs.append(softcap_attention(q_d, k_d, v_d, scale=scale, softcap=softcap, sliding_window=sliding_window))
        start += n
    return torch.cat(outputs, dim=2)


def _packed_sdpa_attention(q, k, v, layout: PackedLayout, scale, sliding_window):
    """``[1, h, s, d]`` packed documents attended as padded batches, one SDPA call per batch."""
    _, hq, s, d = q.shape
    rep = hq // k.shape[1]

    def to_slots(t):  # [1, h, s, d] -> [n_slots, h, d]; padding slots are zero
        return _Regroup.apply(t[0].transpose(0, 1), layout.slot_token, layout.token_slot)

    qs, ks, vs = to_slots(q), to_slots(k), to_slots(v)
    outputs, offset = [], 0
    for n_docs, width in layout.groups:
        part = slice(offset, offset + n_docs * width)
        offset += n_docs * width
        qb, kb, vb = (t[part].view(n_docs, width, t.shape[1], d).transpose(1, 2) for t in (qs, ks, vs))
        if rep > 1:  # CPU SDPA runs its fused kernel only for equal head counts
            kb, vb = kb.repeat_interleave(rep, dim=1), vb.repeat_interleave(rep, dim=1)
        mask = None
        if sliding_window is not None and sliding_window < width:  # document-relative, so one mask for all
            mask = build_attention_mask(width, width, sliding_window=sliding_window, device=q.device)[0, 0]
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=mask is None, scale=scale)
        outputs.append(out.transpose(1, 2).reshape(n_docs * width, hq, d))
    slots = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    out = _Regroup.apply(slots, layout.token_slot, layout.slot_token)  # [s, h, d]
    return out.transpose(0, 1).unsqueeze(0)


def _sdpa_attention(q, k, v, scale, q_offset, key_padding_mask, doc_ids, sliding_window):
    """PyTorch SDPA: the plain causal fast path, or an explicit visibility mask."""
    q_len, kv_len = q.shape[2], k.shape[2]
    window_matters = sliding_window is not None and sliding_window < kv_len
    if key_padding_mask is None and doc_ids is None and not window_matters and q_offset == 0 and q_len == kv_len:
        return _sdpa(q, k, v, None, scale, True)
    if q_len == 1 and q_offset == kv_len - 1 and doc_ids is None and not window_matters:
        return _decode_sdpa(q, k, v, scale, key_padding_mask)
    mask = build_attention_mask(
        q_len,
        kv_len,
        q_offset=q_offset,
        key_padding_mask=key_padding_mask,
        doc_ids=doc_ids,
        sliding_window=sliding_window if window_matters else None,
        device=q.device,
    )
    return _sdpa(q, k, v, mask, scale, False)


def _decode_sdpa(q, k, v, scale, key_padding_mask):
    """One new query per row against every cached key (a decode step): ``q [b, hq, 1, d]``, ``k, v [b, hkv, s_k, d]``.

    Causality is moot (the query is the last slot), so the only mask is the keys' padding, ``[b, 1, 1, s_k]``
    (the query's own slot is always real). Grouped-query heads are folded into the query length,
    ``[b, hkv, hq / hkv, d]``: every query head meets its key-value head without ``k``/``v`` being repeated
    (query head ``i`` uses key-value head ``i // rep``, as ``repeat_interleave`` pairs them).
    """
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    mask = None if key_padding_mask is None else key_padding_mask.bool()[:, None, None, :]
    out = _sdpa(q.reshape(b, hkv, hq // hkv, d), k, v, mask, scale, False)
    return out.reshape(b, hq, 1, d)


# --------------------------------------------------------------------------- soft-capped scores, PyTorch path


def _capped_scores(q, k, scale, softcap):
    """fp32 ``(s, t)`` of a chunk: ``s = softcap * t`` with ``t = tanh(q . k * scale / softcap)``.

    ``q [b, hkv, rep, c, d]`` (any dtype), ``k [b, hkv, 1, s_k, d]`` fp32 -> ``[b, hkv, rep, c, s_k]``.
    """
    t = torch.tanh((q.float() @ k.transpose(-1, -2)) * (scale / softcap))
    return t * softcap, t


class SoftcapAttentionFunction(torch.autograd.Function):
    """Attention with soft-capped scores, computed in chunks of queries; see the module docstring.

    ``forward(q [b, hq, s_q, d], k, v [b, hkv, s_k, d], scale, softcap, q_offset, key_padding_mask, doc_ids,
    sliding_window) -> [b, hq, s_q, d]`` in ``q``'s dtype. Per chunk of ``c`` queries (all keys at once)::

        s = softcap * tanh(q k^T * scale / softcap)   (fp32; masked with the rows of build_attention_mask)
        lse = logsumexp(s),   p = exp(s - lse),   out = p v

    Backward, per chunk, with ``p`` and ``t = tanh(.)`` recomputed::

        dv += p^T do,   dp = do v^T,   ds = p * (dp - sum(p * dp)) * (1 - t^2)
        dq = scale * ds k,   dk += scale * ds^T q

    GQA: the query heads of one KV head are a separate dimension (``[b, hkv, rep, ...]``), so ``k``, ``v`` are
    never repeated and ``dk``, ``dv`` are summed over it. Saved: ``q``, ``k``, ``v`` (the inputs), the masks'
    inputs and the fp32 ``lse [b, hq, s_q]``; never a score matrix.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, softcap, q_offset, key_padding_mask, doc_ids, sliding_window):
        b, hq, s_q, d = q.shape
        hkv, s_k = k.shape[1], k.shape[2]
        if hq % hkv:
            raise ValueError(f"n_heads {hq} is not a multiple of n_kv_heads {hkv}")
        qg = q.unflatten(1, (hkv, hq // hkv))
        kf, vf = k.float()[:, :, None], v.float()[:, :, None]
        out = torch.empty((b, hkv, hq // hkv, s_q, v.shape[-1]), dtype=q.dtype, device=q.device)
        lse = torch.empty((b, hkv, hq // hkv, s_q), dtype=torch.float32, device=q.device)
        chunk = _softcap_chunk(b * hq, s_k)
        for start in range(0, s_q, chunk):
            stop = min(start + chunk, s_q)
            s, _ = _capped_scores(qg[..., start:stop, :], kf, scale, softcap)
            mask = _mask_rows(start, stop, s_q, s_k, q_offset, key_padding_mask, doc_ids, sliding_window, q.device)
            s.masked_fill_(~mask[:, :, None], float("-inf"))
            lse_c = torch.logsumexp(s, dim=-1)
            p = s.sub_(lse_c[..., None]).exp_()
            out[..., start:stop, :] = (p @ vf).to(q.dtype)
            lse[..., start:stop] = lse_c
        ctx.save_for_backward(q, k, v, lse, key_padding_mask, doc_ids)
        ctx.options = (scale, softcap, q_offset, sliding_window)
        return out.flatten(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, lse, key_padding_mask, doc_ids = ctx.saved_tensors
        scale, softcap, q_offset, sliding_window = ctx.options
        b, hq, s_q, _ = q.shape
        hkv, s_k = k.shape[1], k.shape[2]
        qg, dog = q.unflatten(1, (hkv, hq // hkv)), dout.unflatten(1, (hkv, hq // hkv))
        kf, vf = k.float()[:, :, None], v.float()[:, :, None]
        dq = torch.empty_like(qg)
        dk = torch.zeros((b, hkv, s_k, k.shape[-1]), dtype=torch.float32, device=k.device)
        dv = torch.zeros((b, hkv, s_k, v.shape[-1]), dtype=torch.float32, device=v.device)
        chunk = _softcap_chunk(b * hq, s_k)
        for start in range(0, s_q, chunk):
            stop = min(start + chunk, s_q)
            s, t = _capped_scores(qg[..., start:stop, :], kf, scale, softcap)
            mask = _mask_rows(start, stop, s_q, s_k, q_offset, key_padding_mask, doc_ids, sliding_window, q.device)
            s.masked_fill_(~mask[:, :, None], float("-inf"))
            p = s.sub_(lse[..., start:stop, None]).exp_()
            do = dog[..., start:stop, :].float()
            dv += (p.transpose(-1, -2) @ do).sum(2)
            dp = do @ vf.transpose(-1, -2)
            ds = dp.sub_((p * dp).sum(-1, keepdim=True)).mul_(p).mul_(t.mul_(t).neg_().add_(1.0))
            dq[..., start:stop, :] = ((ds @ kf) * scale).to(q.dtype)
            dk += (ds.transpose(-1, -2) @ qg[..., start:stop, :].float()).sum(2) * scale
        return dq.flatten(1, 2), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def _softcap_chunk(rows: int, s_k: int) -> int:
    """Queries per chunk so that ``rows * chunk * s_k`` stays near :data:`SOFTCAP_CHUNK_SCORES`."""
    return max(1, SOFTCAP_CHUNK_SCORES // max(1, rows * s_k))


def softcap_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    softcap: float,
    q_offset: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The PyTorch path of :func:`attention` with a softcap (:class:`SoftcapAttentionFunction`); the arguments and
    the mask are :func:`attention`'s (packed documents go through ``doc_ids`` here). Returns ``[b, hq, s_q, d]``."""
    return SoftcapAttentionFunction.apply(
        q, k, v, scale, float(softcap), q_offset, key_padding_mask, doc_ids, sliding_window
    )


# --------------------------------------------------------------------------- variable-length backends


def _document_lengths(batch: int, seq: int, doc_ids, doc_lengths) -> list[int]:
    """Lengths of the documents of a ``[batch, seq]`` batch flattened row after row (rows never share one)."""
    if doc_lengths is not None and batch == 1:
        if sum(doc_lengths) != seq:
            raise ValueError(f"doc_lengths sum to {sum(doc_lengths)}, the row has {seq} tokens")
        return list(doc_lengths)
    if doc_ids is None:
        return [seq] * batch
    rows = doc_ids.shape[-1]
    if rows != seq:
        raise ValueError(f"doc_ids cover {rows} positions, the batch has {seq}")
    # A new document starts at every change of id and at every row start.
    flat = (doc_ids - doc_ids[:, :1]) + torch.arange(batch, device=doc_ids.device)[:, None] * (seq + 1)
    return torch.unique_consecutive(flat.reshape(-1), return_counts=True)[1].tolist()


def _varlen_attention(backend, q, k, v, lengths, scale, sliding_window, softcap=None):
    """Attention over packed documents with a variable-length kernel; ``[b, h, s, d]`` in and out.

    The batch is flattened to ``[b * s, h, d]`` tokens with document boundaries ``cu_seqlens``
    (int32, ``[n_docs + 1]``): no attention crosses a document, and no ``[s, s]`` mask exists.
    """
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=q.device)
    cu_seqlens[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0).to(q.device)
    max_len = max(lengths)
    qt = q.transpose(1, 2).reshape(b * s, hq, d)
    kt = k.transpose(1, 2).reshape(b * s, hkv, d)
    vt = v.transpose(1, 2).reshape(b * s, hkv, d)
    window = sliding_window if sliding_window is not None and sliding_window < max_len else None
    out = _VARLEN[backend](qt, kt, vt, cu_seqlens, max_len, lengths, scale, window, softcap)
    return out.reshape(b, s, hq, d).transpose(1, 2)


def _triton_varlen(q, k, v, cu_seqlens, max_len, lengths, scale, window, softcap):
    from engine_kernels.flash_attention import flash_attention_varlen

    return flash_attention_varlen(q, k, v, cu_seqlens, max_len, scale=scale, causal=True, sliding_window=window,
                                  softcap=softcap)


def _flash_attn_varlen(q, k, v, cu_seqlens, max_len, lengths, scale, window, softcap):
    """The ``flash-attn`` package (GQA native; a window of ``w`` keys is ``window_size=(w - 1, 0)``; ``softcap``
    from 2.6, which :mod:`engine_kernels.dispatch` checks before choosing it)."""
    from flash_attn import flash_attn_varlen_func

    window_size = (window - 1, 0) if window is not None else (-1, -1)
    extra = {} if softcap is None else {"softcap": softcap}
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, softmax_scale=scale, causal=True, window_size=window_size,
        **extra,
    )


def _xformers_varlen(q, k, v, cu_seqlens, max_len, lengths, scale, window, softcap):
    """xformers' memory-efficient attention with a block-diagonal causal (optionally local) bias."""
    if softcap is not None:  # dispatch never picks xformers with a softcap; a direct call must not drop it
        raise ValueError("xformers cannot soft-cap attention scores; use the Triton kernel or flash-attn >= 2.6")
    from xformers.ops import fmha

    if window is None:
        bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(lengths)
    else:
        bias = fmha.attn_bias.BlockDiagonalCausalLocalAttentionMask.from_seqlens(lengths, window_size=window)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=scale)[0]


_VARLEN = {"triton": _triton_varlen, "flash_attn": _flash_attn_varlen, "xformers": _xformers_varlen}
