"""Proof that exported GGUF files work: llama.cpp (llama-cpp-python) loads every type and agrees with the engine.

llama-cpp-python is a test dependency (built from source with the CMAKE_ARGS in the Makefile).
Measured numbers are printed (run with ``-s``) and summarised in docs/export.md.
"""

from __future__ import annotations

import ctypes

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize

from engine.data.load import load_jsonl
from engine import FastModel
from engine.gguf.quants import quantize

HIGH_PRECISION = ("f16", "bf16", "q8_0")
QUANTIZED = ("q4_0", "q4_1", "q5_0", "q5_1", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q3_k_m")
#: llama.cpp's own file types for the K-quant files we compare against.
LLAMA_FTYPES = {
    "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
}


def held_out_tokens(tokenizer, n: int = 320) -> list[int]:
    """A fixed held-out text: eval conversations of the shipped data, rendered with the chat template."""
    ids: list[int] = []
    for row in load_jsonl("eval", "sft"):
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            return ids[:n]
    raise AssertionError("not enough held-out text")


def load_llama(path, **kwargs) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2, **kwargs)


def llama_logits(path, tokens: list[int], **kwargs) -> np.ndarray:
    """llama.cpp's logits ``[len(tokens), V]`` for every position of ``tokens``."""
    llm = load_llama(path, **kwargs)
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return out


WINDOW = 512
N_WINDOWS = 4


def nll_sum(logits: np.ndarray, tokens: list[int]) -> tuple[float, int]:
    """Summed NLL of token t+1 given the prefix, from logits ``[n, V]``, and the number of predictions."""
    z = torch.from_numpy(logits[:-1]).double()
    return float(torch.nn.functional.cross_entropy(z, torch.tensor(tokens[1:]), reduction="sum")), len(tokens) - 1


def windows(tokenizer) -> list[list[int]]:
    """N_WINDOWS windows of WINDOW held-out tokens (perplexity over 2,044 predictions, stable to ~0.1%)."""
    ids = held_out_tokens(tokenizer, WINDOW * N_WINDOWS)
    return [ids[i * WINDOW : (i + 1) * WINDOW] for i in range(N_WINDOWS)]


def llama_perplexity(path, chunks: list[list[int]]) -> float:
    llm = load_llama(path)
    total = count = 0
    for chunk in chunks:
        llm.reset()
        llm.eval(chunk)
        s, n = nll_sum(np.array(llm.scores[: len(chunk)], dtype=np.float32), chunk)
        total, count = total + s, count + n
    llm.close()
    return float(np.exp(total / count))


def engine_perplexity(model, chunks: list[list[int]]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor(chunks)).logits.float().numpy()
    sums = [nll_sum(lg, chunk) for lg, chunk in zip(logits, chunks)]
    return float(np.exp(sum(s for s, _ in sums) / sum(n for _, n in sums)))


@pytest.fixture(scope="module")
def smollm2_export(smollm2_path, tmp_path_factory):
    """The real SmolLM2-135M-Instruct (fp32 in the engine) exported to every type."""
    model, tokenizer = FastModel.from_pretrained(smollm2_path, dtype="float32", max_seq_length=512, verbose=False)
    out = tmp_path_factory.mktemp("smollm2_gguf")
    paths = model.save_pretrained_gguf(out, tokenizer, quantization_method=[*HIGH_PRECISION, *QUANTIZED])
    files = {method: path for method, path in zip([*HIGH_PRECISION, *QUANTIZED], paths)}
    return model, tokenizer, files


@pytest.fixture(scope="module")
def engine_logits(smollm2_export):
    model, tokenizer, _ = smollm2_export
    tokens = held_out_tokens(tokenizer)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float().numpy()
    return tokens, logits


def engine_logits_of_file(path, tokens: list[int]) -> np.ndarray:
    """The engine's logits for the weights stored in ``path`` (read back with our GGUF reader, computed in fp32)."""
    model, _ = FastModel.from_pretrained(str(path), dtype="float32", max_seq_length=512, verbose=False)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


