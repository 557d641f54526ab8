"""Reward functions for GRPO: naming, calling and validating them (TRL 1.16's calling convention).

A reward function is a plain Python callable::

    def reward(prompts, completions, completion_ids, **kwargs) -> list[float | None]

called once per generation batch of ``N`` completions with keyword arguments:

* ``prompts``: the ``N`` prompts (each repeated ``num_generations`` times), strings or lists of messages;
* ``completions``: the ``N`` decoded completions: strings, or ``[{"role": "assistant", "content": text}]`` when the
  prompts are conversations;
* ``completion_ids``: the ``N`` completions' token ids (``list[list[int]]``);
* every other dataset column (e.g. ``answer``) as a list of ``N`` values, one per completion;
* ``trainer_state``: the ``transformers.TrainerState`` (``global_step``, ... for reward schedules);
* ``log_extra(column, values)`` and ``log_metric(name, value)``: TRL's logging hooks (``log_metric`` values are
  averaged into the logs; ``log_extra`` columns are accepted and dropped: we keep no completions table).

It returns ``N`` numbers; ``None`` means "not applicable to this completion" (it becomes NaN; the weighted sum
over functions skips NaNs, as TRL's ``nansum``). Several functions are combined with ``reward_weights``.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from engine.errors import ConfigurationError, EngineError

__all__ = ["RewardFunctionError", "compute_rewards", "reward_function_names", "validate_reward_functions"]


class RewardFunctionError(EngineError, ValueError):
    """A reward function raised, or returned something other than one number (or ``None``) per completion."""


def _name(func: Callable) -> str:
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def validate_reward_functions(reward_funcs, reward_weights: Sequence[float] | None) -> tuple[list[Callable], torch.Tensor]:
    """The reward functions as a list and their weights as float32 ``[F]``.

    Raises:
        ConfigurationError: no function, a non-callable (e.g. a model id string: reward models are not supported),
            or a number of weights that differs from the number of functions.
    """
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs or funcs == [None]:
        raise ConfigurationError("GRPOTrainer needs at least one reward function (reward_funcs=...)")
    for i, f in enumerate(funcs):
        if not callable(f) or isinstance(f, torch.nn.Module):
            raise ConfigurationError(
                f"reward_funcs[{i}] is {type(f).__name__}, not a Python function. engine.GRPOTrainer calls plain "
                "callables (prompts=, completions=, completion_ids=, **columns) -> list of floats; reward models "
                "(a model id or nn.Module) are not supported: wrap the model in such a function."
            )
    if reward_weights is None:
        return funcs, torch.ones(len(funcs), dtype=torch.float32)
    if len(reward_weights) != len(funcs):
        raise ConfigurationError(
            f"reward_weights has {len(reward_weights)} entries but there are {len(funcs)} reward functions; give one "
            "weight per function"
        )
    return funcs, torch.tensor([float(w) for w in reward_weights], dtype=torch.float32)


def reward_function_names(funcs: Sequence[Callable]) -> list[str]:
    """TRL's names: the function's ``__name__`` (through ``functools.partial``), else its class name."""
    return [_name(f) for f in funcs]


def _as_float(value: Any, name: str, row: int) -> float:
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardFunctionError(
            f"reward function {name!r} returned {value!r} ({type(value).__name__}) for completion {row}; return a "
            "number (or None for 'not applicable') per completion"
        )
    return float(value)


def compute_rewards(
    funcs: Sequence[Callable],
    names: Sequence[str],
    *,
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    rows: Sequence[Mapping[str, Any]],
    extra_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Call every reward function once on the batch; float32 ``[N, F]`` rewards, NaN where a function gave ``None``.

    Args:
        funcs / names: the functions and their names (for messages and metrics).
        prompts, completions, completion_ids: ``N`` each (see the module docstring).
        rows: the ``N`` dataset rows; every column but ``prompt`` / ``completion`` / ``completion_ids`` is passed
            as a keyword list.
        extra_kwargs: passed as is (``trainer_state``, ``log_extra``, ``log_metric``).

    Raises:
        RewardFunctionError: a function raised (the message names it and the first row's prompt), returned
            something that is not a list of ``N`` entries, or an entry that is not a number or ``None``.
    """
    n = len(prompts)
    keys = [k for k in rows[0] if k not in ("prompt", "completion", "completion_ids")] if rows else []
    kwargs = {k: [r[k] for r in rows] for k in keys}
    kwargs.update(extra_kwargs or {})
    out = torch.zeros(n, len(funcs), dtype=torch.float32)
    for j, (func, name) in enumerate(zip(funcs, names)):
        try:
            values = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        except Exception as exc:  # a user function: name it and the batch, keep the original as the cause
            raise RewardFunctionError(
                f"reward function {name!r} raised {type(exc).__name__}: {exc} (batch of {n} completions; first "
                f"prompt: {str(prompts[0])[:120]!r}). Fix the function; it gets prompts=, completions=, "
                f"completion_ids= and the columns {sorted(kwargs)} as keyword lists."
            ) from exc
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        if not isinstance(values, (list, tuple)):
            raise RewardFunctionError(
                f"reward function {name!r} returned {type(values).__name__}; return a list of {n} numbers (one per "
                "completion, None for 'not applicable')"
            )
        if len(values) != n:
            raise RewardFunctionError(
                f"reward function {name!r} returned {len(values)} rewards for {n} completions; return exactly one "
                "per completion (prompts, completions and the columns are lists of that length)"
            )
        out[:, j] = torch.tensor([_as_float(v, name, i) for i, v in enumerate(values)], dtype=torch.float32)
    return out
