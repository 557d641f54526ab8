"""Triton flash attention over packed documents, forward and hand-written backward.

Checked against two oracles: :func:`flash_attention_reference` (fp32 attention document by document, autograd
backward) and an independent one, ``F.scaled_dot_product_attention`` over the whole packed row with a dense
block-diagonal causal (windowed) mask, which also checks the reference. Every test takes the ``triton_backend``
fixture (CPU tensors under Triton's interpreter when there is no GPU); shapes stay small because the
interpreter runs each program instance in numpy. Tolerances: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
import torch.nn.functional as F

from engine_kernels.flash_attention import (
    FlashAttentionFunction,
    KernelConfig,
    LaunchConfig,
    _flash_bwd_dkdv_kernel,
    _flash_bwd_dq_kernel,
    _flash_bwd_preprocess_kernel,
    _flash_fwd_kernel,
    _launch_config,
    audit_launches,
    flash_attention_forward,
    flash_attention_reference,
    flash_attention_varlen,
)
from tests.kernels.op_testing import assert_close, grads, leaf, record_saved

#: 16 x 16 tiles: documents of 20-33 tokens span several query and key blocks, so the block loops, the causal
#: limit and the window start are exercised (the default 16-bit tiles are 32-64 wide).
SMALL = LaunchConfig(*(KernelConfig(16, 16, 4, 2),) * 4)
FP32, BF16 = torch.float32, torch.bfloat16


def _cu_seqlens(lengths, device) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def _inputs(lengths, heads, kv_heads, head_dim, seed=0):
    """Random fp32 ``q, do [total, heads, d]`` and ``k, v [total, kv_heads, d]`` on the CPU."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, do = (torch.randn(total, heads, head_dim, generator=g) for _ in range(2))
    k, v = (torch.randn(total, kv_heads, head_dim, generator=g) for _ in range(2))
    return q, k, v, do


