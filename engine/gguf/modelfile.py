"""Ollama ``Modelfile`` next to an exported GGUF file.

``ollama create my-model -f Modelfile`` then runs the file with the right prompt format. The
Hugging Face chat template (Jinja) is recognised from its special tokens as one of the formats declared in
:mod:`engine.chat_templates` (``chatml``, ``qwen``, ``llama-3``, ``gemma``, ``phi-3``, ``mistral``), and that
declaration gives the Modelfile its Ollama ``TEMPLATE``, its ``PARAMETER stop`` lines (the end-of-turn token
first, then the turn markers and the tokenizer's EOS) and, for ``qwen``, the default ``SYSTEM`` prompt.

An unknown template gets ``FROM`` and the ``PARAMETER stop`` line of the EOS only, with a warning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from engine.chat_templates import CHAT_TEMPLATES, detect_chat_template
from engine.files import write_text

__all__ = ["detect_chat_family", "modelfile_text", "write_modelfile"]


def detect_chat_family(template: str | dict | None) -> str | None:
    """The :data:`~engine.chat_templates.CHAT_TEMPLATES` name of a Jinja chat template's format, or ``None``
    (:func:`engine.chat_templates.detect_chat_template`)."""
    return detect_chat_template(template)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(gguf_file: str, tokenizer) -> str:
    """The Modelfile for ``gguf_file`` (a path relative to the Modelfile) and ``tokenizer``'s chat template."""
    name = detect_chat_template(getattr(tokenizer, "chat_template", None))
    lines = [f"FROM ./{gguf_file}", ""]
    stops: list[str] = []
    if name is not None:
        declared = CHAT_TEMPLATES[name]
        lines += [f'TEMPLATE """{declared.ollama}"""', ""]
        if declared.default_system:
            lines += [f'SYSTEM """{declared.default_system}"""', ""]
        stops += declared.stop
    else:
        warnings.warn(
            f"the chat template is none of the known formats ({', '.join(CHAT_TEMPLATES)}), or there is none, so "
            "the Modelfile has no TEMPLATE: add one by hand "
            "(https://github.com/ollama/ollama/blob/main/docs/modelfile.md#template), set one with "
            "engine.get_chat_template, or Ollama will send raw prompts",
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
    return write_text(out, modelfile_text(rel, tokenizer))
