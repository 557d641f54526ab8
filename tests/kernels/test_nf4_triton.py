"""Tests of the Triton NF4 dequantization kernel (``kernels/nf4_triton.py``: ``_nf4_dequant_kernel``).

Every comparison is bit-exact (``torch.equal`` plus equal bit patterns), against

* the PyTorch path of :func:`nf4_dequantize` (``ENGINE_KERNELS=torch``), itself tested
  against bitsandbytes in ``test_nf4.py``;
* bitsandbytes' own ``dequantize_4bit`` on CPU, for weights quantized by bitsandbytes;
* the plain formula ``float32(NF4_CODE[nibble] * absmax)`` rounded by ``Tensor.to``, for
  hand-built bytes and scales that hit the rounding edge cases of the output cast.

Shapes are small (Triton's CPU interpreter runs them) but cover odd element counts (the
last low nibble is padding), partial last blocks, tiles split over several programs, block
sizes 32 / 64 / 128 / 4096 and double quantization over several 256-block absmax groups.
"""

from __future__ import annotations

import contextlib
import math
import re

import pytest
import torch

from engine_kernels import dispatch
from engine_kernels.nf4 import NF4_CODE, NF4Weight, from_bnb, nf4_dequantize, nf4_quantize
from engine_kernels.nf4_triton import _launch_config, _nf4_dequant_kernel, audit_launches, nf4_dequantize_triton

OUT_DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]

#: (shape, blocksize, double_quant): odd counts, partial blocks, several programs and absmax groups.
LAYOUTS = [
    pytest.param((3, 5), 64, False, id="3x5-b64"),  # odd, one partial block
    pytest.param((1, 1), 32, True, id="1x1-b32-dq"),  # a single element
    pytest.param((127, 33), 64, True, id="127x33-b64-dq"),  # odd, partial last block, 5 programs
    pytest.param((127, 33), 128, False, id="127x33-b128"),
    pytest.param((129, 131), 64, True, id="129x131-b64-dq"),  # odd, 265 blocks -> 2 absmax groups
    pytest.param((130, 264), 32, True, id="130x264-b32-dq"),  # 1073 blocks -> 5 groups, last partial
    pytest.param((64, 96), 128, True, id="64x96-b128-dq"),  # whole blocks, even
    pytest.param((3, 5000), 4096, True, id="3x5000-b4096-dq"),  # one block per program
]


