"""Input checks shared by the public entry points.

Bad input must fail here with a ``ValueError`` / ``TypeError`` naming the argument, never as an
illegal memory access inside a kernel. Value checks that need the host to read device memory are
skipped while a CUDA graph is being captured or the caller is being compiled.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch

from .config import ACTIVATIONS, FP8_DTYPE, QuantConfig, is_gated

if TYPE_CHECKING:
    from .modular import ExpertWeights

MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _value_checks_enabled(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return False
        return os.environ.get("MOE_PLUGIN_SKIP_VALUE_CHECKS", "0") != "1"
    return True


def check_tensor(name: str, t: object, *, ndim: int | None = None, dtypes=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    return t


def check_same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but hidden_states is on {device}; all inputs must share a device")


def check_topk(
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_tokens: int, num_experts: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate routing tensors; return them as (fp32 weights, int32 ids)."""
    check_tensor("topk_ids", topk_ids, ndim=2)
    check_tensor("topk_weights", topk_weights, ndim=2)
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights must be a floating tensor, got {topk_weights.dtype}")
    if topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids must have {num_tokens} rows (one per token), got shape {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights shape {tuple(topk_weights.shape)} must equal topk_ids shape {tuple(topk_ids.shape)}"
        )
    if topk_ids.shape[1] < 1 or topk_ids.shape[1] > num_experts:
        raise ValueError(f"topk_ids must have 1..{num_experts} columns (top-k), got {topk_ids.shape[1]}")
    check_same_device("topk_ids", topk_ids, device)
    check_same_device("topk_weights", topk_weights, device)
    if topk_ids.numel() and _value_checks_enabled(topk_ids):
        lo, hi = torch.aminmax(topk_ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"topk_ids values must be in [0, {num_experts}), found range [{lo}, {hi}]")
    return topk_weights.float(), topk_ids.to(torch.int32)


def check_expert_map(expert_map: torch.Tensor | None, num_experts: int, num_local: int, device: torch.device) -> None:
    if expert_map is None:
        return
    check_tensor("expert_map", expert_map, ndim=1, dtypes=(torch.int32, torch.int64))
    if expert_map.shape[0] != num_experts:
        raise ValueError(
            f"expert_map must have global_num_experts={num_experts} entries, got {expert_map.shape[0]}"
        )
    check_same_device("expert_map", expert_map, device)
    if _value_checks_enabled(expert_map):
        lo, hi = (int(v) for v in torch.aminmax(expert_map))
        if lo < -1 or hi >= num_local:
            raise ValueError(
                f"expert_map values must be -1 or local ids in [0, {num_local}) (w1 has {num_local} experts), "
                f"found range [{lo}, {hi}]"
            )


def expected_scale_shape(quant: QuantConfig, num_experts: int, rows: int, cols: int) -> tuple[int, ...]:
    if quant.block_shape is not None:
        bn, bk = quant.block_shape
        return (num_experts, math.ceil(rows / bn), math.ceil(cols / bk))
    if quant.per_act_token:
        return (num_experts, rows, 1)
    return (num_experts,)


def _check_weight_scale(name: str, scale, quant: QuantConfig, e: int, rows: int, cols: int, device) -> None:
    if scale is None:
        raise ValueError(f"{name} is required for {quant.name} weights")
    check_tensor(name, scale, dtypes=(torch.float32,))
    want = expected_scale_shape(quant, e, rows, cols)
    shape = tuple(scale.shape)
    ok = shape == want
    if not ok and quant.block_shape is None:
        # per-tensor [E] may come as [E, 1, 1]; per-channel [E, rows, 1] as [E, rows] or [E, 1, rows]
        ok = (
            scale.numel() == math.prod(want)
            and shape[0] == e
            and sum(1 for size in shape[1:] if size != 1) <= 1
        )
    if not ok:
        raise ValueError(f"{name} must have shape {want} for {quant.name} weights of shape [{e}, {rows}, {cols}], got {shape}")
    check_same_device(name, scale, device)


