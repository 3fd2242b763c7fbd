"""Triton kernels behind ``ops.activation``: gated activations, relu2, and the activation + FP8 group
quantization fused for the masked (batched) and the contiguous (DeepGEMM) layouts.

All arithmetic is fp32. Results match the torch implementations up to the last bits of ``exp`` / ``erf``
(the GPU uses fast approximations), which after rounding to bf16 / fp16 rarely moves a value by one ulp.
"""

from __future__ import annotations

import torch

from ._dispatch import triton_interpreting
from ._jit import cast_for_store, fp8_group_quant, kernel
from .align import _cdiv, _next_pow2

try:
    import triton.language as tl
except ImportError:  # torch-only installs: nothing here is launched
    tl = None

_GATED_KINDS = {"silu": 0, "gelu": 1, "swiglu": 2}
_ELEMENTS_PER_PROGRAM = 2048


def _rows_view(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as ``[rows, last]`` sharing storage, or None when no such view exists."""
    if t.dim() == 0 or t.stride(-1) != 1:
        return None
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def gated_activation_triton(
    x: torch.Tensor, kind: str, out: torch.Tensor | None = None, *, alpha: float = 1.702, limit: float = 7.0
) -> torch.Tensor:
    """``act(x[..., :N]) * x[..., N:]`` for ``kind`` in silu / gelu / swiglu (see ``ops.activation``)."""
    if kind not in _GATED_KINDS:
        raise ValueError(f"kind must be one of {sorted(_GATED_KINDS)}, got {kind!r}")
    if x.shape[-1] % 2:
        raise ValueError(f"{kind} expects an even last dimension (gate | up), got shape {tuple(x.shape)}")
    n = x.shape[-1] // 2
    out_shape = (*x.shape[:-1], n)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != out_shape:
        raise ValueError(f"out must have shape {out_shape}, got {tuple(out.shape)}")
    src = _rows_view(x)
    if src is None:
        src = x.contiguous().view(-1, x.shape[-1])
    dst = _rows_view(out)
    target = out if dst is not None else torch.empty(out_shape, dtype=out.dtype, device=out.device)
    dst = dst if dst is not None else target.view(-1, n)
    rows = src.shape[0]
    if rows and n:
        block = min(_next_pow2(n), _ELEMENTS_PER_PROGRAM)
        _gated_kernel[(rows, _cdiv(n, block))](
            src,
            src.stride(0),
            dst,
            dst.stride(0),
            n,
            float(alpha),
            float(limit),
            KIND=_GATED_KINDS[kind],
            BLOCK=block,
            SOFT_ROUND=triton_interpreting(),
            num_warps=4,
        )
    if target is not out:
        out.copy_(target)
    return out


def relu2_triton(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(x) ** 2`` elementwise."""
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"out must have shape {tuple(x.shape)}, got {tuple(out.shape)}")
    src = x.contiguous().view(-1)
    target = out if out.is_contiguous() else torch.empty(x.shape, dtype=out.dtype, device=out.device)
    numel = src.numel()
    if numel:
        block = _ELEMENTS_PER_PROGRAM
        _relu2_kernel[(_cdiv(numel, block),)](
            src, target.view(-1), numel, BLOCK=block, SOFT_ROUND=triton_interpreting(), num_warps=4
        )
    if target is not out:
        out.copy_(target)
    return out


@kernel
def _gated_value(gate, up, alpha, limit, KIND: tl.constexpr):
    """fp32 ``act(gate) * up``; every kernel here goes through it so the fused and the two-step paths
    compute the same bits."""
    if KIND == 0:
        y = gate / (1.0 + tl.exp(-gate)) * up
    elif KIND == 1:
        y = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)) * up
    else:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        y = gate * (1.0 / (1.0 + tl.exp(-alpha * gate))) * (up + 1.0)
    return y


