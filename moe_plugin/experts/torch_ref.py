"""Torch experts: the reference for every backend and the CPU fast path.

Routed slots are sorted by expert once; each active expert then does one GEMM1, the activation and one
GEMM2 on all of its rows at once -- no Python loop over tokens. Correct on any device for
bf16/fp16/fp32 and FP8 w8a8 (dequantizing: fp32 GEMMs on dequantized operands, with the intermediate
activation re-quantized exactly as a fused FP8 kernel would before GEMM2 -- dynamic per-tensor scales
taken over every expert's rows at once).
"""

from __future__ import annotations

import torch

from ..config import QuantConfig
from ..modular import (
    ActivationFormat,
    ExpertTokensMetadata,
    ExpertWeights,
    PermuteExpertsUnpermute,
    TopKWeightAndReduce,
    WeightAndReduceDelegate,
    WeightAndReduceNoOp,
    WorkspaceShapes,
)
from ..ops.activation import apply_activation
from ..ops.quant import per_tensor_scale
from ..ops.scheme import dequant_activation, dequant_expert_weight, quantize_activation


def _requantize(x: torch.Tensor, quant: QuantConfig, static_scale: torch.Tensor | None) -> torch.Tensor:
    """Round-trip the intermediate activation through FP8 as fused kernels do before GEMM2."""
    if not quant.is_quantized:
        return x
    q, s = quantize_activation(x, quant, static_scale)
    return dequant_activation(q, s, quant)


def _gemm1_act(x: torch.Tensor, e: int, weights: ExpertWeights, activation: str, quant: QuantConfig,
               out_dtype: torch.dtype) -> torch.Tensor:
    """GEMM1 -> activation for the rows of one expert."""
    w1 = dequant_expert_weight(weights.w1[e], weights.w1_scale[e] if quant.is_quantized else None, quant)
    if quant.is_quantized:
        return apply_activation(activation, (x @ w1.t()).to(out_dtype))
    # fp32 intermediate: rounding GEMM1's output to 16 bits before the activation costs accuracy (2.6x
    # the error of vLLM's CPU kernel on a bf16 model), which flips greedy tokens in real generations.
    return apply_activation(activation, x.float() @ w1.float().t())


def _gemm2(a: torch.Tensor, e: int, weights: ExpertWeights, quant: QuantConfig,
           a2_scale: torch.Tensor | None) -> torch.Tensor:
    """(requant) -> GEMM2 for the rows of one expert; fp32 out."""
    w2 = dequant_expert_weight(weights.w2[e], weights.w2_scale[e] if quant.is_quantized else None, quant)
    if quant.is_quantized:
        return _requantize(a, quant, a2_scale) @ w2.t()
    return a @ w2.float().t()


def _intermediate_scale(acts: list[torch.Tensor], quant: QuantConfig, static: torch.Tensor | None):
    """The per-tensor scale of GEMM2's input: the static one, or -- dynamic per-tensor FP8 -- one scale over
    every expert's rows at once, as the fused kernels take it (per-expert scales would differ from them)."""
    if not quant.is_quantized or quant.block_shape is not None or quant.per_act_token or static is not None:
        return static
    if not acts:
        return None
    # The largest of the experts' amaxes is the amax of all rows: no concatenated copy, no throwaway quant.
    return per_tensor_scale(torch.stack([a.abs().amax() for a in acts]))


class TorchExperts(PermuteExpertsUnpermute):
    """Standard-format experts in plain torch; weights and reduces itself (output ``[M', K]``)."""

    name = "torch"
    activation_format = ActivationFormat.STANDARD

    def workspace_shapes(self, num_tokens, n, k, top_k, global_num_experts, local_num_experts, meta, activation):
        return WorkspaceShapes(
            workspace13=(0,),
            workspace2=(0,),
            output=(num_tokens, k),
        )

    def weight_and_reduce(self) -> TopKWeightAndReduce:
        return WeightAndReduceNoOp()

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
        expert_tokens_meta,
        apply_router_weight_on_input,
    ) -> None:
        m, top_k = topk_ids.shape
        num_local = weights.num_local_experts
        quant = self.quant
        ids = topk_ids.reshape(-1).long()
        if expert_map is not None:
            local = torch.where(ids >= 0, expert_map.long()[ids.clamp(min=0)], -1)
        else:
            local = ids
        # Invalid slots sort last (key num_local); stable sort keeps ascending slot order per expert.
        key = torch.where(local >= 0, local, num_local)
        order = torch.sort(key, stable=True).indices
        counts = torch.bincount(key, minlength=num_local + 1)[:num_local].tolist()

        x = dequant_activation(hidden_states, a1q_scale, quant)
        acc = torch.zeros(m, output.shape[-1], dtype=torch.float32, device=output.device)
        flat_weights = topk_weights.reshape(-1)
        groups, start = [], 0
        for e, count in enumerate(counts):
            if count:
                slots = order[start : start + count]
                groups.append((e, slots, torch.div(slots, top_k, rounding_mode="floor")))
            start += count
        acts = [_gemm1_act(x[tokens], e, weights, activation, quant, output.dtype) for e, _, tokens in groups]
        a2_scale = _intermediate_scale(acts, quant, weights.a2_scale)
        for (e, slots, tokens), a in zip(groups, acts):
            y = _gemm2(a, e, weights, quant, a2_scale).float()
            if not apply_router_weight_on_input:
                y = y * flat_weights[slots].unsqueeze(1)
            acc.index_add_(0, tokens, y)
        output.copy_(acc)


class BatchedTorchExperts(PermuteExpertsUnpermute):
    """Batched-format experts in plain torch: ``[E_local, T, K]`` masked by ``expert_num_tokens``.

    Weighting and the reduction over k are left to the prepare/finalize backend, which knows where each
    row came from.
    """

    name = "batched_torch"
    activation_format = ActivationFormat.BATCHED
    supports_expert_map = True

    def workspace_shapes(self, num_tokens, n, k, top_k, global_num_experts, local_num_experts, meta, activation):
        return WorkspaceShapes(
            workspace13=(0,),
            workspace2=(0,),
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
        if expert_tokens_meta is None:
            raise ValueError("BatchedTorchExperts needs expert_tokens_meta (expert_num_tokens)")
        counts_t = expert_tokens_meta.expert_num_tokens_cpu
        if counts_t is None:
            counts_t = expert_tokens_meta.expert_num_tokens.cpu()
        quant = self.quant
        active = [(e, count) for e, count in enumerate(counts_t.tolist()) if count]
        acts = []
        for e, count in active:
            x = hidden_states[e, :count]
            if quant.is_quantized:
                scale = a1q_scale if a1q_scale.numel() == 1 else a1q_scale[e, :count]
                x = dequant_activation(x, scale, quant)
            acts.append(_gemm1_act(x, e, weights, activation, quant, output.dtype))
        a2_scale = _intermediate_scale(acts, quant, weights.a2_scale)
        for (e, count), a in zip(active, acts):
            output[e, :count] = _gemm2(a, e, weights, quant, a2_scale).to(output.dtype)
