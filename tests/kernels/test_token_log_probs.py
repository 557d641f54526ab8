"""Fused linear token log-probabilities: against the reference, chunking, no logits kept, and in the model.

Tolerances and helpers: :mod:`tests.kernels.op_testing`.
"""

from __future__ import annotations

import pytest
import torch

from engine_kernels import dispatch
from engine_kernels.errors import ConfigurationError
from engine_kernels.token_log_probs import (
    LinearTokenLogProbsFunction,
    linear_token_log_probs,
    token_log_probs_reference,
)
from tests.kernels.op_testing import DTYPES, IGNORE, assert_close, grads, leaf, random_labels, record_saved

N, H, V = 37, 24, 101  # odd shapes: nothing divides anything




def _data(n=N, hdim=H, vocab=V, scale=2.0, seed=31):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hdim, generator=g)
    weight = torch.randn(vocab, hdim, generator=g) * hdim**-0.5 * scale
    grad_out = torch.randn(n, generator=g)  # any upstream gradient, signs mixed
    return hidden, weight, grad_out


def _run(hidden0, weight0, targets, dtype, grad_out, w_grad=True, **kwargs):
    """Fused and reference outputs and gradients (w.r.t. hidden, and weight when ``w_grad``)."""
    h, w = leaf(hidden0.to(dtype)), leaf(weight0.to(dtype), w_grad)
    hr, wr = leaf(hidden0.to(dtype)), leaf(weight0.to(dtype), w_grad)
    chunk = kwargs.pop("chunk_size", None)
    out = linear_token_log_probs(h, w, targets, chunk_size=chunk, **kwargs)
    ref = token_log_probs_reference(hr, wr, targets, **kwargs)
    assert out.dtype == torch.float32 and out.shape == (len(targets),)
    inputs, ref_inputs = ([h, w], [hr, wr]) if w_grad else ([h], [hr])
    return out, ref, grads(out, inputs, grad_out), grads(ref, ref_inputs, grad_out), (h, w)


