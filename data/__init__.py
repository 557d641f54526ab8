"""Synthetic SFT / DPO datasets with exactly checkable answers (see data/README.md)."""
