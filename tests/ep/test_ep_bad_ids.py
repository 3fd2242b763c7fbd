"""Invalid ``topk_ids`` on ONE rank make EVERY rank of the all-to-all raise before the dispatch, and the group
stays usable afterwards.

The range check (and Batched's repeated-expert check) travels in the count exchange, so no rank is left
waiting in the dispatch collective for a rank that raised. The rank with bad ids raises the usual
``ValueError`` naming its range; the others raise one naming that rank.

Two gloo ranks run every scenario in one process group, back to back; after each, a healthy dispatch +
combine round trip (identity experts, so each token comes back multiplied by the number of ranks it
went to) checks that the collectives are still in step. Run as a script this file is one rank.
"""

from __future__ import annotations

import os
import sys
import traceback

import pytest

E, TOP_K, HIDDEN = 8, 2, 16
SCENARIOS = ("std_range_high_on_rank1", "std_range_negative_on_rank0", "std_range_on_both",
             "bat_duplicate_on_rank0", "bat_range_on_rank1")


def _rank_main(out_dir: str) -> None:
    import torch

    from moe_plugin import MoEConfig, ParallelConfig
    from moe_plugin.distributed import expert_owner, init_distributed
    from moe_plugin.modular import WeightAndReduceDelegate, WeightAndReduceNoOp
    from moe_plugin.prepare_finalize.all2all import AllToAllPrepareAndFinalize, BatchedAllToAllPrepareAndFinalize

    torch.set_num_threads(1)
    ep = init_distributed("gloo", timeout=30.0)
    rank, world = ep.rank, ep.world_size
    cfg = MoEConfig(E, TOP_K, HIDDEN, 8, dtype=torch.float32, parallel=ParallelConfig(world, rank), max_num_tokens=8)
    pfs = {"std": AllToAllPrepareAndFinalize.from_config(cfg, ep.group, timeout=30.0),
           "bat": BatchedAllToAllPrepareAndFinalize.from_config(cfg, ep.group, timeout=30.0)}
    owner = expert_owner(E, world, cfg.parallel.placement)
    kw = dict(num_experts=E, expert_map=None, apply_router_weight_on_input=False, a1_scale=None)

    def healthy_round_trip(fmt: str, seed: int) -> float:
        g = torch.Generator().manual_seed(100 * seed + rank)
        m = 5
        x = torch.randn(m, HIDDEN, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(m)]).to(torch.int32)
        w = torch.rand(m, TOP_K, generator=g)
        pf = pfs[fmt]
        prepared = pf.prepare(x, w, ids, **kw)
        out = torch.empty_like(x)
        if fmt == "std":
            # Identity experts, no weighting: each destination sends its received row back unchanged.
            pf.finalize(out, prepared.hidden_states.clone(), prepared, w, ids,
                        apply_router_weight_on_input=False, weight_and_reduce=WeightAndReduceNoOp())
            want = x * torch.tensor([len({int(owner[e]) for e in row}) for row in ids.tolist()]).view(m, 1)
        else:
            # Identity experts on the batched layout: combine weights and sums every slot.
            pf.finalize(out, prepared.hidden_states.clone(), prepared, w, ids,
                        apply_router_weight_on_input=False, weight_and_reduce=WeightAndReduceDelegate())
            want = x * w.sum(1, keepdim=True)
        return float((out - want).abs().max())

    results: dict = {}
    for i, name in enumerate(SCENARIOS):
        fmt = name[:3]
        ids = torch.tensor([[0, 5], [1, 6], [4, 2]], dtype=torch.int32)
        if name == "std_range_high_on_rank1" and rank == 1:
            ids[1, 1] = E
        elif name == "std_range_negative_on_rank0" and rank == 0:
            ids[2, 0] = -3
        elif name == "std_range_on_both":
            ids[0, 0] = E + rank
        elif name == "bat_duplicate_on_rank0" and rank == 0:
            ids[1] = torch.tensor([6, 6])
        elif name == "bat_range_on_rank1" and rank == 1:
            ids[0, 1] = 100
        x = torch.randn(3, HIDDEN)
        w = torch.rand(3, TOP_K)
        rec: dict = {}
        try:
            pfs[fmt].prepare(x, w, ids, **kw)
            rec["raised"] = None
        except Exception as exc:  # the test asserts on the type and message
            rec["raised"] = type(exc).__name__
            rec["message"] = str(exc)
        try:
            rec["after_err"] = healthy_round_trip(fmt, i)
        except Exception:
            rec["after_err"] = traceback.format_exc()
        results[name] = rec
    import ep_launch

    ep_launch.finish_rank(out_dir, rank, results, ep)


def results(tmp_path_factory) -> dict:
    import ep_launch

    return ep_launch.script_results(os.path.abspath(__file__), tmp_path_factory)


# scenario -> per rank: (own-error needle, or the peer rank the error must name)
EXPECTED = {
    "std_range_high_on_rank1": {0: ("peer", f"EP rank 1 sent topk_ids outside [0, {E}) (range [0, {E}])"),
                                1: ("own", f"topk_ids values must be in [0, {E}), found range [0, {E}]")},
    "std_range_negative_on_rank0": {0: ("own", f"topk_ids values must be in [0, {E}), found range [-3, 6]"),
                                    1: ("peer", f"EP rank 0 sent topk_ids outside [0, {E}) (range [-3, 6])")},
    "std_range_on_both": {0: ("own", f"found range [1, {E}]"), 1: ("own", f"found range [1, {E + 1}]")},
    "bat_duplicate_on_rank0": {0: ("own", "topk_ids repeats an expert within a token"),
                               1: ("peer", "EP rank 0 sent topk_ids that repeat an expert within a token")},
    "bat_range_on_rank1": {0: ("peer", f"EP rank 1 sent topk_ids outside [0, {E}) (range [0, 100])"),
                           1: ("own", f"topk_ids values must be in [0, {E}), found range [0, 100]")},
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_bad_ids_on_one_rank_fail_every_rank_and_keep_the_group_usable(scenario, tmp_path_factory):
    res = results(tmp_path_factory)
    for rank in (0, 1):
        rec = res[rank][scenario]
        kind, needle = EXPECTED[scenario][rank]
        assert rec["raised"] == "ValueError", (rank, rec)
        assert needle in rec["message"], (rank, rec["message"])
        if kind == "peer":
            assert f"this is EP rank {rank}/2" in rec["message"], rec["message"]
        # The group is still in step: a healthy round trip right after gives the exact answer.
        assert isinstance(rec["after_err"], float) and rec["after_err"] < 1e-5, (rank, rec["after_err"])


if __name__ == "__main__":
    _rank_main(sys.argv[1])
