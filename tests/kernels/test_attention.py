"""Attention: the visibility rules of the mask, and numerics against plain softmax attention.

Tolerances and helpers: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import pytest
import torch

from engine_kernels.attention import _packed_sdpa_attention, attention, attention_reference, build_attention_mask, packed_layout
from tests.kernels.op_testing import DTYPES, assert_close, grads, leaf

# --------------------------------------------------------------------------- attention mask semantics


def _brute_force_mask(q_len, kv_len, q_offset=0, pad=None, docs=None, window=None, batch=1):
    """The visibility rules of kernels/attention.py's docstring, element by element."""
    out = torch.zeros(batch, 1, q_len, kv_len, dtype=torch.bool)
    for bb in range(batch):
        for i in range(q_len):
            qi = i + q_offset
            for j in range(kv_len):
                ok = j <= qi
                if window is not None:
                    ok = ok and j > qi - window
                if pad is not None:
                    ok = ok and bool(pad[bb, j])
                if docs is not None:
                    ok = ok and int(docs[bb, kv_len - q_len + i]) == int(docs[bb, j])
                out[bb, 0, i, j] = ok
            if not out[bb, 0, i].any() and qi < kv_len:
                out[bb, 0, i, qi] = True
    return out


def _m(rows):
    return torch.tensor(rows, dtype=torch.bool)[None, None]


def test_mask_causal():
    m = build_attention_mask(4, 4)
    assert m.dtype == torch.bool and m.shape == (1, 1, 4, 4)
    assert torch.equal(m, torch.ones(4, 4, dtype=torch.bool).tril()[None, None])


def test_mask_q_offset_with_cache():
    m = build_attention_mask(2, 5, q_offset=3)
    assert torch.equal(m, _m([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]))
    # One decode step sees the whole cache.
    assert build_attention_mask(1, 6, q_offset=5).all()


def test_mask_left_padding_query_sees_itself():
    pad = torch.tensor([[0, 0, 1, 1]])
    m = build_attention_mask(4, 4, key_padding_mask=pad)
    expected = _m([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])
    assert torch.equal(m, expected)


def test_mask_right_padding_and_batch():
    pad = torch.tensor([[1, 1, 0], [1, 1, 1]])
    m = build_attention_mask(3, 3, key_padding_mask=pad)
    assert m.shape == (2, 1, 3, 3)
    assert torch.equal(m[0], _m([[1, 0, 0], [1, 1, 0], [1, 1, 0]])[0])  # pad query sees real keys only
    assert torch.equal(m[1], _m([[1, 0, 0], [1, 1, 0], [1, 1, 1]])[0])


def test_mask_documents():
    docs = torch.tensor([[0, 0, 1, 1, 1]])
    m = build_attention_mask(5, 5, doc_ids=docs)
    expected = _m(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    )
    assert torch.equal(m, expected)


def test_mask_sliding_window():
    m = build_attention_mask(4, 4, sliding_window=2)
    assert torch.equal(m, _m([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]))
    m = build_attention_mask(2, 6, q_offset=4, sliding_window=3)
    assert torch.equal(m, _m([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]]))
    # A window of 1 is the diagonal.
    assert torch.equal(build_attention_mask(3, 3, sliding_window=1), torch.eye(3, dtype=torch.bool)[None, None])


def test_mask_documents_with_cache_use_last_slots_for_queries():
    docs = torch.tensor([[0, 0, 1, 1, 1, 2]])
    m = build_attention_mask(2, 6, q_offset=4, doc_ids=docs)
    assert torch.equal(m, _m([[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]]))


@pytest.mark.parametrize("seed", range(6))
def test_mask_matches_brute_force_rules(seed):
    g = torch.Generator().manual_seed(seed)
    batch = 2
    kv_len = int(torch.randint(3, 12, (1,), generator=g))
    q_len = int(torch.randint(1, kv_len + 1, (1,), generator=g))
    q_offset = kv_len - q_len
    pad = (torch.rand(batch, kv_len, generator=g) > 0.3) if seed % 2 == 0 else None
    docs = torch.sort(torch.randint(0, 3, (batch, kv_len), generator=g), dim=1).values if seed % 3 != 2 else None
    window = int(torch.randint(1, kv_len + 2, (1,), generator=g)) if seed >= 2 else None
    m = build_attention_mask(
        q_len, kv_len, q_offset=q_offset, key_padding_mask=pad, doc_ids=docs, sliding_window=window
    )
    expected = _brute_force_mask(q_len, kv_len, q_offset, pad, docs, window, batch)
    assert torch.equal(m.expand_as(expected), expected)
    assert m.any(dim=-1).all(), "every query must see at least one key"


