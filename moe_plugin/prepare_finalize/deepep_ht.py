"""DeepEP high-throughput prepare/finalize: NVLink (and RDMA) all-to-all for large batches, Standard format.

prepare
  quantize (FP8 block / per-token: scales travel with the tokens) -> ``get_dispatch_layout`` ->
  ``dispatch`` with the routing ids and weights, asynchronously on DeepEP's communication stream; the
  returned receiver waits for it, so shared experts overlap the transfer.
  Received ids come back rank-LOCAL (-1 where the slot's expert is on another rank) and received weights
  are zeroed on those slots. The Standard format wants global ids, so they are mapped back through this
  rank's expert list (``local_to_global_ids``); ``expert_map`` then maps them to local again and -1 means
  "not here", which every Standard experts backend skips.
finalize
  DeepEP's combine sums rows WITHOUT weights, so the routing weights are applied before it: either the
  experts already weighted and reduced (``WeightAndReduceNoOp``, output ``[M_recv, K]``) or this backend
  weights the per-slot output with the received weights (``WeightAndReduceContiguous``). The combine runs
  asynchronously; the returned finisher waits and writes the caller's ``output``.

Dispatch synchronises with the host (the receive counts size the output), so it cannot be captured in a
CUDA graph -- except intranode with ``num_worst_tokens`` set, where the output is sized for the worst case
and padding rows carry id -1.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from ..config import MoEConfig
from ..distributed import local_expert_ids
from ..modular import (
    ActivationFormat,
    ExpertTokensMetadata,
    PreparedTokens,
    TopKWeightAndReduce,
    WeightAndReduceContiguous,
    WeightAndReduceDelegate,
    WeightAndReduceNoOp,
)
from ..ops.scheme import quantize_activation
from .deepep_common import (
    HT_INTRANODE_RANKS,
    DeepEPPrepareAndFinalizeBase,
    count_local_tokens,
    high_throughput_problems,
    ht_buffer_bytes,
    local_to_global_ids,
    quantize_for_dispatch,
    to_deepep_ids,
    topk_idx_dtype,
)
from .local import apply_weight_on_input

logger = logging.getLogger(__name__)


class _HTHandle:
    """What finalize needs from prepare: DeepEP's handle and whether the payload was quantized."""

    __slots__ = ("deepep_handle", "num_recv_tokens")

    def __init__(self, deepep_handle: Any, num_recv_tokens: int):
        self.deepep_handle = deepep_handle
        self.num_recv_tokens = num_recv_tokens


def reduce_before_combine(
    fused_expert_output: torch.Tensor,
    prepared: PreparedTokens,
    weight_and_reduce: TopKWeightAndReduce,
    apply_router_weight_on_input: bool,
) -> torch.Tensor:
    """``[M_recv, K]`` bf16 rows ready for DeepEP's combine, which sums rows without weights.

    Experts that weighted and reduced already hand ``[M_recv, K]`` (NoOp); otherwise the per-slot output
    ``[M_recv, k, K]`` is weighted with the received routing weights (zero on slots of other ranks) and
    summed over k.
    """
    m_recv, top_k = prepared.topk_ids.shape
    k = prepared.hidden_states.shape[-1]
    if isinstance(weight_and_reduce, WeightAndReduceNoOp):
        if fused_expert_output.numel() != m_recv * k:
            raise ValueError(
                f"experts that reduce themselves must output [M_recv={m_recv}, K={k}], got {tuple(fused_expert_output.shape)}"
            )
        reduced = fused_expert_output.reshape(m_recv, k)
    else:
        if isinstance(weight_and_reduce, WeightAndReduceDelegate):
            weight_and_reduce = WeightAndReduceContiguous()
        reduced = torch.empty((m_recv, k), dtype=torch.bfloat16, device=fused_expert_output.device)
        weight_and_reduce.apply(
            reduced, fused_expert_output, prepared.topk_weights, prepared.topk_ids, apply_router_weight_on_input
        )
    return reduced.to(torch.bfloat16).contiguous()


