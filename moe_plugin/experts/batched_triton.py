"""Batched-format experts on the Triton grouped GEMM: ``[E_local, T, K]`` masked by ``expert_num_tokens``.

Each program reads its expert's token count on the device and skips row blocks past it, so the masked
layout costs only the rows that hold tokens and a captured CUDA graph serves any counts. Weighting and the
reduction over k are delegated to the prepare/finalize backend, which knows where each row came from.
"""

from __future__ import annotations

import torch

from ..config import FP8_DTYPE
from ..modular import (
    ActivationFormat,
    ExpertTokensMetadata,
    TopKWeightAndReduce,
    WeightAndReduceDelegate,
    WorkspaceShapes,
)
from ..ops.activation import activation_output_dim
from .triton import TritonExpertsBase


class BatchedTritonExperts(TritonExpertsBase):
    """Batched format: ``a1 [E_local, T, K]`` + ``expert_num_tokens [E_local]`` in, ``[E_local, T, K]``
    out (rows past each count are left unwritten)."""

    name = "batched_triton"
    activation_format = ActivationFormat.BATCHED

    def workspace_shapes(self, num_tokens, n, k, top_k, global_num_experts, local_num_experts, meta, activation):
        n_inter = activation_output_dim(activation, n)
        return WorkspaceShapes(
            workspace13=(0,),
            workspace2=(local_num_experts * num_tokens * n_inter + 512,),
            output=(local_num_experts, num_tokens, k),
        )

    def weight_and_reduce(self) -> TopKWeightAndReduce:
        return WeightAndReduceDelegate()

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
        from ..ops.fused_moe import experts_batched
        from ..ops.scheme import quantize_activation

        if expert_tokens_meta is None:
            raise ValueError("BatchedTritonExperts needs expert_tokens_meta (expert_num_tokens [E_local])")
        counts = expert_tokens_meta.expert_num_tokens
        e_local, t_rows, _ = hidden_states.shape
        if counts.shape != (e_local,):
            raise ValueError(f"expert_num_tokens must have shape [{e_local}], got {tuple(counts.shape)}")
        if t_rows == 0:
            return
        rows_hint = None
        if expert_tokens_meta.expert_num_tokens_cpu is not None and expert_tokens_meta.expert_num_tokens_cpu.numel():
            # Host counts come free with some prepare steps: size the grid for the fullest expert.
            rows_hint = max(1, int(expert_tokens_meta.expert_num_tokens_cpu.max()))
        if self.quant.is_quantized and hidden_states.dtype != FP8_DTYPE:
            x = hidden_states
            if self.quant.block_shape is None and not self.quant.per_act_token and weights.a1_scale is None:
                # A dynamic per-tensor scale must not see the garbage rows past the counts.
                valid = torch.arange(t_rows, device=x.device)[None, :] < counts.to(x.device)[:, None]
                x = torch.where(valid[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
            hidden_states, a1q_scale = quantize_activation(x, self.quant, weights.a1_scale)
        experts_batched(
            output,
            hidden_states,
            a1q_scale,
            weights.w1,
            weights.w2,
            counts,
            activation=activation,
            quant=self.quant,
            w1_scale=weights.w1_scale,
            w2_scale=weights.w2_scale,
            a2_scale=weights.a2_scale,
            config=self.launch_config,
            rows_hint=rows_hint,
            workspace2=workspace2,
        )
