"""What ONE decoder layer saves for backward, per token: the engine vs plain Hugging Face transformers + PEFT.

Measured, not a formula: a one-layer model with Llama-3.1-8B layer dimensions (hidden 4096, intermediate
14336, 32 query / 8 key-value heads of 128, a 256-token vocabulary to save memory) is built in bf16 on CPU,
LoRA r = 16 (alpha 16, dropout 0) goes on all seven projections, and one forward of a batch of ``1 x T``
tokens runs inside :class:`torch.autograd.graph.saved_tensors_hooks`. The pack hook records every tensor
autograd saves while the decoder layer runs, each storage once (``untyped_storage().data_ptr()``), and skips
the model's parameters and buffers (NF4 ones included): those are per layer, not per token. The forward runs
at two lengths (64 and 128 by default); a saved tensor whose size does not change between them (autocast's
cached bf16 copy of a LoRA weight) is reported as per-layer bytes, every other one must grow exactly in
proportion to ``T`` (checked) and is reported as bytes per token.

Attention core: on CPU both sides run PyTorch SDPA, whose math kernel saves ``[heads, T, T]`` probabilities,
which a GPU flash kernel never builds. So what SDPA itself saves is not counted (it runs under inner hooks
that record nothing), and for both sides the set a flash-attention kernel saves is added explicitly instead:
``q``, ``k``, ``v`` exactly as passed to the kernel (HF's repeated ``k``/``v`` if it repeats them), the output
``O`` and the fp32 log-sum-exp (``heads x 4`` bytes per token). The SDPA output is handed on in the memory
layout GPU flash kernels produce (``[b, s, h, d]``), so a later reshape into the O projection's input is a
view there as on a GPU, and whether the O projection saves that same storage is seen by the pointer count.

Sites are set by forward hooks on the layer's submodules and, in this script only, by temporarily wrapping
the functions that have no module (the engine's fused ``project`` and ``rope``, HF's ``apply_rotary_pos_emb``,
``F.scaled_dot_product_attention``). The RoPE ``cos``/``sin`` tables are computed once per forward and shared
by every layer; they are reported apart ("rope tables, per model").

HF + PEFT is measured twice: as plain PEFT sets it up (``get_peft_model`` with its defaults: the LoRA weights
are upcast to fp32, no autocast) and as ``trl.SFTTrainer`` trains it (``bf16=True``: the forward runs under
``torch.autocast(bfloat16)``; with a 4-bit base TRL also casts the LoRA weights to bf16). The script also
measures each side with gradient checkpointing on (what stays saved per layer between forward and backward;
``--no-checkpointing`` skips it).

Run: ``python benchmarks/layer_memory.py`` (about 80 s on two CPU cores, 3.5 GB of RAM); writes
``benchmarks/results/layer_memory.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: Report order of the per-layer sites.
SITES = ("input_layernorm", "qkv", "rope", "attention", "o_proj", "post_attention_layernorm", "mlp", "other")
SHARED = "rope tables (per model)"
CHECKPOINT = "layer input (checkpoint)"


@dataclass(frozen=True)
class Dims:
    """One decoder layer's dimensions and the LoRA rank."""

    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int = 256
    r: int = 16


LLAMA31_8B = Dims(hidden=4096, inter=14336, heads=32, kv_heads=8, head_dim=128)


def hf_config(dims: Dims):
    """A one-layer Llama-3.1-style ``LlamaConfig`` with ``dims`` (SDPA attention)."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=dims.vocab,
        hidden_size=dims.hidden,
        intermediate_size=dims.inter,
        num_hidden_layers=1,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.kv_heads,
        head_dim=dims.head_dim,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def write_checkpoint(dims: Dims, folder: Path, seed: int = 0) -> Path:
    """Save a random bf16 one-layer model with ``dims`` as a Hugging Face folder (both sides load it)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(dims), dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    return folder


# --------------------------------------------------------------------------- recording


@dataclass
class Saved:
    """One storage kept for backward: where it was saved, its shape/dtype and its bytes."""

    site: str
    where: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    kind: str = "saved"  # "saved" (by autograd) or "flash" (the flash-attention set, added explicitly)


def _tensor_ptrs(obj, out: set[int], depth: int = 0) -> None:
    """Storage pointers of every tensor reachable from a bitsandbytes ``QuantState`` (absmax, code, state2...)."""
    if depth > 3 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        out.add(obj.untyped_storage().data_ptr())
        return
    for value in getattr(obj, "__dict__", {}).values():
        if isinstance(value, torch.Tensor) or type(value).__module__.startswith("bitsandbytes"):
            _tensor_ptrs(value, out, depth + 1)


