"""Benchmark: a tiny mixture-of-experts model, the engine vs transformers + PEFT + TRL (padding-free packing).

Run from the repository root::

    python benchmarks/moe.py --rounds 2                       # both families, 4 sides, 2 rounds (41 min on 2 busy CPU cores)
    python benchmarks/moe.py --families qwen3_moe --max-steps 6 --sides engine,hf-grouped-mm

Each family is a small random model built by transformers (:data:`SHAPES`: Qwen3-MoE-like and Mixtral-like,
16-byte aligned sizes so transformers' ``grouped_mm`` experts run on CPU) and saved once as a Hugging Face folder
(per-expert tensors, as the hub stores them) with SmolLM2's tokenizer cut to the model's vocabulary
(:func:`truncated_tokenizer`). Every side loads that folder, in bf16 where the CPU has AVX-512-BF16 (else fp32),
and trains LoRA r=16 / alpha 32 (dropout 0) for the same number of optimizer steps on the shipped SFT data,
packed into rows of ``--seq-len`` tokens by best-fit decreasing, ``--batch-size`` rows per step:

| side | what it is |
|---|---|
| ``engine`` | ``engine.FastModel`` + ``engine.SFTTrainer``, default targets (attention and both expert projections), default checkpointing (``"auto"``) |
| ``engine-no-ckpt`` | the same with ``use_gradient_checkpointing=False`` (like the HF sides) |
| ``hf-eager`` | transformers ``experts_implementation="eager"`` (a loop over the experts that received tokens) + PEFT + TRL |
| ``hf-grouped-mm`` | the same with ``experts_implementation="grouped_mm"`` (``torch.nn.functional.grouped_mm``) |
| ``hf-batched-mm`` | the same with ``experts_implementation="batched_mm"`` (each token's expert weights gathered, one ``bmm``; not run by default: gigabytes of gathered weights) |

The HF sides use ``LoraConfig(target_modules=[q,k,v,o]_proj, target_parameters=["experts.gate_up_proj",
"experts.down_proj"])`` and ``trl.SFTConfig(packing=True, packing_strategy="bfd", padding_free=True)``, no gradient
checkpointing (the fastest HF setting when memory allows). Each side trains in its own process (its peak memory
is its own) and is measured by the same callback (:class:`engine.training.TrainingReport`): step wall time,
trained tokens, peak RSS. Step times skip the first ``--warmup-steps``; step 1 (0-based) of every side is profiled
(:func:`benchmarks.sides.categorize_profile`), and on the engine side step 2 as well, with Python stacks, to
measure the share of the step spent in the per-expert loop of the CPU grouped matmul
(:func:`expert_loop_share`). Both profiled steps are inside the warm-up.

Results: ``benchmarks/results/<name>.json``, ``.md`` (tables) and ``.png`` (loss curves and throughput).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the repository's packages (engine, benchmarks) importable
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / ".cache"
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_TARGETS = ["experts.gate_up_proj", "experts.down_proj"]

#: transformers config arguments of each family's benchmark model (every size a multiple of 8: 16-byte strides in
#: bf16, which ``torch.nn.functional.grouped_mm`` needs on CPU). ``vocab_size`` is set from ``--vocab``.
SHAPES: dict[str, dict] = {
    "qwen3_moe": dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
        intermediate_size=512, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    ),
    "mixtral": dict(
        hidden_size=384, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, head_dim=64,
        intermediate_size=768, num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.0,
        sliding_window=None,
    ),
}

#: A tiny variant of every family (for the smoke test: ``--tiny``).
TINY: dict[str, dict] = {
    "qwen3_moe": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    "mixtral": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
}


@dataclass
class MoEBenchConfig:
    family: str
    model: str  # the Hugging Face folder every side loads
    max_steps: int
    seq_len: int
    batch_size: int
    dtype: str
    seed: int = 0
    lora_r: int = 16
    lora_alpha: int = 32
    learning_rate: float = 2e-4
    rows: int = 2000
    profile_step: int | None = 1
    loop_profile_step: int | None = 2
    device: str = "cpu"

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------- the model


def truncated_tokenizer(vocab_size: int):
    """SmolLM2's tokenizer (and chat template) cut to its first ``vocab_size`` tokens.

    Byte-level BPE ranks its tokens by merge order, so keeping the tokens with ids below ``vocab_size`` and the merges
    whose parts and result are all kept is again a complete byte-level BPE (every byte is among the first 273 ids);
    texts just split into more, shorter tokens. The special tokens (ids 0-16) are kept.
    """
    from transformers import AutoTokenizer

    from engine.assets import smollm2_gguf_path
    from engine.gguf.reader import load_gguf_tokenizer

    if vocab_size < 512:
        raise SystemExit(f"--vocab {vocab_size}: at least 512 (the byte alphabet and special tokens take 273 ids)")
    tokenizer = load_gguf_tokenizer(smollm2_gguf_path())
    with tempfile.TemporaryDirectory(prefix="moe-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        spec = json.loads(path.read_text())
        model = spec["model"]
        if model["type"] != "BPE":
            raise SystemExit(f"the SmolLM2 tokenizer is {model['type']}, expected BPE; the truncation assumes BPE")
        vocab = {tok: i for tok, i in model["vocab"].items() if i < vocab_size}
        merges = []
        for merge in model["merges"]:
            a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
            if a in vocab and b in vocab and a + b in vocab:
                merges.append(merge)
        model["vocab"], model["merges"] = vocab, merges
        if any(t["id"] >= vocab_size for t in spec["added_tokens"]):
            raise SystemExit(f"--vocab {vocab_size} would drop special tokens of the SmolLM2 tokenizer")
        path.write_text(json.dumps(spec))
        out = AutoTokenizer.from_pretrained(tmp)
    if out.pad_token is None:
        out.pad_token = out.eos_token
    return out


def model_config(family: str, vocab_size: int, tiny: bool = False):
    """The transformers config of ``family``'s benchmark model."""
    import transformers

    shapes = (TINY if tiny else SHAPES)[family]
    cls = {"qwen3_moe": transformers.Qwen3MoeConfig, "mixtral": transformers.MixtralConfig}[family]
    return cls(**shapes, vocab_size=vocab_size, max_position_embeddings=4096, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_model_folder(family: str, vocab_size: int, folder: Path, seed: int = 0, tiny: bool = False) -> Path:
    """Save a random ``family`` model (fp32 safetensors, per-expert tensors as the hub stores them) and the
    truncated tokenizer to ``folder`` (once: an existing folder with a config is reused)."""
    import torch
    from transformers import AutoModelForCausalLM

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(family, vocab_size, tiny), dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    truncated_tokenizer(vocab_size).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------- profiling


def expert_loop_share(trace: dict, step_ms: float) -> dict:
    """Time of the per-expert loop of the CPU grouped matmul in one profiled step (a Chrome trace with Python stacks).

    The loop is :func:`engine_kernels.grouped_gemm.grouped_mm_torch` (forward products and the input gradients) and
    :func:`~engine_kernels.grouped_gemm.grouped_weight_grad_torch` (the LoRA factors' weight gradients): their
    inclusive wall time (one ``torch.mm`` per non-empty expert plus the Python loop around them), and how much of it
    was inside ``aten::mm``.

    Args:
        trace: the profiler's exported Chrome trace (``{"traceEvents": [...]}``).
        step_ms: the profiled step's wall time.

    Returns:
        ``{"loop_ms", "loop_mm_ms", "loop_calls", "mm_calls", "step_ms", "share"}``.
    """
    loops: dict[object, list[tuple[float, float]]] = {}
    calls = 0
    for ev in trace.get("traceEvents", []):
        name = str(ev.get("name", ""))
        if ev.get("cat") == "python_function" and "grouped_gemm.py" in name and name.endswith(
            ("grouped_mm_torch", "grouped_weight_grad_torch")
        ):
            loops.setdefault(ev.get("tid"), []).append((float(ev["ts"]), float(ev["ts"]) + float(ev.get("dur", 0))))
            calls += 1
    loop_us = sum(b - a for spans in loops.values() for a, b in spans)
    mm_us, mm_calls = 0.0, 0
    for ev in trace.get("traceEvents", []):
        if ev.get("cat") == "cpu_op" and ev.get("name") == "aten::mm":
            start, end = float(ev["ts"]), float(ev["ts"]) + float(ev.get("dur", 0))
            if any(a <= start and end <= b for a, b in loops.get(ev.get("tid"), ())):
                mm_us += end - start
                mm_calls += 1
    return {
        "loop_ms": loop_us / 1000.0,
        "loop_mm_ms": mm_us / 1000.0,
        "loop_calls": calls,
        "mm_calls": mm_calls,
        "step_ms": step_ms,
        "share": loop_us / 1000.0 / step_ms if step_ms else 0.0,
    }


def loop_overhead(model: str, tokens: int, dtype: str, lora_r: int, repeats: int = 5, seed: int = 0) -> dict:
    """The forward products of one sparse layer, per-expert loop against one matmul over all rows (no profiler).

    For ``tokens`` tokens routed top-k at random (softmax of Gaussian logits) over the model's experts, times
    :func:`engine_kernels.grouped_gemm.grouped_mm_torch` for the six forward products of a LoRA'd expert layer
    (``gate_up`` and ``down``: base ``[E, out, in]``, LoRA A ``[E, r, in]``, LoRA B ``[E, out, r]``) against one
    ``torch.mm`` of all ``tokens * k`` rows with one expert's matrix (the same FLOPs, no loop): what looping over
    the experts costs beyond the arithmetic. Median of ``repeats`` after one warm-up.

    Returns:
        ``{"rows", "experts", "loop_ms", "single_mm_ms", "ratio", "products": [...]}``.
    """
    import statistics

    import torch
    from transformers import AutoConfig

    from engine_kernels.grouped_gemm import grouped_mm_torch

    c = AutoConfig.from_pretrained(model)
    e = getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None)
    h, k = c.hidden_size, c.num_experts_per_tok
    i = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    g = torch.Generator().manual_seed(seed)
    index = torch.topk(torch.randn(tokens, e, generator=g), k, dim=-1).indices.reshape(-1)
    sizes = tuple(torch.bincount(index, minlength=e).tolist())
    rows = tokens * k
    products = []
    shapes = (("gate_up base", 2 * i, h), ("gate_up lora_A", lora_r, h), ("gate_up lora_B", 2 * i, lora_r),
              ("down base", h, i), ("down lora_A", lora_r, i), ("down lora_B", h, lora_r))
    for name, n_out, n_in in shapes:
        x = torch.randn(rows, n_in, generator=g).to(dt)
        w = torch.randn(e, n_out, n_in, generator=g).to(dt)

        def timed(fn):
            fn()
            out = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
            return statistics.median(out) * 1000.0

        loop_ms = timed(lambda: grouped_mm_torch(x, w, sizes))
        single_ms = timed(lambda: torch.mm(x, w[0].T))
        products.append({"product": name, "out": n_out, "in": n_in, "loop_ms": loop_ms, "single_mm_ms": single_ms})
    loop = sum(p["loop_ms"] for p in products)
    single = sum(p["single_mm_ms"] for p in products)
    return {"rows": rows, "experts": e, "tokens": tokens, "dtype": dtype, "threads": torch.get_num_threads(),
            "loop_ms": loop, "single_mm_ms": single, "ratio": loop / single if single else None, "products": products}


