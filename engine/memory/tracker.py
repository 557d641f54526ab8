"""Live-storage accounting of a computation that runs on fake tensors.

:class:`MemoryTracker` is a ``TorchDispatchMode`` stacked on top of a ``FakeTensorMode``. Every
op of the computation (model build, forward, backward, optimizer step) passes through it; it
registers each new output storage with its size and a weak reference whose callback fires when
the storage is freed. Since fake tensors are freed exactly when real ones would be (same Python
references, same autograd graph, same saved tensors), the bytes alive at every moment are the
bytes a real run allocates, minus what the real allocator adds (rounding, caching,
fragmentation), which the planner accounts for separately.

Two devices are told apart: the *device* (``meta`` standing for a GPU, or ``cpu`` when planning a
CPU run) and the *host* (``cpu`` storages while planning for a GPU: offloaded activations).

Values that do not depend on weights are computed. Token ids, labels, positions and the masks
computed from them decide control flow (``if labels.any()``, ``nonzero()`` of the rows that have a
target), and so do counters such as the optimizer's step. A fake tensor has no values, so the
tracker keeps, for every tensor computed only from tensors made by factory functions (``zeros``,
``arange``, ``tensor``) or from real tensors, a real CPU *shadow* computed by the same op. When the
code asks for a value (``.item()``, ``bool()``) or an op's output shape depends on values
(``nonzero``), the shadow answers. Anything computed from a weight (activations, gradients) has no
shadow: asking for one of its values raises :class:`PlanningError`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
)
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

from engine.errors import EngineError

#: Integer/bool shadows larger than this many elements are not kept (token ids and masks stay far below).
MAX_SHADOW_NUMEL = 1 << 27
#: Floating-point shadows are kept for small tensors only (counters such as the optimizer's step).
MAX_FLOAT_SHADOW_NUMEL = 1024


class PlanningError(EngineError):
    """The memory planner could not run the model on fake tensors (e.g. code that needs an activation's value)."""


@dataclass
class StorageRecord:
    """One storage's life.

    Attributes:
        nbytes: its size.
        on_host: True for host (CPU) memory while the device is a GPU.
        born, died: clock values of its allocation and release (``died`` is None while alive).
        phase: the phase it was allocated in (``"setup"``, ``"forward"``, ...).
    """

    nbytes: int
    on_host: bool
    born: int
    died: int | None
    phase: str


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, FakeTensor)