def model_storage_ptrs(model: torch.nn.Module) -> set[int]:
    """Storages of all parameters and buffers (and of bitsandbytes quantization states): never per-token."""
    ptrs: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        ptrs.add(t.untyped_storage().data_ptr())
        _tensor_ptrs(getattr(t, "quant_state", None), ptrs)
    ptrs.discard(0)
    return ptrs


class Recorder:
    """Pack hook and bookkeeping: which storages were saved, at which site (each storage counted once)."""

    def __init__(self, excluded: set[int], checkpointing: bool):
        self.excluded = excluded
        self.checkpointing = checkpointing
        self.active = False
        self.stack: list[str] = []
        self.shared: set[int] = set()
        self.seen: dict[int, Saved] = {}
        self.reused: list[dict] = []  # a storage saved again at another place (e.g. the O projection's input)
        self.records: list[Saved] = []
        self.keep: list[torch.Tensor] = []  # holds every counted storage so no address is reused meanwhile
        self.sdpa_calls: list[dict] = []

    # hooks ----------------------------------------------------------------
    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            self.add(t)
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @contextlib.contextmanager
    def at(self, name: str):
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()

    # bookkeeping -----------------------------------------------------------
    def site(self) -> str:
        names = [part for name in reversed(self.stack) for part in reversed(name.split("."))]
        for part in names:
            if part in _SITE_OF:
                return _SITE_OF[part]
        if self.stack and self.stack[-1] in ("final_norm", "lm_head"):
            return self.stack[-1]
        return CHECKPOINT if self.checkpointing else "other"

    def add(self, t: torch.Tensor, kind: str = "saved", label: str = "") -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.excluded or storage.nbytes() == 0:
            return
        site = SHARED if ptr in self.shared else self.site()
        where = (self.stack[-1] if self.stack else "(model)") + (f" {label}" if label else "")
        if ptr in self.seen:  # saved again: counted once, where it was first saved
            first = self.seen[ptr]
            if (first.site, first.where) != (site, where):
                self.reused.append({"saved_at": where, "site": site, "counted_at": first.where,
                                    "counted_site": first.site, "shape": list(t.shape)})
            return
        record = Saved(site, where, tuple(t.shape), str(t.dtype).replace("torch.", ""), storage.nbytes(), kind)
        self.seen[ptr] = record
        self.keep.append(t)
        self.records.append(record)


_SITE_OF = {
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
    "q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "qkv": "qkv",
    "o_proj": "o_proj",
    "rope": "rope",
    "sdpa": "attention",
    "mlp": "mlp",
    "self_attn": "other",
    "final_norm": "final_norm", "lm_head": "lm_head",
}


def _identity(t):
    return t