def make_loop_profile_callback(step: int | None):
    """A TrainerCallback that profiles optimizer step ``step`` (0-based) with Python stacks and keeps
    :func:`expert_loop_share` of it."""
    import torch
    from transformers import TrainerCallback

    from benchmarks.sides import forget_profiler_memory

    class LoopProfile(TrainerCallback):
        def __init__(self):
            self.summary: dict | None = None
            self._prof = None
            self._start = 0.0
            self._index = 0

        def on_step_begin(self, args, state, control, **kwargs):
            if step is not None and self._index == step:
                from torch.profiler import ProfilerActivity, profile

                self._prof = profile(activities=[ProfilerActivity.CPU], with_stack=True)
                self._prof.__enter__()
                self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self._prof is not None:
                seconds = time.perf_counter() - self._start
                self._prof.__exit__(None, None, None)
                with tempfile.TemporaryDirectory(prefix="moe-trace-") as tmp:
                    path = Path(tmp) / "trace.json"
                    self._prof.export_chrome_trace(str(path))
                    trace = json.loads(path.read_text())
                self.summary = expert_loop_share(trace, seconds * 1000.0)
                self.summary["profiled_step"] = self._index
                self.summary["threads"] = torch.get_num_threads()
                self._prof = None
                del trace
                self.summary["memory_peak_reset"] = forget_profiler_memory()
            self._index += 1

    return LoopProfile()