CASES = [
    # (chunk_size, target pattern, softcap)
    pytest.param(None, "none", None, id="chunkNone"),
    pytest.param(5, "scattered", None, id="chunk5_scattered"),
    pytest.param(8, "ends", None, id="chunk8_ignore_ends"),
    pytest.param(1, "middle", None, id="chunk1_ignore_middle"),
    pytest.param(6, "middle", 3.0, id="chunk6_softcap3"),
    pytest.param(None, "scattered", 3.0, id="chunkNone_softcap3"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk,pattern,softcap", CASES)
def test_token_log_probs_matches_reference(chunk, pattern, softcap, dtype):
    hidden0, weight0, grad_out = _data()
    targets = random_labels(N, V, pattern)
    out, ref, got, want, (h, w) = _run(hidden0, weight0, targets, dtype, grad_out, chunk_size=chunk, softcap=softcap)
    assert_close(out, ref, dtype, "tlp.out", reduction=True)
    assert_close(got[0], want[0], dtype, "tlp.dhidden", reduction=True)
    assert_close(got[1], want[1], dtype, "tlp.dweight", reduction=True)
    assert (out[targets != IGNORE] <= 0).all()
    ignored = targets == IGNORE
    if ignored.any():
        assert torch.count_nonzero(out[ignored]) == 0
        assert torch.count_nonzero(got[0][ignored]) == 0
    if softcap is not None:
        raw = (h.detach() @ w.detach().T).float().abs().max()
        assert raw > 2 * softcap, "test data should exceed the softcap"


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_log_probs_ignore_index_option(dtype):
    hidden0, weight0, grad_out = _data(seed=32)
    targets = random_labels(N, V, "none")
    targets[::4] = 7  # the ignored id is a real vocabulary id here
    out, ref, got, want, _ = _run(hidden0, weight0, targets, dtype, grad_out, chunk_size=9, ignore_index=7)
    assert_close(out, ref, dtype, "tlp.out", reduction=True)
    assert_close(got[0], want[0], dtype, "tlp.dhidden", reduction=True)
    assert_close(got[1], want[1], dtype, "tlp.dweight", reduction=True)
    assert torch.count_nonzero(out[::4]) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_log_probs_frozen_weight(dtype):
    """The base lm_head is usually frozen: no [V, H] gradient is computed or returned."""
    hidden0, weight0, grad_out = _data(seed=33)
    targets = random_labels(N, V, "scattered")
    out, ref, got, want, _ = _run(hidden0, weight0, targets, dtype, grad_out, w_grad=False, chunk_size=4)
    assert_close(out, ref, dtype, "tlp.out", reduction=True)
    assert_close(got[0], want[0], dtype, "tlp.dhidden", reduction=True)
    h2, w2 = leaf(hidden0.to(dtype)), leaf(weight0.to(dtype), False)
    out2 = linear_token_log_probs(h2, w2, targets, chunk_size=4)
    returned = out2.grad_fn.apply(grad_out)
    assert returned[0] is not None and returned[1] is None
    assert all(r is None for r in returned[2:])
    (out2 * grad_out).sum().backward()
    assert w2.grad is None and h2.grad is not None


def test_token_log_probs_weight_grad_only():
    hidden0, weight0, grad_out = _data(seed=34)
    targets = random_labels(N, V, "middle")
    w, wr = leaf(weight0), leaf(weight0)
    out = linear_token_log_probs(hidden0, w, targets, chunk_size=10)
    ref = token_log_probs_reference(hidden0, wr, targets)
    returned = out.grad_fn.apply(grad_out)
    assert returned[0] is None and returned[1] is not None
    (dw,), (dwr,) = grads(out, [w], grad_out), grads(ref, [wr], grad_out)
    assert_close(dw, dwr, torch.float32, "tlp.dweight", reduction=True)


def test_token_log_probs_chunking_invariance():
    hidden0, weight0, grad_out = _data(seed=35)
    targets = random_labels(N, V, "scattered")
    results = []
    for chunk in (1, 4, 10, 37, 1000, None):
        h, w = leaf(hidden0), leaf(weight0)
        out = linear_token_log_probs(h, w, targets, chunk_size=chunk)
        results.append((out, *grads(out, [h, w], grad_out)))
    for out, dh, dw in results[1:]:
        assert_close(out, results[0][0], torch.float32, "tlp.out")
        assert_close(dh, results[0][1], torch.float32, "tlp.dhidden")
        assert_close(dw, results[0][2], torch.float32, "tlp.dweight", reduction=True)


def test_token_log_probs_all_ignored():
    hidden0, weight0, grad_out = _data(n=5, seed=36)
    targets = torch.full((5,), IGNORE)
    h, w = leaf(hidden0), leaf(weight0)
    out = linear_token_log_probs(h, w, targets, chunk_size=2)
    assert torch.equal(out, torch.zeros(5))
    dh, dw = grads(out, [h, w], grad_out[:5])
    assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0


def test_token_log_probs_saves_no_logits():
    """Saved for backward: h, W, targets, the rows with a target and their fp32 logsumexp; never [N, V] or [chunk, V]."""
    hidden0, weight0, _ = _data(seed=37)
    h, w = leaf(hidden0), leaf(weight0)
    targets = random_labels(N, V, "none")
    with record_saved() as saved:
        linear_token_log_probs(h, w, targets, chunk_size=8)
    assert sorted(shape for shape, _, _ in saved) == sorted([(N, H), (V, H), (N,), (N,), (N,)]), saved
    assert ((N,), torch.float32, N * 4) in saved


def test_token_log_probs_no_grad():
    hidden0, weight0, _ = _data(seed=38)
    targets = random_labels(N, V, "ends")
    with torch.no_grad():
        out = linear_token_log_probs(leaf(hidden0), leaf(weight0), targets, chunk_size=6)
    assert out.grad_fn is None
    assert_close(out, token_log_probs_reference(hidden0, weight0, targets), torch.float32, "tlp.out")


def test_token_log_probs_dispatch(monkeypatch):
    h = leaf(torch.randn(2, 8))
    out = linear_token_log_probs(h, torch.randn(11, 8), torch.tensor([1, 2]))
    assert out.grad_fn._forward_cls is LinearTokenLogProbsFunction
    assert "token_log_probs" in dispatch.OPS
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")  # no Triton kernel for this op: it stays on PyTorch
    with dispatch.record_backends() as used:
        linear_token_log_probs(h, torch.randn(11, 8), torch.tensor([1, 2]))
    assert used == {"token_log_probs": {"torch"}}
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ConfigurationError):
        linear_token_log_probs(h, torch.randn(11, 8), torch.tensor([1, 2]))


def test_token_log_probs_shape_errors():
    with pytest.raises(ValueError, match="weight"):
        linear_token_log_probs(torch.randn(3, 8), torch.randn(11, 9), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="targets"):
        linear_token_log_probs(torch.randn(3, 8), torch.randn(11, 8), torch.tensor([1, 2]))


# --------------------------------------------------------------------------- in the model


def _full_logits_log_probs(model, ids, labels, attention_mask=None):
    """Oracle: full logits, log_softmax, gathered at the shifted labels, aligned with ``labels``."""
    logits = model(ids, attention_mask=attention_mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nxt = labels[:, 1:]
    valid = nxt != IGNORE
    gathered = logp.gather(-1, nxt.clamp_min(0)[..., None]).squeeze(-1).masked_fill(~valid, 0.0)
    return torch.nn.functional.pad(gathered, (1, 0), value=0.0)


def test_causal_lm_token_log_probs_equals_full_logits(hf_folders):
    from engine import FastModel
    from engine.peft import lora_modules

    model, _ = FastModel.from_pretrained(str(hf_folders["llama"]), dtype="float32", device="cpu", verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    g = torch.Generator().manual_seed(7)
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    ids = torch.randint(0, 200, (2, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = IGNORE  # prompt tokens
    labels[1, -2:] = IGNORE
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    labels[1, :2] = IGNORE
    after_padding = labels.clone()
    after_padding[1, 2] = IGNORE  # the first real token after left padding gets no log-prob (docs/parity.md)

    trainable = [p for p in model.parameters() if p.requires_grad]
    for attention_mask in (None, mask):
        got = model.token_log_probs(ids, labels, attention_mask=attention_mask)
        want = _full_logits_log_probs(model, ids, labels if attention_mask is None else after_padding, attention_mask)
        assert got.shape == ids.shape and got.dtype == torch.float32
        assert_close(got, want, torch.float32, "model.token_log_probs", reduction=True)
        assert torch.count_nonzero(got[:, 0]) == 0
        # DPO differentiates a weighted sum of these through the adapters.
        weights = torch.randn(ids.shape, generator=g)
        got_grads = torch.autograd.grad((got * weights).sum(), trainable)
        want_grads = torch.autograd.grad((want * weights).sum(), trainable)
        for a, b in zip(got_grads, want_grads):
            assert_close(a, b, torch.float32, "model.token_log_probs grad", reduction=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_log_probs_softcap_is_minus_the_softcapped_cross_entropy(dtype):
    """Final-logit soft-capping (Gemma 2, c = 30): ``-sum(log p)`` equals the soft-capped cross-entropy sum of
    :func:`fused_linear_cross_entropy` (itself checked against ``c * tanh(z / c)`` + ``F.cross_entropy``),
    and so do the gradients."""
    from engine_kernels.cross_entropy import fused_linear_cross_entropy

    hidden0, weight0, _ = _data(scale=40.0, seed=36)
    targets = random_labels(N, V, "scattered")
    h, w = leaf(hidden0.to(dtype)), leaf(weight0.to(dtype))
    hc, wc = leaf(hidden0.to(dtype)), leaf(weight0.to(dtype))
    assert (h.detach() @ w.detach().T).float().abs().max() > 2 * 30.0, "test data should exceed the softcap"
    logp = linear_token_log_probs(h, w, targets, softcap=30.0, chunk_size=7)
    ce = fused_linear_cross_entropy(hc, wc, targets, reduction="sum", softcap=30.0, chunk_size=7)
    assert_close(-logp.sum(), ce, dtype, "tlp_vs_ce.sum", reduction=True)
    got, want = grads(-logp.sum(), [h, w], torch.ones(())), grads(ce, [hc, wc], torch.ones(()))
    assert_close(got[0], want[0], dtype, "tlp_vs_ce.dhidden", reduction=True)
    assert_close(got[1], want[1], dtype, "tlp_vs_ce.dweight", reduction=True)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_temperature_matches_reference_and_entropy(softcap):
    """Logits divided by a temperature (GRPO scores tokens as sampled): values and gradients as the unfused
    reference; the chunked entropy equals the entropy of the full softmax."""
    from engine_kernels.token_log_probs import linear_token_entropy

    hidden0, weight0, grad_out = _data()
    targets = random_labels(N, V, "scattered")
    out, ref, g, g_ref, _ = _run(hidden0, weight0, targets, torch.float32, grad_out, softcap=softcap,
                                 temperature=0.7, chunk_size=5)
    assert_close(out, ref, torch.float32, "tlp.out.temperature", reduction=True)
    for name, a, b in zip(("dhidden", "dweight"), g, g_ref):
        assert_close(a, b, torch.float32, f"tlp.{name}.temperature", reduction=True)
    z = hidden0 @ weight0.t()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = torch.log_softmax(z / 0.7, dim=-1)
    expected = -(log_p.exp() * log_p).sum(-1)
    entropy = linear_token_entropy(hidden0, weight0, softcap, 0.7, chunk_size=6)
    torch.testing.assert_close(entropy, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        linear_token_log_probs(hidden0, weight0, targets, temperature=0.0)
