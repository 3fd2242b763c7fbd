"""Quantize and dequantize activations and weights as a ``QuantConfig`` says.

The one place that maps a quant scheme (block / per-token / per-tensor FP8) onto the quant ops, so the
prepare step, the reference experts and the tests agree on what "quantized activations" means.
"""

from __future__ import annotations

import torch

from ..config import QuantConfig, ScaleFormat
from .quant import (
    dequant_block_weight,
    dequant_per_token_group,
    per_tensor_quant_fp8,
    per_token_group_quant_fp8,
    per_token_quant_fp8,
)


def quantize_activation(
    x: torch.Tensor, quant: QuantConfig, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(q, scale)``; the identity ``(x, None)`` when unquantized.

    Block: per token per ``block_shape[1]`` columns (``scale [..., ceil(K/bk)]``); per-token:
    ``scale [..., 1]``; per-tensor: ``scale [1]`` (``static_scale`` when given).
    """
    if not quant.is_quantized:
        return x, None
    if quant.block_shape is not None:
        return per_token_group_quant_fp8(
            x, quant.block_shape[1], use_ue8m0=quant.scale_format is ScaleFormat.UE8M0
        )
    if quant.per_act_token:
        return per_token_quant_fp8(x)
    return per_tensor_quant_fp8(x, static_scale)


def dequant_activation(q: torch.Tensor, scale: torch.Tensor | None, quant: QuantConfig) -> torch.Tensor:
    """fp32 activations from ``quantize_activation``'s output (unchanged when unquantized)."""
    if not quant.is_quantized:
        return q
    if quant.block_shape is not None:
        return dequant_per_token_group(q, scale, quant.block_shape[1])
    return q.float() * scale.float()


def dequant_expert_weight(w: torch.Tensor, scale: torch.Tensor | None, quant: QuantConfig) -> torch.Tensor:
    """One expert's weight ``[R, C]`` as fp32 (unchanged when unquantized)."""
    if not quant.is_quantized:
        return w
    if quant.block_shape is not None:
        return dequant_block_weight(w, scale, quant.block_shape)
    if quant.per_act_token:
        return w.float() * scale.float().reshape(-1, 1)
    return w.float() * scale.float().reshape(())
