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

Fused with per-token-group FP8 quantization (the input of an FP8 GEMM2):

- ``silu_mul_fp8_quant_masked``: SiLU only, the Batched (masked) layout, activation kept in fp32;
- ``gated_act_fp8_quant``: the gated activations (``FUSED_QUANT_ACTIVATIONS``), the contiguous layout of
  DeepGEMM's grouped GEMM (rows labelled by ``m_indices``, -1 rows skipped), bit-identical to the two-step
  ``apply_activation`` then ``ops.quant.per_token_group_quant_fp8``.
"""

from __future__ import annotations

import torch

from ..config import ACTIVATIONS, FP8_DTYPE, is_gated
from .quant import mn_major_scales

SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0

FUSED_QUANT_ACTIVATIONS = ("silu", "gelu", "swiglu")
"""Activations ``gated_act_fp8_quant`` fuses with the quantization (relu2 goes the two-step way)."""


def _split(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[-1] % 2:
        raise ValueError(f"{name} expects an even last dimension (gate | up), got shape {tuple(x.shape)}")
    n = x.shape[-1] // 2
    return x[..., :n].float(), x[..., n:].float()


def _use_triton(x: torch.Tensor) -> bool:
    from ._dispatch import use_triton

    return use_triton(x) and x.numel() > 0


def _gated_torch(
    kind: str, x: torch.Tensor, name: str, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT
) -> torch.Tensor:
    """fp32 ``act(gate) * up`` of the named gated activation (the torch path of every gated op here)."""
    gate, up = _split(x, name)
    if kind == "silu":
        return torch.nn.functional.silu(gate) * up
    if kind == "gelu":
        return torch.nn.functional.gelu(gate) * up
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1.0)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if _use_triton(x):
        from ._activation_triton import gated_activation_triton

        return gated_activation_triton(x, "silu", out)
    return _store(_gated_torch("silu", x, "silu_and_mul"), x.dtype, out)


def gelu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if _use_triton(x):
        from ._activation_triton import gated_activation_triton

        return gated_activation_triton(x, "gelu", out)
    return _store(_gated_torch("gelu", x, "gelu_and_mul"), x.dtype, out)


def swiglu(
    x: torch.Tensor, out: torch.Tensor | None = None, *, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT
) -> torch.Tensor:
    if _use_triton(x):
        from ._activation_triton import gated_activation_triton

        return gated_activation_triton(x, "swiglu", out, alpha=alpha, limit=limit)
    return _store(_gated_torch("swiglu", x, "swiglu", alpha, limit), x.dtype, out)


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
        act = _gated_torch("silu", y[expert, :n], "silu_mul_fp8_quant_masked")
        q, s = per_token_group_quant_fp8_torch(act, group_size, use_ue8m0=use_ue8m0, eps=eps)
        y_q[expert, :n] = q
        y_s[expert, :n] = s
    return y_q, y_s


def _check_fused_quant_args(x, activation, group_size, m_indices):
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [M, 2N] (GEMM1's output), got {getattr(x, 'shape', x)!r}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    if activation not in FUSED_QUANT_ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {FUSED_QUANT_ACTIVATIONS} (fused), got {activation!r}; run "
            "apply_activation and ops.quant.per_token_group_quant_fp8 for the others"
        )
    if x.shape[1] % 2:
        raise ValueError(f"x's last dimension must be even (gate | up), got shape {tuple(x.shape)}")
    n = x.shape[1] // 2
    if not isinstance(group_size, int) or group_size < 1 or n % group_size:
        raise ValueError(f"group_size must be a positive int dividing N={n}, got {group_size!r}")
    if m_indices is not None:
        if not isinstance(m_indices, torch.Tensor) or tuple(m_indices.shape) != (x.shape[0],):
            raise ValueError(
                f"m_indices must be a tensor of shape [{x.shape[0]}] (one entry per row of x), got "
                f"{getattr(m_indices, 'shape', m_indices)!r}"
            )
        if m_indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"m_indices must be int32 or int64, got {m_indices.dtype}")
        if m_indices.device != x.device:
            raise ValueError(f"m_indices must be on {x.device} like x, got {m_indices.device}")
    return n


def gated_act_fp8_quant(
    x: torch.Tensor,
    activation: str = "silu",
    group_size: int = 128,
    *,
    m_indices: torch.Tensor | None = None,
    use_ue8m0: bool = False,
    column_major_scales: bool = True,
    out: torch.Tensor | None = None,
    out_scales: torch.Tensor | None = None,
    eps: float = 1e-10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated activation and per-token-group FP8 quantization in one pass over ``x [M, 2N]``.

    The result is bit for bit ``per_token_group_quant_fp8(apply_activation(activation, x), group_size)``:
    the activation is rounded to ``x``'s dtype before its group's amax is taken, exactly as the two-step
    path stores it, so switching a backend to the fused op changes no numbers. Returns ``(q [M, N]
    float8_e4m3fn, scales [M, N / group_size] fp32)``; with ``column_major_scales`` the scales are stored
    column-major with the column stride rounded up to 4 rows (16 bytes, TMA-aligned: DeepGEMM's layout),
    else row-major. ``out`` / ``out_scales`` receive the results when given (any strides with a unit
    column stride for ``out``).

    ``m_indices [M]`` (DeepGEMM's contiguous layout: each row's expert, -1 where the GEMM skips the row)
    makes rows with a negative entry neither read nor written, so a worst-case-sized buffer costs nothing
    for its unused tail (CUDA-graph capture sizes the layout for the worst case). The launch grid depends
    on ``M`` only, so it is capturable once and valid for any routing replayed into the graph.
    """
    n = _check_fused_quant_args(x, activation, group_size, m_indices)
    m = x.shape[0]
    groups = n // group_size
    if out is None:
        out = torch.empty((m, n), dtype=FP8_DTYPE, device=x.device)
    elif (
        not isinstance(out, torch.Tensor)
        or tuple(out.shape) != (m, n)
        or out.dtype != FP8_DTYPE
        or out.device != x.device
        or out.stride(1) != 1
    ):
        raise ValueError(
            f"out must be a float8_e4m3fn tensor of shape {(m, n)} on {x.device} with a unit column stride, got "
            f"{getattr(out, 'dtype', None)} {tuple(getattr(out, 'shape', ()))}"
        )
    if out_scales is None:
        if column_major_scales:
            out_scales = mn_major_scales(m, groups, x.device)
        else:
            out_scales = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    elif (
        not isinstance(out_scales, torch.Tensor)
        or tuple(out_scales.shape) != (m, groups)
        or out_scales.dtype != torch.float32
        or out_scales.device != x.device
    ):
        raise ValueError(
            f"out_scales must be an fp32 tensor of shape {(m, groups)} on {x.device}, got "
            f"{getattr(out_scales, 'dtype', None)} {tuple(getattr(out_scales, 'shape', ()))}"
        )
    if m == 0:
        return out, out_scales

    if _use_triton(x):
        from ._activation_triton import gated_act_fp8_quant_triton

        src = x if x.stride(1) == 1 else x.contiguous()
        gated_act_fp8_quant_triton(
            src, activation, m_indices, out, out_scales, group_size, use_ue8m0, eps, SWIGLU_ALPHA, SWIGLU_LIMIT
        )
        return out, out_scales

    from .quant import per_token_group_quant_fp8_torch

    rows = None if m_indices is None else torch.nonzero(m_indices >= 0).flatten()
    src = x if rows is None else x[rows]
    if src.shape[0] == 0:
        return out, out_scales
    act = _gated_torch(activation, src, "gated_act_fp8_quant").to(x.dtype)
    q, s = per_token_group_quant_fp8_torch(act, group_size, use_ue8m0=use_ue8m0, eps=eps)
    # Through a byte view: index_put is not implemented for FP8 on every device.
    if rows is None:
        out.copy_(q)
        out_scales.copy_(s)
    else:
        out.view(torch.uint8)[rows] = q.view(torch.uint8)
        out_scales[rows] = s
    return out, out_scales
