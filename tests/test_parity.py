"""Our model equals transformers (+ PEFT) in fp32: logits, loss, and gradients w.r.t. input
embeddings and LoRA weights, for every supported family, with and without padding."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from engine import FastModel
from engine.peft import lora_modules
from tests.conftest import FAMILY_CONFIGS, make_hf_model

FAMILIES = list(FAMILY_CONFIGS)
RTOL = 1e-5


def assert_close_rel(actual, expected, rtol=RTOL, what=""):
    """``|a - e| <= rtol * max|e|`` elementwise (relative to the tensor's scale)."""
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:g} x scale {scale:.3e}"


def load_pair(family, folder, lora: bool):
    hf = make_hf_model(family)
    ours, _ = FastModel.from_pretrained(folder, dtype=torch.float32, device="cpu", verbose=False)
    if not lora:
        return hf, ours
    return add_matching_lora(hf, ours)


def add_matching_lora(hf, ours, r: int = 4):
    """LoRA (rank ``r``, alpha ``2r``) on every default target of ``ours`` and, through PEFT, on ``hf``, with
    equal A and non-zero B (so that every gradient is informative). Returns ``(peft_model, ours)`` in train mode."""
    ours = FastModel.get_peft_model(ours, r=r, lora_alpha=2 * r, use_gradient_checkpointing=False)
    hf = get_peft_model(hf, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(ours.lora_settings.target_modules)))
    g = torch.Generator().manual_seed(7)
    peft_params = dict(hf.named_parameters())
    for name, m in lora_modules(ours).items():
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
            peft_params[f"base_model.model.{name}.lora_A.default.weight"].copy_(m.lora_A)
            peft_params[f"base_model.model.{name}.lora_B.default.weight"].copy_(m.lora_B)
    hf.train()
    ours.train()
    return hf, ours


def assert_lora_grads_close(ours, hf, rtol=RTOL, what=""):
    """Every LoRA A and B gradient of ``ours`` equals the PEFT model's; returns how many were compared."""
    peft_params = dict(hf.named_parameters())
    modules = lora_modules(ours)
    for name, m in modules.items():
        for part in ("A", "B"):
            ref_grad = peft_params[f"base_model.model.{name}.lora_{part}.default.weight"].grad
            assert_close_rel(getattr(m, f"lora_{part}").grad, ref_grad, rtol, what=f"{what} {name} lora_{part} grad")
    return len(modules)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, hf_folders):
    hf, ours = load_pair(family, hf_folders[family], lora=False)
    ids = torch.randint(0, hf.config.vocab_size, (2, 19))
    with torch.no_grad():
        expected = hf(ids).logits
        actual = ours(ids).logits
    assert_close_rel(actual, expected, what=f"{family} logits")


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_loss_and_gradients_match_peft(family, hf_folders):
    hf, ours = load_pair(family, hf_folders[family], lora=True)
    ids = torch.randint(0, hf.config.vocab_size, (2, 23))
    labels = ids.clone()
    labels[0, :5] = -100
    embeds = hf.get_input_embeddings()(ids).detach()
    e_hf = embeds.clone().requires_grad_(True)
    e_ours = embeds.clone().requires_grad_(True)
    out_hf = hf(inputs_embeds=e_hf, labels=labels)
    out_ours = ours(inputs_embeds=e_ours, labels=labels)
    assert_close_rel(out_ours.loss, out_hf.loss, what=f"{family} loss")
    out_hf.loss.backward()
    out_ours.loss.backward()
    assert_close_rel(e_ours.grad, e_hf.grad, what=f"{family} d(loss)/d(inputs_embeds)")
    n = assert_lora_grads_close(ours, hf, what=family)
    assert n == len(ours.args.family.lora_targets) * hf.config.num_hidden_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_right_padding_matches_transformers(family, hf_folders):
    hf, ours = load_pair(family, hf_folders[family], lora=True)
    ids = torch.randint(0, hf.config.vocab_size, (3, 14))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    ref = hf(ids, attention_mask=mask, labels=labels)
    got = ours(ids, attention_mask=mask, labels=labels, return_logits=True)
    valid = mask.bool()
    assert_close_rel(got.logits[valid], ref.logits[valid], what=f"{family} padded logits")
    assert_close_rel(got.loss, ref.loss, what=f"{family} padded loss")
    ref.loss.backward()
    got.loss.backward()
    assert_lora_grads_close(ours, hf, what=f"{family} padded")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_left_padding_matches_unpadded_rows(family, hf_folders):
    """A left-padded row gives the same logits as the same tokens alone (positions from the mask)."""
    _, ours = load_pair(family, hf_folders[family], lora=False)
    short = torch.randint(0, 200, (1, 6))
    long = torch.randint(0, 200, (1, 10))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    with torch.no_grad():
        padded = ours(batch, attention_mask=mask).logits
        alone = ours(short).logits
    assert_close_rel(padded[0, 4:], alone[0], what="left-padded row")
    assert torch.isfinite(padded).all()