@contextlib.contextmanager
def _patched(owner, name: str, make):
    """Temporarily replace ``owner.name`` with ``make(original)`` (this script only; restored on exit)."""
    original = getattr(owner, name)
    setattr(owner, name, make(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def _sdpa_wrapper(rec: Recorder):
    """SDPA whose own saved tensors are not counted; the flash-attention set is counted instead."""

    def make(real):
        def sdpa(q, k, v, *args, **kwargs):
            with rec.at("sdpa"):
                with torch.autograd.graph.saved_tensors_hooks(_identity, _identity):  # inner hooks win: not counted
                    out = real(q, k, v, *args, **kwargs)
                # A GPU flash kernel returns [b, h, s, d] over [b, s, h, d] memory; so do we.
                out = out.transpose(1, 2).contiguous().transpose(1, 2)
                if rec.active and not rec.checkpointing:
                    rec.sdpa_calls.append({
                        "q": list(q.shape), "k": list(k.shape), "v": list(v.shape),
                        "enable_gqa": bool(kwargs.get("enable_gqa", False)),
                    })
                    lse = torch.empty(q.shape[0], q.shape[1], q.shape[2], dtype=torch.float32)
                    for label, t in (("q", q), ("k", k), ("v", v), ("O", out), ("lse", lse)):
                        rec.add(t, kind="flash", label=label)
            return out

        return sdpa

    return make


def _labelled(rec: Recorder, label):
    """Wrap a function so that what it saves is attributed to ``label`` (a string or ``f(args) -> str``)."""

    def make(fn):
        def wrapper(*args, **kwargs):
            with rec.at(label(args) if callable(label) else label):
                return fn(*args, **kwargs)

        return wrapper

    return make


def _module_hooks(rec: Recorder, layer: torch.nn.Module, final_norm, lm_head) -> list:
    handles = []

    def push(name):
        return lambda module, args: rec.stack.append(name)

    def pop(module, args, output):
        rec.stack.pop()

    for name, module in layer.named_modules():
        handles.append(module.register_forward_pre_hook(push(name or "layer")))
        handles.append(module.register_forward_hook(pop))
    for name, module in (("final_norm", final_norm), ("lm_head", lm_head)):
        handles.append(module.register_forward_pre_hook(push(name)))
        handles.append(module.register_forward_hook(pop))
    return handles


# --------------------------------------------------------------------------- the two sides


def build_engine(folder: Path, dims: Dims, four_bit: bool, max_len: int):
    from engine import FastModel

    model, _ = FastModel.from_pretrained(
        str(folder), max_seq_length=max_len, dtype=torch.bfloat16, load_in_4bit=four_bit, device="cpu", verbose=False
    )
    model = FastModel.get_peft_model(
        model, r=dims.r, lora_alpha=dims.r, lora_dropout=0.0, target_modules=TARGETS,
        use_gradient_checkpointing=False, random_state=0,
    )
    return model


def build_hf(folder: Path, dims: Dims, four_bit: bool):
    import peft
    import transformers

    kwargs = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    if four_bit:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    config = peft.LoraConfig(r=dims.r, lora_alpha=dims.r, target_modules=TARGETS, lora_dropout=0.0)
    model = peft.get_peft_model(model, config)
    model.train()
    return model


def _engine_parts(model):
    return model.model.layers[0], model.model.norm, model.lm_head


def _hf_parts(model):
    causal_lm = model.base_model.model
    return causal_lm.model.layers[0], causal_lm.model.norm, causal_lm.lm_head


@contextlib.contextmanager
def _engine_patches(rec: Recorder, model, checkpointing: bool):
    import engine.models.transformer as tf

    def cos_sin(real):
        def wrapper(*args, **kwargs):
            cos, sin = real(*args, **kwargs)
            rec.shared.update((cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()))
            return cos, sin

        return wrapper

    previous = model.gradient_checkpointing
    model.gradient_checkpointing = checkpointing
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(tf, "project", _labelled(rec, lambda a: "qkv" if len(a[1]) == 3 else "o_proj")))
        stack.enter_context(_patched(tf, "rope", _labelled(rec, "rope")))
        stack.enter_context(_patched(tf, "rope_cos_sin", cos_sin))
        try:
            yield
        finally:
            model.gradient_checkpointing = previous


@contextlib.contextmanager
def _hf_patches(rec: Recorder, model, checkpointing: bool):
    from transformers.models.llama import modeling_llama

    rotary = model.base_model.model.model.rotary_emb
    handle = rotary.register_forward_hook(
        lambda module, args, out: rec.shared.update(t.untyped_storage().data_ptr() for t in out)
    )
    if checkpointing:
        model.gradient_checkpointing_enable()
    try:
        with _patched(modeling_llama, "apply_rotary_pos_emb", _labelled(rec, "rope")):
            yield
    finally:
        handle.remove()
        if checkpointing:
            model.gradient_checkpointing_disable()


@dataclass
class Run:
    """One forward at ``tokens`` tokens: the recorded storages and the shapes SDPA got."""

    tokens: int
    records: list[Saved]
    sdpa_calls: list[dict] = field(default_factory=list)
    reused: list[dict] = field(default_factory=list)


def record_forward(side: str, model, dims: Dims, tokens: int, *, autocast: bool = False, checkpointing: bool = False,
                   backward: bool = False, seed: int = 0) -> Run:
    """One forward of a ``[1, tokens, hidden]`` batch through the model; what its decoder layer saves."""
    layer, final_norm, lm_head = (_engine_parts if side == "engine" else _hf_parts)(model)
    rec = Recorder(model_storage_ptrs(model), checkpointing)
    patches = _engine_patches if side == "engine" else _hf_patches
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, dims.hidden, generator=gen).to(torch.bfloat16).requires_grad_()
    handles = _module_hooks(rec, layer, final_norm, lm_head)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(patches(rec, model, checkpointing))
            stack.enter_context(_patched(torch.nn.functional, "scaled_dot_product_attention", _sdpa_wrapper(rec)))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(rec.pack, rec.unpack))
            if autocast:
                stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            rec.active = True
            kwargs = {} if side == "engine" else {"use_cache": False}
            logits = model(inputs_embeds=x, **kwargs).logits
            rec.active = False
    finally:
        for h in handles:
            h.remove()
    if not checkpointing and len(rec.sdpa_calls) != 1:
        raise RuntimeError(f"{side}: attention did not run through F.scaled_dot_product_attention once "
                           f"(ENGINE_KERNELS must be unset or 'torch' on CPU); the flash set was not counted")
    if backward:  # the layer must train: gradients reach its LoRA weights
        logits.float().square().mean().backward()
        lora = [p for n, p in layer.named_parameters() if "lora_B" in n]
        if len(lora) != 7 or any(p.grad is None or not p.grad.abs().sum() > 0 for p in lora):
            raise RuntimeError(f"{side}: backward did not reach the 7 LoRA B weights")
    layer_only = [r for r in rec.records if r.site not in ("final_norm", "lm_head")]
    reused = [r for r in rec.reused if r["site"] not in ("final_norm", "lm_head")]
    return Run(tokens, layer_only, rec.sdpa_calls, reused)