def _weight(shape, dtype=torch.float32, seed=0, scale=0.02):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _quantized(shape, blocksize, double_quant, device, seed=0):
    """NF4 weight quantized on CPU (the PyTorch path), moved to ``device``."""
    w = _weight(shape, seed=seed)
    if double_quant:  # spread the block scales so the 256-block groups get different scales
        gen = torch.Generator().manual_seed(seed + 1)
        w = w * (1.0 + 10.0 * torch.rand(w.numel() // blocksize + 1, generator=gen)).repeat_interleave(blocksize)[
            : w.numel()
        ].view(shape)
    return nf4_quantize(w, blocksize=blocksize, double_quant=double_quant).to(device)


def _torch_path(q, dtype, monkeypatch):
    """``nf4_dequantize`` through the PyTorch implementation (checked via record_backends)."""
    with monkeypatch.context() as m:
        m.setenv(dispatch.ENV_VAR, "torch")
        with dispatch.record_backends() as used:
            ref = nf4_dequantize(q, dtype)
    assert used == {"nf4_dequantize": {"torch"}}
    return ref


def _triton_path(q, dtype, out=None):
    """``nf4_dequantize`` as dispatched under the ``triton_backend`` fixture; asserts it ran Triton."""
    with dispatch.record_backends() as used:
        result = nf4_dequantize(q, dtype, out=out)
    assert used == {"nf4_dequantize": {"triton"}}, used
    return result


def _assert_bit_equal(actual, expected):
    """Same shape, dtype and bit patterns (so also +0.0 vs -0.0); reports the first difference."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    a = actual.detach().cpu().reshape(-1)
    e = expected.detach().cpu().reshape(-1)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    differ = a.view(bits) != e.view(bits)
    if differ.any():
        first = int(differ.nonzero()[0])
        raise AssertionError(
            f"{int(differ.sum())}/{differ.numel()} values differ; first at flat index {first}: "
            f"{a[first].item()!r} vs expected {e[first].item()!r}"
        )
    assert torch.equal(actual.cpu(), expected.cpu())


# --------------------------------------------------------------------------- against the PyTorch path


@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize(("shape", "blocksize", "double_quant"), LAYOUTS)
def test_matches_torch_path(triton_backend, monkeypatch, shape, blocksize, double_quant, dtype):
    q = _quantized(shape, blocksize, double_quant, triton_backend, seed=sum(shape))
    assert q.double_quant == double_quant
    if double_quant and q.n_blocks > 256:  # the test exercises several absmax groups
        assert q.absmax_scale.numel() > 1 and q.absmax_scale.unique().numel() > 1
    ref = _torch_path(q, dtype, monkeypatch)
    ours = _triton_path(q, dtype)
    assert ours.device == q.device
    _assert_bit_equal(ours, ref)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_default_dtype_and_formula(triton_backend, double_quant):
    # independent of both implementations: float32(code[nibble] * block_absmax) -> cast
    w = _weight((33, 77), torch.bfloat16, seed=3, scale=3.0)  # odd numel, partial last block
    q = nf4_quantize(w, double_quant=double_quant).to(triton_backend)
    ours = _triton_path(q, None)
    assert ours.dtype == torch.bfloat16 and ours.shape == w.shape
    packed = q.packed.cpu()
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: w.numel()].long()
    scales = q.block_absmax().cpu().repeat_interleave(64)[: w.numel()]
    expected32 = (NF4_CODE[nibbles] * scales).view(w.shape)
    _assert_bit_equal(_triton_path(q, torch.float32), expected32)
    _assert_bit_equal(ours, expected32.to(torch.bfloat16))
    _assert_bit_equal(_triton_path(q, torch.float64), expected32.double())  # float64 output: exact


# --------------------------------------------------------------------------- against bitsandbytes


@contextlib.contextmanager
def _force_eager():
    """bnb wraps its PyTorch fallback in torch.compile; run it eagerly (same ops)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    with set_stance("force_eager") if set_stance is not None else contextlib.nullcontext():
        yield


def _bnb_dequantize(bnb_functional, packed, state):
    """bitsandbytes' CPU dequantization (its native kernel only where it is correct; see test_nf4.py)."""
    shape = torch.Size(state.shape)
    if shape[-1] % 2 == 0 and shape[-1] % state.blocksize == 0:
        with _force_eager():
            return bnb_functional.dequantize_4bit(packed, state, quant_type="nf4").reshape(shape)
    from bitsandbytes.backends.default import ops as default_ops

    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = bnb_functional.get_4bit_type("nf4", device=packed.device)
    with _force_eager():
        out = default_ops._dequantize_4bit_compute(packed.view(-1), absmax, code, state.blocksize, shape, state.dtype)
    return out.reshape(shape)


@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize(
    ("shape", "blocksize", "double_quant"),
    [
        pytest.param((3, 5), 64, False, id="3x5-b64"),
        pytest.param((127, 33), 64, True, id="127x33-b64-dq"),
        pytest.param((129, 131), 64, True, id="129x131-b64-dq"),  # 2 absmax groups
        pytest.param((64, 96), 128, False, id="64x96-b128"),  # bnb's native kernel
        pytest.param((130, 80), 32, True, id="130x80-b32-dq"),  # 325 blocks straddling rows
        pytest.param((48, 256), 32, True, id="48x256-b32-dq"),  # native kernel, 384 blocks
    ],
)
def test_matches_bitsandbytes(triton_backend, shape, blocksize, double_quant, dtype):
    import bitsandbytes.functional as bnb_functional  # the oracle: must be installed
    w = _weight(shape, dtype, seed=len(shape) + shape[0])
    packed, state = bnb_functional.quantize_4bit(
        w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant
    )
    ref = _bnb_dequantize(bnb_functional, packed, state)
    q = from_bnb(packed, state).to(triton_backend)  # bnb's bytes and scales, decoded by our kernel
    ours = _triton_path(q, None)
    assert ours.dtype == dtype
    _assert_bit_equal(ours, ref)


# --------------------------------------------------------------------------- rounding of the output cast


def _from_bits(bits: list[int]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


#: float32 bit patterns at the edges of the bf16 / fp16 casts: ties (even and odd), just off
#: ties, the largest values, overflow to inf, denormals (fp32 and fp16), exact values.
EDGE_BITS = [
    0x3F808000,  # 1 + 2**-8: bf16 tie, rounds down to even
    0x3F818000,  # bf16 tie, rounds up to even
    0x3F808001,  # just above a tie
    0x3F807FFF,  # just below a tie
    0x3F7FFFFF,  # rounds up across a power of two
    0x7F7FFFFF,  # float32 max: bf16 rounds to inf
    0x7F7F7FFF,  # just below bf16's max + half ulp
    0x477FEFFF,  # just below fp16 max + half ulp (65519.996)
    0x477FF000,  # 65520: fp16 overflows to inf
    0x00008000,  # float32 denormal, bf16 tie
    0x00018000,  # float32 denormal, bf16 tie rounding up
    0x00000001,  # smallest float32 denormal
    0x33800000,  # 2**-24: smallest fp16 denormal
    0x33000000,  # 2**-25: fp16 tie with zero
    0x3F800000,  # 1.0
    0x00000000,  # 0.0
]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # interpreter: fp16 -> inf
@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_cast_rounding_edge_cases(triton_backend, monkeypatch, dtype):
    # Element 2k is +absmax[k] (nibble 15 is +1.0), element 2k+1 is -absmax[k] (nibble 0 is -1.0):
    # the products are exact, so the output is exactly absmax cast to dtype.
    blocksize = 32
    scales = _from_bits(EDGE_BITS)  # one block per edge case
    numel = len(EDGE_BITS) * blocksize - 1  # odd: the last low nibble is padding
    packed = torch.full(((numel + 1) // 2,), 0xF0, dtype=torch.uint8)
    q = NF4Weight(packed=packed, absmax=scales, shape=torch.Size([numel]), dtype=torch.float32, blocksize=blocksize)
    per_byte = scales.repeat_interleave(blocksize // 2)
    expected32 = torch.stack([per_byte, -per_byte], dim=1).reshape(-1)[:numel]
    q = q.to(triton_backend)
    ours = _triton_path(q, dtype)
    _assert_bit_equal(ours, expected32.to(dtype))
    _assert_bit_equal(ours, _torch_path(q, dtype, monkeypatch))


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # interpreter: 0 * inf
def test_non_finite_blocks(triton_backend, monkeypatch):
    w = _weight((16, 64), seed=6)
    flat = w.view(-1)
    flat[130] = float("inf")  # block 2: absmax inf -> +-inf, and NaN (0 * inf) for code 7
    flat[650] = float("nan")  # block 10: absmax NaN -> all NaN
    q = nf4_quantize(w).to(triton_backend)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ours = _triton_path(q, dtype).cpu().view(16, 64)
        ref = _torch_path(q, dtype, monkeypatch).cpu().view(16, 64)
        assert torch.equal(ours.isnan(), ref.isnan())
        assert bool(ours[2].isinf().any()) and bool(ours[2].isnan().any()) and bool(ours[10].isnan().all())
        assert torch.equal(ours.nan_to_num(nan=7.0), ref.nan_to_num(nan=7.0))
        finite_blocks = [b for b in range(16) if b not in (2, 10)]
        assert bool(torch.isfinite(ours[finite_blocks]).all())


# --------------------------------------------------------------------------- out= buffer reuse


@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_out_buffer_is_reused(triton_backend, monkeypatch, double_quant, dtype):
    shape = (37, 71)  # odd numel
    q1 = _quantized(shape, 64, double_quant, triton_backend, seed=1)
    q2 = _quantized(shape, 64, double_quant, triton_backend, seed=2)
    buf = torch.full(shape, float("nan"), dtype=dtype, device=triton_backend)
    ptr = buf.data_ptr()

    res = _triton_path(q1, None, out=buf)  # dtype defaults to out.dtype
    assert res is buf and res.data_ptr() == ptr
    _assert_bit_equal(res, _torch_path(q1, dtype, monkeypatch))

    res2 = nf4_dequantize_triton(q2, dtype, buf)  # the launch wrapper itself, same buffer
    assert res2 is buf and res2.data_ptr() == ptr
    _assert_bit_equal(res2, _torch_path(q2, dtype, monkeypatch))


def test_out_buffer_in_a_larger_storage(triton_backend, monkeypatch):
    # out may start at any offset of its storage; nothing outside it is written
    q = _quantized((5, 63), 64, True, triton_backend)
    storage = torch.full((5 * 63 + 3,), -3.0, dtype=torch.bfloat16, device=triton_backend)
    view = storage[1 : 1 + 5 * 63].view(5, 63)
    assert _triton_path(q, None, out=view) is view
    _assert_bit_equal(view, _torch_path(q, torch.bfloat16, monkeypatch))
    assert storage[0].item() == -3.0 and storage[-2:].tolist() == [-3.0, -3.0]


def test_validation_still_applies(triton_backend):
    from engine_kernels.errors import ConfigurationError

    q = _quantized((8, 64), 64, False, triton_backend)
    with pytest.raises(ConfigurationError, match="shape"):
        nf4_dequantize(q, out=torch.empty(64, 8, device=triton_backend))
    with pytest.raises(ConfigurationError):
        nf4_dequantize(q, out=torch.empty(64, 8, device=triton_backend).t())
    with pytest.raises(ConfigurationError):
        nf4_dequantize(q, dtype=torch.int32)
    broken = _quantized((8, 64), 64, True, triton_backend)
    broken.absmax_scale = None
    with pytest.raises(ConfigurationError, match="absmax_scale"):
        nf4_dequantize(broken)


# --------------------------------------------------------------------------- dispatch


def test_dispatch_picks_triton_only_when_asked(triton_backend, monkeypatch):
    q = _quantized((16, 64), 64, True, triton_backend)
    triton_out = _triton_path(q, torch.bfloat16)  # asserts {"triton"} was recorded
    monkeypatch.delenv(dispatch.ENV_VAR)
    expected = "triton" if triton_backend.type == "cuda" else "torch"  # automatic choice
    with dispatch.record_backends() as used:
        auto_out = nf4_dequantize(q, torch.bfloat16)
    assert used == {"nf4_dequantize": {expected}}
    _assert_bit_equal(triton_out, auto_out)


# --------------------------------------------------------------------------- launch config and audit


@pytest.mark.parametrize("element_size", [2, 4, 8])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("numel", [1, 15, 4159, 1536 * 576, 14336 * 4096])
def test_launch_config(numel, blocksize, element_size):
    block_bytes, num_warps = _launch_config(numel, blocksize, element_size)
    assert block_bytes & (block_bytes - 1) == 0  # power of two ...
    assert block_bytes % (blocksize // 2) == 0  # ... holding whole blocks
    assert 1 <= num_warps <= 8 and num_warps & (num_warps - 1) == 0
    if blocksize // 2 < block_bytes:
        assert block_bytes <= 2 * math.ceil(numel / 2)  # no tile far larger than the weight
    if numel >= 2**20 and blocksize <= 64:  # large weights: one 16-byte store per thread, 8 warps
        assert num_warps == 8
        assert 2 * block_bytes * element_size == 16 * 32 * num_warps


def test_audit_launches_describe_the_kernel():
    launches = audit_launches()
    assert len(launches) == 3 * 3 * 2  # 3 weights x 3 output dtypes x plain / dq
    arg_names = list(_nf4_dequant_kernel.arg_names)
    for launch in launches:
        assert launch.op == "nf4_dequantize" and launch.kernel is _nf4_dequant_kernel
        assert list(launch.signature) + list(launch.constexprs) == arg_names
        dq = launch.constexprs["DOUBLE_QUANT"]
        assert launch.signature["absmax_ptr"] == ("*u8" if dq else "*fp32")
        assert launch.shape.endswith(" dq") == dq
        assert launch.signature["numel"] == "i32"
        out_size = {"*bf16": 2, "*fp16": 2, "*fp32": 4}[launch.signature["out_ptr"]]
        dims = next(token for token in launch.shape.split() if re.fullmatch(r"\d+x\d+", token))
        numel = math.prod(int(d) for d in dims.split("x"))
        assert (launch.constexprs["BLOCK_BYTES"], launch.num_warps) == _launch_config(numel, 64, out_size)
    shapes = {launch.shape for launch in launches}
    assert "llama-3.1-8b mlp 14336x4096 bf16 dq" in shapes and "smollm2 mlp 1536x576 fp32" in shapes
