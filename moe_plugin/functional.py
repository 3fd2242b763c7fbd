"""``fused_experts``: the one-call experts entry point, registered as a torch.library custom op.

The op is opaque to torch.compile (a fake implementation gives the output's shape), so models that
call it compile without graph breaks on the data-dependent routing inside.
"""

from __future__ import annotations

import functools
import os

import torch

from .config import FP8_DTYPE, MoEConfig, QuantConfig, QuantScheme
from .modular import ExpertWeights, ModularKernel
from .validation import check_tensor

_CALLS = {"fused_experts": 0}


def call_count() -> int:
    """How many times the fused_experts op body has run in this process (engines' tests read it)."""
    return _CALLS["fused_experts"]


def infer_quant(
    w1: torch.Tensor,
    w1_scale: torch.Tensor | None,
    quant: QuantConfig | None,
    block_shape: list[int] | tuple[int, int] | None,
) -> QuantConfig:
    """The quant config an experts call implies: explicit ``quant``, else from ``block_shape`` and the
    weights' dtype and scale shape."""
    if quant is not None:
        if not isinstance(quant, QuantConfig):
            raise TypeError(f"quant must be a QuantConfig, got {type(quant).__name__}")
        if block_shape is not None and tuple(block_shape) != quant.block_shape:
            raise ValueError(f"block_shape {tuple(block_shape)} contradicts quant.block_shape {quant.block_shape}")
        return quant
    if w1.dtype != FP8_DTYPE:
        if block_shape is not None:
            raise ValueError("block_shape given but w1 is not float8_e4m3fn")
        return QuantConfig()
    if block_shape is not None:
        return QuantConfig(QuantScheme.FP8_W8A8, tuple(block_shape))
    per_channel = w1_scale is not None and w1_scale.dim() >= 2 and w1_scale.shape[1] == w1.shape[1] > 1
    return QuantConfig(QuantScheme.FP8_W8A8, None, per_act_token=per_channel)


def infer_global_num_experts(global_num_experts: int | None, expert_map: torch.Tensor | None, w1: torch.Tensor) -> int:
    """The global expert count an experts call implies: ``global_num_experts`` unless None or -1, else the
    length of ``expert_map``, else the experts ``w1`` holds."""
    if global_num_experts is None or global_num_experts == -1:
        return expert_map.shape[0] if expert_map is not None else w1.shape[0]
    return global_num_experts


@functools.lru_cache(maxsize=64)
def _kernel_for(
    config: MoEConfig, device: str, experts: str | None, prepare_finalize: str | None, num_local: int
) -> ModularKernel:
    from .oracle import select_kernel

    # An expert_map from the caller places fewer experts here than the config's global count: the
    # batched layouts are sized by the weights' count.
    extra = {} if num_local == config.num_local_experts else {"num_local_experts": num_local}
    return select_kernel(config, device, experts=experts, prepare_finalize=prepare_finalize, **extra)


def _chunk_size() -> int:
    value = os.environ.get("MOE_PLUGIN_CHUNK_SIZE", "32768")
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"MOE_PLUGIN_CHUNK_SIZE must be a positive int, got {value!r}") from None
    if size < 1:
        raise ValueError(f"MOE_PLUGIN_CHUNK_SIZE must be a positive int, got {value!r}")
    return size


def _run(
    x, w1, w2, topk_weights, topk_ids, activation, global_num_experts, expert_map, w1_scale, w2_scale, a1_scale,
    quant_scheme, block_shape, per_act_token, scale_format, apply_router_weight_on_input, inplace,
) -> torch.Tensor:
    _CALLS["fused_experts"] += 1
    quant = QuantConfig(
        QuantScheme(quant_scheme),
        tuple(block_shape) if block_shape is not None else None,
        per_act_token=per_act_token,
        scale_format=scale_format,
    )
    config = MoEConfig(
        num_experts=global_num_experts,
        top_k=topk_ids.shape[1],
        hidden_size=x.shape[1],
        intermediate_size=w2.shape[2],
        dtype=x.dtype,
        activation=activation,
        quant=quant,
        chunk_size=_chunk_size(),
    )
    # The forced-backend variables are part of the key, so changing them takes effect on the next call.
    kernel = _kernel_for(
        config,
        str(x.device),
        os.environ.get("MOE_PLUGIN_EXPERTS") or None,
        os.environ.get("MOE_PLUGIN_PREPARE_FINALIZE") or None,
        w1.shape[0],
    )
    return kernel(
        x,
        ExpertWeights(w1, w2, w1_scale, w2_scale, a1_scale),
        topk_weights,
        topk_ids,
        activation=activation,
        global_num_experts=global_num_experts,
        expert_map=expert_map,
        apply_router_weight_on_input=apply_router_weight_on_input,
        inplace=inplace,
        check_inputs=False,
    )


