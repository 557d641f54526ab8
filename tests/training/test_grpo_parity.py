"""engine.GRPOTrainer against TRL 1.16's GRPOTrainer: loss, LoRA gradients, advantages and metrics (fp32, 1e-5).

Both trainers train the same tiny Llama (our model from the saved folder; TRL's the transformers model with PEFT
LoRA holding our adapter weights, B non-zero so policy and reference differ) on the same prompts. Completions are
injected on both sides (TRL: ``rollout_func``; ours: a subclass overriding ``generate_completions``) as a fixed
function of the prompt, and the generation batch is permuted the same fixed way on both sides (TRL shuffles with
the global RNG; we seed our own generator) so the micro-batches hold the same rows.
"""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from datasets import Dataset

from engine import FastModel, GRPOConfig, GRPOTrainer
from engine.peft import lora_modules
from engine.training.grpo_data import RepeatSampler
from tests.conftest import make_tiny_chat_hf_model

TOL = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
G, BATCH, MAX_COMPLETION = 2, 4, 6
PROMPTS = ["Count to three:", "Name a colour", "The capital of France is", "2 + 2 =", "Say hi", "Why?"]


def _completion(prompt_ids, k: int, eos: int) -> list[int]:
    """A fixed completion of 1..MAX_COMPLETION tokens for the k-th copy of a prompt; some end with EOS."""
    rng = random.Random(f"{tuple(prompt_ids)}-{k}")
    n = rng.randint(1, MAX_COMPLETION)
    ids = [rng.randint(100, 5000) for _ in range(n)]
    if rng.random() < 0.5:
        ids[-1] = eos
    return ids


def _complete_all(prompt_ids_list, eos: int) -> list[list[int]]:
    seen: dict = {}
    out = []
    for ids in prompt_ids_list:
        k = seen.get(tuple(ids), 0)
        seen[tuple(ids)] = k + 1
        out.append(_completion(ids, k, eos))
    return out


def length_reward(completion_ids, **kwargs):
    return [0.3 * len(c) + (c[0] % 5) for c in completion_ids]


def answer_reward(completions, answer, **kwargs):
    # None ("not applicable") for odd answers: NaN, skipped by the weighted nansum
    return [None if a % 2 else float(len(c) % 3) for c, a in zip(completions, answer)]


def _rows():
    return [{"prompt": p, "answer": i} for i, p in enumerate(PROMPTS)]


def _reverse(n: int) -> torch.Tensor:
    return torch.arange(n - 1, -1, -1)


class InjectedGRPOTrainer(GRPOTrainer):
    """Test-only: fixed completions and a fixed permutation of the generation batch."""

    def generate_completions(self, prompt_ids):
        return _complete_all(prompt_ids, self.processing_class.eos_token_id)

    def _shuffle_generation_batch(self, batch):
        perm = _reverse(batch["advantages"].shape[0])
        return {k: (v[perm] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}


def _trl_shuffle(seq_dict):
    n = len(next(v for v in seq_dict.values() if v is not None))
    perm = _reverse(n)

    def permute(v):
        if v is None or (isinstance(v, torch.Tensor) and v.dim() == 0):
            return v
        return v[perm] if isinstance(v, torch.Tensor) else [v[i] for i in perm]

    return {k: permute(v) for k, v in seq_dict.items()}


class GradCapture(transformers.TrainerCallback):
    """The gradients of the trainable parameters just before each optimizer step."""

    def __init__(self, named_params):
        self.params = named_params
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({k: p.grad.detach().clone() for k, p in self.params.items()})


def _common(tmp_path, name, **cfg):
    return dict(
        output_dir=str(tmp_path / name), per_device_train_batch_size=BATCH, num_generations=G,
        max_completion_length=MAX_COMPLETION, temperature=0.7, learning_rate=cfg.pop("learning_rate", 1e-3),
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, max_grad_norm=0.0,
        seed=0, reward_weights=[1.0, 0.5], **cfg,
    )


def _ours(folder, tok, tmp_path, cfg):
    model, _ = FastModel.from_pretrained(str(folder), dtype="float32", max_seq_length=128, verbose=False)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0,
                                     use_gradient_checkpointing=False, random_state=0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
    args = GRPOConfig(**_common(tmp_path, "ours", **cfg))
    trainer = InjectedGRPOTrainer(model=model, reward_funcs=[length_reward, answer_reward], args=args,
                                  train_dataset=_rows(), tokenizer=tok)
    capture = GradCapture({n: p for n, p in model.named_parameters() if p.requires_grad})
    trainer.add_callback(capture)
    return trainer, capture


def _trl(ours_model, tok, tmp_path, cfg):
    import trl
    from peft import LoraConfig

    def rollout_func(prompts, trainer):
        prompt_ids = [list(x) for x in tok(text=prompts)["input_ids"]]
        return {"prompt_ids": prompt_ids, "completion_ids": _complete_all(prompt_ids, tok.eos_token_id),
                "logprobs": None}

    args = trl.GRPOConfig(**_common(tmp_path, "trl", **cfg), bf16=False, activation_checkpointing=False)
    trainer = trl.GRPOTrainer(
        model=make_tiny_chat_hf_model(), reward_funcs=[length_reward, answer_reward], args=args,
        train_dataset=Dataset.from_list(_rows()), processing_class=tok, rollout_func=rollout_func,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0),
    )
    params = dict(trainer.model.named_parameters())
    with torch.no_grad():
        for name, m in lora_modules(ours_model).items():
            params[f"base_model.model.{name}.lora_A.default.weight"].copy_(m.lora_A)
            params[f"base_model.model.{name}.lora_B.default.weight"].copy_(m.lora_B)
    capture = GradCapture({n: p for n, p in params.items() if p.requires_grad})
    trainer.add_callback(capture)
    return trainer, capture


