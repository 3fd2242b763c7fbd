"""Prepare/finalize with no communication: every expert the tokens need is on this process.

``LocalPrepareAndFinalize`` produces the Standard format (optionally quantizing activations);
``BatchedLocalPrepareAndFinalize`` lays tokens out as ``[E_local, max_tokens, K]`` + counts so Batched
experts run (and are testable) without expert parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MoEConfig, QuantConfig
from ..modular import (
    ActivationFormat,
    ExpertTokensMetadata,
    PrepareAndFinalize,
    PreparedTokens,
    TopKWeightAndReduce,
    WeightAndReduceContiguous,
    WeightAndReduceDelegate,
)
from ..ops.scheme import quantize_activation


def apply_weight_on_input(
    hidden_states: torch.Tensor, topk_weights: torch.Tensor, apply_router_weight_on_input: bool
) -> torch.Tensor:
    """Scale tokens by their (single) routing weight before the experts, when the model asks."""
    if not apply_router_weight_on_input:
        return hidden_states
    return (hidden_states.float() * topk_weights.float()).to(hidden_states.dtype)


class LocalPrepareAndFinalize(PrepareAndFinalize):
    """Standard format, no communication."""

    name = "local"
    activation_format = ActivationFormat.STANDARD
    experts_rows_are_caller_tokens = True
    can_leave_quant_to_experts = True

    @classmethod
    def supports(cls, config: MoEConfig, caps) -> tuple[bool, str]:
        if config.parallel.use_ep:
            return False, f"ep_size={config.parallel.ep_size} needs a communicating backend"
        return True, ""

    @classmethod
    def from_config(cls, config: MoEConfig, **_) -> "LocalPrepareAndFinalize":
        return cls(config.quant)

    def prepare(
        self,
        hidden_states,
        topk_weights,
        topk_ids,
        *,
        num_experts,
        expert_map,
        apply_router_weight_on_input,
        a1_scale,
        leave_quant_to_experts: bool = False,
    ) -> PreparedTokens:
        a1 = apply_weight_on_input(hidden_states, topk_weights, apply_router_weight_on_input)
        if leave_quant_to_experts and a1_scale is None:
            return PreparedTokens(hidden_states=a1, scale=None, topk_ids=topk_ids, topk_weights=topk_weights)
        a1q, scale = quantize_activation(a1, self.quant, a1_scale)
        return PreparedTokens(hidden_states=a1q, scale=scale, topk_ids=topk_ids, topk_weights=topk_weights)

    def finalize(
        self,
        output,
        fused_expert_output,
        prepared,
        topk_weights,
        topk_ids,
        *,
        apply_router_weight_on_input,
        weight_and_reduce: TopKWeightAndReduce,
    ) -> None:
        if isinstance(weight_and_reduce, WeightAndReduceDelegate):
            weight_and_reduce = WeightAndReduceContiguous()
        weight_and_reduce.apply(output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input)


@dataclass
class BatchedSlots:
    """Where each routed slot landed in the batched layout (``finalize`` reads it back)."""

    token: torch.Tensor
    """``[S]`` token index of each local slot."""
    slot: torch.Tensor
    """``[S]`` flat index ``token * k + j`` of each local slot (selects its routing weight)."""
    expert: torch.Tensor
    """``[S]`` local expert of each slot."""
    row: torch.Tensor
    """``[S]`` row inside that expert's block."""


def batch_slots_by_expert(
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None,
    num_local_experts: int,
    num_local_slots: int | None = None,
) -> tuple[BatchedSlots, torch.Tensor]:
    """Assign every slot routed to a local expert a row in that expert's block, in ascending slot order.

    Returns the slots and ``expert_num_tokens [E_local]`` (int32). ``num_local_slots``, the number of
    slots routed to local experts when the caller already has it on the host (the all-to-all's count
    exchange), spares the one device-to-host read of that size.
    """
    top_k = topk_ids.shape[1]
    ids = topk_ids.reshape(-1).long()
    local = expert_map.long()[ids] if expert_map is not None else ids
    # Slots owned elsewhere sort after every local expert; a stable sort keeps slot order within one.
    key = torch.where(local >= 0, local, num_local_experts)
    sorted_key, order = torch.sort(key, stable=True)
    counts = torch.zeros(num_local_experts + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_local_experts]
    if num_local_slots is None:
        num_local_slots = int(counts.sum())
    slot = order[:num_local_slots]
    expert = sorted_key[:num_local_slots]
    starts = torch.cumsum(counts, 0) - counts
    row = torch.arange(num_local_slots, device=ids.device) - starts[expert]
    token = torch.div(slot, top_k, rounding_mode="floor")
    return BatchedSlots(token=token, slot=slot, expert=expert, row=row), counts.to(torch.int32)


