"""Single-process pieces of expert parallelism: placement tables, load statistics, the config fingerprint,
the wire byte views and the reasons the EP backends give when they cannot run."""

import datetime

import pytest
import torch

from moe_plugin import MoEConfig, ParallelConfig, QuantConfig
from moe_plugin.config import ExpertPlacement
from moe_plugin.distributed import (
    EPGroup,
    ExpertLoadStats,
    _to_timedelta,
    build_expert_map,
    expert_local_index,
    expert_owner,
    expert_placement,
)
from moe_plugin.oracle import Capabilities, select
from moe_plugin.prepare_finalize import all2all
from moe_plugin.prepare_finalize.local import batch_slots_by_expert
from moe_plugin.prepare_finalize.all2all import (
    AllToAllPrepareAndFinalize,
    BatchedAllToAllPrepareAndFinalize,
    _as_bytes,
    _from_bytes,
    _resolve_timeout,
    config_fingerprint,
)


@pytest.mark.parametrize("placement", ["contiguous", "round_robin"])
def test_placement_tables_agree_with_expert_map(placement):
    e, p = 12, 3
    owners = expert_placement(e, p, placement)
    if placement == "contiguous":
        assert owners == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    else:
        assert owners == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    owner = expert_owner(e, p, ExpertPlacement(placement))
    local = expert_local_index(e, p, ExpertPlacement(placement))
    for rank, ids in enumerate(owners):
        emap = build_expert_map(e, ParallelConfig(p, rank, placement))
        for g in range(e):
            if g in ids:
                assert owner[g] == rank and emap[g] == ids.index(g) == local[g]
            else:
                assert emap[g] == -1 and owner[g] != rank


def test_load_stats_accumulate_and_reset():
    owner = torch.tensor([0, 0, 1, 1])
    st = ExpertLoadStats(4, 2, 1, owner)
    st.record_dispatch(torch.tensor([3, 0, 1, 2]), torch.tensor([2, 2]), torch.tensor([1, 3]), torch.tensor([4, 5]), 100, 60)
    st.record_combine(30, 50)
    st.record_dispatch(torch.tensor([1, 1, 1, 1]), torch.tensor([1, 1]), torch.tensor([0, 2]), torch.tensor([1, 0]), 10, 6)
    assert st.steps == 2
    assert st.last_tokens_per_expert.tolist() == [1, 1, 1, 1]
    assert st.total_tokens_per_expert.tolist() == [4, 1, 2, 3]
    assert st.total_tokens_received_per_rank.tolist() == [1, 5]
    assert st.total_local_expert_load.tolist() == [5, 5]
    assert st.last_bytes == {"dispatch_bytes_sent": 10, "dispatch_bytes_received": 6,
                             "combine_bytes_sent": 0, "combine_bytes_received": 0}
    assert st.total_bytes["dispatch_bytes_sent"] == 110 and st.total_bytes["combine_bytes_received"] == 50
    d = st.as_dict()
    assert d["total_tokens_sent_per_rank"] == [3, 3] and d["steps"] == 2
    st.reset()
    assert st.steps == 0 and st.total_tokens_per_expert.sum() == 0 and st.total_bytes["dispatch_bytes_sent"] == 0


def test_fingerprint_covers_the_wire_format_but_not_the_rank():
    base = MoEConfig(8, 2, 256, 128, parallel=ParallelConfig(2, 0))
    same = MoEConfig(8, 2, 256, 128, parallel=ParallelConfig(2, 1))
    assert config_fingerprint(base, "all2all") == config_fingerprint(same, "all2all")
    variants = [
        MoEConfig(16, 2, 256, 128, parallel=ParallelConfig(2, 0)),
        MoEConfig(8, 4, 256, 128, parallel=ParallelConfig(2, 0)),
        MoEConfig(8, 2, 128, 128, parallel=ParallelConfig(2, 0)),
        MoEConfig(8, 2, 256, 128, dtype=torch.float16, parallel=ParallelConfig(2, 0)),
        MoEConfig(8, 2, 256, 128, quant=QuantConfig.fp8_block(), parallel=ParallelConfig(2, 0)),
        MoEConfig(8, 2, 256, 128, parallel=ParallelConfig(2, 0, "round_robin")),
        MoEConfig(8, 2, 256, 128, parallel=ParallelConfig(4, 0)),
        MoEConfig(8, 2, 256, 128, max_num_tokens=64, parallel=ParallelConfig(2, 0)),
    ]
    prints = {config_fingerprint(v, "all2all") for v in variants}
    assert len(prints) == len(variants) and config_fingerprint(base, "all2all") not in prints
    assert config_fingerprint(base, "all2all") != config_fingerprint(base, "batched_all2all")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16, torch.float32, torch.int32])
