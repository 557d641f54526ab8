"""LoRA adapters on our model: adding them, switching them off, and PEFT-format state dicts.

The adapter itself (weights, forward, backward) lives in :class:`engine.modules.linear.Linear`
and :mod:`engine_kernels.lora_linear`; this module decides *where* adapters go.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

import torch

from engine.errors import CheckpointError, ConfigurationError
from engine.models.families import EXPERT_PARAMETERS, LLAMA_LORA_TARGETS, ROUTER_PARAMETER
from engine.modules.linear import Linear
from engine.modules.moe import EXPERT_PROJECTIONS, Experts

#: Projection names LoRA can target in a Llama-shaped family (the same names PEFT users pass); each family
#: declares its own (:attr:`engine.models.families.Family.lora_targets`).
LORA_TARGETS = LLAMA_LORA_TARGETS
#: Key prefix PEFT uses for a causal-LM adapter (``base_model.model.`` + the module path).
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraSettings:
    """What :func:`get_peft_model` was called with (saved as PEFT's ``adapter_config.json``)."""

    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: list[str] = field(default_factory=list)
    #: PEFT's ``target_parameters`` (mixture of experts): ``experts.gate_up_proj``, ``experts.down_proj``,
    #: ``gate.weight`` (the router).
    target_parameters: list[str] = field(default_factory=list)
    use_rslora: bool = False
    #: Modules trained and saved whole (PEFT's ``modules_to_save``): a classifier's ``score`` head.
    modules_to_save: list[str] = field(default_factory=list)
    task_type: str = "CAUSAL_LM"

    def to_peft_config(self, base_model_name_or_path: str | None) -> dict:
        """The ``adapter_config.json`` content PEFT's ``PeftModel.from_pretrained`` reads."""
        extra = {"target_parameters": sorted(self.target_parameters)} if self.target_parameters else {}
        return {
            **extra,
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": sorted(self.target_modules),
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": sorted(self.modules_to_save) or None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": False,
        }

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_target_modules(target_modules, allowed: tuple[str, ...] = LORA_TARGETS) -> list[str]:
    """Validate ``target_modules`` (a list of names, or ``"all-linear"``) against the family's ``allowed`` names.

    Raises:
        ConfigurationError: for a name that is not one of ``allowed`` (default :data:`LORA_TARGETS`).
    """
    if target_modules is None or target_modules == "all-linear":
        return list(allowed)
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    unknown = [t for t in target_modules if t not in allowed]
    if unknown:
        raise ConfigurationError(
            f"unknown target module(s) {unknown}. LoRA can target: {', '.join(allowed)} "
            "(or 'all-linear' for all of them)."
        )
    if not target_modules:
        raise ConfigurationError("target_modules is empty; name at least one of " + ", ".join(allowed))
    return list(dict.fromkeys(target_modules))


def resolve_target_parameters(
    target_parameters, allowed: tuple[str, ...], lora_dropout: float, target_modules=None
) -> list[str]:
    """Which weights get PEFT-style ``target_parameters`` adapters.

    ``None`` means: with ``target_modules`` ``None`` or ``"all-linear"`` (every projection), the experts too (not
    the router; name ``"gate.weight"`` for it); with an explicit ``target_modules`` list, none.

    Validate PEFT-style ``target_parameters`` (``"experts.gate_up_proj"``, ``"mlp.experts.down_proj"``,
    ``"gate.weight"``) against the family's ``allowed`` names; returns them without a leading ``mlp.``.

    Raises:
        ConfigurationError: an unknown name, a family without such weights, or ``lora_dropout`` > 0 (PEFT applies
            these adapters to the weight, where input dropout cannot be expressed).
    """
    if target_parameters is None and target_modules in (None, "all-linear"):
        target_parameters = [p for p in EXPERT_PARAMETERS if p in allowed]
        lora_dropout = 0.0 if not target_parameters else lora_dropout
    if not target_parameters:
        return []
    if isinstance(target_parameters, str):
        target_parameters = [target_parameters]
    names = [t.removeprefix("mlp.") for t in target_parameters]
    unknown = [t for t, n in zip(target_parameters, names) if n not in allowed]
    if unknown:
        where = f"one of {', '.join(allowed)}" if allowed else "none: this model has no experts"
        raise ConfigurationError(f"unknown target parameter(s) {unknown}; LoRA can target {where}")
    if lora_dropout:
        raise ConfigurationError(
            f"lora_dropout={lora_dropout} with target_parameters {target_parameters}: LoRA on experts and routers "
            "(PEFT's target_parameters) is applied to the weights, where input dropout is not defined (PEFT refuses "
            "it too). Use lora_dropout=0."
        )
    return list(dict.fromkeys(names))


def lora_modules(model) -> dict[str, Linear]:
    """``{module path: Linear}`` for every projection carrying an adapter."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear) and m.has_lora}


def expert_lora_modules(model) -> dict[str, Experts]:
    """``{module path: Experts}`` for every expert group carrying adapters."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Experts) and m.has_lora}


def has_adapters(model) -> bool:
    """Whether any projection or expert group carries a LoRA adapter."""
    return bool(lora_modules(model) or expert_lora_modules(model))


def expert_adapter_keys(module_path: str, experts: Experts) -> dict[str, tuple[str, str]]:
    """PEFT's adapter keys of each adapted expert projection: ``{projection: (lora_A key, lora_B key)}``.

    PEFT wraps each targeted parameter of a module in its own ``ParamWrapper``, in the order the module registers
    them, each new wrapper around the previous one; the first wrapped sits deepest, under one ``base_layer.`` per
    wrapper added after it (``experts.base_layer.lora_A.weight`` is ``gate_up_proj``'s when both are targeted).
    """
    targeted = [p for p in EXPERT_PROJECTIONS if p in experts.lora_targets]
    keys = {}
    for i, projection in enumerate(targeted):
        prefix = f"{PEFT_PREFIX}{module_path}." + "base_layer." * (len(targeted) - 1 - i)
        keys[projection] = (prefix + "lora_A.weight", prefix + "lora_B.weight")
    return keys


def add_lora(model, settings: LoraSettings, random_state: int = 3407) -> None:
    """Freeze every base parameter and attach adapters to the targeted projections.

    Initialisation follows PEFT (A Kaiming-uniform, B zero), seeded by ``random_state``.
    """
    if settings.r <= 0 or int(settings.r) != settings.r:
        raise ConfigurationError(f"LoRA rank r must be a positive integer, got {settings.r!r}")
    if not 0.0 <= settings.lora_dropout < 1.0:
        raise ConfigurationError(f"lora_dropout must be in [0, 1), got {settings.lora_dropout}")
    if has_adapters(model):
        raise ConfigurationError("this model already has LoRA adapters; call get_peft_model once")
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(random_state)
    targets = set(settings.target_modules)
    router = ROUTER_PARAMETER in settings.target_parameters
    expert_targets = [p for p in EXPERT_PROJECTIONS if f"experts.{p}" in settings.target_parameters]
    for name, module in model.named_modules():
        if not name.startswith("model.layers."):
            continue
        leaf = name.rpartition(".")[2]
        is_router = name.endswith(".mlp.gate") and isinstance(module, Linear)
        if isinstance(module, Linear) and ((leaf in targets and not is_router) or (router and is_router)):
            module.add_lora(
                settings.r, settings.lora_alpha, settings.lora_dropout, settings.use_rslora, generator=generator
            )
        elif isinstance(module, Experts) and expert_targets:
            module.add_lora(expert_targets, settings.r, settings.lora_alpha, settings.use_rslora, generator=generator)
    for name in settings.modules_to_save:
        model.get_submodule(name).requires_grad_(True)
    model.lora_settings = settings


@contextlib.contextmanager
def disable_adapter(model):
    """Context manager running ``model`` as its base model (adapters skipped), e.g. DPO's reference policy."""
    modules = [*lora_modules(model).values(), *expert_lora_modules(model).values()]
    previous = [m.adapter_enabled for m in modules]
    for m in modules:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m, state in zip(modules, previous):
            m.adapter_enabled = state


def adapter_state_dict(model, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's key names (``base_model.model.<path>.lora_A.weight``).

    Args:
        model (CausalLM): the model whose adapters are wanted.
        state_dict (dict, optional): take the values from this ``model.state_dict()``-style mapping instead of the
            model's parameters (FSDP2: the full tensors gathered from every rank's shards).
    """
    def value(module_key: str, param: torch.Tensor) -> torch.Tensor:
        if state_dict is None:
            return param.detach()
        if module_key not in state_dict:
            raise CheckpointError(f"the state dict to save has no {module_key!r}; pass the model's full state dict")
        return state_dict[module_key].detach()

    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = value(f"{name}.lora_A", m.lora_A)
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = value(f"{name}.lora_B", m.lora_B)
    for name, m in expert_lora_modules(model).items():
        for projection, (key_a, key_b) in expert_adapter_keys(name, m).items():
            a, b = m.lora_factors(projection)
            out[key_a] = value(f"{name}.{projection}_lora_A", a)
            out[key_b] = value(f"{name}.{projection}_lora_B", b)
    for key, p in _saved_module_params(model).items():
        out[key] = value(key[len(PEFT_PREFIX):], p)
    return out


def _saved_module_params(model) -> dict[str, torch.nn.Parameter]:
    """``{PEFT key: parameter}`` of the modules trained whole (``modules_to_save``), under the key PEFT 0.21
    writes for them (``base_model.model.score.weight``)."""
    settings = getattr(model, "lora_settings", None)
    out = {}
    for module_name in getattr(settings, "modules_to_save", ()):
        for name, p in model.get_submodule(module_name).named_parameters():
            out[f"{PEFT_PREFIX}{module_name}.{name}"] = p
    return out


def load_adapter_state_dict(model, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy PEFT-format adapter weights into the model's adapters.

    Raises:
        CheckpointError: missing, unexpected or mis-shaped adapter tensors.
    """
    from engine.errors import CheckpointError

    slots = [
        (f"{PEFT_PREFIX}{name}.{part}.weight", param)
        for name, m in lora_modules(model).items()
        for part, param in (("lora_A", m.lora_A), ("lora_B", m.lora_B))
    ]
    for name, m in expert_lora_modules(model).items():
        for projection, keys in expert_adapter_keys(name, m).items():
            slots.extend(zip(keys, m.lora_factors(projection)))
    expected = set()
    for key, param in slots:
        expected.add(key)
        if key not in state:
            continue
        if tuple(state[key].shape) != tuple(param.shape):
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(state[key].shape)}, the model's adapter has {tuple(param.shape)}; "
                "the adapter was trained for another model or rank"
            )
        with torch.no_grad():
            param.copy_(state[key])
    for key, param in _saved_module_params(model).items():
        expected.add(key)
        if key in state:
            if tuple(state[key].shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{source}: {key} has shape {tuple(state[key].shape)}, the model's has {tuple(param.shape)}; "
                    "the adapter was trained with another number of labels"
                )
            with torch.no_grad():
                param.copy_(state[key])
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model's adapters: missing {missing[:4]}, unexpected {unexpected[:4]}. "
            "Was it saved from another base model?"
        )