# ------------------------------------------------------------------------------------------- sides


def _dtype(cfg: MoEBenchConfig):
    import torch

    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]


def run_engine(cfg: MoEBenchConfig, output_dir: Path, *, gradient_checkpointing=None) -> dict:
    """``engine.SFTTrainer`` with the engine's default LoRA targets, packed padding-free rows;
    ``gradient_checkpointing=None`` keeps the engine's default (``"auto"``)."""
    import torch

    from benchmarks.sides import (_finish, checkpointed_layer_count, document_lengths, make_profile_callback,
                                  shared_trainer_args, training_rows)
    from engine import FastModel, SFTConfig, SFTTrainer

    documents: list[list[int]] = []

    class MeasuredSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            documents.append(document_lengths(inputs))
            return super().training_step(model, inputs, num_items_in_batch)

    torch.manual_seed(cfg.seed)
    model, tokenizer = FastModel.from_pretrained(cfg.model, max_seq_length=cfg.seq_len, dtype=_dtype(cfg),
                                                 device=cfg.device, verbose=False)
    ckpt = {} if gradient_checkpointing is None else {"use_gradient_checkpointing": gradient_checkpointing}
    model = FastModel.get_peft_model(model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                     random_state=cfg.seed, **ckpt)
    args = SFTConfig(**shared_trainer_args(cfg, output_dir), max_length=cfg.seq_len, packing=True, padding_free=True)
    profiler = make_profile_callback(cfg.profile_step, cfg.device)
    loop = make_loop_profile_callback(cfg.loop_profile_step)
    trainer = MeasuredSFTTrainer(model=model, tokenizer=tokenizer, train_dataset=training_rows(cfg.rows), args=args,
                                 callbacks=[profiler, loop])
    trainer.train()
    policy = getattr(model, "checkpoint_policy", None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    extra = {"gradient_checkpointing": str(policy if policy is not None else model.gradient_checkpointing),
             "expert_loop": loop.summary, "trainable_parameters": trainable}
    return _finish(trainer.report, documents, profiler, checkpointed_layer_count(model), extra)


def run_hf(cfg: MoEBenchConfig, output_dir: Path, *, experts_implementation: str) -> dict:
    """transformers (``experts_implementation``) + PEFT ``target_parameters`` on the experts + ``trl.SFTTrainer``
    packing padding-free rows (BFD), no gradient checkpointing."""
    import torch
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.sides import _as_dataset, _finish, document_lengths, make_profile_callback, shared_trainer_args
    from benchmarks.sides import training_rows
    from engine.training.base import count_trained_tokens
    from engine.training.reporting import TrainingReport

    documents: list[list[int]] = []
    report = TrainingReport(torch.device(cfg.device))
    profiler = make_profile_callback(cfg.profile_step, cfg.device)

    class MeasuredSFTTrainer(trl.SFTTrainer):
        """TRL's SFTTrainer, unchanged except that it tells the report what each batch held."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            report.add_tokens(count_trained_tokens(inputs))
            documents.append(document_lengths(inputs))
            return super().training_step(model, inputs, num_items_in_batch)

    torch.manual_seed(cfg.seed)
    dtype = _dtype(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, experts_implementation=experts_implementation)
    peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                             target_modules=ATTENTION_TARGETS, target_parameters=EXPERT_TARGETS, task_type="CAUSAL_LM")
    kwargs = {"gradient_checkpointing": False, "bf16": dtype == torch.bfloat16, "report_to": [], "packing": True,
              "packing_strategy": "bfd", "padding_free": True, "max_length": cfg.seq_len}
    args = trl.SFTConfig(**shared_trainer_args(cfg, output_dir), **kwargs)
    trainer = MeasuredSFTTrainer(model=model, args=args, train_dataset=_as_dataset(training_rows(cfg.rows)),
                                 processing_class=tokenizer, peft_config=peft_config, callbacks=[report, profiler])
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    extra = {"gradient_checkpointing": "False", "experts_implementation": experts_implementation,
             "trl_config": {k: str(v) for k, v in kwargs.items()}, "trainable_parameters": trainable}
    return _finish(report, documents, profiler, 0, extra)


SIDES = {
    "engine": ("engine (defaults: checkpointing \"auto\")", run_engine),
    "engine-no-ckpt": ("engine, gradient checkpointing off",
                       lambda c, o: run_engine(c, o, gradient_checkpointing=False)),
    "hf-eager": ("TRL padding-free packing, experts eager", lambda c, o: run_hf(c, o, experts_implementation="eager")),
    "hf-grouped-mm": ("TRL padding-free packing, experts grouped_mm",
                      lambda c, o: run_hf(c, o, experts_implementation="grouped_mm")),
    "hf-batched-mm": ("TRL padding-free packing, experts batched_mm",
                      lambda c, o: run_hf(c, o, experts_implementation="batched_mm")),
}


#: hf-batched-mm is left out by default: it gathers one expert weight matrix per (token, expert) pair and keeps it
#: for backward (``[T*k, 2I, H]`` per layer: gigabytes at the benchmark's sizes).
DEFAULT_SIDES = ("engine", "engine-no-ckpt", "hf-eager", "hf-grouped-mm")

# ------------------------------------------------------------------------------------------- driver


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="qwen3_moe,mixtral", help=f"comma-separated, from: {', '.join(SHAPES)}")
    p.add_argument("--sides", default=",".join(DEFAULT_SIDES),
                   help=f"comma-separated, from: {', '.join(SIDES)} (default: {', '.join(DEFAULT_SIDES)})")
    p.add_argument("--max-steps", type=int, default=12)
    p.add_argument("--warmup-steps", type=int, default=3, help="first steps left out of the timings (>= 3: the "
                   "profiled steps 1 and 2 are inside the warm-up)")
    p.add_argument("--seq-len", type=int, default=512, help="packed row length")
    p.add_argument("--batch-size", type=int, default=2, help="packed rows per step")
    p.add_argument("--rows", type=int, default=2000, help="conversations of the shipped SFT data to train on")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary (SmolLM2's tokenizer cut to it)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="default: bfloat16 where the CPU has AVX-512-BF16, else float32")
    p.add_argument("--rounds", type=int, default=1, help="run every side this many times, taking turns (the order "
                   "reversed every other round); each side's table column is its fastest round, every round's tokens/s "
                   "is listed")
    p.add_argument("--tiny", action="store_true", help="tiny model shapes (the smoke test)")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="results file stem (default: moe-cpu-b<batch>-s<steps>)")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--models-dir", default=str(CACHE), help="where the random models are saved (reused if present)")
    p.add_argument("--in-process", action="store_true",
                   help="run every side in this process (faster start; memory figures are then not each side's own)")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)  # internal: run one side in this process
    p.add_argument("--family", default=None, help=argparse.SUPPRESS)
    p.add_argument("--side-output", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _names(spec: str, known, what: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in names if s not in known]
    if unknown or not names:
        raise SystemExit(f"unknown {what} {unknown or spec!r}; choose from: {', '.join(known)}")
    return list(dict.fromkeys(names))


def model_folder(args, family: str) -> Path:
    shape = "tiny" if args.tiny else "bench"
    return Path(args.models_dir) / f"moe-{family}-{shape}-v{args.vocab}-seed{args.seed}"


def bench_config(args, family: str) -> MoEBenchConfig:
    from benchmarks.sides import bf16_supported

    dtype = args.dtype or ("bfloat16" if bf16_supported("cpu") else "float32")
    profile = not args.no_profile
    return MoEBenchConfig(
        family=family, model=str(model_folder(args, family)), max_steps=args.max_steps, seq_len=args.seq_len,
        batch_size=args.batch_size, dtype=dtype, seed=args.seed, rows=args.rows,
        profile_step=1 if profile and args.max_steps > 1 else None,
        loop_profile_step=2 if profile and args.max_steps > 2 else None,
    )


def run_side_subprocess(side: str, family: str, argv: list[str], out: Path) -> dict:
    """Run one side in a child process (its own peak memory); a failure comes back as ``{"failed": <error>}``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--side", side, "--family", family,
           "--side-output", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          check=False)
    if proc.returncode != 0 or not out.is_file():
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        error = lines[-1] if lines else f"exit code {proc.returncode}"
        sys.stderr.write(proc.stderr[-6000:])
        print(f"{family} / {side} FAILED: {error}", flush=True)
        return {"failed": error, "returncode": proc.returncode, "stderr_tail": proc.stderr[-4000:]}
    result = json.loads(out.read_text())
    out.unlink()
    return result


