"""Attention backend plumbing: the variable-length path (packed documents as ``cu_seqlens``) for flash-attn and
xformers, run against stand-ins that implement each package's documented semantics in plain PyTorch.

flash-attn and xformers are optional GPU extras and are not installed here, so these tests check our side of
the call (layout, document boundaries, window convention, GQA, scale) against the SDPA path; the packages
themselves are exercised only on a GPU machine that has them.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from engine_kernels.attention import attention
from tests.kernels.op_testing import assert_close

attention_module = importlib.import_module("engine_kernels.attention")


def _dense(q, k, v, lengths, scale, window, softcap=None):
    """Per-document causal (optionally banded, soft-capped) softmax attention on ``[total, h, d]`` tokens, GQA by
    repetition."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        scores = torch.einsum("ihd,jhd->hij", q[sl].float(), k[sl].float()) * scale
        if softcap:  # flash-attn's convention: 0.0 means no cap
            scores = softcap * torch.tanh(scores / softcap)
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        visible = (j <= i) & ((i - j < window) if window is not None else True)
        scores = scores.masked_fill(~visible, float("-inf"))
        outs.append(torch.einsum("hij,jhd->ihd", scores.softmax(-1), v[sl].float()).to(q.dtype))
        start += n
    return torch.cat(outs)


def _fake_flash_attn(calls):
    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_size, softcap=0.0):
        assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and causal and max_q == max_k
        lengths = (cu_q[1:] - cu_q[:-1]).tolist()
        assert max(lengths) == max_q
        left, right = window_size
        assert right in (0, -1)
        calls.append((lengths, window_size, softcap))
        return _dense(q, k, v, lengths, softmax_scale, None if left < 0 else left + 1, softcap)

    return types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)


def _fake_xformers(calls):
    class BlockDiagonalCausalMask:
        def __init__(self, lengths, window=None):
            self.lengths, self.window = lengths, window

        @classmethod
        def from_seqlens(cls, lengths):
            return cls(list(lengths))

    class BlockDiagonalCausalLocalAttentionMask(BlockDiagonalCausalMask):
        @classmethod
        def from_seqlens(cls, lengths, window_size):
            return cls(list(lengths), window_size)

    def memory_efficient_attention(q, k, v, attn_bias, scale):
        assert q.shape[0] == 1 and q.shape[2] == k.shape[2]  # GQA expanded by the caller
        calls.append((attn_bias.lengths, attn_bias.window))
        return _dense(q[0], k[0], v[0], attn_bias.lengths, scale, attn_bias.window)[None]

    bias = types.SimpleNamespace(
        BlockDiagonalCausalMask=BlockDiagonalCausalMask,
        BlockDiagonalCausalLocalAttentionMask=BlockDiagonalCausalLocalAttentionMask,
    )
    fmha = types.SimpleNamespace(attn_bias=bias, memory_efficient_attention=memory_efficient_attention)
    ops = types.ModuleType("xformers.ops")
    ops.fmha = fmha
    return ops


@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("layout", ["packed_row", "batch", "packed_batch"])
def test_varlen_backends_equal_sdpa(monkeypatch, backend, window, layout):
    torch.manual_seed(0)
    calls = []
    if backend == "flash_attn":
        monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn(calls))
    else:
        monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
        monkeypatch.setitem(sys.modules, "xformers.ops", _fake_xformers(calls))
    b, s, hq, hkv, d = (1, 12, 3, 1, 8) if layout == "packed_row" else (2, 6, 4, 2, 8)
    q, k, v = torch.randn(b, hq, s, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    kwargs, expected_lengths = {}, [s] * b
    if layout == "packed_row":
        kwargs["doc_lengths"], expected_lengths = (5, 1, 6), [5, 1, 6]
    elif layout == "packed_batch":
        kwargs["doc_ids"] = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1]])
        expected_lengths = [2, 3, 1, 4, 2]
    want = attention(q, k, v, scale=0.3, sliding_window=window, **kwargs)  # SDPA
    monkeypatch.setattr(attention_module, "attention_backend", lambda device, dtype=None, softcap=False: backend)
    got = attention(q, k, v, scale=0.3, sliding_window=window, **kwargs)
    assert_close(got, want, torch.float32, f"{backend}.out")
    assert [c[0] for c in calls] == [expected_lengths]
    expected_window = {"flash_attn": (window - 1, 0) if window else (-1, -1), "xformers": window}[backend]
    assert calls[0][1] == expected_window


def test_padded_or_cached_batches_stay_on_sdpa(monkeypatch):
    """Left padding and KV-cache decoding are not variable-length layouts: they always take SDPA with a mask."""
    monkeypatch.setattr(attention_module, "attention_backend", lambda device, dtype=None, softcap=False: "flash_attn")
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # importing it would fail: it must not be called
    q, k, v = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8)
    pad = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert attention(q, k, v, scale=0.3, key_padding_mask=pad).shape == q.shape
    assert attention(q[:, :, -1:], k, v, scale=0.3, q_offset=3).shape == (2, 2, 1, 8)


@pytest.mark.parametrize("layout", ["packed_row", "packed_batch"])
def test_flash_attn_gets_the_softcap(monkeypatch, layout):
    """flash-attn (2.6+) soft-caps natively: the cap is passed through, the result equals the PyTorch path's."""
    torch.manual_seed(1)
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn(calls))
    b, s, hq, hkv, d = (1, 12, 3, 1, 8) if layout == "packed_row" else (2, 6, 4, 2, 8)
    q, k, v = torch.randn(b, hq, s, d) * 3, torch.randn(b, hkv, s, d) * 3, torch.randn(b, hkv, s, d)
    kwargs = {"doc_lengths": (5, 1, 6)} if layout == "packed_row" else {
        "doc_ids": torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1]])}
    want = attention(q, k, v, scale=0.3, sliding_window=3, softcap=2.0, **kwargs)  # PyTorch softcap path
    monkeypatch.setattr(attention_module, "attention_backend", lambda device, dtype=None, softcap=False: "flash_attn")
    got = attention(q, k, v, scale=0.3, sliding_window=3, softcap=2.0, **kwargs)
    assert_close(got, want, torch.float32, "flash_attn.softcap.out")
    assert calls[0][2] == 2.0


def test_xformers_never_drops_a_softcap(monkeypatch):
    monkeypatch.setattr(attention_module, "attention_backend", lambda device, dtype=None, softcap=False: "xformers")
    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="xformers cannot soft-cap"):
        attention(q, q, q, scale=0.3, softcap=2.0)
