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
:func:`kernels.dispatch.simulate_gpu`, so every dispatch decision is the one a CUDA GPU gets (Triton
kernels, flash attention, smart checkpointing's host offload); Triton launch wrappers allocate their
outputs but launch nothing. Planning for ``device="cpu"`` runs the CPU code path on fake CPU tensors.

The plain Hugging Face baseline (transformers + PEFT, as TRL trains it) is planned the same way by
:mod:`engine.memory.hf_baseline`.

What the plan leaves out, and :func:`max_context` adds: the CUDA context and library workspaces
(``reserved_bytes``) and the caching allocator's rounding and fragmentation (``fragmentation``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from engine.errors import ConfigurationError
from engine.memory.configs import resolve_config
from engine.memory.tracker import MemoryTracker

#: Optimizers the planner knows: torch AdamW (fp32 states), bitsandbytes' 8-bit AdamW, plain SGD.
OPTIMIZERS = ("adamw", "adamw_8bit", "sgd")
#: Gradient checkpointing modes: off, recompute each layer, recompute + offload layer inputs to host.
CHECKPOINTING = (False, True, "smart")
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
        from kernels.dispatch import simulate_gpu
        from kernels.nf4 import build_tables

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
        with self._modes():
            if not self._warm:
                self._step(seq_len)  # allocates the optimizer states
                self._warm = True
            self.tracker.prune()
            start, end_of_forward, grads = self._step(seq_len)
        self._cache[seq_len] = estimate = self._breakdown(start, end_of_forward, grads)
        return estimate

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
    if gradient_checkpointing not in CHECKPOINTING:
        raise ConfigurationError(f"gradient_checkpointing must be False, True or 'smart', got {gradient_checkpointing!r}")
    if optimizer not in OPTIMIZERS:
        raise ConfigurationError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")


def _engine_builder(config, max_seq_length, s: dict) -> Callable:
    """``build(fake_device) -> (model, optimizer)`` for the engine, set up as ``FastModel`` + ``SFTTrainer`` do."""
    from engine.loader import FastModel
    from engine.models.config import model_args_from_hf_config
    from engine.models.transformer import CausalLM
    from engine.modules.linear import Linear

    args = model_args_from_hf_config(config)

    def build(fake_device):
        with torch.device("meta"):  # no values are ever computed: build without initialisation
            model = CausalLM(args, max_seq_length=max_seq_length, dtype=s["dtype"])
        materialize_fake(model, fake_device)
        if s["load_in_4bit"]:
            for name, module in model.named_modules():
                if isinstance(module, Linear) and name.startswith("model.layers."):
                    module.quantize_nf4_(double_quant=True)
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
) -> PlanSession:
    """A :class:`PlanSession` for ``model`` (arguments as :func:`estimate_memory`); plans many lengths quickly."""
    _check(batch_size, lora_r, gradient_checkpointing, optimizer)
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
        if tiled_mlp:
            raise ConfigurationError("tiled_mlp is an engine feature; the Hugging Face baseline has no such option")
        from engine.memory.hf_baseline import hf_builder

        build = hf_builder(config, settings)
    else:
        build = _engine_builder(config, max_seq_length, settings)
    session = PlanSession(build, device, batch_size)
    session.settings = {k: (str(v).replace("torch.", "") if k == "dtype" else v) for k, v in settings.items()}
    return session


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
        gradient_checkpointing: ``False``, ``True`` or ``"smart"`` (recompute + offload layer inputs to host).
        optimizer (str): one of :data:`OPTIMIZERS`.
        **kwargs: ``lora_alpha`` (default ``lora_r``), ``target_modules`` (default all seven projections),
            ``dtype`` (compute dtype, default bf16), ``device`` (``"cuda"``: plan for a GPU, simulated;
            ``"cpu"``: the CPU path), ``tiled_mlp`` (engine only: the MLP in tiles along the sequence),
            ``baseline`` (``"engine"``, or ``"hf"`` for transformers + PEFT + bitsandbytes as TRL trains
            it, with flash-attention 2; see :mod:`engine.memory.hf_baseline`).

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
    session: PlanSession | None = None,
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
        session (PlanSession, optional): reuse a session (and its cache) from :func:`plan_session`.
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