# --------------------------------------------------------------------------- per token, per site


def per_token(runs: list[Run]) -> dict:
    """Split the storages of runs at two lengths into per-token and per-layer bytes; bytes/token by site.

    Runs record the same storages in the same order. A storage of the same size in both is per-layer;
    any other must be exactly proportional to the token count (``linear``), else it is listed as nonlinear.
    """
    a, b = runs[0], runs[1]
    if [(r.site, r.where, r.dtype) for r in a.records] != [(r.site, r.where, r.dtype) for r in b.records]:
        raise RuntimeError("the two runs saved different tensors")
    by_site: dict[str, float] = {}
    per_layer = 0
    tensors, nonlinear = [], []
    for ra, rb in zip(a.records, b.records):
        if ra.nbytes == rb.nbytes:
            per_layer += ra.nbytes
            tensors.append({**asdict(ra), "per_layer_bytes": ra.nbytes})
            continue
        if ra.nbytes * b.tokens != rb.nbytes * a.tokens:
            nonlinear.append(asdict(ra))
            continue
        bpt = ra.nbytes / a.tokens
        by_site[ra.site] = by_site.get(ra.site, 0) + bpt
        tensors.append({**asdict(ra), "bytes_per_token": bpt})
    shared = by_site.pop(SHARED, 0)
    sites = [*SITES, CHECKPOINT] if CHECKPOINT in by_site else list(SITES)
    return {
        "per_token": {site: _num(by_site.get(site, 0)) for site in sites},
        "total_per_token": _num(sum(by_site.values())),
        "per_layer_bytes": per_layer,
        "shared_per_token": _num(shared),
        "linear": not nonlinear,
        "nonlinear": nonlinear,
        "tokens": [a.tokens, b.tokens],
        "sdpa_inputs": a.sdpa_calls,
        "reused_storages": a.reused,
        "tensors": tensors,
    }


def _num(x: float):
    return int(x) if float(x).is_integer() else round(x, 3)


def measure(side: str, model, dims: Dims, tokens=(64, 128), *, autocast: bool = False,
            checkpointing: bool = False, backward: bool = True) -> dict:
    """Per-token bytes one decoder layer of ``model`` saves (see :func:`per_token`)."""
    runs = [
        record_forward(side, model, dims, t, autocast=autocast, checkpointing=checkpointing,
                       backward=backward and i == 0)
        for i, t in enumerate(tokens)
    ]
    model.zero_grad(set_to_none=True)
    return per_token(runs)


def measure_all(dims: Dims, folder: Path, tokens=(64, 128), *, four_bit_hf: bool = True,
                checkpointing: bool = True, backward: bool = True, log=print) -> dict:
    """Engine, HF + PEFT (plain) and HF + PEFT (as TRL trains it), 16-bit and 4-bit bases (and checkpointing)."""
    results: dict = {}
    for bits, four_bit in (("16bit", False), ("4bit", True)):
        res = results[bits] = {}
        t0 = time.time()
        engine = build_engine(folder, dims, four_bit, max(tokens))
        res["engine"] = measure("engine", engine, dims, tokens, backward=backward)
        if checkpointing and not four_bit:
            results["checkpointing"] = {"engine": measure("engine", engine, dims, tokens, checkpointing=True,
                                                          backward=False)}
        del engine
        log(f"  engine {bits}: {time.time() - t0:.1f}s")
        if four_bit and not four_bit_hf:
            res["hf"] = res["hf_trainer"] = {"skipped": "4-bit HF not requested"}
            continue
        t0 = time.time()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hf = build_hf(folder, dims, four_bit)
                res["hf"] = measure("hf", hf, dims, tokens, backward=backward)
        except Exception as exc:  # bitsandbytes 4-bit may not train on this CPU
            if not four_bit:
                raise
            reason = f"{type(exc).__name__}: {exc}"
            res["hf"] = res["hf_trainer"] = {"skipped": reason}
            log(f"  HF 4-bit skipped: {reason}")
            continue
        if four_bit:  # TRL casts the trainable (LoRA) weights of a quantized model to bf16
            for p in hf.parameters():
                if p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res["hf_trainer"] = measure("hf", hf, dims, tokens, autocast=True, backward=backward)
            if checkpointing and not four_bit:
                results["checkpointing"]["hf"] = measure("hf", hf, dims, tokens, checkpointing=True, backward=False)
        del hf
        log(f"  HF {bits}: {time.time() - t0:.1f}s")
    return results


