"""Expert parallelism bookkeeping: which experts a rank owns (``expert_map``), the EP process group, and
per-step expert-load statistics.

- ``local_expert_ids`` / ``build_expert_map`` / ``expert_owner`` / ``expert_local_index`` /
  ``expert_placement``: the placement of global experts over EP ranks (``ParallelConfig.placement``).
- ``EPGroup``: the torch.distributed group the all-to-all backends talk over (the world, a given
  sub-group, or one of ``EPGroup.split_world``'s), with the device its collectives need.
- ``init_distributed``: one call that joins (or creates, for a single process) the default process group
  with a timeout, so a dead or stalled peer fails the others instead of hanging them.
- ``ExpertLoadStats``: tokens per expert and per rank of the last step and since ``reset``, updated by the
  all-to-all backends on every call, for load-balancing decisions (see docs/expert_parallel.md).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass, field

import torch

from .config import ExpertPlacement, ParallelConfig

logger = logging.getLogger(__name__)

_SPLIT_GROUPS: dict[int, tuple[object, object]] = {}
"""``EPGroup.split_world``'s groups per ``ep_size``, with the default group they were cut from."""


# ---- placement ------------------------------------------------------------------------------------------
def local_expert_ids(num_experts: int, parallel: ParallelConfig) -> list[int]:
    """Global ids of the experts rank ``parallel.ep_rank`` owns, in local-id order."""
    if num_experts % parallel.ep_size:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by ep_size ({parallel.ep_size})")
    per_rank = num_experts // parallel.ep_size
    if parallel.placement is ExpertPlacement.CONTIGUOUS:
        first = parallel.ep_rank * per_rank
        return list(range(first, first + per_rank))
    return list(range(parallel.ep_rank, num_experts, parallel.ep_size))


def expert_placement(num_experts: int, ep_size: int, placement: ExpertPlacement | str) -> list[list[int]]:
    """For every rank, the global ids it owns in local-id order (``[rank][local] -> global``)."""
    placement = ExpertPlacement(placement)
    return [
        local_expert_ids(num_experts, ParallelConfig(ep_size, rank, placement)) for rank in range(ep_size)
    ]


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


def expert_local_index(num_experts: int, ep_size: int, placement: ExpertPlacement) -> torch.Tensor:
    """``[E_global]`` int64: each global expert's local id on its owner (what the owner's expert_map says)."""
    ids = torch.arange(num_experts)
    if ep_size == 1:
        return ids
    if placement is ExpertPlacement.CONTIGUOUS:
        return ids % (num_experts // ep_size)
    return torch.div(ids, ep_size, rounding_mode="floor")


# ---- process groups -------------------------------------------------------------------------------------
class EPCommunicationError(RuntimeError):
    """An EP collective failed or timed out: a peer rank died, stalled, or the group is broken."""


def _to_timedelta(timeout: float | datetime.timedelta | None, name: str = "timeout") -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"{name} must be a positive number of seconds or a datetime.timedelta, got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comm_device(group=None) -> torch.device:
    """The device a group's collectives take tensors on: the current CUDA device for NCCL, else the CPU."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class EPGroup:
    """The process group of one expert-parallel layer and where its collectives run.

    ``group`` None means the default (world) group. ``rank`` / ``world_size`` are within the group (the EP
    rank and EP size). ``device`` is where tensors handed to the group's collectives must live (CUDA for
    NCCL, CPU for gloo); the all-to-all backends stage through it when the data lives elsewhere.
    """

    group: object | None
    rank: int
    world_size: int
    device: torch.device
    backend: str

    @classmethod
    def from_group(cls, group=None, device: torch.device | str | None = None) -> "EPGroup":
        """Describe ``group`` (default: the world). Requires an initialized default process group."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "torch.distributed is not initialized: call torch.distributed.init_process_group (or "
                "moe_plugin.distributed.init_distributed) on every rank first"
            )
        if group is not None and not isinstance(group, dist.ProcessGroup):
            # new_group hands ranks outside the group a sentinel (GroupMember.NON_GROUP_MEMBER), not a group
            if group is getattr(dist.GroupMember, "NON_GROUP_MEMBER", object()):
                raise ValueError("this process is not a member of the given process group")
            raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("this process is not a member of the given process group")
        return cls(
            group=group,
            rank=rank,
            world_size=dist.get_world_size(group),
            device=torch.device(device) if device is not None else comm_device(group),
            backend=str(dist.get_backend(group)),
        )

    @classmethod
    def split_world(cls, ep_size: int) -> "EPGroup":
        """Cut the world into consecutive groups of ``ep_size`` ranks; return the one holding this rank.

        Collective over the whole world: every rank must call it with the same ``ep_size``.
        """
        import torch.distributed as dist

        world = dist.get_world_size()
        if not isinstance(ep_size, int) or ep_size < 1 or world % ep_size:
            raise ValueError(f"ep_size must be a positive int dividing the world size {world}, got {ep_size!r}")
        # One set of groups per ep_size: a model calling this per layer must not create process groups per
        # layer. The entry remembers the default group it was cut from, so a re-initialized world (after
        # destroy_process_group) gets new ones.
        world_group = dist.group.WORLD
        cached = _SPLIT_GROUPS.get(ep_size)
        if cached is not None and cached[0] is world_group:
            return cls.from_group(cached[1])
        mine = None
        for start in range(0, world, ep_size):
            group = dist.new_group(list(range(start, start + ep_size)))
            if start <= dist.get_rank() < start + ep_size:
                mine = group
        _SPLIT_GROUPS[ep_size] = (world_group, mine)
        return cls.from_group(mine)

    @property
    def is_gloo(self) -> bool:
        return "gloo" in self.backend.lower()

    def all_reduce_max(self, value: int) -> int:
        """Max of an int over the group (every rank must call it)."""
        import torch.distributed as dist

        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def barrier(self, timeout: float | datetime.timedelta | None = None) -> None:
        """Check that every rank is alive and reaches this point within ``timeout``.

        On gloo this is a ``monitored_barrier``, whose error names the ranks that did not arrive; elsewhere
        a small all-reduce waited on with the timeout.
        """
        import torch.distributed as dist

        td = _to_timedelta(timeout)
        try:
            if self.is_gloo:
                dist.monitored_barrier(group=self.group, timeout=td, wait_all_ranks=True)
                return
            t = torch.zeros(1, device=self.device)
            work = dist.all_reduce(t, group=self.group, async_op=True)
            if td is not None:
                work.wait(td)
            else:
                work.wait()
        except RuntimeError as exc:
            raise EPCommunicationError(f"EP health check failed on {self.describe()}: {exc}") from exc

    def describe(self) -> str:
        return f"EP rank {self.rank}/{self.world_size} over {self.backend} on {self.device}"