@pytest.mark.slow
@pytest.mark.parametrize("method", HIGH_PRECISION)
def test_llama_cpp_logits_match_engine(smollm2_export, engine_logits, method):
    """llama.cpp runs our file as the engine runs the same weights: top-1 equal on every position (f16), or
    differing only at near-ties (bf16, q8_0: llama.cpp rounds the activations too)."""
    _, _, files = smollm2_export
    tokens, original = engine_logits
    theirs = llama_logits(files[method], tokens)
    ours = engine_logits_of_file(files[method], tokens)
    diff = np.abs(theirs - ours)
    top1 = (theirs.argmax(-1) == ours.argmax(-1)).mean()
    top1_original = (theirs.argmax(-1) == original.argmax(-1)).mean()
    print(f"\n{method}: top-1 agreement with the engine on the same weights {top1:.4f} over {len(tokens)} positions, "
          f"max |logit diff| {diff.max():.4f} (logit scale {np.abs(ours).max():.1f}); "
          f"vs the fp32 original: top-1 {top1_original:.4f}, max |diff| {np.abs(theirs - original).max():.4f}")
    if method in ("q8_0", "bf16"):
        # llama.cpp multiplies q8_0 / bf16 weights with activations rounded to q8_0 / bf16 (the engine keeps them
        # in fp32), so near-ties may flip (bf16: 0 flips with llama.cpp's AVX-512 kernels, 2 of 320 with the
        # portable AVX2 build): every disagreement must be at a position whose top-2 margin is below the difference.
        top2 = np.sort(ours, axis=-1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        flipped = theirs.argmax(-1) != ours.argmax(-1)
        print(f"{method}: {flipped.sum()} near-tie flips, margins there {np.round(margin[flipped], 3).tolist()}")
        assert (margin[flipped] < diff.max()).all() and top1 >= {"q8_0": 0.97, "bf16": 0.99}[method]
    else:
        assert top1 == 1.0
    # llama.cpp computes bf16/q8_0 matmuls with activations rounded to bf16/q8_0 (the engine reads the weights
    # back in fp32), so those differ more than f16; measured: f16 0.08, bf16 0.48 on a logit scale of 42.
    assert diff.max() < {"f16": 0.2, "bf16": 0.75, "q8_0": 2.5}[method]
    assert top1_original >= (0.97 if method == "q8_0" else 0.99)


@pytest.mark.slow
def test_quantized_perplexity_equals_llama_cpps_own_quantization(smollm2_export, tmp_path):
    model, tokenizer, files = smollm2_export
    chunks = windows(tokenizer)
    table = {"engine (fp32)": engine_perplexity(model, chunks)}
    for method in ("f16", "q8_0", *QUANTIZED):
        table[method] = llama_perplexity(files[method], chunks)
    # llama.cpp quantizes the same fp32 weights our export starts from (quantizing our f16 file instead would
    # start from f16-rounded weights, and the comparison would measure that rounding, not the quantizers).
    (f32,) = model.save_pretrained_gguf(tmp_path / "f32", tokenizer, quantization_method="f32")
    for method, ftype in LLAMA_FTYPES.items():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        out = tmp_path / f"llama-cpp-{method}.gguf"
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
        table[f"llama.cpp {method}"] = llama_perplexity(out, chunks)
    print("\n" + "\n".join(f"{k:>18}: {v:.4f}" for k, v in table.items()))
    assert table["f16"] == pytest.approx(table["engine (fp32)"], rel=0.01)
    for method in LLAMA_FTYPES:  # the same weights, the same bytes (measured: equal to 4 decimals)
        assert table[method] == pytest.approx(table[f"llama.cpp {method}"], rel=1e-4), (method, table)
    for method in QUANTIZED:
        assert table[method] < table["f16"] * 1.5, (method, table)


LLAMA_FTYPES_ALL = {
    **LLAMA_FTYPES,
    "q4_k_s": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "q3_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "q2_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,  # not an export method of ours: compared at the quantizer level
}
#: The K-quant export methods (every one of them is compared with llama.cpp byte for byte).
K_METHODS = ("q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q3_k_m")
K_TYPES = (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)


def llama_cpp_quantize(src, dst, method: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES_ALL[method]
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


def read_tensors(path) -> dict:
    """``{name: (type, float32 array [rows, cols] dequantized with gguf-py)}``."""
    tensors = GGUFReader(str(path)).tensors
    return {t.name: (t.tensor_type, dequantize(t.data, t.tensor_type).astype(np.float32)) for t in tensors}


def read_blocks(path) -> dict:
    """``{name: (type, raw bytes as uint8 [n_blocks, type_size])}`` straight from the file (gguf-py's reader)."""
    out = {}
    for t in GGUFReader(str(path)).tensors:
        _, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        out[t.name] = (t.tensor_type, np.ascontiguousarray(t.data).view(np.uint8).reshape(-1, type_size))
    return out


@pytest.fixture(scope="module")
def wide_model():
    """A random Llama whose rows are multiples of 256 (hidden 256, MLP 768), so K-quants apply to every matrix.

    Vocabulary 2,048 and no tokenizer: ``llama_model_quantize`` needs no vocabulary, and gguf-py then reads a file in
    milliseconds (a 49,152-token vocabulary costs it ~14 s per file).
    """
    import tempfile

    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )
    with tempfile.TemporaryDirectory() as folder:
        transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
        model, _ = FastModel.from_pretrained(folder, dtype="float32", verbose=False)
    return model


@pytest.fixture(scope="module")
def k_quant_files(wide_model, tmp_path_factory):
    """Our f32 file and our K-quant exports of the wide model, and llama.cpp's quantization of that same f32 file to
    each method (and to q2_k): ``(f32, {method: ours}, {method: llama.cpp's})``. Both sides start from identical
    float32 weights, so their bytes can be compared."""
    out = tmp_path_factory.mktemp("kquants")
    with pytest.warns(UserWarning, match="without a tokenizer"):
        f32, *ours = wide_model.save_pretrained_gguf(out, None, quantization_method=["f32", *K_METHODS])
    theirs = {method: out / f"llama-cpp-{method}.gguf" for method in (*K_METHODS, "q2_k")}
    for method, path in theirs.items():
        llama_cpp_quantize(f32, path, method)
    return f32, dict(zip(K_METHODS, ours)), theirs


@pytest.mark.slow
@pytest.mark.parametrize("method", K_METHODS)
def test_k_quants_match_llama_cpp(k_quant_files, method):
    """Same per-tensor types as llama.cpp's own quantization of our f32 file, and no larger error per tensor."""
    f32, ours, theirs = k_quant_files
    reference, mine, llamas = read_tensors(f32), read_tensors(ours[method]), read_tensors(theirs[method])
    assert set(mine) == set(llamas)
    k_tensors = 0
    for name, (their_type, their_values) in llamas.items():
        my_type, my_values = mine[name]
        assert my_type == their_type, f"{name}: ours {my_type.name}, llama.cpp {their_type.name}"
        ref = reference[name][1]
        my_err = float(np.sqrt(np.mean((my_values - ref) ** 2)))
        their_err = float(np.sqrt(np.mean((their_values - ref) ** 2)))
        assert my_err <= their_err * 1.005 + 1e-8, f"{name} ({my_type.name}): rmse ours {my_err:.3e}, llama.cpp {their_err:.3e}"
        k_tensors += my_type.name.endswith("_K")
    assert k_tensors >= 10  # the comparison covered K-quant tensors, not only fallbacks


def _tally(table: dict, qtype, mine: np.ndarray, theirs: np.ndarray, ref: np.ndarray) -> None:
    """Add one tensor's blocks (uint8 [n_blocks, type_size], both sides) to ``table[qtype]``: identical blocks,
    blocks, and the squared errors of both sides' dequantized values against ``ref`` (float32)."""
    row = table.setdefault(qtype, [0, 0, 0.0, 0.0])
    row[0] += int((mine == theirs).all(axis=1).sum())
    row[1] += mine.shape[0]
    ref = ref.astype(np.float64).ravel()
    row[2] += float(np.sum((dequantize(mine, qtype).astype(np.float64).ravel() - ref) ** 2))
    row[3] += float(np.sum((dequantize(theirs, qtype).astype(np.float64).ravel() - ref) ** 2))


def _table_text(table: dict) -> str:
    lines = ["type  identical blocks          error ratio (our MSE / llama.cpp's)"]
    for qtype in K_TYPES:
        same, total, mine, theirs = table[qtype]
        lines.append(f"{qtype.name:<5} {same:>6}/{total:<6} = {same / total:.4f}   {mine / theirs:.6f}")
    return "\n".join(lines)


@pytest.mark.slow
def test_k_quant_bytes_equal_llama_cpp(k_quant_files):
    """Every tensor of our q6_k, q5_k_m, q4_k_m, q4_k_s and q3_k_m files has the bytes of llama.cpp's
    ``llama_model_quantize`` of the same f32 file; Q2_K (not an export method) is compared on the tensors llama.cpp
    makes Q2_K in its q2_k file, quantized with our ``quants.quantize``. Prints the share of identical blocks and
    the error ratio per K type."""
    f32, ours, theirs = k_quant_files
    reference = {name: values for name, (_, values) in read_tensors(f32).items()}
    table: dict = {}
    for method in K_METHODS:
        mine, llamas = read_blocks(ours[method]), read_blocks(theirs[method])
        assert set(mine) == set(llamas)
        for name, (their_type, their_blocks) in llamas.items():
            my_type, my_blocks = mine[name]
            assert my_type == their_type, f"{method} {name}: ours {my_type.name}, llama.cpp {their_type.name}"
            if my_type in K_TYPES:
                _tally(table, my_type, my_blocks, their_blocks, reference[name])
            else:  # the F32 norms
                assert np.array_equal(my_blocks, their_blocks), f"{method} {name} ({my_type.name})"
    for name, (qtype, their_blocks) in read_blocks(theirs["q2_k"]).items():
        if qtype == QT.Q2_K:
            mine = quantize(reference[name], QT.Q2_K).reshape(their_blocks.shape)
            _tally(table, qtype, mine, their_blocks, reference[name])
    text = _table_text(table)
    print("\n" + text)
    assert set(table) == set(K_TYPES), text
    for qtype, (same, total, my_sq, their_sq) in table.items():
        assert total >= 500, text  # enough blocks of every type to mean something
        assert same == total, text  # measured: 100% for every K type
        assert my_sq == their_sq, text


def _distributions() -> dict[str, np.ndarray]:
    """Weight distributions for the direct comparison with ggml's quantizer (128 super-blocks each)."""
    rng = np.random.default_rng(0)
    n = 256 * 128
    outliers = rng.standard_normal(n)
    outliers[::97] *= 40
    sub = n // 16
    return {
        "normal": rng.standard_normal(n),
        "student-t (3)": rng.standard_t(3, n),
        "outliers": outliers,
        "uniform [0, 1)": rng.random(n),
        "all negative": -np.abs(rng.standard_normal(n)) - 0.5,
        "sub-block scales 1e-6..1e2": rng.standard_normal(n) * np.repeat(10.0 ** rng.uniform(-6, 2, sub), 16),
        "90% zeros": rng.standard_normal(n) * (rng.random(n) < 0.1),
        "coarse grid (1/4)": np.round(rng.standard_normal(n) * 4) / 4,
        "constant / zero sub-blocks": np.repeat(rng.choice([0.0, 0.5, -0.25, 1e-3], sub), 16),
        "tiny (1e-9)": rng.standard_normal(n) * 1e-9,
    }


def ggml_quantize(x: np.ndarray, qtype) -> np.ndarray:
    """llama.cpp's ``ggml_quantize_chunk`` (the function ``llama_model_quantize`` calls, no importance matrix)
    on float32 ``x`` [rows, cols] -> uint8 [rows * cols / 256, type_size]."""
    from llama_cpp._ggml import libggml

    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.size // 256, type_size), dtype=np.uint8)
    libggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    written = libggml.ggml_quantize_chunk(
        ctypes.c_int(int(qtype)), x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p),
        ctypes.c_int64(0), ctypes.c_int64(x.shape[0]), ctypes.c_int64(x.shape[1]), None,
    )
    assert written == out.nbytes
    return out


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_quantizers_equal_ggml_on_varied_weights(qtype):
    """Our Q2_K..Q6_K quantizers give ggml's bytes on every block of ten weight distributions (heavy tails,
    outliers, all-positive/negative, mixed scales, zeros, constants, values on a grid, 1e-9)."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    for name, values in _distributions().items():
        x = values.astype(np.float32).reshape(-1, 1024)
        mine = quantize(x, qtype).reshape(-1, type_size)
        theirs = ggml_quantize(x, qtype)
        differ = np.flatnonzero((mine != theirs).any(axis=1))
        assert differ.size == 0, f"{name}: {differ.size} of {len(mine)} blocks differ (first: {differ[:5].tolist()})"


def lora_gguf_difference(folder, tmp_path, n_tokens: int, logits_of=None, tokenizer=None) -> tuple[float, float]:
    """Load ``folder``, add LoRA (non-zero B) and export base f16, merged f16 and the LoRA GGUF; in llama.cpp
    (``logits_of``, default :func:`llama_logits`) return ``(max |base + adapter - merged|, max |merged - base|)``."""
    logits_of = logits_of or llama_logits
    model, loaded_tokenizer = FastModel.from_pretrained(str(folder), dtype="float32", verbose=False)
    tokenizer = tokenizer or loaded_tokenizer
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0, use_gradient_checkpointing=False)
    torch.manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    from engine.peft import disable_adapter

    with disable_adapter(model):
        (base,) = model.save_pretrained_gguf(tmp_path / "base", tokenizer, quantization_method="f16")
    (merged,) = model.save_pretrained_gguf(tmp_path / "merged", tokenizer, quantization_method="f16")
    (adapter,) = model.save_pretrained_gguf(tmp_path / "lora", tokenizer, lora_only=True)
    tokens = held_out_tokens(tokenizer, n_tokens)
    with_adapter = logits_of(base, tokens, lora_path=str(adapter))
    merged_logits = logits_of(merged, tokens)
    base_logits = logits_of(base, tokens)
    return float(np.abs(with_adapter - merged_logits).max()), float(np.abs(merged_logits - base_logits).max())


@pytest.mark.slow
def test_lora_adapter_gguf_in_llama_cpp(tiny_chat_folder, tmp_path):
    """base f16 + our LoRA GGUF adapter in llama.cpp == our merged f16 export in llama.cpp."""
    diff, effect = lora_gguf_difference(tiny_chat_folder, tmp_path, 64)
    print(f"\nLoRA GGUF: max |adapter - merged| {diff:.4f}, adapter effect {effect:.4f}")
    assert effect > 0.5  # the adapter changes the logits
    assert diff < 0.05 * effect


NEAR_TIE = 0.2  # logits: llama.cpp's f16 arithmetic differs from the engine's fp32 by up to 0.08 (measured above)


@pytest.mark.slow
def test_fine_tuned_model_answers_the_same_in_llama_cpp(smollm2_path, tmp_path):
    """Fine-tune SmolLM2 (the demo), export f16: llama.cpp's greedy answers equal the engine's on the same weights.

    The engine generates from the exported file read back in fp32, so both sides run identical weights; a greedy
    path may then only diverge where the engine's top-2 logits are within llama.cpp's rounding (a near tie).
    """
    from engine.data.tasks import is_correct
    from engine.demo import chat_prompt_ids, main

    result = main(["--task", "unit_conversion", "--steps", "30", "--eval-rows", "2"])
    trained, tokenizer = result["model"], result["tokenizer"]
    (path,) = trained.save_pretrained_gguf(tmp_path, tokenizer, quantization_method="f16")
    model, _ = FastModel.from_pretrained(str(path), dtype="float32", max_seq_length=512, verbose=False)
    llm = load_llama(path)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = [r for r in load_jsonl("train", "sft") if r["task"] == "unit_conversion"][:8]
    agree = correct = 0
    for row in rows:
        prompt = chat_prompt_ids(tokenizer, row["prompt"])
        ours = model.generate(torch.tensor([prompt]), max_new_tokens=16, eos_token_id=[eos])[0, len(prompt) :].tolist()
        theirs = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            theirs.append(token)
            if token == eos or len(theirs) == 16:
                break
        ours_text = tokenizer.decode(ours, skip_special_tokens=True).strip()
        theirs_text = tokenizer.decode(theirs, skip_special_tokens=True).strip()
        print(f"{row['prompt']!r}: engine {ours_text!r}, llama.cpp {theirs_text!r}")
        correct += is_correct(row["task"], row["prompt"], theirs_text)
        if ours == theirs:
            agree += 1
            continue
        k = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ours[:k]])).logits[0, -1]
        margin = float(logits[ours[k]] - logits[theirs[k]])
        print(f"  diverged at answer token {k}: engine margin over llama.cpp's token {margin:.3f}")
        assert margin < NEAR_TIE, f"llama.cpp chose another token at a margin of {margin:.3f}: not a near tie"
    assert agree >= len(rows) - 1, f"only {agree}/{len(rows)} answers equal"
    assert correct >= len(rows) // 2  # the fine-tuning is what llama.cpp runs


SPM_TEXTS = [
    "Convert 60 km to m.",
    "  Sort these numbers: 584, 967 and 2!",
    "a  b   c",
    "Héllo wörld — naïve café, 東京 and 🙂 emoji",  # characters outside the training text: byte fallback
    "multiple   spaces\tand\nnew lines",
    "",
]


@pytest.fixture(scope="module")
def sentencepiece_folder(tmp_path_factory):
    """A Llama-2-style SentencePiece BPE tokenizer (byte fallback) trained on the shipped data, with a tiny Llama."""
    import io

    import sentencepiece
    import transformers

    texts = [f"{r['prompt']} {r['completion']}" for r in load_jsonl("train", "sft")[:400]]
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buffer, vocab_size=600, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Llama-2's tokenizer.model
    )
    folder = tmp_path_factory.mktemp("spm")
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())
    # transformers converts the SentencePiece model into a fast BPE tokenizer (this needs protobuf).
    tokenizer = transformers.LlamaTokenizer.from_pretrained(folder, add_bos_token=True)
    tokenizer.save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_sentencepiece_tokenizer_in_llama_cpp(sentencepiece_folder, tmp_path):
    """A SentencePiece BPE vocabulary is written as llama.cpp's 'llama' tokenizer and tokenizes as transformers."""
    import sentencepiece

    model, tokenizer = FastModel.from_pretrained(str(sentencepiece_folder), dtype="float32", verbose=False)
    (path,) = model.save_pretrained_gguf(tmp_path, tokenizer, quantization_method="f16", write_modelfile=False)
    fields = gguf.GGUFReader(path).fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    assert bool(fields["tokenizer.ggml.add_space_prefix"].parts[-1][0])
    scores = fields["tokenizer.ggml.scores"]
    assert len(scores.data) == len(tokenizer)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    spm = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_folder / "tokenizer.model"))
    byte_tokens = 0
    for text in SPM_TEXTS:
        expected = tokenizer(text)["input_ids"]
        assert expected[0] == tokenizer.bos_token_id
        if text.startswith(" "):
            # transformers' Metaspace adds no dummy prefix before a leading space; SentencePiece and llama.cpp
            # always do (a known transformers/SentencePiece difference): compare with SentencePiece itself.
            expected = [tokenizer.bos_token_id, *spm.encode(text)]
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        assert got == expected, f"{text!r}: llama.cpp {got}, transformers {expected}"
        # llama-cpp-python's piece-by-piece detokenize keeps SentencePiece's dummy-prefix space.
        assert llm.detokenize(got[1:]).decode("utf-8") == (" " + text if text else "")
        assert tokenizer.decode(expected[1:]) == text or text.startswith(" ")
        byte_tokens += sum(tokenizer.convert_ids_to_tokens(t).startswith("<0x") for t in expected)
    assert byte_tokens > 0  # the byte-fallback path was exercised
    llm.close()