def reduce_batched_output(
    output: torch.Tensor,
    fused_expert_output: torch.Tensor,
    slots: BatchedSlots,
    topk_weights: torch.Tensor,
    apply_router_weight_on_input: bool,
) -> None:
    """``output[token] = sum over the token's local slots of weight * fused[expert, row]`` (fp32 accumulate)."""
    rows = fused_expert_output[slots.expert, slots.row].float()
    if not apply_router_weight_on_input:
        rows = rows * topk_weights.reshape(-1)[slots.slot].float().unsqueeze(1)
    acc = torch.zeros(output.shape, dtype=torch.float32, device=output.device)
    acc.index_add_(0, slots.token, rows)
    output.copy_(acc)


class BatchedLocalPrepareAndFinalize(PrepareAndFinalize):
    """Batched format, no communication: ``[E_local, max_num_tokens, K]`` + ``expert_num_tokens``."""

    name = "batched_local"
    activation_format = ActivationFormat.BATCHED

    def __init__(self, quant: QuantConfig, max_num_tokens: int, num_local_experts: int):
        super().__init__(quant)
        if max_num_tokens < 1:
            raise ValueError(f"max_num_tokens must be >= 1, got {max_num_tokens}")
        self.max_num_tokens = max_num_tokens
        self.num_local_experts = num_local_experts

    @classmethod
    def supports(cls, config: MoEConfig, caps) -> tuple[bool, str]:
        if config.parallel.use_ep:
            return False, f"ep_size={config.parallel.ep_size} needs a communicating backend"
        return True, ""

    @classmethod
    def from_config(
        cls, config: MoEConfig, num_local_experts: int | None = None, **_
    ) -> "BatchedLocalPrepareAndFinalize":
        """``num_local_experts``: the experts this process holds when an engine's ``expert_map`` places them
        (the weights' count; default: the config's)."""
        if num_local_experts is None:
            num_local_experts = config.num_local_experts
        elif not isinstance(num_local_experts, int) or isinstance(num_local_experts, bool) or num_local_experts < 1:
            raise ValueError(f"num_local_experts must be a positive int, got {num_local_experts!r}")
        return cls(config.quant, config.max_num_tokens, num_local_experts)

    def max_num_tokens_per_rank(self) -> int | None:
        return self.max_num_tokens

    def prepare(
        self, hidden_states, topk_weights, topk_ids, *, num_experts, expert_map, apply_router_weight_on_input, a1_scale
    ) -> PreparedTokens:
        m, k = hidden_states.shape
        if m > self.max_num_tokens:
            raise ValueError(
                f"hidden_states has {m} tokens but this batched layout holds max_num_tokens={self.max_num_tokens}; "
                "run it through ModularKernel, which chunks"
            )
        a1 = apply_weight_on_input(hidden_states, topk_weights, apply_router_weight_on_input)
        a1q, scale = quantize_activation(a1, self.quant, a1_scale)
        slots, counts = batch_slots_by_expert(topk_ids, expert_map, self.num_local_experts)
        batched = torch.empty((self.num_local_experts, self.max_num_tokens, k), dtype=a1q.dtype, device=a1q.device)
        if slots.slot.numel():
            if int(counts.max()) > self.max_num_tokens:
                raise ValueError(
                    f"an expert received {int(counts.max())} slots, more than max_num_tokens={self.max_num_tokens} "
                    "(topk_ids repeats an expert within a token?)"
                )
            # Index through a byte view: advanced indexing is not implemented for FP8 on every device.
            as_bytes = batched.view(torch.uint8) if a1q.dtype == torch.float8_e4m3fn else batched
            src = a1q.view(torch.uint8) if a1q.dtype == torch.float8_e4m3fn else a1q
            as_bytes[slots.expert, slots.row] = src[slots.token]
        batched_scale = None
        if scale is not None:
            if scale.numel() == 1:
                batched_scale = scale
            else:
                batched_scale = torch.ones(
                    (self.num_local_experts, self.max_num_tokens, scale.shape[-1]),
                    dtype=scale.dtype,
                    device=scale.device,
                )
                batched_scale[slots.expert, slots.row] = scale[slots.token]
        meta = ExpertTokensMetadata(expert_num_tokens=counts, expert_num_tokens_cpu=counts.cpu())
        return PreparedTokens(
            hidden_states=batched,
            scale=batched_scale,
            topk_ids=topk_ids,
            topk_weights=topk_weights,
            expert_tokens_meta=meta,
            handle=slots,
        )

    def finalize(
        self,
        output,
        fused_expert_output,
        prepared,
        topk_weights,
        topk_ids,
        *,
        apply_router_weight_on_input,
        weight_and_reduce: TopKWeightAndReduce,
    ) -> None:
        if not isinstance(weight_and_reduce, WeightAndReduceDelegate):
            raise ValueError(
                f"{type(self).__name__} reduces the batched layout itself; the experts must delegate, "
                f"got {weight_and_reduce!r}"
            )
        reduce_batched_output(output, fused_expert_output, prepared.handle, topk_weights, apply_router_weight_on_input)