@kernel
def _gated_kernel(
    x_ptr,
    x_stride,
    out_ptr,
    out_stride,
    N,
    alpha,
    limit,
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + N + cols, mask=mask, other=0.0).to(tl.float32)
    y = _gated_value(gate, up, alpha, limit, KIND)
    tl.store(out_ptr + row * out_stride + cols, cast_for_store(y, out_ptr.dtype.element_ty, SOFT_ROUND), mask=mask)


@kernel
def _relu2_kernel(x_ptr, out_ptr, numel, BLOCK: tl.constexpr, SOFT_ROUND: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.maximum(tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
    tl.store(out_ptr + offs, cast_for_store(x * x, out_ptr.dtype.element_ty, SOFT_ROUND), mask=mask)


# ----------------------------------------------------------------------------------------------------
# masked SiLU-mul-FP8-quant (batched / masked layout)

_MASKED_BLOCK_T = 16
_MASKED_MAX_PROGRAMS = 1024


def silu_mul_fp8_quant_masked_triton(
    y: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    y_q: torch.Tensor,
    y_s: torch.Tensor,
    group_size: int,
    use_ue8m0: bool,
    eps: float,
) -> None:
    """Fill ``y_q`` / ``y_s`` (allocated and checked by ``ops.activation.silu_mul_fp8_quant_masked``).

    The grid is ``(E, P)`` with ``P`` fixed by the static shape: program ``(e, p)`` walks token blocks
    ``p, p + P, ...`` below ``tokens_per_expert[e]`` read on the device, so the launch is CUDA-graph safe
    and rows past an expert's count are neither read nor written.
    """
    e, t, h2 = y.shape
    h = h2 // 2
    groups = h // group_size
    block_t = min(_MASKED_BLOCK_T, _next_pow2(max(t, 1)))
    programs_t = max(1, min(_cdiv(t, block_t), _MASKED_MAX_PROGRAMS // max(e, 1)))
    _silu_mul_quant_masked_kernel[(e, programs_t)](
        y,
        y.stride(0),
        y.stride(1),
        y.stride(2),
        tokens_per_expert,
        y_q,
        y_q.stride(0),
        y_q.stride(1),
        y_s,
        y_s.stride(0),
        y_s.stride(1),
        y_s.stride(2),
        t,
        h,
        groups,
        float(eps),
        GROUP=group_size,
        GROUP_P2=_next_pow2(group_size),
        BLOCK_T=block_t,
        USE_UE8M0=use_ue8m0,
        SOFT_ROUND=triton_interpreting(),
        num_warps=4,
    )


@kernel
def _silu_mul_quant_masked_kernel(
    y_ptr,
    y_stride_e,
    y_stride_t,
    y_stride_h,
    counts_ptr,
    q_ptr,
    q_stride_e,
    q_stride_t,
    s_ptr,
    s_stride_e,
    s_stride_t,
    s_stride_g,
    T,
    H,
    G,
    eps,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    BLOCK_T: tl.constexpr,
    USE_UE8M0: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
):
    expert = tl.program_id(0)
    n_tokens = tl.minimum(tl.maximum(tl.load(counts_ptr + expert).to(tl.int32), 0), T)
    step = tl.num_programs(1) * BLOCK_T
    cols = tl.arange(0, GROUP_P2)
    col_ok = cols < GROUP
    t_lane = tl.arange(0, BLOCK_T)
    y_base = y_ptr + expert.to(tl.int64) * y_stride_e
    q_base = q_ptr + expert.to(tl.int64) * q_stride_e
    s_base = s_ptr + expert.to(tl.int64) * s_stride_e
    for t0 in range(tl.program_id(1) * BLOCK_T, n_tokens, step):
        tokens = t0 + t_lane
        t_ok = tokens < n_tokens
        mask = t_ok[:, None] & col_ok[None, :]
        row_off = tokens.to(tl.int64)[:, None] * y_stride_t
        for g in range(0, G):
            h_idx = g * GROUP + cols
            gate = tl.load(y_base + row_off + h_idx[None, :] * y_stride_h, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(y_base + row_off + (H + h_idx)[None, :] * y_stride_h, mask=mask, other=0.0).to(tl.float32)
            act = _gated_value(gate, up, 0.0, 0.0, 0)
            q, scale = fp8_group_quant(act, eps, USE_UE8M0)
            q = cast_for_store(q, q_ptr.dtype.element_ty, SOFT_ROUND)
            tl.store(q_base + tokens.to(tl.int64)[:, None] * q_stride_t + h_idx[None, :], q, mask=mask)
            tl.store(s_base + tokens.to(tl.int64) * s_stride_t + g * s_stride_g, scale, mask=t_ok)


# ----------------------------------------------------------------------------------------------------
# gated activation + FP8 group quant, contiguous layout (DeepGEMM's m-grouped GEMM)

_FUSED_BLOCK_ROWS = 32


def gated_act_fp8_quant_triton(
    x: torch.Tensor,
    kind: str,
    m_indices: torch.Tensor | None,
    q: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    use_ue8m0: bool,
    eps: float,
    alpha: float,
    limit: float,
) -> None:
    """Fill ``q`` / ``scales`` (allocated and checked by ``ops.activation.gated_act_fp8_quant``).

    Program ``(b, g)`` handles ``BLOCK_ROWS`` rows of quantization group ``g``: it reads their gate and up
    columns once and writes the FP8 values and one scale per row, so column-major scales are stored as one
    contiguous run per program. Rows whose ``m_indices`` entry is negative are masked off: their loads and
    stores never reach memory.
    """
    m, n2 = x.shape
    n = n2 // 2
    groups = n // group_size
    group_p2 = _next_pow2(group_size)
    block_rows = max(1, min(_FUSED_BLOCK_ROWS, _next_pow2(m), 4096 // group_p2))
    _gated_quant_rows_kernel[(_cdiv(m, block_rows), groups)](
        x,
        x.stride(0),
        m_indices if m_indices is not None else x,
        q,
        q.stride(0),
        scales,
        scales.stride(0),
        scales.stride(1),
        m,
        n,
        float(alpha),
        float(limit),
        float(eps),
        KIND=_GATED_KINDS[kind],
        GROUP=group_size,
        GROUP_P2=group_p2,
        BLOCK_ROWS=block_rows,
        HAS_M_INDICES=m_indices is not None,
        USE_UE8M0=use_ue8m0,
        SOFT_ROUND=triton_interpreting(),
        num_warps=4,
    )


@kernel
def _gated_quant_rows_kernel(
    x_ptr,
    x_stride,
    m_indices_ptr,
    q_ptr,
    q_stride,
    s_ptr,
    s_stride_row,
    s_stride_group,
    rows,
    N,
    alpha,
    limit,
    eps,
    KIND: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    HAS_M_INDICES: tl.constexpr,
    USE_UE8M0: tl.constexpr,
    SOFT_ROUND: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    g = tl.program_id(1)
    row_ok = r < rows
    if HAS_M_INDICES:
        row_ok = row_ok & (tl.load(m_indices_ptr + r, mask=row_ok, other=-1) >= 0)
    lane = tl.arange(0, GROUP_P2)
    cols = g * GROUP + lane
    mask = row_ok[:, None] & (lane < GROUP)[None, :]
    r64 = r.to(tl.int64)
    src = x_ptr + r64[:, None] * x_stride + cols[None, :]
    gate = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(src + N, mask=mask, other=0.0).to(tl.float32)
    y = _gated_value(gate, up, alpha, limit, KIND)
    # Rounded to x's dtype as the two-step path stores it, so both paths quantize the same values.
    y = cast_for_store(y, x_ptr.dtype.element_ty, SOFT_ROUND).to(tl.float32)
    q, scale = fp8_group_quant(y, eps, USE_UE8M0)
    q = cast_for_store(q, q_ptr.dtype.element_ty, SOFT_ROUND)
    tl.store(q_ptr + r64[:, None] * q_stride + cols[None, :], q, mask=mask)
    tl.store(s_ptr + r64 * s_stride_row + g * s_stride_group, scale, mask=row_ok)
