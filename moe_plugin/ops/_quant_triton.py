"""Triton kernels behind ``ops.quant``.

They reproduce the torch implementations bit for bit: the same fp32 operations in the same order, the
IEEE reciprocal of the scale (``div_rn``; Triton's default fp32 ``/`` is approximate on NVIDIA) times each
value, an exact power-of-two round-up for UE8M0 scales, and round-to-nearest-even into float8_e4m3fn.
"""

from __future__ import annotations

import torch

from ..config import FP8_DTYPE
from ._dispatch import triton_interpreting
from ._jit import cast_for_store, fp8_group_quant, inverse_scale, kernel
from .align import _cdiv, _next_pow2

try:
    import triton.language as tl
except ImportError:  # torch-only installs: nothing here is launched
    tl = None

_ELEMENTS_PER_PROGRAM = 4096


def per_token_group_quant_fp8_triton(
    x: torch.Tensor,
    group_size: int,
    *,
    use_ue8m0: bool = False,
    column_major_scales: bool = False,
    eps: float = 1e-10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``ops.quant.per_token_group_quant_fp8``; a ragged last group is allowed."""
    k = x.shape[-1]
    groups = _cdiv(k, group_size)
    lead = x.shape[:-1]
    src = x if x.stride(-1) == 1 else x.contiguous()
    try:
        src2d = src.view(-1, k)
    except RuntimeError:
        src2d = src.contiguous().view(-1, k)
    rows = src2d.shape[0]
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    if column_major_scales and len(lead) == 1:
        scales = torch.empty_strided((rows, groups), (1, rows), dtype=torch.float32, device=x.device)
    else:
        scales = torch.empty((*lead, groups), dtype=torch.float32, device=x.device)
    scales2d = scales.view(rows, groups) if scales.is_contiguous() else scales
    if rows and k:
        group_p2 = _next_pow2(group_size)
        block_rows = max(1, min(_next_pow2(rows), _ELEMENTS_PER_PROGRAM // group_p2))
        _group_quant_kernel[(_cdiv(rows, block_rows), groups)](
            src2d,
            src2d.stride(0),
            q.view(rows, k),
            scales2d,
            scales2d.stride(0),
            scales2d.stride(1),
            rows,
            k,
            float(eps),
            GROUP=group_size,
            GROUP_P2=group_p2,
            BLOCK_ROWS=block_rows,
            USE_UE8M0=use_ue8m0,
            SOFT_ROUND=triton_interpreting(),
            num_warps=4,
        )
    return q, scales


def static_quant_fp8_triton(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clamp(x * (1 / scale), -448, 448)`` to FP8 with one scale (a one-element fp32 tensor on ``x``'s device)."""
    src = x.contiguous().view(-1)
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    numel = src.numel()
    if numel:
        _static_quant_kernel[(_cdiv(numel, _ELEMENTS_PER_PROGRAM),)](
            src, scale, q.view(-1), numel, BLOCK=_ELEMENTS_PER_PROGRAM, SOFT_ROUND=triton_interpreting(), num_warps=4
        )
    return q


@kernel
def _group_quant_kernel(
    x_ptr,
    x_stride,
    q_ptr,
    s_ptr,
    s_stride_row,
    s_stride_group,
    rows,
    K,
    eps,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    USE_UE8M0: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    g = tl.program_id(1)
    cols = g * GROUP + tl.arange(0, GROUP_P2)
    mask = (r < rows)[:, None] & ((tl.arange(0, GROUP_P2) < GROUP) & (cols < K))[None, :]
    r64 = r.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    q, scale = fp8_group_quant(x, eps, USE_UE8M0)
    tl.store(q_ptr + r64[:, None] * K + cols[None, :], cast_for_store(q, q_ptr.dtype.element_ty, SOFT_ROUND), mask=mask)
    tl.store(s_ptr + r64 * s_stride_row + g * s_stride_group, scale, mask=r < rows)


@kernel
def _static_quant_kernel(x_ptr, scale_ptr, q_ptr, numel, BLOCK: tl.constexpr, SOFT_ROUND: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    q = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inverse_scale(tl.load(scale_ptr).to(tl.float32))
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    tl.store(q_ptr + offs, cast_for_store(q, q_ptr.dtype.element_ty, SOFT_ROUND), mask=mask)
