"""Tests of kernels/nf4.py: byte-exact agreement with bitsandbytes on CPU, plus API behaviour.

Reference semantics. Packed bytes, absmax and the double-quantization state are
compared with ``bitsandbytes.functional.quantize_4bit`` exactly (no tolerance).
Dequantized values are compared exactly with ``bitsandbytes.functional.dequantize_4bit``
wherever bnb's CPU path is self-consistent. One known exception (bitsandbytes
0.50.x): the *native* CPU dequantization kernel (used when the last dimension is
even) assigns scales per row, which is wrong when the last dimension is not a
multiple of the blocksize (blocks then straddle rows; e.g. shape (3, 80) at
blocksize 64) -- it produces errors far larger than the quantization step. For
those shapes the reference is bnb's own pure-PyTorch ``dequantize_4bit`` kernel
(the "default" backend, also what bnb runs for odd last dimensions), which
follows the same flat-block layout as bnb's quantizer and CUDA kernels.
"""

from __future__ import annotations

import contextlib
import math
import time

import bitsandbytes.functional as bnb_functional  # the oracle: a missing bitsandbytes fails the tests
import pytest
import torch

from engine_kernels.errors import ConfigurationError
from engine_kernels.nf4 import (
    ABSMAX_BLOCKSIZE,
    NF4_CODE,
    NF4Weight,
    dynamic_map,
    from_bnb,
    nf4_dequantize,
    nf4_quantize,
    to_bnb_quant_state_dict,
)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(576, 1536), (3, 80), (1000, 7)]


def _weight(shape, dtype, seed=0, scale=0.02):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _bnb_quantize(w, blocksize=64, double_quant=False):
    packed, state = bnb_functional.quantize_4bit(
        w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant
    )
    return packed, state


def _bnb_block_absmax(state):
    if not state.nested:
        return state.absmax
    absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2)
    return absmax + state.offset