def test_bpe_tokenizer_in_llama_cpp(tiny_chat_folder, tmp_path):
    """SmolLM2's byte-level BPE (with its pre-tokenizer id) tokenizes in llama.cpp as in transformers."""
    model, tokenizer = FastModel.from_pretrained(str(tiny_chat_folder), dtype="float32", verbose=False)
    (path,) = model.save_pretrained_gguf(tmp_path, tokenizer, quantization_method="f16", write_modelfile=False)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    rows = load_jsonl("eval", "sft")[:3]
    texts = [*SPM_TEXTS, *(tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows)]
    for text in texts:
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert got == expected, f"{text!r}: llama.cpp {got}, transformers {expected}"
    llm.close()


def test_f32_file_runs_in_llama_cpp(tiny_chat_folder, tmp_path):
    """The one type the SmolLM2 tests do not load (f32): llama.cpp's logits equal the engine's."""
    model, tokenizer = FastModel.from_pretrained(str(tiny_chat_folder), dtype="float32", verbose=False)
    (path,) = model.save_pretrained_gguf(tmp_path, tokenizer, quantization_method="f32", write_modelfile=False)
    tokens = held_out_tokens(tokenizer, 48)
    theirs = llama_logits(path, tokens)
    with torch.no_grad():
        ours = model(torch.tensor([tokens])).logits[0].float().numpy()
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    # llama.cpp keeps its KV cache in f16 by default: measured 0.024 on a logit scale of 9.3 (0.25%).
    assert np.abs(theirs - ours).max() < 1e-2 * max(1.0, float(np.abs(ours).max()))
