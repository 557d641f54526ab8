"""NF4 4-bit weight quantization in pure PyTorch, byte-compatible with bitsandbytes.

This is the storage format of QLoRA: a frozen base weight is kept as 4-bit codes
plus one scale per block, and dequantized on the fly for each matmul. Everything
here is plain tensor code (CPU or CUDA); the produced bytes are the ones
``bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4",
compress_statistics=...)`` produces on CPU, so weights can be exchanged with
bitsandbytes / ``Linear4bit`` checkpoints in both directions.

Blockwise absmax scaling
------------------------
The weight ``W`` (any shape, ``numel = n``) is flattened in row-major order to
``x[0..n)`` and cut into ``n_blocks = ceil(n / B)`` consecutive blocks of ``B``
values (``B`` = ``blocksize``, 64 by default); the last block may be partial.
Each block ``b`` gets one float32 scale::

    absmax[b] = max_{i in block b} |x_i|          (computed in float32)

and every value is normalised into ``[-1, 1]`` and rounded to the nearest of the
16 NF4 code values ``c_0 < ... < c_15``::

    s_i    = clamp(x_i * (1 / absmax[b]), -1, 1)     (full blocks)
    s_i    = clamp(x_i / absmax[b], -1, 1)           (the partial last block)
    q_i    = #{ k : m_k < s_i },   m_k = (c_k + c_{k+1}) / 2   (k = 0..14)

i.e. nearest code, an exact tie on a midpoint going to the lower code. A block
that is all zeros keeps ``absmax = 0`` (full block) and its codes are 7 (the
code of 0.0); bitsandbytes clamps the absmax of the partial last block to at
least ``1e-38``, which is reproduced. Dequantization is::

    x_hat_i = float32(c[q_i] * absmax[b])  ->  cast to the requested dtype

The NF4 table (``NF4_CODE``) is the QLoRA "NormalFloat" code: quantiles of a
standard normal renormalised to ``[-1, 1]``, asymmetric so that 0.0 is exactly
representable (code 7) and both -1 (code 0) and +1 (code 15) are present.

Packing
-------
Two codes share a byte, the *earlier* element in the high nibble::

    packed[j] = (q_{2j} << 4) | q_{2j+1}

If ``n`` is odd the missing last low nibble is 7 (bitsandbytes pads the
normalised values with 0.0). ``packed`` has ``ceil(n / 2)`` bytes; bitsandbytes
returns the same bytes with shape ``[ceil(n / 2), 1]``.

Double quantization (``double_quant=True``, bnb ``compress_statistics=True``)
--------------------------------------------------------------------------
The float32 absmax vector (4 bytes per block, 0.5 bit/param at B = 64) is itself
quantized to 8 bits. With ``mu = mean(absmax)`` (float32)::

    a_b      = absmax[b] - mu                      (centred, float32)
    scale[g] = max_{b in group g} |a_b|            (groups of 256 blocks)
    v_b      = clamp(a_b * (1 / scale[g]), -1, 1)
    code8_b  = LUT[ trunc(((v_b + 1) * 0.5) * 65535 + 0.5) ]

``LUT`` maps 65536 evenly spaced points ``u_i = -1 + 2i / 65535`` of ``[-1, 1]``
to the nearest entry of ``D``, the signed 256-entry "dynamic" map of
bitsandbytes (``create_dynamic_map()``: dynamic exponent + fraction, values in
``[-0.993, 1]``): ``LUT[i] = #{k : (D_k + D_{k+1}) / 2 < u_i}``. This two-step
rounding (to a 1/65535 grid, then to the code) is exactly what the bitsandbytes
CPU kernel does; it differs from true nearest rounding for a few values close
to a midpoint. A group whose centred absmax values are all 0 gets scale 0 and
codes 0. Decoding::

    absmax_hat[b] = float32(D[code8_b] * scale[g]) + mu

and the 4-bit dequantization above then uses ``absmax_hat``.

Non-finite weights are not an error: a block containing NaN/inf gets a NaN/inf
absmax and dequantizes to non-finite values (its bytes need not match bnb's);
other blocks are unaffected, except that with double quantization the mean, and
so every decoded absmax, becomes non-finite (as in bnb).

Triton kernel
-------------
``nf4_dequantize`` runs :func:`engine_kernels.nf4_triton.nf4_dequantize_triton` (its own file) when :mod:`engine_kernels.dispatch` picks Triton
(CUDA tensors by default, or ``ENGINE_KERNELS=triton``). ``_nf4_dequant_kernel`` is one pass:
each program takes ``BLOCK_BYTES`` packed bytes (``2 * BLOCK_BYTES`` values, whole blocks),
reads each byte once, splits it into its two nibbles (high = even element), looks both codes
up in the 16-entry table, reads the scale of each block once per tile (the float32 absmax, or,
double-quantized, the uint8 code, its dynamic-map value, the group scale and the offset,
decoded in-kernel exactly as above) and writes each output element once. Bytes moved per
element: ``0.5 + out element size + absmax bytes / B`` (2.5625 for bf16 output with float32
absmax at B = 64). Values are bit-identical to the PyTorch path: the same float32 products,
rounded to nearest even on the cast (done with integer ops for bfloat16, since Triton's CPU
interpreter truncates that cast; the kernel is launched with ``enable_fp_fusion=False``
so the double-quant ``D * scale + mu`` is not contracted into an FMA).

Reference: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs"
(2023); bitsandbytes ``functional.quantize_4bit`` / ``dequantize_4bit``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from engine_kernels.dispatch import select_backend
from engine_kernels.errors import ConfigurationError

__all__ = [
    "ABSMAX_BLOCKSIZE",
    "ALLOWED_BLOCKSIZES",
    "NF4_CODE",
    "NF4Weight",
    "dynamic_map",
    "from_bnb",
    "nf4_dequantize",
    "nf4_quantize",
    "to_bnb_quant_state_dict",
]

#: Block sizes bitsandbytes accepts for 4-bit quantization.
ALLOWED_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)

#: Number of absmax values sharing one float32 scale under double quantization.
ABSMAX_BLOCKSIZE = 256

#: Weight dtypes that can be quantized (the ones bitsandbytes supports).
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

#: The 16 NF4 code values, sorted; code 7 is exactly 0.0. float32 [16].
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

_LUT_SIZE = 65536  # resolution of the 8-bit quantization grid (bnb CPU kernel)
_NF4_BINS = 4096  # bins of [-1, 1] used to locate the NF4 code (see _build_nf4_bins)


# --------------------------------------------------------------------------- tables


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic quantization map of bitsandbytes.

    Equal to ``bitsandbytes.functional.create_dynamic_map()`` (signed, 7 exponent
    bits, 8 bits total): for each exponent ``e = 0..6`` the ``2**e`` midpoints of
    ``linspace(0.1, 1, 2**e + 1)`` scaled by ``10**(e - 6)``, with both signs,
    plus 0 and 1, sorted.

    Returns:
        float32 ``[256]``, sorted ascending, from about -0.993 to 1.0.
    """
    parts = []
    for e in range(7):  # 7 exponents, each a vectorized range of fractions
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (bounds[:-1] + bounds[1:]) / 2.0
        scaled = mids * (10.0 ** (e - 6))
        parts += [scaled, -scaled]
    parts.append(torch.tensor([0.0, 1.0], dtype=torch.float32))
    values = torch.cat(parts)
    assert values.numel() == 256
    return torch.sort(values).values


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


