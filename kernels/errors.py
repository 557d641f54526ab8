"""The base of the project's errors, defined at its lowest layer.

``kernels`` imports nothing from ``engine`` (no import cycles); :mod:`engine.errors`
re-exports these classes and adds the engine's own, so users catch one family.
"""


class EngineError(Exception):
    """Base class of all errors the engine and its kernels raise on purpose."""


class ConfigurationError(EngineError, ValueError):
    """An argument is invalid (unknown module name, bad rank, unavailable kernel backend, ...)."""