class MemoryTracker(TorchDispatchMode):
    """Records every storage allocated and freed while active; see the module docstring.

    Args:
        device_type: the device whose memory is planned: ``"meta"`` (a simulated GPU; then ``cpu``
            storages are host memory) or ``"cpu"``.

    Use inside a ``FakeTensorMode``::

        with FakeTensorMode(allow_non_fake_inputs=True), MemoryTracker("meta") as tracker:
            tracker.phase("forward")
            ...
    """

    def __init__(self, device_type: str = "meta"):
        super().__init__()
        self.device_type = device_type
        self.records: dict[int, StorageRecord] = {}  # serial number -> record (dead ones pruned by prune())
        self.marks: list[tuple[str, int]] = []  # (phase, clock) in order
        self._clock = 0
        self._phase = "setup"
        self._serial = 0
        self._alive: dict[int, tuple[weakref.ref, int]] = {}  # id(storage) -> (ref, record serial)
        self._shadows = WeakIdKeyDictionary()

    # ------------------------------------------------------------------ bookkeeping
    def phase(self, name: str) -> None:
        """Start a new phase: allocations from now on are attributed to ``name``."""
        self._phase = name
        self._clock += 1
        self.marks.append((name, self._clock))

    @property
    def clock(self) -> int:
        return self._clock

    def record_of(self, t: torch.Tensor) -> StorageRecord | None:
        """The record of ``t``'s storage, if it was allocated under this tracker and is alive."""
        storage = t.untyped_storage()
        entry = self._alive.get(id(storage))
        if entry is None or entry[0]() is not storage:
            return None
        return self.records.get(entry[1])

    def _register(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        entry = self._alive.get(key)
        if entry is not None and entry[0]() is storage:
            return
        on_host = t.device.type != self.device_type
        self._clock += 1
        self._serial += 1
        index = self._serial
        record = StorageRecord(storage.nbytes(), on_host, self._clock, None, self._phase)
        self.records[index] = record

        def _freed(_ref, key=key, index=index, record=record):
            self._clock += 1
            record.died = self._clock
            if self._alive.get(key, (None, -1))[1] == index:
                del self._alive[key]

        self._alive[key] = (weakref.ref(storage, _freed), index)

    # ------------------------------------------------------------------ integer shadows
    def _shadow_of(self, t: torch.Tensor) -> torch.Tensor | None:
        if not _is_fake(t):
            return t if t.device.type == "cpu" else None
        return self._shadows.get(t)

    def _shadow_args(self, args, kwargs):
        """``(args, kwargs)`` with tensors replaced by their shadows and devices by ``cpu``, or None."""
        flat, spec = tree_flatten((args, kwargs))
        out = []
        for a in flat:
            if isinstance(a, torch.Tensor):
                a = self._shadow_of(a)
                if a is None:
                    return None
            elif isinstance(a, torch.device):
                a = torch.device("cpu")
            out.append(a)
        return tree_unflatten(out, spec)

    def _run_shadow(self, func, args, kwargs):
        shadow = self._shadow_args(args, kwargs)
        if shadow is None:
            return None
        with _disable_current_modes():
            return func(*shadow[0], **shadow[1])

    def _forget_mutated(self, func, args, kwargs) -> None:
        """Drop the shadows of every tensor sharing a storage with an argument ``func`` mutates."""
        mutated = set()
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                if isinstance(value, torch.Tensor):
                    mutated.add(id(value.untyped_storage()))
        if mutated:
            for t in list(self._shadows.keys()):
                if id(t.untyped_storage()) in mutated:
                    del self._shadows[t]

    def _attach_shadows(self, out, shadow) -> None:
        outs, _ = tree_flatten(out)
        shadows, _ = tree_flatten(shadow)
        for o, s in zip(outs, shadows):
            if isinstance(o, torch.Tensor) and isinstance(s, torch.Tensor) and _is_fake(o):
                self._shadows[o] = s

    def _from_shadow(self, func, args, kwargs):
        """Run an op whose result depends on values: compute it on the shadows, build fake outputs of its shape."""
        result = self._run_shadow(func, args, kwargs)
        if result is None:
            raise PlanningError(
                f"{func} needs the values of a floating-point (or unknown) tensor, which the memory planner does not "
                "compute. This code path cannot be planned on fake tensors; please report it."
            )
        device = next(
            (a.device for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor) and _is_fake(a)),
            torch.device(self.device_type),
        )

        def fake_like(r):
            if not isinstance(r, torch.Tensor):
                return r
            fake = torch.empty(r.shape, dtype=r.dtype, device=device)
            self._shadows[fake] = r
            return fake

        return tree_map(fake_like, result)

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            shadow = self._shadow_of(args[0])
            if shadow is None:
                raise PlanningError(
                    "the model asked for the value of a floating-point tensor (.item() / bool() on an activation); "
                    "the memory planner runs on fake tensors and cannot know it"
                )
            with _disable_current_modes():  # the fake mode below would turn the real shadow into a fake tensor
                return shadow.item()
        try:
            out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            out = self._from_shadow(func, args, kwargs)
        else:
            self._update_shadows(func, args, kwargs, out)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _is_fake(t):
                self._register(t)
        return out

    def _update_shadows(self, func, args, kwargs, out) -> None:
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        wanted = outs and all(
            o.numel() <= (MAX_SHADOW_NUMEL if not (o.is_floating_point() or o.is_complex()) else MAX_FLOAT_SHADOW_NUMEL)
            for o in outs
        )
        mutable = func._schema.is_mutable
        if not wanted:
            if mutable:
                self._forget_mutated(func, args, kwargs)
            return
        shadow = self._run_shadow(func, args, kwargs)
        if shadow is None:
            if mutable:
                self._forget_mutated(func, args, kwargs)
            return
        self._attach_shadows(out, shadow)

    # ------------------------------------------------------------------ reading the log
    def prune(self) -> None:
        """Forget the records of freed storages (call between measured windows to keep the log small)."""
        self.records = {k: r for k, r in self.records.items() if r.died is None}

    def live_bytes(self, on_host: bool = False) -> int:
        """Bytes alive now on the device (or the host)."""
        return sum(r.nbytes for r in self.records.values() if r.died is None and r.on_host == on_host)

    def peak(self, start: int, end: int | None = None, on_host: bool = False) -> tuple[int, int]:
        """``(bytes, clock)`` of the highest live total between clocks ``start`` and ``end`` (inclusive)."""
        end = self._clock if end is None else end
        events: list[tuple[int, int]] = []
        live = 0
        for r in self.records.values():
            if r.on_host != on_host:
                continue
            if r.born <= start and (r.died is None or r.died > start):
                live += r.nbytes
            if start < r.born <= end:
                events.append((r.born, r.nbytes))
            if r.died is not None and start < r.died <= end:
                events.append((r.died, -r.nbytes))
        events.sort()
        best, best_clock = live, start
        for clock, delta in events:
            live += delta
            if live > best:
                best, best_clock = live, clock
        return best, best_clock
