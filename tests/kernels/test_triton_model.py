"""Whole-model parity with every Triton kernel on (CPU: Triton's interpreter) against the PyTorch path.

A tiny odd-sized model of each family with LoRA (16-bit and NF4 base weights), a packed batch whose
positions restart (two documents per row) and a completion-only loss: the loss and every LoRA
gradient under ``ENGINE_KERNELS=triton`` equal those under ``ENGINE_KERNELS=torch``.
"""

from __future__ import annotations

import pytest
import torch

from engine import FastModel
from engine_kernels import dispatch
from engine_kernels.dispatch import record_backends
from tests.kernels.op_testing import assert_close


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 19), generator=g)
    positions = torch.tensor([list(range(11)) + list(range(8)), list(range(5)) + list(range(14))])
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt that is not trained on
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def _loss_and_grads(model, batch, backend: str, monkeypatch) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    monkeypatch.setenv(dispatch.ENV_VAR, backend)
    model.zero_grad(set_to_none=True)
    with record_backends() as used:
        loss = model(**batch).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, used


@pytest.mark.parametrize(
    "family,load_in_4bit",
    [("llama31", False), ("llama31", True), ("qwen3", False), ("qwen3", True), ("gemma2", False), ("gemma3", False),
     ("phi3", False)],
    ids=lambda v: {False: "lora16", True: "qlora"}.get(v, v) if isinstance(v, bool) else v,
)
def test_model_with_triton_kernels_equals_torch_path(hf_folders, monkeypatch, family, load_in_4bit):
    """Gemma 2: GeGLU, the (1 + w) norms and soft-capped flash attention and loss; Gemma 3: q/k norms and local
    RoPE; Phi-3: fused projections and partial rotary."""
    model, _ = FastModel.from_pretrained(
        str(hf_folders[family]), dtype="float32", load_in_4bit=load_in_4bit, verbose=False
    )
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0, use_gradient_checkpointing=False)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)  # non-zero B: gradients reach A and the base path
    batch = _batch(model.args.vocab_size)
    loss_t, grads_t, used_t = _loss_and_grads(model, batch, "torch", monkeypatch)
    loss_x, grads_x, used_x = _loss_and_grads(model, batch, "triton", monkeypatch)

    glu = "geglu" if model.args.activation == "gelu_tanh" else "swiglu"
    assert set(used_t) >= {"rms_norm", "rope", glu, "cross_entropy", "attention", "lora_linear"}
    assert all(backends == {"torch"} for backends in used_t.values())
    expected_triton = {"rms_norm", "rope", glu, "cross_entropy", "attention"}
    expected_triton |= {"nf4_dequantize"} if load_in_4bit else set()
    assert {op for op, b in used_x.items() if b == {"triton"}} == expected_triton
    assert all(b == {"torch"} for op, b in used_x.items() if op not in expected_triton)

    assert_close(loss_x, loss_t, torch.float32, "loss")
    assert set(grads_x) == set(grads_t) and len(grads_t) > 0
    for name in grads_t:
        assert_close(grads_x[name], grads_t[name], torch.float32, name, reduction=True)


def test_load_message_reports_the_kernel_backends(hf_folders, monkeypatch, capsys):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    FastModel.from_pretrained(str(hf_folders["llama"]), dtype="float32")
    assert capsys.readouterr().out.strip().endswith("| kernels: PyTorch")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    FastModel.from_pretrained(str(hf_folders["llama"]), dtype="float32")
    line = capsys.readouterr().out.strip()
    assert "kernels: Triton (Triton's CPU interpreter: slow, for testing) for rms_norm, rope, swiglu" in line
    assert "attention" in line.split("kernels:")[1]
    assert line.endswith("PyTorch for the rest")


@pytest.mark.parametrize("name,load_in_4bit", [("mixtral", False), ("qwen3_moe", True)], ids=["mixtral", "qwen3_moe-qlora"])
def test_moe_model_with_triton_kernels_equals_torch_path(moe_folders, monkeypatch, name, load_in_4bit):
    """Mixture of experts: the grouped expert matmuls (and their LoRA factors) through the Triton grouped GEMM,
    with the router's aux loss in the loss; NF4 experts dequantized by the Triton NF4 kernel."""
    model, _ = FastModel.from_pretrained(str(moe_folders[name]), dtype="float32", load_in_4bit=load_in_4bit,
                                         verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0, use_gradient_checkpointing=False,
                                     target_parameters=["experts.gate_up_proj", "experts.down_proj", "gate.weight"])
    torch.manual_seed(1)
    for pname, param in model.named_parameters():
        if "lora_B" in pname:
            param.data.normal_(0, 0.1)
    batch = {**_batch(model.args.vocab_size), "output_router_logits": True}
    loss_t, grads_t, used_t = _loss_and_grads(model, batch, "torch", monkeypatch)
    loss_x, grads_x, used_x = _loss_and_grads(model, batch, "triton", monkeypatch)
    assert used_t["grouped_mm"] == {"torch"} and used_x["grouped_mm"] == {"triton"}
    assert_close(loss_x, loss_t, torch.float32, "loss")
    assert set(grads_x) == set(grads_t) and any("gate_up_proj_lora_A" in n for n in grads_t)
    for pname in grads_t:
        assert_close(grads_x[pname], grads_t[pname], torch.float32, pname, reduction=True)
