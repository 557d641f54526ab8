"""GGUF quantizers: our own vectorized K-quants, plus delegation to ``gguf.quants`` for the simple types.

:func:`quantize` turns a float32 ``[..., cols]`` array into the exact ggml byte layout of the requested type, so
``gguf.quants.dequantize(quantize(x, t), t)`` reconstructs ``x``. Rows are independent (blocks never cross rows).

K-quants (Q2_K..Q6_K) follow llama.cpp's reference quantizers *without* importance matrix
(``quantize_row_qN_K_ref`` and helpers ``make_qkx2_quants``, ``make_q3_quants``, ``make_qx_quants`` in
``ggml-quants.c``), in float32 arithmetic, ``nearest_int`` = round half to even, d/dmin rounded to fp16 before the
final pass. The numpy code works on all sub-blocks at once, laid out position-major ``[n, groups]``; Python loops
only run over candidate scales (<= 21), over the 16 or 32 positions of a sub-block (sums, Q3_K's coordinate descent)
and over a few packing lanes. Sums over a sub-block add position by position in the C loops' order (numpy's pairwise
reduction rounds differently and flipped near-tied choices in 1-3% of the Q4_K/Q5_K/Q6_K blocks), so the bytes equal
llama.cpp's ``quantize_qN_K`` without importance matrix (tested against llama-cpp-python's ggml in
``tests/export/test_llama_cpp.py``).

Block layouts, per super-block of 256 weights (fp16 values little-endian):

* Q2_K, 84 bytes (2.625 bpw): ``scales[16]`` (per 16-weight sub-block: low nibble = 4-bit scale, high nibble =
  4-bit min), ``qs[64]`` (2-bit quants; byte ``32*h + l`` holds weights ``128*h + l + 32*k`` at bits ``2k``),
  ``d`` fp16, ``dmin`` fp16. Weight = ``d*sc*q - dmin*m``.
* Q3_K, 110 bytes (3.4375 bpw): ``hmask[32]`` (bit ``b`` of byte ``m`` = high bit of weight ``32*b + m``),
  ``qs[64]`` (low 2 bits, same packing as Q2_K), ``scales[12]`` (16 signed 6-bit scales stored +32: low nibbles of
  scales 0..7 / 8..15 in the low / high nibbles of bytes 0..7, the 2 high bits of scale ``j`` in byte ``8 + j%4``
  at bits ``2*(j//4)``), ``d`` fp16. Weight = ``d*(sc-32)*(q-4)``.
* Q4_K, 144 bytes (4.5 bpw): ``d`` fp16, ``dmin`` fp16, ``scales[12]`` (8 6-bit scales + 8 6-bit mins, packed as
  ``get_scale_min_k4``: for j<4 bytes j / j+4 hold scale / min j in bits 0..5 and the top 2 bits of scale / min
  j+4 in bits 6..7; byte j+8 holds the low nibbles of scale j+4 (low) and min j+4 (high)), ``qs[128]`` (4-bit
  quants; byte ``32*c + l`` holds weight ``64*c + l`` low, ``64*c + 32 + l`` high). Weight = ``d*sc*q - dmin*m``.
* Q5_K, 176 bytes (5.5 bpw): ``d``, ``dmin``, ``scales[12]`` as Q4_K, ``qh[32]`` (bit ``s`` of byte ``l`` = 5th bit
  of weight ``32*s + l``), ``qs[128]`` (low 4 bits, packed as Q4_K).
* Q6_K, 210 bytes (6.5625 bpw): ``ql[128]`` (low 4 bits; for half h: byte ``64h + l`` holds weights ``128h + l``
  / ``128h + 64 + l``, byte ``64h + 32 + l`` weights ``128h + 32 + l`` / ``128h + 96 + l``), ``qh[64]`` (high 2 bits;
  byte ``32h + l`` holds weight ``128h + 32k + l`` at bits ``2k``), ``scales[16]`` int8, ``d`` fp16.
  Weight = ``d*sc*(q-32)``.

Algorithms: Q2_K/Q4_K/Q5_K fit an affine ``scale*L + min`` per sub-block (weighted least squares over a sweep of
candidate inverse scales, keeping the lowest weighted error; weights ``|x|`` for Q2_K with absolute error,
``rms + |x|`` for Q4_K/Q5_K), then quantize the sub-block scales and mins against the super-block maxima (4 bits for
Q2_K, 6 bits otherwise). Q6_K fits a symmetric scale per 16 weights (``make_qx_quants``: 19 candidates around
``-32/max``, weights ``x**2``), Q3_K the same with a coordinate descent on the levels (``make_q3_quants``); the
sub-block scales are then quantized to int8 / 6 bits. Finally all weights are re-quantized with the fp16-rounded
effective scales and packed.
"""

