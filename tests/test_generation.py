"""Generation with the KV cache: equals transformers' greedy decoding and a cache-free recomputation."""

from __future__ import annotations

import torch

from engine import FastModel
from tests.conftest import make_hf_model


def _load(folder):
    model, _ = FastModel.from_pretrained(folder, dtype=torch.float32, device="cpu", verbose=False)
    return model


def _left_padded_batch():
    a = torch.randint(3, 200, (1, 5))
    b = torch.randint(3, 200, (1, 9))
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), a], 1), b])
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask


def test_greedy_equals_transformers(hf_folders):
    for family in ("llama", "qwen3", "mistral"):
        hf = make_hf_model(family)
        ours = _load(hf_folders[family])
        ids, mask = _left_padded_batch()
        expected = hf.generate(
            ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        actual = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
        assert torch.equal(actual, expected), family


def test_cache_equals_recomputation(hf_folders):
    model = _load(hf_folders["qwen2"])
    ids = torch.randint(3, 200, (1, 7))
    generated = model.generate(ids, max_new_tokens=10, eos_token_id=[])
    seq = ids
    with torch.no_grad():
        for _ in range(10):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(generated, seq)


def test_stops_at_eos_and_pads(hf_folders):
    model = _load(hf_folders["llama"])
    ids = torch.randint(3, 200, (2, 6))
    free = model.generate(ids, max_new_tokens=8, eos_token_id=[])
    eos = int(free[0, 6 + 2])  # the third generated token of row 0 becomes "EOS"
    stopped = model.generate(ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=1)
    row0 = stopped[0, 6:]
    first = int((row0 == eos).nonzero()[0])
    assert first <= 2
    assert bool((row0[first + 1 :] == 1).all())
    # A single sequence stops as soon as it emits EOS.
    alone = model.generate(ids[:1], max_new_tokens=8, eos_token_id=eos)
    assert alone.shape[1] == 6 + first + 1 and int(alone[0, -1]) == eos


def test_sampling_is_seeded_and_top_k_1_is_greedy(hf_folders):
    model = _load(hf_folders["llama"])
    ids = torch.randint(3, 200, (2, 5))
    s1 = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.9, seed=3, eos_token_id=[])
    s2 = model.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.9, seed=3, eos_token_id=[])
    assert torch.equal(s1, s2)
    greedy = model.generate(ids, max_new_tokens=8, eos_token_id=[])
    top1 = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, seed=5, eos_token_id=[])
    assert torch.equal(top1, greedy)


def test_decode_attention_equals_reference_with_padding_and_gqa():
    """A decode step (one query per row, every cached key) takes the folded-GQA path: same result as the oracle."""
    from engine_kernels.attention import attention, attention_reference, build_attention_mask

    torch.manual_seed(0)
    b, hq, hkv, kv_len, d = 3, 6, 2, 9, 16
    q = torch.randn(b, hq, 1, d)
    k, v = torch.randn(b, hkv, kv_len, d), torch.randn(b, hkv, kv_len, d)
    padding = torch.ones(b, kv_len, dtype=torch.bool)
    padding[0, :4] = False
    padding[2, :1] = False
    out = attention(q, k, v, scale=d**-0.5, q_offset=kv_len - 1, key_padding_mask=padding)
    mask = build_attention_mask(1, kv_len, q_offset=kv_len - 1, key_padding_mask=padding)
    torch.testing.assert_close(out, attention_reference(q, k, v, mask, d**-0.5), atol=1e-5, rtol=1e-5)


def test_sampling_follows_the_distribution_and_skips_cut_tokens():
    """Inverse-CDF sampling: frequencies match the softmax; tokens cut by top_k are never drawn."""
    from engine.models.generation import _pick_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4)
    gen = torch.Generator().manual_seed(0)
    picks = _pick_next(logits, True, 1.0, 0, 1.0, gen)
    freq = torch.bincount(picks, minlength=4).float() / picks.numel()
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015, rtol=0)
    cut = _pick_next(logits, True, 1.0, 2, 1.0, gen)
    assert set(cut.unique().tolist()) == {0, 1}
    nucleus = _pick_next(logits, True, 1.0, 0, 0.6, gen)  # 0.5 < 0.6: tokens 0 and 1 kept
    assert set(nucleus.unique().tolist()) == {0, 1}
