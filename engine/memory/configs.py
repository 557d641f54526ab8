"""Model configs the planner can use without a network: a name, a folder, a ``.gguf`` file or a config object.

The planner needs only a model's configuration (sizes), never its weights. Well-known models are
listed here with the fields of their published ``config.json`` (so ``estimate_memory("meta-llama/
Llama-3.1-8B", ...)`` works offline); anything else is read from a local folder, a GGUF file, or
the Hugging Face hub.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import ConfigurationError
from engine.models.families import FAMILIES

#: ``{hub id: (model_type, config fields)}``: the published configs each family declares
#: (:attr:`engine.models.families.Family.known_configs`).
KNOWN_CONFIGS: dict[str, tuple[str, dict]] = {
    hub_id: (family.model_types[0], dict(fields)) for family in FAMILIES for hub_id, fields in family.known_configs.items()
}

#: Variants with the same architecture as a listed model.
_ALIASES: dict[str, str] = {alias: target for family in FAMILIES for alias, target in family.aliases.items()}


def known_model_names() -> list[str]:
    """Every name :func:`resolve_config` knows without a network."""
    return sorted([*KNOWN_CONFIGS, *_ALIASES])


def _lookup(name: str) -> str | None:
    by_lower = {n.lower(): n for n in known_model_names()}
    # Also accept the name without its organisation ("Llama-3.1-8B").
    by_short = {n.lower().rpartition("/")[2]: n for n in known_model_names()}
    key = name.lower()
    found = by_lower.get(key) or by_short.get(key)
    return _ALIASES.get(found, found) if found else None


def resolve_config(model):
    """A transformers config for ``model``.

    Args:
        model: a transformers ``PretrainedConfig``; an engine model (its ``hf_config``); a local
            model folder (its ``config.json``); a ``.gguf`` file; or a name from
            :func:`known_model_names` (offline) or any other hub id (downloads ``config.json``).

    Raises:
        ConfigurationError: when ``model`` is none of these.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    hf_config = getattr(model, "hf_config", None)
    if hf_config is not None:
        return hf_config
    if not isinstance(model, (str, Path)):
        raise ConfigurationError(
            f"estimate_memory() needs a model name, a folder, a .gguf file, a transformers config or an engine "
            f"model, got {type(model).__name__}"
        )
    path = Path(model).expanduser()
    if path.is_dir():
        from engine.loading.safetensors_loader import load_hf_config

        return load_hf_config(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigurationError(f"{path} does not exist")
        from engine.gguf.reader import read_gguf_config

        return read_gguf_config(path)
    known = _lookup(str(model))
    if known is not None:
        model_type, fields = KNOWN_CONFIGS[known]
        config = AutoConfig.for_model(model_type, **fields)
        config.name_or_path = known
        return config
    try:
        return AutoConfig.from_pretrained(str(model))
    except OSError as err:
        raise ConfigurationError(
            f"no config for {model!r}: it is not a local folder or .gguf file, not one of the models known offline "
            f"({', '.join(sorted(KNOWN_CONFIGS))}), and the hub lookup failed ({err}). Pass a folder with a "
            "config.json or a transformers config object."
        ) from err
