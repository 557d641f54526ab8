"""Gradient checkpointing of decoder layers, plain and with host offload ("smart"): identical loss and gradients.

Until ``CausalLM._hidden_states`` calls :func:`checkpoint_layer`, :func:`_loss` below reproduces its
forward (embedding, shared context, the layer loop, final norm, fused loss) with the function called directly.
"""

from __future__ import annotations

import pytest
import torch

from engine import FastModel
from engine.modules import checkpointing
from engine.modules.checkpointing import checkpoint_layer
from engine.peft import lora_modules

MODES = ("none", "plain", "offload")


def _load(folder):
    return FastModel.from_pretrained(str(folder), dtype="float32", device="cpu", verbose=False)[0]


def _lora(folder, dropout=0.0):
    model = FastModel.get_peft_model(
        _load(folder), r=4, lora_alpha=8, lora_dropout=dropout, use_gradient_checkpointing=False
    )
    g = torch.Generator().manual_seed(5)
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)  # B = 0 would hide errors in dA
    return model.train()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (2, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the context carries a key padding mask too
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 3] = -100  # the first real token after left padding is no target (as the collators write it)
    return ids, mask, labels


def _loss(model, ids, mask, labels, mode: str, force_copy: bool = True) -> torch.Tensor:
    """``CausalLM.forward(...).loss`` with each layer run plainly or through :func:`checkpoint_layer`."""
    x = model.model.embed_tokens(ids)
    ctx = model._context(ids, mask, None, None, x.dtype)
    for layer in model.model.layers:
        if mode == "none":
            x = layer(x, ctx)
        else:
            x = checkpoint_layer(layer, x, ctx, offload=mode == "offload", _force_copy=force_copy)
    return model._loss(model.model.norm(x), labels, None)


def _loss_and_grads(model, batch, mode, seed=11, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks in every mode
    loss = _loss(model, *batch, mode, **kw)
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None
    }


def _assert_same(results, trainable):
    (loss0, grads0), *others = results
    assert set(grads0) == trainable, sorted(trainable - set(grads0))
    for loss, grads in others:
        assert torch.equal(loss, loss0)
        assert grads.keys() == grads0.keys()
        for name in grads0:
            assert torch.equal(grads[name], grads0[name]), name


def test_helper_reproduces_the_model_forward(hf_folders):
    model = _lora(hf_folders["llama"])
    ids, mask, labels = _batch()
    with torch.no_grad():
        assert torch.equal(_loss(model, ids, mask, labels, "none"), model(ids, attention_mask=mask, labels=labels).loss)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_lora_gradients_identical_in_every_mode(hf_folders, family):
    model = _lora(hf_folders[family])
    batch = _batch()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    _assert_same([_loss_and_grads(model, batch, mode) for mode in MODES], trainable)


def test_lora_dropout_masks_are_reproduced(hf_folders):
    """With dropout active, recomputation must draw the same masks: RNG state is saved and restored."""
    model = _lora(hf_folders["llama"], dropout=0.1)
    batch = _batch(1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    results = [_loss_and_grads(model, batch, mode) for mode in MODES]
    _assert_same(results, trainable)
    # The dropout is really active: another seed gives another loss.
    other, _ = _loss_and_grads(model, batch, "none", seed=12)
    assert not torch.equal(other, results[0][0])
    # And the RNG stream after the step is the same as without checkpointing (restored, not consumed twice).
    after = []
    for mode in MODES:
        _loss_and_grads(model, batch, mode)
        after.append(torch.rand(4))
    assert all(torch.equal(a, after[0]) for a in after)


def test_full_finetuning_gradients_identical(hf_folders):
    model = _load(hf_folders["mistral"]).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".layers.0.self_attn.q_proj.weight" in n for n in trainable)
    assert any("embed_tokens" in n for n in trainable)  # x of layer 0 requires grad here
    _assert_same([_loss_and_grads(model, _batch(2), mode) for mode in MODES], trainable)