def _dense_mask(lengths, causal=True, window=None) -> torch.Tensor:
    """Bool ``[total, total]``: block-diagonal over documents, causal and windowed inside each block."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    idx = torch.arange(doc.numel())
    i, j = idx[:, None], idx[None, :]
    mask = doc[:, None] == doc[None, :]
    if causal:
        mask &= j <= i
    if window is not None:
        mask &= j > i - window
    return mask


def _dense_oracle(q, k, v, lengths, scale, causal=True, window=None, softcap=None):
    """SDPA over the whole packed row (``[1, heads, total, d]``, GQA by SDPA itself) with the dense mask, fp32;
    with a softcap (which SDPA cannot do) the same dense computation written out."""
    qf, kf, vf = (t.float().transpose(0, 1)[None] for t in (q, k, v))
    mask = _dense_mask(lengths, causal, window).to(q.device)
    if softcap is None:
        out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)
    rep = q.shape[1] // k.shape[1]
    kf, vf = kf.repeat_interleave(rep, dim=1), vf.repeat_interleave(rep, dim=1)
    scores = softcap * torch.tanh((qf @ kf.transpose(-1, -2)) * scale / softcap)
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vf
    return out[0].transpose(0, 1)


def _check(device, lengths, heads, kv_heads, head_dim, dtype, *, window=None, causal=True, config=None, softcap=None):
    """Forward and ``dq, dk, dv`` of the Triton Function vs the reference and the dense SDPA oracle."""
    q0, k0, v0, do0 = _inputs(lengths, heads, kv_heads, head_dim)
    if softcap is not None:  # scores well beyond the cap, so that it bends them
        q0, k0 = q0 * 2.0, k0 * 2.0
    cu, scale = _cu_seqlens(lengths, device), head_dim**-0.5
    do = do0.to(device, dtype)
    q, k, v = (leaf(t.to(device, dtype)) for t in (q0, k0, v0))
    out = FlashAttentionFunction.apply(q, k, v, cu, max(lengths), scale, causal, window, config, softcap)
    assert out.shape == q.shape and out.dtype == dtype
    got = grads(out, [q, k, v], do)

    qr, kr, vr = (leaf(t) for t in (q, k, v))
    ref = flash_attention_reference(qr, kr, vr, cu, scale=scale, causal=causal, sliding_window=window, softcap=softcap)
    want = grads(ref, [qr, kr, vr], do)
    qd, kd, vd = (leaf(t.float()) for t in (q, k, v))
    dense = _dense_oracle(qd, kd, vd, lengths, scale, causal, window, softcap)
    dense_grads = grads(dense, [qd, kd, vd], do.float())

    assert_close(out, ref, dtype, "out")
    assert_close(out, dense.to(dtype), dtype, "out_vs_sdpa")
    assert_close(ref, dense.to(dtype), dtype, "reference_vs_sdpa")
    for name, a, r, d in zip(("dq", "dk", "dv"), got, want, dense_grads):
        assert a.shape == r.shape and a.dtype == dtype
        assert_close(a, r, dtype, name, reduction=True)
        assert_close(a, d.to(dtype), dtype, f"{name}_vs_sdpa", reduction=True)
        assert_close(r, d.to(dtype), dtype, f"reference_{name}_vs_sdpa", reduction=True)


CASES = [
    # (lengths, heads, kv_heads, head_dim, dtype, window, config)
    *(pytest.param([1, 7, 33], 3, 1, d, FP32, None, None, id=f"fp32_docs1-7-33_h3kv1_d{d}") for d in (64, 80, 96, 128)),
    *(pytest.param([1, 7, 33], 3, 1, d, BF16, None, None, id=f"bf16_docs1-7-33_h3kv1_d{d}") for d in (64, 80)),
    pytest.param([40], 4, 4, 64, FP32, None, None, id="fp32_single_doc_h4kv4_d64"),
    pytest.param([7, 33], 3, 1, 64, FP32, 4, None, id="fp32_docs7-33_h3kv1_d64_window4"),
    pytest.param([7, 33], 4, 4, 80, FP32, 4, None, id="fp32_docs7-33_h4kv4_d80_window4"),
    pytest.param([7, 33], 3, 1, 64, BF16, 4, None, id="bf16_docs7-33_h3kv1_d64_window4"),
    pytest.param([7, 0, 33, 20], 3, 1, 64, FP32, None, SMALL, id="fp32_docs7-0-33-20_h3kv1_d64_small_blocks"),
    pytest.param([7, 33], 4, 4, 96, FP32, 4, SMALL, id="fp32_docs7-33_h4kv4_d96_window4_small_blocks"),
    pytest.param([33, 5], 3, 1, 80, FP32, 17, SMALL, id="fp32_docs33-5_h3kv1_d80_window17_small_blocks"),
    pytest.param([1, 7, 33], 3, 1, 128, BF16, 4, SMALL, id="bf16_docs1-7-33_h3kv1_d128_window4_small_blocks"),
    # Gemma's head dim 256 (Gemma-2/3: 16 heads on 8 KV heads, here 4 on 2) and Phi-3.5-mini's 96.
    pytest.param([7, 20], 4, 2, 256, FP32, None, None, id="fp32_docs7-20_h4kv2_d256"),
    pytest.param([7, 20], 4, 2, 256, BF16, 5, None, id="bf16_docs7-20_h4kv2_d256_window5"),
    pytest.param([1, 7, 33], 4, 2, 96, BF16, None, None, id="bf16_docs1-7-33_h4kv2_d96"),
]


@pytest.mark.parametrize("lengths,heads,kv_heads,head_dim,dtype,window,config", CASES)
def test_flash_attention_matches_reference_and_sdpa(triton_backend, lengths, heads, kv_heads, head_dim, dtype,
                                                    window, config):
    _check(triton_backend, lengths, heads, kv_heads, head_dim, dtype, window=window, config=config)


SOFTCAP_CASES = [
    # (lengths, heads, kv_heads, head_dim, dtype, window, config); softcap 2 (scores reach ~10)
    pytest.param([1, 7, 33], 3, 1, 64, FP32, None, None, id="fp32_docs1-7-33_h3kv1_d64"),
    pytest.param([7, 0, 33, 20], 4, 2, 64, FP32, 5, SMALL, id="fp32_docs7-0-33-20_h4kv2_d64_window5_small_blocks"),
    pytest.param([7, 33], 3, 1, 80, BF16, None, None, id="bf16_docs7-33_h3kv1_d80"),
    pytest.param([7, 20], 4, 2, 256, FP32, 6, SMALL, id="fp32_docs7-20_h4kv2_d256_window6_small_blocks"),
    pytest.param([7, 20], 4, 2, 256, BF16, 6, None, id="bf16_docs7-20_h4kv2_d256_window6"),
]


@pytest.mark.parametrize("lengths,heads,kv_heads,head_dim,dtype,window,config", SOFTCAP_CASES)
def test_flash_attention_softcap_matches_reference(triton_backend, lengths, heads, kv_heads, head_dim, dtype,
                                                   window, config):
    """``softcap`` (Gemma 2): forward and backward (``dS * (1 - tanh^2)``) against the reference and a dense oracle."""
    _check(triton_backend, lengths, heads, kv_heads, head_dim, dtype, window=window, config=config, softcap=2.0)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("setup", ["padding", "documents", "doc_lengths_window", "cache"])
def test_attention_softcap_triton_equals_torch_path(triton_backend, monkeypatch, setup, dtype):
    """The dispatched :func:`engine_kernels.attention.attention` with a softcap: the Triton kernel where the layout is
    variable-length (packed documents), the PyTorch path (padding, KV cache) otherwise; both against the PyTorch
    path (ENGINE_KERNELS=torch), forward and gradients."""
    from engine_kernels.attention import attention
    from engine_kernels.dispatch import record_backends

    device, (b, hq, hkv, d) = triton_backend, (2, 4, 2, 32)
    s, kwargs = 12, {}
    if setup == "padding":
        pad = torch.ones(b, s, dtype=torch.bool)
        pad[0, :3] = False
        kwargs["key_padding_mask"] = pad.to(device)
    elif setup == "documents":
        kwargs["doc_ids"] = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3], device=device)
    elif setup == "doc_lengths_window":
        b, kwargs = 1, {"doc_lengths": (5, 1, 6), "sliding_window": 3}
    q_len = 4 if setup == "cache" else s
    if setup == "cache":
        kwargs["q_offset"] = s - q_len
    gen = torch.Generator().manual_seed(9)
    q0, do0 = (torch.randn(b, hq, q_len, d, generator=gen) * 2 for _ in range(2))
    k0, v0 = torch.randn(b, hkv, s, d, generator=gen) * 2, torch.randn(b, hkv, s, d, generator=gen)
    q, k, v = (leaf(t.to(device, dtype)) for t in (q0, k0, v0))
    qr, kr, vr = (leaf(t.to(device, dtype)) for t in (q0, k0, v0))
    do = do0.to(device, dtype)
    with record_backends() as used:
        out = attention(q, k, v, scale=d**-0.5, softcap=2.0, **kwargs)
    assert used["attention"] == {"triton"}
    got = grads(out, [q, k, v], do)
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    ref = attention(qr, kr, vr, scale=d**-0.5, softcap=2.0, **kwargs)
    want = grads(ref, [qr, kr, vr], do)
    assert_close(out, ref, dtype, "out", reduction=True)
    for name, a, r in zip(("dq", "dk", "dv"), got, want):
        assert_close(a, r, dtype, name, reduction=True)


@pytest.mark.parametrize("config", [None, SMALL], ids=["default_blocks", "small_blocks"])
def test_flash_attention_non_causal(triton_backend, config):
    _check(triton_backend, [1, 7, 33], 4, 2, 64, FP32, causal=False, config=config)


def test_public_entry_and_strided_inputs(triton_backend):
    """``flash_attention_varlen`` on q/k/v sliced out of one fused QKV tensor (token stride != heads * d)."""
    lengths, heads, kv_heads, d = [7, 33], 3, 1, 64
    device, cu, scale = triton_backend, _cu_seqlens(lengths, triton_backend), d**-0.5
    fused = leaf(torch.randn(sum(lengths), heads + 2 * kv_heads, d).to(device))
    q, k, v = fused.split([heads, kv_heads, kv_heads], dim=1)
    assert not q.is_contiguous()
    out = flash_attention_varlen(q, k, v, cu, max(lengths), scale=scale, sliding_window=4)
    do = torch.randn_like(out)
    (got,) = grads(out, [fused], do)
    fused_ref = leaf(fused)
    ref = flash_attention_reference(*fused_ref.split([heads, kv_heads, kv_heads], dim=1), cu, scale=scale,
                                    sliding_window=4)
    (want,) = grads(ref, [fused_ref], do)
    assert_close(out, ref, FP32, "out")
    assert_close(got, want, FP32, "dqkv", reduction=True)


@pytest.mark.parametrize("window,config", [(None, None), (4, SMALL)], ids=["causal", "window4_small_blocks"])
def test_saved_lse_is_logsumexp_of_scores(triton_backend, window, config):
    lengths, heads, kv_heads, d = [1, 7, 33], 3, 1, 80
    q0, k0, v0, _ = _inputs(lengths, heads, kv_heads, d, seed=1)
    scale = d**-0.5
    cu = _cu_seqlens(lengths, triton_backend)
    q, k, v = (t.to(triton_backend) for t in (q0, k0, v0))
    _, lse = flash_attention_forward(q, k, v, cu, max(lengths), scale, True, window, config)
    assert lse.shape == (heads, sum(lengths)) and lse.dtype == torch.float32
    scores = torch.einsum("thd,shd->hts", q0, k0.repeat_interleave(heads // kv_heads, dim=1)) * scale
    scores = scores.masked_fill(~_dense_mask(lengths, window=window), float("-inf"))
    assert_close(lse, torch.logsumexp(scores, dim=-1).to(lse.device), FP32, "lse", reduction=True)


def test_documents_are_independent(triton_backend):
    """Changing one document's K/V leaves the other documents' outputs bit-identical; its K/V get no gradient
    from the other documents' outputs."""
    lengths, heads, kv_heads, d = [5, 33, 9], 4, 2, 64
    device, cu, scale = triton_backend, _cu_seqlens(lengths, triton_backend), d**-0.5
    q0, k0, v0, _ = _inputs(lengths, heads, kv_heads, d, seed=2)
    q, k, v = (leaf(t.to(device)) for t in (q0, k0, v0))
    middle, others = slice(5, 38), torch.ones(sum(lengths), dtype=torch.bool)
    others[middle] = False
    out = flash_attention_varlen(q, k, v, cu, max(lengths), scale=scale)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[middle] += torch.randn_like(k2[middle])
    v2[middle] += torch.randn_like(v2[middle])
    out2 = flash_attention_varlen(q.detach(), k2, v2, cu, max(lengths), scale=scale)
    assert torch.equal(out[others], out2[others])
    assert not torch.allclose(out[middle], out2[middle])
    do = torch.randn_like(out)
    do[middle] = 0.0
    _, dk, dv = grads(out, [q, k, v], do)
    assert torch.count_nonzero(dk[middle]) == 0 and torch.count_nonzero(dv[middle]) == 0
    assert torch.count_nonzero(dk[others]) > 0