from __future__ import annotations

from collections.abc import Sequence

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from engine.errors import ConfigurationError

__all__ = ["OWN_TYPES", "block_size", "can_quantize", "quantize"]

QK_K = 256
OWN_TYPES = (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)
DELEGATED_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1)
_GROUP_MAX_EPS = np.float32(1e-15)
_CHUNK_BLOCKS = 2048  # super-blocks per numpy pass: keeps temporaries cache-friendly and memory bounded
_F = np.float32


def _check_type(qtype) -> QT:
    try:
        qtype = QT(qtype)
    except ValueError:
        raise ConfigurationError(f"unknown GGML quantization type {qtype!r}") from None
    if qtype not in OWN_TYPES and qtype not in DELEGATED_TYPES:
        supported = ", ".join(t.name for t in OWN_TYPES + DELEGATED_TYPES)
        raise ConfigurationError(f"quantization to {qtype.name} is not supported; use one of {supported}")
    return qtype


def block_size(qtype) -> int:
    """Number of weights per block of ``qtype`` (256 for K-quants, 32 for Q4_0..Q8_0, 1 for float types)."""
    return gguf.GGML_QUANT_SIZES[_check_type(qtype)][0]


def can_quantize(shape: Sequence[int], qtype) -> bool:
    """Whether a tensor of ``shape`` can be stored as ``qtype`` (its last dimension is a multiple of the block)."""
    return len(shape) > 0 and shape[-1] % block_size(qtype) == 0


