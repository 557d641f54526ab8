"""Tests for engine.gguf.quants: round-trip error through gguf's dequantizers, byte equality with a slow scalar
re-implementation of llama.cpp's reference quantizers, delegated types and errors."""

import itertools
import struct

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from engine.errors import ConfigurationError
from engine.gguf.quants import OWN_TYPES, block_size, can_quantize, quantize

F = np.float32

# RMSE on N(0, 1) data, measured with this implementation on [32, 2048] (seed 0): Q2_K 0.298, Q3_K 0.151,
# Q4_K 0.072, Q5_K 0.036, Q6_K 0.0178 -- about half per extra bit, as expected for ~2.6/3.4/4.5/5.5/6.6 bpw. The bounds
# leave ~10% headroom for another seed; a layout or scale bug shows up as errors of order 1.
RMSE_BOUND = {QT.Q2_K: 0.33, QT.Q3_K: 0.17, QT.Q4_K: 0.08, QT.Q5_K: 0.04, QT.Q6_K: 0.02}


def _roundtrip(x, qtype):
    return gguf.quants.dequantize(quantize(x, qtype), qtype).reshape(x.shape)


def _rmse(a, b):
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.fixture(scope="module")
def normal():
    return np.random.default_rng(0).standard_normal((32, 2048)).astype(np.float32)