# --------------------------------------------------------------------------- attention numerics

ATTN_HEADS = [
    pytest.param((3, 1, 24), id="h3_kv1_d24"),
    pytest.param((5, 5, 64), id="h5_kv5_d64"),
]

ATTN_SETUPS = ["causal", "cache", "padding", "documents", "window", "window_cache", "all"]


def _attn_setup(name: str, batch: int):
    """``(q_len, kv_len, kwargs)`` for one masking scenario."""
    if name == "causal":
        return 7, 7, {}
    if name == "cache":
        return 3, 10, {"q_offset": 7}
    if name == "padding":
        pad = torch.ones(batch, 9, dtype=torch.bool)
        pad[0, :3] = False  # left padding (those queries see only themselves)
        pad[-1, -2:] = False  # right padding
        return 9, 9, {"key_padding_mask": pad}
    if name == "documents":
        docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2, 3]])[:batch]
        return 9, 9, {"doc_ids": docs}
    if name == "window":
        return 9, 9, {"sliding_window": 3}
    if name == "window_cache":
        return 4, 11, {"q_offset": 7, "sliding_window": 5}
    if name == "all":
        pad = torch.ones(batch, 10, dtype=torch.bool)
        pad[0, :2] = False
        docs = torch.tensor([[0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])[:batch]
        return 6, 10, {"q_offset": 4, "key_padding_mask": pad, "doc_ids": docs, "sliding_window": 3}
    raise AssertionError(name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("setup", ATTN_SETUPS)
@pytest.mark.parametrize("heads", ATTN_HEADS)
def test_attention_matches_reference(heads, setup, dtype):
    torch.manual_seed(17)
    hq, hkv, d = heads
    batch = 2
    q_len, kv_len, kwargs = _attn_setup(setup, batch)
    scale = d**-0.5
    q0 = torch.randn(batch, hq, q_len, d)
    k0 = torch.randn(batch, hkv, kv_len, d)
    v0 = torch.randn(batch, hkv, kv_len, d)
    do = torch.randn(batch, hq, q_len, d).to(dtype)
    q, k, v = (leaf(t.to(dtype)) for t in (q0, k0, v0))
    qr, kr, vr = (leaf(t.to(dtype)) for t in (q0, k0, v0))

    out = attention(q, k, v, scale=scale, **kwargs)
    mask = build_attention_mask(q_len, kv_len, **kwargs)
    ref = attention_reference(qr, kr, vr, mask, scale)
    assert out.shape == (batch, hq, q_len, d) and out.dtype == dtype
    assert_close(out, ref, dtype, "attention.out", reduction=True)
    got, want = grads(out, [q, k, v], do), grads(ref, [qr, kr, vr], do)
    for name, g_, w_ in zip(("dq", "dk", "dv"), got, want):
        assert_close(g_, w_, dtype, f"attention.{name}", reduction=True)


def test_attention_padded_query_attends_to_itself_only():
    torch.manual_seed(18)
    hq, hkv, d = 3, 1, 24
    pad = torch.tensor([[0, 0, 1, 1, 1]], dtype=torch.bool)
    q, k, v = torch.randn(1, hq, 5, d), torch.randn(1, hkv, 5, d), torch.randn(1, hkv, 5, d)
    out = attention(q, k, v, scale=d**-0.5, key_padding_mask=pad)
    assert torch.isfinite(out).all()
    for i in (0, 1):  # padded queries: output is their own value vector, for every query head of the group
        torch.testing.assert_close(out[0, :, i], v[0, 0, i].expand(hq, d), rtol=1e-6, atol=1e-6)


def test_attention_window_at_least_kv_len_is_plain_causal():
    torch.manual_seed(19)
    q, k, v = torch.randn(1, 3, 6, 24), torch.randn(1, 1, 6, 24), torch.randn(1, 1, 6, 24)
    plain = attention(q, k, v, scale=0.2)
    for w in (6, 100):
        torch.testing.assert_close(attention(q, k, v, scale=0.2, sliding_window=w), plain)
    assert not torch.allclose(attention(q, k, v, scale=0.2, sliding_window=5), plain)


def test_attention_documents_equal_separate_sequences():
    """Packing: attention over two packed documents equals attention over each one alone."""
    torch.manual_seed(20)
    hq, hkv, d = 5, 5, 64
    q, k, v = torch.randn(1, hq, 7, d), torch.randn(1, hkv, 7, d), torch.randn(1, hkv, 7, d)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    packed = attention(q, k, v, scale=d**-0.5, doc_ids=docs)
    first = attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], scale=d**-0.5)
    second = attention(q[:, :, 3:], k[:, :, 3:], v[:, :, 3:], scale=d**-0.5)
    torch.testing.assert_close(packed, torch.cat([first, second], dim=2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 3])