def test_wire_byte_views_round_trip(dtype):
    src = (torch.randn(5, 6) * 10).to(dtype)
    b = _as_bytes(src)
    assert b.dtype == torch.uint8 and b.shape == (5, 6 * src.element_size())
    back = _from_bytes(b, dtype, 6)
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), src.view(torch.uint8))
    empty = _from_bytes(_as_bytes(src[:0]), dtype, 6)
    assert empty.shape == (0, 6) and empty.dtype == dtype


def test_backends_explain_why_they_cannot_run_without_a_process_group():
    caps = Capabilities("cpu", None, "cpu", {})
    ep = MoEConfig(8, 2, 32, 16, parallel=ParallelConfig(2, 0))
    for cls in (AllToAllPrepareAndFinalize, BatchedAllToAllPrepareAndFinalize):
        ok, reason = cls.supports(ep, caps)
        assert not ok and "torch.distributed initialized" in reason
        ok, reason = cls.supports(MoEConfig(8, 2, 32, 16), caps)
        assert not ok and "ep_size=1" in reason
    text = select(MoEConfig(8, 2, 32, 16), caps=caps).explain()
    assert "all2all" in text and "ep_size=1: nothing to exchange" in text
    with pytest.raises(RuntimeError, match="not initialized"):
        EPGroup.from_group()


def test_timeouts_are_validated(monkeypatch):
    assert _to_timedelta(2) == datetime.timedelta(seconds=2)
    for bad in (0, -1, "3", True):
        with pytest.raises(ValueError, match="timeout"):
            _to_timedelta(bad)
    monkeypatch.setenv(all2all.TIMEOUT_ENV, "7.5")
    assert _resolve_timeout(None) == datetime.timedelta(seconds=7.5)
    assert _resolve_timeout(1) == datetime.timedelta(seconds=1)
    monkeypatch.setenv(all2all.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=all2all.TIMEOUT_ENV):
        _resolve_timeout(None)


@pytest.mark.parametrize("m,p,density", [(0, 2, 0.5), (1, 2, 1.0), (7, 3, 0.0), (33, 4, 0.3), (64, 8, 0.9)])
def test_rows_by_destination_match_nonzero_order(m, p, density):
    # The receivers rely on the rows arriving grouped by destination, ascending token within one.
    g = torch.Generator().manual_seed(m * 10 + p)
    mask = torch.rand(m, p, generator=g) < density
    want = [t for d in range(p) for t in range(m) if mask[t, d]]
    got = AllToAllPrepareAndFinalize._rows_by_destination(mask)
    assert got.shape == (p * m,) and got.dtype == torch.int64
    assert got[: len(want)].tolist() == want


@pytest.mark.parametrize("r,top_k,e,e_local,seed", [(0, 2, 8, 4, 0), (1, 1, 4, 2, 1), (20, 3, 12, 4, 2), (50, 8, 64, 16, 3)])
def test_batch_slots_with_the_host_slot_count_match_without(r, top_k, e, e_local, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:top_k] for _ in range(r)]).to(torch.int32) if r else \
        torch.empty(0, top_k, dtype=torch.int32)
    # Rank 1 of e // e_local, round-robin placement: local experts are 1, 1 + P, ...
    p = e // e_local
    emap = torch.full((e,), -1, dtype=torch.int32)
    emap[1::p] = torch.arange(e_local, dtype=torch.int32)
    n_local = sum(1 for v in ids.flatten().tolist() if emap[v] >= 0)
    want_slots, want_counts = batch_slots_by_expert(ids, emap, e_local)
    got_slots, got_counts = batch_slots_by_expert(ids, emap, e_local, n_local)
    for field in ("token", "slot", "expert", "row"):
        assert getattr(got_slots, field).tolist() == getattr(want_slots, field).tolist(), field
    assert got_counts.dtype == torch.int32 and got_counts.tolist() == want_counts.tolist()
    # Independent of the implementation: rows number each expert's slots 0, 1, ... in slot order.
    for x in range(e_local):
        slots = [s for s in range(ids.numel()) if emap[ids.flatten()[s]] == x]
        picked = got_slots.expert == x
        assert got_slots.slot[picked].tolist() == slots
        assert got_slots.row[picked].tolist() == list(range(len(slots)))
        assert got_slots.token[picked].tolist() == [s // top_k for s in slots]
        assert got_counts[x].item() == len(slots)
