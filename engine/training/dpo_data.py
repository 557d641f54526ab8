"""Deprecated location of :func:`to_conversational_preference`, kept because the docs published this import.

The preference data code moved to :mod:`engine.training.preference_data` (shared by DPO, KTO and ORPO);
import from there.
"""

from engine.training.preference_data import to_conversational_preference

__all__ = ["to_conversational_preference"]