def test_attention_doc_lengths_equals_document_mask(dtype, window):
    """Variable-length attention over a padding-free row equals the dense block-diagonal mask, with gradients."""
    torch.manual_seed(21)
    hq, hkv, d = 6, 2, 24
    lengths = (5, 1, 9, 4)
    s = sum(lengths)
    docs = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    q0, k0, v0 = torch.randn(1, hq, s, d), torch.randn(1, hkv, s, d), torch.randn(1, hkv, s, d)
    do = torch.randn(1, hq, s, d).to(dtype)
    q, k, v = (leaf(t.to(dtype)) for t in (q0, k0, v0))
    qr, kr, vr = (leaf(t.to(dtype)) for t in (q0, k0, v0))
    out = attention(q, k, v, scale=d**-0.5, doc_lengths=lengths, sliding_window=window)
    mask = build_attention_mask(s, s, doc_ids=docs, sliding_window=window)
    ref = attention_reference(qr, kr, vr, mask, d**-0.5)
    assert_close(out, ref, dtype, "varlen.out", reduction=True)
    for name, g_, w_ in zip(("dq", "dk", "dv"), grads(out, [q, k, v], do), grads(ref, [qr, kr, vr], do)):
        assert_close(g_, w_, dtype, f"varlen.{name}", reduction=True)


def test_attention_doc_lengths_rejects_inconsistent_input():
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="sum"):
        attention(q, k, v, scale=0.3, doc_lengths=(2, 3))
    with pytest.raises(ValueError, match="b == 1"):
        attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), scale=0.3, doc_lengths=(3, 3))


def test_packed_layout_groups_documents_of_similar_length():
    lengths = (100, 3, 60, 40, 1, 45, 51, 2)
    layout = packed_layout(lengths)
    # Longest first; a batch keeps documents longer than half its longest one.
    assert list(layout.groups) == [(3, 100), (2, 45), (2, 3), (1, 1)]
    # Every token sits in exactly one slot, and token_slot finds it again.
    slots = layout.slot_token
    assert slots.numel() == sum(n_docs * width for n_docs, width in layout.groups)
    assert torch.equal(slots[layout.token_slot], torch.arange(sum(lengths)))
    assert int((slots == sum(lengths)).sum()) == slots.numel() - sum(lengths)  # the rest is padding
    padded = sum(n_docs * width * width for n_docs, width in layout.groups)
    assert padded <= 4 * sum(n * n for n in lengths)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 7])
def test_packed_attention_many_documents_equals_document_mask(dtype, window):
    """Documents of very different lengths (several padded batches), GQA, a shared layout: the block-diagonal oracle."""
    torch.manual_seed(22)
    hq, hkv, d = 6, 2, 16
    lengths = (30, 1, 17, 9, 2, 16, 25, 3)
    s = sum(lengths)
    docs = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    q0, k0, v0 = torch.randn(1, hq, s, d), torch.randn(1, hkv, s, d), torch.randn(1, hkv, s, d)
    do = torch.randn(1, hq, s, d).to(dtype)
    q, k, v = (leaf(t.to(dtype)) for t in (q0, k0, v0))
    qr, kr, vr = (leaf(t.to(dtype)) for t in (q0, k0, v0))
    # The padded batches are what CUDA's PyTorch path runs; on CPU attention() takes one call per document.
    out = _packed_sdpa_attention(q, k, v, packed_layout(lengths), d**-0.5, window)
    per_document = attention(q.detach(), k.detach(), v.detach(), scale=d**-0.5, doc_lengths=lengths, sliding_window=window)
    mask = build_attention_mask(s, s, doc_ids=docs, sliding_window=window)
    ref = attention_reference(qr, kr, vr, mask, d**-0.5)
    assert_close(out, ref, dtype, "packed.out", reduction=True)
    assert_close(per_document, ref, dtype, "per_document.out", reduction=True)
    for name, g_, w_ in zip(("dq", "dk", "dv"), grads(out, [q, k, v], do), grads(ref, [qr, kr, vr], do)):
        assert_close(g_, w_, dtype, f"packed.{name}", reduction=True)


