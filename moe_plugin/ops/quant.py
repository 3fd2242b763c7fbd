"""FP8 (float8_e4m3fn) activation quantization: per-token-group, per-token and per-tensor.

Scale of a group = max(amax, eps) / 448, optionally rounded up to a power of two (UE8M0); values are
``clamp(x * (1 / scale), -448, 448)`` cast to FP8: the reciprocal rounded once, then a multiply per value, as
the quantizing Triton kernels (these ops, the fused activation + quant, ``ep_scatter``) do bit for bit — a
division per value made them instruction-bound. A scale below the smallest normal fp32 counts as that one,
whose reciprocal is finite. Dequantization is ``q * scale``.
"""

from __future__ import annotations

import math

import torch

from ..config import FP8_DTYPE

FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
FP8_MIN = float(torch.finfo(FP8_DTYPE).min)
_FP32_TINY = torch.finfo(torch.float32).tiny


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    """``1 / scale`` rounded once, finite for any non-negative scale (see the module docstring)."""
    return scale.clamp_min(_FP32_TINY).reciprocal()


def tma_aligned_size(rows: int, element_size: int = 4) -> int:
    """Rows rounded up so a column of ``element_size``-byte scales is a whole 16-byte TMA unit."""
    per = 16 // element_size
    return (rows + per - 1) // per * per


def mn_major_scales(rows: int, groups: int, device: torch.device, batch: int | None = None) -> torch.Tensor:
    """Empty fp32 scales ``[rows, groups]`` (or ``[batch, rows, groups]``) stored column-major with a
    TMA-aligned column stride: the layout DeepGEMM's SM90 kernels read without a transposing copy."""
    ld = tma_aligned_size(rows)
    if batch is None:
        return torch.empty_strided((rows, groups), (1, ld), dtype=torch.float32, device=device)
    return torch.empty_strided((batch, rows, groups), (ld * groups, 1, ld), dtype=torch.float32, device=device)


DEFAULT_EPS = 1e-10


