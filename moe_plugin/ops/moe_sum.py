"""``moe_sum``: reduce the per-slot expert outputs ``[M, top_k, K]`` over ``top_k`` (fp32 accumulation).

One op for both reductions of the pipeline: the plain sum over the top-k slots, and the Triton experts'
final reduction, which also skips the slots of experts on other ranks (they were never computed), adds
split-K partials and can read the number of valid tokens on the device (one captured CUDA graph per
buffer size).

Slots are added in order ``j = 0, 1, ...`` (and within a slot the split-K partials in order) in both
implementations, so they agree up to fused multiply-add contraction on the GPU.
"""

from __future__ import annotations

import torch

from ._dispatch import triton_interpreting, use_triton
from ._jit import cast_for_store, kernel, load_valid_count
from .align import _cdiv, _check_valid_tokens, _next_pow2

try:
    import triton.language as tl
except ImportError:  # torch-only installs: the kernel below is never launched
    tl = None

_BYTES_PER_PROGRAM = 4096
"""Dense sums: columns per program, in bytes of ``x``'s dtype."""

_ROUTED_BLOCK_K = 1024
_ROUTED_TILE = 4096
"""Routed sums: at most this many (token, column) elements per program, 16 tokens at most."""


def moe_sum(
    x: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    topk_ids: torch.Tensor | None = None,
    num_experts: int | None = None,
    expert_map: torch.Tensor | None = None,
    valid_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[m, :] = sum_j x[m, j, :]`` accumulated in fp32, stored in ``out``'s dtype (default ``x.dtype``).

    ``x`` is ``[M, top_k, K]``, or ``[split_k, M, top_k, K]``: split-K partials, summed as well.

    ``topk_ids [M, top_k]`` with ``num_experts``: only the slots routed to one of this rank's
    ``num_experts`` experts are summed (``expert_map [E_global]`` maps global ids to local ones first, -1 =
    on another rank); the rows of ``x`` of the other slots are never read. ``valid_tokens`` (one-element
    int tensor on ``x``'s device, needs ``out``): only the first ``valid_tokens`` rows of ``out`` are
    written, the others keep their values, so one captured CUDA graph serves every batch up to ``M``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [M, top_k, K], got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be 3-D [M, top_k, K] or 4-D [split_k, M, top_k, K], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    x4 = x if x.dim() == 4 else x.unsqueeze(0)
    split_k, m, top_k, k = x4.shape
    if valid_tokens is not None:
        if out is None:
            raise ValueError("valid_tokens needs out: the rows past the valid tokens keep out's values")
        valid_tokens = _check_valid_tokens(valid_tokens, x.device, like="x")
    if out is None:
        out = torch.empty((m, k), dtype=x.dtype, device=x.device)
    elif not isinstance(out, torch.Tensor) or tuple(out.shape) != (m, k) or not out.is_floating_point():
        raise ValueError(f"out must be a floating-point tensor of shape {(m, k)}, got {getattr(out, 'dtype', None)} {tuple(getattr(out, 'shape', ()))}")
    elif out.device != x.device:
        raise ValueError(f"out must be on {x.device} like x, got {out.device}")
    _check_routing(x.device, m, top_k, topk_ids, num_experts, expert_map)
    if m == 0 or k == 0:
        return out
    if split_k * top_k == 0 and valid_tokens is None:
        return out.zero_()
    if topk_ids is not None:
        # The kernel reads slot (t, j) of the ids at t * top_k + j and the map at its index.
        topk_ids = topk_ids.contiguous()
        expert_map = expert_map.contiguous() if expert_map is not None else None
    if use_triton(x):
        _launch(x4, out, topk_ids, num_experts, expert_map, valid_tokens)
    else:
        _moe_sum_torch(x4, out, topk_ids, num_experts, expert_map, valid_tokens)
    return out


def _check_routing(device, m, top_k, topk_ids, num_experts, expert_map) -> None:
    if topk_ids is None:
        if num_experts is not None or expert_map is not None:
            raise ValueError("num_experts and expert_map select slots by topk_ids; topk_ids is missing")
        return
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype not in (torch.int32, torch.int64):
        got = topk_ids.dtype if isinstance(topk_ids, torch.Tensor) else type(topk_ids).__name__
        raise TypeError(f"topk_ids must be an int32/int64 tensor [M, top_k], got {got}")
    if tuple(topk_ids.shape) != (m, top_k):
        raise ValueError(f"topk_ids must have shape {(m, top_k)} like x's [M, top_k], got {tuple(topk_ids.shape)}")
    if topk_ids.device != device:
        raise ValueError(f"topk_ids must be on {device} like x, got {topk_ids.device}")
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 0:
        raise ValueError(f"num_experts (local experts) must be an int >= 0 with topk_ids, got {num_experts!r}")
    if expert_map is not None:
        int_map = isinstance(expert_map, torch.Tensor) and expert_map.dtype in (torch.int32, torch.int64)
        if not int_map or expert_map.dim() != 1:
            raise TypeError(f"expert_map must be a 1-D int32/int64 tensor [E_global], got {expert_map!r}")
        if expert_map.device != device:
            raise ValueError(f"expert_map must be on {device} like x, got {expert_map.device}")


def _launch(x4, out, topk_ids, num_experts, expert_map, valid_tokens) -> None:
    _, m, top_k, k = x4.shape
    if topk_ids is not None:
        # Routed sums pack up to 16 tokens into a program; dense sums run one token per program.
        block_k = min(_next_pow2(k), _ROUTED_BLOCK_K)
        block_t = max(2, min(_next_pow2(m), _ROUTED_TILE // block_k, 16))
    else:
        block_k = min(_next_pow2(k), max(16, _BYTES_PER_PROGRAM // x4.element_size()))
        block_t = 1
    dummy = topk_ids if topk_ids is not None else out  # stands in for absent pointers; never dereferenced
    _moe_sum_kernel[(_cdiv(m, block_t), _cdiv(k, block_k))](
        x4,
        out,
        topk_ids if topk_ids is not None else dummy,
        expert_map if expert_map is not None else dummy,
        valid_tokens if valid_tokens is not None else dummy,
        m,
        k,
        num_experts if num_experts is not None else 0,
        x4.stride(0),
        x4.stride(1),
        x4.stride(2),
        x4.stride(3),
        out.stride(0),
        out.stride(1),
        TOP_K=top_k,
        SPLIT_K=x4.shape[0],
        HAS_IDS=topk_ids is not None,
        HAS_MAP=expert_map is not None,
        HAS_VALID=valid_tokens is not None,
        BLOCK_T=block_t,
        BLOCK_K=block_k,
        SOFT_ROUND=triton_interpreting(),
        num_warps=4,
    )


def _moe_sum_torch(x4, out, topk_ids, num_experts, expert_map, valid_tokens) -> None:
    split_k, m, top_k, k = x4.shape
    rows = None
    if valid_tokens is not None:
        rows = torch.arange(m, device=x4.device) < valid_tokens.reshape(()).clamp(0, m)
    summed = None
    if topk_ids is not None:
        e = topk_ids.long()
        if rows is not None:
            e = torch.where(rows[:, None], e, -1)  # ids past the valid tokens are not read
        if expert_map is not None:
            e = torch.where(e >= 0, expert_map.long()[e.clamp(min=0)], -1)
        summed = (e >= 0) & (e < num_experts)
    acc = torch.zeros((m, k), dtype=torch.float32, device=x4.device)
    for j in range(top_k):
        for s in range(split_k):
            part = x4[s, :, j].float()
            # where, not a multiply: a skipped slot's row may hold garbage (NaN, inf)
            acc += part if summed is None else torch.where(summed[:, j, None], part, 0.0)
    if rows is None:
        out.copy_(acc)
    else:
        out.copy_(torch.where(rows[:, None], acc.to(out.dtype), out))


@kernel
def _moe_sum_kernel(
    x_ptr,
    out_ptr,
    topk_ids_ptr,
    expert_map_ptr,
    valid_ptr,
    num_tokens,
    K,
    num_experts,
    stride_xs,
    stride_xm,
    stride_xj,
    stride_xk,
    stride_om,
    stride_ok,
    TOP_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    HAS_IDS: tl.constexpr,
    HAS_MAP: tl.constexpr,
    HAS_VALID: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_tok = num_tokens
    if HAS_VALID:
        n_tok = load_valid_count(valid_ptr, num_tokens)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = toks < n_tok
    rows = toks.to(tl.int64)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = cols < K
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        ok = t_mask
        if HAS_IDS:
            e = tl.load(topk_ids_ptr + rows * TOP_K + j, mask=t_mask, other=-1)
            if HAS_MAP:
                e = tl.load(expert_map_ptr + e, mask=t_mask & (e >= 0), other=-1)
            ok = t_mask & (e >= 0) & (e < num_experts)
        for sp in tl.static_range(SPLIT_K):
            # int64: split * (slots * K) passes 2**31 at prefill sizes while both factors fit int32
            y = tl.load(
                x_ptr + sp * stride_xs.to(tl.int64) + rows[:, None] * stride_xm + j * stride_xj + cols[None, :] * stride_xk,
                mask=ok[:, None] & k_mask[None, :],
                other=0.0,
            )
            acc += y.to(tl.float32)
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_ok,
        cast_for_store(acc, out_ptr.dtype.element_ty, SOFT_ROUND),
        mask=t_mask[:, None] & k_mask[None, :],
    )