def init_distributed(
    backend: str | None = None,
    timeout: float | datetime.timedelta | None = 300.0,
    device: torch.device | str | None = None,
) -> EPGroup:
    """Join the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``), or create a one-rank group for a plain ``python``
    run. Returns the world as an ``EPGroup``.

    ``backend`` defaults to NCCL when CUDA is available, else gloo. ``timeout`` (seconds) bounds every
    collective: a peer that dies or stalls makes the others raise after it instead of hanging (gloo
    honours it directly; NCCL through its watchdog, see docs/expert_parallel.md). For NCCL the current CUDA
    device is set to ``LOCAL_RANK`` first.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return EPGroup.from_group(None, device)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend='nccl' needs CUDA, and torch.cuda.is_available() is False")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ["RANK"], os.environ["WORLD_SIZE"] = "0", "1"
    kwargs = {}
    td = _to_timedelta(timeout)
    if td is not None:
        kwargs["timeout"] = td
    dist.init_process_group(backend=backend, **kwargs)
    group = EPGroup.from_group(None, device)
    logger.info("moe_plugin: joined %s (timeout %s)", group.describe(), td)
    return group


# ---- expert-load statistics ------------------------------------------------------------------------------
@dataclass
class ExpertLoadStats:
    """Per-step expert load seen by one rank of an EP group, for load-balancing decisions.

    The all-to-all backends update it on every dispatch and combine (host-side integers they already have,
    so reading it costs no device sync). Fields ``last_*`` describe the most recent call; ``total_*`` sum
    every call since construction or ``reset()``; ``steps`` counts the calls (ModularKernel chunks count
    as separate calls).

    Sender view (this rank's tokens):
      - ``tokens_per_expert [E_global]``: routed slots this rank's tokens sent to each global expert.
      - ``tokens_sent_per_rank [P]``: token rows this rank sent to each rank (a token routed to several
        experts of one rank travels once).
    Receiver view (this rank's experts):
      - ``local_expert_load [E_local]``: slots this rank's experts processed, from all ranks.
      - ``tokens_received_per_rank [P]``: token rows received from each rank.
    Traffic: ``dispatch_bytes_sent`` / ``dispatch_bytes_received`` / ``combine_bytes_sent`` /
    ``combine_bytes_received`` (payload bytes, excluding the small count exchange).

    ``global_tokens_per_expert()`` sums the sender view over the group (a collective: call it on every
    rank); ``imbalance()`` is max/mean of the per-rank received slots from that sum.
    """

    num_experts: int
    ep_size: int
    rank: int
    owner: torch.Tensor = field(repr=False)
    """``[E_global]`` rank of each expert (to fold expert counts into rank counts)."""
    steps: int = 0
    last_tokens_per_expert: torch.Tensor = field(init=False, repr=False)
    total_tokens_per_expert: torch.Tensor = field(init=False, repr=False)
    last_tokens_sent_per_rank: torch.Tensor = field(init=False, repr=False)
    total_tokens_sent_per_rank: torch.Tensor = field(init=False, repr=False)
    last_tokens_received_per_rank: torch.Tensor = field(init=False, repr=False)
    total_tokens_received_per_rank: torch.Tensor = field(init=False, repr=False)
    last_local_expert_load: torch.Tensor = field(init=False, repr=False)
    total_local_expert_load: torch.Tensor = field(init=False, repr=False)
    last_bytes: dict = field(init=False)
    total_bytes: dict = field(init=False)

    _BYTE_KEYS = ("dispatch_bytes_sent", "dispatch_bytes_received", "combine_bytes_sent", "combine_bytes_received")

    def __post_init__(self) -> None:
        self.reset()

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    def reset(self) -> None:
        """Zero every counter (e.g. after a rebalancing decision)."""
        e, p, el = self.num_experts, self.ep_size, self.num_local_experts
        self.steps = 0
        self.last_tokens_per_expert = torch.zeros(e, dtype=torch.int64)
        self.total_tokens_per_expert = torch.zeros(e, dtype=torch.int64)
        self.last_tokens_sent_per_rank = torch.zeros(p, dtype=torch.int64)
        self.total_tokens_sent_per_rank = torch.zeros(p, dtype=torch.int64)
        self.last_tokens_received_per_rank = torch.zeros(p, dtype=torch.int64)
        self.total_tokens_received_per_rank = torch.zeros(p, dtype=torch.int64)
        self.last_local_expert_load = torch.zeros(el, dtype=torch.int64)
        self.total_local_expert_load = torch.zeros(el, dtype=torch.int64)
        self.last_bytes = dict.fromkeys(self._BYTE_KEYS, 0)
        self.total_bytes = dict.fromkeys(self._BYTE_KEYS, 0)

    def record_dispatch(
        self,
        tokens_per_expert: torch.Tensor,
        tokens_sent_per_rank: torch.Tensor,
        tokens_received_per_rank: torch.Tensor,
        local_expert_load: torch.Tensor,
        bytes_sent: int,
        bytes_received: int,
    ) -> None:
        """Called by a backend once per dispatch with host int64 tensors."""
        self.steps += 1
        for name, value in (
            ("tokens_per_expert", tokens_per_expert),
            ("tokens_sent_per_rank", tokens_sent_per_rank),
            ("tokens_received_per_rank", tokens_received_per_rank),
            ("local_expert_load", local_expert_load),
        ):
            value = value.to(torch.int64)
            setattr(self, f"last_{name}", value)
            getattr(self, f"total_{name}").add_(value)
        self.last_bytes = dict.fromkeys(self._BYTE_KEYS, 0)
        self._add_bytes("dispatch_bytes_sent", bytes_sent)
        self._add_bytes("dispatch_bytes_received", bytes_received)

    def record_combine(self, bytes_sent: int, bytes_received: int) -> None:
        self._add_bytes("combine_bytes_sent", bytes_sent)
        self._add_bytes("combine_bytes_received", bytes_received)

    def _add_bytes(self, key: str, value: int) -> None:
        self.last_bytes[key] += int(value)
        self.total_bytes[key] += int(value)

    def global_tokens_per_expert(self, group: "EPGroup", total: bool = True) -> torch.Tensor:
        """``[E_global]`` slots routed to each expert by all ranks (total since reset, or the last step).

        A collective over ``group``: every rank must call it.
        """
        import torch.distributed as dist

        local = self.total_tokens_per_expert if total else self.last_tokens_per_expert
        t = local.to(group.device).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group.group)
        return t.cpu()

    def imbalance(self, group: "EPGroup", total: bool = True) -> float:
        """Max over mean of the slots each rank's experts processed (1.0 = perfectly balanced); collective."""
        per_expert = self.global_tokens_per_expert(group, total)
        per_rank = torch.zeros(self.ep_size, dtype=torch.float64).index_add_(0, self.owner, per_expert.double())
        mean = per_rank.mean().item()
        return per_rank.max().item() / mean if mean > 0 else 1.0

    def as_dict(self) -> dict:
        """A JSON-friendly snapshot of every counter."""
        out: dict = {"steps": self.steps, "rank": self.rank, "ep_size": self.ep_size}
        for prefix in ("last", "total"):
            for name in ("tokens_per_expert", "tokens_sent_per_rank", "tokens_received_per_rank", "local_expert_load"):
                out[f"{prefix}_{name}"] = getattr(self, f"{prefix}_{name}").tolist()
            out[f"{prefix}_bytes"] = dict(getattr(self, f"{prefix}_bytes"))
        return out
