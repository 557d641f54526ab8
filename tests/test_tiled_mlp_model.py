"""The tiled MLP in a whole model: ``get_peft_model(tiled_mlp=...)`` gives the untiled loss and LoRA gradients.

A tiny Llama (hidden 80, intermediate 56, 2 layers) with LoRA on every projection, 37 tokens in tiles of 8
(four full tiles and one of 5), with and without gradient checkpointing, LoRA dropout and NF4 bases.
"""

from __future__ import annotations

import pytest
import torch

import engine.modules.linear as linear_module
from engine import FastModel
from engine.errors import ConfigurationError
from engine.peft import lora_modules
from engine_kernels.tiled_mlp import default_tile_rows
from tests.kernels.op_testing import assert_close

SEQ, TILE = 37, 8


def _model(folder, dropout=0.0, load_in_4bit=False, **peft):
    model, _ = FastModel.from_pretrained(str(folder), dtype="float32", device="cpu", load_in_4bit=load_in_4bit,
                                         verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=dropout, **peft)
    g = torch.Generator().manual_seed(5)
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)  # B = 0 would hide errors in dA
    return model


def _step(model, seed=11):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (1, SEQ), generator=g)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks in every run
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture()
def tiled_calls(monkeypatch):
    """Counts the MLP calls that ran tiled (through ``tiled_lora_mlp``)."""
    calls = []
    real = linear_module.tiled_lora_mlp

    def spy(x, *args, **kwargs):
        calls.append((x.shape, kwargs.get("tile_rows")))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(linear_module, "tiled_lora_mlp", spy)
    return calls


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_ckpt", "ckpt"])
@pytest.mark.parametrize(("dropout", "nf4"), [(0.0, False), (0.1, False), (0.1, True)],
                         ids=["p0", "p0.1", "p0.1_nf4"])
def test_tiled_model_equals_untiled(hf_folders, tiled_calls, checkpointing, dropout, nf4):
    model = _model(hf_folders["llama"], dropout, nf4, use_gradient_checkpointing=checkpointing, tiled_mlp=TILE)
    assert model.tiled_mlp == TILE and all(layer.mlp.tile_rows == TILE for layer in model.model.layers)
    loss, grads = _step(model)
    layers = len(model.model.layers)
    # One tiled call per layer (twice with checkpointing: the layer forward is recomputed in backward).
    assert len(tiled_calls) == layers * (2 if checkpointing else 1)
    assert all(tile == TILE and shape[:-1] == (1, SEQ) for shape, tile in tiled_calls)

    FastModel.set_tiled_mlp(model, False)
    assert model.tiled_mlp is None and all(layer.mlp.tile_rows is None for layer in model.model.layers)
    tiled_calls.clear()
    loss_ref, grads_ref = _step(model)
    assert not tiled_calls
    assert set(grads) == set(grads_ref) and len(grads) == 7 * 2 * layers
    assert_close(loss, loss_ref, torch.float32, "loss", reduction=True)
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], torch.float32, name, reduction=True)
    if dropout:  # the dropout is really active: another seed gives another loss
        assert not torch.allclose(_step(model, seed=12)[0], loss_ref)


def test_not_tiled_outside_training_or_below_the_tile(hf_folders, tiled_calls):
    model = _model(hf_folders["llama"], use_gradient_checkpointing=False, tiled_mlp=SEQ)
    _step(model)  # 37 tokens are not more than one tile of 37
    FastModel.set_tiled_mlp(model, TILE)
    FastModel.for_inference(model)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 200, (1, SEQ)))
    assert not tiled_calls


def test_full_finetuning_stays_untiled(hf_folders):
    """Trainable base weights: the MLP falls back to the untiled path (the fused Functions need frozen bases)."""
    model, _ = FastModel.from_pretrained(str(hf_folders["llama"]), dtype="float32", device="cpu", verbose=False)
    FastModel.set_tiled_mlp(model, TILE)
    model.train()
    loss, grads = _step(model)
    FastModel.set_tiled_mlp(model, 0)
    loss_ref, grads_ref = _step(model)
    assert torch.equal(loss, loss_ref)
    assert all(torch.equal(grads[n], grads_ref[n]) for n in grads_ref)


def test_tiled_mlp_argument(hf_folders):
    model, _ = FastModel.from_pretrained(str(hf_folders["llama"]), dtype="float32", device="cpu", verbose=False)
    for bad in (-1, 2.5, "8", None, [8]):
        with pytest.raises(ConfigurationError, match="tiled_mlp"):
            FastModel.get_peft_model(model, r=4, tiled_mlp=bad)
        assert not lora_modules(model)  # validated before the model was changed
        with pytest.raises(ConfigurationError, match="tiled_mlp"):
            FastModel.set_tiled_mlp(model, bad)
    assert model.tiled_mlp is None
    FastModel.set_tiled_mlp(model, True)
    rows = default_tile_rows(model.args.hidden_size, model.args.intermediate_size)
    assert model.tiled_mlp == rows == 1024 and model.model.layers[1].mlp.tile_rows == rows
    FastModel.set_tiled_mlp(model, 0)
    assert model.tiled_mlp is None and model.model.layers[0].mlp.tile_rows is None
    FastModel.set_tiled_mlp(model, 16)
    FastModel.get_peft_model(model, r=4)  # default: off (as use_gradient_checkpointing, it sets the mode)
    assert model.tiled_mlp is None and model.model.layers[0].mlp.tile_rows is None
    model, _ = FastModel.from_pretrained(str(hf_folders["llama"]), dtype="float32", device="cpu", verbose=False)
    model = FastModel.get_peft_model(model, r=4, tiled_mlp=True)
    assert model.tiled_mlp == rows and model.model.layers[0].mlp.tile_rows == rows


def test_auto_tile_rows():
    from engine_kernels.tiled_mlp import auto_tile_rows

    assert auto_tile_rows(100) == 1024  # never below 1024 rows
    assert auto_tile_rows(16 * 1024) == 1024
    assert auto_tile_rows(300_000) == 18_944  # 16 tiles, rounded up to 256 rows
    assert -(-300_000 // auto_tile_rows(300_000)) <= 16


def test_auto_tiles_long_inputs_and_keeps_gradients(hf_folders, tiled_calls):
    """``tiled_mlp="auto"`` on 2,100 tokens: tiles of 1,024 rows, same loss and LoRA gradients as untiled."""
    global SEQ
    seq = SEQ
    SEQ = 2100
    try:
        base = _model(hf_folders["llama31"])
        base.max_seq_length = SEQ
        loss_ref, grads_ref = _step(base)
        auto = _model(hf_folders["llama31"], tiled_mlp="auto")
        auto.max_seq_length = SEQ
        assert auto.tiled_mlp == "auto"
        loss, grads = _step(auto)
    finally:
        SEQ = seq
    assert tiled_calls and all(rows == 1024 for _, rows in tiled_calls)
    assert_close(loss, loss_ref, torch.float32, "loss", reduction=True)
    for name, g in grads_ref.items():
        assert_close(grads[name], g, torch.float32, name, reduction=True)
