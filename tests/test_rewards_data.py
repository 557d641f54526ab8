"""The GRPO addition task (engine/data/rewards.py): prompt split and TRL-convention reward functions."""

from __future__ import annotations

import re

import pytest

from engine.data.rewards import (
    addition_prompts,
    addition_reward,
    concise_reward,
    correct_reward,
    last_integer,
    parse_answer,
)


def test_prompts_are_deterministic_distinct_and_split():
    train, held_out = addition_prompts(n_train=60, n_eval=16, seed=3)
    assert (train, held_out) == addition_prompts(n_train=60, n_eval=16, seed=3)
    assert addition_prompts(n_train=60, n_eval=16, seed=4)[1] != held_out
    texts = [r["prompt"][0]["content"] for r in train + held_out]
    assert len(set(texts)) == len(texts) == 76
    def pairs(rows):
        return {tuple(int(n) for n in re.findall(r"\d+", r["prompt"][0]["content"])) for r in rows}

    assert len(pairs(train)) == 60 and not pairs(train) & pairs(held_out)  # no held-out pair is trained on
    for r in train + held_out:
        assert r["prompt"][0]["role"] == "user" and parse_answer(r["prompt"]) == r["answer"]
    with pytest.raises(ValueError, match="at most 81"):
        addition_prompts(n_train=80, n_eval=2)


def test_correct_reward_reads_the_last_integer_leniently():
    prompts = ["What is 7 + 5? Answer with only the number."] * 5
    completions = ["12", "7 + 5 = 12", "The answer is 12.", "The answer is 13, not 12", "twelve"]
    assert correct_reward(prompts, completions) == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert correct_reward(prompts, ["12 or 13"]) == [0.0]
    assert last_integer("1,000 apples") == 1000 and last_integer("none") is None


def test_rewards_take_conversational_completions_and_the_answer_column():
    prompts = [[{"role": "user", "content": "Add 3 and 9. Give only the number."}]] * 2
    completions = [[{"role": "assistant", "content": "12"}], [{"role": "assistant", "content": "I think it is 11"}]]
    assert correct_reward(prompts, completions) == [1.0, 0.0]
    assert correct_reward(prompts, completions, answer=[11, 11]) == [0.0, 1.0]
    assert concise_reward(prompts, completions) == [1.0, 1.0]
    assert addition_reward(prompts, completions) == pytest.approx([1.0, 0.2])


def test_concise_reward_needs_a_short_answer_with_a_number():
    prompts = ["What is 1 + 1?"] * 3
    completions = ["2", "Well, let me think about this for a while: 2", "two"]
    assert concise_reward(prompts, completions) == [1.0, 0.0, 0.0]
    assert addition_reward(prompts, completions) == pytest.approx([1.0, 0.8, 0.0])


def test_unparseable_prompt_without_answer_column_says_what_to_do():
    with pytest.raises(ValueError, match="answer column"):
        correct_reward(["Tell me a joke."], ["ok"])
    with pytest.raises(TypeError, match="string or a list of messages"):
        correct_reward(["What is 1 + 1?"], [42])
