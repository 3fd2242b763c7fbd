"""Expert-major permutation of the routed tokens and its inverse.

``moe_permute`` / ``moe_unpermute`` follow vLLM's ops of the same name; ``ep_scatter`` / ``ep_gather`` and
``compute_aligned_M`` follow vLLM's ``deep_gemm_utils`` (the layout of DeepGEMM's m-grouped contiguous
GEMM). Both permutations place the routed slots (flat index ``t * top_k + j``) expert by expert, experts
in ascending local id, and within an expert in ascending flat index; the sort is the engine of
``ops.align`` with the local expert id as key.

A slot is *local* when its expert id maps (through ``expert_map``, or as itself without one) to a local
expert in ``[0, n_local)``. Other slots are not placed: their ``inv`` entry is -1 and the inverse
operations skip them, so their contribution to the output is zero (the owning rank adds it).

Rows of the permuted buffers that hold no slot (alignment padding, the unused tail) are not written; their
contents are whatever the buffer held. Only ``m_indices`` is defined everywhere.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ._dispatch import triton_interpreting, use_triton
from ._jit import cast_for_store, fp8_group_quant, kernel
from ..config import FP8_DTYPE
from .quant import DEFAULT_EPS, per_token_group_quant_fp8_torch
from .align import (
    SlotSortOutputs,
    _check_expert_map,
    _check_positive_int,
    _check_topk_ids,
    _cdiv,
    _next_pow2,
    sort_slots_torch,
    sort_slots_triton,
)

try:
    import triton.language as tl
except ImportError:  # torch-only installs: the kernels below are never launched
    tl = None

# Bytes each program of the row copies moves per row (scatter: read once, written per slot; gather: read
# per slot). On an H100, 2, 4 and 8 KB time the same within 1 % (16 KB is up to 17 % slower), and a gather
# that loads all of a token's slots in one 2-D load was up to 5 % slower (docs/benchmarks.md).
_SCATTER_BYTES_PER_PROGRAM = 4096
_GATHER_BYTES_PER_PROGRAM = 4096
# Source bytes per program of the quantizing scatter.
_QUANT_SCATTER_BYTES = 4096
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ----------------------------------------------------------------------------------------------------
# helpers


def _warps(bytes_per_row: int) -> int:
    """Warps for a row-copy program: 4 up to 4 KB per row, 8 from 8 KB."""
    return max(4, min(8, bytes_per_row // 1024))


def _round_up(x: int, m: int) -> int:
    return _cdiv(x, m) * m


def _check_hidden(hidden: object, name: str) -> torch.Tensor:
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [num_rows, hidden], got {type(hidden).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"{name} must be 2-D [num_rows, hidden], got shape {tuple(hidden.shape)}")
    row_bytes = hidden.shape[1] * hidden.element_size()
    if row_bytes % 16:
        raise ValueError(
            f"{name} rows must be a multiple of 16 bytes (hidden * element size), got {hidden.shape[1]} x "
            f"{hidden.element_size()} B = {row_bytes} B; pad the hidden dimension"
        )
    if hidden.stride(1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {hidden.stride()}")
    return hidden


def _check_same_device(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} like {ref_name}, got {t.device}")


def _check_token_scales(scale: torch.Tensor | None, n_token: int, hidden: torch.Tensor, name: str) -> torch.Tensor | None:
    """Per-token(-group) scales ``[n_token, G]`` travel with their rows; anything of one dimension is a
    per-tensor scale and is left alone (returned as None here)."""
    if scale is None:
        return None
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(scale).__name__}")
    if scale.dim() <= 1:
        return None
    if scale.dim() != 2 or scale.shape[0] != n_token:
        raise ValueError(f"{name} must be [{n_token}, groups] (per token) or per-tensor, got shape {tuple(scale.shape)}")
    _check_same_device(scale, hidden, name, "hidden_states")
    return scale


def _as_int(t: torch.Tensor) -> torch.Tensor:
    """Bit-exact view for copying rows of any dtype (fp8 included)."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def _local_keys_torch(topk_ids: torch.Tensor, n_local: int, expert_map: torch.Tensor | None) -> torch.Tensor:
    ids = topk_ids.reshape(-1).long()
    if expert_map is None:
        return torch.where((ids >= 0) & (ids < n_local), ids, torch.full_like(ids, -1))
    in_range = (ids >= 0) & (ids < expert_map.numel())
    keys = expert_map.long()[ids.clamp(0, max(expert_map.numel() - 1, 0))]
    return torch.where(in_range & (keys < n_local), keys, torch.full_like(ids, -1))