def _check_input(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{name} must be bf16, fp16 or fp32 to quantize, got {x.dtype}")


def round_scale_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Round scales up to the next power of two (the exponent-only UE8M0 format).

    Done on the fp32 bit pattern (any mantissa bit set moves the value to the next exponent), which is
    exact where ``exp2(ceil(log2(s)))`` can round ``log2`` down to an integer and return a scale below ``s``;
    the Triton kernels use the same rule, so both paths agree bit for bit.
    """
    s = scale.float()
    bits = s.view(torch.int32)
    rounded = torch.where((bits & 0x7FFFFF) != 0, (bits & -0x800000) + 0x800000, bits).view(torch.float32)
    return torch.where(torch.isnan(s), s, rounded).to(scale.dtype)


def per_token_group_quant_fp8(
    x: torch.Tensor,
    group_size: int = 128,
    *,
    use_ue8m0: bool = False,
    column_major_scales: bool = False,
    eps: float = DEFAULT_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., K]`` per token per ``group_size`` columns.

    Returns ``(q [..., K] fp8, scales [..., ceil(K/group_size)] fp32)``. With ``column_major_scales``
    the scales of a 2-D input are stored transposed (stride ``(1, M)``), as TMA-based GEMMs read them.
    """
    _check_input(x)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    from ._dispatch import use_triton

    if use_triton(x) and x.numel() and x.shape[-1] % group_size == 0:
        from ._quant_triton import per_token_group_quant_fp8_triton

        return per_token_group_quant_fp8_triton(
            x, group_size, use_ue8m0=use_ue8m0, column_major_scales=column_major_scales, eps=eps
        )
    return per_token_group_quant_fp8_torch(
        x, group_size, use_ue8m0=use_ue8m0, column_major_scales=column_major_scales, eps=eps
    )


def per_token_group_quant_fp8_torch(
    x: torch.Tensor,
    group_size: int = 128,
    *,
    use_ue8m0: bool = False,
    column_major_scales: bool = False,
    eps: float = DEFAULT_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    k = x.shape[-1]
    groups = math.ceil(k / group_size)
    lead = x.shape[:-1]
    xf = x.float()
    pad = groups * group_size - k
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    xg = xf.reshape(*lead, groups, group_size)
    amax = xg.abs().amax(dim=-1).clamp_min(eps)
    scale = amax / FP8_MAX
    if use_ue8m0:
        scale = round_scale_ue8m0(scale)
    q = (xg * _inverse(scale).unsqueeze(-1)).clamp(FP8_MIN, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(*lead, groups * group_size)[..., :k].contiguous()
    if column_major_scales and scale.dim() == 2:
        scale = scale.t().contiguous().t()
    return q, scale


def per_token_quant_fp8(x: torch.Tensor, *, eps: float = DEFAULT_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per row: returns ``(q, scales [..., 1])``."""
    _check_input(x)
    from ._dispatch import use_triton

    if use_triton(x) and x.numel():
        from ._quant_triton import per_token_group_quant_fp8_triton

        return per_token_group_quant_fp8_triton(x, x.shape[-1], eps=eps)
    amax = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(eps)
    scale = amax / FP8_MAX
    q = (x.float() * _inverse(scale)).clamp(FP8_MIN, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def per_tensor_scale(x: torch.Tensor, *, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``[1]`` fp32: the dynamic per-tensor scale of ``x``, ``max(amax, eps) / 448``."""
    # amax of an empty tensor is undefined; any positive scale quantizes no values correctly.
    amax = x.float().abs().amax() if x.numel() else x.new_zeros((), dtype=torch.float32)
    return (amax.clamp_min(eps) / FP8_MAX).reshape(1)


def per_tensor_quant_fp8(
    x: torch.Tensor, scale: torch.Tensor | None = None, *, eps: float = DEFAULT_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale for the whole tensor (computed when ``scale`` is None, else the static one given)."""
    _check_input(x)
    if scale is None:
        scale = per_tensor_scale(x, eps=eps)
    else:
        if scale.numel() != 1:
            raise ValueError(f"scale must hold one value for per-tensor quantization, got shape {tuple(scale.shape)}")
        scale = scale.float().reshape(1).to(x.device)
    from ._dispatch import use_triton

    if use_triton(x) and x.numel():
        from ._quant_triton import static_quant_fp8_triton

        return static_quant_fp8_triton(x, scale), scale
    q = (x.float() * _inverse(scale)).clamp(FP8_MIN, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequant_per_token_group(q: torch.Tensor, scale: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """fp32 ``q * scale`` with each scale broadcast over its group of columns."""
    k = q.shape[-1]
    return q.float() * scale.float().repeat_interleave(group_size, dim=-1)[..., :k]


def dequant_block_weight(w: torch.Tensor, scale: torch.Tensor, block_shape: tuple[int, int]) -> torch.Tensor:
    """fp32 weight ``[..., R, C]`` from FP8 blocks and their ``[..., ceil(R/bn), ceil(C/bk)]`` scales."""
    bn, bk = block_shape
    r, c = w.shape[-2:]
    s = scale.float().repeat_interleave(bn, dim=-2)[..., :r, :].repeat_interleave(bk, dim=-1)[..., :c]
    return w.float() * s


def quantize_block_weight(
    w: torch.Tensor, block_shape: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight ``[..., R, C]`` into FP8 with one fp32 scale per ``block_shape`` block."""
    bn, bk = block_shape
    r, c = w.shape[-2:]
    rb, cb = math.ceil(r / bn), math.ceil(c / bk)
    wf = torch.nn.functional.pad(w.float(), (0, cb * bk - c, 0, rb * bn - r))
    blocks = wf.reshape(*w.shape[:-2], rb, bn, cb, bk)
    amax = blocks.abs().amax(dim=(-3, -1)).clamp_min(DEFAULT_EPS)
    scale = amax / FP8_MAX
    q = (blocks * _inverse(scale)[..., :, None, :, None]).clamp(FP8_MIN, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(*w.shape[:-2], rb * bn, cb * bk)[..., :r, :c].contiguous()
    return q, scale
