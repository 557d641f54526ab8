"""Memory planning: how much GPU memory a training step needs, and the longest context that fits.

See :func:`estimate_memory`, :func:`max_context` and docs/memory.md.
"""

from engine.memory.configs import known_model_names, resolve_config
from engine.memory.planner import (
    ExtrapolatedSession,
    MemoryEstimate,
    PlanSession,
    estimate_memory,
    max_context,
    plan_session,
)
from engine.memory.tracker import MemoryTracker, PlanningError

__all__ = [
    "ExtrapolatedSession",
    "MemoryEstimate",
    "MemoryTracker",
    "PlanSession",
    "PlanningError",
    "estimate_memory",
    "known_model_names",
    "max_context",
    "plan_session",
    "resolve_config",
]