_TABLE_NAMES = ("nf4_code", "nf4_bin_below", "nf4_bin_threshold", "nf4_byte_pairs", "dynamic_map", "dynamic_lut")


def _table(name: str, device: torch.device) -> torch.Tensor:
    """Cached lookup tables, built on CPU once and copied per device (``meta`` copies are not cached:
    memory planning makes them inside short-lived fake-tensor sessions)."""
    key = (name, device)
    table = _TABLES.get(key)
    if table is None:
        cpu_key = (name, torch.device("cpu"))
        table = _TABLES.get(cpu_key)
        if table is None:
            table = _build_table(name)
            _TABLES[cpu_key] = table
        if device.type != "cpu":
            table = table.to(device)
            if device.type != "meta":
                _TABLES[key] = table
    return table


def build_tables() -> None:
    """Build the CPU lookup tables now (the memory planner calls this before it enters a fake-tensor session,
    where tables could not be computed)."""
    for name in _TABLE_NAMES:
        _table(name, torch.device("cpu"))


def _build_table(name: str) -> torch.Tensor:
    if name == "nf4_code":
        return NF4_CODE.clone()
    if name == "nf4_bin_below":
        return _build_nf4_bins()[0]
    if name == "nf4_bin_threshold":
        return _build_nf4_bins()[1]
    if name == "nf4_byte_pairs":
        # byte -> the float32 pair (code[hi], code[lo]), stored as one int64 per byte
        # so that decoding is a 1-D gather of 8-byte items (much faster than [256, 2] rows).
        byte = torch.arange(256)
        pairs = torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 0xF]], dim=1).contiguous()
        return pairs.view(torch.int64).reshape(256)
    if name == "dynamic_map":
        return dynamic_map()
    if name == "dynamic_lut":  # uint8 [65536]: grid point -> nearest dynamic-map code
        return _build_lut(dynamic_map())
    raise KeyError(name)