class DeepEPHTPrepareAndFinalize(DeepEPPrepareAndFinalizeBase):
    """DeepEP high-throughput dispatch/combine producing the Standard format.

    ``group``: the EP process group (NCCL; default: the default group). ``num_worst_tokens`` (intranode
    only): size received tensors for this many tokens so dispatch needs no host sync and can be captured in
    a CUDA graph; each rank must then send at most ``num_worst_tokens // ep_size`` tokens per call.
    """

    name = "deepep_ht"
    activation_format = ActivationFormat.STANDARD
    low_latency = False
    mode_name = "high-throughput"

    def __init__(self, config: MoEConfig, group: Any = None, *, num_worst_tokens: int = 0):
        problems = high_throughput_problems(config)
        if problems:
            raise ValueError("DeepEP high-throughput mode cannot serve this layer: " + "; ".join(problems))
        if not isinstance(num_worst_tokens, int) or num_worst_tokens < 0:
            raise ValueError(f"num_worst_tokens must be an int >= 0, got {num_worst_tokens!r}")
        if num_worst_tokens and config.parallel.ep_size not in HT_INTRANODE_RANKS:
            raise ValueError(
                f"num_worst_tokens is intranode only ({HT_INTRANODE_RANKS} ranks), got ep_size={config.parallel.ep_size}"
            )
        super().__init__(config, group)
        self.num_worst_tokens = num_worst_tokens
        self.num_local_experts = config.num_local_experts
        self.local_global_ids = torch.tensor(local_expert_ids(config.num_experts, config.parallel), dtype=torch.int64)

    @classmethod
    def _mode_problems(cls, config: MoEConfig) -> list[str]:
        return high_throughput_problems(config)

    @classmethod
    def from_config(cls, config: MoEConfig, group: Any = None, num_worst_tokens: int = 0, **_) -> "DeepEPHTPrepareAndFinalize":
        return cls(config, group, num_worst_tokens=num_worst_tokens)._resolve_group()

    def max_num_tokens_per_rank(self) -> int | None:
        return self.num_worst_tokens // self.world_size if self.num_worst_tokens else None

    # ---- DeepEP calls (thin) -----------------------------------------------------------------------------

    def _buffer_sizes(self) -> dict:
        # Combine moves bf16 rows: the widest payload either way.
        nvl, rdma = ht_buffer_bytes(self._deep_ep, self.world_size, self.config.hidden_size * 2)
        return dict(mode="ht", num_nvl_bytes=nvl, num_rdma_bytes=rdma)

    def _dispatch(self, payload, ids: torch.Tensor, weights: torch.Tensor, num_experts: int):
        buffer = self._ensure_buffer()
        previous = buffer.capture()
        per_rank, per_rdma_rank, per_expert, in_rank, layout_event = buffer.get_dispatch_layout(
            ids, num_experts, previous_event=previous, async_finish=True, allocate_on_comm_stream=False
        )
        return buffer.dispatch(
            payload,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=ids,
            topk_weights=weights,
            num_worst_tokens=self.num_worst_tokens,
            config=self._deep_ep.Buffer.get_dispatch_config(self.world_size),
            previous_event=layout_event,
            async_finish=True,
            allocate_on_comm_stream=False,
        )

    def _combine(self, rows: torch.Tensor, deepep_handle: Any):
        buffer = self._ensure_buffer()
        combined, _, event = buffer.combine(
            rows,
            deepep_handle,
            topk_weights=None,
            config=self._deep_ep.Buffer.get_combine_config(self.world_size),
            previous_event=buffer.capture(),
            async_finish=True,
            allocate_on_comm_stream=False,
        )
        return combined, event

    # ---- prepare -------------------------------------------------------------------------------------------

    def prepare_async(
        self, hidden_states, topk_weights, topk_ids, *, num_experts, expert_map, apply_router_weight_on_input, a1_scale
    ) -> Callable[[], PreparedTokens]:
        self._check_hidden_states(hidden_states)
        self._check_num_experts(num_experts)
        if not self.num_worst_tokens and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "DeepEP high-throughput dispatch synchronises with the host and cannot be captured in a CUDA "
                "graph; use deepep_ll for graphs, or num_worst_tokens= (intranode)"
            )
        if self.num_worst_tokens and hidden_states.shape[0] * self.world_size > self.num_worst_tokens:
            raise ValueError(
                f"{hidden_states.shape[0]} tokens on each of {self.world_size} ranks may exceed "
                f"num_worst_tokens={self.num_worst_tokens}; run through ModularKernel, which chunks"
            )
        self._ensure_buffer()
        x = apply_weight_on_input(hidden_states, topk_weights, apply_router_weight_on_input)
        tokens, scales, quantized = quantize_for_dispatch(x.contiguous(), self.quant, a1_scale)
        payload = (tokens, scales) if scales is not None else tokens
        ids = to_deepep_ids(topk_ids, self.physical, topk_idx_dtype(self._deep_ep))
        weights = topk_weights.float().contiguous()
        recv, recv_ids, recv_weights, counts_list, deepep_handle, event = self._dispatch(
            payload, ids, weights, num_experts
        )

        def receive() -> PreparedTokens:
            event.current_stream_wait()
            if isinstance(recv, tuple):
                recv_x, recv_scale = recv
            else:
                recv_x, recv_scale = recv, None
            if self.quant.is_quantized and not quantized:
                # Per-tensor FP8: quantized here, after the dispatch (see quantize_for_dispatch).
                recv_x, recv_scale = quantize_activation(recv_x, self.quant, a1_scale)
            return self._prepared(recv_x, recv_scale, recv_ids, recv_weights, counts_list, deepep_handle)

        return receive

    def _prepared(self, recv_x, recv_scale, recv_ids, recv_weights, counts_list, deepep_handle) -> PreparedTokens:
        global_ids = local_to_global_ids(recv_ids, self.local_global_ids)
        if counts_list:
            counts_cpu = torch.tensor(list(counts_list), dtype=torch.int32)
            meta = ExpertTokensMetadata(counts_cpu.to(recv_x.device, non_blocking=True), counts_cpu)
        else:  # num_worst_tokens: counts were never brought to the host
            meta = ExpertTokensMetadata(count_local_tokens(recv_ids, self.num_local_experts))
        return PreparedTokens(
            hidden_states=recv_x,
            scale=recv_scale,
            topk_ids=global_ids,
            topk_weights=recv_weights.float(),
            expert_tokens_meta=meta,
            handle=_HTHandle(deepep_handle, recv_x.shape[0]),
        )

    # ---- finalize ------------------------------------------------------------------------------------------

    def finalize_async(
        self,
        output,
        fused_expert_output,
        prepared,
        topk_weights,
        topk_ids,
        *,
        apply_router_weight_on_input,
        weight_and_reduce: TopKWeightAndReduce,
    ) -> Callable[[], None]:
        rows = reduce_before_combine(fused_expert_output, prepared, weight_and_reduce, apply_router_weight_on_input)
        combined, event = self._combine(rows, prepared.handle.deepep_handle)

        def finish() -> None:
            event.current_stream_wait()
            output.copy_(combined)

        return finish

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ep_size={self.world_size}, quant={self.quant.name})"
