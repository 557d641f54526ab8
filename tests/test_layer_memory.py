"""benchmarks/layer_memory.py on a tiny layer: what the engine saves for backward, per token, vs HF + PEFT."""

from __future__ import annotations

import pytest

from benchmarks.layer_memory import Dims, build_engine, measure, measure_all, write_checkpoint

TINY = Dims(hidden=64, inter=96, heads=4, kv_heads=2, head_dim=16, vocab=64, r=16)
TOKENS = (16, 32)
BF16 = 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(TINY, tmp_path_factory.mktemp("layer_memory") / "tiny")


@pytest.fixture(scope="module")
def results(folder):
    return measure_all(TINY, folder, TOKENS, four_bit_hf=False, checkpointing=True, log=lambda *_: None)


def test_engine_saves_less_than_hf_peft(results):
    res = results["16bit"]
    for hf in ("hf", "hf_trainer"):
        assert res["engine"]["total_per_token"] < res[hf]["total_per_token"]
        for site in ("input_layernorm", "qkv", "o_proj", "post_attention_layernorm", "mlp"):
            assert res["engine"]["per_token"][site] <= res[hf]["per_token"][site], (hf, site)
    # An NF4 base changes nothing per token: the dequantized weight is never saved.
    assert results["4bit"]["engine"]["per_token"] == res["engine"]["per_token"]


def test_engine_mlp_saves_x_g_u_and_the_lora_activations_only(results):
    d, f, r = TINY.hidden, TINY.inter, TINY.r
    engine = results["16bit"]["engine"]
    # x [T, d], g and u [T, inter], xa of gate/up/down [T, r] each: h = silu(g) * u is recomputed, never saved.
    assert engine["per_token"]["mlp"] == BF16 * (d + 2 * f) + 3 * r * BF16
    inter_wide = [t for t in engine["tensors"] if t["site"] == "mlp" and t["shape"][-1] == f]
    assert len(inter_wide) == 2
    # HF + PEFT saves g, silu(g), u and (a copy of) h besides: four [T, inter] tensors.
    hf_wide = [t for t in results["16bit"]["hf"]["tensors"] if t["site"] == "mlp" and t["shape"][-1] == f]
    assert len(hf_wide) == 4


def test_attention_projections_and_flash_set(results):
    d, r = TINY.hidden, TINY.r
    q = TINY.heads * TINY.head_dim
    kv = TINY.kv_heads * TINY.head_dim
    engine = results["16bit"]["engine"]
    assert engine["per_token"]["qkv"] == BF16 * d + 3 * r * BF16  # one x for q, k and v, and xa [3r]
    # Flash set: q, k, v unrepeated (GQA-native), O, fp32 log-sum-exp.
    assert engine["per_token"]["attention"] == BF16 * (2 * q + 2 * kv) + 4 * TINY.heads
    # The O projection's input is the attention output itself (a view): only its xa [r] is new.
    assert engine["per_token"]["o_proj"] == r * BF16
    assert any(x["site"] == "o_proj" and x["counted_at"] == "sdpa O" for x in engine["reused_storages"])
    assert engine["per_token"]["rope"] == 0 and engine["shared_per_token"] == 2 * TINY.head_dim * BF16


def test_bytes_scale_linearly_with_tokens(results, folder):
    for bits in ("16bit", "4bit"):
        for side, res in results[bits].items():
            if "skipped" not in res:
                assert res["linear"] and not res["nonlinear"], (bits, side)
    engine = results["16bit"]["engine"]
    assert engine["per_layer_bytes"] == 0
    # Measured again at other lengths: the same bytes per token.
    model = build_engine(folder, TINY, False, 64)
    again = measure("engine", model, TINY, (24, 48), backward=False)
    assert again["per_token"] == engine["per_token"]


def test_checkpointing_keeps_only_the_layer_input(results):
    for side in ("engine", "hf"):
        ck = results["checkpointing"][side]
        assert ck["total_per_token"] == BF16 * TINY.hidden, side
