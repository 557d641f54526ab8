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
(:func:`kernels.dispatch.simulate_gpu`): the offload then takes the synchronous copy path below (no
streams exist), which allocates and frees the same host and device buffers in the same order.

On CPU the offload is a no-op: the tensor already lives in host memory, so copying it would save
nothing; ``offload=True`` is then plain checkpointing. (Tests force the copy path on CPU through the
private ``_force_copy`` argument, which runs the same pack/restore logic without streams.)
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels.dispatch import is_gpu

#: One side stream per CUDA device index, for host <-> device copies of offloaded layer inputs.
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}
_SIDE_STREAMS_LOCK = threading.Lock()
#: The record packed last in this thread: its successor links to it so that backward can prefetch it.
_LAST_PACKED = threading.local()


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
