"""A GRPO task the base SmolLM2-135M-Instruct partly solves: single-digit addition, with lenient rewards.

The shipped tasks (:mod:`data.tasks`) ask for exact answers the base model never gives (0% exact match), so GRPO
would see no reward variance and learn nothing. Here:

* **prompts**: "What is 7 + 5?" in a few phrasings (:data:`TEMPLATES`), both operands 1..9 (81 pairs), as chat
  messages (``[{"role": "user", "content": ...}]``, TRL's conversational format) with the answer in an ``answer``
  column. :func:`addition_prompts` splits the 81 pairs by seed, so no held-out pair is ever trained on;
* **rewards**, TRL's calling convention ``reward(prompts, completions, **kwargs) -> list[float]`` (completions as
  strings or ``[{"role": "assistant", "content": ...}]`` lists; the answer from the ``answer`` column, else read
  back from the prompt):

  - :func:`correct_reward`: 1.0 when the **last** integer of the completion is the sum ("1 + 9 = 10", "The answer
    is 10." and "10" all count; a completion cut off at the token limit is judged on what it has), else 0.0;
  - :func:`concise_reward`: 1.0 for an answer of at most :data:`CONCISE_WORDS` words that holds a number (the
    format asked for), else 0.0;
  - :func:`addition_reward`: ``0.8 * correct + 0.2 * concise``, the one reward to train with.

Measured on this 2-core CPU machine (base model, held-out prompts of ``addition_prompts(seed=0)``, chat template,
sampling at temperature 1.0, at most 16 new tokens, 8 completions per prompt) with
``python benchmarks/grpo_task.py --dtype float32 --threads 1``: mean reward 0.223, success rate 0.211, best-of-8
0.812 (128 completions). The base model mostly rambles ("The answer is 15, but ..."), so the format reward is
rarely earned (27%) and correctness is what varies within a group. Operand order matters to the split: "3 + 7" may
be held out while "7 + 3" is trained on.
"""

from __future__ import annotations

import random
import re
from typing import Any

__all__ = [
    "TEMPLATES",
    "CONCISE_WORDS",
    "addition_prompts",
    "completion_text",
    "parse_answer",
    "last_integer",
    "correct_reward",
    "concise_reward",
    "addition_reward",
]

#: Phrasings of one question; ``{a}`` and ``{b}`` are the operands (1..9).
TEMPLATES = (
    "What is {a} + {b}? Answer with only the number.",
    "Calculate {a} + {b}. Reply with just the result.",
    "Add {a} and {b}. Give only the number.",
)

#: Most words a completion may have to count as concise (a bare number, or "a + b = c").
CONCISE_WORDS = 6

_OPERANDS = re.compile(r"(\d+) \+ (\d+)|Add (\d+) and (\d+)")
_INTEGER = re.compile(r"-?\d+(?:,\d{3})*")


def addition_prompts(n_train: int = 64, n_eval: int = 16, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic train and held-out rows ``{"prompt": [{"role": "user", "content": str}], "answer": int}``.

    The 81 operand pairs are shuffled with ``seed``; the first ``n_eval`` pairs are held out, the rest are
    training pairs. Each pair gets one of :data:`TEMPLATES` (rotating), so every prompt is distinct.

    Raises:
        ValueError: when more rows are asked for than there are distinct pairs.
    """
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)]
    if n_train + n_eval > len(pairs) or n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train + n_eval must be at most {len(pairs)} (distinct operand pairs), got "
                         f"{n_train} + {n_eval}")
    random.Random(seed).shuffle(pairs)

    def row(i: int, pair: tuple[int, int]) -> dict:
        a, b = pair
        text = TEMPLATES[i % len(TEMPLATES)].format(a=a, b=b)
        return {"prompt": [{"role": "user", "content": text}], "answer": a + b}

    held_out = [row(i, p) for i, p in enumerate(pairs[:n_eval])]
    train = [row(i, p) for i, p in enumerate(pairs[n_eval : n_eval + n_train])]
    return train, held_out


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the last message's content of a conversational completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion is a string or a list of messages, got {type(completion).__name__}")


def parse_answer(prompt: Any) -> int:
    """The sum a prompt asks for, read from its text (a string or a list of messages).

    Raises:
        ValueError: when the prompt holds no "a + b" / "Add a and b" question.
    """
    text = prompt if isinstance(prompt, str) else " ".join(str(m.get("content", "")) for m in prompt)
    match = _OPERANDS.search(text)
    if match is None:
        raise ValueError(f"no 'a + b' question in the prompt {text[:80]!r}; pass the answer column instead")
    a, b = (int(g) for g in match.groups() if g is not None)
    return a + b


def last_integer(text: str) -> int | None:
    """The last integer written in ``text`` (thousands separators allowed), or ``None``."""
    found = _INTEGER.findall(text)
    return int(found[-1].replace(",", "")) if found else None


def _answers(prompts, answer) -> list[int]:
    if answer is not None:
        return [int(a) for a in answer]
    return [parse_answer(p) for p in prompts]


def correct_reward(prompts, completions, answer=None, **kwargs) -> list[float]:
    """1.0 where the completion's last integer equals the answer, else 0.0."""
    return [
        float(last_integer(completion_text(c)) == target) for c, target in zip(completions, _answers(prompts, answer))
    ]


def concise_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 where the completion has at most :data:`CONCISE_WORDS` words and holds a number, else 0.0."""
    out = []
    for c in completions:
        text = completion_text(c)
        out.append(float(len(text.split()) <= CONCISE_WORDS and last_integer(text) is not None))
    return out


def addition_reward(prompts, completions, answer=None, **kwargs) -> list[float]:
    """``0.8 * correct_reward + 0.2 * concise_reward``: in [0, 1], 1.0 for a short correct answer."""
    correct = correct_reward(prompts, completions, answer=answer)
    concise = concise_reward(prompts, completions)
    return [0.8 * c + 0.2 * f for c, f in zip(correct, concise)]
