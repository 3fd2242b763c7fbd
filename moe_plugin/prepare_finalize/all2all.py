"""Expert parallelism over torch.distributed all-to-all (NCCL on GPUs, gloo on CPU).

``AllToAllPrepareAndFinalize`` (Standard format) and ``BatchedAllToAllPrepareAndFinalize`` (Batched format)
share one wire protocol:

1. **Count exchange** -- one ``all_to_all_single`` of ``[P, 1 + E_local + C]`` int64: for every destination
   rank, how many token rows go there and how many routed slots each of its local experts gets, then C
   input-check columns, the same in every row (the sender's smallest and largest expert id; Batched adds
   a repeated-expert flag). The receiver learns its split sizes (and, for free, its per-expert load)
   from it, and every rank learns whether any rank's ``topk_ids`` were invalid, so all of them raise
   together before the dispatch instead of some waiting in it for a rank that raised.
2. **Dispatch** -- one ``all_to_all_single`` of packed byte rows, one per (token, destination rank): a
   token routed to several experts of the same rank travels once. Row layout:
   ``topk_ids int32 [k] | topk_weights fp32 [k] | scales fp32 [G] (FP8 only) | hidden [K]`` where hidden
   is FP8 (1 byte/value) when the pair quantizes activations per token / per block or with a static
   scale, else the model dtype. FP8 travels as uint8 (NCCL and gloo have no FP8 type). Rows are ordered
   by destination rank, then token.
3. **Combine** -- each receiver applies the experts' weight-and-reduce strategy to its rows (partial sums
   over the slots it owns, ``[R, K]`` in the model dtype), sends them back along the reverse splits, and
   the origin sums the partials of each token in fp32.

The receiver's ``topk_ids`` stay *global*: the experts map them with ``expert_map``, which sends other
ranks' experts to -1, so slots owned elsewhere contribute nothing there.

The host synchronises with the device once per dispatch: the copy of the count tables (split sizes must
be Python ints). Everything else on the dispatch and combine path is sized from host-known numbers
(no ``nonzero``, ``bincount`` or ``.item()``), so a host-bound step is not stalled several times on
the GPU queue.

Every collective goes through ``_Comm``, which waits with the configured timeout and turns a failure into
``EPCommunicationError`` naming the EP group, so a dead or stalled peer fails this rank with a clear
message instead of hanging it (docs/expert_parallel.md).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ..config import FP8_DTYPE, MoEConfig
from ..distributed import (
    EPCommunicationError,
    EPGroup,
    ExpertLoadStats,
    _to_timedelta,
    build_expert_map,
    expert_local_index,
    expert_owner,
)
from ..modular import (
    ActivationFormat,
    AsyncPrepareAndFinalize,
    ExpertTokensMetadata,
    PreparedTokens,
    TopKWeightAndReduce,
    WeightAndReduceContiguous,
    WeightAndReduceDelegate,
)
from ..ops.scheme import quantize_activation
from ..validation import _value_checks_enabled
from .local import BatchedSlots, apply_weight_on_input, batch_slots_by_expert, reduce_batched_output

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "MOE_PLUGIN_EP_TIMEOUT"
"""Seconds to wait for any EP collective before failing, when ``from_config`` gets no ``timeout``."""


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``[M, n]`` of any dtype as ``[M, n * itemsize]`` uint8 (the wire type)."""
    t = t.contiguous()
    if t.dtype == torch.uint8:
        return t
    if t.numel() == 0:
        return torch.empty(t.shape[0], t.shape[1] * t.element_size(), dtype=torch.uint8, device=t.device)
    return t.view(torch.uint8)


def _from_bytes(b: torch.Tensor, dtype: torch.dtype, cols: int) -> torch.Tensor:
    """Inverse of ``_as_bytes`` for one field sliced out of the packed rows."""
    b = b.contiguous()
    if dtype == torch.uint8:
        return b
    if b.shape[0] == 0:
        return torch.empty(0, cols, dtype=dtype, device=b.device)
    return b.view(dtype)


