"""The Triton NF4 dequantization kernel behind :func:`engine_kernels.nf4.nf4_dequantize` (format and math: :mod:`engine_kernels.nf4`).

One pass: each program takes ``BLOCK_BYTES`` packed bytes (whole blocks), reads each byte once, splits
its two nibbles (high = even element), looks the codes up in the 16-entry table, decodes each block's
scale once per tile (plain float32 absmax, or the double-quantized code, group scale and offset) and
writes each output element once, bit-identical to the PyTorch path.
"""

from __future__ import annotations

import torch

from engine_kernels._triton import AuditLaunch, cdiv, dtype_signature, jit, launchable, next_power_of_2, tl
from engine_kernels.nf4 import ABSMAX_BLOCKSIZE, NF4Weight, _table

#: Warps per program for weights large enough to fill them.
_NUM_WARPS = 8

#: Output bytes each thread writes: one 16-byte vector store.
_STORE_BYTES_PER_THREAD = 16


@jit
def _bf16_rne(x):
    """float32 -> bfloat16, round to nearest even, as integer ops (same as ``Tensor.to(torch.bfloat16)``).

    The GPU's native conversion rounds the same way, but Triton's CPU interpreter truncates;
    doing it explicitly keeps the interpreted kernel (what the tests run) and the compiled
    one bit-identical. NaN stays NaN (quiet), +-inf and overflow give +-inf.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = tl.where(is_nan, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@jit
def _nf4_dequant_kernel(
    packed_ptr,
    absmax_ptr,
    nf4_code_ptr,
    absmax_code_ptr,
    absmax_scale_ptr,
    absmax_offset_ptr,
    out_ptr,
    numel,
    BLOCKSIZE: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    ABSMAX_GROUP: tl.constexpr,
):
    """Dequantize ``BLOCK_BYTES`` packed bytes (``BLOCK_BYTES // (BLOCKSIZE // 2)`` whole blocks).

    The tile is ``[ROWS, HALF]`` bytes, one row per NF4 block (``HALF = BLOCKSIZE // 2``
    bytes), so each block's scale is read once and broadcast along its row.

    Args:
        packed_ptr: uint8 ``[ceil(numel / 2)]``, high nibble = earlier element.
        absmax_ptr: float32 ``[n_blocks]``, or uint8 ``[n_blocks]`` codes if ``DOUBLE_QUANT``.
        nf4_code_ptr: float32 ``[16]`` NF4 code values.
        absmax_code_ptr: float32 ``[256]`` dynamic map (read only if ``DOUBLE_QUANT``).
        absmax_scale_ptr: float32 ``[ceil(n_blocks / ABSMAX_GROUP)]`` (only if ``DOUBLE_QUANT``).
        absmax_offset_ptr: float32 ``[1]`` mean of absmax (only if ``DOUBLE_QUANT``).
        out_ptr: ``[numel]`` output (its element type is the output dtype).
        numel: number of output elements.
    """
    HALF: tl.constexpr = BLOCKSIZE // 2
    ROWS: tl.constexpr = BLOCK_BYTES // HALF
    pid = tl.program_id(0)
    byte_start = pid.to(tl.int64) * BLOCK_BYTES  # 64-bit base: tensors past 2**31 elements
    remaining = tl.minimum(numel - 2 * byte_start, 2 * BLOCK_BYTES).to(tl.int32)  # elements left in this tile

    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, HALF)
    local_byte = rows[:, None] * HALF + cols[None, :]  # [ROWS, HALF]
    byte = tl.load(packed_ptr + byte_start + local_byte, mask=2 * local_byte < remaining, other=0)
    hi = tl.load(nf4_code_ptr + (byte >> 4).to(tl.int32))  # even elements
    lo = tl.load(nf4_code_ptr + (byte & 0xF).to(tl.int32))  # odd elements

    block = pid * ROWS + rows  # [ROWS]; the block count always fits in int32
    block_mask = rows * BLOCKSIZE < remaining
    if DOUBLE_QUANT:
        code8 = tl.load(absmax_ptr + block, mask=block_mask, other=0).to(tl.int32)
        group_scale = tl.load(absmax_scale_ptr + block // ABSMAX_GROUP, mask=block_mask, other=0.0)
        scale = tl.load(absmax_code_ptr + code8) * group_scale + tl.load(absmax_offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=block_mask, other=0.0)

    values = tl.join(hi * scale[:, None], lo * scale[:, None])  # [ROWS, HALF, 2] float32 products
    values = tl.reshape(values, (ROWS, BLOCKSIZE))
    local_elem = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    out = out_ptr + 2 * byte_start + local_elem
    if out_ptr.dtype.element_ty == tl.bfloat16:
        values = _bf16_rne(values)
    else:
        values = values.to(out_ptr.dtype.element_ty)  # float16: RNE; float32 / float64: exact
    tl.store(out, values, mask=local_elem < remaining)


def _launch_config(numel: int, blocksize: int, out_element_size: int = 2) -> tuple[int, int]:
    """``(BLOCK_BYTES, num_warps)`` for dequantizing ``numel`` values in blocks of ``blocksize``.

    Each thread decodes the packed bytes of one 16-byte output vector (4 bytes for a
    bfloat16 / float16 output, 2 for float32), so the decoded pair of nibbles already sits
    in the layout of a coalesced 16-byte store (no shared-memory shuffle). A program has
    ``_NUM_WARPS`` warps: ``BLOCK_BYTES`` is 1024 for 16-bit outputs, 512 for float32;
    fewer (and fewer warps) for a small weight, never less than one block
    (``blocksize // 2`` bytes). Always a power of two, so a tile holds whole blocks.

    Args:
        numel: number of values of the weight.
        blocksize: NF4 block size (a power of two, 32..4096).
        out_element_size: bytes per output element (2, 4 or 8).

    Returns:
        ``(BLOCK_BYTES, num_warps)``.
    """
    bytes_per_thread = max(1, _STORE_BYTES_PER_THREAD // (2 * out_element_size))
    full = bytes_per_thread * 32 * _NUM_WARPS
    block_bytes = max(blocksize // 2, min(full, next_power_of_2(cdiv(numel, 2))))
    num_warps = max(1, min(_NUM_WARPS, block_bytes // (bytes_per_thread * 32)))
    return block_bytes, num_warps


def _kernel_tensors(w: NF4Weight, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The kernel's pointer arguments ``(packed, absmax, nf4_code, absmax_code, absmax_scale, absmax_offset)``.

    All float32 / uint8 and contiguous on ``device``; without double quantization the
    three double-quant arguments are the NF4 table (never read).
    """
    nf4_code = _table("nf4_code", device)
    packed = w.packed.reshape(-1)
    if not w.double_quant:
        absmax = w.absmax.to(device=device, dtype=torch.float32).contiguous()
        return packed, absmax, nf4_code, nf4_code, nf4_code, nf4_code
    w._check_double_quant()

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=torch.float32).reshape(-1).contiguous()

    codes = w.absmax.to(device=device).reshape(-1).contiguous()
    return packed, codes, nf4_code, f32(w.absmax_code), f32(w.absmax_scale), f32(w.absmax_offset)


def nf4_dequantize_triton(w: NF4Weight, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    """Dequantize ``w`` into ``out`` with :func:`_nf4_dequant_kernel` (one launch, no temporaries).

    Args:
        w: the quantized weight (``packed`` uint8 ``[ceil(numel / 2)]``).
        dtype: output dtype, ``out.dtype`` (float32, float16, bfloat16 or float64).
        out: contiguous ``[*w.shape]`` tensor of ``dtype`` on ``w``'s device (as
            :func:`nf4_dequantize` validates it); written and returned.

    Returns:
        ``out``, holding the same values as the PyTorch path.
    """
    assert out.dtype == dtype and out.is_contiguous()
    n = out.numel()
    block_bytes, num_warps = _launch_config(n, w.blocksize, out.element_size())
    packed, absmax, nf4_code, absmax_code, absmax_scale, absmax_offset = _kernel_tensors(w, out.device)
    grid = (cdiv(cdiv(n, 2), block_bytes),)
    if launchable(packed):
        _nf4_dequant_kernel[grid](
            packed,
            absmax,
            nf4_code,
            absmax_code,
            absmax_scale,
            absmax_offset,
            out.view(-1),
            n,
            BLOCKSIZE=w.blocksize,
            BLOCK_BYTES=block_bytes,
            DOUBLE_QUANT=w.double_quant,
            ABSMAX_GROUP=ABSMAX_BLOCKSIZE,
            num_warps=num_warps,
            enable_fp_fusion=False,
        )
    return out


#: (name, out_features, in_features) of the weights the audit compiles for.
_AUDIT_WEIGHTS = (
    ("llama-3.1-8b attn", 4096, 4096),
    ("llama-3.1-8b mlp", 14336, 4096),
    ("smollm2 mlp", 1536, 576),
)


def audit_launches() -> list[AuditLaunch]:
    """The launches :func:`nf4_dequantize_triton` makes for Llama-3.1-8B and SmolLM2 weights.

    Blocksize 64; output bfloat16 / float16 / float32; plain and double-quantized absmax.
    """
    launches = []
    for name, rows, cols in _AUDIT_WEIGHTS:
        numel = rows * cols
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            block_bytes, num_warps = _launch_config(numel, 64, dtype.itemsize)
            for double_quant in (False, True):
                signature = {
                    "packed_ptr": "*u8",
                    "absmax_ptr": "*u8" if double_quant else "*fp32",
                    "nf4_code_ptr": "*fp32",
                    "absmax_code_ptr": "*fp32",
                    "absmax_scale_ptr": "*fp32",
                    "absmax_offset_ptr": "*fp32",
                    "out_ptr": dtype_signature(dtype),
                    "numel": "i32" if numel < 2**31 else "i64",
                }
                dtype_name = str(dtype).removeprefix("torch.").replace("float", "fp").replace("bfp", "bf")
                launches.append(
                    AuditLaunch(
                        op="nf4_dequantize",
                        kernel=_nf4_dequant_kernel,
                        signature=signature,
                        constexprs={
                            "BLOCKSIZE": 64,
                            "BLOCK_BYTES": block_bytes,
                            "DOUBLE_QUANT": double_quant,
                            "ABSMAX_GROUP": ABSMAX_BLOCKSIZE,
                        },
                        num_warps=num_warps,
                        shape=f"{name} {rows}x{cols} {dtype_name}{' dq' if double_quant else ''}",
                        options={"enable_fp_fusion": False},
                    )
                )
    return launches


