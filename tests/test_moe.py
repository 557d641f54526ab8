"""Mixture of experts (Mixtral, Qwen3-MoE) against transformers + PEFT in fp32.

The oracle is transformers' own model (experts run by its eager loop) with PEFT's ``target_parameters`` LoRA on the
experts. Checked: logits, loss with and without ``output_router_logits`` (the aux loss), and the gradients of the
input embeddings, the attention LoRA, the expert LoRA and the router LoRA, with padded and packed rows.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from engine import FastModel
from engine.peft import expert_adapter_keys, expert_lora_modules, lora_modules
from tests.conftest import MOE_CONFIGS, make_hf_model

MOES = list(MOE_CONFIGS)
RTOL = 1e-5
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def assert_close_rel(actual, expected, rtol=RTOL, what=""):
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:g} x scale {scale:.3e}"


def adapter_params(model) -> dict:
    """``{PEFT key: our parameter}`` of every adapter (attention/dense-MLP projections, routers, experts)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"base_model.model.{name}.lora_A.weight"] = m.lora_A
        out[f"base_model.model.{name}.lora_B.weight"] = m.lora_B
    for name, m in expert_lora_modules(model).items():
        for projection, keys in expert_adapter_keys(name, m).items():
            out.update(zip(keys, m.lora_factors(projection)))
    return out


def peft_key(key: str) -> str:
    return key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")


def lora_pair(name, folder, router: bool = False, r: int = 3):
    """``(peft_model, ours)``: LoRA on the attention (and dense MLP) projections and every expert projection (and
    the router), the same A and random B on both sides, train mode."""
    hf = make_hf_model(name)
    ours, _ = FastModel.from_pretrained(str(folder), dtype=torch.float32, device="cpu", verbose=False)
    parameters = EXPERTS + (["gate.weight"] if router else [])
    ours = FastModel.get_peft_model(
        ours, r=r, lora_alpha=2 * r, target_parameters=parameters if router else None, use_gradient_checkpointing=False
    )
    assert sorted(ours.lora_settings.target_parameters) == sorted(parameters)
    hf = get_peft_model(hf, LoraConfig(r=r, lora_alpha=2 * r, target_modules=ours.lora_settings.target_modules,
                                       target_parameters=parameters))
    ours_params = adapter_params(ours)
    peft_params = {k: p for k, p in hf.named_parameters() if "lora_" in k}
    assert {peft_key(k) for k in ours_params} == set(peft_params), "adapter keys differ from PEFT's"
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for key, p in ours_params.items():
            if ".lora_B." in key:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            peft_params[peft_key(key)].copy_(p)
    return hf.train(), ours.train()


def assert_adapter_grads_close(ours, hf, what):
    peft_params = dict(hf.named_parameters())
    ours_params = adapter_params(ours)
    kinds = set()
    for key, p in ours_params.items():
        # The router's gradient flows through softmax and the renormalised top-k: fp32 rounding reaches 1.5e-5.
        rtol = 1e-4 if ".mlp.gate." in key else RTOL
        assert_close_rel(p.grad, peft_params[peft_key(key)].grad, rtol, what=f"{what} {key} grad")
        kinds.add("experts" if ".experts." in key else "gate" if ".mlp.gate." in key else "attention/mlp")
    return kinds


@pytest.mark.parametrize("name", MOES)
def test_logits_and_router_outputs_match_transformers(name, moe_folders):
    hf = make_hf_model(name)
    ours, _ = FastModel.from_pretrained(str(moe_folders[name]), dtype=torch.float32, device="cpu", verbose=False)
    ids = torch.randint(0, 67, (2, 17))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # right padding: the aux loss counts real tokens only
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, output_router_logits=True)
        actual = ours(ids, attention_mask=mask, output_router_logits=True)
        plain = ours(ids, attention_mask=mask)
    assert_close_rel(actual.logits[mask.bool()], expected.logits[mask.bool()], what=f"{name} logits")
    assert len(actual.router_logits) == len(expected.router_logits) == sum(ours.args.sparse_layers)
    real = mask.reshape(-1).bool()  # pad positions' outputs are not defined (their attention differs)
    for a, e in zip(actual.router_logits, expected.router_logits):
        assert_close_rel(a[real], e[real], what=f"{name} router logits")
    assert_close_rel(actual.aux_loss, expected.aux_loss, what=f"{name} aux loss")
    assert plain.aux_loss is None and plain.router_logits is None  # off by default, as in transformers


