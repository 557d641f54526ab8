"""QLoRA, gradient checkpointing and full fine-tuning give the gradients they should."""

from __future__ import annotations

import pytest
import torch

from engine import FastModel
from engine.peft import disable_adapter, lora_modules
from engine_kernels.nf4 import nf4_dequantize
from tests.test_parity import assert_close_rel


def _load(folder, **kw):
    return FastModel.from_pretrained(folder, dtype=torch.float32, device="cpu", verbose=False, **kw)[0]


def _lora(model, seed=5):
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    g = torch.Generator().manual_seed(seed)
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_qlora_equals_lora_on_dequantized_weights(hf_folders):
    """A 4-bit model computes exactly what a dense model holding the dequantized weights computes."""
    q = _lora(_load(hf_folders["qwen2"], load_in_4bit=True))
    dense = _lora(_load(hf_folders["qwen2"]))
    for (name, mq), (_, md) in zip(q.named_modules(), dense.named_modules()):
        if getattr(mq, "is_quantized", False):
            with torch.no_grad():
                md.weight.copy_(nf4_dequantize(mq.nf4_weight(), dtype=torch.float32))
    ids = torch.randint(0, 200, (2, 12))
    loss_q, grads_q = _loss_and_grads(q, ids)
    loss_d, grads_d = _loss_and_grads(dense, ids)
    assert_close_rel(loss_q, loss_d, what="qlora loss")
    assert grads_q.keys() == grads_d.keys()
    for name in grads_q:
        assert_close_rel(grads_q[name], grads_d[name], rtol=1e-5, what=name)


def test_qlora_weights_are_4bit_and_frozen(hf_folders):
    model = _lora(_load(hf_folders["llama"], load_in_4bit=True))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight is None and q_proj.is_quantized
    assert q_proj.weight_nf4_packed.dtype == torch.uint8
    assert q_proj.weight_nf4_packed.numel() == q_proj.in_features * q_proj.out_features // 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)


@pytest.mark.parametrize("mode", [True, "smart"])
def test_gradient_checkpointing_gives_identical_gradients(hf_folders, mode):
    model = _lora(_load(hf_folders["llama31"]))
    ids = torch.randint(0, 200, (2, 16))
    loss_plain, grads_plain = _loss_and_grads(model, ids)
    FastModel.set_gradient_checkpointing(model, mode)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, ids)
    assert torch.equal(loss_plain, loss_ckpt)
    for name in grads_plain:
        assert torch.equal(grads_plain[name], grads_ckpt[name]), name


def test_full_finetuning_trains_every_weight(hf_folders):
    model = _load(hf_folders["mistral"]).train()
    ids = torch.randint(0, 200, (2, 10))
    loss, grads = _loss_and_grads(model, ids)
    n_params = len({id(p) for p in model.parameters()})
    assert len({n for n in grads}) >= n_params
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer.step()
    with torch.no_grad():
        assert model(ids, labels=ids).loss < loss


def test_lora_training_lowers_the_loss_and_disable_adapter_restores_base(hf_folders):
    model = FastModel.get_peft_model(_load(hf_folders["qwen3"]), r=8, lora_alpha=16, use_gradient_checkpointing=True)
    ids = torch.randint(0, 200, (4, 12))
    with torch.no_grad():
        base_logits = model.eval()(ids).logits
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    model.eval()
    with torch.no_grad(), disable_adapter(model):
        assert torch.equal(model(ids).logits, base_logits)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base_logits)


def test_lora_dropout_is_active_only_in_training(hf_folders):
    model = FastModel.get_peft_model(_load(hf_folders["llama"]), r=4, lora_dropout=0.5, use_gradient_checkpointing=False)
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora_B.normal_()
    ids = torch.randint(0, 200, (1, 8))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_packed_row_equals_documents_run_alone(hf_folders, family):
    """Position ids restarting at 0 mark packed documents: no attention across them, RoPE restarts,
    and no document's first token is predicted from the previous one."""
    model = _lora(_load(hf_folders[family]))
    docs = [torch.randint(0, 200, (1, n)) for n in (5, 8, 1, 4)]
    packed = torch.cat(docs, 1)
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    out = model(packed, position_ids=position_ids, labels=packed, num_items_in_batch=1, return_logits=True)
    alone_sum = sum(model(d, labels=d, num_items_in_batch=1).loss for d in docs if d.shape[1] > 1)
    assert_close_rel(out.loss, alone_sum, what="packed loss (sum)")
    start = 0
    for d in docs:
        with torch.no_grad():
            assert_close_rel(out.logits[:, start : start + d.shape[1]], model(d).logits, what="packed logits")
        start += d.shape[1]
