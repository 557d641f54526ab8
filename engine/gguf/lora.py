"""Write a LoRA adapter as a llama.cpp LoRA GGUF (``llama-cli -m base.gguf --lora adapter.gguf``).

Layout as llama.cpp's ``convert_lora_to_gguf.py``: ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha``; for each adapted projection two tensors,
``<base tensor name>.lora_a`` (PyTorch ``[r, in]``, GGUF ``ne = [in, r]``) and ``.lora_b``
(``[out, r]``, ``ne = [r, out]``). llama.cpp scales by ``alpha / r``; we write
``alpha = scaling * r`` so rsLoRA (``alpha / sqrt(r)``) adapters keep their scale.

The base file's Q/K rows are permuted for ``llama`` models (see
:func:`engine.gguf.writer.permute_qk`); since ``W + s B A`` has the rows of ``B``, the same
row permutation is applied to ``lora_b`` of ``attn_q``/``attn_k`` (as the converter's
``LoraTorchTensor`` does).

Mixture-of-experts models (Mixtral, Qwen3-MoE): llama.cpp applies adapters to the router
(``ffn_gate_inp``, through ``build_lora_mm`` like any projection) and to the 3-D expert tensors
(``build_lora_mm_id``: ``lora_a`` ``[E, r, in]``, ne ``{in, r, E}``, and ``lora_b`` ``[E, out, r]``, ne
``{r, out, E}``, each token's expert picking its own pair), which is how the converter stacks per-expert
adapters. So every adapter the engine trains is written: the router's as a 2-D pair, the experts' PEFT
``target_parameters`` factors (``A [r*E, in]``, ``B [out, r*E]``) regrouped per expert, and the
``gate_up_proj`` adapter split like its weight: ``ffn_gate_exps`` and ``ffn_up_exps`` share ``lora_a`` and
take the gate / up rows of ``lora_b``.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from engine.errors import ConfigurationError
from engine.models.families import LLAMA, Family, family_for_model_type

__all__ = ["lora_tensor_names", "save_lora_gguf"]

def lora_tensor_names(module_name: str, family: Family = LLAMA) -> str:
    """llama.cpp base name (``blk.3.attn_q.weight``) of an adapted module (``model.layers.3.self_attn.q_proj``)."""
    parts = module_name.split(".")
    name = None
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        name = family.gguf_block_name(".".join(parts[3:]), int(parts[2]))
    if name is None:
        raise ConfigurationError(f"LoRA on {module_name!r} cannot be written to a llama.cpp LoRA GGUF")
    return name + ".weight"


def _expert_lora_tensors(module_name: str, experts, family: Family, qtype, tensor_class) -> list:
    """The 3-D ``lora_a [E, r, in]`` / ``lora_b [E, out / parts, r]`` tensors of one expert group's adapters
    (:class:`~engine.modules.moe.Experts`), named after the family's expert tensors
    (``blk.N.ffn_gate_exps.weight.lora_a``, ...)."""
    parts = module_name.split(".")
    if len(parts) < 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        raise ConfigurationError(f"LoRA on {module_name!r} cannot be written to a llama.cpp LoRA GGUF")
    layer, path = int(parts[2]), ".".join(parts[3:])
    e, r = experts.num_experts, experts.lora_r
    tensors = []
    for projection in experts.lora_targets:
        names = family.gguf_expert_names(f"{path}.{projection}", layer)
        if not names:
            raise ConfigurationError(
                f"LoRA on {module_name}.{projection} has no llama.cpp tensor in the {family.name} family's name map"
            )
        out, inp = experts.projection_shape(projection)
        rows = out // len(names)

        def a_data(projection: str = projection) -> np.ndarray:
            a, _ = experts.lora_factors(projection)
            return a.detach().to("cpu", torch.float32).reshape(e, r, -1).contiguous().numpy()

        def b_data(part: int, projection: str = projection, rows: int = rows) -> np.ndarray:
            _, b = experts.lora_factors(projection)
            b3 = b.detach().to("cpu", torch.float32).reshape(b.shape[0], r, e).permute(2, 0, 1)  # [E, out, r]
            return b3[:, part * rows:(part + 1) * rows].contiguous().numpy()

        for part, name in enumerate(names):
            tensors.append(tensor_class(f"{name}.weight.lora_a", (e, r, inp), qtype, a_data))
            tensors.append(tensor_class(f"{name}.weight.lora_b", (e, rows, r), qtype, lambda p=part, b=b_data: b(p)))
    return tensors


def save_lora_gguf(model, save_directory: str | os.PathLike, dtype: str = "f32") -> Path:
    """Write ``model``'s LoRA adapter as ``<name>-LoRA-<F32|F16>.gguf`` in ``save_directory``.

    Args:
        model (CausalLM): a model with LoRA adapters (``FastModel.get_peft_model``).
        save_directory: output folder (created).
        dtype: ``"f32"`` or ``"f16"`` tensors.

    Returns:
        The file's path.

    Raises:
        ConfigurationError: the model has no adapter, adapters differ in scale, ``dtype`` is unknown, or the model is
            a mixture of experts llama.cpp cannot compute (see ``Family.check_gguf_export``).
    """
    from engine.gguf.writer import (
        _Tensor,
        model_name,
        permute_qk,
        write_gguf,
    )
    from engine.peft import expert_lora_modules, lora_modules

    if dtype not in ("f32", "f16"):
        raise ConfigurationError(f"LoRA GGUF dtype must be 'f32' or 'f16', not {dtype!r}")
    qtype = QT.F32 if dtype == "f32" else QT.F16
    family = family_for_model_type(model.args.model_type)
    family.check_gguf_export(model.args, getattr(model, "hf_config", None))
    modules = lora_modules(model)
    experts = expert_lora_modules(model)
    if not modules and not experts:
        raise ConfigurationError("the model has no LoRA adapter; add one with FastModel.get_peft_model first")
    alphas = {round(m.lora_scaling * m.lora_r, 6) for m in (*modules.values(), *experts.values())}
    if len(alphas) != 1:
        raise ConfigurationError(
            f"llama.cpp LoRA GGUF holds one alpha for all modules, but the adapters have alpha values {sorted(alphas)}"
        )
    alpha = alphas.pop()
    args = model.args
    tensors: list[_Tensor] = []
    for module_name, mod in modules.items():
        base = lora_tensor_names(module_name, family)
        heads = None
        if family.gguf_permutes_qk and module_name.endswith(".self_attn.q_proj"):
            heads = args.num_heads
        elif family.gguf_permutes_qk and module_name.endswith(".self_attn.k_proj"):
            heads = args.num_kv_heads

        def a_data(mod=mod) -> np.ndarray:
            return mod.lora_A.detach().to("cpu", torch.float32).contiguous().numpy()

        def b_data(mod=mod, heads=heads) -> np.ndarray:
            b = mod.lora_B.detach().to("cpu", torch.float32)
            return (permute_qk(b, heads) if heads else b).contiguous().numpy()

        tensors.append(_Tensor(base + ".lora_a", tuple(mod.lora_A.shape), qtype, a_data))
        tensors.append(_Tensor(base + ".lora_b", tuple(mod.lora_B.shape), qtype, b_data))
    for module_name, mod in experts.items():
        tensors += _expert_lora_tensors(module_name, mod, family, qtype, _Tensor)

    name = model_name(model)

    def metadata(writer: gguf.GGUFWriter) -> int:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(name)
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        return 4096

    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-LoRA-{dtype.upper()}.gguf"
    return write_gguf(path, family.gguf_architecture, metadata, tensors, desc="LoRA GGUF")
