"""Launching the elementwise GLU kernels (SwiGLU in :mod:`engine_kernels.swiglu`, GeGLU in :mod:`engine_kernels.geglu`).

Both ops have the same kernel signatures (forward ``(G, U, H, n, BLOCK)``, backward ``(DH, G, U, DG, DU, n,
BLOCK)``), grid and launch settings; only the math inside the kernels differs. This module holds the launch and
audit code they share.
"""

from __future__ import annotations

import torch

from engine_kernels._triton import AuditLaunch, cdiv, dtype_signature, launchable

#: Elements per program and warps: 4 elements per thread, enough in flight to saturate memory bandwidth.
BLOCK = 1024
NUM_WARPS = 8


def launch_forward(kernel, op: str, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run ``kernel`` over ``gate``/``up``; returns ``(gate, up, h)`` (the inputs made contiguous, to save)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"{op} needs gate and up of one shape and dtype, got {gate.shape}/{gate.dtype} "
                         f"and {up.shape}/{up.dtype}")
    gate, up = gate.contiguous(), up.contiguous()
    h = torch.empty_like(gate)
    n = gate.numel()
    if launchable(gate):
        kernel[(cdiv(n, BLOCK),)](gate, up, h, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return gate, up, h


def launch_backward(kernel, dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dgate, dup)`` from the backward ``kernel`` (every input made contiguous if it is not)."""
    dh, gate, up = dh.contiguous(), gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if launchable(dh):
        kernel[(cdiv(n, BLOCK),)](dh, gate, up, dgate, dup, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dgate, dup


def audit_launches(op: str, forward_kernel, backward_kernel) -> list[AuditLaunch]:
    """Forward and backward in bf16, fp16 and fp32 (the launch does not depend on the shape)."""
    launches = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ptr, tag = dtype_signature(dtype), str(dtype).removeprefix("torch.")
        launches.append(AuditLaunch(op, forward_kernel, {"G": ptr, "U": ptr, "H": ptr, "n": "i64"},
                                    {"BLOCK": BLOCK}, NUM_WARPS, f"any shape {tag} fwd"))
        bwd_sig = {"DH": ptr, "G": ptr, "U": ptr, "DG": ptr, "DU": ptr, "n": "i64"}
        launches.append(AuditLaunch(op, backward_kernel, bwd_sig, {"BLOCK": BLOCK}, NUM_WARPS, f"any shape {tag} bwd"))
    return launches
