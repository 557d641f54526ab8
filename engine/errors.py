"""Errors raised by the engine.

Every error says what went wrong *and* what to do about it. They all derive
from :class:`EngineError` so callers can catch the engine's own failures
without catching unrelated bugs.
"""


from engine_kernels.errors import ConfigurationError, EngineError

__all__ = [
    "CheckpointError",
    "ConfigurationError",
    "DatasetError",
    "EngineError",
    "SequenceTooLongError",
    "UnsupportedArchitectureError",
]


class UnsupportedArchitectureError(EngineError, ValueError):
    """The checkpoint's architecture has no model implementation in the engine."""


class CheckpointError(EngineError, OSError):
    """A weight or config file is missing, unreadable, corrupt or inconsistent."""


class SequenceTooLongError(EngineError, ValueError):
    """An input is longer than the ``max_seq_length`` the model was loaded with."""


class DatasetError(EngineError, ValueError):
    """A training dataset is empty, lacks the columns its format needs, or cannot be tokenized as asked."""