class _Comm:
    """The collectives of one EP group, staged through the group's device and waited on with a timeout."""

    def __init__(self, ep: EPGroup, timeout: datetime.timedelta | None):
        self.ep = ep
        self.timeout = timeout

    def _fail(self, what: str, exc: BaseException) -> EPCommunicationError:
        limit = f"{self.timeout.total_seconds():g}s" if self.timeout is not None else "the process-group timeout"
        return EPCommunicationError(
            f"EP {what} failed on {self.ep.describe()}: {exc}\n"
            f"A peer rank most likely exited, crashed or stalled for longer than {limit} (see "
            "docs/expert_parallel.md, 'Failures'). The process group is unusable now; restart all ranks."
        )

    def wait(self, work, what: str) -> None:
        try:
            if self.timeout is not None:
                work.wait(self.timeout)
            else:
                work.wait()
        except EPCommunicationError:
            raise
        except RuntimeError as exc:
            raise self._fail(what, exc) from exc

    def all_to_all(
        self,
        output: torch.Tensor,
        inp: torch.Tensor,
        output_splits: list[int] | None,
        input_splits: list[int] | None,
        what: str,
    ) -> Callable[[], torch.Tensor]:
        """Start ``all_to_all_single`` (rows along dim 0); the returned function waits and returns the
        output on ``output``'s device."""
        target = output.device
        dev = self.ep.device
        out_c = output if target == dev else torch.empty(output.shape, dtype=output.dtype, device=dev)
        in_c = inp.contiguous() if inp.device == dev else inp.to(dev)
        try:
            work = dist.all_to_all_single(
                out_c, in_c, output_splits, input_splits, group=self.ep.group, async_op=True
            )
        except RuntimeError as exc:
            raise self._fail(what, exc) from exc

        def finish() -> torch.Tensor:
            self.wait(work, what)
            # The send buffer must outlive the collective; this closure holds it until the wait.
            assert in_c is not None
            return out_c if target == dev else out_c.to(target)

        return finish

    def all_reduce_max(self, value: int, what: str) -> int:
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.ep.device)
        try:
            work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ep.group, async_op=True)
        except RuntimeError as exc:
            raise self._fail(what, exc) from exc
        self.wait(work, what)
        return int(t.item())

    def all_gather(self, t: torch.Tensor, what: str) -> list[torch.Tensor]:
        t = t.to(self.ep.device)
        out = [torch.empty_like(t) for _ in range(self.ep.world_size)]
        try:
            work = dist.all_gather(out, t, group=self.ep.group, async_op=True)
        except RuntimeError as exc:
            raise self._fail(what, exc) from exc
        self.wait(work, what)
        return [o.cpu() for o in out]


def _resolve_timeout(timeout) -> datetime.timedelta | None:
    if timeout is None:
        env = os.environ.get(TIMEOUT_ENV)
        if env:
            try:
                timeout = float(env)
            except ValueError:
                raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {env!r}") from None
    return _to_timedelta(timeout, "timeout")


def config_fingerprint(config: MoEConfig, backend: str) -> str:
    """Everything every rank of an EP group must agree on (the wire format and the expert layout)."""
    c = config
    return (
        f"{backend}: experts={c.num_experts} top_k={c.top_k} hidden={c.hidden_size} "
        f"intermediate={c.intermediate_size} dtype={str(c.dtype).replace('torch.', '')} "
        f"activation={c.activation} quant={c.quant.name}/{c.quant.scale_format.value} "
        f"ep_size={c.parallel.ep_size} placement={c.parallel.placement.value} max_num_tokens={c.max_num_tokens}"
    )