def left_padded_batch(vocab: int):
    """``(ids, mask, labels, first)`` ``[3, 14]``: rows with 0, 4 and 9 pads on the left; ``labels`` -100 on pads
    (what transformers' and TRL's collators write); ``first [3]`` the column of each row's first real token."""
    ids = torch.randint(0, vocab, (3, 14))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    first = torch.tensor([0, 4, 9])
    return ids, mask, ids.masked_fill(mask == 0, -100), first


def without_first_target(labels, first):
    """``labels`` with -100 at each row's first real token: the target the engine drops (docs/parity.md)."""
    return labels.index_put((torch.arange(len(first)), first), torch.tensor(-100))


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_loss_and_gradients_match_peft(family, hf_folders):
    """Left padding against transformers + PEFT: logits of real tokens, the loss, d(loss)/d(inputs_embeds) and
    every LoRA gradient, with transformers' labels lacking the one target the engine drops."""
    hf, ours = load_pair(family, hf_folders[family], lora=True)
    ids, mask, labels, first = left_padded_batch(hf.config.vocab_size)
    embeds = hf.get_input_embeddings()(ids).detach()
    e_hf = embeds.clone().requires_grad_(True)
    e_ours = embeds.clone().requires_grad_(True)
    ref = hf(inputs_embeds=e_hf, attention_mask=mask, labels=without_first_target(labels, first))
    got = ours(inputs_embeds=e_ours, attention_mask=mask, labels=labels, return_logits=True)
    valid = mask.bool()
    assert_close_rel(got.logits[valid], ref.logits[valid], what=f"{family} left-padded logits")
    assert_close_rel(got.loss, ref.loss, what=f"{family} left-padded loss")
    ref.loss.backward()
    got.loss.backward()
    assert_close_rel(e_ours.grad, e_hf.grad, what=f"{family} left-padded d(loss)/d(inputs_embeds)")
    assert_lora_grads_close(ours, hf, what=f"{family} left-padded")