@pytest.mark.parametrize("qtype", OWN_TYPES, ids=lambda t: t.name)
def test_shape_dtype_and_rmse_on_normal_data(normal, qtype):
    q = quantize(normal, qtype)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    assert q.dtype == np.uint8 and q.shape == (32, 2048 // 256 * type_size)
    assert _rmse(_roundtrip(normal, qtype), normal) < RMSE_BOUND[qtype]
    x3 = normal.reshape(4, 8, 2048)
    assert quantize(x3, qtype).shape == (4, 8, 2048 // 256 * type_size)


def test_error_falls_by_about_half_per_bit(normal):
    errors = [_rmse(_roundtrip(normal, t), normal) for t in OWN_TYPES]
    for hi, lo in itertools.pairwise(errors):
        assert 1.6 < hi / lo < 2.6, errors


@pytest.mark.parametrize("qtype", OWN_TYPES, ids=lambda t: t.name)
def test_special_rows(qtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 512)).astype(np.float32)
    x[0] = 0.0
    x[1] = 0.75
    x[2] = -3.0
    x[3, ::97] = 40.0  # outliers: only their own sub-blocks / super-block lose precision
    x[4] *= 1e-3  # tiny values: fp16 scales must not underflow
    x[5] = rng.uniform(2.0, 3.0, 512)  # all positive, far from zero
    y = _roundtrip(x, qtype)
    assert np.all(np.isfinite(y))
    assert np.array_equal(y[0], x[0])
    bound = RMSE_BOUND[qtype]
    for r in (1, 2):  # constant rows: only the fp16 rounding of the scales remains (measured <= 2.5e-4 relative)
        assert _rmse(y[r], x[r]) < 5e-4 * abs(x[r, 0])
    inliers = np.ones(512, bool)
    inliers[::97] = False
    # An outlier blows up its own sub-block's step and coarsens the 6-bit sub-scales of its super-block: measured
    # inlier RMSE 0.15 (Q6_K) .. 0.50 (Q2_K); the outliers themselves stay within ~1% (measured <= 0.17 at 40).
    assert _rmse(y[3, inliers], x[3, inliers]) < 0.6
    assert _rmse(y[3, ~inliers], x[3, ~inliers]) < 0.4
    assert _rmse(y[4], x[4]) < 1.2 * bound * 1e-3  # scale invariance down to 1e-3
    # ggml's mins are <= 0, so U(2, 3) is quantized over [0, 3], a range like N(0, 1)'s (measured 0.02..0.24).
    assert _rmse(y[5], x[5]) < 1.25 * bound


@pytest.mark.parametrize("qtype", OWN_TYPES, ids=lambda t: t.name)
def test_rows_are_independent(normal, qtype):
    batch = quantize(normal[:4], qtype)
    for r in range(4):
        assert np.array_equal(quantize(normal[r:r + 1], qtype)[0], batch[r])


# ------------------------------------------------------------------ scalar reference (slow, per block, readable)


def _half(v):
    return struct.pack("<e", float(v))


def _half_value(v):
    return F(struct.unpack("<e", _half(v))[0])


def _csum(a):
    """float32 sum in index order, as llama.cpp's C loops add (numpy's ``.sum()`` is pairwise)."""
    total = F(0)
    for v in a:
        total = F(total + v)
    return total


def ref_make_qkx2(x, w, nmax, rmin, rdelta, nstep):
    """make_qkx2_quants for one group (squared error). Returns (scale, -min, levels)."""
    lo, hi = min(F(x.min()), F(0)), F(x.max())
    if hi == lo:
        return F(0), -lo, np.zeros(len(x), F)
    sum_w, sum_x = _csum(w), _csum(w * x)

    def levels(iscale, offset):
        return np.clip(np.rint(iscale * (x - offset)), 0, nmax).astype(F)

    def error(scale, m, lv):
        diff = scale * lv + m - x
        return _csum(w * (diff * diff))

    iscale = F(nmax) / (hi - lo)
    scale, mn = F(1) / iscale, lo
    best_l = levels(iscale, lo)
    best = error(scale, mn, best_l)
    for i in range(nstep + 1):
        # llama.cpp starts each candidate grid at the current best minimum, which the loop updates.
        lv = levels((F(rmin) + F(rdelta) * F(i) + F(nmax)) / (hi - mn), mn)
        sum_l, sum_l2, sum_xl = _csum(w * lv), _csum(w * lv * lv), _csum(w * lv * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:
                this_min, this_scale = F(0), sum_xl / sum_l2
            cur = error(this_scale, this_min, lv)
            if cur < best:
                best, scale, mn, best_l = cur, this_scale, this_min, lv
    return scale, -mn, best_l


def ref_make_qx(x, nmax):
    """make_qx_quants(rmse_type=1, no weights) for one group. Returns (scale, levels + nmax)."""
    i_max = int(np.argmax(np.abs(x)))
    mx = x[i_max]
    if abs(mx) < F(1e-15):
        return F(0), np.zeros(len(x), F)
    w = x * x

    def fit(iscale):
        lv = np.clip(np.rint(iscale * x), -nmax, nmax - 1).astype(F)
        return lv, _csum(w * x * lv), _csum(w * lv * lv)

    lv, sumlx, suml2 = fit(F(-nmax) / mx)
    scale = sumlx / suml2 if suml2 else F(0)
    best, best_l = scale * sumlx, lv
    for k in [k for k in range(-9, 10) if k]:
        lv, sumlx, suml2 = fit(-(F(nmax) + F(0.1) * F(k)) / mx)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            scale = sumlx / suml2
            best, best_l = scale * sumlx, lv
    return scale, best_l + F(nmax)


def ref_q4_k_block(x, nmax=15, rmin=-1.0, nstep=20):
    scales, mins, L = [], [], np.zeros(256, F)
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        w = np.sqrt(_csum(xs * xs) / F(32)) + np.abs(xs)
        s, m, L[32 * j:32 * j + 32] = ref_make_qkx2(xs, w, nmax, rmin, 0.1, nstep)
        scales.append(s)
        mins.append(m)
    max_scale, max_min = max([F(0)] + scales), max([F(0)] + mins)
    inv_scale = F(63) / max_scale if max_scale > 0 else F(0)
    inv_min = F(63) / max_min if max_min > 0 else F(0)
    ls = [min(63, int(np.rint(inv_scale * s)) & 0xFF) for s in scales]
    lm = [min(63, int(np.rint(inv_min * m)) & 0xFF) for m in mins]
    sc = bytearray(12)
    for j in range(8):
        if j < 4:
            sc[j], sc[j + 4] = ls[j], lm[j]
        else:
            sc[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            sc[j - 4] |= (ls[j] >> 4) << 6
            sc[j] |= (lm[j] >> 4) << 6
    d, dmin = _half_value(max_scale / F(63)), _half_value(max_min / F(63))
    for j in range(8):
        dj = d * F(ls[j])
        if dj == 0:
            continue
        dm = dmin * F(lm[j])
        L[32 * j:32 * j + 32] = np.clip(np.rint((x[32 * j:32 * j + 32] + dm) / dj), 0, nmax)
    L = L.astype(np.uint8)
    qs, qh = bytearray(128), bytearray(32)
    for c in range(4):
        for i in range(32):
            lo, hi = int(L[64 * c + i]), int(L[64 * c + 32 + i])
            qs[32 * c + i] = (lo & 0xF) | ((hi & 0xF) << 4)
            qh[i] |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1))
    head = _half(max_scale / F(63)) + _half(max_min / F(63)) + bytes(sc)
    return head + bytes(qs) if nmax == 15 else head + bytes(qh) + bytes(qs)


def ref_q5_k_block(x):
    return ref_q4_k_block(x, nmax=31, rmin=-0.5, nstep=15)


def ref_q6_k_block(x):
    scales, L = [F(0)] * 16, np.zeros(256, F)
    for j in range(16):
        scales[j], L[16 * j:16 * j + 16] = ref_make_qx(x[16 * j:16 * j + 16], 32)
    i_max = int(np.argmax(np.abs(scales)))
    if abs(scales[i_max]) < F(1e-15):
        return bytes(210)
    iscale = F(-128) / scales[i_max]
    ls = [min(127, int(np.rint(iscale * s))) for s in scales]
    d = _half_value(F(1) / iscale)
    for j in range(16):
        dj = d * F(ls[j])
        if dj != 0:
            L[16 * j:16 * j + 16] = np.clip(np.rint(x[16 * j:16 * j + 16] / dj), -32, 31) + 32
    L = L.astype(np.uint8)
    ql, qh = bytearray(128), bytearray(64)
    for h in range(2):
        for i in range(32):
            q1, q2, q3, q4 = (int(L[128 * h + 32 * k + i]) for k in range(4))
            ql[64 * h + i] = (q1 & 0xF) | ((q3 & 0xF) << 4)
            ql[64 * h + 32 + i] = (q2 & 0xF) | ((q4 & 0xF) << 4)
            qh[32 * h + i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
    return bytes(ql) + bytes(qh) + struct.pack("16b", *ls) + _half(F(1) / iscale)


def _reference_blocks():
    rng = np.random.default_rng(7)
    blocks = rng.standard_normal((6, 256)).astype(np.float32)
    blocks[1, 5] = 25.0  # outlier
    blocks[2, 32:64] = 0.0  # all-zero sub-block
    blocks[2, 64:96] = 1.5  # constant sub-block
    blocks[3] = -np.abs(blocks[3]) - 0.5  # all negative
    blocks[4] *= 1e-4  # tiny
    blocks[5] = 0.0  # all zero
    return blocks


@pytest.mark.parametrize(("qtype", "ref"), [(QT.Q4_K, ref_q4_k_block), (QT.Q5_K, ref_q5_k_block),
                                           (QT.Q6_K, ref_q6_k_block)], ids=["Q4_K", "Q5_K", "Q6_K"])
def test_bytes_match_scalar_reference(qtype, ref):
    blocks = _reference_blocks()
    ours = quantize(blocks, qtype)
    for b, x in enumerate(blocks):
        assert ours[b].tobytes() == ref(x), f"block {b}"
    # the scalar reference is itself checked against gguf's dequantizer
    expected = np.frombuffer(b"".join(ref(x) for x in blocks[:2]), np.uint8).reshape(2, -1)
    assert _rmse(gguf.quants.dequantize(expected, qtype), blocks[:2]) < 0.2


# ------------------------------------------------------------------------------------------ delegated + errors


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q5_1, QT.Q5_0, QT.Q4_1, QT.Q4_0],
                         ids=lambda t: t.name)
def test_delegated_types_round_trip(normal, qtype):
    x = normal[:4, :512]
    y = _roundtrip(x, qtype)
    assert y.shape == x.shape
    assert _rmse(y, x) < 0.12


def test_block_size_and_can_quantize():
    assert block_size(QT.Q4_K) == 256 and block_size(QT.Q8_0) == 32 and block_size(QT.F16) == 1
    assert can_quantize((576, 1536), QT.Q4_K) and not can_quantize((1536, 576), QT.Q4_K)
    assert can_quantize((1536, 576), QT.Q8_0)


def test_bad_shape_raises_configuration_error():
    with pytest.raises(ConfigurationError) as info:
        quantize(np.zeros((4, 576), np.float32), QT.Q4_K)
    assert all(part in str(info.value) for part in ("Q4_K", "(4, 576)", "256", "falls back"))
    with pytest.raises(ConfigurationError, match="Q8_0"):
        quantize(np.zeros((4, 33), np.float32), QT.Q8_0)


@pytest.mark.parametrize("qtype", [QT.IQ2_XXS, QT.Q8_K, 12345])
def test_unsupported_type_raises_configuration_error(qtype):
    with pytest.raises(ConfigurationError):
        quantize(np.zeros((2, 256), np.float32), qtype)
