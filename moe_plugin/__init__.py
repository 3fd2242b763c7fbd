"""moe_plugin: Mixture-of-Experts layers with expert parallelism, as two swappable halves.

Public API: ``fused_experts``, ``fused_topk``, ``grouped_topk``, ``FusedMoE``, the config classes,
``select_kernel`` and ``explain``. Optional modules (triton, deep_gemm, deep_ep) are used when present;
``python -m moe_plugin info`` says which were found.
"""

from .config import ExpertPlacement, MoEConfig, ParallelConfig, QuantConfig, QuantScheme, ScaleFormat
from .functional import fused_experts
from .layer import FusedMoE
from .modular import ExpertWeights, ModularKernel
from .oracle import BackendUnavailableError, explain, select_kernel
from .routing import fused_topk, grouped_topk

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ExpertPlacement",
    "ExpertWeights",
    "FusedMoE",
    "ModularKernel",
    "MoEConfig",
    "ParallelConfig",
    "QuantConfig",
    "QuantScheme",
    "ScaleFormat",
    "explain",
    "fused_experts",
    "fused_topk",
    "grouped_topk",
    "select_kernel",
]