@pytest.mark.parametrize("name", MOES)
@pytest.mark.parametrize("router_logits", [False, True])
def test_lora_loss_and_gradients_match_peft_with_padding(name, router_logits, moe_folders):
    hf, ours = lora_pair(name, moe_folders[name], router=router_logits)
    ids = torch.randint(0, 67, (2, 19))
    mask = torch.ones_like(ids)
    mask[0, 14:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, :4] = -100
    embeds = hf.get_input_embeddings()(ids).detach()
    e_hf, e_ours = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
    out_hf = hf(inputs_embeds=e_hf, attention_mask=mask, labels=labels, output_router_logits=router_logits)
    out = ours(inputs_embeds=e_ours, attention_mask=mask, labels=labels, output_router_logits=router_logits)
    assert_close_rel(out.loss, out_hf.loss, what=f"{name} loss")
    if router_logits:
        assert_close_rel(out.aux_loss, out_hf.aux_loss, what=f"{name} aux loss")
        assert out.aux_loss.item() > 0
    out_hf.loss.backward()
    out.loss.backward()
    assert_close_rel(e_ours.grad, e_hf.grad, what=f"{name} input grad")
    kinds = assert_adapter_grads_close(ours, hf, name)
    assert {"experts", "attention/mlp"} <= kinds and (("gate" in kinds) == router_logits)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_packed_rows_match_transformers(name, moe_folders):
    hf, ours = lora_pair(name, moe_folders[name], router=True)
    ids = torch.randint(0, 67, (1, 23))
    position_ids = torch.cat([torch.arange(9), torch.arange(14)])[None]
    labels = ids.clone()
    labels[0, 9] = -100  # a document's first token is not predicted from the previous document
    out_hf = hf(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False, output_router_logits=True)
    out = ours(input_ids=ids, position_ids=position_ids, labels=labels, output_router_logits=True)
    assert_close_rel(out.loss, out_hf.loss, what=f"{name} packed loss")
    out_hf.loss.backward()
    out.loss.backward()
    assert_adapter_grads_close(ours, hf, f"{name} packed")


def test_gradient_checkpointing_keeps_router_aux_gradients(moe_folders):
    _, ours = lora_pair("qwen3_moe", moe_folders["qwen3_moe"], router=True)
    ids = torch.randint(0, 67, (2, 11))
    grads = []
    for checkpointing in (False, True):
        ours.gradient_checkpointing = checkpointing
        ours.zero_grad()
        out = ours(input_ids=ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        grads.append({k: p.grad.clone() for k, p in adapter_params(ours).items()})
    for key in grads[0]:
        assert_close_rel(grads[1][key], grads[0][key], what=f"checkpointed {key}")


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_greedy_generation_matches_transformers(name, moe_folders):
    hf = make_hf_model(name)
    ours, _ = FastModel.from_pretrained(str(moe_folders[name]), dtype=torch.float32, device="cpu", verbose=False)
    ids = torch.randint(3, 67, (1, 6))
    expected = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    actual = ours.generate(ids, max_new_tokens=8, do_sample=False)
    assert actual[0].tolist() == expected[0].tolist()


def test_tiled_moe_block_equals_untiled_and_saves_less(moe_folders):
    """``tiled_mlp`` on a sparse layer: the same loss, aux loss and gradients, and less saved for backward."""
    _, ours = lora_pair("qwen3_moe", moe_folders["qwen3_moe"], router=True)
    ids = torch.randint(0, 67, (2, 24))
    runs = []
    for tiled in (False, 7):
        FastModel.set_tiled_mlp(ours, tiled)
        ours.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            out = ours(input_ids=ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        runs.append((out.loss.detach(), out.aux_loss.detach(), {k: p.grad.clone() for k, p in adapter_params(ours).items()},
                     sum(saved)))
    (loss, aux, grads, saved_plain), (loss_t, aux_t, grads_t, saved_tiled) = runs
    assert_close_rel(loss_t, loss, what="tiled loss")
    assert_close_rel(aux_t, aux, what="tiled aux loss")
    for key in grads:
        assert_close_rel(grads_t[key], grads[key], 1e-4 if ".mlp.gate." in key else RTOL, what=f"tiled {key}")
    assert saved_tiled < 0.8 * saved_plain, (saved_tiled, saved_plain)
