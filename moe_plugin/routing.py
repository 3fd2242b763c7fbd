"""Routers: top-k over the gate's logits, with vLLM's signatures so engines can swap them in.

Both return ``(topk_weights fp32 [M, k], topk_ids int32 [M, k])``.
"""

from __future__ import annotations

import torch

from .validation import check_tensor

SCORING_FUNCS = ("softmax", "sigmoid")


def _check_router_inputs(hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int, scoring_func: str) -> None:
    check_tensor("hidden_states", hidden_states)
    check_tensor("gating_output", gating_output, ndim=2)
    if not gating_output.is_floating_point():
        raise TypeError(f"gating_output must be a floating tensor, got {gating_output.dtype}")
    if hidden_states.shape[0] != gating_output.shape[0]:
        raise ValueError(
            f"gating_output must have one row per token: hidden_states has {hidden_states.shape[0]} rows, "
            f"gating_output {gating_output.shape[0]}"
        )
    if not isinstance(topk, int) or not 1 <= topk <= gating_output.shape[1]:
        raise ValueError(f"topk must be an int in [1, num_experts={gating_output.shape[1]}], got {topk!r}")
    if scoring_func not in SCORING_FUNCS:
        raise ValueError(f"scoring_func must be one of {SCORING_FUNCS}, got {scoring_func!r}")


def _scores(gating_output: torch.Tensor, scoring_func: str) -> torch.Tensor:
    logits = gating_output.float()
    return torch.softmax(logits, dim=-1) if scoring_func == "softmax" else torch.sigmoid(logits)


def _renormalize(weights: torch.Tensor) -> torch.Tensor:
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def _topk_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k with ties broken toward the lower expert id (torch.topk leaves tie order unspecified)."""
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def fused_topk(
    hidden_states: torch.Tensor,
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool,
    scoring_func: str = "softmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token from softmax (or sigmoid) scores of ``gating_output [M, E]``.

    Ties break toward the lower expert id. With ``renormalize`` the k weights of a token sum to 1.
    """
    _check_router_inputs(hidden_states, gating_output, topk, scoring_func)
    scores = _scores(gating_output, scoring_func)
    weights, ids = _topk_stable(scores, topk)
    if renormalize:
        weights = _renormalize(weights)
    return weights, ids.to(torch.int32)


def grouped_topk(
    hidden_states: torch.Tensor,
    gating_output: torch.Tensor,
    topk: int,
    renormalize: bool,
    num_expert_group: int = 0,
    topk_group: int = 0,
    scoring_func: str = "softmax",
    routed_scaling_factor: float = 1.0,
    e_score_correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited routing (DeepSeek-V2/V3).

    Experts are split into ``num_expert_group`` equal groups; each token keeps its ``topk_group`` best
    groups and picks ``topk`` experts inside them. With ``e_score_correction_bias`` (DeepSeek-V3, usually
    with ``scoring_func="sigmoid"``) the bias is added for *selection only*: groups are ranked by the sum of
    their top-2 biased scores and experts by biased score, while the returned weights are the unbiased
    scores. Without a bias groups are ranked by their best score. Weights are renormalized (optional) and
    then multiplied by ``routed_scaling_factor``. ``num_expert_group=0`` means one group.
    """
    _check_router_inputs(hidden_states, gating_output, topk, scoring_func)
    for name, value in (("num_expert_group", num_expert_group), ("topk_group", topk_group)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(f"{name} must be a non-negative int (0 = one group / all groups), got {value!r}")
    if isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, (int, float)):
        raise TypeError(f"routed_scaling_factor must be a real number, got {routed_scaling_factor!r}")
    m, num_experts = gating_output.shape
    groups = num_expert_group or 1
    keep_groups = topk_group or groups
    if num_experts % groups:
        raise ValueError(f"num_expert_group ({groups}) must divide the number of experts ({num_experts})")
    if not 1 <= keep_groups <= groups:
        raise ValueError(f"topk_group must be in [1, num_expert_group={groups}], got {topk_group}")
    per_group = num_experts // groups
    if topk > keep_groups * per_group:
        raise ValueError(
            f"topk ({topk}) exceeds the {keep_groups * per_group} experts in the kept topk_group={keep_groups} groups"
        )
    scores = _scores(gating_output, scoring_func)
    if e_score_correction_bias is not None:
        check_tensor("e_score_correction_bias", e_score_correction_bias, ndim=1)
        if e_score_correction_bias.shape[0] != num_experts:
            raise ValueError(
                f"e_score_correction_bias must have {num_experts} entries, got {e_score_correction_bias.shape[0]}"
            )
        choice = scores + e_score_correction_bias.float().to(scores.device).unsqueeze(0)
        if per_group >= 2:
            group_scores = choice.view(m, groups, per_group).topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = choice.view(m, groups)
    else:
        choice = scores
        group_scores = choice.view(m, groups, per_group).amax(dim=-1)
    best_groups = _topk_stable(group_scores, keep_groups)[1]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    expert_mask = group_mask.unsqueeze(-1).expand(m, groups, per_group).reshape(m, num_experts)
    masked = choice.masked_fill(~expert_mask, float("-inf"))
    ids = _topk_stable(masked, topk)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = _renormalize(weights)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, ids.to(torch.int32)
