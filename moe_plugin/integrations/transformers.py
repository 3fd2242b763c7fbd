"""transformers integration: ``experts_implementation="moe_plugin"``.

Importing this module registers ``moe_plugin`` in transformers' experts interface
(``transformers.integrations.moe.ExpertsInterface``, transformers >= 5), after which

    import moe_plugin.integrations.transformers
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moe_plugin")

runs the model's routed experts through ``moe_plugin.fused_experts`` (the oracle's kernel for the shape,
dtype and device). transformers has no entry-point discovery for experts implementations, hence the import.

Covered: experts classes decorated with transformers' ``@use_experts_implementation`` with its default
layout -- ``gate_up_proj [E, 2N, K]`` (gate rows then up rows, which is moe_plugin's ``w1``) and
``down_proj [E, K, N]`` (``w2``), no biases, default gating -- and a SiLU, exact-GELU or squared-ReLU
activation; non-gated experts (``up_proj [E, N, K]``) with squared ReLU too. That includes Mixtral,
Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3, OLMoE and most other MoE models in transformers 5. Experts with
biases, transposed or interleaved weights, or a custom gate (gpt-oss and a few others) raise a
``ValueError`` naming the reason instead of computing something else. FP8 experts (transformers'
``FP8ExpertsInterface``) are not covered.
"""

from __future__ import annotations

import torch

from ..functional import fused_experts

NAME = "moe_plugin"

_CALLS = {"experts": 0}


def call_count() -> int:
    """How many experts calls transformers has routed through moe_plugin in this process."""
    return _CALLS["experts"]


def _activation_map() -> dict[type, str]:
    from torch import nn
    from transformers import activations

    return {
        activations.SiLUActivation: "silu",
        nn.SiLU: "silu",
        activations.GELUActivation: "gelu",
        activations.ReLUSquaredActivation: "relu2",
    }


def experts_activation(experts: torch.nn.Module) -> str:
    """moe_plugin's name for the activation of a transformers experts module; ValueError when it has none."""
    act = getattr(experts, "act_fn", None)
    name = _activation_map().get(type(act))
    if name is None:
        raise ValueError(
            f"{type(experts).__name__}: activation {type(act).__name__} has no moe_plugin equivalent "
            "(moe_plugin serves SiLU, exact GELU and squared ReLU)"
        )
    gated = getattr(experts, "has_gate", True)
    if gated and name == "relu2":
        raise ValueError(f"{type(experts).__name__}: gated squared ReLU is not a moe_plugin activation")
    if not gated and name != "relu2":
        raise ValueError(f"{type(experts).__name__}: non-gated experts need squared ReLU, got {name}")
    return name


def unsupported_reason(experts: torch.nn.Module) -> str | None:
    """Why moe_plugin cannot run ``experts`` as transformers lays it out (None when it can)."""
    from transformers.integrations import moe

    if getattr(experts, "has_bias", False):
        return "expert biases"
    if getattr(experts, "is_transposed", False):
        return "transposed expert weights"
    if not getattr(experts, "is_concatenated", True):
        return "interleaved gate/up weights"
    if getattr(experts, "has_gate", True) and type(experts)._apply_gate is not moe._default_apply_gate:
        return f"a custom gate ({type(experts).__name__}._apply_gate)"
    try:
        experts_activation(experts)
    except ValueError as exc:
        return str(exc)
    return None


def experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' experts signature: ``hidden_states [T, K]``, ``top_k_index / top_k_weights [T, k]`` ->
    ``[T, K]``, the weighted sum of each token's experts."""
    reason = unsupported_reason(self)
    if reason is not None:
        raise ValueError(f'experts_implementation="{NAME}" cannot run {type(self).__name__}: {reason}')
    _CALLS["experts"] += 1
    activation = experts_activation(self)
    w1 = self.gate_up_proj if getattr(self, "has_gate", True) else self.up_proj
    num_experts = w1.shape[0]
    expert_map = None
    global_num_experts = num_experts
    if getattr(self, "_is_expert_parallel", False):
        # transformers' EP marks slots routed to other ranks' experts with the sentinel id num_experts:
        # one extra global id that maps to "not here" makes them contribute zero.
        expert_map = torch.cat(
            [
                torch.arange(num_experts, dtype=torch.int32, device=w1.device),
                torch.full((1,), -1, dtype=torch.int32, device=w1.device),
            ]
        )
        global_num_experts = num_experts + 1
    return fused_experts(
        hidden_states,
        w1,
        self.down_proj,
        top_k_weights,
        top_k_index,
        activation=activation,
        global_num_experts=global_num_experts,
        expert_map=expert_map,
    )


def register() -> None:
    """Register ``experts_forward`` as ``experts_implementation="moe_plugin"`` (done on import; idempotent)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as exc:
        raise ImportError(
            "moe_plugin's transformers integration needs transformers >= 5 (transformers.integrations.moe."
            f"ExpertsInterface): {exc}"
        ) from exc
    ExpertsInterface.register(NAME, experts_forward)


register()
