"""Triton grouped GEMM for MoE experts (seed 002's properties) and the two experts pipelines built on it.

One kernel, ``_moe_gemm_kernel``, serves every GEMM of both activation formats. Per output tile it
works out (expert, rows) in one of three ways (``ROUTE``):

- ``"sorted"``: vLLM's layout from ``ops.align`` -- ``sorted_token_ids`` grouped by expert and padded to
  ``BLOCK_M``, ``expert_ids`` per block, ``num_tokens_post_padded`` read on the device. Only slots of
  local experts are sorted (``expert_map`` is applied while sorting), so remote slots cost nothing.
- ``"slot"``: no sort at all (decode sizes). Program ``s`` reads every slot's expert id, and if slot ``s``
  is the first of a ``BLOCK_M``-chunk of the slots routed to its expert, it gathers that chunk and runs
  the tile; otherwise it does nothing. This replaces the three align launches with a compare over at most
  256 ids inside the GEMM prologue.
- ``"batched"``: ``[E, T, K]`` activations masked by ``expert_num_tokens`` (read on the device).

Shared properties: fp32 accumulation; tiles of remote experts are skipped (their rows are never written,
and the final reduction skips remote slots instead of summing zeros); optional routed-weight multiply;
arbitrary strides; the number of valid tokens can be read on the device so one captured CUDA graph serves
every batch up to a hint (programs stride over tiles when the hint-sized grid is short, which also gives
the optional persistent grid); fused epilogues (gated silu / gelu / swiglu, squared ReLU) so GEMM1 writes
the activation directly; split-K for GEMM2 at tiny M (fp32 partials, summed by the reduction).

FP8 w8a8: 128x128 (any ``(bn, bk)``) block scales applied per K step, or per-tensor / per-token x
per-channel scales applied once in the epilogue (zero strides express "per tensor"). The activation
between the GEMMs is quantized per token per 128 columns either in GEMM1's epilogue (when a tile holds
whole groups) or by GEMM2 as it loads its input (narrow decode tiles), never by a separate pass;
per-tensor / per-token schemes use ``ops.scheme.quantize_activation`` between the GEMMs.

Launch configs (tiles per GEMM, tuned JSON files, the shape heuristic) live in ``ops.launch_config``;
the large sorted sizes can take the TMA-fed kernel of ``ops.tma_gemm`` (``LaunchConfig.tma``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch

from ..config import FP8_DTYPE, QuantConfig, ScaleFormat, is_gated
from ._dispatch import triton_available, use_triton
from ._jit import cast_for_store, kernel, load_valid_count
from .align import _cdiv, _next_pow2
from .launch_config import (  # noqa: F401  (also reachable here, where they are used)
    CONFIG_DIR,
    CONFIG_DIR_ENV,
    FORCE_CONFIG_ENV,
    SLOT_ROUTING_MAX_SLOTS,
    TMA_MODES,
    GemmLaunch,
    LaunchConfig,
    block_shape_problem,
    config_file_name,
    device_info,
    dtype_tag,
    expected_active_experts,
    expert_grouped_raster,
    fit_stages,
    get_launch_config,
    heuristic_config,
    heuristic_for_rows,
    lookup_config_file,
    resolve_routing_mode,
)
from .moe_sum import moe_sum

try:
    import triton
    import triton.language as tl
except ImportError:  # torch-only installs: nothing here is launched (supports() rejects the backend)
    triton = None
    tl = None

logger = logging.getLogger(__name__)

FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
QUANT_EPS = 1e-10
"""Same floor as ``ops.quant`` so fused and unfused activation quantization agree."""

_ACTIVATIONS = ("silu", "gelu", "swiglu", "relu2")


# ====================================================================================================
# kernels

if tl is not None:
    from ._gemm_tiles import activate, dot_acc, expert_tile_coords, tile_coords

    @kernel
    def _slot_rows(
        slot_ids_ptr,
        expert_map_ptr,
        s,
        n_slots,
        num_experts,
        HAS_MAP: tl.constexpr,
        BLOCK_SLOTS: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        offs = tl.arange(0, BLOCK_SLOTS)
        ids = tl.load(slot_ids_ptr + offs, mask=offs < n_slots, other=-1)
        if HAS_MAP:
            loc = tl.load(expert_map_ptr + ids, mask=ids >= 0, other=-1)
        else:
            loc = ids
        loc = tl.where((loc >= 0) & (loc < num_experts), loc, -1)
        # Slots past n_slots loaded as -1, so a program past the end finds no expert.
        e = tl.sum(tl.where(offs == s, loc, 0), axis=0)
        match = (loc == e) & (e >= 0)
        rank = tl.cumsum(match.to(tl.int32), axis=0) - 1
        my_rank = tl.sum((match & (offs < s)).to(tl.int32), axis=0)
        leader = (e >= 0) & (my_rank % BLOCK_M == 0)
        want = my_rank + tl.arange(0, BLOCK_M)
        sel = match[None, :] & (rank[None, :] == want[:, None])
        rows = tl.sum(tl.where(sel, offs[None, :], 0), axis=1)
        row_mask = tl.sum(sel.to(tl.int32), axis=1) > 0
        expert = tl.where(leader, e, -1)
        return expert, rows, row_mask

    @kernel
    def _moe_gemm_kernel(
        a_ptr,
        b_ptr,
        c_ptr,
        a_scale_ptr,
        b_scale_ptr,
        c_scale_ptr,
        topk_weights_ptr,
        sorted_ids_ptr,
        block_expert_ptr,
        expert_offsets_ptr,
        ntpp_ptr,
        slot_ids_ptr,
        expert_map_ptr,
        expert_num_tokens_ptr,
        valid_ptr,
        N,
        K,
        num_slots,
        max_tokens,
        slots_per_token,
        num_experts,
        m_blocks_per_expert,
        k_per_split,
        stride_ae,
        stride_am,
        stride_ak,
        stride_be,
        stride_bn,
        stride_bk,
        stride_ce,
        stride_cm,
        stride_cn,
        stride_cs,
        stride_ase,
        stride_asm,
        stride_ask,
        stride_bse,
        stride_bsn,
        stride_bsk,
        stride_cse,
        stride_csm,
        stride_csk,
        swiglu_alpha,
        swiglu_limit,
        ROUTE: tl.constexpr,
        HAS_MAP: tl.constexpr,
        HAS_VALID: tl.constexpr,
        BLOCK_SLOTS: tl.constexpr,
        A_ROW_DIV: tl.constexpr,
        MUL_ROUTED_WEIGHT: tl.constexpr,
        ACT: tl.constexpr,
        GATED: tl.constexpr,
        QUANT: tl.constexpr,
        GROUP_N: tl.constexpr,
        GROUP_K: tl.constexpr,
        OUT_QUANT: tl.constexpr,
        OUT_GROUP: tl.constexpr,
        QUANT_A: tl.constexpr,
        UE8M0: tl.constexpr,
        EVEN_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        INTERPRET: tl.constexpr,
        DOT_IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        EXPERT_GROUPS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        if ROUTE == "sorted":
            num_pid_m = tl.cdiv(tl.load(ntpp_ptr), BLOCK_M)
        elif ROUTE == "slot":
            if HAS_VALID:
                num_pid_m = load_valid_count(valid_ptr, max_tokens) * slots_per_token
            else:
                num_pid_m = num_slots
        else:
            num_pid_m = num_experts * m_blocks_per_expert
        total = num_pid_m * num_pid_n * SPLIT_K

        for tile in range(pid, total, nprog):
            split = tile % SPLIT_K
            if EXPERT_GROUPS:
                pid_m, pid_n, grouped_expert = expert_tile_coords(
                    tile // SPLIT_K, num_pid_n, block_expert_ptr, expert_offsets_ptr, BLOCK_M, GROUP_M
                )
            else:
                pid_m, pid_n = tile_coords(tile // SPLIT_K, num_pid_m, num_pid_n, GROUP_M)

            if ROUTE == "sorted":
                if EXPERT_GROUPS:
                    expert = grouped_expert
                else:
                    expert = tl.load(block_expert_ptr + pid_m)
                rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
                row_mask = rows < num_slots
            elif ROUTE == "slot":
                expert, rows, row_mask = _slot_rows(
                    slot_ids_ptr, expert_map_ptr, pid_m, num_pid_m, num_experts, HAS_MAP, BLOCK_SLOTS, BLOCK_M
                )
            else:
                e_b = pid_m // m_blocks_per_expert
                first_row = (pid_m % m_blocks_per_expert) * BLOCK_M
                count = tl.minimum(tl.load(expert_num_tokens_ptr + e_b), max_tokens)
                rows = first_row + tl.arange(0, BLOCK_M)
                row_mask = rows < count
                expert = tl.where(first_row < count, e_b, -1)

            if (expert >= 0) & (expert < num_experts):
                e64 = expert.to(tl.int64)
                offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                # Wrapping the column index keeps every weight load in bounds without a mask; the
                # wrapped columns are computed and then not stored.
                offs_bn = offs_n % N
                offs_k = tl.arange(0, BLOCK_K)
                a_rows = (rows // A_ROW_DIV).to(tl.int64)
                if SPLIT_K > 1:
                    k_lo = split * k_per_split
                    k_hi = tl.minimum(K, k_lo + k_per_split)
                else:
                    k_lo = 0
                    k_hi = K
                a_ptrs = a_ptr + e64 * stride_ae + a_rows[:, None] * stride_am + (k_lo + offs_k)[None, :] * stride_ak
                b_ptrs = b_ptr + e64 * stride_be + offs_bn[None, :] * stride_bn + (k_lo + offs_k)[:, None] * stride_bk
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                if GATED:
                    b_up_ptrs = b_ptrs + N * stride_bn
                    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                else:
                    b_up_ptrs = b_ptrs
                    acc_up = acc
                if QUANT == "block":
                    a_s_ptrs = a_scale_ptr + e64 * stride_ase + a_rows * stride_asm
                    b_s_ptrs = b_scale_ptr + e64 * stride_bse + (offs_bn // GROUP_N) * stride_bsn
                    b_s_up_ptrs = b_scale_ptr + e64 * stride_bse + ((offs_bn + N) // GROUP_N) * stride_bsn

                for kk in range(k_lo, k_hi, BLOCK_K):
                    if EVEN_K:
                        a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
                        b = tl.load(b_ptrs)
                        if GATED:
                            b_up = tl.load(b_up_ptrs)
                    else:
                        k_mask = offs_k < k_hi - kk
                        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                        b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
                        if GATED:
                            b_up = tl.load(b_up_ptrs, mask=k_mask[:, None], other=0.0)
                    if QUANT == "block":
                        kg = kk // GROUP_K
                        if QUANT_A:
                            # Model-dtype A quantized per row per group on load (BLOCK_K == GROUP_K): no
                            # separate pass, no FP8 copy. Like ops.quant.per_token_group_quant_fp8 up to the
                            # last bit: Triton's fast fp32 `/` and an exp2/log2 UE8M0 round-up (the exact
                            # helper, fp8_group_quant, measured 1-3 % slower here and in the epilogue below).
                            af = a.to(tl.float32)
                            a_s = tl.maximum(tl.max(tl.abs(af), axis=1), 1e-10) / 448.0
                            if UE8M0:
                                a_s = tl.exp2(tl.ceil(tl.log2(a_s)))
                            aq = tl.minimum(tl.maximum(af / a_s[:, None], -448.0), 448.0)
                            a = cast_for_store(aq, b.dtype, INTERPRET)
                        else:
                            a_s = tl.load(a_s_ptrs + kg * stride_ask, mask=row_mask, other=0.0)
                        b_s = tl.load(b_s_ptrs + kg * stride_bsk)
                        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                        acc += dot_acc(a, b, zero, INTERPRET, DOT_IEEE) * a_s[:, None] * b_s[None, :]
                        if GATED:
                            b_s_up = tl.load(b_s_up_ptrs + kg * stride_bsk)
                            acc_up += dot_acc(a, b_up, zero, INTERPRET, DOT_IEEE) * a_s[:, None] * b_s_up[None, :]
                    else:
                        acc = dot_acc(a, b, acc, INTERPRET, DOT_IEEE)
                        if GATED:
                            acc_up = dot_acc(a, b_up, acc_up, INTERPRET, DOT_IEEE)
                    a_ptrs += BLOCK_K * stride_ak
                    b_ptrs += BLOCK_K * stride_bk
                    if GATED:
                        b_up_ptrs += BLOCK_K * stride_bk

                if QUANT == "rowcol":
                    # Per-tensor scales arrive with zero strides, per-token / per-channel with real ones.
                    a_s = tl.load(a_scale_ptr + e64 * stride_ase + a_rows * stride_asm, mask=row_mask, other=0.0)
                    b_s = tl.load(b_scale_ptr + e64 * stride_bse + offs_bn * stride_bsn)
                    acc = acc * a_s[:, None] * b_s[None, :]
                    if GATED:
                        b_s_up = tl.load(b_scale_ptr + e64 * stride_bse + (offs_bn + N) * stride_bsn)
                        acc_up = acc_up * a_s[:, None] * b_s_up[None, :]

                out = activate(acc, acc_up, swiglu_alpha, swiglu_limit, ACT)
                if MUL_ROUTED_WEIGHT:
                    w = tl.load(topk_weights_ptr + rows, mask=row_mask, other=0.0)
                    out = out * w[:, None]

                c_rows = rows.to(tl.int64)
                # int64: split * (slots * N) passes 2**31 at prefill sizes while both factors fit int32
                c_base = c_ptr + e64 * stride_ce + split.to(tl.int64) * stride_cs
                c_ptrs = c_base + c_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
                c_mask = row_mask[:, None] & (offs_n[None, :] < N)
                if OUT_QUANT:
                    # Per token per OUT_GROUP columns, as ops.quant.per_token_group_quant_fp8 does up to
                    # the last bit (fast `/`, see the A quantization above).
                    x = tl.where(offs_n[None, :] < N, out, 0.0)
                    xg = tl.reshape(x, (BLOCK_M, BLOCK_N // OUT_GROUP, OUT_GROUP))
                    amax = tl.max(tl.abs(xg), axis=2)
                    scale = tl.maximum(amax, 1e-10) / 448.0
                    if UE8M0:
                        scale = tl.exp2(tl.ceil(tl.log2(scale)))
                    q = xg / scale[:, :, None]
                    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
                    q = tl.reshape(q, (BLOCK_M, BLOCK_N))
                    tl.store(c_ptrs, cast_for_store(q, c_ptr.dtype.element_ty, INTERPRET), mask=c_mask)
                    groups = pid_n * (BLOCK_N // OUT_GROUP) + tl.arange(0, BLOCK_N // OUT_GROUP)
                    s_ptrs = c_scale_ptr + e64 * stride_cse + c_rows[:, None] * stride_csm + groups[None, :] * stride_csk
                    tl.store(s_ptrs, scale, mask=row_mask[:, None] & (groups[None, :] * OUT_GROUP < N))
                else:
                    tl.store(c_ptrs, cast_for_store(out, c_ptr.dtype.element_ty, INTERPRET), mask=c_mask)


# ====================================================================================================
# launching one GEMM


@dataclass
class Routing:
    """Where each tile's rows come from (see the module docstring for the three modes)."""

    mode: str
    num_slots: int
    """Static number of routed slots (``M * top_k``); rows per expert ``T`` for ``batched``."""
    max_tokens: int
    """Tokens the slot buffers were sized for (clamps a device-side valid count)."""
    top_k: int
    num_experts: int
    """Local experts (rows of w1)."""
    grid_m: int
    """Row blocks the launch grid covers; programs stride over any beyond it."""
    sorted_ids: torch.Tensor | None = None
    block_expert: torch.Tensor | None = None
    expert_offsets: torch.Tensor | None = None
    """``[E + 1]`` int64 padded row offsets of the sorted experts: tile groups may then follow expert bounds
    (``expert_grouped_raster``)."""
    rows_per_expert: float = 0.0
    """Expected routed rows per local expert (host-side, from the token hint)."""
    ntpp: torch.Tensor | None = None
    slot_ids: torch.Tensor | None = None
    expert_map: torch.Tensor | None = None
    expert_num_tokens: torch.Tensor | None = None
    valid: torch.Tensor | None = None

    def groups_by_expert(self, weight: torch.Tensor, gemm: GemmLaunch) -> bool:
        """Whether this GEMM's tiles take groups bounded by experts (``expert_grouped_raster``)."""
        return (
            self.mode == "sorted"
            and self.expert_offsets is not None
            and expert_grouped_raster(weight, self.rows_per_expert, gemm.block_m, gemm.group_m)
        )