def _build_nf4_bins() -> tuple[torch.Tensor, torch.Tensor]:
    """Bin tables that turn "count the midpoints below s" into two gathers and one compare.

    ``[-1, 1]`` is cut into ``_NF4_BINS`` equal bins (edges ``-1 + k * 2 / _NF4_BINS``,
    exact in float32). Every bin holds at most one NF4 midpoint (bins are far
    narrower than the smallest code gap), so for ``s`` in bin ``k``::

        #{midpoints < s} = below[k] + (s > threshold[k])

    with ``below[k]`` the midpoints left of the bin and ``threshold[k]`` the midpoint
    inside it (``+inf`` if none). The comparison with the midpoint is exact, so
    ties still go down. Computing the bin of ``s`` in float32 can be off by one
    only for ``s`` within ~1e-7 of an edge; the midpoints are >2e-5 away from
    every edge (asserted), and for such ``s`` both neighbouring bins give the
    same count.

    Returns:
        ``(below, threshold)``: uint8 ``[_NF4_BINS]`` and float32 ``[_NF4_BINS]``.
    """
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    mids64 = mids.double()
    edges = -1.0 + torch.arange(_NF4_BINS + 1, dtype=torch.float64) * (2.0 / _NF4_BINS)
    assert (mids64[:, None] - edges[None, :]).abs().min() > 1e-5
    below = torch.searchsorted(mids64, edges[:-1], right=False).to(torch.uint8)
    threshold = torch.full((_NF4_BINS,), float("inf"), dtype=torch.float32)
    threshold[torch.floor((mids64 + 1.0) * (_NF4_BINS / 2)).long()] = mids
    return below, threshold


def _nf4_codes(normed: torch.Tensor) -> torch.Tensor:
    """Nearest NF4 code (ties to the lower code) of values in ``[-1, 1]``.

    Equal to ``torch.bucketize(normed, midpoints)`` (what bitsandbytes runs), a few
    times faster and in fewer kernel launches.

    Args:
        normed: float32 ``[m]``, already clamped to ``[-1, 1]``.

    Returns:
        uint8 ``[m]`` codes in ``0..15``.
    """
    below = _table("nf4_bin_below", normed.device)
    threshold = _table("nf4_bin_threshold", normed.device)
    # (clamping both ends also keeps a NaN, whose int conversion is undefined, in range)
    bins = (normed + 1.0).mul_(_NF4_BINS / 2).to(torch.int32).clamp_(0, _NF4_BINS - 1)
    return below[bins].add_(normed > threshold[bins])


def _build_lut(code: torch.Tensor) -> torch.Tensor:
    """65536-entry rounding table for an 8-bit code (as the bitsandbytes CPU kernel builds it).

    Args:
        code: float32 ``[256]``, sorted.

    Returns:
        uint8 ``[65536]``: ``lut[i]`` = number of code midpoints strictly below
        ``-1 + 2 i / 65535`` (all arithmetic in float32).
    """
    code = code.float().cpu()
    mids = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1)
    return torch.searchsorted(mids, grid, right=False).to(torch.uint8)


# --------------------------------------------------------------------------- container