def _fingerprint_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def check_group_config(config: MoEConfig, ep: EPGroup, backend: str, comm: _Comm) -> None:
    """Collective: every rank of ``ep`` must hold the same config (``config_fingerprint``), with
    ``ep_size`` equal to the group size and ``ep_rank`` equal to its rank in the group.

    Every rank sees every rank's facts, so all of them raise the same ``ValueError`` together instead of
    some waiting forever in a later collective.
    """
    mine = config_fingerprint(config, backend)
    facts = torch.tensor([_fingerprint_int(mine), config.parallel.ep_rank, config.parallel.ep_size], dtype=torch.int64)
    gathered = torch.stack(comm.all_gather(facts, "config check"))
    fingerprints, ranks = gathered[:, 0], gathered[:, 1]
    if not bool((fingerprints == fingerprints[0]).all()):
        texts: list = [None] * ep.world_size
        dist.all_gather_object(texts, mine, group=ep.group)
        lines = "\n".join(f"  rank {r}: {t}" for r, t in enumerate(texts))
        raise ValueError(f"EP ranks were built with different MoE configs; every rank must use the same one:\n{lines}")
    if config.parallel.ep_size != ep.world_size:
        raise ValueError(
            f"ParallelConfig.ep_size={config.parallel.ep_size} but the EP process group has {ep.world_size} ranks"
        )
    wrong = [(r, int(v)) for r, v in enumerate(ranks.tolist()) if r != v]
    if wrong:
        detail = ", ".join(f"group rank {r} has ep_rank={v}" for r, v in wrong)
        raise ValueError(f"ParallelConfig.ep_rank must equal the rank in the EP process group: {detail}")


def _supports_ep(config: MoEConfig) -> tuple[bool, str]:
    if not config.parallel.use_ep:
        return False, "ep_size=1: nothing to exchange (a local backend serves it)"
    if not dist.is_available():
        return False, "torch.distributed is not available in this torch build"
    if not dist.is_initialized():
        return False, (
            f"ep_size={config.parallel.ep_size} needs torch.distributed initialized "
            "(torchrun + init_process_group, or moe_plugin.distributed.init_distributed)"
        )
    world = dist.get_world_size()
    if world % config.parallel.ep_size:
        return False, f"ep_size={config.parallel.ep_size} does not divide the world size {world}"
    return True, ""


@dataclass
class DispatchHandle:
    """What combine needs from dispatch (one per call)."""

    token_index: torch.Tensor
    """``[S]`` caller's row of each sent row (rows are ordered by destination rank, then token)."""
    send_splits: list[int]
    """Rows sent to each rank (= rows that come back in combine)."""
    recv_splits: list[int]
    """Rows received from each rank (= partial sums sent back in combine)."""
    num_tokens: int
    slots: BatchedSlots | None = None
    """Batched only: where each received slot sits in ``[E_local, T, K]``."""