# --------------------------------------------------------------------------- report

COLUMNS = (("engine", "engine"), ("hf", "HF+PEFT defaults"), ("hf_trainer", "HF+PEFT as TRL (autocast)"))


def table(bits: str, res: dict) -> str:
    """A fixed-width table of bytes/token per site for one base precision."""
    cols = [(key, name) for key, name in COLUMNS if "skipped" not in res.get(key, {"skipped": 1})]
    lines = [f"{bits} base: bytes saved per token, one decoder layer", f"{'site':<28}" + "".join(
        f"{name:>28}" for _, name in cols)]
    for site in SITES:
        lines.append(f"{site:<28}" + "".join(f"{res[k]['per_token'].get(site, 0):>28,}" for k, _ in cols))
    lines.append(f"{'TOTAL per layer':<28}" + "".join(f"{res[k]['total_per_token']:>28,}" for k, _ in cols))
    lines.append(f"{'per-layer bytes (not /tok)':<28}" + "".join(f"{res[k]['per_layer_bytes']:>28,}" for k, _ in cols))
    lines.append(f"{SHARED:<28}" + "".join(f"{res[k]['shared_per_token']:>28,}" for k, _ in cols))
    lines.append(f"{'linear in T':<28}" + "".join(f"{res[k]['linear']!s:>28}" for k, _ in cols))
    for key, name in COLUMNS:
        if "skipped" in res.get(key, {}):
            lines.append(f"{name}: skipped ({res[key]['skipped']})")
    return "\n".join(lines)


def conditions(dims: Dims, tokens) -> dict:
    import peft
    import transformers

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except Exception:  # noqa: BLE001
        bnb = None
    return {
        "dims": asdict(dims),
        "layers": 1,
        "batch": 1,
        "tokens": list(tokens),
        "dtype": "bfloat16",
        "lora": {"r": dims.r, "alpha": dims.r, "dropout": 0.0, "targets": TARGETS},
        "device": "cpu",
        "attention": "SDPA's own saved tensors excluded; flash-attention set (q, k, v as passed, O, fp32 lse) added",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "bitsandbytes": bnb},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs=2, default=(64, 128), help="the two sequence lengths")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "layer_memory.json")
    parser.add_argument("--no-hf-4bit", action="store_true", help="skip HF + bitsandbytes 4-bit")
    parser.add_argument("--no-checkpointing", action="store_true", help="skip the gradient-checkpointing runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    dims = LLAMA31_8B
    with tempfile.TemporaryDirectory() as tmp:
        print(f"writing a 1-layer Llama-3.1-8B-shaped bf16 checkpoint to {tmp} ...")
        folder = write_checkpoint(dims, Path(tmp) / "llama31-8b-1layer")
        results = measure_all(dims, folder, tuple(args.tokens), four_bit_hf=not args.no_hf_4bit,
                              checkpointing=not args.no_checkpointing)
    for bits in ("16bit", "4bit"):
        print()
        print(table(bits, results[bits]))
    sdpa = results["16bit"]["hf"].get("sdpa_inputs", [])
    if sdpa:
        print(f"\nHF passed SDPA q {sdpa[0]['q']}, k {sdpa[0]['k']}, v {sdpa[0]['v']}, enable_gqa={sdpa[0]['enable_gqa']}")
    for key, name in COLUMNS:
        for r in results["16bit"][key].get("reused_storages", []):
            print(f"{name}: {r['saved_at']} saved {r['shape']} = the storage counted at {r['counted_at']}")
    if "checkpointing" in results:
        ck = results["checkpointing"]
        print("\ngradient checkpointing on: bytes/token kept per layer between forward and backward")
        for key, name in COLUMNS[:2]:
            if key in ck:
                print(f"  {name:<18} {ck[key]['total_per_token']:>8,} (the layer input)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"conditions": conditions(dims, args.tokens), "results": results}, indent=1) + "\n")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