@torch.library.custom_op("moe_plugin::fused_experts", mutates_args=())
def _fused_experts_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
    global_num_experts: int,
    expert_map: torch.Tensor | None,
    w1_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    a1_scale: torch.Tensor | None,
    quant_scheme: str,
    block_shape: list[int] | None,
    per_act_token: bool,
    scale_format: str,
    apply_router_weight_on_input: bool,
) -> torch.Tensor:
    return _run(
        x, w1, w2, topk_weights, topk_ids, activation, global_num_experts, expert_map, w1_scale, w2_scale, a1_scale,
        quant_scheme, block_shape, per_act_token, scale_format, apply_router_weight_on_input, False,
    )


@_fused_experts_op.register_fake
def _(x, w1, w2, topk_weights, topk_ids, *args) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("moe_plugin::fused_experts_", mutates_args=("x",))
def _fused_experts_inplace_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
    global_num_experts: int,
    expert_map: torch.Tensor | None,
    w1_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    a1_scale: torch.Tensor | None,
    quant_scheme: str,
    block_shape: list[int] | None,
    per_act_token: bool,
    scale_format: str,
    apply_router_weight_on_input: bool,
) -> None:
    _run(
        x, w1, w2, topk_weights, topk_ids, activation, global_num_experts, expert_map, w1_scale, w2_scale, a1_scale,
        quant_scheme, block_shape, per_act_token, scale_format, apply_router_weight_on_input, True,
    )


@_fused_experts_inplace_op.register_fake
def _(x, *args) -> None:
    return None


def fused_experts(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    global_num_experts: int | None = None,
    expert_map: torch.Tensor | None = None,
    w1_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    a1_scale: torch.Tensor | None = None,
    quant: QuantConfig | None = None,
    block_shape: list[int] | tuple[int, int] | None = None,
    apply_router_weight_on_input: bool = False,
    inplace: bool = False,
) -> torch.Tensor:
    """Run the experts of an MoE layer on ``x [M, K]`` routed by ``topk_ids / topk_weights [M, k]``.

    Weights in vLLM's layout: ``w1 [E, 2N, K]`` (gate rows then up rows; ``[E, N, K]`` for relu2) and
    ``w2 [E, K, N]``. FP8 weights (``float8_e4m3fn``) need ``w1_scale`` / ``w2_scale``: block scales
    ``[E, ceil(rows/128), ceil(cols/128)]`` with ``block_shape=[128, 128]``, else per-tensor ``[E]`` or
    per-channel ``[E, rows, 1]``. With ``expert_map [global_num_experts]`` (global -> local id, -1 =
    remote), slots routed to remote experts contribute zero. Returns ``[M, K]`` in ``x``'s dtype
    (``x`` itself when ``inplace``). The backend is the oracle's choice for this shape and device.
    """
    check_tensor("x", x, ndim=2)
    check_tensor("w1", w1, ndim=3)
    check_tensor("w2", w2, ndim=3)
    check_tensor("topk_ids", topk_ids, ndim=2)
    quant = infer_quant(w1, w1_scale, quant, block_shape)
    global_num_experts = infer_global_num_experts(global_num_experts, expert_map, w1)
    # Full validation runs here (outside the op) so errors surface with the caller's names, also when
    # the op itself is traced by torch.compile.
    from .validation import check_moe_inputs

    topk_weights, topk_ids = check_moe_inputs(
        x,
        ExpertWeights(w1, w2, w1_scale, w2_scale, a1_scale),
        topk_weights,
        topk_ids,
        activation=activation,
        global_num_experts=global_num_experts,
        expert_map=expert_map,
        quant=quant,
        apply_router_weight_on_input=apply_router_weight_on_input,
    )
    args = (
        x, w1, w2, topk_weights, topk_ids, activation, global_num_experts, expert_map, w1_scale, w2_scale, a1_scale,
        quant.scheme.value, list(quant.block_shape) if quant.block_shape else None, quant.per_act_token,
        quant.scale_format.value, apply_router_weight_on_input,
    )
    if inplace:
        torch.ops.moe_plugin.fused_experts_(*args)
        return x
    return torch.ops.moe_plugin.fused_experts(*args)