class AllToAllPrepareAndFinalize(AsyncPrepareAndFinalize):
    """Expert parallelism with ``all_to_all_single`` (Standard format): ``a1 [R, K]`` received rows with
    their global ``topk_ids`` / ``topk_weights``; combine sums each token's partials at its origin.

    Build with ``from_config(config, group=None, timeout=None)``; ``group`` is a ProcessGroup or an
    ``EPGroup`` (default: the world). ``self.stats`` (``ExpertLoadStats``) is updated on every call.
    """

    name = "all2all"
    activation_format = ActivationFormat.STANDARD

    def __init__(self, config: MoEConfig, ep: EPGroup, *, timeout: float | datetime.timedelta | None = None):
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        super().__init__(config.quant)
        if not isinstance(ep, EPGroup):
            raise TypeError(f"ep must be an EPGroup, got {type(ep).__name__}")
        if config.parallel.ep_size != ep.world_size:
            raise ValueError(
                f"ParallelConfig.ep_size={config.parallel.ep_size} but the EP process group has {ep.world_size} ranks"
            )
        self.config = config
        self.ep = ep
        self.comm = _Comm(ep, _resolve_timeout(timeout))
        placement = config.parallel.placement
        self._owner_cpu = expert_owner(config.num_experts, ep.world_size, placement)
        local = expert_local_index(config.num_experts, ep.world_size, placement)
        # Global id -> index in the count exchange's rank-major [P, E_local] layout.
        self._rank_major_cpu = self._owner_cpu * config.num_local_experts + local
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        # (map, its version counter): a map rewritten in place (expert rebalancing) is checked again
        self._checked_map: tuple[torch.Tensor, int] | None = None
        # ModularKernel checks the weights against this: full global weights on every rank would run
        # with local ids indexing the wrong experts
        self.num_local_experts = config.num_local_experts
        self.stats = ExpertLoadStats(config.num_experts, ep.world_size, ep.rank, self._owner_cpu)

    # ---- construction and facts --------------------------------------------------------------------
    @classmethod
    def supports(cls, config: MoEConfig, caps) -> tuple[bool, str]:
        return _supports_ep(config)

    @classmethod
    def from_config(
        cls,
        config: MoEConfig,
        group=None,
        *,
        timeout: float | datetime.timedelta | None = None,
        check_config: bool = True,
    ) -> "AllToAllPrepareAndFinalize":
        """Build on ``group`` (ProcessGroup, ``EPGroup`` or None = world). Collective over the group: with
        ``check_config`` every rank's config is compared (a mismatch raises ``ValueError`` on all ranks).
        ``timeout`` (seconds) bounds every wait; default ``$MOE_PLUGIN_EP_TIMEOUT``, else the process
        group's own timeout."""
        ep = group if isinstance(group, EPGroup) else EPGroup.from_group(group)
        comm = _Comm(ep, _resolve_timeout(timeout))
        if check_config:
            check_group_config(config, ep, cls.name, comm)
        pf = cls(config, ep, timeout=comm.timeout)
        logger.debug("moe_plugin: %r built (timeout %s)", pf, comm.timeout)
        return pf

    @property
    def num_dispatchers(self) -> int:
        return self.ep.world_size

    def agree_num_chunks(self, num_chunks: int, device: torch.device) -> int:
        return self.comm.all_reduce_max(num_chunks, "chunk-count agreement")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(quant={self.quant.name}, {self.ep.describe()})"

    # ---- dispatch ----------------------------------------------------------------------------------
    def _device_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self._tables.get(device)
        if tables is None:
            tables = (self._owner_cpu.to(device), self._rank_major_cpu.to(device))
            self._tables[device] = tables
        return tables

    def check_inputs(self, hidden_states, topk_weights, topk_ids, *, num_experts, expert_map) -> None:
        self._check_inputs(hidden_states, topk_weights, topk_ids, num_experts, expert_map)

    def _check_inputs(self, hidden_states, topk_weights, topk_ids, num_experts, expert_map) -> None:
        c = self.config
        if hidden_states.dim() != 2 or hidden_states.shape[1] != c.hidden_size:
            raise ValueError(
                f"hidden_states must be [M, hidden_size={c.hidden_size}], got shape {tuple(hidden_states.shape)}"
            )
        if hidden_states.dtype != c.dtype:
            raise TypeError(
                f"hidden_states dtype {hidden_states.dtype} must be the config dtype {c.dtype} "
                "(every EP rank must send rows of the same byte width)"
            )
        want = (hidden_states.shape[0], c.top_k)
        if tuple(topk_ids.shape) != want or tuple(topk_weights.shape) != want:
            raise ValueError(
                f"topk_ids and topk_weights must be [M, top_k] = {list(want)}, got "
                f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}"
            )
        if topk_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
        # The range of topk_ids is checked after the count exchange (_raise_on_bad_ids): reading it here
        # would cost a host synchronisation of its own.
        if num_experts != c.num_experts:
            raise ValueError(f"num_experts must be the config's global count {c.num_experts}, got {num_experts}")
        checked = self._checked_map
        if expert_map is not None and (
            checked is None or expert_map is not checked[0] or expert_map._version != checked[1]
        ):
            mine = build_expert_map(c.num_experts, c.parallel, "cpu")
            if mine is None:  # one rank: the identity map
                mine = torch.arange(c.num_experts, dtype=torch.int32)
            if expert_map.shape != mine.shape or not torch.equal(expert_map.cpu().to(torch.int32), mine):
                raise ValueError(
                    "expert_map does not match ParallelConfig (ep_rank, placement); the all-to-all backend "
                    "routes tokens by the config's placement, so the experts' map must agree "
                    "(use moe_plugin.distributed.build_expert_map)"
                )
            self._checked_map = (expert_map, expert_map._version)

    def _wire_plan(self, a1_scale: torch.Tensor | None) -> str:
        """``plain``: model dtype on the wire; ``fp8``: quantize before sending (per-row scales travel,
        or the static per-tensor scale everybody has); ``fp8_after``: dynamic per-tensor FP8, quantized by
        the receiver (one scale must cover the rows the experts see together)."""
        q = self.quant
        if not q.is_quantized:
            return "plain"
        if q.block_shape is not None or q.per_act_token or a1_scale is not None:
            return "fp8"
        return "fp8_after"

    # Input-check columns at the end of every row of the count table: the sender's smallest and largest
    # expert id (0, 0 when it has no tokens or its checks are off). Batched appends a repeated-expert flag.
    _num_check_cols = 2

    def _duplicate_flag(self, topk_ids: torch.Tensor) -> torch.Tensor | None:
        """0-d device flag: some token names one expert twice (only Batched forbids that)."""
        return None

    def _check_facts(self, topk_ids: torch.Tensor, check: bool) -> torch.Tensor:
        """``[C]`` int64 on the device: what every rank must learn about this rank's ``topk_ids``."""
        if not check:
            return torch.zeros(self._num_check_cols, dtype=torch.int64, device=topk_ids.device)
        lo, hi = torch.aminmax(topk_ids)
        facts = [lo, hi]
        dup = self._duplicate_flag(topk_ids)
        if dup is not None:
            facts.append(dup.to(lo.dtype))
        return torch.stack(facts).to(torch.int64)

    def _raise_on_bad_ids(self, mine: list[int], theirs: list[list[int]]) -> None:
        """Raise on every rank when any rank's ``topk_ids`` were invalid (``mine``: this rank's check
        columns, ``theirs``: every rank's, by group rank). Called after the count exchange and before
        the dispatch, so no rank enters a collective that another has left."""
        e = self.config.num_experts
        self._raise_own_bad_ids(mine)
        for rank, facts in enumerate(theirs):
            lo, hi = facts[0], facts[1]
            if lo < 0 or hi >= e:
                raise ValueError(
                    f"EP rank {rank} sent topk_ids outside [0, {e}) (range [{lo}, {hi}]); every rank of the "
                    f"group fails this dispatch (this is {self.ep.describe()})"
                )
            self._raise_peer_bad_ids(rank, facts)

    def _raise_own_bad_ids(self, facts: list[int]) -> None:
        lo, hi, e = facts[0], facts[1], self.config.num_experts
        if lo < 0 or hi >= e:
            raise ValueError(f"topk_ids values must be in [0, {e}), found range [{lo}, {hi}]")

    def _raise_peer_bad_ids(self, rank: int, facts: list[int]) -> None:
        """Checks beyond the id range that a subclass ships in its extra check columns."""

    @staticmethod
    def _rows_by_destination(send_mask: torch.Tensor) -> torch.Tensor:
        """``[P * M]`` int64 whose first ``S`` entries (S = pairs in ``send_mask [M, P]``) are the token
        of every (token, destination) pair, ordered by destination, then token -- what
        ``send_mask.t().nonzero()`` gives, without reading its size on the host."""
        m, p = send_mask.shape
        flat = send_mask.t().reshape(-1)
        # 1-based position among the selected pairs; unselected pairs all land on slot 0, which is dropped.
        target = torch.cumsum(flat, 0).mul_(flat)
        order = torch.empty(p * m + 1, dtype=torch.int64, device=send_mask.device)
        order.scatter_(0, target, torch.arange(p * m, dtype=torch.int64, device=send_mask.device))
        return order[1:].remainder_(max(m, 1))

    def prepare_async(
        self,
        hidden_states,
        topk_weights,
        topk_ids,
        *,
        num_experts,
        expert_map,
        apply_router_weight_on_input,
        a1_scale,
    ) -> Callable[[], PreparedTokens]:
        self._check_inputs(hidden_states, topk_weights, topk_ids, num_experts, expert_map)
        c, p = self.config, self.ep.world_size
        device = hidden_states.device
        m, top_k = topk_ids.shape
        e_local = c.num_local_experts
        owner, rank_major = self._device_tables(device)
        ids = topk_ids.to(torch.int32)
        ids_long = ids.long()
        weights = topk_weights.float()
        check = bool(topk_ids.numel()) and _value_checks_enabled(topk_ids)
        facts = self._check_facts(topk_ids, check)
        if check:
            # Out-of-range ids are reported after the count exchange; until then they must not index the
            # tables (on CUDA that is a device-side assert that kills the process).
            ids_long = ids_long.clamp(0, c.num_experts - 1)

        # Count exchange first; the payload is packed while it is in flight.
        send_mask = torch.zeros(m, p, dtype=torch.bool, device=device)
        send_mask.scatter_(1, owner[ids_long], True)
        # A scatter-add, not bincount: bincount reads its output size on the host (a synchronisation).
        slot_keys = rank_major[ids_long].flatten()
        slot_counts = torch.zeros(c.num_experts, dtype=torch.int64, device=device)
        slot_counts.index_add_(0, slot_keys, torch.ones_like(slot_keys))
        counts = torch.cat(
            [
                send_mask.sum(0, dtype=torch.int64).view(p, 1),
                slot_counts.view(p, e_local),
                facts.view(1, -1).expand(p, -1),
            ],
            1,
        )
        recv_counts_f = self.comm.all_to_all(torch.empty_like(counts), counts, None, None, "count exchange")

        plan = self._wire_plan(a1_scale)
        a1 = apply_weight_on_input(hidden_states, weights, apply_router_weight_on_input)
        scale = None
        if plan == "fp8":
            a1, scale = quantize_activation(a1, self.quant, a1_scale)
        fields: list[tuple[torch.Tensor, torch.dtype, int]] = [(ids, torch.int32, top_k), (weights, torch.float32, top_k)]
        send_scale = scale is not None and (self.quant.block_shape is not None or self.quant.per_act_token)
        if send_scale:
            # An explicit width: a rank with no tokens has nothing to infer -1 from, and must still join
            # the dispatch its peers are waiting in.
            scale = scale.float().reshape(m, scale.shape[-1])
            fields.append((scale, torch.float32, scale.shape[1]))
        fields.append((a1, a1.dtype, c.hidden_size))
        byte_fields = [_as_bytes(t) for t, _, _ in fields]
        widths = [b.shape[1] for b in byte_fields]
        row_bytes = sum(widths)
        # One row per token now; the rows per (token, destination) are gathered once the counts are known.
        packed = torch.cat(byte_fields, 1)
        token_order = self._rows_by_destination(send_mask)

        # The one host synchronisation: split sizes must be Python ints, so both count tables (with every
        # rank's check columns) come to the host in one copy.
        recv_counts = recv_counts_f()
        tables = torch.stack([counts, recv_counts]).cpu()
        n_counts = 1 + e_local
        self._raise_on_bad_ids(tables[0, 0, n_counts:].tolist(), tables[1, :, n_counts:].tolist())
        send_counts_cpu, recv_counts_cpu = tables[:, :, :n_counts].unbind(0)
        send_splits = send_counts_cpu[:, 0].tolist()
        recv_splits = recv_counts_cpu[:, 0].tolist()
        token_index = token_order[: sum(send_splits)]
        send = packed.index_select(0, token_index)
        num_recv = sum(recv_splits)
        recv = torch.empty(num_recv, row_bytes, dtype=torch.uint8, device=device)
        recv_f = self.comm.all_to_all(recv, send, recv_splits, send_splits, "dispatch")

        self.stats.record_dispatch(
            tokens_per_expert=send_counts_cpu[:, 1:].reshape(-1)[self._rank_major_cpu],
            tokens_sent_per_rank=send_counts_cpu[:, 0],
            tokens_received_per_rank=recv_counts_cpu[:, 0],
            local_expert_load=recv_counts_cpu[:, 1:].sum(0),
            bytes_sent=send.numel(),
            bytes_received=recv.numel(),
        )
        handle = DispatchHandle(token_index, send_splits, recv_splits, m)
        local_load_cpu = recv_counts_cpu[:, 1:].sum(0).to(torch.int32)
        # The same counts summed on the device: copying local_load_cpu up would synchronise again.
        local_load = recv_counts[:, 1:n_counts].sum(0).to(torch.int32)

        def finish() -> PreparedTokens:
            rows = recv_f()
            parts, col = [], 0
            for (_, dtype, cols), w in zip(fields, widths):
                parts.append(_from_bytes(rows[:, col : col + w], dtype, cols))
                col += w
            r_ids, r_weights, *rest = parts
            r_hidden = rest[-1]
            r_scale = rest[0] if send_scale else None
            if plan == "fp8" and not send_scale:
                r_scale = a1_scale.float().reshape(1).to(device)
            elif plan == "fp8_after":
                r_hidden, r_scale = quantize_activation(r_hidden, self.quant, None)
            return self._received(r_hidden, r_scale, r_ids, r_weights, handle, local_load, local_load_cpu, expert_map)

        return finish

    def _received(self, hidden, scale, ids, weights, handle, local_load, local_load_cpu, expert_map) -> PreparedTokens:
        meta = ExpertTokensMetadata(expert_num_tokens=local_load, expert_num_tokens_cpu=local_load_cpu)
        return PreparedTokens(
            hidden_states=hidden, scale=scale, topk_ids=ids, topk_weights=weights,
            expert_tokens_meta=meta, handle=handle,
        )

    # ---- combine -----------------------------------------------------------------------------------
    def _partial_sums(self, fused_expert_output, prepared, out_dtype, apply_router_weight_on_input, weight_and_reduce):
        """``[R, K]`` in the model dtype: each received row's expert outputs weighted and summed over the
        slots this rank owns."""
        if isinstance(weight_and_reduce, WeightAndReduceDelegate):
            weight_and_reduce = WeightAndReduceContiguous()
        r = prepared.topk_ids.shape[0]
        partial = torch.empty(r, self.config.hidden_size, dtype=out_dtype, device=fused_expert_output.device)
        if r:
            weight_and_reduce.apply(
                partial, fused_expert_output, prepared.topk_weights, prepared.topk_ids, apply_router_weight_on_input
            )
        return partial

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
        handle: DispatchHandle = prepared.handle
        if not isinstance(handle, DispatchHandle):
            raise ValueError(f"{type(self).__name__}.finalize needs the PreparedTokens its own prepare returned")
        if tuple(output.shape) != (handle.num_tokens, self.config.hidden_size):
            raise ValueError(
                f"output must be [M={handle.num_tokens}, K={self.config.hidden_size}], got {tuple(output.shape)}"
            )
        partial = self._partial_sums(
            fused_expert_output, prepared, output.dtype, apply_router_weight_on_input, weight_and_reduce
        )
        back = torch.empty(handle.token_index.numel(), self.config.hidden_size, dtype=output.dtype, device=output.device)
        back_f = self.comm.all_to_all(back, partial, handle.send_splits, handle.recv_splits, "combine")
        self.stats.record_combine(
            partial.numel() * partial.element_size(), back.numel() * back.element_size()
        )

        def finish() -> None:
            rows = back_f()
            acc = torch.zeros(output.shape, dtype=torch.float32, device=output.device)
            if rows.shape[0]:
                acc.index_add_(0, handle.token_index, rows.float())
            output.copy_(acc)

        return finish