# --------------------------------------------------------------------------- score soft-capping (Gemma 2)

SOFTCAP = 2.0  # small next to the test scores (|q.k| * scale up to ~5), so the cap really bends them


def _transformers_eager(q, k, v, mask, scale, softcap):
    """transformers' Gemma 2 ``eager_attention_forward`` (the independent oracle), in fp32, with the additive
    mask it expects built from our boolean one; back to ``[b, h, s, d]``."""
    from types import SimpleNamespace

    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=False, head_dim=q.shape[-1])
    additive = torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, torch.finfo(torch.float32).min)
    out, _ = eager_attention_forward(module, q.float(), k.float(), v.float(), additive, scaling=scale, softcap=softcap)
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("setup", ATTN_SETUPS)
@pytest.mark.parametrize("heads", ATTN_HEADS)
def test_attention_softcap_matches_reference_and_transformers(heads, setup, dtype):
    """Padding, cache, packed documents (doc_ids), sliding window, GQA: forward and gradients against the plain
    reference with the cap, and transformers' eager Gemma 2 attention."""
    hq, hkv, d = heads
    batch = 2
    q_len, kv_len, kwargs = _attn_setup(setup, batch)
    gen = torch.Generator().manual_seed(23)
    scale = d**-0.5
    q0 = torch.randn(batch, hq, q_len, d, generator=gen) * 2.0
    k0, v0 = torch.randn(batch, hkv, kv_len, d, generator=gen) * 2.0, torch.randn(batch, hkv, kv_len, d, generator=gen)
    do = torch.randn(batch, hq, q_len, d, generator=gen).to(dtype)
    q, k, v = (leaf(t.to(dtype)) for t in (q0, k0, v0))
    qr, kr, vr = (leaf(t.to(dtype)) for t in (q0, k0, v0))
    qt, kt, vt = (leaf(t.to(dtype).float()) for t in (q0, k0, v0))
    out = attention(q, k, v, scale=scale, softcap=SOFTCAP, **kwargs)
    mask = build_attention_mask(q_len, kv_len, **kwargs)
    ref = attention_reference(qr, kr, vr, mask, scale, softcap=SOFTCAP)
    eager = _transformers_eager(qt, kt, vt, mask.expand(batch, 1, q_len, kv_len), scale, SOFTCAP)
    assert out.shape == (batch, hq, q_len, d) and out.dtype == dtype
    assert_close(out, ref, dtype, "softcap.out", reduction=True)
    assert_close(out, eager.to(dtype), dtype, "softcap.out_vs_transformers", reduction=True)
    uncapped = attention(q.detach(), k.detach(), v.detach(), scale=scale, **kwargs)
    assert not torch.allclose(out.detach().float(), uncapped.float(), atol=1e-2)  # the cap changes the result
    got, want = grads(out, [q, k, v], do), grads(ref, [qr, kr, vr], do)
    oracle = grads(eager, [qt, kt, vt], do.float())
    for name, g_, w_, o_ in zip(("dq", "dk", "dv"), got, want, oracle):
        assert_close(g_, w_, dtype, f"softcap.{name}", reduction=True)
        assert_close(g_, o_.to(dtype), dtype, f"softcap.{name}_vs_transformers", reduction=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 3])