def test_saves_only_inputs_output_and_lse(triton_backend):
    lengths, heads, kv_heads, d = [7, 9], 4, 2, 64
    q, k, v = (leaf(t.to(triton_backend)) for t in _inputs(lengths, heads, kv_heads, d)[:3])
    with record_saved() as saved:
        flash_attention_varlen(q, k, v, _cu_seqlens(lengths, triton_backend), 9, scale=0.125)
    total = sum(lengths)
    assert sorted(saved) == sorted([
        ((total, heads, d), FP32, total * heads * d * 4), ((total, kv_heads, d), FP32, total * kv_heads * d * 4),
        ((total, kv_heads, d), FP32, total * kv_heads * d * 4), ((total, heads, d), FP32, total * heads * d * 4),
        ((heads, total), FP32, heads * total * 4), ((3,), torch.int32, 12),
    ])


def test_invalid_arguments(triton_backend):
    q = torch.zeros(4, 2, 64, device=triton_backend)
    cu = _cu_seqlens([4], triton_backend)
    with pytest.raises(ValueError, match="causal"):
        flash_attention_varlen(q, q, q, cu, 4, scale=0.1, causal=False, sliding_window=2)
    with pytest.raises(ValueError, match="sliding_window"):
        flash_attention_varlen(q, q, q, cu, 4, scale=0.1, sliding_window=0)
    with pytest.raises(ValueError, match="head_dim"):
        _launch_config(512, torch.bfloat16)
    with pytest.raises(ValueError, match="softcap"):
        flash_attention_varlen(q, q, q, cu, 4, scale=0.1, softcap=0.0)