@dataclass
class NF4Weight:
    """A weight quantized to NF4, laid out exactly as bitsandbytes lays it out.

    Attributes:
        packed: uint8 ``[ceil(numel / 2)]``, two 4-bit codes per byte, the earlier
            (row-major) element in the high nibble.
        absmax: float32 ``[n_blocks]`` per-block scales, or, when double-quantized,
            uint8 ``[n_blocks]`` 8-bit codes of ``absmax - absmax_offset``.
        shape: original weight shape, e.g. ``[out_features, in_features]``.
        dtype: original dtype; the default dequantization dtype.
        blocksize: elements per block (one of :data:`ALLOWED_BLOCKSIZES`).
        absmax_code: float32 ``[256]`` dynamic map decoding ``absmax`` codes
            (double quantization only).
        absmax_scale: float32 ``[ceil(n_blocks / 256)]`` per-group scale
            (double quantization only).
        absmax_offset: float32 scalar, the mean subtracted from absmax before
            quantizing it (double quantization only).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    absmax_code: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        """True when ``absmax`` itself is 8-bit quantized."""
        return self.absmax_code is not None

    @property
    def numel(self) -> int:
        """Number of elements of the original weight."""
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        """Number of ``blocksize`` blocks (the last one may be partial)."""
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        """Device the packed data lives on."""
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes held by all tensors (about 0.5 byte/param + the scales)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        tensors = [self.packed, self.absmax, self.absmax_code, self.absmax_scale, self.absmax_offset]
        return [t for t in tensors if t is not None]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> NF4Weight:
        """Copy of this weight with every tensor moved to ``device``.

        Args:
            device: target device.
            non_blocking: forwarded to :meth:`torch.Tensor.to`.

        Returns:
            A new :class:`NF4Weight`; tensors already on ``device`` are shared, not copied.
        """

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return NF4Weight(
            packed=move(self.packed),
            absmax=move(self.absmax),
            shape=self.shape,
            dtype=self.dtype,
            blocksize=self.blocksize,
            absmax_code=move(self.absmax_code),
            absmax_scale=move(self.absmax_scale),
            absmax_offset=move(self.absmax_offset),
        )

    def _check_double_quant(self) -> None:
        if self.absmax_scale is None or self.absmax_offset is None:
            raise ConfigurationError(
                "NF4Weight has absmax_code but no absmax_scale/absmax_offset; a double-quantized "
                "weight needs all three (build it with nf4_quantize(..., double_quant=True))."
            )

    def block_absmax(self) -> torch.Tensor:
        """The per-block scales actually used for dequantization.

        Returns:
            float32 ``[n_blocks]``: ``absmax`` itself, or, when double-quantized,
            ``absmax_code[absmax] * absmax_scale[block // 256] + absmax_offset``
            (float32, rounded after the product and after the sum, like bnb).
        """
        if not self.double_quant:
            return self.absmax
        self._check_double_quant()
        values = self.absmax_code[self.absmax.long()]  # float32 [n_blocks], fresh tensor
        _scale_blocks(values, self.absmax_scale, ABSMAX_BLOCKSIZE, out=values)
        values += self.absmax_offset
        return values


# --------------------------------------------------------------------------- helpers


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int, out: torch.Tensor) -> None:
    """``out[i] = values[i] * scales[i // blocksize]`` for ``i < out.numel()`` (1-D tensors).

    The product is computed in float32 and rounded once into ``out``'s dtype;
    ``out`` may be ``values`` itself (in place).
    """
    n = out.numel()
    full = n - n % blocksize
    if full:
        torch.mul(
            values[:full].view(-1, blocksize),
            scales[: full // blocksize].unsqueeze(1),
            out=out[:full].view(-1, blocksize),
        )
    if full < n:
        torch.mul(values[full:n], scales[full // blocksize], out=out[full:])


def _check_blocksize(blocksize: Any) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in ALLOWED_BLOCKSIZES:
        raise ConfigurationError(
            f"NF4 blocksize must be one of {ALLOWED_BLOCKSIZES} (the sizes bitsandbytes supports), "
            f"got {blocksize!r}. Use 64, the QLoRA default, unless you need another."
        )
    return blocksize


def _quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of the float32 block scales (bnb ``compress_statistics``).

    Args:
        absmax: float32 ``[n_blocks]``.

    Returns:
        ``(codes, code, scale, offset)``: uint8 ``[n_blocks]``, float32 ``[256]``,
        float32 ``[ceil(n_blocks / 256)]``, float32 scalar.
    """
    device = absmax.device
    n = absmax.numel()
    offset = absmax.mean()
    centred = absmax - offset
    full = n - n % ABSMAX_BLOCKSIZE
    mags = centred.abs()
    scales = []
    if full:
        scales.append(mags[:full].view(-1, ABSMAX_BLOCKSIZE).amax(dim=1))
    if full < n:
        scales.append(mags[full:].amax().reshape(1))
    scale = torch.cat(scales) if len(scales) > 1 else scales[0]

    # v = clamp(a * (1 / scale), -1, 1); a group with scale 0 gets codes 0.
    inv = 1.0 / scale
    normed = torch.empty_like(centred)
    _scale_blocks(centred, inv, ABSMAX_BLOCKSIZE, out=normed)
    normed.clamp_(-1.0, 1.0)
    grid_index = ((normed + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5).to(torch.int64).clamp_(0, _LUT_SIZE - 1)
    zero_group = (scale == 0).repeat_interleave(ABSMAX_BLOCKSIZE)[:n]
    grid_index = grid_index.masked_fill_(zero_group, 0)
    codes = _table("dynamic_lut", device)[grid_index]  # lut[0] == 0: zero groups get code 0
    return codes, _table("dynamic_map", device).clone(), scale, offset


# --------------------------------------------------------------------------- public API

#: Output dtypes the Triton kernel writes (others take the PyTorch path).
_TRITON_OUT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """Quantize a weight to NF4, bit-exactly as bitsandbytes does on CPU.

    Equivalent to ``bitsandbytes.functional.quantize_4bit(weight, blocksize=blocksize,
    quant_type="nf4", compress_statistics=double_quant)``. Runs on the weight's
    device; gradients are not tracked.

    Args:
        weight: float32 / float16 / bfloat16 tensor of any shape, ``numel >= 1``.
        blocksize: elements per scale block, one of :data:`ALLOWED_BLOCKSIZES`.
        double_quant: also quantize the per-block absmax to 8 bits
            (saves about 0.37 bit/param at blocksize 64).

    Returns:
        An :class:`NF4Weight` with ``packed`` uint8 ``[ceil(numel / 2)]`` and
        ``absmax`` float32 (or uint8 codes) ``[ceil(numel / blocksize)]``.

    Raises:
        ConfigurationError: ``weight`` is not a floating tensor of a supported
            dtype, is empty, or ``blocksize`` is not allowed.
    """
    if not isinstance(weight, torch.Tensor):
        raise ConfigurationError(f"nf4_quantize expects a torch.Tensor, got {type(weight).__name__}.")
    if weight.dtype not in SUPPORTED_DTYPES:
        kind = "floating" if weight.is_floating_point() else "non-floating"
        raise ConfigurationError(
            f"nf4_quantize supports float32, float16 and bfloat16 weights (like bitsandbytes), "
            f"got a {kind} tensor of dtype {weight.dtype}. Cast the weight first, e.g. weight.float()."
        )
    blocksize = _check_blocksize(blocksize)
    n = weight.numel()
    if n == 0:
        raise ConfigurationError(
            f"nf4_quantize got an empty weight (shape {tuple(weight.shape)}); nothing to quantize."
        )

    with torch.no_grad():
        device = weight.device
        x = weight.detach().reshape(-1).float()
        full = n - n % blocksize
        x_full = x[:full].view(-1, blocksize)

        # Per-block absmax; full blocks keep 0, the partial block is clamped to >= 1e-38.
        absmax_parts = [x_full.abs().amax(dim=1)] if full else []
        if full < n:
            absmax_parts.append(x[full:].abs().amax().clamp(min=1e-38).reshape(1))
        absmax = torch.cat(absmax_parts) if len(absmax_parts) > 1 else absmax_parts[0]

        # Normalise into [-1, 1]: multiply by the reciprocal for full blocks,
        # divide for the partial one (the exact float32 ops bnb uses).
        nbytes = (n + 1) // 2
        normed = torch.empty(2 * nbytes, dtype=torch.float32, device=device)
        if full:
            recip = 1.0 / absmax[: full // blocksize].clamp(min=1e-38)
            torch.mul(x_full, recip.unsqueeze(1), out=normed[:full].view(-1, blocksize))
        if full < n:
            torch.div(x[full:], absmax[-1], out=normed[full:n])
        if n % 2:
            normed[n] = 0.0  # pad an odd count: code 7 in the last low nibble
        normed.clamp_(-1.0, 1.0)

        codes = _nf4_codes(normed).view(nbytes, 2)
        packed = codes[:, 0].bitwise_left_shift(4).bitwise_or_(codes[:, 1])

        if not double_quant:
            return NF4Weight(packed=packed, absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize)
        qcodes, code8, scale, offset = _quantize_absmax(absmax)
        return NF4Weight(
            packed=packed,
            absmax=qcodes,
            shape=weight.shape,
            dtype=weight.dtype,
            blocksize=blocksize,
            absmax_code=code8,
            absmax_scale=scale,
            absmax_offset=offset,
        )


def nf4_dequantize(w: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize an :class:`NF4Weight` (same values as ``bitsandbytes.functional.dequantize_4bit``).

    Each value is ``float32(NF4_CODE[code] * absmax[block])``, then cast to ``dtype``
    (round to nearest even).

    Args:
        w: the quantized weight.
        dtype: output dtype; defaults to ``out.dtype`` when ``out`` is given,
            else ``w.dtype``.
        out: optional preallocated contiguous tensor of shape ``w.shape`` on
            ``w``'s device to write into; the result is ``out`` itself (a reusable
            buffer). Temporaries: the int32 byte indices, plus one float32
            ``[numel]`` buffer unless the output is float32 with an even numel.

    Returns:
        Tensor of shape ``w.shape`` and dtype ``dtype`` (``out`` if given).

    Raises:
        ConfigurationError: ``dtype`` is not floating, or ``out`` has the wrong
            shape, dtype, device or layout.

    The implementation is chosen by :func:`engine_kernels.dispatch.select_backend`: the
    Triton kernel (:func:`engine_kernels.nf4_triton.nf4_dequantize_triton`, no temporaries) for float32 /
    float16 / bfloat16 / float64 outputs, else the PyTorch code below.
    """
    if dtype is None:
        dtype = out.dtype if out is not None else w.dtype
    if not dtype.is_floating_point:
        raise ConfigurationError(f"nf4_dequantize needs a floating output dtype, got {dtype}.")
    shape = torch.Size(w.shape)
    n = math.prod(shape)
    device = w.packed.device
    nbytes = (n + 1) // 2
    if w.packed.numel() != nbytes or w.packed.dtype != torch.uint8:
        raise ConfigurationError(
            f"NF4Weight.packed must be uint8 with ceil(numel/2) = {nbytes} bytes for shape {tuple(shape)}, "
            f"got {w.packed.dtype} with {w.packed.numel()} elements."
        )
    if out is not None and (
        out.shape != shape or out.dtype != dtype or out.device != device or not out.is_contiguous()
    ):
        raise ConfigurationError(
            f"nf4_dequantize out= must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})."
        )

    if dtype in _TRITON_OUT_DTYPES and select_backend("nf4_dequantize", device) == "triton":
        from engine_kernels.nf4_triton import nf4_dequantize_triton  # the kernel file imports this one

        result = out if out is not None else torch.empty(shape, dtype=dtype, device=device)
        return nf4_dequantize_triton(w, dtype, result)
    return _nf4_dequantize_torch(w, dtype, out)


def _nf4_dequantize_torch(w: NF4Weight, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """The PyTorch path of :func:`nf4_dequantize` (arguments already validated)."""
    shape = torch.Size(w.shape)
    n = math.prod(shape)
    device = w.packed.device
    with torch.no_grad():
        absmax = w.block_absmax().to(device=device, dtype=torch.float32)
        pairs = _table("nf4_byte_pairs", device)  # int64 [256], each the bytes of 2 float32 codes
        index = w.packed.reshape(-1).to(torch.int32)
        result = out if out is not None else torch.empty(shape, dtype=dtype, device=device)
        flat = result.view(-1)
        if dtype == torch.float32 and n % 2 == 0 and flat.storage_offset() % 2 == 0:
            # Decode straight into the destination, then scale in place: no float temporaries.
            torch.index_select(pairs, 0, index, out=flat.view(torch.int64))
            _scale_blocks(flat, absmax, w.blocksize, out=flat)
        else:
            values = torch.index_select(pairs, 0, index).view(torch.float32)  # float32 [2 * nbytes]
            _scale_blocks(values, absmax, w.blocksize, out=flat)  # float32 product, cast on write
        return result


# --------------------------------------------------------------------------- bitsandbytes interop


def to_bnb_quant_state_dict(w: NF4Weight) -> dict[str, Any]:
    """The quantization state as ``bitsandbytes`` ``QuantState.as_dict(packed=True)`` writes it.

    With the packed weight stored under ``"weight"`` and each of these under
    ``"weight.<key>"``, this is the state dict of a ``bnb.nn.Linear4bit`` weight;
    ``QuantState.from_dict(d, device)`` rebuilds an equivalent bnb state.

    Args:
        w: the quantized weight.

    Returns:
        ``{"absmax", "quant_map", ["nested_absmax", "nested_quant_map"],
        "quant_state.bitsandbytes__nf4"}`` tensors; the last one is the
        UTF-8 JSON of the non-tensor fields as uint8, like bnb packs it.
    """
    meta: dict[str, Any] = {
        "quant_type": "nf4",
        "blocksize": w.blocksize,
        "dtype": str(w.dtype).removeprefix("torch."),
        "shape": tuple(w.shape),
    }
    tensors: dict[str, torch.Tensor] = {
        "absmax": w.absmax,
        "quant_map": _table("nf4_code", w.device).clone(),
    }
    if w.double_quant:
        tensors["nested_absmax"] = w.absmax_scale
        tensors["nested_quant_map"] = w.absmax_code.clone()
        meta.update(
            nested_blocksize=ABSMAX_BLOCKSIZE,
            nested_dtype="float32",
            nested_offset=float(w.absmax_offset.item()),
        )
    blob = json.dumps(meta).encode("utf-8")
    tensors["quant_state.bitsandbytes__nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
    return tensors


def from_bnb(packed: torch.Tensor, quant_state: Any) -> NF4Weight:
    """Wrap bitsandbytes NF4 data as an :class:`NF4Weight` (no copy of the bytes).

    Args:
        packed: the uint8 packed weight from ``quantize_4bit`` / a ``Params4bit``
            (any shape, e.g. ``[ceil(n / 2), 1]``; flattened here).
        quant_state: a bitsandbytes ``QuantState`` (attributes ``absmax``,
            ``shape``, ``dtype``, ``blocksize``, ``quant_type``, ``offset``,
            ``state2``).

    Returns:
        The equivalent :class:`NF4Weight`.

    Raises:
        ConfigurationError: not NF4, unsupported storage or nested blocksize.
    """
    if getattr(quant_state, "quant_type", None) != "nf4":
        quant_type = getattr(quant_state, "quant_type", None)
        raise ConfigurationError(f"from_bnb handles nf4 only, got quant_type={quant_type!r}.")
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    blocksize = _check_blocksize(int(quant_state.blocksize))
    state2 = getattr(quant_state, "state2", None)
    w = NF4Weight(
        packed=packed.reshape(-1),
        absmax=quant_state.absmax,
        shape=torch.Size(quant_state.shape),
        dtype=quant_state.dtype,
        blocksize=blocksize,
    )
    if state2 is not None:
        if int(state2.blocksize) != ABSMAX_BLOCKSIZE:
            raise ConfigurationError(
                f"from_bnb expects the nested absmax blocksize {ABSMAX_BLOCKSIZE} that quantize_4bit uses, "
                f"got {state2.blocksize}."
            )
        w.absmax_code = state2.code.float()
        w.absmax_scale = state2.absmax.float()
        w.absmax_offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=packed.device).reshape(())
    return w