_FITTED_STAGES: dict[tuple, int] = {}
"""Stage counts that had to be lowered at launch (shared memory the estimate missed)."""


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    """(expert, row, col) strides of a 2-D (expert stride 0) or 3-D tensor."""
    if t.dim() == 3:
        return t.stride(0), t.stride(1), t.stride(2)
    return 0, t.stride(0), t.stride(1)


def _weight_scale_strides(scale: torch.Tensor | None, quant_mode: str) -> tuple[int, int, int]:
    """(expert, row, k-group) strides of a weight scale; per-tensor scales get a zero row stride."""
    if scale is None:
        return 0, 0, 0
    if quant_mode == "block":
        return scale.stride(0), scale.stride(1), scale.stride(2)
    if scale.dim() == 1 or scale[0].numel() == 1:
        return scale.stride(0), 0, 0
    # Per channel: [E, R, 1], [E, R] or [E, 1, R]; the rows run along the one non-unit dimension.
    row_dim = next(d for d in range(1, scale.dim()) if scale.shape[d] != 1)
    return scale.stride(0), scale.stride(row_dim), 0


def _act_scale_strides(scale: torch.Tensor | None, quant_mode: str) -> tuple[int, int, int]:
    """(expert, row, k-group) strides of an activation scale (``numel() == 1``: per tensor)."""
    if scale is None or scale.numel() == 1:
        return 0, 0, 0
    if scale.dim() == 3:
        return scale.stride(0), scale.stride(1), scale.stride(2) if quant_mode == "block" else 0
    if scale.dim() == 2:
        return 0, scale.stride(0), scale.stride(1) if quant_mode == "block" else 0
    return 0, scale.stride(0), 0


