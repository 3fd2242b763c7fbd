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

from ..config import ACTIVATIONS, is_gated

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
