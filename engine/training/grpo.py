"""Group Relative Policy Optimization: :class:`GRPOTrainer` (TRL 1.16's algorithm on the engine's model).

One optimizer step, with ``S`` micro-batches (``steps_per_generation``, default ``gradient_accumulation_steps``):

1. **Rollout** (every ``S x num_iterations`` micro-steps): the sampler (:class:`~engine.training.grpo_data.
   RepeatSampler`) hands over ``generation_batch_size`` prompts, each repeated ``num_generations`` times. They are
   tokenized (chat template for conversations), left-padded and completed in one batched
   ``model.generate(..., do_sample=True, seed=...)`` call with the LoRA adapters active; completions are cut after
   the first EOS. :meth:`GRPOTrainer.generate_completions` is the hook to override (tests inject fixed completions).
2. **Scoring**: reward functions (:mod:`engine.training.rewards`) → group advantages
   (:mod:`engine.training.grpo_loss`); reference log-probs (``beta > 0``: the same model with adapters disabled) and
   old-policy log-probs (only when the batch is reused: ``num_iterations > 1`` or more generation steps than
   accumulation steps) without grad.
3. **Training**: the batch is shuffled (seeded) and cut into ``S`` micro-batches; each computes the clipped
   surrogate loss (:func:`~engine.training.grpo_loss.grpo_loss`) from per-token log-probs of the chunked
   ``token_log_probs`` op.

The report (``training_report.json``) adds ``generation``: seconds and completion tokens spent generating,
generation tokens/s, and the remaining (training) seconds.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

import datasets
import torch
import transformers

from engine.errors import ConfigurationError, DatasetError
from engine.training.rows import as_dataset, as_text_or_messages, first_format
from engine.peft import disable_adapter, has_adapters
from engine.training.base import EngineTrainer, resolve_config, trainer_inputs
from engine.training.config import GRPOConfig
from engine.training.grpo_data import RepeatSampler, completion_log_probs, is_conversational, pad_left, pad_right
from engine.training.grpo_loss import clip_metrics, group_advantages, grpo_loss, masked_mean, nanstd
from engine.training.rewards import compute_rewards, reward_function_names, validate_reward_functions


def check_prompts(prompts) -> None:
    """Check a GRPO ``prompt`` column before training (prompts are tokenized at each rollout, too late to name a row).

    Each prompt must be a string, or a non-empty list of ``{"role", "content"}`` messages, all in one format
    (:func:`engine.training.rows.as_text_or_messages`).

    Raises:
        DatasetError: naming the first example whose prompt is ``None``, of another type or format, an empty
            conversation, or a malformed message.
    """
    conversational, decided_by = first_format(prompts)
    for index, prompt in enumerate(prompts):
        as_text_or_messages(prompt, index, "prompt", conversational, decided_by)


def _identity(rows):
    return rows


class GRPOTrainer(EngineTrainer):
    """Reinforcement learning from reward functions on a dataset of prompts (strings or conversations).

    Args:
        model (CausalLM): from :class:`engine.FastModel`, with LoRA adapters (needed for ``beta > 0``: the reference
            is the model with adapters off) or fully trainable (``beta = 0`` only).
        reward_funcs: a callable or a list of callables (see :mod:`engine.training.rewards`).
        args (GRPOConfig, optional): defaults to ``GRPOConfig(output_dir="outputs")``.
        train_dataset / eval_dataset: :class:`datasets.Dataset` or list of dicts with a ``prompt`` column; the other
            columns reach the reward functions.
        tokenizer / processing_class: the tokenizer.

    Logged metrics (TRL's names): ``reward``, ``reward_std``, ``rewards/<func>/mean`` and ``/std``,
    ``frac_reward_zero_std``, ``kl`` (``beta > 0``), ``entropy``, ``clip_ratio/low_mean``, ``/low_min``,
    ``/high_mean``, ``/high_max``, ``/region_mean``, ``completions/mean_length``, ``/min_length``, ``/max_length``,
    ``/clipped_ratio``, ``/mean_terminated_length``, ``/min_terminated_length``, ``/max_terminated_length``,
    ``num_tokens``, and what reward functions pass to ``log_metric``.
    """

    #: compute_loss divides by the accumulation steps itself (TRL's normalisations).
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model=None,
        reward_funcs=None,
        args: GRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        *,
        tokenizer=None,
        processing_class=None,
        **kwargs,
    ):
        args = resolve_config(args, GRPOConfig, "GRPOTrainer")
        tok = trainer_inputs("GRPOTrainer", tokenizer, processing_class, train_dataset)
        if args.beta != 0.0 and not has_adapters(model):
            raise ConfigurationError(
                "beta > 0 needs a reference policy: the model with its LoRA adapters disabled. Add adapters with "
                "FastModel.get_peft_model(...) or set GRPOConfig(beta=0.0)."
            )
        if getattr(model, "lm_head", None) is not None and (model.lm_head.has_lora or model.lm_head.is_quantized):
            raise ConfigurationError("LoRA or 4-bit quantization on lm_head is not supported by GRPOTrainer")
        self.reward_funcs, self.reward_weights = validate_reward_functions(reward_funcs, args.reward_weights)
        self.reward_func_names = reward_function_names(self.reward_funcs)
        train_dataset = self._as_dataset(train_dataset, "train_dataset")
        if eval_dataset is not None:
            eval_dataset = self._as_dataset(eval_dataset, "eval_dataset")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.eos_token_ids = self._eos_ids(model, tok)
        budget = (args.max_prompt_length or 0) + args.max_completion_length
        if budget > model.max_seq_length or args.max_completion_length >= model.max_seq_length:
            raise ConfigurationError(
                f"max_prompt_length ({args.max_prompt_length}) + max_completion_length ({args.max_completion_length}) "
                f"does not fit the model's max_seq_length={model.max_seq_length}. Lower them or load the model with a "
                "larger max_seq_length."
            )
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._pending_metrics = defaultdict(list)
        self._step = 0
        self._generation_count = 0
        self._buffered_inputs = None
        self.generation_seconds = 0.0
        self.generation_tokens = 0
        super().__init__(
            model=model,
            args=args,
            processing_class=tok,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=_identity,
            **kwargs,
        )
        self.report.generation = {"seconds": 0.0, "completion_tokens": 0}

    # ------------------------------------------------------------------ data
    @staticmethod
    def _as_dataset(dataset, name: str) -> datasets.Dataset:
        if isinstance(dataset, list):
            if not dataset:
                raise DatasetError(f"{name} is empty")
            dataset = as_dataset(dataset)
        if "prompt" not in dataset.column_names:
            raise DatasetError(f"{name} needs a 'prompt' column (strings or lists of messages); it has {dataset.column_names}")
        if len(dataset) == 0:
            raise DatasetError(f"{name} is empty")
        check_prompts(dataset["prompt"])
        return dataset

    @staticmethod
    def _eos_ids(model, tok) -> list[int]:
        ids = model.args.eos_token_id
        ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
        if tok.eos_token_id is not None and tok.eos_token_id not in ids:
            ids = [tok.eos_token_id, *ids]
        return ids

    def get_train_dataloader(self):
        """Each batch is one generation batch (``per_device_train_batch_size x steps_per_generation`` rows)."""
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, dataset=None):
        return RepeatSampler(
            dataset if dataset is not None else self.train_dataset,
            mini_repeat_count=self.args.num_generations,
            batch_size=self.args.generation_batch_size // self.args.num_generations,
            repeat_count=self.args.num_iterations * self.args.steps_per_generation,
            shuffle=self.args.shuffle_dataset,
            seed=self.args.seed,
        )

    def _get_eval_sampler(self, eval_dataset):
        return RepeatSampler(eval_dataset, mini_repeat_count=self.args.num_generations, seed=self.args.seed)

    def step_shape(self) -> tuple[int, int]:
        """A micro-batch: ``per_device_train_batch_size`` rows of prompt + ``max_completion_length`` tokens."""
        return self.args.per_device_train_batch_size, self.model.max_seq_length

    # ------------------------------------------------------------------ rollout
    def _tokenize_prompts(self, prompts: list) -> list[list[int]]:
        tok = self.processing_class
        if is_conversational(prompts[0]):
            ids = [
                list(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
                for p in prompts
            ]
        else:
            ids = [list(x) for x in tok(text=prompts)["input_ids"]]
        if self.args.max_prompt_length is not None:
            ids = [x[-self.args.max_prompt_length :] for x in ids]
        longest = max(len(x) for x in ids)
        if longest + self.args.max_completion_length > self.model.max_seq_length:
            raise ConfigurationError(
                f"a prompt of {longest} tokens + max_completion_length={self.args.max_completion_length} is longer than "
                f"the model's max_seq_length={self.model.max_seq_length}. Set max_prompt_length, lower "
                "max_completion_length or load the model with a larger max_seq_length."
            )
        return ids

    def generate_completions(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """Sample one completion per prompt (prompts already repeated per group); the rollout hook.

        Batched ``model.generate`` over all rows (left padding), ``do_sample=True`` with the config's temperature,
        top-k and top-p, seeded by ``seed`` and the number of rollouts so far. Each completion is cut after its
        first EOS (kept). Override to inject completions (tests) or use another sampler.
        """
        pad = self.processing_class.pad_token_id
        ids, mask = pad_left(prompt_ids, pad)
        out = self.model.generate(
            ids, attention_mask=mask, max_new_tokens=self.args.max_completion_length, do_sample=True,
            temperature=self.args.temperature, top_k=self.args.top_k, top_p=self.args.top_p,
            eos_token_id=self.eos_token_ids, pad_token_id=pad, seed=self.args.seed + self._generation_count,
        )
        completions = []
        eos = set(self.eos_token_ids)
        for row in out[:, ids.shape[1] :].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            completions.append(row[:cut])
        return completions

    def _shuffle_generation_batch(self, batch: dict) -> dict:
        """Permute the rows of a generation batch (a generator seeded by ``seed`` and the rollout count)."""
        n = batch["advantages"].shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.args.seed + self._generation_count))
        return {k: (v[perm.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}

    def _prepare_inputs(self, generation_batch):
        mode = "train" if self.model.training else "eval"
        if mode == "eval":
            return self._generate_and_score(generation_batch, mode)
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._shuffle_generation_batch(self._generate_and_score(generation_batch, mode))
            spg = self.args.steps_per_generation
            size = batch["advantages"].shape[0] // spg
            self._buffered_inputs = [
                {k: (v[i * size : (i + 1) * size] if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                 for k, v in batch.items()}
                for i in range(spg)
            ]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    @torch.no_grad()
    def _log_probs_no_grad(self, input_ids, attention_mask, c: int, batch_size: int) -> torch.Tensor:
        parts = []
        for start in range(0, input_ids.shape[0], batch_size):
            logps, _ = completion_log_probs(
                self.model, input_ids[start : start + batch_size], attention_mask[start : start + batch_size], c,
                self.args.temperature,
            )
            parts.append(logps)
        return torch.cat(parts)

    def _generate_and_score(self, rows: list[dict], mode: str) -> dict:
        args, device, tok = self.args, self.model.device, self.processing_class
        prompts = [r["prompt"] for r in rows]
        prompt_ids_list = self._tokenize_prompts(prompts)
        start = time.perf_counter()
        completion_ids_list = self.generate_completions(prompt_ids_list)
        seconds = time.perf_counter() - start
        self._generation_count += 1
        if len(completion_ids_list) != len(prompt_ids_list):
            raise ConfigurationError(
                f"generate_completions returned {len(completion_ids_list)} completions for {len(prompt_ids_list)} prompts"
            )
        lengths = torch.tensor([len(c) for c in completion_ids_list], dtype=torch.float32)
        self.generation_seconds += seconds
        self.generation_tokens += int(lengths.sum())
        self.report.generation = {"seconds": self.generation_seconds, "completion_tokens": self.generation_tokens}

        if is_conversational(prompts[0]):
            texts = tok.batch_decode(completion_ids_list, skip_special_tokens=True)
            completions = [[{"role": "assistant", "content": t}] for t in texts]
        else:
            completions = tok.batch_decode(completion_ids_list, skip_special_tokens=True)

        prompt_ids, prompt_mask = pad_left(prompt_ids_list, tok.pad_token_id)
        completion_ids, completion_mask = pad_right(completion_ids_list, tok.pad_token_id)
        eos_and_pad = {*self.eos_token_ids, tok.pad_token_id}
        truncated = torch.tensor([len(c) == 0 or c[-1] not in eos_and_pad for c in completion_ids_list])
        if args.mask_truncated_completions:
            completion_mask = completion_mask * (~truncated)[:, None].long()
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        completion_ids, completion_mask = completion_ids.to(device), completion_mask.to(device)
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        c = completion_ids.shape[1]
        batch_size = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size

        old_logps = ref_logps = None
        if args.gradient_accumulation_steps % (args.steps_per_generation * args.num_iterations) != 0:
            old_logps = self._log_probs_no_grad(input_ids, attention_mask, c, batch_size)
        if args.beta != 0.0:
            with disable_adapter(self.model):
                ref_logps = self._log_probs_no_grad(input_ids, attention_mask, c, batch_size)

        rewards_per_func = compute_rewards(
            self.reward_funcs, self.reward_func_names, prompts=prompts, completions=completions,
            completion_ids=completion_ids_list, rows=rows,
            extra_kwargs={"trainer_state": self.state, "log_extra": self._log_extra, "log_metric": self._log_metric},
        )
        adv = group_advantages(rewards_per_func, self.reward_weights, args.num_generations, args.scale_rewards)

        m = self._metrics[mode]
        if mode == "train":
            self.state.num_input_tokens_seen += int(prompt_mask.sum()) + int(lengths.sum())
        m["num_tokens"] = [self.state.num_input_tokens_seen]
        m["completions/mean_length"].append(lengths.mean().item())
        m["completions/min_length"].append(lengths.min().item())
        m["completions/max_length"].append(lengths.max().item())
        m["completions/clipped_ratio"].append(truncated.float().mean().item())
        terminated = lengths[~truncated] if bool((~truncated).any()) else torch.zeros(1)
        m["completions/mean_terminated_length"].append(terminated.mean().item())
        m["completions/min_terminated_length"].append(terminated.min().item())
        m["completions/max_terminated_length"].append(terminated.max().item())
        for j, name in enumerate(self.reward_func_names):
            m[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, j]).item())
            m[f"rewards/{name}/std"].append(nanstd(rewards_per_func[:, j]).item())
        m["reward"].append(torch.nanmean(adv["rewards"]).item())
        m["reward_std"].append(nanstd(adv["rewards"]).item())
        m["frac_reward_zero_std"].append(adv["is_std_zero"].float().mean().item())
        for name, values in self._pending_metrics.items():
            m[name].append(sum(values) / len(values))
        self._pending_metrics.clear()

        out = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "advantages": adv["advantages"].to(device),
            "num_items_in_batch": completion_mask.sum(),
        }
        if old_logps is not None:
            out["old_per_token_logps"] = old_logps
        if ref_logps is not None:
            out["ref_per_token_logps"] = ref_logps
        return out

    def _log_extra(self, column: str, values: list) -> None:
        """TRL's ``log_extra`` hook for reward functions: accepted, not stored (no completions table here)."""

    def _log_metric(self, name: str, value: float) -> None:
        """TRL's ``log_metric`` hook: averaged per rollout into the logs under ``name``."""
        self._pending_metrics[name].append(float(value))

    # ------------------------------------------------------------------ loss
    def training_step(self, model, inputs, num_items_in_batch=None):
        # The rows are prompts, not token batches: tokens are counted in compute_loss.
        loss = transformers.Trainer.training_step(self, model, inputs, num_items_in_batch)
        self._step += 1
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ConfigurationError("GRPOTrainer.compute_loss does not return outputs")
        args = self.args
        mode = "train" if model.training else "eval"
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"]
        if mode == "train":
            self.report.add_tokens(int(attention_mask.sum()))
        logps, entropies = completion_log_probs(
            model, input_ids, attention_mask, mask.shape[1], args.temperature, entropy=True
        )
        epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        train = mode == "train"
        out = grpo_loss(
            logps, inputs.get("old_per_token_logps"), inputs.get("ref_per_token_logps"), inputs["advantages"], mask,
            loss_type=args.loss_type, beta=args.beta, epsilon_low=args.epsilon, epsilon_high=epsilon_high,
            max_completion_length=args.max_completion_length,
            accumulation_steps=self.current_gradient_accumulation_steps if train else 1,
            steps_per_generation=args.steps_per_generation if train else 1,
            num_items_in_batch=inputs["num_items_in_batch"], use_bias_correction_kl=args.use_bias_correction_kl,
        )
        m = self._metrics[mode]
        if out.per_token_kl is not None:
            m["kl"].append(masked_mean(out.per_token_kl, mask))
        m["entropy"].append(masked_mean(entropies, mask))
        for key, value in clip_metrics(out.ratio, inputs["advantages"], mask, args.epsilon, epsilon_high).items():
            m[key].append(value)
        return out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of the GRPO metrics since the last log (NaNs skipped; ``eval_`` prefixed in evaluation)."""
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._metrics[mode].items():
            valid = [v for v in values if not math.isnan(v)]
            logs[f"{prefix}{key}"] = sum(valid) / len(valid) if valid else None
        self._metrics[mode].clear()
        super().log(logs, start_time)
