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
    PrepareAndFinalize,
    PreparedTokens,
    TopKWeightAndReduce,
    WeightAndReduceDelegate,
)
from .deepep_common import (
    agree_num_chunks,
    capability_problems,
    check_group,
    check_low_latency,
    get_buffer,
    import_deep_ep,
    process_group,
    low_latency_problems,
    physical_expert_ids,
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


class DeepEPLLPrepareAndFinalize(PrepareAndFinalize):
    """DeepEP low-latency dispatch/combine producing the Batched format.

    ``group``: the EP process group (NCCL; default: the default group). ``max_num_tokens`` defaults to
    ``config.max_num_tokens`` and sizes DeepEP's buffer (every rank must use the same value).
    ``pack_ue8m0``: with ``ScaleFormat.UE8M0``, hand the experts DeepEP's packed int32 scales (for experts
    that read them directly, e.g. DeepGEMM on SM100) instead of fp32 power-of-two scales.
    """

    name = "deepep_ll"
    activation_format = ActivationFormat.BATCHED
    required_modules = ("deep_ep",)

    def __init__(self, config: MoEConfig, group: Any = None, *, max_num_tokens: int | None = None, pack_ue8m0: bool = False):
        super().__init__(config.quant)
        max_num_tokens = config.max_num_tokens if max_num_tokens is None else max_num_tokens
        if not isinstance(max_num_tokens, int) or max_num_tokens < 1:
            raise ValueError(f"max_num_tokens must be a positive int, got {max_num_tokens!r}")
        check_low_latency(**self._limits(config, max_num_tokens))
        if pack_ue8m0 and config.quant.scale_format is not ScaleFormat.UE8M0:
            raise ValueError("pack_ue8m0=True needs QuantConfig(scale_format='ue8m0')")
        self.config = config
        self.group = group
        self.max_num_tokens = max_num_tokens
        self.world_size = config.parallel.ep_size
        self.use_fp8 = config.quant.is_fp8_block
        self.round_scale = self.use_fp8 and config.quant.scale_format is ScaleFormat.UE8M0
        self.pack_ue8m0 = pack_ue8m0
        self.physical = physical_expert_ids(config.num_experts, config.parallel)
        self.ep = None
        self._buffer_request: dict | None = None
        self._deep_ep: Any = None

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
    def supports(cls, config: MoEConfig, caps: Any) -> tuple[bool, str]:
        if not config.parallel.use_ep:
            return False, "ep_size=1: nothing to dispatch (DeepEP serves expert parallelism)"
        device_problems = capability_problems(caps, config, low_latency=True)
        if device_problems:
            return False, "; ".join(device_problems)
        problems = low_latency_problems(**cls._limits(config, config.max_num_tokens))
        if problems:
            return False, "; ".join(problems)
        return True, ""

    @classmethod
    def from_config(
        cls, config: MoEConfig, group: Any = None, max_num_tokens: int | None = None, pack_ue8m0: bool = False, **_
    ) -> "DeepEPLLPrepareAndFinalize":
        pf = cls(config, group, max_num_tokens=max_num_tokens, pack_ue8m0=pack_ue8m0)
        # Resolve the group now so a gloo / mismatched group fails at construction, not mid-forward.
        pf.ep = check_group(group, config.parallel)
        return pf

    @property
    def num_dispatchers(self) -> int:
        return self.world_size

    def max_num_tokens_per_rank(self) -> int | None:
        return self.max_num_tokens

    def agree_num_chunks(self, num_chunks: int, device: torch.device) -> int:
        self._ensure_buffer()
        return agree_num_chunks(self.ep, num_chunks)

    # ---- DeepEP calls (thin) -----------------------------------------------------------------------------

    def _ensure_buffer(self) -> Any:
        """This layer's buffer, from the shared cache every call: another layer may have grown (replaced)
        it since."""
        if self._buffer_request is None:
            self._deep_ep = import_deep_ep()
            if self.ep is None:
                self.ep = check_group(self.group, self.config.parallel)
            rdma = self._deep_ep.Buffer.get_low_latency_rdma_size_hint(
                self.max_num_tokens, self.config.hidden_size, self.world_size, self.config.num_experts
            )
            # DeepEP documents that low-latency mode wants one queue pair per local expert.
            self._buffer_request = dict(
                group=process_group(self.ep),
                mode="ll",
                num_nvl_bytes=0,
                num_rdma_bytes=int(rdma),
                num_qps_per_rank=self.config.num_local_experts,
            )
        return get_buffer(**self._buffer_request)

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

    def prepare(self, hidden_states, topk_weights, topk_ids, **kwargs) -> PreparedTokens:
        return self.prepare_async(hidden_states, topk_weights, topk_ids, **kwargs)()

    def prepare_async(
        self, hidden_states, topk_weights, topk_ids, *, num_experts, expert_map, apply_router_weight_on_input, a1_scale
    ) -> Callable[[], PreparedTokens]:
        if hidden_states.device.type != "cuda":
            raise ValueError(f"DeepEP dispatches CUDA tensors, hidden_states is on {hidden_states.device}")
        if hidden_states.dtype != torch.bfloat16:
            raise TypeError(f"DeepEP low-latency mode needs bfloat16 hidden_states, got {hidden_states.dtype}")
        if hidden_states.shape[0] > self.max_num_tokens:
            raise ValueError(
                f"hidden_states has {hidden_states.shape[0]} tokens, more than max_num_tokens={self.max_num_tokens} "
                "the DeepEP buffer holds; run it through ModularKernel, which chunks"
            )
        if num_experts != self.config.num_experts:
            raise ValueError(f"num_experts={num_experts} differs from the config's {self.config.num_experts}")
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

    def finalize(self, output, fused_expert_output, prepared, topk_weights, topk_ids, **kwargs) -> None:
        self.finalize_async(output, fused_expert_output, prepared, topk_weights, topk_ids, **kwargs)()

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
