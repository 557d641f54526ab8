"""Memory planning: the peak memory of a training step, from running it on fake tensors.

:func:`estimate_memory` builds the model from its config only (no weights are read), inside a
``FakeTensorMode`` (tensors have shapes, dtypes and devices but no data) with a
:class:`~engine.memory.tracker.MemoryTracker` on top, and runs two real training steps of the
engine's code: forward, backward, optimizer step, ``zero_grad``. The tracker logs every storage's
allocation and release; the planned peak is the highest live total of the second step (the first
one also allocates the optimizer states). Because the engine's own modules, autograd Functions,
checkpointing and loss run, the plan follows the code as it changes: a new saved tensor shows up in
the plan without anyone updating a formula.

Planning for a GPU (``device="cuda"``, the default) runs on ``meta`` tensors inside
:func:`engine_kernels.dispatch.simulate_gpu`, so every dispatch decision is the one a CUDA GPU gets (Triton
kernels, flash attention, smart checkpointing's host offload); Triton launch wrappers allocate their
outputs but launch nothing. Planning for ``device="cpu"`` runs the CPU code path on fake CPU tensors.

The plain Hugging Face baseline (transformers + PEFT, as TRL trains it) is planned the same way by
:mod:`engine.memory.hf_baseline`.

What the plan leaves out, and :func:`max_context` adds: the CUDA context and library workspaces
(``reserved_bytes``) and the caching allocator's rounding and fragmentation (``fragmentation``).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from engine.errors import ConfigurationError
from engine.memory.configs import resolve_config
from engine.memory.tracker import MemoryTracker
from engine.modules.checkpointing import CHECKPOINTING_CHOICES, CheckpointChoice, CheckpointPolicy

#: Optimizers the planner knows: torch AdamW (fp32 states), bitsandbytes' 8-bit AdamW, plain SGD.
OPTIMIZERS = ("adamw", "adamw_8bit", "sgd")
#: Gradient checkpointing modes: off, recompute each layer, recompute + offload layer inputs to host. Any
#: :class:`~engine.modules.checkpointing.CheckpointPolicy` value is planned too (``"every_2"``, ``"all"``, ...).
CHECKPOINTING = (False, True, "smart")
#: The policies ``use_gradient_checkpointing="auto"`` tries, fastest first (fewest layers recomputed); "smart" only
#: on CUDA (on CPU it is "all").
AUTO_POLICIES = (
    CheckpointPolicy("none"), CheckpointPolicy("every_k", 4), CheckpointPolicy("every_k", 2), CheckpointPolicy("all"),
    CheckpointPolicy("smart"),
)
#: Share of the free memory ``"auto"`` lets a step use (the rest: allocator fragmentation, CUDA workspaces,
#: what the plan leaves out such as DPO's reference pass, other processes).
DEFAULT_BUDGET_MARGIN = 0.8
#: CUDA context, cuBLAS/cuDNN workspaces and other memory outside PyTorch's allocator (per process).
DEFAULT_RESERVED_BYTES = 600 * 2**20
#: Headroom for the caching allocator's block rounding and fragmentation, as a fraction of the peak.
DEFAULT_FRAGMENTATION = 0.05

_GIB = 2**30


@dataclass
class MemoryEstimate:
    """Planned memory of one training step, in bytes.

    The components are what is alive at the moment of the peak and add up to ``total``:

    Attributes:
        weights: frozen parameters and buffers (NF4 codes and scales, embeddings, norms).
        lora_parameters: trainable parameters (the adapters).
        gradients: gradients of trainable parameters alive at the peak.
        optimizer_states: e.g. AdamW's two moments.
        activations: tensors saved in forward for backward, still alive at the peak.
        transient: everything else alive at the peak: temporaries of the op running then,
            recomputed activations of a checkpointed layer, gradients of activations, workspaces.
        total: the peak of live device memory during a training step (the sum of the above).
        saved_activations: device bytes saved for backward at the end of forward.
        host_offload: peak host memory of activations offloaded by smart checkpointing.
        settings: what was planned (model, sequence length, batch, LoRA rank, ...).
    """

    weights: int
    lora_parameters: int
    gradients: int
    optimizer_states: int
    activations: int
    transient: int
    total: int
    saved_activations: int
    host_offload: int
    settings: dict = field(default_factory=dict)

    COMPONENTS = ("weights", "lora_parameters", "gradients", "optimizer_states", "activations", "transient")

    def required_bytes(
        self, reserved_bytes: int = DEFAULT_RESERVED_BYTES, fragmentation: float = DEFAULT_FRAGMENTATION
    ) -> int:
        """GPU memory a run needs: the planned peak plus allocator headroom plus the CUDA context."""
        return int(self.total * (1.0 + fragmentation)) + reserved_bytes

    def fits(self, vram_gb: float, **kwargs) -> bool:
        """Whether the step fits a GPU of ``vram_gb`` GiB (see :meth:`required_bytes` for ``kwargs``)."""
        return self.required_bytes(**kwargs) <= vram_gb * _GIB

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        rows = [f"| {name.replace('_', ' ')} | {getattr(self, name) / 2**20:,.1f} |" for name in self.COMPONENTS]
        rows.append(f"| **total (peak)** | **{self.total / 2**20:,.1f}** |")
        rows.append(f"| saved activations after forward | {self.saved_activations / 2**20:,.1f} |")
        rows.append(f"| host memory (offloaded activations) | {self.host_offload / 2**20:,.1f} |")
        head = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"{head}\n\n| component | MiB |\n|---|---:|\n" + "\n".join(rows)


# --------------------------------------------------------------------------- fake models


def materialize_fake(module: nn.Module, device: torch.device) -> None:
    """Replace every parameter and buffer of ``module`` (built on ``meta``) by an uninitialised fake tensor on
    ``device``. Must run inside the ``FakeTensorMode``; tied parameters stay tied."""
    done: dict[int, torch.Tensor] = {}
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
            m._parameters[name] = done[id(p)]
        for name, b in list(m._buffers.items()):
            if b is None:
                continue
            if id(b) not in done:
                done[id(b)] = torch.empty_like(b, device=device)
            m._buffers[name] = done[id(b)]


class _EightBitAdamStates:
    """Stand-in for bitsandbytes' 8-bit AdamW (whose CUDA kernels cannot run on fake tensors): allocates the
    same states (two uint8 moments plus an fp32 scale per 256 values for tensors of >= 4096 values, fp32
    moments for smaller ones) and updates nothing."""

    def __init__(self, params):
        self.params = list(params)
        self.state: dict = {}

    def step(self) -> None:
        for p in self.params:
            if p in self.state:
                continue
            if p.numel() >= 4096:
                blocks = math.ceil(p.numel() / 256)
                self.state[p] = [torch.empty_like(p, dtype=torch.uint8) for _ in range(2)] + [
                    torch.empty(blocks, dtype=torch.float32, device=p.device) for _ in range(2)
                ]
            else:
                self.state[p] = [torch.empty_like(p, dtype=torch.float32) for _ in range(2)]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def make_optimizer(name: str, params):
    """The optimizer a plan runs: ``"adamw"`` is ``torch.optim.AdamW`` (the per-parameter implementation,
    which like the fused CUDA one used by default keeps no temporaries beyond one parameter's)."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, foreach=False, fused=False)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4)
    if name == "adamw_8bit":
        return _EightBitAdamStates(params)
    raise ConfigurationError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    state = optimizer.state.values()
    tensors = []
    for s in state:
        values = s.values() if isinstance(s, dict) else s
        tensors.extend(v for v in values if isinstance(v, torch.Tensor))
    return tensors


class PlanSession:
    """A model built once on fake tensors, whose training step can be planned at any sequence length.

    Args:
        build: called inside the fake session with the fake device; returns ``(model, optimizer)``.
        device (str): ``"cuda"`` (simulated GPU) or ``"cpu"``.
        batch_size (int): sequences per step.

    :meth:`plan` runs one training step (the first call runs one more before it, so that the optimizer
    states exist as in every later step) and returns the peak of that step; results are cached by length.
    """

    def __init__(self, build: Callable, device: str, batch_size: int):
        from engine_kernels.dispatch import simulate_gpu
        from engine_kernels.nf4 import build_tables

        if device not in ("cuda", "cpu"):
            raise ConfigurationError(f"device must be 'cuda' (plan for a GPU) or 'cpu', got {device!r}")
        build_tables()  # real lookup tables, built before any fake tensor exists
        self.device = device
        self.batch_size = batch_size
        self.fake_device = torch.device("meta" if device == "cuda" else "cpu")
        self.tracker = MemoryTracker(self.fake_device.type)
        self._fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self._gpu = simulate_gpu if device == "cuda" else nullcontext
        self._cache: dict[int, MemoryEstimate] = {}
        self._policy_cache: dict[tuple[str, int], MemoryEstimate] = {}
        self._warm = False
        with self._modes():
            self.model, self.optimizer = build(self.fake_device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ConfigurationError("the model has no trainable parameters: nothing to plan a training step for")

    @contextmanager
    def _modes(self) -> Iterator[None]:
        with self._gpu(), self._fake_mode, self.tracker:
            yield

    def _step(self, seq_len: int):
        """One training step; returns ``(start clock, end-of-forward clock, gradient records)``."""
        tracker = self.tracker
        input_ids = torch.zeros(self.batch_size, seq_len, dtype=torch.long, device=self.fake_device)
        labels = torch.zeros(self.batch_size, seq_len, dtype=torch.long, device=self.fake_device)
        tracker.phase("forward")
        start = tracker.clock
        loss = self.model(input_ids=input_ids, labels=labels).loss
        tracker.phase("backward")
        end_of_forward = tracker.clock
        loss.backward()
        del loss
        grads = [tracker.record_of(p.grad) for p in self.trainable if p.grad is not None]
        tracker.phase("optimizer")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        del input_ids, labels
        tracker.phase("done")
        return start, end_of_forward, grads

    def plan(self, seq_len: int) -> MemoryEstimate:
        """The planned peak of a training step on ``batch_size x seq_len`` tokens."""
        if seq_len in self._cache:
            return self._cache[seq_len]
        self._cache[seq_len] = estimate = self._run(seq_len)
        return estimate

    def plan_policy(self, seq_len: int, policy, warm_len: int | None = None) -> MemoryEstimate:
        """The planned peak with gradient checkpointing set to ``policy`` (a
        :class:`~engine.modules.checkpointing.CheckpointPolicy` or a value naming one); cached by policy and length.

        ``warm_len``: the length of the extra first step that creates the optimizer states (default ``seq_len``).
        The states do not depend on the length, so a short warm-up step gives the same plan for less time.
        """
        policy = CheckpointPolicy.parse(policy)
        if policy is None:
            raise ConfigurationError("plan_policy needs a policy, not 'auto'")
        key = (policy.name, seq_len)
        if key not in self._policy_cache:
            previous = self.model.gradient_checkpointing
            self.model.gradient_checkpointing = policy.value
            try:
                self._policy_cache[key] = self._run(seq_len, warm_len)
            finally:
                self.model.gradient_checkpointing = previous
        return self._policy_cache[key]

    def _run(self, seq_len: int, warm_len: int | None = None) -> MemoryEstimate:
        with self._modes():
            if not self._warm:
                self._step(warm_len or seq_len)  # allocates the optimizer states
                self._warm = True
            self.tracker.prune()
            start, end_of_forward, grads = self._step(seq_len)
        return self._breakdown(start, end_of_forward, grads)

    @property
    def planned_lengths(self) -> list[int]:
        """Sequence lengths planned so far (their results are cached)."""
        return sorted(self._cache)

    def _breakdown(self, start: int, end_of_forward: int, grad_records) -> MemoryEstimate:
        tracker = self.tracker
        end = tracker.clock

        def ids(tensors) -> set[int]:
            found = set()
            for t in tensors:
                r = tracker.record_of(t)
                if r is not None:
                    found.add(id(r))
            return found

        frozen = ids([p for p in self.model.parameters() if not p.requires_grad] + list(self.model.buffers()))
        lora = ids(self.trainable)
        states = ids(optimizer_state_tensors(self.optimizer))
        grads = {id(r) for r in grad_records if r is not None}
        total, at = tracker.peak(start, end)
        parts = dict.fromkeys(MemoryEstimate.COMPONENTS, 0)
        saved = 0
        for r in tracker.records.values():
            if r.on_host:
                continue
            kept_for_backward = start < r.born <= end_of_forward and (r.died is None or r.died > end_of_forward)
            saved += r.nbytes if kept_for_backward else 0
            if not (r.born <= at and (r.died is None or r.died > at)):
                continue
            key = id(r)
            if key in frozen:
                parts["weights"] += r.nbytes
            elif key in lora:
                parts["lora_parameters"] += r.nbytes
            elif key in states:
                parts["optimizer_states"] += r.nbytes
            elif key in grads:
                parts["gradients"] += r.nbytes
            elif kept_for_backward:
                parts["activations"] += r.nbytes
            else:
                parts["transient"] += r.nbytes
        host, _ = tracker.peak(start, end, on_host=True)
        host_before, _ = tracker.peak(start, start, on_host=True)
        return MemoryEstimate(**parts, total=total, saved_activations=saved, host_offload=host - host_before)


# --------------------------------------------------------------------------- engine side


def _check(batch_size, lora_r, gradient_checkpointing, optimizer) -> None:
    for name, value in (("batch_size", batch_size), ("lora_r", lora_r)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")
    try:
        policy = CheckpointPolicy.parse(gradient_checkpointing)
    except ConfigurationError:
        policy = None
    if policy is None:  # unknown, or "auto" (which is chosen by planning, not planned itself)
        choices = CHECKPOINTING_CHOICES.replace("'auto', ", "")
        hint = (
            " ('auto' is what these plans choose from: engine.memory.planner.choose_checkpointing(model, ...) for a "
            "loaded model)" if gradient_checkpointing == "auto" else ""
        )
        raise ConfigurationError(f"gradient_checkpointing must be {choices}; got {gradient_checkpointing!r}{hint}")
    if optimizer not in OPTIMIZERS:
        raise ConfigurationError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")


def layer_kinds(args) -> list[tuple]:
    """Per decoder layer, what makes layers differ in memory: ``(attention window, holds experts)``."""
    n = args.num_layers
    windows = list(args.sliding_windows) if args.sliding_windows else [None] * n
    sparse = list(args.sparse_layers) if args.sparse_layers else [False] * n
    return list(zip(windows, sparse))


def shallow_args(args, num_layers: int):
    """``args`` of the same model with only its first ``num_layers`` decoder layers (per-layer lists cut)."""
    import dataclasses

    if num_layers == args.num_layers:
        return args
    cut = {name: list(getattr(args, name)[:num_layers]) for name in ("sliding_windows", "sparse_layers")
           if getattr(args, name)}
    return dataclasses.replace(args, num_layers=num_layers, **cut)


def _engine_builder(config, max_seq_length, s: dict, num_layers: int | None = None) -> Callable:
    """``build(fake_device) -> (model, optimizer)`` for the engine, set up as ``FastModel`` + ``SFTTrainer`` do;
    with ``num_layers``, only the model's first ``num_layers`` decoder layers."""
    from engine.loader import FastModel
    from engine.loading.weights import quantize_nf4_
    from engine.models.config import model_args_from_hf_config
    from engine.models.transformer import CausalLM

    args = model_args_from_hf_config(config)
    args = shallow_args(args, num_layers) if num_layers else args

    def build(fake_device):
        with torch.device("meta"):  # no values are ever computed: build without initialisation
            model = CausalLM(args, max_seq_length=max_seq_length, dtype=s["dtype"])
        materialize_fake(model, fake_device)
        if s["load_in_4bit"]:  # as the loader does: decoder projections and experts; routers stay dense
            quantize_nf4_(model, double_quant=True)
        FastModel.get_peft_model(
            model, r=s["lora_r"], lora_alpha=s["lora_alpha"], target_modules=s["target_modules"],
            use_gradient_checkpointing=s["gradient_checkpointing"], tiled_mlp=s["tiled_mlp"],
        )
        return model, make_optimizer(s["optimizer"], [p for p in model.parameters() if p.requires_grad])

    return build


def plan_session(
    model,
    batch_size: int = 1,
    lora_r: int = 16,
    load_in_4bit: bool = True,
    gradient_checkpointing: bool | str = "smart",
    optimizer: str = "adamw",
    *,
    lora_alpha: float | None = None,
    target_modules="all-linear",
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    tiled_mlp: bool | int = False,
    baseline: str = "engine",
    max_seq_length: int = 1 << 22,
    extrapolate: bool = False,
) -> PlanSession | ExtrapolatedSession:
    """A :class:`PlanSession` for ``model`` (arguments as :func:`estimate_memory`); plans many lengths quickly.

    ``extrapolate=True`` (engine only): a model whose decoder layers are all alike (same attention window, all
    with experts or none) and deeper than :data:`_SHALLOW_LIMIT` is planned through two shallow copies, an
    :class:`ExtrapolatedSession` (see there); otherwise, and by default, at full depth.
    """
    _check(batch_size, lora_r, gradient_checkpointing, optimizer)
    gradient_checkpointing = CheckpointPolicy.parse(gradient_checkpointing).value  # "unsloth" -> "smart", "all" -> True
    if baseline not in ("engine", "hf"):
        raise ConfigurationError(f"baseline must be 'engine' or 'hf', got {baseline!r}")
    config = resolve_config(model)
    settings = {
        "model": getattr(config, "name_or_path", None) or getattr(config, "model_type", "?"),
        "baseline": baseline,
        "batch_size": batch_size,
        "lora_r": lora_r,
        "lora_alpha": lora_r if lora_alpha is None else lora_alpha,
        "target_modules": target_modules,
        "load_in_4bit": load_in_4bit,
        "gradient_checkpointing": gradient_checkpointing,
        "optimizer": optimizer,
        "dtype": dtype,
        "device": device,
        "tiled_mlp": tiled_mlp,
    }
    if baseline == "hf":
        if CheckpointPolicy.parse(gradient_checkpointing).mode == "every_k":
            raise ConfigurationError("the Hugging Face baseline checkpoints every layer or none: use True or False")
        if tiled_mlp:
            raise ConfigurationError("tiled_mlp is an engine feature; the Hugging Face baseline has no such option")
        from engine.memory.hf_baseline import hf_builder

        if extrapolate:
            raise ConfigurationError("extrapolate=True plans the engine only; the Hugging Face baseline is planned "
                                     "at full depth (leave extrapolate unset with baseline='hf')")
        build = hf_builder(config, settings)
    else:
        build = _engine_builder(config, max_seq_length, settings)
    shown = {k: (str(v).replace("torch.", "") if k == "dtype" else v) for k, v in settings.items()}
    depths = _extrapolation_depths(config, gradient_checkpointing) if extrapolate else None
    if depths is not None:
        d1, d2 = depths
        sessions = [PlanSession(_engine_builder(config, max_seq_length, settings, d), device, batch_size)
                    for d in depths]
        n = config.num_hidden_layers
        return ExtrapolatedSession(*sessions, d1, d2, n, {**shown, "depth": f"extrapolated from {d1} and {d2} layers"})
    session = PlanSession(build, device, batch_size)
    session.settings = {**shown, "depth": "all layers planned"}
    return session


def _extrapolation_depths(config, gradient_checkpointing) -> tuple[int, int] | None:
    """The two shallow depths an extrapolated plan of ``config`` uses, or ``None``: plan at full depth.

    A checkpointing policy that recomputes every ``k``-th layer repeats with period ``k`` (``k = 1`` for the others);
    the depths are ``d1 >= 2`` with ``d1 = n (mod k)`` and ``d1 + k``, so that the copies' layers end as the model's
    do and their first layer (whose input gradient is never needed) is not the one repeated.
    """
    from engine.models.config import model_args_from_hf_config

    args = model_args_from_hf_config(config)
    n = args.num_layers
    if len(set(layer_kinds(args))) > 1 or n <= _SHALLOW_LIMIT:
        return None
    policy = CheckpointPolicy.parse(gradient_checkpointing)
    k = policy.every if policy.mode == "every_k" else 1
    d1 = n % k or k
    while d1 < 2:
        d1 += k
    return (d1, d1 + k) if d1 + k < n else None


class ExtrapolatedSession:
    """Plans of a deep model of identical decoder layers, from two planned shallow copies of it.

    Every decoder layer adds the same memory at the moment of the peak (its weights, adapters, their gradients and
    optimizer states, what it keeps for backward), so the plan is linear in depth: with copies of ``d1`` and ``d2``
    layers, ``plan(n) = plan(d1) + (n - d1) / (d2 - d1) * (plan(d2) - plan(d1))``, component by component.
    ``tests/test_moe_memory.py`` checks it against a plan at full depth. Planning cost drops by about
    ``n / (d1 + d2)`` (Qwen3-30B-A3B: 48 layers planned as 2 + 3).

    Attributes:
        shallow, deeper (PlanSession): the copies of ``d1`` and ``d2`` layers.
        settings (dict): what was planned, with ``"depth"`` saying how.
    """

    def __init__(self, shallow: PlanSession, deeper: PlanSession, d1: int, d2: int, num_layers: int, settings: dict):
        self.shallow, self.deeper = shallow, deeper
        self.d1, self.d2, self.num_layers = d1, d2, num_layers
        self.settings = settings
        self.batch_size = shallow.batch_size
        self._cache: dict[int, MemoryEstimate] = {}

    def plan(self, seq_len: int) -> MemoryEstimate:
        """The extrapolated peak of a training step on ``batch_size x seq_len`` tokens (cached by length)."""
        if seq_len not in self._cache:
            a, b = self.shallow.plan(seq_len), self.deeper.plan(seq_len)
            q = (self.num_layers - self.d1) // (self.d2 - self.d1)
            names = (*MemoryEstimate.COMPONENTS, "total", "saved_activations", "host_offload")
            values = {name: getattr(a, name) + q * (getattr(b, name) - getattr(a, name)) for name in names}
            self._cache[seq_len] = MemoryEstimate(**values, settings=dict(self.settings))
        return self._cache[seq_len]

    @property
    def planned_lengths(self) -> list[int]:
        """Sequence lengths planned so far (their results are cached)."""
        return sorted(self._cache)


def estimate_memory(
    model,
    max_seq_length: int,
    batch_size: int = 1,
    lora_r: int = 16,
    load_in_4bit: bool = True,
    gradient_checkpointing: bool | str = "smart",
    optimizer: str = "adamw",
    **kwargs,
) -> MemoryEstimate:
    """Plan the memory of one LoRA/QLoRA training step by running it on fake tensors (no memory, no GPU).

    Args:
        model: a name (``"meta-llama/Llama-3.1-8B"``; see :func:`engine.memory.configs.known_model_names`
            for the names known offline), a model folder, a ``.gguf`` file, a transformers config or an
            engine model (only its config is used).
        max_seq_length (int): tokens per sequence.
        batch_size (int): sequences per step.
        lora_r (int): LoRA rank.
        load_in_4bit (bool): NF4 base weights (QLoRA).
        gradient_checkpointing: ``False``, ``True``, ``"smart"`` (recompute + offload layer inputs to host) or
            ``"every_<k>"`` (recompute layers ``0, k, 2k, ...``); see :class:`~engine.modules.checkpointing.CheckpointPolicy`.
        optimizer (str): one of :data:`OPTIMIZERS`.
        **kwargs: ``lora_alpha`` (default ``lora_r``), ``target_modules`` (default all seven projections),
            ``dtype`` (compute dtype, default bf16), ``device`` (``"cuda"``: plan for a GPU, simulated;
            ``"cpu"``: the CPU path), ``tiled_mlp`` (engine only: the MLP in tiles along the sequence),
            ``baseline`` (``"engine"``, or ``"hf"`` for transformers + PEFT + bitsandbytes as TRL trains
            it, with flash-attention 2; see :mod:`engine.memory.hf_baseline`), ``extrapolate`` (engine only: a deep
            model of identical layers planned through two shallow copies, see :class:`ExtrapolatedSession`; much
            faster for mixtures of experts, whose planning costs time per expert).

    Returns:
        MemoryEstimate: the breakdown of the peak, in bytes.

    Raises:
        ConfigurationError: invalid arguments or an unknown model.
        PlanningError: the code path asked for a value that fake tensors do not have.
    """
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length <= 0:
        raise ConfigurationError(f"max_seq_length must be a positive integer, got {max_seq_length!r}")
    session = plan_session(
        model, batch_size, lora_r, load_in_4bit, gradient_checkpointing, optimizer,
        max_seq_length=max_seq_length, **kwargs,
    )
    estimate = session.plan(max_seq_length)
    estimate.settings = {**session.settings, "max_seq_length": max_seq_length}
    return estimate


def search_max_length(
    need: Callable[[int], float],
    budget: float,
    *,
    low: int = 1024,
    high: int = 1 << 21,
    granularity: int = 64,
    known: Iterable[int] = (),
) -> int:
    """Largest multiple of ``granularity`` in ``[granularity, high]`` with ``need(length) <= budget``; 0 if none.

    ``need(length)`` (bytes, non-decreasing in length) is expensive, so the search interpolates: memory grows
    almost linearly with length, so the next probe is where the line through two probes reaches ``budget``,
    with a bisection step whenever an interpolation did not halve the bracket (never much worse than
    bisection; a handful of probes when memory is close to linear). ``known`` lengths (already computed,
    e.g. cached by a :class:`PlanSession`) seed the bracket.
    """
    g = granularity
    top = max(g, high // g * g)

    def down(x: float) -> int:
        return max(g, int(x) // g * g)

    def fits(n: int) -> bool:
        return need(n) <= budget

    known = sorted(n for n in set(known) if g <= n <= top and n % g == 0)
    fitting = [n for n in known if fits(n)]
    failing = [n for n in known if not fits(n) and (not fitting or n > fitting[-1])]
    if not fitting:
        first = min(max(g, low // g * g), top, failing[0] - g if failing and failing[0] > g else top)
        if fits(first):
            fitting = [first]
        else:
            failing = [first]
    if not fitting:  # even the first probe is too long: bisect below it
        lo, hi = 0, failing[0]
        while hi - lo > g:
            mid = down((lo + hi) / 2)
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo
    lo, hi = fitting[-1], (failing[0] if failing else None)
    prev = fitting[-2] if len(fitting) > 1 else None
    while hi is None:  # extrapolate from the two longest fitting probes until one does not fit
        if lo >= top:
            return top
        if prev is None:
            nxt = 2 * lo
        else:
            slope = (need(lo) - need(prev)) / (lo - prev)
            nxt = lo + (budget - need(lo)) / slope * 1.01 if slope > 0 else 4 * lo  # aim just past the crossing
        nxt = min(max(down(nxt), lo + g), top)
        if fits(nxt):
            prev, lo = lo, nxt
        else:
            hi = nxt
    bisect_next = False
    while hi - lo > g:  # shrink the bracket: interpolation, bisection when it stalls
        width = hi - lo
        if bisect_next:
            mid = down((lo + hi) / 2)
        else:
            n_lo, n_hi = need(lo), need(hi)
            frac = (budget - n_lo) / (n_hi - n_lo) if n_hi > n_lo else 0.5
            mid = down(lo + frac * (hi - lo))
        mid = min(max(mid, lo + g), hi - g)
        if fits(mid):
            lo = mid
        else:
            hi = mid
        bisect_next = (hi - lo) > width / 2 and not bisect_next
    return lo


def max_context(
    model,
    vram_gb: float,
    *,
    batch_size: int = 1,
    low: int = 1024,
    high: int = 1 << 21,
    granularity: int = 64,
    reserved_bytes: int = DEFAULT_RESERVED_BYTES,
    fragmentation: float = DEFAULT_FRAGMENTATION,
    session: PlanSession | ExtrapolatedSession | None = None,
    **plan_kwargs,
) -> int:
    """The longest sequence whose planned training step fits a GPU of ``vram_gb`` GiB.

    Args:
        model: as :func:`estimate_memory`.
        vram_gb (float): GPU memory in GiB.
        batch_size (int): sequences per step.
        low, high (int): the first probe and the longest length considered, in tokens.
        granularity (int): answers are multiples of this.
        reserved_bytes, fragmentation: see :meth:`MemoryEstimate.required_bytes`.
        session (PlanSession or ExtrapolatedSession, optional): reuse a session (and its cache) from
            :func:`plan_session`.
        **plan_kwargs: passed to :func:`plan_session` (``lora_r``, ``load_in_4bit``, ``baseline``, ...).

    Returns:
        int: the longest fitting length (a multiple of ``granularity``), or 0 when not even ``granularity`` fits.
    """
    if vram_gb <= 0:
        raise ConfigurationError(f"vram_gb must be positive, got {vram_gb}")
    session = session or plan_session(model, batch_size, **plan_kwargs)
    budget = vram_gb * _GIB

    def need(tokens: int) -> float:
        return session.plan(tokens).required_bytes(reserved_bytes, fragmentation)

    return search_max_length(need, budget, low=low, high=high, granularity=granularity, known=session.planned_lengths)


# --------------------------------------------------------------------------- use_gradient_checkpointing="auto"


def available_host_memory() -> int | None:
    """Bytes of RAM available to this process now: ``MemAvailable`` of ``/proc/meminfo``, capped by a cgroup v2
    memory limit (containers), else ``psutil.virtual_memory().available``; ``None`` when neither can be read."""
    available = None
    try:
        match = re.search(r"^MemAvailable:\s+(\d+)\s+kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        available = int(match.group(1)) * 1024 if match else None
    except OSError:
        pass
    if available is None:
        try:
            import psutil

            available = int(psutil.virtual_memory().available)
        except ImportError:
            return None
    try:  # a container's limit: what it may still use, counting reclaimable page cache as free
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            stat = re.search(r"^inactive_file\s+(\d+)", (cgroup / "memory.stat").read_text(), re.MULTILINE)
            used -= int(stat.group(1)) if stat else 0
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return available


def memory_budget(model, memory_budget_gb: float | None = None, margin: float = DEFAULT_BUDGET_MARGIN) -> tuple[int, str]:
    """``(bytes, where from)``: the memory a training step of ``model`` may use, weights included.

    ``memory_budget_gb`` (GiB) when given. Otherwise the model's own parameters and buffers (already allocated,
    so no longer counted as free) plus ``margin`` of the free memory on its device: ``torch.cuda.mem_get_info``
    on CUDA, :func:`available_host_memory` on CPU. The planned peak it is compared with includes the weights.

    Raises:
        ConfigurationError: the free memory cannot be read (pass ``memory_budget_gb``).
    """
    if memory_budget_gb is not None:
        return int(memory_budget_gb * _GIB), f"memory_budget_gb={memory_budget_gb:g}"
    device = model.device
    held = model.get_memory_footprint()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = "free CUDA memory"
    else:
        free = available_host_memory()
        where = "available RAM"
        if free is None:
            raise ConfigurationError(
                "use_gradient_checkpointing='auto' cannot tell how much memory is free (no /proc/meminfo, no psutil); "
                "pass memory_budget_gb=... to FastModel.get_peft_model, or choose a policy such as True"
            )
    return int(held + margin * free), f"{margin:.0%} of {free / _GIB:.2f} GiB {where} + the model's {held / _GIB:.2f} GiB"


def _optimizer_name(optim: str | None) -> str:
    """The planner's optimizer for a ``TrainingArguments.optim`` value (AdamW-like states unless 8-bit or SGD)."""
    optim = str(optim or "adamw").lower()
    if "8bit" in optim:
        return "adamw_8bit"
    if optim == "sgd":
        return "sgd"
    return "adamw"


def _signature(model, batch_size: int, optimizer: str) -> tuple:
    """What a plan of ``model`` depends on: architecture, dtypes, what trains, quantization, LoRA, tiling."""
    a = model.args
    arch = tuple(
        (f.name, tuple(v.tolist()) if isinstance(v, torch.Tensor) else tuple(v) if isinstance(v, list) else v)
        for f in fields(a)
        for v in [getattr(a, f.name)]
    )
    params = tuple((n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in model.named_parameters())
    buffers = tuple((n, tuple(b.shape), str(b.dtype)) for n, b in model.named_buffers())
    lora = repr(getattr(model, "lora_settings", None))
    tiles = tuple(layer.mlp.tile_rows for layer in model.model.layers)
    return (arch, params, buffers, lora, tiles, model.device.type, batch_size, optimizer)


class _AdamWStates:
    """Stand-in for ``torch.optim.AdamW`` in ``"auto"`` plans: allocates the two moments (like each parameter)
    and the step counter when created, so no warm-up step is needed, and in :meth:`step` the two
    parameter-sized temporaries one tensor's update holds (``exp_avg_sq.sqrt() / c``); updates nothing."""

    def __init__(self, params, host: torch.device):
        self.params = list(params)
        self.state = {
            p: [torch.empty_like(p), torch.empty_like(p), torch.zeros((), dtype=torch.float32, device=host)]
            for p in self.params
        }

    def step(self) -> None:
        for p in self.params:
            if p.grad is not None:
                temporaries = [torch.empty_like(p), torch.empty_like(p)]
                del temporaries

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def _mirror_builder(model, optimizer: str, num_layers: int | None = None) -> Callable:
    """``build(fake_device) -> (model, optimizer)``: a fake copy of ``model`` (same architecture, dtypes, NF4
    projections, LoRA adapters and dropout, trainable parameters, MLP tiles), without reading its weights;
    with ``num_layers``, only its first ``num_layers`` decoder layers. The optimizer's states exist from the start
    (AdamW and 8-bit AdamW stand-ins), so the first planned step needs no warm-up step before it."""
    import dataclasses

    from engine.models.transformer import CausalLM
    from engine.modules.linear import Linear
    from engine.modules.moe import Experts
    from engine.peft import add_lora, has_adapters

    args, dtype = model.args, model.dtype
    if num_layers is not None:
        args = shallow_args(args, num_layers)
    quantized = {
        name: (getattr(m, "weight_nf4_absmax_code", None) is not None, m._nf4_blocksize)
        for name, m in model.named_modules()
        if isinstance(m, Linear) and m.is_quantized
    }
    quantized_experts = {  # module -> [(projection, double_quant, blocksize)]
        name: [(proj, double, blocksize) for proj, (_, _, blocksize, double) in m._nf4.items()]
        for name, m in model.named_modules()
        if isinstance(m, Experts) and m._nf4
    }
    settings = getattr(model, "lora_settings", None) if has_adapters(model) else None
    if settings is not None and settings.modules_to_save:  # a classifier is planned as its causal LM (head swapped)
        settings = dataclasses.replace(settings, modules_to_save=[])
    real = {name: (p.dtype, p.requires_grad) for name, p in model.named_parameters()}  # no reference to the weights
    tiles = [layer.mlp.tile_rows for layer in model.model.layers]
    tiled_mlp = model.tiled_mlp

    def build(fake_device):
        with torch.device("meta"):
            fake = CausalLM(args, max_seq_length=1 << 22, dtype=dtype)
        materialize_fake(fake, fake_device)
        for name, m in fake.named_modules():
            if name in quantized:
                m.quantize_nf4_(double_quant=quantized[name][0], blocksize=quantized[name][1])
            for projection, double, blocksize in quantized_experts.get(name, ()):
                m.quantize_nf4_(projection, double_quant=double, blocksize=blocksize)
        if settings is not None:
            add_lora(fake, settings, random_state=0)
        for name, p in list(fake.named_parameters()):
            if name not in real:
                continue
            real_dtype, trains = real[name]
            if real_dtype != p.dtype:  # e.g. adapters cast to bf16
                owner, _, attr = name.rpartition(".")
                fake.get_submodule(owner)._parameters[attr] = nn.Parameter(torch.empty_like(p, dtype=real_dtype), trains)
            else:
                p.requires_grad_(trains)
        for layer, rows in zip(fake.model.layers, tiles):
            layer.mlp.tile_rows = rows
        fake.tiled_mlp = tiled_mlp
        fake.train()
        trainable = [p for p in fake.parameters() if p.requires_grad]
        if optimizer == "adamw":
            states = _AdamWStates(trainable, torch.device("cpu"))
        else:
            states = make_optimizer(optimizer, trainable)
            if optimizer == "adamw_8bit":
                states.step()  # allocates its states now (it updates nothing)
        return fake, states

    return build


#: Models with at most this many decoder layers are always planned at full depth (cheap enough).
_SHALLOW_LIMIT = 4
#: An extrapolated peak this close to the budget (relative) is checked by a plan at full depth.
EXTRAPOLATION_TOLERANCE = 0.15


class _AutoPlans:
    """The planned peaks of one model (signature), batch size and optimizer, for any policy and length.

    Planning costs time per decoder layer (every op of a step passes through the fake-tensor machinery), so a
    deep model whose layers are all alike is planned through shallow copies: a policy that checkpoints every
    ``k``-th layer repeats with period ``k`` (``none``, ``all``, ``smart``: ``k = 1``), and adding ``k`` layers
    below the top adds the same memory (their weights, what they save for backward, their gradients). With
    ``n = r + q k`` layers, copies of ``d1`` (``r``, or ``k`` when ``r = 0``) and ``d1 + k`` layers are planned
    and the peak extrapolated linearly in ``q``. For SmolLM2-135M that is 3 layers planned instead of 30 for
    ``none``. :func:`choose_checkpointing` re-plans at full depth when the extrapolation is close to the budget.
    """

    def __init__(self, model, batch_size: int, optimizer: str):
        self.batch_size, self.optimizer = batch_size, optimizer
        self.device = "cuda" if model.device.type == "cuda" else "cpu"
        self.num_layers = model.args.num_layers
        self.uniform = len(set(layer_kinds(model.args))) <= 1  # same window, experts in every layer or none
        self.sessions: dict[int, PlanSession] = {}  # by depth; they hold fake models only, never the weights

    def _session(self, model, depth: int) -> PlanSession:
        if depth not in self.sessions:
            self.sessions[depth] = PlanSession(_mirror_builder(model, self.optimizer, depth), self.device, self.batch_size)
            self.sessions[depth]._warm = True  # the optimizer states exist already
        return self.sessions[depth]

    def depths(self, policy: CheckpointPolicy) -> tuple[int, int] | None:
        """The two shallow depths to extrapolate from, or ``None``: plan at full depth."""
        n = self.num_layers
        if not self.uniform or n <= _SHALLOW_LIMIT:
            return None
        k = policy.every if policy.mode == "every_k" else 1
        d1 = n % k or k
        return (d1, d1 + k) if d1 + k < n else None

    def full(self, model, policy: CheckpointPolicy, seq_len: int) -> MemoryEstimate:
        return self._session(model, self.num_layers).plan_policy(seq_len, policy)

    def estimate(self, model, policy: CheckpointPolicy, seq_len: int) -> tuple[int, int, str]:
        """``(peak bytes, host offload bytes, how)``: extrapolated from shallow copies, or planned at full depth."""
        depths = self.depths(policy)
        if depths is None:
            e = self.full(model, policy, seq_len)
            return e.total, e.host_offload, "planned"
        d1, d2 = depths
        e1 = self._session(model, d1).plan_policy(seq_len, policy)
        e2 = self._session(model, d2).plan_policy(seq_len, policy)
        blocks = (self.num_layers - d1) // (d2 - d1)
        total = e1.total + blocks * (e2.total - e1.total)
        host = e1.host_offload + blocks * (e2.host_offload - e1.host_offload)
        return total, host, f"extrapolated from {d1} and {d2} layers"


#: Plans of models trained recently, by :func:`_signature` (tests and notebooks build the same model many times).
_PLANS: OrderedDict = OrderedDict()
_MAX_PLANS = 4


def _plans_for(model, batch_size: int, optimizer: str) -> _AutoPlans:
    key = _signature(model, batch_size, optimizer)
    if key in _PLANS:
        _PLANS.move_to_end(key)
        return _PLANS[key]
    plans = _PLANS[key] = _AutoPlans(model, batch_size, optimizer)
    while len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)
    return plans


def planned_peaks(model, batch_size: int, seq_len: int, policies=None, *, optimizer: str = "adamw",
                  exact: bool = False) -> dict[str, int]:
    """``{policy name: planned peak bytes}`` of a training step of ``model`` on ``batch_size x seq_len`` tokens,
    as :func:`choose_checkpointing` sees them (``exact=True``: every policy planned at full depth).
    ``policies`` defaults to :data:`AUTO_POLICIES` (``smart`` only for a CUDA model)."""
    optimizer = optimizer if optimizer in OPTIMIZERS else _optimizer_name(optimizer)
    plans = _plans_for(model, batch_size, optimizer)
    on_cuda = model.device.type == "cuda"
    out = {}
    for policy in policies or AUTO_POLICIES:
        policy = CheckpointPolicy.parse(policy)
        if policy.mode == "smart" and not on_cuda and policies is None:
            continue
        if exact:
            out[policy.name] = plans.full(model, policy, seq_len).total
        else:
            out[policy.name] = plans.estimate(model, policy, seq_len)[0]
    return out


def choose_checkpointing(
    model,
    batch_size: int,
    seq_len: int,
    *,
    memory_budget_gb: float | None = None,
    optimizer: str = "adamw",
    margin: float = DEFAULT_BUDGET_MARGIN,
    policies: Iterable[CheckpointPolicy] | None = None,
) -> CheckpointChoice:
    """The fastest gradient checkpointing policy whose planned training step fits the memory budget.

    Plans a training step of ``model`` (an engine model: a fake copy with the same architecture, dtypes, NF4
    weights, adapters and tiling; no weights are read) on ``batch_size x seq_len`` tokens for each policy of
    :data:`AUTO_POLICIES` in order (``none``, ``every_4``, ``every_2``, ``all``, and ``smart`` when the model
    is on CUDA), skipping a policy that recomputes the same layers as one already tried, and stops at the
    first whose planned peak (weights included) is at most the budget (:func:`memory_budget`). On CUDA,
    ``smart`` must also fit its offloaded layer inputs into ``margin`` of the available RAM.

    Cost: a deep model of identical layers is planned through shallow copies and the peak extrapolated (see
    :class:`_AutoPlans`); an extrapolated peak within :data:`EXTRAPOLATION_TOLERANCE` of the budget is planned
    again at full depth. Plans are cached per model signature, batch size, policy and length: the same shape
    again plans nothing.

    Args:
        model: an engine :class:`~engine.models.transformer.CausalLM` (usually with LoRA adapters).
        batch_size (int): rows per step (1 for a padding-free batch). seq_len (int): tokens per row.
        memory_budget_gb (float, optional): the budget in GiB; default: see :func:`memory_budget`.
        optimizer (str): one of :data:`OPTIMIZERS` (a ``TrainingArguments.optim`` name is mapped).
        margin (float): share of the free memory used when no budget is given.
        policies: the candidates (default :data:`AUTO_POLICIES`).

    Returns:
        CheckpointChoice: the policy, the reason, each policy tried with its planned peak, and the budget.

    Raises:
        ConfigurationError: no policy fits (the message names the smallest plan and its size against the budget).
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")
    optimizer = optimizer if optimizer in OPTIMIZERS else _optimizer_name(optimizer)
    budget, source = memory_budget(model, memory_budget_gb, margin)
    on_cuda = model.device.type == "cuda"
    host_budget = None
    if on_cuda:
        host = available_host_memory()
        host_budget = int(margin * host) if host is not None else None
    candidates = [p for p in (policies or AUTO_POLICIES) if on_cuda or p.mode != "smart"]
    auto = _plans_for(model, batch_size, optimizer)
    num_layers = model.args.num_layers
    plans, tried = [], set()
    shape = f"{batch_size} x {seq_len:,} tokens"
    for policy in candidates:
        layers = (policy.checkpointed_layers(num_layers), policy.mode == "smart")
        if layers in tried:  # e.g. every_4 and every_2 of a 2-layer model: the same plan
            continue
        tried.add(layers)
        total, host_bytes, how = auto.estimate(model, policy, seq_len)
        if how != "planned" and abs(total - budget) <= EXTRAPOLATION_TOLERANCE * budget:
            exact = auto.full(model, policy, seq_len)  # too close to call: plan at full depth
            total, host_bytes, how = exact.total, exact.host_offload, "planned (extrapolation was close to the budget)"
        fits = total <= budget
        if fits and policy.mode == "smart" and host_budget is not None:
            fits = host_bytes <= host_budget
        plans.append(
            {"policy": policy.name, "planned_peak_bytes": int(total), "host_offload_bytes": int(host_bytes),
             "fits": fits, "how": how}
        )
        if fits:
            tried_text = ", ".join(
                f"{p['policy']} {p['planned_peak_bytes'] / _GIB:.2f} GiB{'' if p['fits'] else ' (too much)'}"
                for p in plans
            )
            reason = f"auto for {shape}: planned peak {tried_text}; budget {budget / _GIB:.2f} GiB ({source})"
            return CheckpointChoice(policy, "auto", reason, batch_size, seq_len, budget, source, plans)
    smallest = min(plans, key=lambda p: p["planned_peak_bytes"])
    listing = ", ".join(f"{p['policy']} {p['planned_peak_bytes'] / _GIB:.2f} GiB" for p in plans)
    host_note = (
        " ('smart' also needs its offloaded layer inputs in RAM: "
        f"{plans[-1]['host_offload_bytes'] / _GIB:.2f} GiB against {host_budget / _GIB:.2f} GiB available)"
        if on_cuda and plans[-1]["policy"] == "smart" and host_budget is not None else ""
    )
    raise ConfigurationError(
        f"use_gradient_checkpointing='auto': no checkpointing policy fits a training step of {shape} into the "
        f"memory budget of {budget / _GIB:.2f} GiB ({source}). The smallest plan is '{smallest['policy']}' at "
        f"{smallest['planned_peak_bytes'] / _GIB:.2f} GiB (planned peaks: {listing}){host_note}. Lower "
        "per_device_train_batch_size or max_length, load the model with load_in_4bit=True, use tiled_mlp='auto' or "
        "a smaller LoRA rank, free memory, or raise memory_budget_gb if more memory is really available."
    )