class BatchedAllToAllPrepareAndFinalize(AllToAllPrepareAndFinalize):
    """Expert parallelism with ``all_to_all_single`` (Batched format): received slots laid out as
    ``[E_local, max_num_tokens * P, K]`` with ``expert_num_tokens``; this backend weights and reduces
    (the experts delegate). Batches above ``config.max_num_tokens`` per rank are chunked by ModularKernel.
    """

    name = "batched_all2all"
    activation_format = ActivationFormat.BATCHED

    def __init__(self, config: MoEConfig, ep: EPGroup, *, timeout: float | datetime.timedelta | None = None):
        super().__init__(config, ep, timeout=timeout)
        self.max_tokens = config.max_num_tokens * ep.world_size
        self._own_map = build_expert_map(config.num_experts, config.parallel)
        self._buffers: dict[tuple, torch.Tensor] = {}

    def max_num_tokens_per_rank(self) -> int | None:
        return self.config.max_num_tokens

    def prepare_async(self, hidden_states, topk_weights, topk_ids, **kwargs):
        if hidden_states.dim() == 2 and hidden_states.shape[0] > self.config.max_num_tokens:
            raise ValueError(
                f"hidden_states has {hidden_states.shape[0]} tokens but {type(self).__name__} holds "
                f"max_num_tokens={self.config.max_num_tokens} per rank; run it through ModularKernel, which chunks"
            )
        return super().prepare_async(hidden_states, topk_weights, topk_ids, **kwargs)

    # A token naming one expert twice could overflow the receiver's [max_num_tokens * P] rows; the
    # receiver would raise after this rank had entered the combine and left it waiting out the timeout.
    # The flag travels in the count exchange instead, so every rank rejects the step before the dispatch.
    _num_check_cols = 3

    def _duplicate_flag(self, topk_ids: torch.Tensor) -> torch.Tensor | None:
        if topk_ids.shape[1] < 2:
            return torch.zeros((), dtype=torch.bool, device=topk_ids.device)
        ordered = torch.sort(topk_ids, dim=1).values
        return (ordered[:, 1:] == ordered[:, :-1]).any()

    def _raise_own_bad_ids(self, facts: list[int]) -> None:
        if facts[2]:
            raise ValueError(
                "topk_ids repeats an expert within a token; the batched all-to-all layout holds each "
                "token at most once per expert"
            )
        super()._raise_own_bad_ids(facts)

    def _raise_peer_bad_ids(self, rank: int, facts: list[int]) -> None:
        if facts[2]:
            raise ValueError(
                f"EP rank {rank} sent topk_ids that repeat an expert within a token, which the batched "
                f"all-to-all layout cannot hold; every rank of the group fails this dispatch "
                f"(this is {self.ep.describe()})"
            )

    def _buffer(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, fill=None):
        key = (role, shape, dtype, device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = torch.empty(shape, dtype=dtype, device=device)
            self._buffers[key] = buf
        if fill is not None:
            buf.fill_(fill)
        return buf

    def _received(self, hidden, scale, ids, weights, handle, local_load, local_load_cpu, expert_map) -> PreparedTokens:
        e_local = self.config.num_local_experts
        device = hidden.device
        emap = expert_map
        if emap is None and self._own_map is not None:
            emap = self._own_map.to(device)
        slots, counts = batch_slots_by_expert(ids, emap, e_local, int(local_load_cpu.sum()))
        if local_load_cpu.numel() and int(local_load_cpu.max()) > self.max_tokens:
            raise ValueError(
                f"a local expert received {int(local_load_cpu.max())} slots, more than the batched layout's "
                f"{self.max_tokens} rows (topk_ids repeats an expert within a token?)"
            )
        k = self.config.hidden_size
        batched = self._buffer("a1", (e_local, self.max_tokens, k), hidden.dtype, device)
        if slots.slot.numel():
            # Index through a byte view: advanced indexing is not implemented for FP8 on every device.
            dst = batched.view(torch.uint8) if hidden.dtype == FP8_DTYPE else batched
            src = hidden.view(torch.uint8) if hidden.dtype == FP8_DTYPE else hidden
            dst[slots.expert, slots.row] = src[slots.token]
        batched_scale = None
        if scale is not None:
            if scale.numel() == 1:
                batched_scale = scale
            else:
                batched_scale = self._buffer(
                    "scale", (e_local, self.max_tokens, scale.shape[-1]), scale.dtype, device, fill=1.0
                )
                if slots.slot.numel():
                    batched_scale[slots.expert, slots.row] = scale[slots.token]
        handle.slots = slots
        meta = ExpertTokensMetadata(expert_num_tokens=counts, expert_num_tokens_cpu=local_load_cpu)
        return PreparedTokens(
            hidden_states=batched, scale=batched_scale, topk_ids=ids, topk_weights=weights,
            expert_tokens_meta=meta, handle=handle,
        )

    def _partial_sums(self, fused_expert_output, prepared, out_dtype, apply_router_weight_on_input, weight_and_reduce):
        if not isinstance(weight_and_reduce, WeightAndReduceDelegate):
            raise ValueError(
                f"{type(self).__name__} reduces the batched layout itself; the experts must delegate, "
                f"got {weight_and_reduce!r}"
            )
        r = prepared.topk_ids.shape[0]
        partial = torch.empty(r, self.config.hidden_size, dtype=out_dtype, device=fused_expert_output.device)
        reduce_batched_output(
            partial, fused_expert_output, prepared.handle.slots, prepared.topk_weights, apply_router_weight_on_input
        )
        return partial
