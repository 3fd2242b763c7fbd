"""``moe_sum``: reduce the per-slot expert outputs ``[M, top_k, K]`` over ``top_k`` (fp32 accumulation).

Slots are added in order ``j = 0, 1, ...`` in both implementations, so they agree up to fused
multiply-add contraction on the GPU.
"""

from __future__ import annotations

import torch

from ._dispatch import triton_interpreting, use_triton
from ._jit import cast_for_store, kernel
from .align import _next_pow2

try:
    import triton.language as tl
except ImportError:  # torch-only installs: the kernel below is never launched
    tl = None

_BYTES_PER_PROGRAM = 4096


def moe_sum(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[m, :] = sum_j x[m, j, :]`` accumulated in fp32, stored in ``out``'s dtype (default ``x.dtype``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [M, top_k, K], got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D [M, top_k, K], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    m, top_k, k = x.shape
    if out is None:
        out = torch.empty((m, k), dtype=x.dtype, device=x.device)
    elif not isinstance(out, torch.Tensor) or tuple(out.shape) != (m, k) or not out.is_floating_point():
        raise ValueError(f"out must be a floating-point tensor of shape {(m, k)}, got {getattr(out, 'dtype', None)} {tuple(getattr(out, 'shape', ()))}")
    elif out.device != x.device:
        raise ValueError(f"out must be on {x.device} like x, got {out.device}")
    if m == 0 or k == 0:
        return out
    if top_k == 0:
        return out.zero_()
    if use_triton(x) and x.stride(2) == 1 and out.stride(1) == 1:
        block_k = min(_next_pow2(k), max(16, _BYTES_PER_PROGRAM // x.element_size()))
        _moe_sum_kernel[(m, -(-k // block_k))](
            x,
            x.stride(0),
            x.stride(1),
            out,
            out.stride(0),
            k,
            TOP_K=top_k,
            BLOCK_K=block_k,
            SOFT_ROUND=triton_interpreting(),
            num_warps=4,
        )
        return out
    acc = torch.zeros((m, k), dtype=torch.float32, device=x.device)
    for j in range(top_k):
        acc += x[:, j].float()
    out.copy_(acc)
    return out


@kernel
def _moe_sum_kernel(
    x_ptr, stride_m, stride_j, out_ptr, out_stride, K, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, SOFT_ROUND: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = cols < K
    acc = tl.zeros((BLOCK_K,), tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(x_ptr + row * stride_m + j * stride_j + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, cast_for_store(acc, out_ptr.dtype.element_ty, SOFT_ROUND), mask=mask)