def test_attention_softcap_doc_lengths_equals_document_mask(dtype, window):
    """Packed documents given as doc_lengths (one call per document) with GQA: the block-diagonal oracle."""
    hq, hkv, d = 6, 2, 24
    lengths = (5, 1, 9, 4)
    s = sum(lengths)
    gen = torch.Generator().manual_seed(24)
    docs = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    q0, k0 = torch.randn(1, hq, s, d, generator=gen) * 2.0, torch.randn(1, hkv, s, d, generator=gen) * 2.0
    v0, do = torch.randn(1, hkv, s, d, generator=gen), torch.randn(1, hq, s, d, generator=gen).to(dtype)
    q, k, v = (leaf(t.to(dtype)) for t in (q0, k0, v0))
    qr, kr, vr = (leaf(t.to(dtype)) for t in (q0, k0, v0))
    out = attention(q, k, v, scale=d**-0.5, doc_lengths=lengths, sliding_window=window, softcap=SOFTCAP)
    by_ids = attention(q.detach(), k.detach(), v.detach(), scale=d**-0.5, doc_ids=docs, sliding_window=window,
                       softcap=SOFTCAP)
    mask = build_attention_mask(s, s, doc_ids=docs, sliding_window=window)
    ref = attention_reference(qr, kr, vr, mask, d**-0.5, softcap=SOFTCAP)
    assert_close(out, ref, dtype, "softcap_varlen.out", reduction=True)
    assert_close(by_ids, ref, dtype, "softcap_doc_ids.out", reduction=True)
    for name, g_, w_ in zip(("dq", "dk", "dv"), grads(out, [q, k, v], do), grads(ref, [qr, kr, vr], do)):
        assert_close(g_, w_, dtype, f"softcap_varlen.{name}", reduction=True)


def test_attention_softcap_chunks_change_nothing(monkeypatch):
    """Queries in chunks of 1, 2 and 3 (a tiny chunk budget) give the same result and gradients as one chunk."""
    import importlib

    attention_module = importlib.import_module("engine_kernels.attention")
    gen = torch.Generator().manual_seed(25)
    pad = torch.ones(2, 10, dtype=torch.bool)
    pad[0, :2] = False
    kwargs = {"q_offset": 3, "key_padding_mask": pad, "sliding_window": 4}
    q0, k0, v0 = torch.randn(2, 4, 7, 16, generator=gen), torch.randn(2, 2, 10, 16, generator=gen), torch.randn(2, 2, 10, 16, generator=gen)
    do = torch.randn(2, 4, 7, 16, generator=gen)
    results = []
    for rows in (None, 1, 2, 3):
        if rows is not None:
            monkeypatch.setattr(attention_module, "SOFTCAP_CHUNK_SCORES", 2 * 4 * 10 * rows)
            assert attention_module._softcap_chunk(2 * 4, 10) == rows
        q, k, v = leaf(q0 * 3), leaf(k0), leaf(v0)
        out = attention(q, k, v, scale=0.25, softcap=1.5, **kwargs)
        results.append([out, *grads(out, [q, k, v], do)])
    for other in results[1:]:
        for name, a, b in zip(("out", "dq", "dk", "dv"), other, results[0]):
            assert_close(a, b, torch.float32, f"chunked.{name}", reduction=True)


def test_attention_huge_softcap_is_plain_attention():
    """softcap -> infinity is attention without a cap (the SDPA path)."""
    gen = torch.Generator().manual_seed(26)
    q, k, v = torch.randn(2, 3, 6, 24, generator=gen), torch.randn(2, 1, 6, 24, generator=gen), torch.randn(2, 1, 6, 24, generator=gen)
    pad = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    capped = attention(q, k, v, scale=0.2, key_padding_mask=pad, softcap=1e6)
    torch.testing.assert_close(capped, attention(q, k, v, scale=0.2, key_padding_mask=pad), rtol=1e-5, atol=1e-5)


def test_attention_softcap_saves_no_score_matrix():
    """Saved for backward: q, k, v and one fp32 log-sum-exp per query and head, never [s_q, s_k] scores."""
    from tests.kernels.op_testing import record_saved

    b, hq, hkv, s, d = 1, 4, 2, 40, 16
    q, k, v = leaf(torch.randn(b, hq, s, d)), leaf(torch.randn(b, hkv, s, d)), leaf(torch.randn(b, hkv, s, d))
    with record_saved() as saved:
        attention(q, k, v, scale=0.25, softcap=5.0, sliding_window=8)
    assert sorted(shape for shape, *_ in saved) == sorted([(b, hq, s, d), (b, hkv, s, d), (b, hkv, s, d),
                                                           (b, hkv, hq // hkv, s)])


@pytest.mark.parametrize("bad", [0.0, -50.0, "50", float("nan")])
def test_attention_softcap_must_be_positive(bad):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="softcap must be a positive number"):
        attention(q, q, q, scale=0.3, softcap=bad)
