"""DeepGEMM experts, masked layout (Batched format): decode-sized batches, e.g. behind DeepEP low-latency.

Input ``[E_local, T, K]`` FP8 with 1x128 scales and ``expert_num_tokens [E_local]``; rows past an expert's
count are garbage. One call:

1. ``m_grouped_fp8_gemm_nt_masked`` with w1 over all experts at once, ``expert_num_tokens`` as the mask
   -> ``[E_local, T, 2N]`` bf16;
2. ``ops.activation.silu_mul_fp8_quant_masked``: SiLU-mul + per-token-group FP8 quantization of the valid
   rows only (scales column-major per expert, as the masked GEMM reads them);
3. the masked GEMM with w2 -> ``[E_local, T, K]`` bf16, unweighted.

Weighting and the reduction over top-k are left to the prepare/finalize backend (DeepEP's low-latency
combine applies the weights itself). No host synchronisation: ``expected_m`` (DeepGEMM's tiling hint) is
estimated from host-side sizes, so the layer can be captured in a CUDA graph.

SiLU only (``supports`` rejects other activations). Scales are fp32 on SM90; on SM100 DeepGEMM reads UE8M0,
so the config must use ``ScaleFormat.UE8M0`` (power-of-two fp32 scales, or DeepEP's packed int32 scales
with ``DeepEPLLPrepareAndFinalize(pack_ue8m0=True)``). Weights are prepared once like ``DeepGemmExperts``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..config import FP8_DTYPE, MoEConfig, ScaleFormat
from ..modular import (
    ActivationFormat,
    ExpertTokensMetadata,
    TopKWeightAndReduce,
    WeightAndReduceDelegate,
    WorkspaceShapes,
)
from ..ops.activation import silu_mul_fp8_quant_masked
from .deep_gemm import DEEPGEMM_BLOCK, DeepGemmExpertsBase, deep_gemm_api, deep_gemm_problems

logger = logging.getLogger(__name__)

EXPECTED_M_GRANULE = 16


def estimate_expected_m(
    num_tokens_per_rank: int, num_dispatchers: int, top_k: int, global_num_experts: int, max_tokens_per_expert: int
) -> int:
    """DeepGEMM's ``expected_m`` (rows per expert it tiles for), assuming balanced routing:
    ``tokens on all ranks * top_k / experts`` rounded up to 16, clamped to ``[16, max_tokens_per_expert]``.

    Host integers only, so no device sync (CUDA-graph safe). A poor estimate costs speed, never
    correctness: the mask bounds what is computed.
    """
    if global_num_experts < 1:
        raise ValueError(f"global_num_experts must be >= 1, got {global_num_experts}")
    routed = num_tokens_per_rank * num_dispatchers * top_k
    estimate = -(-(routed // global_num_experts) // EXPECTED_M_GRANULE) * EXPECTED_M_GRANULE
    return max(1, min(max_tokens_per_expert, max(EXPECTED_M_GRANULE, estimate)))


class BatchedDeepGemmExperts(DeepGemmExpertsBase):
    """Batched-format FP8 block experts on DeepGEMM's masked grouped GEMM (see module docstring)."""

    name = "batched_deep_gemm"
    activation_format = ActivationFormat.BATCHED

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        if config.activation != "silu":
            raise ValueError(f"{type(self).__name__} fuses SiLU only, got activation={config.activation!r}")

    @classmethod
    def supports(cls, config: MoEConfig, caps: Any) -> tuple[bool, str]:
        problems = deep_gemm_problems(config, caps, batched=True)
        return (False, "; ".join(problems)) if problems else (True, "")

    def weight_and_reduce(self) -> TopKWeightAndReduce:
        return WeightAndReduceDelegate()

    def workspace_shapes(self, num_tokens, n, k, top_k, global_num_experts, local_num_experts, meta, activation):
        # ws13: GEMM1's bf16 output [E, T, 2N]; the re-quantized activation is allocated by the quant op.
        return WorkspaceShapes(
            workspace13=(local_num_experts, num_tokens, n),
            workspace2=(0,),
            output=(local_num_experts, num_tokens, k),
        )

    # ---- deep_gemm (thin) ------------------------------------------------------------------------------

    def _gemm(self, a, a_scale, w, w_scale, out, masked_m, expected_m) -> None:
        deep_gemm_api().masked((a, a_scale), (w, w_scale), out, masked_m, expected_m)

    # ---- apply ----------------------------------------------------------------------------------------

    def apply(
        self,
        output,
        hidden_states,
        weights,
        topk_weights,
        topk_ids,
        *,
        activation,
        global_num_experts,
        expert_map,
        a1q_scale,
        workspace13,
        workspace2,
        expert_tokens_meta: ExpertTokensMetadata | None,
        apply_router_weight_on_input,
    ) -> None:
        if activation != "silu":
            raise ValueError(f"{type(self).__name__} fuses SiLU only, got activation={activation!r}")
        if expert_tokens_meta is None:
            raise ValueError(f"{type(self).__name__} needs expert_tokens_meta (expert_num_tokens)")
        if hidden_states.dim() != 3 or hidden_states.dtype != FP8_DTYPE or a1q_scale is None:
            raise TypeError(
                f"{type(self).__name__} takes FP8 [E_local, T, K] activations with scales, got "
                f"{hidden_states.dtype} {tuple(hidden_states.shape)}"
            )
        if a1q_scale.dtype == torch.int32 and torch.cuda.get_device_capability(hidden_states.device)[0] != 10:
            raise ValueError("packed UE8M0 (int32) activation scales are read by SM100 DeepGEMM only")
        self._check_output(output)
        num_local, t, k = hidden_states.shape
        if t == 0:
            return
        prepared = self.prepare_weights(weights)
        n = prepared.w1.shape[1]
        counts = expert_tokens_meta.expert_num_tokens.to(torch.int32).contiguous()
        expected_m = estimate_expected_m(
            topk_ids.shape[0], self.config.parallel.ep_size, topk_ids.shape[1], global_num_experts, t
        )
        mm1 = workspace13.reshape(-1)[: num_local * t * n].view(num_local, t, n)
        self._gemm(hidden_states, a1q_scale, prepared.w1, prepared.w1_scale, mm1, counts, expected_m)
        # rows past each count are neither read nor written; scales come column-major per expert
        a2q, a2_scale = silu_mul_fp8_quant_masked(
            mm1, counts, DEEPGEMM_BLOCK, use_ue8m0=self.quant.scale_format is ScaleFormat.UE8M0
        )
        self._gemm(a2q, a2_scale, prepared.w2, prepared.w2_scale, output, counts, expected_m)