def _params(kernel) -> tuple[list[str], set[str]]:
    params = inspect.signature(getattr(kernel, "fn", kernel)).parameters.values()
    runtime = [p.name for p in params if "constexpr" not in str(p.annotation)]
    return runtime, {p.name for p in params if "constexpr" in str(p.annotation)}


def test_audit_launches_match_kernel_signatures():
    """Audit records name exactly each kernel's runtime parameters (in order) and its constexprs, in the
    configurations :func:`_launch_config` picks, for every head dim, dtype and window setting."""
    launches = audit_launches()
    kernels = {_flash_fwd_kernel: "forward", _flash_bwd_preprocess_kernel: "preprocess",
               _flash_bwd_dkdv_kernel: "dkdv", _flash_bwd_dq_kernel: "dq"}
    seen = set()
    for launch in launches:
        assert launch.op == "attention"
        runtime, constexprs = _params(launch.kernel)
        assert list(launch.signature) == runtime
        assert set(launch.constexprs) == constexprs
        assert [n for n in launch.kernel.arg_names if n not in launch.constexprs] == list(launch.signature)
        head_dim = launch.constexprs["HEAD_DIM"]
        dtype = torch.bfloat16 if "bfloat16" in launch.shape else torch.float16
        cfg = getattr(_launch_config(head_dim, dtype), kernels[launch.kernel])
        assert (launch.num_warps, launch.num_stages) == (cfg.num_warps, cfg.num_stages)
        if launch.kernel is not _flash_bwd_preprocess_kernel:
            assert (launch.constexprs["BLOCK_M"], launch.constexprs["BLOCK_N"]) == (cfg.block_m, cfg.block_n)
        seen.add((kernels[launch.kernel], head_dim, dtype, launch.constexprs.get("WINDOW"),
                  launch.constexprs.get("HAS_SOFTCAP")))
    # Every head dim in bf16; 128 (Llama, Mistral) and 256 (Gemma) also in fp16; Mistral's, Phi-3.5's and Gemma's
    # sliding window; Gemma-2's softcap, alone and with the window.
    expected = [(d, torch.bfloat16, False, False) for d in (64, 80, 96, 128, 256)]
    expected += [(d, torch.float16, False, False) for d in (128, 256)]
    expected += [(d, torch.bfloat16, True, False) for d in (96, 128, 256)]
    expected += [(256, torch.bfloat16, False, True), (256, torch.bfloat16, True, True)]
    for head_dim, dtype, window, softcap in expected:
        assert ("preprocess", head_dim, dtype, None, None) in seen
        for name in ("forward", "dkdv", "dq"):
            assert (name, head_dim, dtype, window, softcap) in seen
