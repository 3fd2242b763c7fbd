"""TMA-fed grouped GEMM for the compute-bound MoE sizes (bf16 / fp16 on Hopper and newer).

``fused_moe``'s pointer kernel gathers every operand tile with per-thread address arithmetic. At prefill
sizes (hundreds of rows per expert, tiles of 128 x 256) the tensor cores then wait on those loads: on
the H100 the pointer kernel runs Mixtral's GEMMs at ~560 TFLOP/s where the same tiles fed by the Tensor
Memory Accelerator reach 680-715. This kernel loads the weight tiles through TMA descriptors, and the
activation tiles too wherever the rows are contiguous:

- GEMM1 reads token rows. Either they are first scattered into expert-sorted order (``a_mode="tma"``,
  one extra pass over the tokens, ``ops.permute``'s token-major scatter) and then read through a
  descriptor, or each tile gathers its rows with pointers (``a_mode="gather"``, no extra pass).
- GEMM1 writes the activation in sorted order (``c_mode="sorted"``), so GEMM2 reads it through a
  descriptor, and GEMM2 writes each row back to its slot (``c_mode="slot"``) times the routing weight.

Tiles come from ``ops.align``'s sort (``block_expert``, ``num_tokens_post_padded`` read on the device, so
one captured CUDA graph serves every batch up to its buffers); row blocks of other ranks' experts are
skipped. Descriptor loads past a tensor's end read zeros, so K and N need not be multiples of the tile;
the columns a tile computes past N are not stored.
"""

from __future__ import annotations

import functools
import logging

import torch

from ._dispatch import triton_interpreting
from ._jit import cast_for_store, kernel

try:
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # torch-only installs, or a triton without host-side tensor descriptors
    tl = None
    TensorDescriptor = None

logger = logging.getLogger(__name__)

TMA_DTYPES = (torch.bfloat16, torch.float16)
A_MODES = ("tma", "gather")


@functools.lru_cache(maxsize=None)
def _device_has_tma(device: str) -> bool:
    if device == "cpu":
        return True  # the interpreter emulates descriptors
    # ROCm reports gfx9xx parts as capability 9.x; TMA is NVIDIA's.
    return torch.version.hip is None and torch.cuda.get_device_capability(torch.device(device)) >= (9, 0)


