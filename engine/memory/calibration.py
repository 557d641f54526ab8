"""Measuring the real peak of a training step on CPU, to check the planner against (the calibration tests).

PyTorch's CPU allocator reports every allocation and release to the profiler when it records memory
(``profile_memory=True``): an allocation event with the byte delta (negative for a release) and its time. The live total during a step is
what was alive when it started plus the running sum of those deltas; its maximum is the measured
peak. What was alive at the start is counted from the tensors a training loop keeps between steps:
parameters, buffers, optimizer states and the model's dequantization workspace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def persistent_tensors(model, optimizer) -> list[torch.Tensor]:
    """What a training loop keeps alive between steps: parameters, buffers, optimizer states, workspaces."""
    tensors = list(model.parameters()) + list(model.buffers())
    for state in optimizer.state.values():
        tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    workspace = getattr(model, "_workspace", None)
    if workspace is not None:
        tensors.extend(workspace._buffers.values())
    return tensors


def measure_cpu_peak(run: Callable[[], None], alive_before: int) -> int:
    """Peak bytes allocated on CPU while ``run()`` executes, given ``alive_before`` bytes alive when it starts."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and str(event.extra_fields.device) == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    events.sort()
    live = peak = alive_before
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak
