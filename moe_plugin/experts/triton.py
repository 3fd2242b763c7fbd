"""Standard-format experts on the Triton grouped GEMM (``ops.fused_moe``).

GEMM1 writes the activation directly (gated activations and squared ReLU run in its epilogue); with FP8
block scales the per-token-group quantization GEMM2 needs happens in that epilogue or as GEMM2 loads its
input, never in a separate pass. GEMM2 multiplies by the routing weights in its epilogue; one reduction
kernel sums each token's local slots. The output is therefore already weighted and reduced (``[M, K]``,
``WeightAndReduceNoOp``).

Decode sizes skip the token sort entirely (slot routing, see ``ops.fused_moe``); larger batches sort
only the slots of this rank's experts, so under expert parallelism remote slots cost nothing.
"""

from __future__ import annotations

from ..config import MoEConfig
from ..modular import (
    ActivationFormat,
    PermuteExpertsUnpermute,
    TopKWeightAndReduce,
    WeightAndReduceNoOp,
    WorkspaceShapes,
)
import torch

from ..ops._dispatch import triton_interpreting
from ..ops.activation import activation_output_dim
from ..ops.fused_moe import tma_workspace_rows
from ..ops.launch_config import block_shape_problem, get_launch_config, resolve_routing_mode
from ..ops.tma_gemm import tma_possible


def triton_support(config: MoEConfig, caps) -> tuple[bool, str]:
    """Shared ``supports`` of the Triton experts backends."""
    if not caps.has("triton"):
        return False, f"needs triton ({caps.missing_reason('triton')})"
    if caps.is_cuda:
        cap = caps.capability or (0, 0)
        sm = f"sm{cap[0]}{cap[1]}"
        if cap < (8, 0):
            return False, f"needs compute capability >= 8.0 for Triton tensor-core dots (found {sm})"
        if config.quant.is_quantized and cap < (8, 9):
            return False, f"fp8 w8a8 needs compute capability >= 8.9 (found {sm})"
    elif caps.device_type == "cpu":
        if not triton_interpreting():
            return False, "CPU without TRITON_INTERPRET=1: torch reference is faster"
    else:
        return False, f"runs on CUDA (or on CPU under TRITON_INTERPRET=1), not on {caps.device_type}"
    problem = block_shape_problem(config.quant)
    return (False, problem) if problem else (True, "")


class TritonExpertsBase(PermuteExpertsUnpermute):
    """What the Triton experts of both formats share: the oracle's facts and the launch-config pin.

    ``launch_config`` (an ``ops.launch_config.LaunchConfig``) pins the tiles; by default they come from the
    tuned JSON files for the device, else from the shape heuristic.
    """

    required_modules = ("triton",)
    supports_expert_map = True

    def __init__(self, config: MoEConfig, launch_config=None):
        super().__init__(config)
        self.launch_config = launch_config
        self._configs: dict[tuple, object] = {}

    @classmethod
    def supports(cls, config: MoEConfig, caps) -> tuple[bool, str]:
        return triton_support(config, caps)


class TritonExperts(TritonExpertsBase):
    """Standard format: ``a1 [M, K]`` + ``topk_ids [M, k]`` in, ``[M, K]`` weighted and reduced out."""

    name = "triton"
    activation_format = ActivationFormat.STANDARD

    def workspace_shapes(self, num_tokens, n, k, top_k, global_num_experts, local_num_experts, meta, activation):
        slots = num_tokens * top_k
        n_inter = activation_output_dim(activation, n)
        # workspace2 holds the activation between the GEMMs: model dtype, or FP8 plus its group scales
        # (which fit in the same bytes); the spare elements cover the 256-byte alignment of the scales.
        rows13, rows2 = slots, slots
        tma = self._planned_tma(num_tokens, n_inter, k, top_k, global_num_experts, local_num_experts)
        if tma is not None:
            # The TMA path keeps the activation in sorted order (padded per expert), and tma="all" a sorted
            # copy of the tokens behind GEMM2's output.
            mode, block_m = tma
            sorted_rows = tma_workspace_rows(slots, local_num_experts, block_m)
            rows2 = max(rows2, sorted_rows)
            if mode == "all":
                rows13 = slots + sorted_rows + -(-256 // k)
        return WorkspaceShapes(
            workspace13=(rows13, k),
            workspace2=(rows2 * n_inter + 512,),
            output=(num_tokens, k),
        )

    def _launch_config_for(self, num_tokens, n_inter, k, top_k, global_num_experts, local_num_experts, dtype, device):
        """The launch config ``apply`` runs with (pinned, else looked up once per shape, dtype and device:
        ``workspace_shapes`` and ``apply`` then agree on it, and the per-call lookup cost is paid once)."""
        if self.launch_config is not None:
            return self.launch_config
        key = (num_tokens, n_inter, k, top_k, global_num_experts, local_num_experts, dtype, str(device))
        cfg = self._configs.get(key)
        if cfg is None:
            if len(self._configs) >= 1024:
                self._configs.clear()
            cfg = self._configs[key] = get_launch_config(
                num_tokens, num_local=local_num_experts, num_global=global_num_experts, n=n_inter, k=k,
                top_k=top_k, dtype=dtype, quant=self.quant, device=device,
            )
        return cfg

    def _planned_tma(self, num_tokens, n_inter, k, top_k, global_num_experts, local_num_experts):
        """``(tma mode, block_m)`` when ``apply`` for ``num_tokens`` will take the TMA path, else None.

        ``workspace_shapes`` is not told the device: this plans for the current CUDA device with
        ``MoEConfig.dtype`` (what serving engines run), and under the interpreter for the CPU. A call on
        another device or dtype still runs correctly, on buffers of its own where these fall short.
        """
        if self.quant.is_quantized or num_tokens == 0:
            return None
        dtype = self.config.dtype
        devices = ["cpu"] if triton_interpreting() else []
        if torch.cuda.is_available():
            devices.insert(0, f"cuda:{torch.cuda.current_device()}")
        for device in devices:
            if not tma_possible(dtype, device):
                continue
            cfg = self._launch_config_for(num_tokens, n_inter, k, top_k, global_num_experts, local_num_experts, dtype, device)
            if cfg.tma != "off" and resolve_routing_mode(cfg, num_tokens * top_k) == "sorted":
                return cfg.tma, cfg.gemm1.block_m
        return None

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
        from ..ops.fused_moe import experts_standard

        if hidden_states.shape[0] == 0:
            return
        # A prepare step may forward model-dtype activations with a quantized scheme: experts_standard
        # quantizes them (inside GEMM1 at decode sizes).
        experts_standard(
            output,
            hidden_states,
            a1q_scale,
            weights.w1,
            weights.w2,
            topk_weights,
            topk_ids,
            activation=activation,
            quant=self.quant,
            w1_scale=weights.w1_scale,
            w2_scale=weights.w2_scale,
            a2_scale=weights.a2_scale,
            expert_map=expert_map,
            global_num_experts=global_num_experts,
            mul_routed_weight=not apply_router_weight_on_input,
            config=self._launch_config_for(
                hidden_states.shape[0], weights.w2.shape[2], weights.w2.shape[1], topk_ids.shape[1],
                global_num_experts, weights.w1.shape[0], output.dtype, hidden_states.device,
            ),
            workspace13=workspace13,
            workspace2=workspace2,
            a1_scale=weights.a1_scale,
        )