def quantize(data: np.ndarray, qtype) -> np.ndarray:
    """Quantize float ``data`` ``[..., cols]`` to ``qtype``; returns uint8 ``[..., cols // block * type_size]``.

    Own K-quants for Q2_K..Q6_K, ``gguf.quants.quantize`` for F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 (F32/F16 come back
    as float arrays, as gguf returns them). Raises :class:`ConfigurationError` for an unsupported type or a shape whose
    last dimension is not a multiple of the block size.
    """
    qtype = _check_type(qtype)
    data = np.asarray(data)
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    if data.ndim == 0 or data.shape[-1] % bs != 0:
        raise ConfigurationError(
            f"cannot quantize a tensor of shape {tuple(data.shape)} to {qtype.name}: its last dimension must be a "
            f"multiple of the {qtype.name} block size {bs}; the exporter falls back to a type whose block size divides "
            f"it (e.g. Q8_0/Q5_0/Q4_0 for multiples of 32, else F16)"
        )
    if qtype not in OWN_TYPES:
        return gguf.quants.quantize(data.astype(np.float32, copy=False), qtype)
    blocks = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], ts), dtype=np.uint8)
    fn = _QUANTIZERS[qtype]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
            out[start:start + _CHUNK_BLOCKS] = fn(blocks[start:start + _CHUNK_BLOCKS])
    return out.reshape(*data.shape[:-1], data.shape[-1] // bs * ts)


# ----------------------------------------------------------------------------------------------------- helpers


def _seq_sum(at: np.ndarray) -> np.ndarray:
    """Sum position-major ``at`` [n, G] over its n positions in float32, strictly in order 0, 1, ..., n-1 -> [G].

    This is the order of llama.cpp's C loops (``sum += ...`` per weight). numpy's own reduction over a contiguous
    axis adds with 8 partial sums and pairwise, which rounds differently and flipped near-tied choices in 1-3% of
    the Q4_K/Q5_K/Q6_K blocks. Adding contiguous rows keeps the order and vectorizes over the G groups.
    """
    acc = at[0].copy()
    for row in at[1:]:
        acc += row
    return acc


def _fp16(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round to fp16 (round-to-nearest-even like GGML_FP32_TO_FP16): (little-endian bytes [..., 2], value as f32)."""
    h = np.asarray(a, dtype=np.float32).astype("<f2")
    return h.view(np.uint8).reshape(*h.shape, 2), h.astype(np.float32)


def _signed_absmax(x: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Along ``axis``: (the first value of largest magnitude, that magnitude)."""
    idx = np.expand_dims(np.argmax(np.abs(x), axis=axis), axis)
    mx = np.take_along_axis(x, idx, axis=axis).squeeze(axis)
    return mx, np.abs(mx)


def _make_qkx2(xt, wt, nmax, rmin, rdelta, nstep, use_mad):
    """``make_qkx2_quants`` for position-major groups ``xt`` [n, G] with weights ``wt`` [n, G].

    Returns (scale [G], -min [G], levels [n, G] f32).
    """
    mn = np.minimum(xt.min(axis=0), 0).astype(np.float32)
    mx = xt.max(axis=0)
    flat = mx == mn
    sum_w = _seq_sum(wt)
    sum_x = _seq_sum(wt * xt)
    lv = np.empty_like(xt)
    tmp = np.empty_like(xt)

    def levels_for(iscale, offset):  # into lv: clip(nearest_int(iscale * (x - offset)), 0, nmax)
        np.subtract(xt, offset, out=lv)
        np.multiply(iscale, lv, out=lv)
        np.rint(lv, out=lv)
        return np.clip(lv, 0, nmax, out=lv)

    def error(scale, m):  # weighted error of lv with (scale, m), C order: ((scale*L) + m) - x
        np.multiply(scale, lv, out=tmp)
        np.add(tmp, m, out=tmp)
        np.subtract(tmp, xt, out=tmp)
        if use_mad:
            np.abs(tmp, out=tmp)
        else:
            np.multiply(tmp, tmp, out=tmp)
        np.multiply(wt, tmp, out=tmp)
        return _seq_sum(tmp)

    rng = np.where(flat, _F(1), mx - mn)
    iscale0 = _F(nmax) / rng
    scale = _F(1) / iscale0
    levels = levels_for(iscale0, mn).copy()
    best = error(scale, mn)
    for i in range(nstep + 1):
        # As llama.cpp: each candidate's grid starts at the current best minimum (updated in the loop).
        rng = np.where(flat | (mx == mn), _F(1), mx - mn)
        iscale = (_F(rmin) + _F(rdelta) * _F(i) + _F(nmax)) / rng
        levels_for(iscale, mn)
        wl = np.multiply(wt, lv, out=tmp)
        sum_l = _seq_sum(wl)
        sum_xl = _seq_sum(wl * xt)
        sum_l2 = _seq_sum(np.multiply(wl, lv, out=tmp))
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            pos = this_min > 0
            this_min = np.where(pos, _F(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, this_min)
        better = ok & (cur < best) & ~flat
        best = np.where(better, cur, best)
        np.copyto(levels, lv, where=better)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    levels[:, flat] = 0
    scale = np.where(flat, _F(0), scale)
    return scale, -mn, levels


def _make_qx(xt, nmax):
    """``make_qx_quants`` with rmse_type=1, no importance weights, on position-major ``xt`` [n, G].

    Returns (scale [G], levels+nmax [n, G] f32).
    """
    mx, amax = _signed_absmax(xt, axis=0)
    zero = amax < _GROUP_MAX_EPS
    mx = np.where(zero, _F(1), mx)
    w = xt * xt
    wx = w * xt

    lv = np.empty_like(xt)
    tmp = np.empty_like(xt)

    def fit(iscale):  # levels into lv, weighted sums (C order: (w*x)*l and (w*l)*l)
        np.multiply(iscale, xt, out=lv)
        np.rint(lv, out=lv)
        np.clip(lv, -nmax, nmax - 1, out=lv)
        sumlx = _seq_sum(np.multiply(wx, lv, out=tmp))
        np.multiply(w, lv, out=tmp)
        return sumlx, _seq_sum(np.multiply(tmp, lv, out=tmp))

    best_iscale = _F(-nmax) / mx
    sumlx, suml2 = fit(best_iscale)
    scale = np.where(suml2 != 0, sumlx / suml2, _F(0))
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        iscale = -(_F(nmax) + _F(0.1) * _F(k)) / mx
        sumlx, suml2 = fit(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = np.where(better, iscale, best_iscale)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    fit(best_iscale)  # the kept levels are those of the best candidate
    levels = lv + _F(nmax)
    levels[:, zero] = 0
    return np.where(zero, _F(0), scale), levels


def _make_q3(xt, nmax):
    """``make_q3_quants`` with do_rmse on position-major ``xt`` [n, G]: weighted fit plus up to 5 rounds of
    per-weight coordinate descent. Returns (scale [G], levels+nmax [n, G] f32)."""
    mx, amax = _signed_absmax(xt, axis=0)
    zero = amax < _GROUP_MAX_EPS
    mx = np.where(zero, _F(1), mx)
    lt = np.clip(np.rint((_F(-nmax) / mx) * xt), -nmax, nmax - 1)
    wt = xt * xt
    wxt = wt * xt
    sumlx = _seq_sum(wxt * lt)
    suml2 = _seq_sum(wt * lt * lt)
    # A round without change leaves the state as it was, so running all 5 rounds is the C code's early exit.
    for _ in range(5):
        for i in range(xt.shape[0]):
            li = lt[i]
            slx = sumlx - wxt[i] * li
            sl2 = suml2 - wt[i] * li * li
            new = np.clip(np.rint(xt[i] * sl2 / slx), -nmax, nmax - 1)
            nslx = slx + wxt[i] * new
            nsl2 = sl2 + wt[i] * new * new
            take = (slx > 0) & (new != li) & (nsl2 > 0) & (nslx * nslx * suml2 > sumlx * sumlx * nsl2)
            lt[i] = np.where(take, new, li)
            sumlx = np.where(take, nslx, sumlx)
            suml2 = np.where(take, nsl2, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, _F(0))
    levels = np.where(zero, _F(0), lt + _F(nmax))
    return np.where(zero, _F(0), scale), levels


def _groups(blocks: np.ndarray, n: int) -> np.ndarray:
    """Super-blocks [B, 256] -> position-major sub-blocks [n, B*256/n] (column g = sub-block g, in order)."""
    return np.ascontiguousarray(blocks.reshape(-1, n).T)


def _ungroup(levels_t: np.ndarray, nb: int, n: int) -> np.ndarray:
    """Position-major levels [n, B*256/n] -> [B, 256/n, n]."""
    return np.ascontiguousarray(levels_t.T).reshape(nb, QK_K // n, n)


def _requantize(x, levels, d, dm, lo, hi):
    """Final pass: ``nearest_int((x + dm) / d)`` clipped; sub-blocks with ``d == 0`` keep their fitted levels."""
    q = np.clip(np.rint((x + dm[..., None]) / d[..., None]), lo, hi)
    return np.where((d == 0)[..., None], levels, q)


def _pack_2bit(levels):
    """[B, 256] values 0..3 -> [B, 64]: byte 32*h + l holds weights 128*h + 32*k + l at bits 2k."""
    lv = levels.reshape(-1, 2, 4, 32)
    return (lv[:, :, 0] | lv[:, :, 1] << 2 | lv[:, :, 2] << 4 | lv[:, :, 3] << 6).reshape(-1, 64)


def _pack_nibbles(levels):
    """[B, 256] values 0..15 -> [B, 128]: byte 32*c + l holds weight 64*c + l (low) and 64*c + 32 + l (high)."""
    lv = levels.reshape(-1, 4, 2, 32)
    return (lv[:, :, 0] | lv[:, :, 1] << 4).reshape(-1, 128)


def _pack_scale_min_k4(ls, lm):
    """8 6-bit scales and 8 6-bit mins [B, 8] -> the 12 scale bytes of Q4_K/Q5_K (``get_scale_min_k4`` layout)."""
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | (ls[:, 4:] >> 4) << 6
    out[:, 4:8] = lm[:, :4] | (lm[:, 4:] >> 4) << 6
    out[:, 8:12] = (ls[:, 4:] & 0xF) | (lm[:, 4:] & 0xF) << 4
    return out


# ----------------------------------------------------------------------------------------------------- K-quants


def _scale_min_k(blocks, nmax, rmin, nstep):
    """Shared part of Q4_K/Q5_K: per-32 affine fits, 6-bit scales/mins, fp16 d/dmin, final levels."""
    nb = blocks.shape[0]
    xt = _groups(blocks, 32)
    av = np.sqrt(_seq_sum(xt * xt) / _F(32))
    sc, mins, levels = _make_qkx2(xt, av + np.abs(xt), nmax, rmin, 0.1, nstep, False)
    sc, mins = sc.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(sc.max(axis=1), 0)
    max_min = np.maximum(mins.max(axis=1), 0)
    inv_scale = np.where(max_scale > 0, _F(63) / max_scale, _F(0))
    inv_min = np.where(max_min > 0, _F(63) / max_min, _F(0))
    ls = np.minimum(np.rint(inv_scale[:, None] * sc).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(np.rint(inv_min[:, None] * mins).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    d_bytes, d = _fp16(max_scale / _F(63))
    dmin_bytes, dmin = _fp16(max_min / _F(63))
    dd = d[:, None] * ls.astype(np.float32)
    dm = dmin[:, None] * lm.astype(np.float32)
    q = _requantize(blocks.reshape(nb, 8, 32), _ungroup(levels, nb, 32), dd, dm, 0, nmax)
    head = np.concatenate([d_bytes, dmin_bytes, _pack_scale_min_k4(ls, lm)], axis=1)
    return head, q.astype(np.uint8).reshape(nb, QK_K)


def _quantize_q4_k(blocks):
    head, q = _scale_min_k(blocks, 15, -1.0, 20)
    return np.concatenate([head, _pack_nibbles(q)], axis=1)


def _quantize_q5_k(blocks):
    head, q = _scale_min_k(blocks, 31, -0.5, 15)
    high = (q >> 4).reshape(-1, 8, 32)
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for s in range(8):
        qh |= high[:, s] << s
    return np.concatenate([head, qh, _pack_nibbles(q & 0xF)], axis=1)


def _quantize_q2_k(blocks):
    nb = blocks.shape[0]
    xt = _groups(blocks, 16)
    sc, mins, levels = _make_qkx2(xt, np.abs(xt), 3, -0.5, 0.1, 15, True)
    sc, mins = sc.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale = np.maximum(sc.max(axis=1), 0)
    max_min = np.maximum(mins.max(axis=1), 0)
    ls = np.where(max_scale[:, None] > 0, np.rint((_F(15) / max_scale)[:, None] * sc), 0).astype(np.int64)
    lm = np.where(max_min[:, None] > 0, np.rint((_F(15) / max_min)[:, None] * mins), 0).astype(np.int64)
    scales = ((ls & 0xFF) | ((lm << 4) & 0xFF)).astype(np.uint8)
    d_bytes, d = _fp16(np.where(max_scale > 0, max_scale / _F(15), _F(0)))
    dmin_bytes, dmin = _fp16(np.where(max_min > 0, max_min / _F(15), _F(0)))
    dd = d[:, None] * (scales & 0xF).astype(np.float32)
    dm = dmin[:, None] * (scales >> 4).astype(np.float32)
    q = _requantize(blocks.reshape(nb, 16, 16), _ungroup(levels, nb, 16), dd, dm, 0, 3)
    return np.concatenate([scales, _pack_2bit(q.astype(np.uint8).reshape(nb, QK_K)), d_bytes, dmin_bytes], axis=1)


def _quantize_q3_k(blocks):
    nb = blocks.shape[0]
    sc, levels = _make_q3(_groups(blocks, 16), 4)
    sc = sc.reshape(nb, 16)
    max_scale, _ = _signed_absmax(sc)
    nonzero = max_scale != 0
    iscale = np.where(nonzero, _F(-32) / np.where(nonzero, max_scale, _F(1)), _F(0))
    ls = np.clip(np.rint(iscale[:, None] * sc), -32, 31).astype(np.int64) + 32
    ls = np.where(nonzero[:, None], ls, 0).astype(np.uint8)
    d_bytes, d = _fp16(np.where(nonzero, _F(1) / iscale, _F(0)))
    dd = d[:, None] * (ls.astype(np.float32) - _F(32))
    q = _requantize(blocks.reshape(nb, 16, 16), _ungroup(levels, nb, 16), dd, np.zeros_like(dd), -4, 3)
    q = np.where((dd == 0)[..., None], q, q + 4).astype(np.uint8).reshape(nb, QK_K)
    high = (q >> 2).reshape(nb, 8, 32)
    hmask = np.zeros((nb, 32), dtype=np.uint8)
    for b in range(8):
        hmask |= high[:, b] << b
    scales = np.zeros((nb, 12), dtype=np.uint8)
    scales[:, :8] = (ls[:, :8] & 0xF) | (ls[:, 8:] & 0xF) << 4
    for k in range(4):
        scales[:, 8 + k] = (ls[:, k] >> 4) | (ls[:, k + 4] >> 4) << 2 | (ls[:, k + 8] >> 4) << 4 | (ls[:, k + 12] >> 4) << 6
    return np.concatenate([hmask, _pack_2bit(q & 3), scales, d_bytes], axis=1)


def _quantize_q6_k(blocks):
    nb = blocks.shape[0]
    sc, levels = _make_qx(_groups(blocks, 16), 32)
    sc = sc.reshape(nb, 16)
    max_scale, max_abs = _signed_absmax(sc)
    zero = max_abs < _GROUP_MAX_EPS
    iscale = _F(-128) / np.where(zero, _F(1), max_scale)
    d_bytes, d = _fp16(_F(1) / iscale)
    ls = np.minimum(np.rint(iscale[:, None] * sc), 127).astype(np.int8)
    dd = d[:, None] * ls.astype(np.float32)
    q = _requantize(blocks.reshape(nb, 16, 16), _ungroup(levels, nb, 16), dd, np.zeros_like(dd), -32, 31)
    q = np.where((dd == 0)[..., None], q, q + 32).astype(np.uint8).reshape(nb, 2, 4, 32)
    ql = np.stack([q[:, :, 0] & 0xF | (q[:, :, 2] & 0xF) << 4, q[:, :, 1] & 0xF | (q[:, :, 3] & 0xF) << 4], axis=2)
    qh = q[:, :, 0] >> 4 | (q[:, :, 1] >> 4) << 2 | (q[:, :, 2] >> 4) << 4 | (q[:, :, 3] >> 4) << 6
    out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), ls.view(np.uint8), d_bytes], axis=1)
    out[zero] = 0
    return out


_QUANTIZERS = {
    QT.Q2_K: _quantize_q2_k,
    QT.Q3_K: _quantize_q3_k,
    QT.Q4_K: _quantize_q4_k,
    QT.Q5_K: _quantize_q5_k,
    QT.Q6_K: _quantize_q6_k,
}