def _close(a: float, b: float, what: str) -> None:
    assert abs(a - b) <= TOL * max(abs(b), 1.0), f"{what}: ours {a} vs TRL {b}"


METRICS = ("loss", "reward", "reward_std", "entropy", "completions/mean_length", "completions/clipped_ratio",
           "rewards/length_reward/mean", "rewards/answer_reward/mean", "rewards/answer_reward/std",
           "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "frac_reward_zero_std")

# Every loss type with (beta 0, one micro-batch) and (beta > 0, two accumulated micro-batches) runs by default; the
# other half of the product is marked slow (about 8 s per case on a 2-core CPU; CI runs them).
_FAST = {(0.0, 1), (0.05, 2)}
CASES = [
    pytest.param(loss_type, beta, ga, 1, id=f"{loss_type}-beta{beta}-ga{ga}",
                 marks=() if (beta, ga) in _FAST else pytest.mark.slow)
    for loss_type in ("grpo", "dr_grpo", "dapo", "bnpo")
    for beta in (0.0, 0.05)
    for ga in (1, 2)
] + [pytest.param("dapo", 0.05, 1, 2, id="dapo-beta0.05-ga1-iterations2")]


@pytest.mark.parametrize(("loss_type", "beta", "ga", "iterations"), CASES)
def test_grpo_matches_trl(loss_type, beta, ga, iterations, tiny_chat_folder, smollm2_tokenizer, tmp_path, monkeypatch):
    import trl.trainer.grpo_trainer as trl_grpo

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    monkeypatch.setattr(trl_grpo, "shuffle_sequence_dict", _trl_shuffle)
    tok = smollm2_tokenizer
    # iterations=2 reuses the generation batch for a second step after an update: ratios != 1 (clipping, old logps)
    cfg = dict(loss_type=loss_type, beta=beta, gradient_accumulation_steps=ga, num_iterations=iterations,
               max_steps=iterations, epsilon=0.02, learning_rate=5e-2 if iterations > 1 else 1e-3)
    ours, ours_grads = _ours(tiny_chat_folder, tok, tmp_path, dict(cfg))
    theirs, trl_grads = _trl(ours.model, tok, tmp_path, dict(cfg))

    # Same prompts in the same order (TRL's RepeatSampler).
    assert list(ours._get_train_sampler()) == list(theirs._get_train_sampler())
    ours.train()
    theirs.train()

    for buf, ref in zip(ours._buffered_inputs, theirs._buffered_inputs):
        assert torch.equal(buf["completion_ids"], ref["completion_ids"])
        torch.testing.assert_close(buf["advantages"], ref["advantages"], rtol=TOL, atol=TOL)
    assert ours._buffered_inputs[0]["advantages"].abs().max() > 0.1

    ours_logs = [e for e in ours.state.log_history if "loss" in e]
    trl_logs = [e for e in theirs.state.log_history if "loss" in e]
    assert len(ours_logs) == len(trl_logs) == iterations
    for mine, ref in zip(ours_logs, trl_logs):
        for key in METRICS + (("kl",) if beta else ()):
            assert (key in mine) == (key in ref), key  # rollout metrics are logged on generation steps only
            if key in ref:
                _close(mine[key], ref[key], key)
    if beta:
        assert ours_logs[0]["kl"] > 1e-4, "policy and reference should differ"
    if iterations > 1:
        assert ours_logs[-1]["clip_ratio/region_mean"] > 0, "the reused batch should clip some ratios"

    assert len(ours_grads.grads) == len(trl_grads.grads) == iterations
    modules = lora_modules(ours.model)
    for mine, ref in zip(ours_grads.grads, trl_grads.grads):
        by_module = {name: m for name, m in modules.items()}
        ours_named = {id(p): n for n, p in ours.model.named_parameters()}
        for name, m in by_module.items():
            for part in ("A", "B"):
                g = mine[ours_named[id(getattr(m, f"lora_{part}"))]]
                r = ref[f"base_model.model.{name}.lora_{part}.default.weight"]
                assert r.abs().max() > 0, f"{name} lora_{part}: TRL gradient is zero"
                err = (g - r).abs().max() / r.abs().max()
                assert err <= TOL, f"{name} lora_{part} gradient: max rel err {err:.2e}"


def test_repeat_sampler_order_matches_trl():
    from trl.trainer.utils import RepeatSampler as TRLRepeatSampler

    data = list(range(11))
    for kwargs in ({"mini_repeat_count": 3, "batch_size": 2, "repeat_count": 2, "seed": 5},
                   {"mini_repeat_count": 2, "batch_size": 4, "repeat_count": 1, "shuffle": False}):
        assert list(RepeatSampler(data, **kwargs)) == list(TRLRepeatSampler(data, **kwargs))
        assert len(RepeatSampler(data, **kwargs)) == len(TRLRepeatSampler(data, **kwargs))
