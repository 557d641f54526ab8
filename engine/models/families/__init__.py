"""The model families the engine serves, each declared once (one file per family; see :mod:`.base`).

To add a Llama-shaped family: write ``<name>.py`` with a :class:`~engine.models.families.base.Family`
(override :meth:`~.base.Family.biases` and the other rules where it differs from Llama), add it to
:data:`FAMILIES`, and add its parity tests (``tests/models/``).
"""

from __future__ import annotations

from engine.errors import UnsupportedArchitectureError
from engine.models.families.base import GLOBAL_TENSORS, LLAMA_LORA_TARGETS, Biases, Family, gguf_tensor_name
from engine.models.families.gemma import GEMMA
from engine.models.families.gemma2 import GEMMA2
from engine.models.families.gemma3 import GEMMA3
from engine.models.families.llama import LLAMA
from engine.models.families.mistral import MISTRAL
from engine.models.families.mixtral import MIXTRAL
from engine.models.families.moe import EXPERT_PARAMETERS, ROUTER_PARAMETER, MoEFamily
from engine.models.families.phi3 import PHI3
from engine.models.families.qwen2 import QWEN2
from engine.models.families.qwen3 import QWEN3
from engine.models.families.qwen3_moe import QWEN3_MOE

__all__ = [
    "EXPERT_PARAMETERS",
    "FAMILIES",
    "GLOBAL_TENSORS",
    "LLAMA_LORA_TARGETS",
    "Biases",
    "Family",
    "MoEFamily",
    "ROUTER_PARAMETER",
    "family_for_gguf",
    "family_for_model_type",
    "gguf_architectures",
    "gguf_tensor_name",
    "supported_model_types",
    "supported_models_table",
]

#: Every family the engine serves, in the order the docs list them.
FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA, GEMMA2, GEMMA3, PHI3, MIXTRAL, QWEN3_MOE)


def supported_model_types() -> tuple[str, ...]:
    """Every transformers ``model_type`` some family serves."""
    return tuple(mt for f in FAMILIES for mt in f.model_types)


def gguf_architectures() -> tuple[str, ...]:
    """Every ``general.architecture`` the GGUF reader accepts (a family's own name is accepted too)."""
    names = [f.gguf_architecture for f in FAMILIES] + [f.name for f in FAMILIES]
    return tuple(dict.fromkeys(names))


def family_for_model_type(model_type: str | None) -> Family:
    """The family serving a transformers ``model_type``.

    Raises:
        UnsupportedArchitectureError: naming the supported families.
    """
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} is not supported. The engine supports the decoder-only families "
        f"{', '.join(supported_model_types())} (and Llama-shaped models such as SmolLM2, TinyLlama). "
        "Use one of those, or open an issue asking for this architecture."
    )


def family_for_gguf(architecture: str, model_name: str | None = None, expert_count: int = 0) -> Family:
    """The family of a GGUF file from its ``general.architecture``, ``<arch>.expert_count`` and ``general.name``.

    Where families share an architecture (llama.cpp writes Llama, Mistral and Mixtral as ``llama``), a file with
    experts (``expert_count > 0``) belongs to a mixture-of-experts family and one without to a dense family; among
    those, the word in ``general.name`` tells Mistral from Llama.

    Raises:
        UnsupportedArchitectureError: naming the supported architectures.
    """
    candidates = [f for f in FAMILIES if f.gguf_architecture == architecture]
    if not candidates:  # a converter that wrote the family's own name ("mistral")
        candidates = [f for f in FAMILIES if f.name == architecture]
    if not candidates:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {architecture!r} is not supported; supported architectures are "
            f"{', '.join(gguf_architectures())} (Mistral files usually say 'llama'). Use a model of one "
            "of these families."
        )
    by_experts = [f for f in candidates if bool(f.expert_tensors) == (expert_count > 0)]
    candidates = by_experts or candidates
    name = (model_name or "").lower()
    marked = [f for f in candidates if f.gguf_name_marker and f.gguf_name_marker in name]
    plain = [f for f in candidates if not f.gguf_name_marker]
    return (marked or plain or candidates)[0]


def supported_models_table() -> str:
    """The supported-models table of the README and ``docs/models.md``, generated from :data:`FAMILIES`."""
    lines = [
        "| family | HF `model_type` | differs from Llama by | LoRA targets | GGUF architecture | chat template "
        "| verified |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in FAMILIES:
        gguf = f"`{f.gguf_architecture}`" + (" (Q/K rows permuted)" if f.gguf_permutes_qk else "")
        if f.gguf_name_marker:
            gguf += f", told apart by {f.gguf_name_marker!r} in `general.name`"
        template = f"`{f.chat_template}`" if f.chat_template else "-"
        targets = ", ".join(f.lora_targets)
        if f.lora_parameters:
            targets += "; `target_parameters`: " + ", ".join(f.lora_parameters)
        lines.append(
            f"| {f.name} | {', '.join(f'`{t}`' for t in f.model_types)} | {f.summary} | "
            f"{targets} | {gguf} | {template} | {f.verified} |"
        )
    return "\n".join(lines)
