"""Ollama ``Modelfile`` next to an exported GGUF file.

``ollama create my-model -f Modelfile`` then runs the file with the right prompt format. The
Hugging Face chat template (Jinja) is recognised by family from its text / special tokens and
translated to Ollama's Go template:

* ChatML (``<|im_start|>`` / ``<|im_end|>``: SmolLM2, Qwen2/2.5/3, ...),
* Llama 3 (``<|start_header_id|>`` / ``<|eot_id|>``),
* Mistral / Llama 2 instruct (``[INST]`` / ``[/INST]``).

An unknown template gets ``FROM`` and the ``PARAMETER stop`` lines only, with a warning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

__all__ = ["detect_chat_family", "modelfile_text", "write_modelfile"]

_TEMPLATES = {
    "chatml": (
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
    ),
    "llama3": (
        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
    ),
    "mistral": "[INST] {{ if .System }}{{ .System }} {{ end }}{{ .Prompt }} [/INST]{{ .Response }}",
}
_STOPS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "mistral": ["[INST]", "[/INST]"],
}


def detect_chat_family(template: str | None) -> str | None:
    """``"chatml"``, ``"llama3"``, ``"mistral"`` or ``None`` for a Jinja chat template's text."""
    if not template:
        return None
    if "<|im_start|>" in template and "<|im_end|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template and "<|eot_id|>" in template:
        return "llama3"
    if "[INST]" in template and "[/INST]" in template:
        return "mistral"
    return None


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(gguf_file: str, tokenizer) -> str:
    """The Modelfile for ``gguf_file`` (a path relative to the Modelfile) and ``tokenizer``'s chat template."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    family = detect_chat_family(template)
    lines = [f"FROM ./{gguf_file}", ""]
    stops: list[str] = []
    if family is not None:
        lines += [f'TEMPLATE """{_TEMPLATES[family]}"""', ""]
        stops += _STOPS[family]
    else:
        warnings.warn(
            "the chat template is not ChatML, Llama 3 or Mistral (or there is none), so the Modelfile has no "
            "TEMPLATE: add one by hand (https://github.com/ollama/ollama/blob/main/docs/modelfile.md#template) "
            "or Ollama will send raw prompts",
            stacklevel=3,
        )
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f"PARAMETER stop {_quote(s)}" for s in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | os.PathLike, tokenizer, path: str | os.PathLike | None = None) -> Path:
    """Write an Ollama Modelfile for ``gguf_path`` (default: ``Modelfile`` in the same folder); returns its path."""
    gguf_path = Path(gguf_path)
    out = Path(path) if path is not None else gguf_path.with_name("Modelfile")
    rel = os.path.relpath(gguf_path, out.parent).replace(os.sep, "/")
    out.write_text(modelfile_text(rel, tokenizer))
    return out
