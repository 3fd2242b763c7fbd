"""Expert parallelism bookkeeping: which experts a rank owns (``expert_map``) and the EP group."""

from __future__ import annotations

import torch

from .config import ExpertPlacement, ParallelConfig


def local_expert_ids(num_experts: int, parallel: ParallelConfig) -> list[int]:
    """Global ids of the experts rank ``parallel.ep_rank`` owns, in local-id order."""
    if num_experts % parallel.ep_size:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by ep_size ({parallel.ep_size})")
    per_rank = num_experts // parallel.ep_size
    if parallel.placement is ExpertPlacement.CONTIGUOUS:
        first = parallel.ep_rank * per_rank
        return list(range(first, first + per_rank))
    return list(range(parallel.ep_rank, num_experts, parallel.ep_size))


def build_expert_map(
    num_experts: int, parallel: ParallelConfig, device: torch.device | str | None = None
) -> torch.Tensor | None:
    """``expert_map [E_global]`` int32: global id -> local id, -1 where another rank owns the expert.

    None when there is a single rank (every expert is local and ids need no mapping).
    """
    if parallel.ep_size == 1:
        return None
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
    owned = torch.tensor(local_expert_ids(num_experts, parallel), dtype=torch.long)
    expert_map[owned] = torch.arange(owned.numel(), dtype=torch.int32)
    return expert_map.to(device) if device is not None else expert_map


def expert_owner(num_experts: int, ep_size: int, placement: ExpertPlacement) -> torch.Tensor:
    """``[E_global]`` int64: the rank that owns each global expert."""
    ids = torch.arange(num_experts)
    if ep_size == 1:
        return torch.zeros(num_experts, dtype=torch.long)
    if placement is ExpertPlacement.CONTIGUOUS:
        return torch.div(ids, num_experts // ep_size, rounding_mode="floor")
    return ids % ep_size
