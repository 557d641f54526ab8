"""Model families are declared once: the loader, GGUF reader/writer, LoRA GGUF and planner read them from there.

The oracle for every family rule is transformers itself: the biases, norms and windows a family declares
must be the parameters and layer types transformers builds for the same config.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers

from engine.errors import UnsupportedArchitectureError
from engine.memory.configs import KNOWN_CONFIGS, resolve_config
from engine.models.config import SUPPORTED_MODEL_TYPES, model_args_from_hf_config
from engine.models.families import (
    FAMILIES,
    family_for_gguf,
    family_for_model_type,
    gguf_architectures,
    supported_models_table,
)
from tests.conftest import FAMILY_CONFIGS

ROOT = Path(__file__).resolve().parents[1]


def test_every_family_is_registered_once_with_real_transformers_classes():
    seen = [mt for f in FAMILIES for mt in f.model_types]
    assert len(seen) == len(set(seen)) and tuple(seen) == SUPPORTED_MODEL_TYPES
    for f in FAMILIES:
        config_cls = f.config_type()
        assert config_cls.model_type in f.model_types, f.name
        assert hasattr(transformers, f.causal_lm_class), f.name
        assert family_for_model_type(f.name) is f


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_declared_biases_norms_and_windows_are_what_transformers_builds(name):
    """The family's rules, applied to a config, give exactly the parameters transformers' model has."""
    config = FAMILY_CONFIGS[name]()
    if hasattr(config, "attention_bias") and name == "qwen3":
        config.attention_bias = True  # exercise the bias rule in both states across the families
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    params = {n for n, _ in hf.named_parameters()}
    args = model_args_from_hf_config(config)
    layer = "model.layers.0."
    assert (layer + "self_attn.q_proj.bias" in params) == args.qkv_bias, name
    assert (layer + "self_attn.o_proj.bias" in params) == args.o_bias, name
    assert (layer + "mlp.up_proj.bias" in params) == args.mlp_bias, name
    assert (layer + "self_attn.q_norm.weight" in params) == args.qk_norm, name
    assert (layer + "pre_feedforward_layernorm.weight" in params) == args.sandwich_norms, name
    # Windows: transformers' own per-layer attention types.
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types is not None:
        assert args.sliding_windows == [window if t == "sliding_attention" else None for t in types]
    elif name == "mistral":
        assert args.sliding_windows == [window] * config.num_hidden_layers


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
@pytest.mark.parametrize("bias", [False, True])
def test_expected_shapes_are_the_parameters_transformers_builds(name, bias):
    config = FAMILY_CONFIGS[name]()
    if hasattr(config, "attention_bias"):
        config.attention_bias = bias
    if hasattr(config, "mlp_bias"):
        config.mlp_bias = bias
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    theirs = {n: tuple(p.shape) for n, p in hf.named_parameters()}  # tied lm_head is listed once, as embed_tokens
    assert family_for_model_type(config.model_type).expected_shapes(config) == theirs


def test_unknown_model_type_names_the_supported_families():
    with pytest.raises(UnsupportedArchitectureError, match="llama, mistral, qwen2, qwen3"):
        family_for_model_type("gpt2")


def test_gguf_architecture_and_name_pick_the_family():
    assert family_for_gguf("llama", "SmolLM2 135M").name == "llama"
    assert family_for_gguf("llama", "Mistral 7B Instruct").name == "mistral"
    assert family_for_gguf("mistral").name == "mistral"
    assert family_for_gguf("qwen3", "Qwen3 8B").name == "qwen3"
    assert family_for_gguf("gemma2", "Gemma 2 9B").name == "gemma2"
    assert family_for_gguf("phi3", "Phi 4 Mini Instruct").name == "phi3"
    assert set(gguf_architectures()) == {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3",
                                         "qwen3moe", "mixtral", "qwen3_moe"}
    with pytest.raises(UnsupportedArchitectureError, match="phi2"):
        family_for_gguf("phi2")


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_name_map_round_trips_and_matches_llama_cpp_names(family):
    for module in family.block_tensors:
        gguf = family.gguf_block_name(module, 7)
        assert gguf.startswith("blk.7.")
        assert family.hf_module(gguf.removeprefix("blk.7.")) == module
    if family.name == "phi3":  # fused projections: llama.cpp's attn_qkv, and ffn_up holding gate and up
        assert family.gguf_block_name("self_attn.qkv_proj", 0) == "blk.0.attn_qkv"
        assert family.gguf_block_name("mlp.gate_up_proj", 2) == "blk.2.ffn_up"
    else:
        assert family.gguf_block_name("self_attn.q_proj", 0) == "blk.0.attn_q"
    assert family.gguf_block_name("mlp.down_proj", 3) == "blk.3.ffn_down"
    assert family.gguf_block_name("mlp.nonexistent", 0) is None and family.hf_module("nope") is None


def test_planner_configs_come_from_the_family_files():
    for f in FAMILIES:
        for hub_id in f.known_configs:
            assert KNOWN_CONFIGS[hub_id][0] in f.model_types
            config = resolve_config(hub_id)
            assert family_for_model_type(config.model_type) is f
        for alias in f.aliases:
            assert resolve_config(alias).name_or_path == f.aliases[alias]


def test_no_module_outside_the_families_tests_model_type_names():
    """The seam holds: the loader, GGUF and LoRA code ask the family, not `model_type == "..."`."""
    pattern = re.compile(r"""model_type\s*(==|!=|in)\s*[\("']|\bmt\s*(==|in)\s*[\("']""")
    offenders = []
    for path in [*ROOT.glob("engine/**/*.py"), *ROOT.glob("kernels/**/*.py")]:
        if "families" in path.parts:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("doc", ["README.md", "docs/models.md"])
def test_supported_models_table_is_generated_from_the_families(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    table = text.split("<!-- families:start -->\n", 1)[1].split("\n<!-- families:end -->", 1)[0]
    assert table == supported_models_table(), f"{doc}: regenerate the table (see docs/models.md)"


def _engine_imports(path: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith(("engine", "kernels"))}


def test_layering_of_the_family_seam():
    """Families and RoPE are leaves; the GGUF package uses them but never the model code above them."""
    for path in [*(ROOT / "engine/models/families").glob("*.py"), ROOT / "engine/models/rope.py"]:
        allowed = {n for n in _engine_imports(path) if n.startswith("engine.models.families")}
        assert _engine_imports(path) <= {"engine.errors", "engine.models.rope", *allowed}, path
    for path in (ROOT / "engine/gguf").glob("*.py"):
        bad = {n for n in _engine_imports(path)
               if n.startswith(("engine.models.transformer", "engine.loader", "engine.training", "engine.saving"))}
        assert not bad, (path, bad)
