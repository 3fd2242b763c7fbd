"""DeepEP low-latency prepare/finalize: decode-sized batches into the Batched format, CUDA-graph friendly.

prepare
  ``low_latency_dispatch`` sends each token straight to its experts' ranks and lays them out as
  ``[E_local, max_num_tokens * ep_size, K]`` plus ``expert_num_tokens [E_local]`` (rows past the count are
  garbage). With an FP8 block quant config DeepEP casts on the fly: per-token 1x128 scales, fp32
  ``[E_local, T, K/128]`` (power-of-two with ``ScaleFormat.UE8M0``), or packed UE8M0 int32
  ``[E_local, T, K/512]`` when ``pack_ue8m0=True`` -- both column-major in the last two dimensions.
  The dispatch only issues sends; the receiver returned by ``prepare_async`` runs DeepEP's receive hook, so
  shared experts overlap the transfer.
finalize
  ``low_latency_combine`` gathers the experts' unweighted rows back and reduces them WITH the routing
  weights, so the experts must leave weighting to finalize (``WeightAndReduceDelegate``).

Nothing here reads device memory on the host: the whole layer can be captured in a CUDA graph. Batches
larger than ``max_num_tokens`` are split by ``ModularKernel`` (``max_num_tokens_per_rank``).

Limits (checked up front, see ``deepep_common.low_latency_problems``): hidden size in
2048/2560/3072/4096/5120/6144/7168/8192, top-k <= 11, at most 511 tokens per rank at NVSHMEM's default
queue depth, bfloat16 activations.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from ..config import MoEConfig, ScaleFormat
from ..modular import (
    ActivationFormat,
    ExpertTokensMetadata,
    PreparedTokens,
    TopKWeightAndReduce,
    WeightAndReduceDelegate,
)
from .deepep_common import (
    DeepEPPrepareAndFinalizeBase,
    check_low_latency,
    low_latency_problems,
    to_deepep_ids,
    topk_idx_dtype,
)
from .local import apply_weight_on_input

logger = logging.getLogger(__name__)


class _LLHandle:
    __slots__ = ("deepep_handle", "ids")

    def __init__(self, deepep_handle: Any, ids: torch.Tensor):
        self.deepep_handle = deepep_handle
        self.ids = ids


class DeepEPLLPrepareAndFinalize(DeepEPPrepareAndFinalizeBase):
    """DeepEP low-latency dispatch/combine producing the Batched format.

    ``group``: the EP process group (NCCL; default: the default group). ``max_num_tokens`` defaults to
    ``config.max_num_tokens`` and sizes DeepEP's buffer (every rank must use the same value).
    ``pack_ue8m0``: with ``ScaleFormat.UE8M0``, hand the experts DeepEP's packed int32 scales (for experts
    that read them directly, e.g. DeepGEMM on SM100) instead of fp32 power-of-two scales.
    """

    name = "deepep_ll"
    activation_format = ActivationFormat.BATCHED
    low_latency = True
    mode_name = "low-latency"

    def __init__(self, config: MoEConfig, group: Any = None, *, max_num_tokens: int | None = None, pack_ue8m0: bool = False):
        max_num_tokens = config.max_num_tokens if max_num_tokens is None else max_num_tokens
        if not isinstance(max_num_tokens, int) or max_num_tokens < 1:
            raise ValueError(f"max_num_tokens must be a positive int, got {max_num_tokens!r}")
        check_low_latency(**self._limits(config, max_num_tokens))
        if pack_ue8m0 and config.quant.scale_format is not ScaleFormat.UE8M0:
            raise ValueError("pack_ue8m0=True needs QuantConfig(scale_format='ue8m0')")
        super().__init__(config, group)
        self.max_num_tokens = max_num_tokens
        self.use_fp8 = config.quant.is_fp8_block
        self.round_scale = self.use_fp8 and config.quant.scale_format is ScaleFormat.UE8M0
        self.pack_ue8m0 = pack_ue8m0

    @staticmethod
    def _limits(config: MoEConfig, max_num_tokens: int) -> dict:
        return dict(
            hidden_size=config.hidden_size,
            top_k=config.top_k,
            max_tokens_per_rank=max_num_tokens,
            world_size=config.parallel.ep_size,
            num_experts=config.num_experts,
            dtype=config.dtype,
            quant=config.quant,
        )

    @classmethod
    def _mode_problems(cls, config: MoEConfig) -> list[str]:
        return low_latency_problems(**cls._limits(config, config.max_num_tokens))

    @classmethod
    def from_config(
        cls, config: MoEConfig, group: Any = None, max_num_tokens: int | None = None, pack_ue8m0: bool = False, **_
    ) -> "DeepEPLLPrepareAndFinalize":
        return cls(config, group, max_num_tokens=max_num_tokens, pack_ue8m0=pack_ue8m0)._resolve_group()

    def max_num_tokens_per_rank(self) -> int | None:
        return self.max_num_tokens

    # ---- DeepEP calls (thin) -----------------------------------------------------------------------------

    def _buffer_sizes(self) -> dict:
        rdma = self._deep_ep.Buffer.get_low_latency_rdma_size_hint(
            self.max_num_tokens, self.config.hidden_size, self.world_size, self.config.num_experts
        )
        # DeepEP documents that low-latency mode wants one queue pair per local expert.
        return dict(
            mode="ll", num_nvl_bytes=0, num_rdma_bytes=int(rdma), num_qps_per_rank=self.config.num_local_experts
        )

    def _dispatch(self, x: torch.Tensor, ids: torch.Tensor, num_experts: int):
        recv, counts, handle, _event, hook = self._ensure_buffer().low_latency_dispatch(
            x,
            ids,
            self.max_num_tokens,
            num_experts,
            use_fp8=self.use_fp8,
            round_scale=self.round_scale,
            use_ue8m0=self.pack_ue8m0,
            async_finish=False,
            return_recv_hook=True,
        )
        return recv, counts, handle, hook

    def _combine(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, handle: Any, out: torch.Tensor | None):
        combined, _event, hook = self._ensure_buffer().low_latency_combine(
            x, ids, weights, handle, async_finish=False, return_recv_hook=True, out=out
        )
        return combined, hook

    # ---- prepare -------------------------------------------------------------------------------------------

    def prepare_async(
        self, hidden_states, topk_weights, topk_ids, *, num_experts, expert_map, apply_router_weight_on_input, a1_scale
    ) -> Callable[[], PreparedTokens]:
        self._check_hidden_states(hidden_states)
        if hidden_states.shape[0] > self.max_num_tokens:
            raise ValueError(
                f"hidden_states has {hidden_states.shape[0]} tokens, more than max_num_tokens={self.max_num_tokens} "
                "the DeepEP buffer holds; run it through ModularKernel, which chunks"
            )
        self._check_num_experts(num_experts)
        self._ensure_buffer()
        x = apply_weight_on_input(hidden_states, topk_weights, apply_router_weight_on_input).contiguous()
        ids = to_deepep_ids(topk_ids, self.physical, topk_idx_dtype(self._deep_ep))
        recv, counts, deepep_handle, hook = self._dispatch(x, ids, num_experts)

        def receive() -> PreparedTokens:
            hook()
            recv_x, recv_scale = recv if self.use_fp8 else (recv, None)
            return PreparedTokens(
                hidden_states=recv_x,
                scale=recv_scale,
                topk_ids=topk_ids,
                topk_weights=topk_weights,
                expert_tokens_meta=ExpertTokensMetadata(counts),
                handle=_LLHandle(deepep_handle, ids),
            )

        return receive

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
        if not isinstance(weight_and_reduce, WeightAndReduceDelegate):
            raise ValueError(
                "DeepEP's low-latency combine applies the routing weights itself; the experts must leave "
                f"weighting to finalize (WeightAndReduceDelegate), got {weight_and_reduce!r}"
            )
        if fused_expert_output.dtype != torch.bfloat16:
            raise TypeError(f"DeepEP combines bfloat16 rows, the experts produced {fused_expert_output.dtype}")
        weights = topk_weights.float().contiguous()
        if apply_router_weight_on_input:
            weights = torch.ones_like(weights)
        direct = output.dtype == torch.bfloat16 and output.is_contiguous()
        handle: _LLHandle = prepared.handle
        combined, hook = self._combine(
            fused_expert_output.contiguous(), handle.ids, weights, handle.deepep_handle, output if direct else None
        )

        def finish() -> None:
            hook()
            if not direct:
                output.copy_(combined)

        return finish

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ep_size={self.world_size}, max_num_tokens={self.max_num_tokens}, "
            f"quant={self.quant.name})"
        )
