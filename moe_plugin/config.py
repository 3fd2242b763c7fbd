"""Frozen configuration objects for one MoE layer.

Every object validates itself at construction so that a bad value fails where it was written,
not deep inside a kernel.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

ACTIVATIONS = ("silu", "gelu", "relu2", "swiglu")
"""Activations the experts understand.

- ``silu`` / ``gelu``: gated, ``act(gate) * up`` with w1 = [gate rows; up rows].
- ``relu2``: squared ReLU with no gate (w1 is [E, N, K]).
- ``swiglu``: gpt-oss style gated activation with clamp limit and alpha (see ``ops.activation.swiglu``).
"""

GATED_ACTIVATIONS = ("silu", "gelu", "swiglu")

FP8_DTYPE = torch.float8_e4m3fn


class QuantScheme(str, enum.Enum):
    """How weights and activations are stored for the GEMMs."""

    NONE = "none"
    """Weights and activations in the model dtype (bf16 / fp16 / fp32)."""
    FP8_W8A8 = "fp8_w8a8"
    """Weights in float8_e4m3fn with block or per-tensor / per-channel scales; activations quantized on the fly."""


class ScaleFormat(str, enum.Enum):
    """Numeric format of activation quantization scales."""

    FP32 = "fp32"
    UE8M0 = "ue8m0"
    """Power-of-two scales (exponent only), as Blackwell DeepGEMM kernels expect."""


def is_gated(activation: str) -> bool:
    return activation in GATED_ACTIVATIONS


@dataclass(frozen=True)
class QuantConfig:
    """Quantization of the expert GEMMs.

    ``block_shape`` set (``(128, 128)`` for DeepSeek-V3 style) means block-wise weight scales
    ``[E, ceil(rows/bn), ceil(cols/bk)]`` and per-token, per-``bk``-column-group activation scales.
    ``block_shape`` None with FP8 means per-tensor weight scales (``[E]``) and a per-tensor activation
    scale, or per-channel weight / per-token activation scales when ``per_act_token`` is set.
    """

    scheme: QuantScheme = QuantScheme.NONE
    block_shape: tuple[int, int] | None = None
    per_act_token: bool = False
    scale_format: ScaleFormat = ScaleFormat.FP32

    def __post_init__(self) -> None:
        if not isinstance(self.scheme, QuantScheme):
            try:
                object.__setattr__(self, "scheme", QuantScheme(self.scheme))
            except ValueError:
                raise ValueError(
                    f"QuantConfig.scheme must be one of {[s.value for s in QuantScheme]}, got {self.scheme!r}"
                ) from None
        if not isinstance(self.scale_format, ScaleFormat):
            try:
                object.__setattr__(self, "scale_format", ScaleFormat(self.scale_format))
            except ValueError:
                raise ValueError(
                    f"QuantConfig.scale_format must be one of {[s.value for s in ScaleFormat]}, "
                    f"got {self.scale_format!r}"
                ) from None
        if self.block_shape is not None:
            if (
                not isinstance(self.block_shape, (tuple, list))
                or len(self.block_shape) != 2
                or not all(isinstance(b, int) and b > 0 for b in self.block_shape)
            ):
                raise ValueError(
                    f"QuantConfig.block_shape must be two positive ints (block_n, block_k), got {self.block_shape!r}"
                )
            object.__setattr__(self, "block_shape", tuple(self.block_shape))
            if self.scheme is QuantScheme.NONE:
                raise ValueError("QuantConfig.block_shape is only meaningful with scheme='fp8_w8a8'")
            if self.per_act_token:
                raise ValueError("QuantConfig.per_act_token and block_shape are exclusive (block scales are per token already)")
        if self.scheme is QuantScheme.NONE and self.per_act_token:
            raise ValueError("QuantConfig.per_act_token requires scheme='fp8_w8a8'")

    @property
    def is_quantized(self) -> bool:
        return self.scheme is not QuantScheme.NONE

    @property
    def is_fp8_block(self) -> bool:
        return self.scheme is QuantScheme.FP8_W8A8 and self.block_shape is not None

    @property
    def name(self) -> str:
        """Short human-readable label, e.g. ``fp8_w8a8[128x128]``."""
        if not self.is_quantized:
            return "unquantized"
        if self.block_shape is not None:
            return f"fp8_w8a8[{self.block_shape[0]}x{self.block_shape[1]}]"
        return "fp8_w8a8[per-token]" if self.per_act_token else "fp8_w8a8[per-tensor]"

    @staticmethod
    def fp8_block(block: int = 128, scale_format: ScaleFormat | str = ScaleFormat.FP32) -> "QuantConfig":
        return QuantConfig(QuantScheme.FP8_W8A8, (block, block), scale_format=ScaleFormat(scale_format))


class ExpertPlacement(str, enum.Enum):
    """How global experts are spread over EP ranks."""

    CONTIGUOUS = "contiguous"
    """Rank r owns experts [r*E/P, (r+1)*E/P)."""
    ROUND_ROBIN = "round_robin"
    """Rank r owns experts r, r+P, r+2P, ..."""


@dataclass(frozen=True)
class ParallelConfig:
    """Expert parallelism: which slice of the experts this process owns."""

    ep_size: int = 1
    ep_rank: int = 0
    placement: ExpertPlacement = ExpertPlacement.CONTIGUOUS

    def __post_init__(self) -> None:
        if not isinstance(self.ep_size, int) or self.ep_size < 1:
            raise ValueError(f"ParallelConfig.ep_size must be an int >= 1, got {self.ep_size!r}")
        if not isinstance(self.ep_rank, int) or not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ParallelConfig.ep_rank must be in [0, ep_size={self.ep_size}), got {self.ep_rank!r}")
        if not isinstance(self.placement, ExpertPlacement):
            try:
                object.__setattr__(self, "placement", ExpertPlacement(self.placement))
            except ValueError:
                raise ValueError(
                    f"ParallelConfig.placement must be one of {[p.value for p in ExpertPlacement]}, "
                    f"got {self.placement!r}"
                ) from None

    @property
    def use_ep(self) -> bool:
        return self.ep_size > 1


@dataclass(frozen=True)
class MoEConfig:
    """Shape and numerics of one MoE layer.

    ``intermediate_size`` is N, the per-expert width of the activation output (w1 has 2N rows for gated
    activations, N for ``relu2``); ``hidden_size`` is K.
    """

    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    dtype: torch.dtype = torch.bfloat16
    activation: str = "silu"
    quant: QuantConfig = field(default_factory=QuantConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    max_num_tokens: int = 256
    """Tokens per rank the batched (masked) layouts are sized for; larger batches are chunked."""
    chunk_size: int = 32768
    """Tokens per ModularKernel chunk; bounds workspace memory for very large M."""

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "hidden_size", "intermediate_size", "max_num_tokens", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"MoEConfig.dtype must be torch.bfloat16, float16 or float32, got {self.dtype}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MoEConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.quant, QuantConfig):
            raise TypeError(f"MoEConfig.quant must be a QuantConfig, got {type(self.quant).__name__}")
        if not isinstance(self.parallel, ParallelConfig):
            raise TypeError(f"MoEConfig.parallel must be a ParallelConfig, got {type(self.parallel).__name__}")
        if self.num_experts % self.parallel.ep_size != 0:
            raise ValueError(
                f"MoEConfig.num_experts ({self.num_experts}) must be divisible by ParallelConfig.ep_size "
                f"({self.parallel.ep_size})"
            )

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.parallel.ep_size

    @property
    def w1_rows(self) -> int:
        """Rows of w1: 2N for gated activations, N for relu2."""
        return 2 * self.intermediate_size if is_gated(self.activation) else self.intermediate_size