def _sort_local(
    topk_ids: torch.Tensor, n_local: int, expert_map: torch.Tensor | None, block: int, out: SlotSortOutputs
) -> None:
    if use_triton(topk_ids):
        if expert_map is None:
            sort_slots_triton(topk_ids.reshape(-1).contiguous(), topk_ids.shape[1], n_local, block, out)
        else:
            sort_slots_triton(topk_ids.reshape(-1).contiguous(), topk_ids.shape[1], n_local, block, out, key_map=expert_map)
    else:
        sort_slots_torch(_local_keys_torch(topk_ids, n_local, expert_map), n_local, block, out)


def _scatter_rows(
    hidden: torch.Tensor,
    scales: torch.Tensor | None,
    inv: torch.Tensor,
    top_k: int,
    out: torch.Tensor,
    out_scales: torch.Tensor | None,
) -> None:
    """``out[inv[t * top_k + j]] = hidden[t]`` (and the scales) for every placed slot."""
    n_token = hidden.shape[0]
    if n_token == 0 or top_k == 0:
        return
    if use_triton(hidden):
        src, dst = _as_int(hidden), _as_int(out)
        block_k = min(_next_pow2(hidden.shape[1]), max(16, _SCATTER_BYTES_PER_PROGRAM // hidden.element_size()))
        grid = (n_token, _cdiv(hidden.shape[1], block_k))
        _scatter_rows_kernel[grid](
            src,
            src.stride(0),
            inv,
            dst,
            dst.stride(0),
            out.shape[0],
            hidden.shape[1],
            scales if scales is not None else inv,
            scales.stride(0) if scales is not None else 0,
            scales.stride(1) if scales is not None else 0,
            out_scales if out_scales is not None else inv,
            out_scales.stride(0) if out_scales is not None else 0,
            out_scales.stride(1) if out_scales is not None else 0,
            scales.shape[1] if scales is not None else 0,
            TOP_K=top_k,
            TOP_K_P2=_next_pow2(top_k),
            BLOCK_K=block_k,
            HAS_SCALES=scales is not None,
            BLOCK_G=_next_pow2(scales.shape[1]) if scales is not None else 1,
            num_warps=_warps(block_k * hidden.element_size()),
        )
        return
    dest = inv.reshape(-1).long()
    placed = (dest >= 0) & (dest < out.shape[0])
    src_rows = torch.arange(dest.numel(), device=dest.device)[placed] // top_k
    out[dest[placed]] = hidden[src_rows]
    if scales is not None:
        out_scales[dest[placed]] = scales[src_rows].to(out_scales.dtype)


def _scatter_quant_rows(
    hidden: torch.Tensor,
    inv: torch.Tensor,
    top_k: int,
    group_size: int,
    use_ue8m0: bool,
    out: torch.Tensor,
    out_scales: torch.Tensor,
) -> None:
    """``_scatter_rows`` of ``per_token_group_quant_fp8(hidden)``, quantizing each row once, in the same
    pass: tokens with no local slot are neither read nor quantized."""
    n_token, k = hidden.shape
    if n_token == 0 or top_k == 0:
        return
    groups = k // group_size
    if use_triton(hidden) and group_size == _next_pow2(group_size):
        block_cols = _gather_block(k, max(group_size, _QUANT_SCATTER_BYTES // hidden.element_size()))
        groups_per_program = max(1, block_cols // group_size)
        _scatter_quant_rows_kernel[(n_token, _cdiv(groups, groups_per_program))](
            hidden,
            hidden.stride(0),
            inv,
            out,
            out.stride(0),
            out.shape[0],
            out_scales,
            out_scales.stride(0),
            out_scales.stride(1),
            groups,
            DEFAULT_EPS,
            TOP_K=top_k,
            TOP_K_P2=_next_pow2(top_k),
            GROUP=group_size,
            GROUPS_PER_PROGRAM=groups_per_program,
            USE_UE8M0=use_ue8m0,
            SOFT_ROUND=triton_interpreting(),
            num_warps=_warps(block_cols * hidden.element_size()),
        )
        return
    dest = inv.reshape(n_token, top_k)
    needed = ((dest >= 0) & (dest < out.shape[0])).any(dim=1)
    q = torch.empty((n_token, k), dtype=out.dtype, device=hidden.device)
    scales = torch.empty((n_token, groups), dtype=torch.float32, device=hidden.device)
    if bool(needed.any()):
        q[needed], scales[needed] = per_token_group_quant_fp8_torch(hidden[needed], group_size, use_ue8m0=use_ue8m0)
    _scatter_rows(q, scales, inv, top_k, out, out_scales)


def _gather_rows(
    permuted: torch.Tensor,
    weights: torch.Tensor | None,
    inv: torch.Tensor,
    out: torch.Tensor,
    limit: torch.Tensor | None,
    top_k: int | None = None,
) -> None:
    """``out[t] = sum_j weights[t, j] * permuted[inv[t * top_k + j]]`` over slots with
    ``0 <= inv < limit`` (``limit`` a one-element device tensor, else the number of rows), in fp32.
    ``weights=None`` sums the rows unweighted (then ``top_k`` is needed)."""
    if weights is not None:
        n_token, top_k = weights.shape
    else:
        n_token = inv.numel() // top_k if top_k else 0
    if n_token == 0:
        return
    if use_triton(permuted):
        block_k = _gather_block(out.shape[1], max(16, _GATHER_BYTES_PER_PROGRAM // max(permuted.element_size(), 2)))
        grid = (n_token, _cdiv(out.shape[1], block_k))
        _gather_rows_kernel[grid](
            permuted,
            permuted.stride(0),
            permuted.shape[0],
            limit if limit is not None else inv,
            inv,
            weights if weights is not None else inv,
            weights.stride(0) if weights is not None else 0,
            weights.stride(1) if weights is not None else 0,
            out,
            out.stride(0),
            out.shape[1],
            TOP_K=top_k,
            BLOCK_K=block_k,
            HAS_LIMIT=limit is not None,
            HAS_WEIGHTS=weights is not None,
            SOFT_ROUND=triton_interpreting(),
            num_warps=_warps(block_k * permuted.element_size()),
        )
        return
    dest = inv.reshape(n_token, top_k).long()
    bound = permuted.shape[0] if limit is None else min(int(limit.reshape(-1)[0]), permuted.shape[0])
    ok = (dest >= 0) & (dest < bound)
    rows = permuted[dest.clamp(0, max(permuted.shape[0] - 1, 0))].float() if permuted.shape[0] else None
    if rows is None:
        out.zero_()
        return
    wf = weights.float() if weights is not None else torch.ones(dest.shape, device=dest.device)
    w = torch.where(ok, wf, torch.zeros((), device=dest.device))
    rows = torch.where(ok[..., None], rows, torch.zeros((), device=rows.device))
    acc = torch.zeros((n_token, out.shape[1]), dtype=torch.float32, device=out.device)
    for j in range(top_k):
        acc += rows[:, j] * w[:, j, None]
    out.copy_(acc)


def _gather_block(k: int, cap: int) -> int:
    """Columns per gather program: the power of two up to ``cap`` that leaves the fewest masked-off lanes
    in the last program of a row (K = 7168 with 2048 would idle an eighth of the lanes; 1024 divides it)."""
    best = min(_next_pow2(k), cap)
    waste = _cdiv(k, best) * best - k
    b = best // 2
    while b >= max(16, best // 4) and waste:
        w = _cdiv(k, b) * b - k
        if w < waste:
            best, waste = b, w
        b //= 2
    return best


@kernel
def _scatter_rows_kernel(
    src_ptr,
    src_stride,
    inv_ptr,
    dst_ptr,
    dst_stride,
    dst_rows,
    K,
    scale_ptr,
    scale_stride0,
    scale_stride1,
    scale_out_ptr,
    scale_out_stride0,
    scale_out_stride1,
    G,
    TOP_K: tl.constexpr,
    TOP_K_P2: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    # Token-major: each row tile is read once and written to all of its token's destinations. Per slot a
    # scalar branch, not a [TOP_K, BLOCK_K] masked store: with expert parallelism most slots are placed on
    # other ranks, and a masked-off lane still costs its instructions (the 2-D form kept the copy
    # issue-bound, at half the DRAM bandwidth).
    token = tl.program_id(0)
    kb = tl.program_id(1)
    j = tl.arange(0, TOP_K_P2)
    dest = tl.load(inv_ptr + token * TOP_K + j, mask=j < TOP_K, other=-1)
    n_placed = tl.sum(((dest >= 0) & (dest < dst_rows)).to(tl.int32), axis=0)
    # A token none of whose slots is placed here (EP: its experts live on other ranks) is not read at all.
    if n_placed > 0:
        cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        row = tl.load(src_ptr + token.to(tl.int64) * src_stride + cols, mask=col_ok)
        if HAS_SCALES:
            g = tl.arange(0, BLOCK_G)
            g_ok = g < G
            s = tl.load(scale_ptr + token.to(tl.int64) * scale_stride0 + g * scale_stride1, mask=g_ok)
        for jj in tl.static_range(TOP_K):
            d = tl.load(inv_ptr + token * TOP_K + jj)
            if (d >= 0) & (d < dst_rows):
                d64 = d.to(tl.int64)
                tl.store(dst_ptr + d64 * dst_stride + cols, row, mask=col_ok)
                if HAS_SCALES:
                    if kb == 0:
                        tl.store(scale_out_ptr + d64 * scale_out_stride0 + g * scale_out_stride1, s, mask=g_ok)


@kernel
def _scatter_quant_rows_kernel(
    src_ptr,
    src_stride,
    inv_ptr,
    dst_ptr,
    dst_stride,
    dst_rows,
    scale_out_ptr,
    scale_out_stride0,
    scale_out_stride1,
    groups,
    eps,
    TOP_K: tl.constexpr,
    TOP_K_P2: tl.constexpr,
    GROUP: tl.constexpr,
    GROUPS_PER_PROGRAM: tl.constexpr,
    USE_UE8M0: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
):
    token = tl.program_id(0)
    j = tl.arange(0, TOP_K_P2)
    dest = tl.load(inv_ptr + token * TOP_K + j, mask=j < TOP_K, other=-1)
    n_placed = tl.sum(((dest >= 0) & (dest < dst_rows)).to(tl.int32), axis=0)
    # A token none of whose slots is placed here (EP: its experts live on other ranks) is not read at all.
    if n_placed > 0:
        g = tl.program_id(1) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
        g_ok = g < groups
        cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        x = tl.load(src_ptr + token.to(tl.int64) * src_stride + cols, mask=g_ok[:, None], other=0.0)
        q, scale = fp8_group_quant(x.to(tl.float32), eps, USE_UE8M0)
        q = cast_for_store(q, dst_ptr.dtype.element_ty, SOFT_ROUND)
        for jj in tl.static_range(TOP_K):
            d = tl.load(inv_ptr + token * TOP_K + jj)
            if (d >= 0) & (d < dst_rows):
                d64 = d.to(tl.int64)
                tl.store(dst_ptr + d64 * dst_stride + cols, q, mask=g_ok[:, None])
                tl.store(scale_out_ptr + d64 * scale_out_stride0 + g * scale_out_stride1, scale, mask=g_ok)


@kernel
def _gather_rows_kernel(
    src_ptr,
    src_stride,
    src_rows,
    limit_ptr,
    inv_ptr,
    w_ptr,
    w_stride0,
    w_stride1,
    out_ptr,
    out_stride,
    K,
    TOP_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
):
    token = tl.program_id(0)
    kb = tl.program_id(1)
    bound = src_rows
    if HAS_LIMIT:
        bound = tl.minimum(tl.load(limit_ptr).to(tl.int32), src_rows)
    cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    acc = tl.zeros((BLOCK_K,), tl.float32)
    # Slots in order j = 0, 1, ...: the torch path sums in the same order. A slot that is not here (another
    # rank's expert, dropped) costs one scalar load: a scalar branch skips its row, where a masked load
    # still spent the instructions of every lane (that kept the gather issue-bound at half the DRAM
    # bandwidth when most slots are remote).
    for j in tl.static_range(TOP_K):
        dest = tl.load(inv_ptr + token * TOP_K + j)
        if (dest >= 0) & (dest < bound):
            row = tl.load(src_ptr + dest.to(tl.int64) * src_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
            if HAS_WEIGHTS:
                w = tl.load(w_ptr + token.to(tl.int64) * w_stride0 + j * w_stride1).to(tl.float32)
                row = row * w
            acc += row
    out = cast_for_store(acc, out_ptr.dtype.element_ty, SOFT_ROUND)
    tl.store(out_ptr + token.to(tl.int64) * out_stride + cols, out, mask=col_ok)


# ----------------------------------------------------------------------------------------------------
# moe_permute / moe_unpermute


def permuted_row_size(n_token: int, top_k: int, n_expert: int, align_block_size: int | None) -> int:
    """Rows of ``moe_permute``'s output: ``n_token * top_k``, or with alignment the worst case
    ``round_up(n_token * top_k + n_expert * (align - 1), align)``."""
    rows = n_token * top_k
    if align_block_size is not None:
        rows = _round_up(rows + n_expert * (align_block_size - 1), align_block_size)
    return rows


def moe_permute(
    hidden_states: torch.Tensor,
    a1q_scale: torch.Tensor | None,
    topk_ids: torch.Tensor,
    n_expert: int,
    n_local_expert: int = -1,
    expert_map: torch.Tensor | None = None,
    align_block_size: int | None = None,
    fill_invalid_expert: int = -1,
    permuted_hidden_states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather each local expert's tokens into one contiguous run of rows.

    Returns ``(permuted_hidden_states [R, K], a1q_scale, expert_first_token_offset [n_local + 1] int64,
    inv_permuted_idx [n_token * top_k] int32, m_indices [R] int32)`` with ``R = permuted_row_size(...)``.

    - ``expert_first_token_offset[e]`` is the first row of local expert ``e``; the last entry is the end of
      the last expert. With ``align_block_size`` every expert starts on a multiple of it (DeepGEMM).
    - ``inv_permuted_idx[t * top_k + j]`` is the row of that slot, -1 when its expert is not local.
    - ``m_indices[r]`` is the local expert owning row ``r`` (alignment padding included) when
      ``align_block_size`` is given; every other entry is ``fill_invalid_expert``.
    - ``a1q_scale`` of per-token(-group) shape ``[n_token, G]`` comes back as ``[R, G]`` with each row's
      scale moved with it; a per-tensor scale comes back unchanged.

    ``n_local_expert = -1`` means ``n_expert``. Without ``expert_map`` the local experts are ids
    ``[0, n_local_expert)``.
    """
    hidden_states = _check_hidden(hidden_states, "hidden_states")
    topk_ids = _check_topk_ids(topk_ids)
    _check_same_device(topk_ids, hidden_states, "topk_ids", "hidden_states")
    n_token, k_hidden = hidden_states.shape
    if topk_ids.shape[0] != n_token:
        raise ValueError(f"topk_ids must be [{n_token}, top_k] like hidden_states' rows, got {tuple(topk_ids.shape)}")
    n_expert = _check_positive_int(n_expert, "n_expert")
    if n_local_expert == -1:
        n_local_expert = n_expert
    n_local_expert = _check_positive_int(n_local_expert, "n_local_expert")
    if n_local_expert > n_expert:
        raise ValueError(f"n_local_expert ({n_local_expert}) must be <= n_expert ({n_expert})")
    expert_map = _check_expert_map(expert_map, n_expert, hidden_states.device)
    if align_block_size is not None:
        align_block_size = _check_positive_int(align_block_size, "align_block_size")
    if not isinstance(fill_invalid_expert, int):
        raise TypeError(f"fill_invalid_expert must be an int, got {type(fill_invalid_expert).__name__}")
    scales = _check_token_scales(a1q_scale, n_token, hidden_states, "a1q_scale")

    top_k = topk_ids.shape[1]
    rows = permuted_row_size(n_token, top_k, n_expert, align_block_size)
    device = hidden_states.device
    if permuted_hidden_states is None:
        permuted_hidden_states = torch.empty((rows, k_hidden), dtype=hidden_states.dtype, device=device)
    elif (
        not isinstance(permuted_hidden_states, torch.Tensor)
        or tuple(permuted_hidden_states.shape) != (rows, k_hidden)
        or permuted_hidden_states.dtype != hidden_states.dtype
        or permuted_hidden_states.device != device
        or permuted_hidden_states.stride(1) != 1
    ):
        raise ValueError(
            f"permuted_hidden_states must be a {hidden_states.dtype} tensor of shape {(rows, k_hidden)} on {device} "
            f"with a contiguous last dimension, got "
            f"{getattr(permuted_hidden_states, 'dtype', None)} {tuple(getattr(permuted_hidden_states, 'shape', ()))}"
        )

    offsets = torch.empty((n_local_expert + 1,), dtype=torch.int64, device=device)
    inv = torch.empty((n_token * top_k,), dtype=torch.int32, device=device)
    if align_block_size is not None:
        m_indices = torch.empty((rows,), dtype=torch.int32, device=device)
        sort_out = SlotSortOutputs(
            inv=inv, offsets=offsets, block_keys=m_indices, block_tail=fill_invalid_expert, block_repeat=align_block_size
        )
    else:
        m_indices = torch.full((rows,), fill_invalid_expert, dtype=torch.int32, device=device)
        sort_out = SlotSortOutputs(inv=inv, offsets=offsets)
    _sort_local(topk_ids, n_local_expert, expert_map, align_block_size or 1, sort_out)

    out_scales = None
    if scales is not None:
        out_scales = torch.empty((rows, scales.shape[1]), dtype=scales.dtype, device=device)
    _scatter_rows(hidden_states, scales, inv, top_k, permuted_hidden_states, out_scales)
    return (
        permuted_hidden_states,
        out_scales if scales is not None else a1q_scale,
        offsets,
        inv,
        m_indices,
    )


def moe_unpermute(
    out: torch.Tensor,
    permuted_hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    inv_permuted_idx: torch.Tensor,
    expert_first_token_offset: torch.Tensor | None = None,
) -> None:
    """``out[t] = sum_j topk_weights[t, j] * permuted_hidden_states[inv_permuted_idx[t * top_k + j]]`` in fp32,
    written in ``out``'s dtype.

    Slots with ``inv_permuted_idx < 0`` (non-local) are skipped, and so are rows at or past
    ``expert_first_token_offset[-1]`` when it is given (read on the device).
    """
    permuted_hidden_states = _check_hidden(permuted_hidden_states, "permuted_hidden_states")
    weights, inv = _check_weights_and_inv(topk_weights, inv_permuted_idx, permuted_hidden_states)
    _check_out(out, weights.shape[0], permuted_hidden_states)
    limit = None
    if expert_first_token_offset is not None:
        if not isinstance(expert_first_token_offset, torch.Tensor) or expert_first_token_offset.dim() != 1:
            raise ValueError("expert_first_token_offset must be the 1-D [n_local + 1] tensor moe_permute returned")
        _check_same_device(expert_first_token_offset, permuted_hidden_states, "expert_first_token_offset", "permuted_hidden_states")
        limit = expert_first_token_offset[-1:]
    _gather_rows(permuted_hidden_states, weights, inv, out, limit)


def _check_weights_and_inv(
    topk_weights: object, inv: object, permuted: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(topk_weights, torch.Tensor) or topk_weights.dim() != 2:
        raise ValueError(f"topk_weights must be a 2-D tensor [num_tokens, top_k], got {getattr(topk_weights, 'shape', topk_weights)!r}")
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights must be floating point, got {topk_weights.dtype}")
    if not isinstance(inv, torch.Tensor) or inv.numel() != topk_weights.numel():
        raise ValueError(
            f"the inverse index must hold num_tokens * top_k = {topk_weights.numel()} entries, got "
            f"{tuple(getattr(inv, 'shape', ()))}"
        )
    if inv.dtype != torch.int32:
        raise TypeError(f"the inverse index must be int32 (as returned by the permutation), got {inv.dtype}")
    _check_same_device(topk_weights, permuted, "topk_weights", "permuted_hidden_states")
    _check_same_device(inv, permuted, "inverse index", "permuted_hidden_states")
    return topk_weights, inv.reshape(-1).contiguous()


def _check_out(out: object, n_token: int, permuted: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n_token, permuted.shape[1]):
        raise ValueError(
            f"out must be a tensor of shape {(n_token, permuted.shape[1])}, got {tuple(getattr(out, 'shape', ()))}"
        )
    if out.stride(1) != 1 or not out.is_floating_point():
        raise ValueError(f"out must be floating point with a contiguous last dimension, got {out.dtype} strides {out.stride()}")
    _check_same_device(out, permuted, "out", "permuted_hidden_states")


# ----------------------------------------------------------------------------------------------------
# DeepGEMM contiguous layout: compute_aligned_M, ep_scatter, ep_gather


def compute_aligned_M(
    M: int,
    num_topk: int,
    local_num_experts: int,
    alignment: int,
    expert_tokens_meta: Any = None,
) -> int:
    """Rows of the contiguous layout: exact when the per-expert counts are on the host
    (``expert_tokens_meta.expert_num_tokens_cpu``), else the worst case
    ``round_up(M * num_topk + min(M * num_topk, local_num_experts) * (alignment - 1), alignment)``."""
    counts_cpu = getattr(expert_tokens_meta, "expert_num_tokens_cpu", None)
    if counts_cpu is not None:
        counts = counts_cpu.to(torch.int64)
        return int(((counts + alignment - 1) // alignment * alignment).sum())
    slots = M * num_topk
    return _round_up(slots + min(slots, local_num_experts) * (alignment - 1), alignment)


class EpScatterResult(NamedTuple):
    hidden_states: torch.Tensor
    """``[m_sum, K]``: each local expert's rows start on a multiple of ``alignment``."""
    scales: torch.Tensor | None
    """``[m_sum, G]`` per-token-group scales moved with their rows (None without input scales)."""
    m_indices: torch.Tensor
    """``[m_sum]`` int32: local expert of each row (padding included), ``fill_invalid_expert`` past the end."""
    inv_perm: torch.Tensor
    """``[M, top_k]`` int32: row of each slot, -1 for slots of non-local experts."""
    expert_num_tokens: torch.Tensor
    """``[E_local]`` int32: slots per local expert (unpadded)."""


def ep_scatter(
    hidden_states: torch.Tensor,
    hidden_scales: torch.Tensor | None,
    topk_ids: torch.Tensor,
    num_local_experts: int,
    expert_map: torch.Tensor | None = None,
    *,
    alignment: int = 128,
    m_sum: int | None = None,
    fill_invalid_expert: int = 0,
    out: torch.Tensor | None = None,
    out_scales: torch.Tensor | None = None,
    quant_group_size: int | None = None,
    use_ue8m0: bool = False,
) -> EpScatterResult:
    """Scatter tokens (and their per-token-group scales) into DeepGEMM's m-grouped contiguous layout.

    ``m_sum`` defaults to ``compute_aligned_M(M, top_k, num_local_experts, alignment)``; a smaller value
    (exact host-side counts) must still cover the aligned total. Rows past ``m_sum`` are never written.
    ``fill_invalid_expert`` (default 0, as DeepGEMM versions without -1 support need) labels the rows past
    the last expert's padded run in ``m_indices``.

    With ``quant_group_size``, ``hidden_states`` (bf16 / fp16 / fp32, no ``hidden_scales``) is quantized on
    the way: the rows land as FP8 with per-token-group scales exactly as ``per_token_group_quant_fp8(...,
    use_ue8m0=use_ue8m0)`` followed by the plain scatter would give, in one pass that reads each token
    with a local slot once and skips the others.
    """
    hidden_states = _check_hidden(hidden_states, "hidden_states")
    topk_ids = _check_topk_ids(topk_ids)
    _check_same_device(topk_ids, hidden_states, "topk_ids", "hidden_states")
    n_token, k_hidden = hidden_states.shape
    if topk_ids.shape[0] != n_token:
        raise ValueError(f"topk_ids must be [{n_token}, top_k] like hidden_states' rows, got {tuple(topk_ids.shape)}")
    num_local_experts = _check_positive_int(num_local_experts, "num_local_experts")
    alignment = _check_positive_int(alignment, "alignment")
    if expert_map is not None:
        if not isinstance(expert_map, torch.Tensor) or expert_map.dim() != 1:
            raise ValueError(f"expert_map must be a 1-D tensor [num_global_experts] or None, got {getattr(expert_map, 'shape', expert_map)!r}")
        expert_map = _check_expert_map(expert_map, expert_map.shape[0], hidden_states.device)
    out_dtype = hidden_states.dtype
    scales = None
    if quant_group_size is not None:
        quant_group_size = _check_positive_int(quant_group_size, "quant_group_size")
        if hidden_states.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"hidden_states must be bf16, fp16 or fp32 to quantize (quant_group_size), got {hidden_states.dtype}")
        if hidden_scales is not None:
            raise ValueError("hidden_scales must be None with quant_group_size: the scatter computes the scales")
        if k_hidden % quant_group_size:
            raise ValueError(f"hidden_states' hidden size {k_hidden} must be a multiple of quant_group_size={quant_group_size}")
        out_dtype = FP8_DTYPE
        scale_groups = k_hidden // quant_group_size
    elif hidden_scales is not None:
        scales = _check_token_scales(hidden_scales, n_token, hidden_states, "hidden_scales")
        if scales is None:
            raise ValueError(f"hidden_scales must be per token [{n_token}, groups], got shape {tuple(hidden_scales.shape)}")
        scale_groups = scales.shape[1]
    top_k = topk_ids.shape[1]
    if m_sum is None:
        m_sum = compute_aligned_M(n_token, top_k, num_local_experts, alignment)
    if not isinstance(m_sum, int) or m_sum < 0 or m_sum % alignment:
        raise ValueError(f"m_sum must be a non-negative multiple of alignment={alignment}, got {m_sum!r}")

    device = hidden_states.device
    if out is None:
        out = torch.empty((m_sum, k_hidden), dtype=out_dtype, device=device)
    elif tuple(out.shape) != (m_sum, k_hidden) or out.dtype != out_dtype or out.stride(1) != 1:
        raise ValueError(f"out must be a contiguous-row {out_dtype} tensor of shape {(m_sum, k_hidden)}, got {out.dtype} {tuple(out.shape)}")
    if scales is not None or quant_group_size is not None:
        if out_scales is None:
            out_scales = torch.empty((m_sum, scale_groups), dtype=torch.float32, device=device)
        elif tuple(out_scales.shape) != (m_sum, scale_groups) or out_scales.dtype != torch.float32:
            raise ValueError(f"out_scales must be float32 of shape {(m_sum, scale_groups)}, got {out_scales.dtype} {tuple(out_scales.shape)}")
    else:
        out_scales = None

    m_indices = torch.empty((m_sum,), dtype=torch.int32, device=device)
    inv = torch.empty((n_token * top_k,), dtype=torch.int32, device=device)
    counts = torch.empty((num_local_experts,), dtype=torch.int32, device=device)
    sort_out = SlotSortOutputs(
        inv=inv, counts=counts, block_keys=m_indices, block_tail=fill_invalid_expert, block_repeat=alignment
    )
    _sort_local(topk_ids, num_local_experts, expert_map, alignment, sort_out)
    if quant_group_size is not None:
        _scatter_quant_rows(hidden_states, inv, top_k, quant_group_size, use_ue8m0, out, out_scales)
    else:
        _scatter_rows(hidden_states, scales, inv, top_k, out, out_scales)
    return EpScatterResult(out, out_scales, m_indices, inv.view(n_token, top_k), counts)


def ep_gather(
    permuted_hidden_states: torch.Tensor,
    topk_weights: torch.Tensor | None,
    inv_perm: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of ``ep_scatter``: ``out[t] = sum_j topk_weights[t, j] * permuted[inv_perm[t, j]]`` over the
    local slots (``inv_perm >= 0``), accumulated in fp32. ``out`` defaults to the permuted dtype.

    ``topk_weights=None`` sums unweighted (the weights were applied on the input), with no ones tensor
    built for it; ``inv_perm`` must then be the ``[M, top_k]`` ``ep_scatter`` returned."""
    permuted_hidden_states = _check_hidden(permuted_hidden_states, "permuted_hidden_states")
    if topk_weights is None:
        if not isinstance(inv_perm, torch.Tensor) or inv_perm.dim() != 2:
            raise ValueError(
                "without topk_weights, inv_perm must be the 2-D [num_tokens, top_k] tensor ep_scatter returned, got "
                f"{getattr(inv_perm, 'shape', inv_perm)!r}"
            )
        n_token, top_k = inv_perm.shape
        if inv_perm.dtype != torch.int32:
            raise TypeError(f"inv_perm must be int32 (as returned by ep_scatter), got {inv_perm.dtype}")
        _check_same_device(inv_perm, permuted_hidden_states, "inv_perm", "permuted_hidden_states")
        inv = inv_perm.reshape(-1).contiguous()
    else:
        weights, inv = _check_weights_and_inv(topk_weights, inv_perm, permuted_hidden_states)
        n_token, top_k = weights.shape
    if out is None:
        out = torch.empty(
            (n_token, permuted_hidden_states.shape[1]),
            dtype=permuted_hidden_states.dtype,
            device=permuted_hidden_states.device,
        )
    _check_out(out, n_token, permuted_hidden_states)
    _gather_rows(permuted_hidden_states, topk_weights, inv, out, None, top_k)
    return out
