"""Stop (or skip) an optimizer step whose gradients are not finite.

A NaN or infinite loss (fp16 overflow, a learning rate that is too high, a broken example) makes the gradients
non-finite, and one optimizer step with them turns every trained weight into NaN — silently, since the logged loss
is averaged and often printed long after. :class:`NonFiniteGuard` checks the trainable gradients right before each
optimizer step (after accumulation and clipping):

* ``nonfinite="error"`` (default): :class:`NonFiniteError` naming the optimizer step and the first tensor with a
  non-finite gradient; the weights are left as they were before that step.
* ``nonfinite="skip"``: the step is skipped (the gradients are dropped, so the optimizer leaves the weights and
  its state alone; the learning-rate schedule still advances) and counted in the training report
  (``skipped_steps``) with a warning.
"""

from __future__ import annotations

import warnings

import torch
from transformers import TrainerCallback

from engine.errors import EngineError

NONFINITE_POLICIES = ("error", "skip")


class NonFiniteError(EngineError, FloatingPointError):
    """Training produced a NaN or infinite loss or gradient."""


class NonFiniteGuard(TrainerCallback):
    """The check described in the module docstring; installed by every engine trainer.

    Args:
        policy (str): ``"error"`` or ``"skip"``.
        on_skip (callable, optional): called with the step number of each skipped step (the report counts them).
    """

    def __init__(self, policy: str = "error", on_skip=None):
        self.policy = policy
        self.on_skip = on_skip

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        bad = []
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
        flags = torch.stack([torch.isfinite(p.grad).all() for _, p in named]) if named else None
        if flags is None or bool(flags.all()):
            return
        bad = [n for (n, _), ok in zip(named, flags.tolist()) if not ok]
        step = state.global_step + 1
        if self.policy == "error":
            raise NonFiniteError(
                f"optimizer step {step}: the gradients of {len(bad)} of {len(named)} trainable tensors are NaN or "
                f"infinite (first: {bad[0]}), so the loss of that step was not finite. The weights are as after "
                f"step {step - 1}. Lower the learning rate, use bf16 instead of fp16, check the examples of that "
                "step, or set nonfinite='skip' in the config to skip such steps."
            )
        for _, p in named:
            p.grad = None  # optimizers skip parameters without a gradient: weights and state untouched
        warnings.warn(f"optimizer step {step} skipped: non-finite gradients (first: {bad[0]})", stacklevel=2)
        if self.on_skip is not None:
            self.on_skip(step)