def invoke_moe_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    routing: Routing,
    gemm: GemmLaunch,
    *,
    a_row_div: int,
    activation: str = "none",
    quant_mode: str = "none",
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | None = None,
    c_scale: torch.Tensor | None = None,
    out_group: int = 128,
    quant_a: bool = False,
    ue8m0: bool = False,
    topk_weights: torch.Tensor | None = None,
    persistent: bool = False,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> None:
    """Launch ``_moe_gemm_kernel`` once: ``c[rows] = act(a[rows] @ b[e].T)`` over ``routing``'s tiles.

    ``c`` is ``[S, n_out]`` (or ``[split_k, S, n_out]`` fp32 partials, or ``[E, T, n_out]`` batched);
    ``a`` is ``[M, K]`` read at row ``slot // a_row_div`` (or ``[E, T, K]`` batched). ``c_scale`` set means
    FP8 output with fused per-group quantization (``c`` is float8). ``quant_a`` (block FP8 only): ``a`` is in
    the model dtype and is quantized per row per ``block_shape[1]`` columns as it is loaded.
    """
    gated = is_gated(activation)
    k_dim = a.shape[-1]
    n_out = b.shape[1] // 2 if gated else b.shape[1]
    if b.shape[2] != k_dim:
        raise ValueError(f"weight {tuple(b.shape)} does not match the activations' K={k_dim}")
    split_k = gemm.split_k
    if split_k > 1:
        if c.dim() != 3 or c.shape[0] != split_k or c.dtype != torch.float32:
            raise ValueError(f"split_k={split_k} needs an fp32 partial buffer [split_k, S, N], got {tuple(c.shape)} {c.dtype}")
    bk = gemm.block_k
    group_n, group_k = block_shape if block_shape is not None else (1, 1)
    if quant_mode == "block" and (bk > group_k or group_k % bk):
        raise ValueError(f"block_k={bk} must divide the quantization group {group_k}")
    if quant_a and (quant_mode != "block" or bk != group_k):
        raise ValueError(f"quantizing A on load needs block scales and block_k == group ({group_k}), got {bk}")
    k_per_split = _cdiv(_cdiv(k_dim, split_k), bk) * bk
    split_k = max(1, _cdiv(k_dim, k_per_split)) if split_k > 1 else 1
    if split_k != gemm.split_k:
        # Every split must own work, or its partial rows would stay unwritten; zero the spares.
        c[split_k:].zero_()

    num_pid_n = _cdiv(n_out, gemm.block_n)
    tiles = routing.grid_m * num_pid_n * split_k
    if tiles == 0:
        return
    info = device_info(str(a.device))
    grid = (min(tiles, 2 * info.num_sms) if persistent else tiles,)

    batched = routing.mode == "batched"
    ae, am, ak = _strides3(a)
    be, bn_, bk_ = b.stride(0), b.stride(1), b.stride(2)
    if batched:
        (ce, cm, cn), cs = c.stride(), 0
    elif c.dim() == 3:  # split-K partials [split_k, S, n_out]
        (cs, cm, cn), ce = c.stride(), 0
    else:
        (cm, cn), ce, cs = c.stride(), 0, 0
    ase, asm, ask = _act_scale_strides(a_scale, quant_mode)
    bse, bsn, bsk = _weight_scale_strides(b_scale, quant_mode)
    cse, csm, csk = _strides3(c_scale) if c_scale is not None else (0, 0, 0)

    dummy = routing.ntpp if routing.ntpp is not None else (
        routing.slot_ids if routing.slot_ids is not None else routing.expert_num_tokens
    )
    # Interpreter workarounds (dots on fp32 copies, round-to-nearest-even casts); GPU launches skip them.
    interpreting = a.device.type == "cpu"
    dot_ieee = a.dtype == torch.float32 and not interpreting
    even_k = k_dim % bk == 0 and (split_k == 1 or k_per_split % bk == 0)
    block_slots = max(16, _next_pow2(routing.num_slots)) if routing.mode == "slot" else 16

    launch = fit_stages(gemm, a.element_size(), b.element_size(), gated, info.smem_bytes - 2048)

    args = (
        a,
        b,
        c,
        a_scale if a_scale is not None else dummy,
        b_scale if b_scale is not None else dummy,
        c_scale if c_scale is not None else dummy,
        topk_weights if topk_weights is not None else dummy,
        routing.sorted_ids if routing.sorted_ids is not None else dummy,
        routing.block_expert if routing.block_expert is not None else dummy,
        routing.expert_offsets if routing.expert_offsets is not None else dummy,
        routing.ntpp if routing.ntpp is not None else dummy,
        routing.slot_ids if routing.slot_ids is not None else dummy,
        routing.expert_map if routing.expert_map is not None else dummy,
        routing.expert_num_tokens if routing.expert_num_tokens is not None else dummy,
        routing.valid if routing.valid is not None else dummy,
        n_out,
        k_dim,
        routing.num_slots,
        routing.max_tokens,
        routing.top_k,
        routing.num_experts,
        _cdiv(routing.num_slots, gemm.block_m) if batched else 1,
        k_per_split,
        ae, am, ak,
        be, bn_, bk_,
        ce, cm, cn, cs,
        ase, asm, ask,
        bse, bsn, bsk,
        cse, csm, csk,
        float(swiglu_alpha),
        float(swiglu_limit),
    )
    constexprs = dict(
        ROUTE=routing.mode,
        HAS_MAP=routing.expert_map is not None,
        HAS_VALID=routing.valid is not None,
        BLOCK_SLOTS=block_slots,
        A_ROW_DIV=a_row_div,
        MUL_ROUTED_WEIGHT=topk_weights is not None,
        ACT=activation,
        GATED=gated,
        QUANT=quant_mode,
        GROUP_N=group_n,
        GROUP_K=group_k,
        OUT_QUANT=c_scale is not None,
        OUT_GROUP=out_group,
        QUANT_A=quant_a,
        UE8M0=ue8m0,
        EVEN_K=even_k,
        SPLIT_K=split_k,
        INTERPRET=interpreting,
        DOT_IEEE=dot_ieee,
        BLOCK_M=gemm.block_m,
        BLOCK_N=gemm.block_n,
        BLOCK_K=bk,
        GROUP_M=gemm.group_m,
        EXPERT_GROUPS=routing.groups_by_expert(b, gemm),
    )
    key = (launch, activation, quant_mode, a.dtype, b.dtype, c.dtype, c_scale is not None, quant_a, str(a.device))
    stages = _FITTED_STAGES.get(key, launch.num_stages)
    while True:
        try:
            _moe_gemm_kernel[grid](*args, **constexprs, num_warps=launch.num_warps, num_stages=stages)
            break
        except Exception as exc:  # triton raises OutOfResources (shared memory / registers) at launch
            if type(exc).__name__ != "OutOfResources" or stages <= 1:
                raise
            logger.warning("moe_plugin triton experts: %s does not fit (%s); retrying with %d stages", launch, exc, stages - 1)
            stages -= 1
    _FITTED_STAGES[key] = stages