ROWS = [
    ("median time per step (s)", "median_step_s", "{:.3f}"),
    ("trained tokens/s", "tokens_per_s", "{:,.0f}"),
    ("trained tokens (all steps)", "trained_tokens", "{:,}"),
    ("peak memory, RSS (MiB)", "peak_memory_mib", "{:,.0f}"),
    ("memory added by training (MiB)", "peak_added_mib", "{:,.0f}"),
    ("final loss", "final_loss", "{:.4f}"),
    ("mean loss, last 5 steps", "mean_loss_last5", "{:.4f}"),
    ("trainable parameters", "trainable_parameters", "{:,}"),
    ("tokens/s of every round", "tokens_per_s_rounds", "{:,.0f}"),
    ("train time (s)", "total_s", "{:.1f}"),
]


def run_side(args, argv: list[str], family: str, side: str, out: Path) -> dict:
    """One side's report: in this process (``--in-process``) or, by default, in a child process."""
    if not args.in_process:
        return run_side_subprocess(side, family, argv, out)
    with tempfile.TemporaryDirectory(prefix=f"moe-{side}-") as tmp:
        return SIDES[side][1](bench_config(args, family), Path(tmp))


def fastest_round(reports: list[dict], warmup: int) -> dict:
    """The round with the highest tokens/s (the one least slowed by other load); a failed round only if all failed."""
    ok = [r for r in reports if "failed" not in r]
    if not ok:
        return reports[-1]
    return max(ok, key=lambda r: metrics_of(r, warmup)["tokens_per_s"])


