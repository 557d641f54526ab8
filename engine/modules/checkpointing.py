"""Gradient checkpointing of one decoder layer, optionally offloading its input to host memory ("smart").

Plain checkpointing (``offload=False``) is ``torch.utils.checkpoint`` in its non-reentrant form: the
layer runs forward keeping none of its internal activations; in backward the layer is run again from
its saved input ``x [b, s, d]`` (same RNG state, so LoRA dropout draws the same mask) and the
recomputed activations feed the gradient of the original graph. Gradients reach ``x`` and every
trainable parameter of the layer (LoRA ``A``/``B``, or all weights in full fine-tuning), and
``torch.autograd.grad`` works as well as ``.backward()``.

After that, the only activation a checkpointed layer keeps alive between forward and backward is ``x``
itself: ``b * s * d * bytes`` per layer (e.g. 8 x 2048 x 4096 x 2 B = 128 MiB per layer, 4 GiB for
32 layers in bf16). Smart checkpointing (``offload=True``, Unsloth-style) moves that tensor to host
memory as well, so GPU activation memory no longer grows with the number of layers.

Mechanism: non-reentrant checkpoint stores the layer's tensor arguments as autograd saved tensors
*outside* its own saved-tensor hooks, so a :class:`torch.autograd.graph.saved_tensors_hooks` pair
around the call sees exactly ``x`` (``ctx`` is a dataclass, not a tensor argument, so RoPE tables and
masks stay where they are) and none of the layer's internals:

* **pack** (forward, on CUDA): a side stream waits for the compute stream (so ``x`` is ready) and copies
  ``x`` into a pinned host buffer with ``non_blocking=True``; an event marks the copy's end.
  ``x.record_stream(side)`` keeps the caching allocator from reusing ``x``'s memory before the copy
  has read it. The compute stream never waits: the copy overlaps the next layer's forward.
* **unpack** (backward, when the layer's recomputation starts): unless already prefetched, the side
  stream copies the host buffer back into a fresh device tensor; the compute stream waits on that
  copy's event (not on the whole device) and ``record_stream`` hands the tensor over to it. Then the
  *previous* layer's input (the next one backward will need) is prefetched on the side stream, so
  its transfer overlaps this layer's recomputation and backward.

Cost: two PCIe transfers of ``b * s * d * bytes`` per layer and step (host -> device ~25 GB/s on PCIe 4,
so ~5 ms for 128 MiB, mostly hidden behind compute) and that much pinned host memory per layer.
Saving: the same amount of GPU memory per layer, minus one prefetched layer input.

Memory planning (:mod:`engine.memory`) runs this with ``meta`` tensors standing for a GPU
(:func:`engine_kernels.dispatch.simulate_gpu`): the offload then takes the synchronous copy path below (no
streams exist), which allocates and frees the same host and device buffers in the same order.

On CPU the offload is a no-op: the tensor already lives in host memory, so copying it would save
nothing; ``offload=True`` is then plain checkpointing. (Tests force the copy path on CPU through the
private ``_force_copy`` argument, which runs the same pack/restore logic without streams.)

**Which layers** are checkpointed is a :class:`CheckpointPolicy`: none, every ``k``-th layer (layers ``0, k,
2k, ...``: memory between none and all), all, or all with offload ("smart"). ``model.gradient_checkpointing``
holds what the user asked for (``False``, ``True``, ``"smart"``, ``"every_<k>"``, ``"auto"``);
:func:`current_policy` turns it into a policy, and :func:`training_policy` is what a training forward uses.
``"auto"`` is resolved by the memory planner (:func:`engine.memory.planner.choose_checkpointing`) when the
step's shape is known: by the engine trainers when training starts, or else at the first training forward
(from that batch's shape). Which layers are recomputed never changes the loss or the gradients.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine_kernels.dispatch import is_gpu
from engine_kernels.errors import ConfigurationError

#: One side stream per CUDA device index, for host <-> device copies of offloaded layer inputs.
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}
_SIDE_STREAMS_LOCK = threading.Lock()
#: The record packed last in this thread: its successor links to it so that backward can prefetch it.
_LAST_PACKED = threading.local()


#: The values ``use_gradient_checkpointing`` / ``model.gradient_checkpointing`` accept, for error messages.
CHECKPOINTING_CHOICES = (
    "False, True, 'smart' (alias 'unsloth'), 'auto', 'none', 'all' or 'every_<k>' (k >= 2: checkpoint layers "
    "0, k, 2k, ...; e.g. 'every_2'), or an engine.modules.checkpointing.CheckpointPolicy"
)
_EVERY = re.compile(r"every_(\d+)")
_MODES = ("none", "every_k", "all", "smart")


@dataclass(frozen=True)
class CheckpointPolicy:
    """Which decoder layers are recomputed in backward (gradient checkpointing), and which offload their input.

    Attributes:
        mode (str): ``"none"``: no layer; ``"every_k"``: layers ``i`` with ``i % every == 0`` (``0, k, 2k, ...``),
            so memory lies between none and all; ``"all"``: every layer; ``"smart"``: every layer, and on CUDA
            each layer's input waits in host memory (see the module docstring; on CPU the same as ``"all"``).
        every (int): ``k`` for ``"every_k"`` (at least 2); 1 otherwise.

    ``str(policy)`` is its name: ``"none"``, ``"every_2"``, ``"all"``, ``"smart"``. Every policy gives the same
    loss and gradients; they differ in memory and in the time spent recomputing.
    """

    mode: str = "none"
    every: int = 1
    _force_copy: bool = field(default=False, repr=False, compare=False)  # tests: offload copies even on CPU

    def __post_init__(self):
        if self.mode not in _MODES:
            raise ConfigurationError(f"CheckpointPolicy mode must be one of {', '.join(_MODES)}, got {self.mode!r}")
        if self.mode == "every_k":
            if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 2:
                raise ConfigurationError(
                    f"CheckpointPolicy('every_k', every=...) needs an integer every >= 2, got {self.every!r} "
                    "(every layer is mode 'all')"
                )
        elif self.every != 1:
            raise ConfigurationError(f"CheckpointPolicy every={self.every!r} applies to mode 'every_k' only")

    @property
    def name(self) -> str:
        return f"every_{self.every}" if self.mode == "every_k" else self.mode

    def __str__(self) -> str:
        return self.name

    @property
    def value(self):
        """What ``model.gradient_checkpointing`` holds for this policy: ``False``, ``True``, ``"smart"``, ``"every_<k>"``."""
        return {"none": False, "all": True, "smart": "smart"}.get(self.mode, self.name)

    def checkpointed(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` is recomputed in backward."""
        if self.mode == "every_k":
            return layer_idx % self.every == 0
        return self.mode != "none"

    def offloads(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx``'s input is kept in host memory between forward and backward (CUDA only)."""
        return self.mode == "smart"

    def checkpointed_layers(self, num_layers: int) -> tuple[int, ...]:
        """The indices of the checkpointed layers of a model with ``num_layers`` decoder layers."""
        return tuple(i for i in range(num_layers) if self.checkpointed(i))

    def run_layer(self, layer_idx: int, layer: nn.Module, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        """``layer(x, ctx)``, through :func:`checkpoint_layer` when this policy checkpoints ``layer_idx``."""
        if not self.checkpointed(layer_idx):
            return layer(x, ctx)
        return checkpoint_layer(layer, x, ctx, offload=self.offloads(layer_idx), _force_copy=self._force_copy)

    @classmethod
    def parse(cls, value) -> CheckpointPolicy | None:
        """The policy a ``use_gradient_checkpointing`` value names; ``None`` for ``"auto"`` (not chosen yet).

        Raises:
            ConfigurationError: a value that is none of :data:`CHECKPOINTING_CHOICES`.
        """
        if isinstance(value, CheckpointPolicy):
            return value
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return cls("all") if value else cls("none")
        if isinstance(value, str):
            text = value.strip().lower()
            if text == "auto":
                return None
            if text in ("none", "all", "smart"):
                return cls(text)
            if text == "unsloth":
                return cls("smart")
            match = _EVERY.fullmatch(text)
            if match and int(match.group(1)) >= 2:
                return cls("every_k", int(match.group(1)))
        raise ConfigurationError(f"use_gradient_checkpointing must be {CHECKPOINTING_CHOICES}; got {value!r}")


@dataclass
class CheckpointChoice:
    """The checkpointing policy a model trains with, and why (what the trainer's report shows).

    Attributes:
        policy (CheckpointPolicy): the policy in use.
        requested (str): what was asked for (``"auto"``, ``"True"``, ``"smart"``, ...).
        reason (str): why this policy, in one sentence.
        rows, seq_len (int or None): the step shape ``auto`` planned for (``None`` when nothing was planned).
        budget_bytes (int or None): the memory budget the planned peaks were compared with.
        budget_source (str): where the budget came from (``memory_budget_gb``, free CUDA memory, available RAM).
        plans (list of dict): per policy tried, in order: ``policy``, ``planned_peak_bytes``, ``fits``.
        planning_seconds (float): time spent planning (0 when the plans were cached or nothing was planned).
        when (str): when it was resolved (``"trainer start"``, ``"first training forward"``, ``"set by the user"``).
    """

    policy: CheckpointPolicy
    requested: str
    reason: str
    rows: int | None = None
    seq_len: int | None = None
    budget_bytes: int | None = None
    budget_source: str = ""
    plans: list = field(default_factory=list)
    planning_seconds: float = 0.0
    when: str = "set by the user"

    def as_dict(self) -> dict:
        """JSON-ready: the policy as its name."""
        return {
            "policy": self.policy.name,
            "requested": self.requested,
            "reason": self.reason,
            "rows": self.rows,
            "seq_len": self.seq_len,
            "budget_bytes": self.budget_bytes,
            "budget_source": self.budget_source,
            "plans": [dict(p) for p in self.plans],
            "planning_seconds": round(self.planning_seconds, 4),
            "when": self.when,
        }

    def summary(self) -> str:
        """One line: ``gradient checkpointing: every_4 (auto: ...)``."""
        return f"gradient checkpointing: {self.policy.name} ({self.reason})"


#: ``resolve(model, rows, seq_len, when) -> CheckpointChoice`` for ``"auto"``; registered by :mod:`engine.loader`
#: (the memory planner lives above this layer).
_AUTO_RESOLVER: Callable | None = None


def register_auto_resolver(resolve: Callable) -> None:
    """Install the function that resolves ``"auto"`` (called once, by :mod:`engine.loader`)."""
    global _AUTO_RESOLVER
    _AUTO_RESOLVER = resolve


def current_policy(model) -> CheckpointPolicy | None:
    """The policy ``model.gradient_checkpointing`` stands for; ``None`` while ``"auto"`` is not resolved yet."""
    policy = CheckpointPolicy.parse(model.gradient_checkpointing)
    if policy is None:
        choice = model.__dict__.get("_auto_checkpoint_choice")
        return choice.policy if choice is not None else None
    return policy


def training_policy(model, x: torch.Tensor) -> CheckpointPolicy | None:
    """The policy of this forward of ``model`` on hidden states ``x [b, s, d]``: ``None`` when no layer is
    checkpointed (evaluation, ``torch.no_grad``, or checkpointing off).

    ``"auto"`` that no trainer resolved is resolved here, at the first training forward, for this batch's
    shape ``b x s`` (the planner picks the fastest policy whose planned peak fits the memory budget); the choice
    is kept for later forwards and printed once.
    """
    if not (model.training and torch.is_grad_enabled()):
        return None
    policy = current_policy(model)
    if policy is None:
        if _AUTO_RESOLVER is None:
            raise ConfigurationError(
                "use_gradient_checkpointing='auto' needs the memory planner; import engine (engine.loader) first, "
                "or set a policy such as True"
            )
        choice = _AUTO_RESOLVER(model, rows=x.shape[0], seq_len=x.shape[1], when="first training forward")
        policy = choice.policy
    return None if policy.mode == "none" else policy


def checkpoint_layer(
    layer: nn.Module, x: torch.Tensor, ctx: Any, *, offload: bool, _force_copy: bool = False
) -> torch.Tensor:
    """Run ``layer(x, ctx)`` with activation checkpointing, optionally offloading ``x`` to host memory.

    Args:
        layer (nn.Module): a decoder layer, called as ``layer(x, ctx)``.
        x (Tensor): ``[b, s, d]`` the layer's input hidden states.
        ctx: per-forward data the layer needs (RoPE ``cos``/``sin``, masks); not differentiated.
        offload (bool): ``True`` for "smart" checkpointing: on CUDA, ``x`` is kept in pinned host
            memory between forward and backward (see the module docstring). No-op on other devices.
        _force_copy (bool): testing only: run the offload copy path even on CPU (plain copies, no streams).

    Returns:
        Tensor ``[b, s, d]``: the layer's output, with gradients flowing to ``x`` and the layer's
        trainable parameters.
    """
    if not (offload and (_force_copy or is_gpu(x.device))) or not torch.is_grad_enabled():
        return checkpoint(layer, x, ctx, use_reentrant=False)
    with torch.autograd.graph.saved_tensors_hooks(_pack_to_host, _unpack_to_device):
        return checkpoint(layer, x, ctx, use_reentrant=False)


class _HostCopy:
    """A saved tensor moved to host memory, and its (possibly prefetched) way back.

    Attributes:
        host (Tensor): the host copy (pinned on CUDA).
        device (torch.device): where the tensor lived and is restored to.
        d2h_done (torch.cuda.Event or None): recorded on the side stream after the device -> host copy.
        restored (Tensor or None): the device copy, once a restore was started and not yet handed out.
        h2d_done (torch.cuda.Event or None): recorded on the side stream after the host -> device copy.
        previous (weakref or None): the record packed just before this one (the previous layer's input).
    """

    __slots__ = ("__weakref__", "d2h_done", "device", "h2d_done", "host", "previous", "restored")

    def __init__(self, host, device, d2h_done, previous):
        self.host, self.device, self.d2h_done = host, device, d2h_done
        self.restored: torch.Tensor | None = None
        self.h2d_done: torch.cuda.Event | None = None
        self.previous: weakref.ref | None = previous


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _SIDE_STREAMS_LOCK:
        if index not in _SIDE_STREAMS:
            _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
        return _SIDE_STREAMS[index]


def _pack_to_host(x: torch.Tensor) -> _HostCopy:
    """Saved-tensor pack hook: copy ``x`` to host memory (asynchronously on CUDA) and forget the device tensor."""
    x = x.detach()
    last_ref = getattr(_LAST_PACKED, "record", None)
    last = last_ref() if last_ref is not None else None
    previous = last_ref if last is not None and last.device == x.device else None
    if x.device.type == "cuda":
        compute, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
        host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
        side.wait_stream(compute)  # x has been written
        with torch.cuda.stream(side):
            host.copy_(x, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        x.record_stream(side)  # its memory is not reused before the copy has read it
    else:  # forced copy path (tests) and memory planning: a plain synchronous copy into another buffer
        host = torch.empty(x.shape, dtype=x.dtype, device="cpu")
        host.copy_(x)
        done = None
    record = _HostCopy(host, x.device, done, previous)
    _LAST_PACKED.record = weakref.ref(record)
    return record


def _start_restore(record: _HostCopy) -> None:
    """Begin copying ``record.host`` back to its device (on the side stream on CUDA)."""
    if record.device.type == "cuda":
        side = _side_stream(record.device)
        with torch.cuda.stream(side):  # same stream as the device -> host copy, so ordered after it
            restored = torch.empty(record.host.shape, dtype=record.host.dtype, device=record.device)
            restored.copy_(record.host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        record.restored, record.h2d_done = restored, done
    else:
        record.restored = torch.empty(record.host.shape, dtype=record.host.dtype, device=record.device)
        record.restored.copy_(record.host)


def _unpack_to_device(record: _HostCopy) -> torch.Tensor:
    """Saved-tensor unpack hook: the device tensor back (waiting only for its copy), then prefetch the previous one."""
    if record.restored is None:
        _start_restore(record)
    restored, done = record.restored, record.h2d_done
    record.restored = record.h2d_done = None  # the host copy stays (a retained graph may unpack again)
    if done is not None:
        compute = torch.cuda.current_stream(record.device)
        compute.wait_event(done)
        restored.record_stream(compute)
    previous = record.previous() if record.previous is not None else None
    if previous is not None and previous.restored is None:
        _start_restore(previous)
    return restored
