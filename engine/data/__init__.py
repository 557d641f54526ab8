"""Synthetic SFT / DPO datasets with exactly checkable answers (see engine/data/README.md)."""