def test_offload_copies_the_layer_input_and_restores_it(hf_folders, monkeypatch):
    """Forced copy path: exactly one [b, s, d] tensor (the layer input) per layer goes out and comes back,
    the previous layer's input is prefetched when a layer's backward starts."""
    model = _lora(hf_folders["llama"])
    ids, mask, labels = _batch()
    d = model.args.hidden_size
    packed, events = [], []
    pack, restore, unpack = checkpointing._pack_to_host, checkpointing._start_restore, checkpointing._unpack_to_device

    def spy_pack(x):
        record = pack(x)
        packed.append((record, x.data_ptr()))
        return record

    def index(record):
        return next(i for i, (r, _) in enumerate(packed) if r is record)

    def spy_restore(record):
        events.append(("restore", index(record)))
        restore(record)

    def spy_unpack(record):
        events.append(("unpack", index(record)))
        out = unpack(record)
        assert out.data_ptr() not in (record.host.data_ptr(), packed[index(record)][1])  # a real copy
        assert torch.equal(out, record.host)
        return out

    monkeypatch.setattr(checkpointing, "_pack_to_host", spy_pack)
    monkeypatch.setattr(checkpointing, "_start_restore", spy_restore)
    monkeypatch.setattr(checkpointing, "_unpack_to_device", spy_unpack)
    monkeypatch.setattr(checkpointing._LAST_PACKED, "record", None, raising=False)
    loss = _loss(model, ids, mask, labels, "offload")
    n = len(model.model.layers)
    assert [tuple(r.host.shape) for r, _ in packed] == [(2, 13, d)] * n
    assert all(r.host.device.type == "cpu" and r.host.data_ptr() != ptr for r, ptr in packed)
    loss.backward()
    # Backward walks the layers in reverse; unpacking layer i starts layer i-1's copy back (prefetch).
    expected = []
    for i in reversed(range(n)):
        expected += [("unpack", i)] + ([("restore", i)] if i == n - 1 else []) + ([("restore", i - 1)] if i else [])
    assert events == expected


def test_offload_is_a_no_op_on_cpu(hf_folders, monkeypatch):
    """Without the testing switch, offload on CPU copies nothing (the tensor is already in host memory)."""
    model = _lora(hf_folders["llama"])
    calls = []
    monkeypatch.setattr(checkpointing, "_pack_to_host", lambda x: calls.append(x) or x)
    loss_plain, grads_plain = _loss_and_grads(model, _batch(), "plain")
    loss_off, grads_off = _loss_and_grads(model, _batch(), "offload", force_copy=False)
    assert calls == []
    assert torch.equal(loss_plain, loss_off)
    assert all(torch.equal(grads_plain[k], grads_off[k]) for k in grads_plain)


def test_offload_with_autograd_grad_and_retained_graph(hf_folders):
    """Non-reentrant semantics: torch.autograd.grad works, and a retained graph can be differentiated twice."""
    model = _lora(hf_folders["qwen2"])
    params = [p for p in model.parameters() if p.requires_grad]
    batch = _batch(3)
    torch.manual_seed(0)
    want = torch.autograd.grad(_loss(model, *batch, "none"), params)
    torch.manual_seed(0)
    loss = _loss(model, *batch, "offload")
    first = torch.autograd.grad(loss, params, retain_graph=True)
    second = torch.autograd.grad(loss, params)
    for a, b, c in zip(first, second, want):
        assert torch.equal(a, c) and torch.equal(b, c)
    assert all(p.grad is None for p in params)  # nothing accumulated behind autograd.grad's back


def test_no_grad_runs_the_layer_plainly(hf_folders, monkeypatch):
    model = _lora(hf_folders["llama"])
    calls = []
    monkeypatch.setattr(checkpointing, "_pack_to_host", lambda x: calls.append(x) or x)
    ids, mask, labels = _batch()
    with torch.no_grad():
        got = _loss(model, ids, mask, labels, "offload")
        want = _loss(model, ids, mask, labels, "none")
    assert torch.equal(got, want) and calls == []