# ====================================================================================================
# the experts pipelines


def _quant_mode(quant: QuantConfig) -> str:
    if not quant.is_quantized:
        return "none"
    return "block" if quant.block_shape is not None else "rowcol"


def _check_runnable(t: torch.Tensor) -> None:
    if not triton_available():
        raise RuntimeError("the Triton experts need triton installed")
    if not use_triton(t):
        raise RuntimeError(
            f"the Triton experts run on CUDA tensors, or on CPU under TRITON_INTERPRET=1; got a {t.device} tensor"
        )


def _bytes_view(buf: torch.Tensor | None, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 view of ``buf`` with at least ``nbytes`` (a fresh buffer when ``buf`` is absent or short)."""
    if buf is not None and buf.is_contiguous() and buf.numel() * buf.element_size() >= nbytes and buf.device == device:
        return buf.view(-1).view(torch.uint8)[:nbytes]
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def _carve(raw: torch.Tensor, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    itemsize = torch.empty((), dtype=dtype).element_size()
    start = _cdiv(offset, 256) * 256
    nbytes = math.prod(shape) * itemsize
    view = raw[start : start + nbytes].view(dtype).view(shape)
    return view, start + nbytes


def intermediate_bytes(rows: int, n: int, model_dtype: torch.dtype, quant: QuantConfig, fused_quant: bool) -> int:
    """Bytes of the activation buffer between the GEMMs (FP8 plus scales when quantized in the epilogue)."""
    if fused_quant:
        groups = _cdiv(n, quant.block_shape[1])
        return rows * n + rows * groups * 4 + 512
    return rows * n * torch.empty((), dtype=model_dtype).element_size() + 256


def _fuses_out_quant(quant: QuantConfig, gemm1: GemmLaunch) -> bool:
    return quant.is_fp8_block and gemm1.block_n % quant.block_shape[1] == 0


def _block_k_within_group(config: LaunchConfig, quant: QuantConfig) -> tuple[GemmLaunch, GemmLaunch]:
    """Both GEMMs' launches with ``block_k`` at most the FP8 block scales' K group (one scale per K step)."""
    g1, g2 = config.gemm1, config.gemm2
    if quant.is_fp8_block:
        gk = quant.block_shape[1]
        g1 = replace(g1, block_k=min(g1.block_k, gk))
        g2 = replace(g2, block_k=min(g2.block_k, gk))
    return g1, g2


def _intermediate(
    workspace2: torch.Tensor | None,
    lead: tuple[int, ...],
    n_inter: int,
    model_dtype: torch.dtype,
    quant: QuantConfig,
    gemm1: GemmLaunch,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GEMM1's output ``[*lead, n_inter]`` carved from ``workspace2``: FP8 plus its group scales when GEMM1's
    epilogue quantizes (scales not None), else in the model dtype."""
    rows = math.prod(lead)
    fused_q = _fuses_out_quant(quant, gemm1)
    raw2 = _bytes_view(workspace2, intermediate_bytes(rows, n_inter, model_dtype, quant, fused_q), device)
    if not fused_q:
        a2, _ = _carve(raw2, 0, (*lead, n_inter), model_dtype)
        return a2, None
    a2, off = _carve(raw2, 0, (*lead, n_inter), FP8_DTYPE)
    a2_s, _ = _carve(raw2, off, (*lead, _cdiv(n_inter, quant.block_shape[1])), torch.float32)
    return a2, a2_s


def _two_gemms(
    a1: torch.Tensor,
    a1_scale: torch.Tensor | None,
    w1: torch.Tensor,
    w2: torch.Tensor,
    a2: torch.Tensor,
    a2_s: torch.Tensor | None,
    y: torch.Tensor,
    routing: Routing,
    g1: GemmLaunch,
    g2: GemmLaunch,
    *,
    a1_row_div: int,
    quant_a1: bool,
    activation: str,
    quant: QuantConfig,
    w1_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    a2_scale: torch.Tensor | None,
    topk_weights: torch.Tensor | None,
    persistent: bool,
) -> None:
    """GEMM1 + activation into ``a2`` (``_intermediate``'s buffers), the activation's quantization where
    GEMM1's epilogue did not do it, and GEMM2 into ``y`` (times ``topk_weights`` when given)."""
    qmode = _quant_mode(quant)
    fused_q = a2_s is not None
    ue8m0 = quant.scale_format is ScaleFormat.UE8M0
    invoke_moe_gemm(
        a1,
        w1,
        a2,
        routing,
        g1,
        a_row_div=a1_row_div,
        activation=activation,
        quant_mode=qmode,
        a_scale=a1_scale,
        b_scale=w1_scale,
        block_shape=quant.block_shape,
        c_scale=a2_s,
        out_group=quant.block_shape[1] if quant.block_shape is not None else 128,
        quant_a=quant_a1,
        ue8m0=ue8m0,
        persistent=persistent,
    )
    quant_a = quant.is_fp8_block and not fused_q
    if quant_a:
        g2 = replace(g2, block_k=quant.block_shape[1])
    elif quant.is_quantized and not fused_q:
        from .scheme import quantize_activation

        a2, a2_s = quantize_activation(a2, quant, a2_scale)
    invoke_moe_gemm(
        a2,
        w2,
        y,
        routing,
        g2,
        a_row_div=1,
        activation="none",
        quant_mode=qmode,
        a_scale=a2_s,
        b_scale=w2_scale,
        block_shape=quant.block_shape,
        quant_a=quant_a,
        ue8m0=ue8m0,
        topk_weights=topk_weights,
        persistent=persistent,
    )


def tma_workspace_rows(slots: int, num_local: int, block_m: int) -> int:
    """Rows of the TMA path's sorted-order buffers: slots plus per-expert padding to ``block_m``."""
    from .align import align_buffer_sizes

    return align_buffer_sizes(slots, block_m, num_local)[0]


def _two_gemms_tma(
    a1: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    routing: Routing,
    g1: GemmLaunch,
    g2: GemmLaunch,
    sorted_len: int,
    inv: torch.Tensor | None,
    workspace13: torch.Tensor | None,
    workspace2: torch.Tensor | None,
    out: torch.Tensor,
    *,
    activation: str,
    topk_weights: torch.Tensor | None,
    persistent: bool,
) -> torch.Tensor:
    """``ops.tma_gemm``'s two GEMMs: GEMM1 + activation into a sorted-order intermediate, GEMM2 back to the
    slots; returns GEMM2's ``[slots, K]`` output (the head of ``workspace13``). With ``inv`` the tokens are
    first scattered into sorted order."""
    from .permute import _scatter_rows
    from .tma_gemm import invoke_tma_gemm

    device = a1.device
    slots, k_dim = routing.num_slots, a1.shape[1]
    n_inter = w2.shape[2]
    itemsize = a1.element_size()
    # Descriptors need 16-byte aligned bases: a caller's workspace that is not gets replaced.
    workspace13 = workspace13 if workspace13 is None or workspace13.data_ptr() % 16 == 0 else None
    workspace2 = workspace2 if workspace2 is None or workspace2.data_ptr() % 16 == 0 else None
    y_bytes = slots * k_dim * itemsize
    a_bytes = sorted_len * k_dim * itemsize if inv is not None else 0
    raw13 = _bytes_view(workspace13, _cdiv(y_bytes, 256) * 256 + a_bytes, device)
    y, offset = _carve(raw13, 0, (slots, k_dim), a1.dtype)
    raw2 = _bytes_view(workspace2, sorted_len * n_inter * itemsize, device)
    inter, _ = _carve(raw2, 0, (sorted_len, n_inter), a1.dtype)
    if inv is not None:
        a_sorted, _ = _carve(raw13, offset, (sorted_len, k_dim), a1.dtype)
        _scatter_rows(a1, None, inv, routing.top_k, a_sorted, None)
        a_mode, a_src, row_div = "tma", a_sorted, 1
    else:
        a_mode, a_src, row_div = "gather", a1, routing.top_k
    info = device_info(str(device))
    common = dict(
        sorted_ids=routing.sorted_ids,
        block_expert=routing.block_expert,
        num_tokens_post_padded=routing.ntpp,
        num_slots=slots,
        grid_m=routing.grid_m,
        num_sms=info.num_sms,
        persistent=persistent,
    )
    for a, b, c, g, kw in (
        (a_src, w1, inter, g1, dict(a_mode=a_mode, a_row_div=row_div, c_mode="sorted", activation=activation,
                                    gated=is_gated(activation))),
        (inter, w2, y, g2, dict(a_mode="tma", a_row_div=1, c_mode="slot", topk_weights=topk_weights)),
    ):
        launch = fit_stages(g, itemsize, itemsize, kw.get("gated", False), info.smem_bytes - 2048)
        invoke_tma_gemm(
            a, b, c, **common, **kw, block_m=g.block_m, block_n=g.block_n, block_k=g.block_k, group_m=g.group_m,
            num_warps=launch.num_warps, num_stages=launch.num_stages,
            expert_offsets=routing.expert_offsets if routing.groups_by_expert(b, g) else None,
        )
    return y


def experts_standard(
    out: torch.Tensor,
    a1q: torch.Tensor,
    a1q_scale: torch.Tensor | None,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str,
    quant: QuantConfig,
    w1_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    a2_scale: torch.Tensor | None,
    expert_map: torch.Tensor | None,
    global_num_experts: int,
    mul_routed_weight: bool,
    config: LaunchConfig | None = None,
    valid_tokens: torch.Tensor | None = None,
    num_tokens_hint: int | None = None,
    workspace13: torch.Tensor | None = None,
    workspace2: torch.Tensor | None = None,
    a1_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Standard-format experts on prepared activations; writes ``out [M, K]``.

    ``a1q`` is FP8 with ``a1q_scale`` when ``quant`` says so, or still in the model dtype: then it is
    quantized here (``a1_scale``: static per-tensor scale), by GEMM1 itself as it loads its input when the
    tiles are decode-sized and the scales are per block. ``topk_ids`` must be int32 with global ids (-1
    allowed: dropped slot); ``topk_weights`` fp32. No argument validation here (the callers validate);
    see ``fused_experts_triton`` for the public form.
    """
    m, top_k = topk_ids.shape
    k_dim = a1q.shape[1]
    num_local = w1.shape[0]
    n_inter = w2.shape[2]
    if m == 0:
        return out
    _check_runnable(a1q)
    device = a1q.device
    slots = m * top_k
    hint = m if num_tokens_hint is None else max(1, min(int(num_tokens_hint), m))
    if config is None:
        config = get_launch_config(
            hint,
            num_local=num_local,
            num_global=global_num_experts,
            n=n_inter,
            k=k_dim,
            top_k=top_k,
            dtype=out.dtype,
            quant=quant,
            device=device,
        )
    g1, g2 = _block_k_within_group(config, quant)
    bm = g1.block_m
    topk_ids = topk_ids.to(torch.int32).contiguous()
    ids = topk_ids.view(-1)
    emap = expert_map.to(torch.int32).contiguous() if expert_map is not None else None

    mode = resolve_routing_mode(config, slots)
    tma = config.tma if mode == "sorted" else "off"
    if tma != "off":
        from .tma_gemm import gathers_only, tma_problem

        problem = tma_problem(a1q, w1, w2, quant.is_quantized or a1q.dtype != out.dtype)
        if problem:
            logger.debug("moe_plugin triton experts: TMA path off (%s)", problem)
            tma = "off"
        elif tma == "all" and gathers_only(a1q):
            tma = "weights"
    if mode == "slot":
        grid_m = min(slots, hint * top_k)
        routing = Routing(
            "slot", slots, m, top_k, num_local, grid_m, slot_ids=ids, expert_map=emap, valid=valid_tokens
        )
    else:
        from .align import SlotSortOutputs, align_buffer_sizes, sort_slots_triton

        sorted_len, n_blocks = align_buffer_sizes(slots, bm, num_local)
        sort_out = SlotSortOutputs(
            sorted_ids=torch.empty((sorted_len,), dtype=torch.int32, device=device),
            sentinel=slots,
            block_keys=torch.empty((n_blocks,), dtype=torch.int32, device=device),
            block_tail=-1,
            num_tokens_post_padded=torch.empty((1,), dtype=torch.int32, device=device),
            offsets=torch.empty((num_local + 1,), dtype=torch.int64, device=device),
            inv=torch.empty((slots,), dtype=torch.int32, device=device) if tma == "all" else None,
        )
        sort_slots_triton(ids, top_k, num_local, bm, sort_out, key_map=emap, valid_tokens=valid_tokens)
        if num_tokens_hint is not None:
            local = hint * top_k * num_local / global_num_experts
            active = expected_active_experts(hint, top_k, num_local, global_num_experts)
            grid_m = min(n_blocks, max(1, int(math.ceil(1.25 * (local / bm + active)))))
        else:
            grid_m = n_blocks
        routing = Routing(
            "sorted",
            slots,
            m,
            top_k,
            num_local,
            grid_m,
            sorted_ids=sort_out.sorted_ids,
            block_expert=sort_out.block_keys,
            expert_offsets=sort_out.offsets,
            rows_per_expert=hint * top_k / global_num_experts,
            ntpp=sort_out.num_tokens_post_padded,
            valid=valid_tokens,
        )
        if tma != "off":
            y = _two_gemms_tma(
                a1q, w1, w2, routing, g1, g2, sorted_len, sort_out.inv, workspace13, workspace2, out,
                activation=activation,
                topk_weights=topk_weights.reshape(-1).contiguous() if mul_routed_weight else None,
                persistent=config.persistent,
            )
            moe_sum(
                y.unflatten(-2, (m, top_k)), out,
                topk_ids=topk_ids, num_experts=num_local, expert_map=emap, valid_tokens=valid_tokens,
            )
            return out

    quant_a1 = False
    if quant.is_quantized and a1q.dtype != FP8_DTYPE:
        if quant.is_fp8_block and bm <= 32:
            # Decode sizes are memory-bound: quantizing in GEMM1's loads saves a launch and a pass.
            quant_a1 = True
            g1 = replace(g1, block_k=quant.block_shape[1])
            a1q_scale = None
        else:
            from .scheme import quantize_activation

            per_tensor_dynamic = not quant.is_fp8_block and not quant.per_act_token and a1_scale is None
            if per_tensor_dynamic and valid_tokens is not None:
                # One scale over the whole tensor: rows past the valid count (padding of a captured
                # graph) must not raise it. Masked on the device, so no host read.
                rows = torch.arange(a1q.shape[0], device=device).unsqueeze(1)
                a1q = torch.where(rows < valid_tokens.reshape(1, 1), a1q, torch.zeros((), dtype=a1q.dtype, device=device))
            a1q, a1q_scale = quantize_activation(a1q, quant, a1_scale)
    a2, a2_s = _intermediate(workspace2, (slots,), n_inter, out.dtype, quant, g1, device)
    if quant.is_quantized and quant.block_shape is None and not quant.per_act_token and a2_scale is None:
        # A dynamic per-tensor scale reads every row of the reused workspace: slots GEMM1 skips (remote
        # experts, padding past the valid count) must read zero, not a previous call's values.
        a2.zero_()
    if g2.split_k > 1:
        y = torch.empty((g2.split_k, slots, k_dim), dtype=torch.float32, device=device)
    else:
        raw13 = _bytes_view(workspace13, slots * k_dim * out.element_size(), device)
        y, _ = _carve(raw13, 0, (slots, k_dim), out.dtype)
    _two_gemms(
        a1q,
        a1q_scale,
        w1,
        w2,
        a2,
        a2_s,
        y,
        routing,
        g1,
        g2,
        a1_row_div=top_k,
        quant_a1=quant_a1,
        activation=activation,
        quant=quant,
        w1_scale=w1_scale,
        w2_scale=w2_scale,
        a2_scale=a2_scale,
        topk_weights=topk_weights.reshape(-1).contiguous() if mul_routed_weight else None,
        persistent=config.persistent,
    )
    moe_sum(
        y.unflatten(-2, (m, top_k)), out, topk_ids=topk_ids, num_experts=num_local, expert_map=emap,
        valid_tokens=valid_tokens,
    )
    return out


def experts_batched(
    out: torch.Tensor,
    a1q: torch.Tensor,
    a1q_scale: torch.Tensor | None,
    w1: torch.Tensor,
    w2: torch.Tensor,
    expert_num_tokens: torch.Tensor,
    *,
    activation: str,
    quant: QuantConfig,
    w1_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    a2_scale: torch.Tensor | None,
    config: LaunchConfig | None = None,
    rows_hint: int | None = None,
    workspace2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batched-format experts: ``out[e, :n_e] = w2[e] act(w1[e] a1q[e, :n_e])`` with ``n_e =
    expert_num_tokens[e]`` read on the device; rows past ``n_e`` are neither read nor written."""
    num_local, t_rows, k_dim = a1q.shape
    n_inter = w2.shape[2]
    if t_rows == 0 or num_local == 0:
        return out
    _check_runnable(a1q)
    device = a1q.device
    rows = t_rows if rows_hint is None else max(1, min(int(rows_hint), t_rows))
    if config is None:
        config = get_launch_config(
            rows,
            num_local=num_local,
            num_global=num_local,
            n=n_inter,
            k=k_dim,
            top_k=1,
            dtype=out.dtype,
            quant=quant,
            device=device,
            batched=True,
        )
    g1, g2 = _block_k_within_group(config, quant)
    if g2.split_k != 1:
        g2 = replace(g2, split_k=1)
    counts = expert_num_tokens.to(torch.int32).contiguous()
    routing = Routing(
        "batched",
        t_rows,
        t_rows,
        1,
        num_local,
        num_local * _cdiv(rows, g1.block_m),
        expert_num_tokens=counts,
    )
    a2, a2_s = _intermediate(workspace2, (num_local, t_rows), n_inter, out.dtype, quant, g1, device)
    if quant.is_quantized and quant.block_shape is None and not quant.per_act_token and a2_scale is None:
        # A dynamic per-tensor scale reads every row: rows past the counts must not hold garbage (the
        # intermediate is in the model dtype here: only block scales quantize in GEMM1's epilogue).
        a2.zero_()
    _two_gemms(
        a1q,
        a1q_scale,
        w1,
        w2,
        a2,
        a2_s,
        out,
        routing,
        g1,
        g2,
        a1_row_div=1,
        quant_a1=False,
        activation=activation,
        quant=quant,
        w1_scale=w1_scale,
        w2_scale=w2_scale,
        a2_scale=a2_scale,
        topk_weights=None,
        persistent=config.persistent,
    )
    return out


def fused_experts_triton(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    quant: QuantConfig | None = None,
    w1_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    a1_scale: torch.Tensor | None = None,
    a2_scale: torch.Tensor | None = None,
    expert_map: torch.Tensor | None = None,
    global_num_experts: int | None = None,
    apply_router_weight_on_input: bool = False,
    out: torch.Tensor | None = None,
    valid_tokens: torch.Tensor | None = None,
    num_tokens_hint: int | None = None,
    config: LaunchConfig | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    """The whole experts computation with the Triton kernels: ``[M, K]`` in, ``[M, K]`` out.

    Weights in vLLM's layout (``w1 [E, 2N, K]`` gate rows then up rows, ``w2 [E, K, N]``); FP8 weights
    with ``quant`` (inferred from the weights' dtype and ``w1_scale`` when omitted). Activations are
    quantized on the fly with ``ops.scheme.quantize_activation``.

    CUDA graphs: pass ``valid_tokens`` (one-element int tensor on the device) and the buffers sized for
    the largest batch; only the first ``valid_tokens`` rows are computed and written (the rest of ``out``
    is left as it was), so one captured graph serves every batch size. ``num_tokens_hint`` (typical batch)
    sizes the launch grids and picks the launch config; programs loop when a batch outgrows it.
    """
    from ..functional import infer_global_num_experts, infer_quant
    from ..modular import ExpertWeights
    from ..prepare_finalize.local import apply_weight_on_input
    from ..validation import check_moe_inputs

    quant = infer_quant(w1, w1_scale, quant, None)
    global_num_experts = infer_global_num_experts(global_num_experts, expert_map, w1)
    if check_inputs:
        topk_weights, topk_ids = check_moe_inputs(
            hidden_states,
            ExpertWeights(w1, w2, w1_scale, w2_scale, a1_scale, a2_scale),
            topk_weights,
            topk_ids,
            activation=activation,
            global_num_experts=global_num_experts,
            expert_map=expert_map,
            quant=quant,
            apply_router_weight_on_input=apply_router_weight_on_input,
        )
    else:
        topk_ids = topk_ids.to(torch.int32)
        topk_weights = topk_weights.float()
    _check_runnable(hidden_states)
    if isinstance(config, dict):
        config = LaunchConfig.from_dict(config, source="config argument")
    elif config is not None and not isinstance(config, LaunchConfig):
        raise TypeError(f"config must be an ops.launch_config.LaunchConfig, a dict of its keys or None, got {type(config).__name__}")
    problem = block_shape_problem(quant)
    if problem:
        raise ValueError(f"quant.{problem}")
    m, k_dim = hidden_states.shape
    if out is None:
        out = torch.empty_like(hidden_states)
    elif out.shape != hidden_states.shape or out.dtype != hidden_states.dtype or out.device != hidden_states.device:
        raise ValueError(
            f"out must be [{m}, {k_dim}] {hidden_states.dtype} on {hidden_states.device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if valid_tokens is not None:
        if (
            not isinstance(valid_tokens, torch.Tensor)
            or valid_tokens.numel() != 1
            or valid_tokens.dtype not in (torch.int32, torch.int64)
            or valid_tokens.device != hidden_states.device
        ):
            raise ValueError(
                f"valid_tokens must be a one-element int32/int64 tensor on {hidden_states.device}, got {valid_tokens!r}"
            )
        valid_tokens = valid_tokens.reshape(1)
    if num_tokens_hint is not None and (not isinstance(num_tokens_hint, int) or num_tokens_hint < 1):
        raise ValueError(f"num_tokens_hint must be a positive int, got {num_tokens_hint!r}")
    if m == 0:
        return out
    a1 = apply_weight_on_input(hidden_states, topk_weights, apply_router_weight_on_input)
    return experts_standard(
        out,
        a1,
        None,
        w1,
        w2,
        topk_weights,
        topk_ids,
        activation=activation,
        quant=quant,
        w1_scale=w1_scale,
        w2_scale=w2_scale,
        a2_scale=a2_scale,
        expert_map=expert_map,
        global_num_experts=global_num_experts,
        mul_routed_weight=not apply_router_weight_on_input,
        config=config,
        valid_tokens=valid_tokens,
        num_tokens_hint=num_tokens_hint,
        a1_scale=a1_scale,
    )


__all__ = [
    "Routing",
    "experts_batched",
    "experts_standard",
    "fused_experts_triton",
    "invoke_moe_gemm",
    "tma_workspace_rows",
]