def metrics_of(report: dict, warmup: int) -> dict:
    from benchmarks.run import side_metrics

    if "failed" in report:
        return {"failed": report["failed"]}
    m = side_metrics(report, warmup)
    m["trainable_parameters"] = report.get("trainable_parameters")
    return m


def _cell(value, fmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, list):
        return ", ".join("failed" if v is None else fmt.format(v) for v in value)
    return fmt.format(value)


def markdown_table(metrics: dict[str, dict]) -> str:
    sides = list(metrics)
    lines = ["| metric | " + " | ".join(f"`{s}`" for s in sides) + " |", "|---|" + "---:|" * len(sides)]
    for label, key, fmt in ROWS:
        cells = ["failed" if "failed" in metrics[s] else _cell(metrics[s].get(key), fmt) for s in sides]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(metrics: dict[str, dict]) -> list[dict]:
    """Each engine side that ran against the strongest (highest tokens/s) HF side that ran."""
    ok = {s: m for s, m in metrics.items() if "failed" not in m}
    peers = [s for s in ok if s.startswith("hf")]
    if not peers:
        return []
    best = max(peers, key=lambda s: ok[s]["tokens_per_s"])
    b = ok[best]
    return [
        {
            "engine_side": ours,
            "hf_side": best,
            "tokens_per_s_ratio": a["tokens_per_s"] / b["tokens_per_s"] if b["tokens_per_s"] else None,
            "added_memory_ratio": a["peak_added_mib"] / b["peak_added_mib"] if b["peak_added_mib"] else None,
            "peak_memory_ratio": a["peak_memory_mib"] / b["peak_memory_mib"] if b["peak_memory_mib"] else None,
        }
        for ours, a in ok.items() if ours.startswith("engine")
    ]


