"""Expert activations.

Gated activations take ``x [..., 2N]`` laid out as w1's output: the first N columns come from the gate
rows, the last N from the up rows; they return ``[..., N]``.

- ``silu_and_mul``:  ``silu(gate) * up``
- ``gelu_and_mul``:  ``gelu(gate) * up`` (exact, erf-based GELU)
- ``swiglu``:        gpt-oss style, ``g = min(gate, limit)``, ``u = clamp(up, -limit, limit)``,
                     ``out = g * sigmoid(alpha * g) * (u + 1)`` (defaults ``alpha=1.702``, ``limit=7.0``).
                     gpt-oss checkpoints interleave gate/up columns; de-interleave them at load time.
- ``relu2``:         squared ReLU with no gate, ``relu(x) ** 2`` on ``x [..., N]``.

All compute in fp32 and return the input dtype.
"""

from __future__ import annotations

import torch

from ..config import ACTIVATIONS, FP8_DTYPE, is_gated

SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


def _split(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[-1] % 2:
        raise ValueError(f"{name} expects an even last dimension (gate | up), got shape {tuple(x.shape)}")
    n = x.shape[-1] // 2
    return x[..., :n].float(), x[..., n:].float()


def _use_triton(x: torch.Tensor) -> bool:
    from ._dispatch import use_triton

    return use_triton(x) and x.numel() > 0


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if _use_triton(x):
        from ._activation_triton import gated_activation_triton

        return gated_activation_triton(x, "silu", out)
    gate, up = _split(x, "silu_and_mul")
    return _store(torch.nn.functional.silu(gate) * up, x.dtype, out)


def gelu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if _use_triton(x):
        from ._activation_triton import gated_activation_triton

        return gated_activation_triton(x, "gelu", out)
    gate, up = _split(x, "gelu_and_mul")
    return _store(torch.nn.functional.gelu(gate) * up, x.dtype, out)


def swiglu(
    x: torch.Tensor, out: torch.Tensor | None = None, *, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT
) -> torch.Tensor:
    if _use_triton(x):
        from ._activation_triton import gated_activation_triton

        return gated_activation_triton(x, "swiglu", out, alpha=alpha, limit=limit)
    gate, up = _split(x, "swiglu")
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return _store(gate * torch.sigmoid(alpha * gate) * (up + 1.0), x.dtype, out)


def relu2(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if _use_triton(x):
        from ._activation_triton import relu2_triton

        return relu2_triton(x, out)
    return _store(torch.relu(x.float()).square(), x.dtype, out)


def _store(y: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return y.to(dtype)
    out.copy_(y)
    return out


def apply_activation(activation: str, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the named activation (see module docstring) to GEMM1's output."""
    if activation == "silu":
        return silu_and_mul(x, out)
    if activation == "gelu":
        return gelu_and_mul(x, out)
    if activation == "swiglu":
        return swiglu(x, out)
    if activation == "relu2":
        return relu2(x, out)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activation_output_dim(activation: str, w1_rows: int) -> int:
    """Columns after the activation: half of w1's rows when gated."""
    return w1_rows // 2 if is_gated(activation) else w1_rows


def silu_mul_fp8_quant_masked(
    y: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    group_size: int = 128,
    use_ue8m0: bool = False,
    column_major_scales: bool = True,
    eps: float = 1e-10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``silu(y[..., :H]) * y[..., H:]`` and per-token-group FP8 quantization in the masked layout.

    ``y [E, T, 2H]`` holds ``tokens_per_expert[e]`` valid rows per expert (the Batched format); rows past
    the count are neither read nor written. Returns ``(y_q [E, T, H] float8_e4m3fn, y_s [E, T, H / group]
    fp32)``; with ``column_major_scales`` ``y_s`` has strides ``(T * G, 1, T)`` (what DeepGEMM's masked
    GEMM reads), else it is contiguous. The activation stays in fp32 up to the quantization (no rounding
    to ``y``'s dtype in between); scales follow ``ops.quant`` (``max(amax, eps) / 448``, rounded up to a power
    of two with ``use_ue8m0``). The CUDA launch has a grid fixed by the shape, so it can be captured once
    and replayed for any counts.
    """
    if not isinstance(y, torch.Tensor) or y.dim() != 3:
        raise ValueError(f"y must be a 3-D tensor [E, T, 2H], got {getattr(y, 'shape', y)!r}")
    if y.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"y must be bf16, fp16 or fp32, got {y.dtype}")
    e, t, h2 = y.shape
    if h2 % 2:
        raise ValueError(f"y's last dimension must be even (gate | up), got {h2}")
    h = h2 // 2
    if not isinstance(group_size, int) or group_size < 1 or h % group_size:
        raise ValueError(f"group_size must be a positive int dividing H={h}, got {group_size!r}")
    if not isinstance(tokens_per_expert, torch.Tensor) or tuple(tokens_per_expert.shape) != (e,):
        raise ValueError(f"tokens_per_expert must be a tensor of shape [{e}], got {getattr(tokens_per_expert, 'shape', tokens_per_expert)!r}")
    if tokens_per_expert.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tokens_per_expert must be int32 or int64, got {tokens_per_expert.dtype}")
    if tokens_per_expert.device != y.device:
        raise ValueError(f"tokens_per_expert must be on {y.device} like y, got {tokens_per_expert.device}")
    groups = h // group_size
    y_q = torch.empty((e, t, h), dtype=FP8_DTYPE, device=y.device)
    if column_major_scales:
        y_s = torch.empty_strided((e, t, groups), (t * groups, 1, t), dtype=torch.float32, device=y.device)
    else:
        y_s = torch.empty((e, t, groups), dtype=torch.float32, device=y.device)
    if y.numel() == 0:
        return y_q, y_s

    from ._dispatch import use_triton

    if use_triton(y):
        from ._activation_triton import silu_mul_fp8_quant_masked_triton

        silu_mul_fp8_quant_masked_triton(y, tokens_per_expert, y_q, y_s, group_size, use_ue8m0, eps)
        return y_q, y_s

    from .quant import per_token_group_quant_fp8_torch

    for expert, count in enumerate(tokens_per_expert.tolist()):
        n = min(max(int(count), 0), t)
        if n == 0:
            continue
        gate, up = y[expert, :n, :h].float(), y[expert, :n, h:].float()
        q, s = per_token_group_quant_fp8_torch(torch.nn.functional.silu(gate) * up, group_size, use_ue8m0=use_ue8m0, eps=eps)
        y_q[expert, :n] = q
        y_s[expert, :n] = s
    return y_q, y_s