def test_left_padding_first_target_is_a_deliberate_difference(hf_folders):
    """transformers trains the last pad position to predict the first real token, from a query that sees no real
    key: its value depends on the attention implementation (SDPA vs eager). The engine drops that target, so
    its loss equals transformers' exactly when that target is -100 in transformers' labels, and differs
    otherwise. The engine's own collator writes -100 there, so its batches agree with transformers as they are."""
    from engine.training.collators import PaddedCollator

    hf, ours = load_pair("llama", hf_folders["llama"], lora=False)
    ids, mask, labels, first = left_padded_batch(hf.config.vocab_size)
    dropped = without_first_target(labels, first)
    with torch.no_grad():
        ours_loss = ours(ids, attention_mask=mask, labels=labels).loss
        hf_sdpa = hf(ids, attention_mask=mask, labels=labels).loss
        hf_dropped = hf(ids, attention_mask=mask, labels=dropped).loss
        hf.set_attn_implementation("eager")
        hf_eager = hf(ids, attention_mask=mask, labels=labels).loss
        assert_close_rel(hf(ids, attention_mask=mask, labels=dropped).loss, hf_dropped, what="eager, target dropped")
        hf.set_attn_implementation("sdpa")
    assert_close_rel(ours_loss, hf_dropped, what="engine vs transformers without the first target")
    for name, kept in (("sdpa", hf_sdpa), ("eager", hf_eager)):
        assert abs(kept - ours_loss) > 1e-3 * ours_loss, f"transformers ({name}) no longer trains on the first target"
    assert abs(hf_sdpa - hf_eager) > 1e-3 * hf_sdpa, "transformers' pad-position output no longer depends on SDPA/eager"

    rows = [{"input_ids": ids[i, first[i]:]} for i in range(len(first))]
    batch = PaddedCollator(pad_token_id=0, padding_side="left")(rows)
    assert torch.equal(batch["attention_mask"], mask) and torch.equal(batch["labels"], dropped)
    with torch.no_grad():
        assert_close_rel(ours(**batch).loss, hf(**batch).loss, what="collated left-padded batch")


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_equals_each_document_alone_in_transformers(family, hf_folders):
    """One padding-free row of three documents (restarting position ids), with LoRA: per-document logits, the
    loss and every LoRA gradient equal transformers + PEFT run on each document by itself (the loss summed over
    documents and divided by all predicted tokens; documents longer than the sliding window of 6)."""
    hf, ours = load_pair(family, hf_folders[family], lora=True)
    docs = [torch.randint(0, 211, (1, n)) for n in (9, 4, 13)]
    row = torch.cat(docs, 1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    got = ours(row, position_ids=positions, labels=row, return_logits=True)
    count = sum(d.shape[1] - 1 for d in docs)
    total, start = 0.0, 0
    for d in docs:
        n = d.shape[1]
        ref = hf(d, labels=d)
        assert_close_rel(got.logits[0, start:start + n], ref.logits[0], what=f"{family} packed document")
        total = total + ref.loss * (n - 1) / count
        start += n
    assert_close_rel(got.loss, total, what=f"{family} packed loss")
    got.loss.backward()
    total.backward()
    assert_lora_grads_close(ours, hf, what=f"{family} packed")


def per_document_losses(logits, labels, lengths):
    """Mean next-token cross-entropy of each document of one packed row ``logits [1, N, V]``, ``labels [1, N]``
    (-100 at every document start), documents of ``lengths`` tokens in order."""
    shifted = torch.nn.functional.pad(labels[0, 1:], (0, 1), value=-100)
    return [torch.nn.functional.cross_entropy(part_logits, part_labels, ignore_index=-100)
            for part_logits, part_labels in zip(logits[0].split(lengths), shifted.split(lengths))]


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_batch_matches_transformers_packed_batch(family, hf_folders):
    """The same padding-free batch (PaddingFreeCollator: one row, restarting position ids, a dummy tail document,
    -100 at document starts and on a prompt) through transformers + PEFT (position ids, no attention mask, no
    cache: it finds the documents itself) and the engine (which also gets ``cu_seq_lens``): per-document logits and
    losses, the loss and every LoRA gradient agree. Transformers' packed logits equal each document run alone,
    so its mask really is block-diagonal (else the check would compare two leaking models)."""
    from engine.training.collators import PaddingFreeCollator

    hf, ours = load_pair(family, hf_folders[family], lora=True)
    lengths = [9, 4, 13]
    ids = [torch.randint(0, 211, (n,)) for n in lengths]
    prompt_masked = ids[2].clone()
    prompt_masked[:5] = -100
    features = [{"input_ids": torch.cat(ids[:2]), "seq_lengths": lengths[:2]},
                {"input_ids": ids[2], "labels": prompt_masked}]
    batch = PaddingFreeCollator(pad_token_id=0, pad_to_multiple_of=8)(features)
    lengths.append(batch["input_ids"].shape[1] - sum(lengths))  # the dummy tail document (labels -100)
    assert batch["cu_seq_lens"].tolist() == [0, 9, 13, 26, 32] and "attention_mask" not in batch
    # use_cache=False as Trainer and TRL pass it: with a cache transformers does not look for packed documents.
    ref = hf(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False)
    got = ours(**batch, return_logits=True)
    with torch.no_grad():
        for doc, start in zip(ids, (0, 9, 13)):
            alone = hf(doc[None]).logits[0]
            assert_close_rel(ref.logits[0, start:start + doc.numel()], alone, what=f"{family} transformers packed")
    assert_close_rel(got.logits, ref.logits, what=f"{family} packed logits")
    for i, (a, e) in enumerate(zip(per_document_losses(got.logits, batch["labels"], lengths)[:3],
                                   per_document_losses(ref.logits, batch["labels"], lengths)[:3])):
        assert_close_rel(a, e, what=f"{family} document {i} loss")
    assert_close_rel(got.loss, ref.loss, what=f"{family} packed loss")
    ref.loss.backward()
    got.loss.backward()
    assert_lora_grads_close(ours, hf, what=f"{family} packed batch")


def test_sliding_window_changes_attention(hf_folders):
    """Mistral's window (6) is active on 19 tokens: logits differ from the same weights without a window."""
    hf, ours = load_pair("mistral", hf_folders["mistral"], lora=False)
    ids = torch.randint(0, 200, (1, 19))
    with torch.no_grad():
        windowed = ours(ids).logits
        for layer in ours.model.layers:
            layer.self_attn.sliding_window = None
        full = ours(ids).logits
    assert not torch.allclose(windowed[:, 6:], full[:, 6:], atol=1e-4)
    assert torch.allclose(windowed[:, :6], full[:, :6], atol=1e-6)
