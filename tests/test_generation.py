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