def _check_activation_scales(weights: "ExpertWeights", quant: QuantConfig, device: torch.device) -> None:
    """Static activation scales: one positive fp32 value each, per-tensor FP8 only."""
    for name in ("a1_scale", "a2_scale"):
        scale = getattr(weights, name)
        if scale is None:
            continue
        if quant.is_quantized and (quant.block_shape is not None or quant.per_act_token):
            raise ValueError(f"{name} is a static per-tensor scale; {quant.name} computes activation scales per token")
        check_tensor(name, scale, dtypes=(torch.float32,))
        if scale.numel() != 1:
            raise ValueError(
                f"{name} must hold one value (a static per-tensor scale), got shape {tuple(scale.shape)}; for "
                "per-expert input scales pass their maximum, as vLLM does at load time"
            )
        check_same_device(name, scale, device)
        # (its sign is not read back: that would synchronise with the device on every call)


def check_moe_inputs(
    hidden_states: torch.Tensor,
    weights: "ExpertWeights",
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str,
    global_num_experts: int,
    expert_map: torch.Tensor | None,
    quant: QuantConfig,
    apply_router_weight_on_input: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check every input of an experts call; return (fp32 topk_weights, int32 topk_ids)."""
    check_tensor("hidden_states", hidden_states, ndim=2, dtypes=MODEL_DTYPES)
    device = hidden_states.device
    m, k = hidden_states.shape
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    from .modular import ExpertWeights

    if not isinstance(weights, ExpertWeights):
        raise TypeError(f"weights must be a moe_plugin ExpertWeights, got {type(weights).__name__}")
    w1, w2 = weights.w1, weights.w2
    check_tensor("w1", w1, ndim=3)
    check_tensor("w2", w2, ndim=3)
    e = w1.shape[0]
    if w2.shape[0] != e:
        raise ValueError(f"w1 and w2 must hold the same number of experts, got {e} and {w2.shape[0]}")
    if w1.shape[2] != k:
        raise ValueError(f"w1 must be [E, 2N, K] with K = hidden_states.shape[1] = {k}, got {tuple(w1.shape)}")
    n = w2.shape[2]
    want_rows = 2 * n if is_gated(activation) else n
    if w1.shape[1] != want_rows:
        raise ValueError(
            f"w1 must have {want_rows} rows for activation={activation!r} with w2 [E, K, N={n}], got {tuple(w1.shape)}"
        )
    if w2.shape[1] != k:
        raise ValueError(f"w2 must be [E, K, N] with K = {k}, got {tuple(w2.shape)}")
    for name, w in (("w1", w1), ("w2", w2)):
        check_same_device(name, w, device)
        if not w.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous() once at load time)")
    if quant.is_quantized:
        for name, w in (("w1", w1), ("w2", w2)):
            if w.dtype != FP8_DTYPE:
                raise TypeError(f"{name} must be float8_e4m3fn for {quant.name}, got {w.dtype}")
        _check_weight_scale("w1_scale", weights.w1_scale, quant, e, w1.shape[1], k, device)
        _check_weight_scale("w2_scale", weights.w2_scale, quant, e, k, n, device)
    else:
        for name, w in (("w1", w1), ("w2", w2)):
            if w.dtype != hidden_states.dtype:
                raise TypeError(f"{name} dtype {w.dtype} must match hidden_states dtype {hidden_states.dtype}")
        for name in ("w1_scale", "w2_scale", "a1_scale", "a2_scale"):
            if getattr(weights, name) is not None:
                raise ValueError(f"{name} given but the quant config is unquantized; pass quant=QuantConfig.fp8_block()")
    _check_activation_scales(weights, quant, device)
    if not isinstance(global_num_experts, int) or global_num_experts < e:
        raise ValueError(
            f"global_num_experts (and expert_map's length) must be an int >= the {e} local experts in w1, "
            f"got {global_num_experts!r}"
        )
    if expert_map is None and global_num_experts != e:
        raise ValueError(
            f"global_num_experts ({global_num_experts}) differs from w1's {e} experts: pass expert_map"
        )
    check_expert_map(expert_map, global_num_experts, e, device)
    topk_weights, topk_ids = check_topk(topk_weights, topk_ids, m, global_num_experts, device)
    if apply_router_weight_on_input and topk_ids.shape[1] != 1:
        raise ValueError(
            f"apply_router_weight_on_input requires top_k == 1, got topk_ids with {topk_ids.shape[1]} columns"
        )
    return topk_weights, topk_ids