def tma_possible(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether ``dtype`` activations on ``device`` can take the TMA path at all (before looking at shapes)."""
    if TensorDescriptor is None or dtype not in TMA_DTYPES:
        return False
    dev = torch.device(device)
    if dev.type == "cpu":
        return triton_interpreting()
    return dev.type == "cuda" and _device_has_tma(str(dev))


def _row_major_3d(t: torch.Tensor) -> bool:
    """``[E, R, C]`` laid out as one ``[E * R, C]`` matrix with 16-byte aligned rows (what a descriptor needs)."""
    e, r, c = t.shape
    row_bytes = t.stride(1) * t.element_size()
    return (
        t.stride(2) == 1
        and (e == 1 or t.stride(0) == r * t.stride(1))
        and row_bytes % 16 == 0
        and t.data_ptr() % 16 == 0
    )


def tma_problem(hidden: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, quantized: bool) -> str | None:
    """Why the TMA path cannot run these operands, or None when it can (``a_mode="tma"`` also needs
    ``hidden``'s columns contiguous: see ``gathers_only``)."""
    if TensorDescriptor is None or tl is None:
        return "this triton has no host-side tensor descriptors (triton.tools.tensor_descriptor)"
    if quantized:
        return "the TMA path is for unquantized bf16 / fp16 weights"
    if hidden.dtype not in TMA_DTYPES or w1.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        return f"the TMA path needs bf16 or fp16 activations and weights, got {hidden.dtype} / {w1.dtype} / {w2.dtype}"
    if not _device_has_tma(str(hidden.device)):
        return "TMA needs compute capability >= 9.0"
    for name, w in (("w1", w1), ("w2", w2)):
        if not _row_major_3d(w):
            return f"{name} must be row-major [E, rows, cols] with 16-byte aligned rows for TMA, got strides {w.stride()}"
    for name, width in (("hidden size K", w1.shape[2]), ("intermediate width N", w2.shape[2])):
        if (width * w1.element_size()) % 16:
            return f"the {name}={width} must give 16-byte rows for TMA"
    return None


def gathers_only(hidden: torch.Tensor) -> bool:
    """True when GEMM1 must gather ``hidden``'s rows with pointers (``a_mode="gather"``): the token-major
    scatter into sorted order reads each row as one contiguous run."""
    return hidden.stride(1) != 1


def _descriptor(t: torch.Tensor, block_rows: int, block_cols: int):
    """A 2-D descriptor over ``t`` (``[rows, cols]``, or ``[E, R, cols]`` viewed as ``[E * R, cols]``)."""
    rows = t.shape[0] if t.dim() == 2 else t.shape[0] * t.shape[1]
    stride = t.stride(0) if t.dim() == 2 else t.stride(1)
    flat = t.as_strided((rows, t.shape[-1]), (stride, 1))
    return TensorDescriptor(flat, [rows, t.shape[-1]], [stride, 1], [block_rows, block_cols])


def invoke_tma_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    *,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    num_tokens_post_padded: torch.Tensor,
    num_slots: int,
    expert_offsets: torch.Tensor | None = None,
    grid_m: int,
    block_m: int,
    block_n: int,
    block_k: int,
    group_m: int,
    num_warps: int,
    num_stages: int,
    num_sms: int,
    persistent: bool,
    a_mode: str,
    a_row_div: int,
    c_mode: str,
    activation: str = "none",
    gated: bool = False,
    topk_weights: torch.Tensor | None = None,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> None:
    """One grouped GEMM ``c[rows] = act(a[rows] @ b[e].T)`` over the sorted row blocks.

    ``a``: ``[L, K]`` rows in sorted order (``a_mode="tma"``) or ``[M, K]`` token rows read at
    ``sorted_ids[p] // a_row_div`` (``"gather"``). ``b``: ``[E, R, K]`` (gated: gate rows then up rows,
    ``R = 2 N``). ``c``: ``[L, N]`` written at sorted positions (``c_mode="sorted"``) or ``[S, N]`` at
    the slots (``"slot"``, times ``topk_weights`` when given). ``expert_offsets`` (the sort's padded expert
    offsets) switches the tile order to groups bounded by experts (``_gemm_tiles.expert_tile_coords``).
    """
    if a_mode not in A_MODES:
        raise ValueError(f"a_mode must be one of {A_MODES}, got {a_mode!r}")
    if c_mode not in ("sorted", "slot"):
        raise ValueError(f"c_mode must be 'sorted' or 'slot', got {c_mode!r}")
    k_dim = a.shape[1]
    n_out = b.shape[1] // 2 if gated else b.shape[1]
    num_pid_n = -(-n_out // block_n)
    tiles = grid_m * num_pid_n
    if tiles == 0:
        return
    grid = (min(tiles, num_sms) if persistent else tiles,)
    a_desc = _descriptor(a, block_m, block_k) if a_mode == "tma" else None
    b_desc = _descriptor(b, block_n, block_k)
    interpreting = a.device.type == "cpu"
    _moe_gemm_tma_kernel[grid](
        a,
        a_desc if a_desc is not None else b_desc,
        b_desc,
        c,
        topk_weights if topk_weights is not None else block_expert,
        sorted_ids,
        block_expert,
        expert_offsets if expert_offsets is not None else block_expert,
        num_tokens_post_padded,
        n_out,
        k_dim,
        num_slots,
        b.shape[0],
        b.shape[1],
        a.stride(0),
        a.stride(1),
        c.stride(0),
        c.stride(1),
        float(swiglu_alpha),
        float(swiglu_limit),
        A_MODE=a_mode,
        A_ROW_DIV=a_row_div,
        C_MODE=c_mode,
        MUL_ROUTED_WEIGHT=topk_weights is not None,
        ACT=activation,
        GATED=gated,
        INTERPRET=interpreting,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=group_m,
        EXPERT_GROUPS=expert_offsets is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )


if tl is not None:
    from ._gemm_tiles import activate, dot_acc, expert_tile_coords, tile_coords

    @kernel
    def _moe_gemm_tma_kernel(
        a_ptr,
        a_desc,
        b_desc,
        c_ptr,
        topk_weights_ptr,
        sorted_ids_ptr,
        block_expert_ptr,
        expert_offsets_ptr,
        ntpp_ptr,
        N,
        K,
        num_slots,
        num_experts,
        b_rows_per_expert,
        stride_am,
        stride_ak,
        stride_cm,
        stride_cn,
        swiglu_alpha,
        swiglu_limit,
        A_MODE: tl.constexpr,
        A_ROW_DIV: tl.constexpr,
        C_MODE: tl.constexpr,
        MUL_ROUTED_WEIGHT: tl.constexpr,
        ACT: tl.constexpr,
        GATED: tl.constexpr,
        INTERPRET: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        EXPERT_GROUPS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        num_pid_m = tl.cdiv(tl.load(ntpp_ptr), BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        for tile in range(pid, num_pid_m * num_pid_n, nprog):
            if EXPERT_GROUPS:
                pid_m, pid_n, expert = expert_tile_coords(
                    tile, num_pid_n, block_expert_ptr, expert_offsets_ptr, BLOCK_M, GROUP_M
                )
            else:
                pid_m, pid_n = tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
                expert = tl.load(block_expert_ptr + pid_m)
            if (expert >= 0) & (expert < num_experts):
                off_m = pid_m * BLOCK_M
                off_b = expert * b_rows_per_expert + pid_n * BLOCK_N
                positions = off_m + tl.arange(0, BLOCK_M)
                slots = tl.load(sorted_ids_ptr + positions)
                row_mask = slots < num_slots
                if A_MODE == "gather":
                    a_rows = (slots // A_ROW_DIV).to(tl.int64)
                    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc_up = acc
                for kk in range(0, K, BLOCK_K):
                    if A_MODE == "tma":
                        a = a_desc.load([off_m, kk])
                    else:
                        a = tl.load(a_ptrs, mask=row_mask[:, None] & (offs_k[None, :] < K - kk), other=0.0)
                        a_ptrs += BLOCK_K * stride_ak
                    b = b_desc.load([off_b, kk])
                    acc = dot_acc(a, b.T, acc, INTERPRET, False)
                    if GATED:
                        b_up = b_desc.load([off_b + N, kk])
                        acc_up = dot_acc(a, b_up.T, acc_up, INTERPRET, False)
                out = activate(acc, acc_up, swiglu_alpha, swiglu_limit, ACT)
                if MUL_ROUTED_WEIGHT:
                    w = tl.load(topk_weights_ptr + slots, mask=row_mask, other=0.0)
                    out = out * w[:, None]
                offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                if C_MODE == "sorted":
                    # Padding positions are written too (their rows are never read back as results).
                    c_rows = positions.to(tl.int64)
                    c_mask = (positions[:, None] >= 0) & (offs_n[None, :] < N)
                else:
                    c_rows = slots.to(tl.int64)
                    c_mask = row_mask[:, None] & (offs_n[None, :] < N)
                c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
                tl.store(c_ptrs, cast_for_store(out, c_ptr.dtype.element_ty, INTERPRET), mask=c_mask)


__all__ = ["A_MODES", "gathers_only", "invoke_tma_gemm", "tma_possible", "tma_problem"]