def _force_eager():
    """bnb wraps its PyTorch fallback in torch.compile; run it eagerly (fast, same ops)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _bnb_dequantize(packed, state):
    """What bitsandbytes returns for dequantize_4bit on CPU (see module docstring)."""
    shape = torch.Size(state.shape)
    last = shape[-1]
    if last % 2 == 0 and last % state.blocksize == 0:  # native kernel, rows made of whole blocks
        with _force_eager():  # (bnb falls back to its PyTorch kernel for blocksize >= 2048)
            return bnb_functional.dequantize_4bit(packed, state, quant_type="nf4").reshape(shape)
    from bitsandbytes.backends.default import ops as default_ops

    code = bnb_functional.get_4bit_type("nf4", device=packed.device)
    with _force_eager():
        out = default_ops._dequantize_4bit_compute(
            packed.view(-1), _bnb_block_absmax(state), code, state.blocksize, shape, state.dtype
        )
    return out.reshape(shape)


def _assert_same_as_bnb(w, q, packed, state):
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(w.numel() / 2), 1)
    assert q.packed.shape == (math.ceil(w.numel() / 2),)
    assert torch.equal(q.packed, packed.view(-1)), f"{(q.packed != packed.view(-1)).sum()} packed bytes differ"
    assert q.shape == w.shape and q.dtype == w.dtype and q.blocksize == state.blocksize
    assert q.absmax.dtype == state.absmax.dtype
    assert torch.equal(q.absmax, state.absmax)
    assert q.double_quant == state.nested
    if state.nested:
        assert q.absmax.dtype == torch.uint8
        assert torch.equal(q.absmax_code, state.state2.code)
        assert q.absmax_scale.dtype == torch.float32
        assert torch.equal(q.absmax_scale, state.state2.absmax)
        assert q.absmax_offset.dtype == torch.float32 and q.absmax_offset.dim() == 0
        assert torch.equal(q.absmax_offset, state.offset)
    else:
        assert q.absmax.dtype == torch.float32
        assert q.absmax_code is None and q.absmax_scale is None and q.absmax_offset is None
    assert torch.equal(q.block_absmax(), _bnb_block_absmax(state))

    ours = nf4_dequantize(q)
    ref = _bnb_dequantize(packed, state)
    assert ours.shape == w.shape and ours.dtype == w.dtype
    assert torch.equal(ours, ref), f"{(ours != ref).sum()} dequantized values differ"


# --------------------------------------------------------------------------- tables


def test_code_tables_match_bnb():
    assert NF4_CODE.dtype == torch.float32 and NF4_CODE.shape == (16,)
    assert torch.equal(NF4_CODE, bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert NF4_CODE[7] == 0.0 and NF4_CODE[0] == -1.0 and NF4_CODE[15] == 1.0
    dyn = dynamic_map()
    assert dyn.dtype == torch.float32 and dyn.shape == (256,)
    assert torch.equal(dyn, bnb_functional.create_dynamic_map())


# --------------------------------------------------------------------------- bnb equality


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_bnb(shape, dtype, double_quant):
    w = _weight(shape, dtype, seed=sum(shape) + DTYPES.index(dtype))
    packed, state = _bnb_quantize(w, double_quant=double_quant)
    q = nf4_quantize(w, double_quant=double_quant)
    _assert_same_as_bnb(w, q, packed, state)


@pytest.mark.parametrize(
    ("shape", "blocksize", "double_quant"),
    [
        ((300, 192), 256, True),  # blocks straddle rows, 225 blocks (one partial absmax group)
        ((130, 512), 32, True),  # 2080 blocks -> 9 absmax groups, last one partial
        ((64, 96), 128, False),
        ((8, 4096), 4096, True),
        ((5,), 64, False),  # 1-D, odd, a single partial block
        ((64,), 64, True),  # single block: centred absmax is 0 -> scale 0, code 0
        ((1, 1), 32, True),
        ((2, 3, 40), 64, True),  # 3-D
    ],
)
def test_matches_bnb_other_layouts(shape, blocksize, double_quant):
    w = _weight(shape, torch.bfloat16, seed=7, scale=1.0)
    packed, state = _bnb_quantize(w, blocksize=blocksize, double_quant=double_quant)
    q = nf4_quantize(w, blocksize=blocksize, double_quant=double_quant)
    _assert_same_as_bnb(w, q, packed, state)


def test_matches_bnb_with_zero_blocks_outliers_and_ties():
    # zero blocks (absmax 0), a zero partial block (absmax clamped to 1e-38),
    # values exactly on NF4 decision midpoints, and heavy-tailed outliers.
    w = _weight((40, 70), torch.float32, seed=3)
    flat = w.view(-1)
    flat[64:128] = 0.0
    flat[-(2800 % 64) :] = 0.0
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    flat[128] = 1.0  # block absmax exactly 1 -> the midpoints below are exact ties
    flat[129 : 129 + 15] = mids
    flat[144 : 144 + 15] = -mids
    flat[500] = 3.0
    flat[777] = -5.0
    for double_quant in (False, True):
        packed, state = _bnb_quantize(w, double_quant=double_quant)
        q = nf4_quantize(w, double_quant=double_quant)
        _assert_same_as_bnb(w, q, packed, state)
    # ties go to the lower code: midpoint k lies between codes k and k + 1
    codes = _unpack(nf4_quantize(w).packed)[129 : 129 + 15]
    assert codes.tolist() == list(range(15))


def test_non_contiguous_weight_matches_bnb():
    base = _weight((96, 64), torch.float16, seed=11)
    w = base.t()  # non-contiguous, logical row-major order is what counts
    packed, state = _bnb_quantize(w, double_quant=True)
    q = nf4_quantize(w, double_quant=True)
    _assert_same_as_bnb(w, q, packed, state)
    assert torch.equal(q.packed, nf4_quantize(w.contiguous(), double_quant=True).packed)


# --------------------------------------------------------------------------- layout / numerics (bnb-independent)


def test_code_search_equals_bucketize_at_edges():
    from engine_kernels import nf4 as nf4_module

    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    edges = -1.0 + torch.arange(4097, dtype=torch.float32) * (2.0 / 4096)
    special = torch.cat(
        [
            mids,
            torch.nextafter(mids, up),
            torch.nextafter(mids, down),
            edges,
            torch.nextafter(edges, up).clamp(max=1.0),
            torch.nextafter(edges, down).clamp(min=-1.0),
            NF4_CODE,
            torch.tensor([0.0, -0.0, 1.0, -1.0]),
        ]
    )
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([special, torch.rand(200_000, generator=gen) * 2 - 1])
    codes = nf4_module._nf4_codes(values)
    assert codes.dtype == torch.uint8
    assert torch.equal(codes.long(), torch.bucketize(values, mids))



def _unpack(packed):
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)


def test_nibble_order_padding_and_exact_codes():
    # every block holds +2**k (so absmax is a power of two) and codes chosen at
    # random; values c[code] * 2**k are exactly representable -> exact round trip.
    gen = torch.Generator().manual_seed(5)
    n = 64 * 9 + 33  # odd, partial last block
    codes = torch.randint(0, 16, (n,), generator=gen)
    codes[::64] = 15
    codes[-33] = 15
    scale = 2.0 ** torch.randint(-8, 3, (math.ceil(n / 64),), generator=gen).float()
    w = NF4_CODE[codes] * scale.repeat_interleave(64)[:n]
    q = nf4_quantize(w)
    assert q.packed.numel() == (n + 1) // 2
    assert torch.equal(_unpack(q.packed)[:n], codes.to(torch.uint8))
    assert q.packed[0].item() >> 4 == codes[0].item()  # first element in the high nibble
    assert q.packed[-1].item() & 0xF == 7  # odd count: pad nibble is the code of 0.0
    assert torch.equal(q.absmax, scale)
    assert torch.equal(nf4_dequantize(q), w)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_round_trip_error(double_quant):
    w = _weight((576, 1536), torch.float32, seed=1)
    q = nf4_quantize(w, double_quant=double_quant)
    x_hat = nf4_dequantize(q)
    err = (x_hat - w).abs()
    # NF4 on Gaussian data: relative RMS error around 0.1
    rel_rms = (err.pow(2).mean() / w.pow(2).mean()).sqrt().item()
    assert rel_rms < 0.12, rel_rms
    # each value is within half the largest code gap (1 - 0.7230) of its block scale
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max().item() / 2
    block_scale = q.block_absmax().repeat_interleave(64).view_as(w)
    true_scale = w.view(-1, 64).abs().amax(1).repeat_interleave(64).view_as(w)
    # |x - c*a_hat| <= |x - c*a| + |c| * |a - a_hat|, plus float32 rounding slack
    bound = half_gap * true_scale + (block_scale - true_scale).abs() + 1e-6 * true_scale
    assert bool((err <= bound).all())
    if double_quant:  # 8-bit absmax stays close to the real one
        assert (q.block_absmax() - w.view(-1, 64).abs().amax(1)).abs().max() < 1e-2 * w.abs().max()


def test_dequantize_computes_in_fp32_then_casts():
    w = _weight((33, 64), torch.bfloat16, seed=2, scale=3.0)
    q = nf4_quantize(w, double_quant=True)
    ref32 = nf4_dequantize(q, torch.float32)
    manual = NF4_CODE[_unpack(q.packed)[: w.numel()].long()] * q.block_absmax().repeat_interleave(64)
    assert torch.equal(ref32.view(-1), manual)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert torch.equal(nf4_dequantize(q, dtype), ref32.to(dtype))


# --------------------------------------------------------------------------- API


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(64, 96), (1000, 7)], ids=["even", "odd"])
def test_out_buffer_is_reused(shape, dtype):
    w = _weight(shape, dtype, seed=4)
    q = nf4_quantize(w)
    buf = torch.full(shape, float("nan"), dtype=dtype)
    ptr = buf.data_ptr()
    res = nf4_dequantize(q, out=buf)
    assert res is buf and res.data_ptr() == ptr
    assert torch.equal(res, nf4_dequantize(q))
    q2 = nf4_quantize(_weight(shape, dtype, seed=5))
    res2 = nf4_dequantize(q2, out=buf)  # reuse the same buffer for another weight
    assert res2.data_ptr() == ptr and torch.equal(res2, nf4_dequantize(q2))


def test_out_buffer_at_odd_offset():
    q = nf4_quantize(_weight((8, 64), torch.float32))
    storage = torch.zeros(8 * 64 + 1)
    view = storage[1:].view(8, 64)  # float32 view not 8-byte aligned: takes the temporary path
    assert nf4_dequantize(q, out=view) is view
    assert torch.equal(view, nf4_dequantize(q)) and storage[0] == 0


def test_out_buffer_validation():
    q = nf4_quantize(_weight((8, 64), torch.float32))
    with pytest.raises(ConfigurationError, match="shape"):
        nf4_dequantize(q, out=torch.empty(64, 8))
    with pytest.raises(ConfigurationError):
        nf4_dequantize(q, dtype=torch.float16, out=torch.empty(8, 64))
    with pytest.raises(ConfigurationError):
        nf4_dequantize(q, out=torch.empty(64, 8).t())  # non-contiguous
    with pytest.raises(ConfigurationError):
        nf4_dequantize(q, dtype=torch.int32)
    # out's dtype is the default output dtype
    assert nf4_dequantize(q, out=torch.empty(8, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_to_device(double_quant):
    q = nf4_quantize(_weight((48, 64), torch.bfloat16), double_quant=double_quant)
    moved = q.to("cpu")
    assert isinstance(moved, NF4Weight) and moved.double_quant == double_quant
    assert moved.shape == q.shape and moved.dtype == q.dtype and moved.blocksize == q.blocksize
    assert torch.equal(nf4_dequantize(moved), nf4_dequantize(q))
    meta = q.to("meta")
    assert all(t.device.type == "meta" for t in meta._tensors())
    assert meta.device.type == "meta" and meta.nbytes == q.nbytes
    if torch.cuda.is_available():
        on_gpu = q.to("cuda")
        assert torch.equal(nf4_dequantize(on_gpu).cpu(), nf4_dequantize(q))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    w = _weight((576, 1536), torch.bfloat16, seed=9)
    for double_quant in (False, True):
        q_cpu = nf4_quantize(w, double_quant=double_quant)
        q_gpu = nf4_quantize(w.cuda(), double_quant=double_quant)
        assert torch.equal(q_gpu.packed.cpu(), q_cpu.packed)
        assert torch.equal(q_gpu.absmax.cpu(), q_cpu.absmax)
        assert torch.equal(nf4_dequantize(q_gpu).cpu(), nf4_dequantize(q_cpu))


def test_nbytes():
    shape = (576, 1536)
    n = math.prod(shape)
    q = nf4_quantize(_weight(shape, torch.bfloat16))
    assert q.nbytes == n // 2 + 4 * (n // 64)
    assert 0.5 < q.nbytes / n < 0.57  # 0.5 byte/param + fp32 absmax per 64
    qd = nf4_quantize(_weight(shape, torch.bfloat16), double_quant=True)
    n_blocks = n // 64
    assert qd.nbytes == n // 2 + n_blocks + 4 * 256 + 4 * math.ceil(n_blocks / ABSMAX_BLOCKSIZE) + 4
    assert qd.nbytes < q.nbytes
    assert nf4_quantize(torch.ones(3, 5)).nbytes == 8 + 4  # ceil(15 / 2) bytes + one absmax


def test_input_validation():
    w = torch.randn(4, 64)
    for bad in (48, 0, 16, 8192, "64", 64.0, True):
        with pytest.raises(ConfigurationError, match="blocksize"):
            nf4_quantize(w, blocksize=bad)
    for bad_dtype in (torch.int32, torch.uint8, torch.bool, torch.float64):
        with pytest.raises(ConfigurationError, match="dtype"):
            nf4_quantize(w.to(bad_dtype))
    with pytest.raises(ConfigurationError, match="empty"):
        nf4_quantize(torch.empty(0, 64))
    with pytest.raises(ConfigurationError):
        nf4_quantize([1.0, 2.0])  # type: ignore[arg-type]
    assert issubclass(ConfigurationError, ValueError)


def test_requires_grad_weight_is_fine():
    w = _weight((16, 64), torch.float32).requires_grad_()
    q = nf4_quantize(w)
    assert not q.packed.requires_grad and not q.absmax.requires_grad
    assert not nf4_dequantize(q).requires_grad


@contextlib.contextmanager
def _single_thread():
    # Timed on one intra-op thread: on a small shared CPU, another busy process
    # makes every multi-threaded op wait for its second thread to be scheduled,
    # which measures the machine's load, not this code.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_quantize_is_fast():
    w = _weight((576, 1536), torch.bfloat16)
    nf4_quantize(w, double_quant=True)  # warm the lookup tables
    with _single_thread():
        for double_quant in (False, True):
            best = min(_timed(lambda: nf4_quantize(w, double_quant=double_quant)) for _ in range(3))
            assert best < 0.1, f"quantizing 576x1536 took {best:.3f} s"
        q = nf4_quantize(w)
        buf = torch.empty(w.shape, dtype=w.dtype)
        assert min(_timed(lambda: nf4_dequantize(q, out=buf)) for _ in range(3)) < 0.1


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- bnb interop helpers


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_bnb_state_dict_round_trip(double_quant):
    from bitsandbytes.functional import QuantState

    w = _weight((64, 192), torch.bfloat16, seed=8)
    packed, state = _bnb_quantize(w, double_quant=double_quant)
    q = nf4_quantize(w, double_quant=double_quant)

    ours = to_bnb_quant_state_dict(q)
    theirs = state.as_dict(packed=True)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key  # includes the packed JSON blob

    rebuilt = QuantState.from_dict(dict(ours), device=torch.device("cpu"))
    assert torch.equal(bnb_functional.dequantize_4bit(packed, rebuilt, quant_type="nf4"), nf4_dequantize(q))

    back = from_bnb(packed, state)
    assert back.double_quant == double_quant
    assert torch.equal(back.packed, q.packed) and torch.equal(back.absmax, q.absmax)
    assert back.shape == q.shape and back.dtype == q.dtype and back.blocksize == q.blocksize
    assert torch.equal(nf4_dequantize(back), nf4_dequantize(q))


def test_from_bnb_rejects_fp4():
    packed, state = bnb_functional.quantize_4bit(torch.randn(4, 64), quant_type="fp4")
    with pytest.raises(ConfigurationError, match="nf4"):
        from_bnb(packed, state)