def plot(results: dict, path: Path, warmup: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(results)
    fig, axes = plt.subplots(len(families), 2, figsize=(13, 4.2 * len(families)), squeeze=False)
    for row, family in enumerate(families):
        ax_loss, ax_tok = axes[row]
        reports, metrics = results[family]["reports"], results[family]["metrics"]
        for side, report in reports.items():
            if "failed" in report:
                continue
            recs = [r for r in report["step_records"] if r["loss"] is not None]
            ax_loss.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=side, marker=".")
        ax_loss.set_xlabel("optimizer step")
        ax_loss.set_ylabel("training loss")
        ax_loss.set_title(f"{family}: loss")
        ax_loss.legend(fontsize=8)
        names = [s for s in metrics if "failed" not in metrics[s]]
        bars = ax_tok.bar(range(len(names)), [metrics[s]["tokens_per_s"] for s in names],
                          color=["tab:blue" if s.startswith("engine") else "tab:orange" for s in names])
        ax_tok.set_xticks(range(len(names)), names, rotation=15, ha="right", fontsize=8)
        ax_tok.bar_label(bars, fmt="%.0f")
        ax_tok.set_ylabel(f"trained tokens/s (steps > {warmup})")
        ax_tok.set_title(f"{family}: throughput (blue: engine, orange: HF)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def family_markdown(family: str, cfg: MoEBenchConfig, block: dict) -> str:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(cfg.model)
    experts = getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None)
    inter = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    shape = (f"hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads}/{c.num_key_value_heads} "
             f"heads x {getattr(c, 'head_dim', c.hidden_size // c.num_attention_heads)}, {experts} experts "
             f"(intermediate {inter}), top-{c.num_experts_per_tok}, vocabulary {c.vocab_size}")
    lines = [f"## {family}", "", shape, "", markdown_table(block["metrics"]), ""]
    for head in block["headline"]:
        lines += [f"`{head['engine_side']}` / strongest HF side (`{head['hf_side']}`): tokens/s "
                  f"{head['tokens_per_s_ratio']:.2f}x, memory added by training {head['added_memory_ratio']:.2f}x, "
                  f"peak RSS {head['peak_memory_ratio']:.2f}x", ""]
    for side, report in block["reports"].items():
        loop = report.get("expert_loop")
        if loop:
            lines += [f"`{side}`, profiled step {loop['profiled_step']} (with Python stacks): per-expert loop of the "
                      f"CPU grouped matmul {loop['loop_ms']:.0f} ms of {loop['step_ms']:.0f} ms ({loop['share']:.0%}; "
                      f"{loop['loop_calls']} loop calls, {loop['mm_calls']} torch.mm calls taking "
                      f"{loop['loop_mm_ms']:.0f} ms)", ""]
    over = block.get("loop_overhead")
    if over:
        lines += [f"Per-expert loop vs one matmul, the six forward products of one sparse layer ({over['tokens']} "
                  f"tokens, {over['rows']} routed rows over {over['experts']} experts, {over['dtype']}, "
                  f"{over['threads']} threads, no profiler): {over['loop_ms']:.2f} ms looped, "
                  f"{over['single_mm_ms']:.2f} ms as one torch.mm each ({over['ratio']:.2f}x)", ""]
    prof = ["| side | step (ms) | matmul | attention | elementwise | Python/framework |",
            "|---|---:|---:|---:|---:|---:|"]
    for side, r in block["reports"].items():
        p = r.get("profile")
        if p:
            prof.append(f"| `{side}` | {p['step']:,.0f} | {p['matmul']:,.0f} | {p['attention']:,.0f} | "
                        f"{p['elementwise']:,.0f} | {p['python_overhead']:,.0f} |")
    if len(prof) > 2:
        lines += ["Profile of step 1 (ms):", "", *prof, ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.side:
        cfg = bench_config(args, args.family)
        with tempfile.TemporaryDirectory(prefix=f"moe-{args.side}-") as tmp:
            result = SIDES[args.side][1](cfg, Path(tmp))
        Path(args.side_output).write_text(json.dumps(result))
        return {}
    from tqdm.auto import tqdm

    from benchmarks.versions import tested_versions

    families = _names(args.families, SHAPES, "family")
    sides = _names(args.sides, SIDES, "side")
    if args.warmup_steps < 3 and not args.no_profile and args.max_steps > 3:
        raise SystemExit("--warmup-steps must be at least 3 (steps 1 and 2 are profiled); or pass --no-profile")
    versions = tested_versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    name = args.name or f"moe-cpu-b{args.batch_size}-s{args.max_steps}{'-tiny' if args.tiny else ''}"
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    results: dict[str, dict] = {}
    jobs = [(f, s, r) for f in families for r in range(args.rounds) for s in sides]
    with tqdm(total=len(jobs), desc="moe benchmark", unit="side") as bar:
        for family in families:
            build_model_folder(family, args.vocab, model_folder(args, family), args.seed, args.tiny)
            rounds: dict[str, list[dict]] = {s: [] for s in sides}
            for r in range(args.rounds):
                for side in (sides if r % 2 == 0 else sides[::-1]):
                    bar.set_postfix_str(f"{family} / {side} / round {r + 1}")
                    rounds[side].append(run_side(args, argv, family, side, out_dir / f".{name}.{family}.{side}.json"))
                    bar.update(1)
            reports = {s: fastest_round(rounds[s], args.warmup_steps) for s in sides}
            metrics = {s: metrics_of(r, args.warmup_steps) for s, r in reports.items()}
            for s in sides:
                if "failed" not in metrics[s]:
                    metrics[s]["tokens_per_s_rounds"] = [metrics_of(r, args.warmup_steps).get("tokens_per_s")
                                                         for r in rounds[s]]
            cfg = bench_config(args, family)
            overhead = loop_overhead(cfg.model, args.seq_len * args.batch_size, cfg.dtype, cfg.lora_r)
            results[family] = {"config": cfg.as_dict(), "metrics": metrics, "loop_overhead": overhead,
                               "headline": headline(metrics), "reports": reports,
                               "rounds": {s: [metrics_of(r, args.warmup_steps) for r in rounds[s]] for s in sides}}
    result = {"families": results, "sides": {s: SIDES[s][0] for s in sides}, "warmup_steps": args.warmup_steps,
              "versions": versions, "command": "python benchmarks/moe.py " + " ".join(argv),
              "wall_seconds": time.time() - start, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    any_cfg = bench_config(args, families[0])
    settings = (f"dtype={any_cfg.dtype}, seq_len={args.seq_len} (packed rows), batch_size={args.batch_size} rows, "
                f"max_steps={args.max_steps}, warmup_steps={args.warmup_steps}, LoRA r={any_cfg.lora_r} alpha="
                f"{any_cfg.lora_alpha}, lr={any_cfg.learning_rate}")
    legend = "\n".join(f"- `{s}`: {SIDES[s][0]}" for s in sides)
    version_line = ", ".join(f"{k} {v}" for k, v in versions.items())
    body = "\n".join(family_markdown(f, bench_config(args, f), results[f]) for f in families)
    md = (f"# {name}\n\ncommand: `{result['command']}`\n\n{settings}\n\nversions: {version_line}\n\n{legend}\n\n"
          f"{body}")
    (out_dir / f"{name}.md").write_text(md)
    plot(results, out_dir / f"{name}.png", args.warmup_steps)
    print("\n" + md)
    print(f"written: {out_dir / name}.json, .md, .png ({time.time() - start:.0f} s in all)")
    return result


if __name__ == "__main__":
    main()
