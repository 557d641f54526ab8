"""Errors raised by the engine.

Every error says what went wrong *and* what to do about it. They all derive
from :class:`EngineError` so callers can catch the engine's own failures
without catching unrelated bugs.
"""


class EngineError(Exception):
    """Base class of all errors the engine raises on purpose."""


class UnsupportedArchitectureError(EngineError, ValueError):
    """The checkpoint's architecture has no model implementation in the engine."""


class CheckpointError(EngineError, OSError):
    """A weight or config file is missing, unreadable, corrupt or inconsistent."""


class ConfigurationError(EngineError, ValueError):
    """An argument given to the engine is invalid (unknown module name, bad rank, ...)."""


class SequenceTooLongError(EngineError, ValueError):
    """An input is longer than the ``max_seq_length`` the model was loaded with."""
