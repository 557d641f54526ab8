"""engine.GRPOTrainer: a short real run (engine generate rollouts, report) and bad input naming the fix."""

from __future__ import annotations

import json

import pytest

from engine import ConfigurationError, DatasetError, FastModel, GRPOConfig, GRPOTrainer
from engine.errors import EngineError
from engine.training.rewards import RewardFunctionError


def _model(folder, max_seq_length: int = 128):
    model, tok = FastModel.from_pretrained(str(folder), dtype="float32", max_seq_length=max_seq_length, verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, random_state=0)
    return model, tok


def _args(tmp_path, **overrides) -> GRPOConfig:
    base = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                max_completion_length=6, logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True,
                seed=0, learning_rate=1e-3)
    return GRPOConfig(**{**base, **overrides})


def _rows(n: int = 6):
    return [{"prompt": [{"role": "user", "content": f"Write the number {i}"}], "answer": str(i)} for i in range(n)]


def length_reward(completions, completion_ids, answer, trainer_state, **kwargs):
    assert completions[0][0]["role"] == "assistant" and len(answer) == len(completions)
    assert trainer_state is not None
    return [len(c) / 6 for c in completion_ids]


def test_grpo_trains_with_engine_generate_and_reports(tiny_chat_folder, tmp_path):
    model, tok = _model(tiny_chat_folder)
    trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=_args(tmp_path, beta=0.1), train_dataset=_rows(),
                          tokenizer=tok)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2
    for key in ("reward", "reward_std", "rewards/length_reward/mean", "kl", "entropy", "clip_ratio/region_mean",
                "completions/mean_length", "completions/clipped_ratio"):
        assert key in logs[0], key
    assert 0 < logs[0]["completions/mean_length"] <= 6 and logs[0]["entropy"] > 0
    report = json.loads((tmp_path / "out" / "training_report.json").read_text())
    gen = report["generation"]
    assert gen["completion_tokens"] > 0 and gen["seconds"] > 0 and gen["tokens_per_second"] > 0
    assert 0 < gen["training_seconds"] < report["total_seconds"]
    assert report["trained_tokens"] > gen["completion_tokens"]  # prompts + completions


def test_plain_text_prompts_and_none_rewards(tiny_chat_folder, tmp_path):
    model, tok = _model(tiny_chat_folder)

    def sometimes(completions, **kwargs):
        assert isinstance(completions[0], str)
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    rows = [{"prompt": f"Once upon a time {i}"} for i in range(4)]
    trainer = GRPOTrainer(model=model, reward_funcs=[sometimes, lambda completion_ids, **kw: [1.0] * len(completion_ids)],
                          args=_args(tmp_path, max_steps=1, reward_weights=[2.0, 1.0]), train_dataset=rows,
                          tokenizer=tok)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["rewards/sometimes/mean"] == 1.0  # the None rows are skipped (NaN)
    assert log["reward"] == pytest.approx(2.0)  # 2 x 1 + 1 on even rows; 0 + 1 on odd rows ... mean (3 + 1) / 2


def _train_with(folder, tmp_path, reward, **cfg):
    model, tok = _model(folder)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=_args(tmp_path, max_steps=1, **cfg),
                          train_dataset=_rows(), tokenizer=tok)
    trainer.train()


def raising_reward(completions, **kwargs):
    raise KeyError("score")


def test_bad_reward_functions(tiny_chat_folder, tmp_path):
    with pytest.raises(RewardFunctionError, match=r"'raising_reward' raised KeyError.*first prompt") as info:
        _train_with(tiny_chat_folder, tmp_path, raising_reward)
    assert isinstance(info.value, EngineError) and isinstance(info.value.__cause__, KeyError)
    with pytest.raises(RewardFunctionError, match=r"returned 1 rewards for 4 completions"):
        _train_with(tiny_chat_folder, tmp_path, lambda completions, **kw: [1.0])
    with pytest.raises(RewardFunctionError, match=r"returned 'good'.*completion 0; return a number"):
        _train_with(tiny_chat_folder, tmp_path, lambda completions, **kw: ["good"] * len(completions))
    with pytest.raises(ConfigurationError, match="reward models"):
        _train_with(tiny_chat_folder, tmp_path, "some/reward-model")
    with pytest.raises(ConfigurationError, match="one weight per function"):
        _train_with(tiny_chat_folder, tmp_path, [length_reward], reward_weights=[1.0, 2.0])


def test_bad_config(tiny_chat_folder, tmp_path):
    with pytest.raises(ConfigurationError, match=r"num_generations \(3\) must divide the generation batch \(4"):
        _args(tmp_path, num_generations=3)
    with pytest.raises(ConfigurationError, match=r"'cispo'.*not supported.*\('grpo', 'dr_grpo', 'dapo', 'bnpo'\)"):
        _args(tmp_path, loss_type="cispo")
    with pytest.raises(ConfigurationError, match="loss_type must be one of"):
        _args(tmp_path, loss_type="ppo")
    assert _args(tmp_path, scale_rewards=False).scale_rewards == "none"  # TRL's bool aliases
    assert _args(tmp_path, scale_rewards=True).scale_rewards == "group"
    # completion budget: the longest prompt + max_completion_length must fit max_seq_length
    with pytest.raises(ConfigurationError, match=r"prompt of \d+ tokens \+ max_completion_length=60.*max_seq_length=64"):
        _train_with_model(tiny_chat_folder, tmp_path, max_seq_length=64, max_completion_length=60)
    with pytest.raises(ConfigurationError, match="does not fit the model's max_seq_length=64"):
        _train_with_model(tiny_chat_folder, tmp_path, max_seq_length=64, max_completion_length=40, max_prompt_length=30)


def _train_with_model(folder, tmp_path, max_seq_length, **cfg):
    model, tok = _model(folder, max_seq_length=max_seq_length)
    trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=_args(tmp_path, max_steps=1, **cfg),
                          train_dataset=_rows(), tokenizer=tok)
    trainer.train()


def test_missing_prompt_column_and_reference(tiny_chat_folder, tmp_path):
    model, tok = _model(tiny_chat_folder)
    with pytest.raises(DatasetError, match="'prompt' column"):
        GRPOTrainer(model=model, reward_funcs=length_reward, args=_args(tmp_path), train_dataset=[{"text": "x"}],
                    tokenizer=tok)
    full, tok = FastModel.from_pretrained(str(tiny_chat_folder), dtype="float32", max_seq_length=128, verbose=False,
                                          full_finetuning=True)
    with pytest.raises(ConfigurationError, match="beta > 0 needs a reference policy"):
        GRPOTrainer(model=full, reward_funcs=length_reward, args=_args(tmp_path, beta=0.1), train_dataset=_rows(),
                    tokenizer=tok)
