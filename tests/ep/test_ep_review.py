"""All-to-all expert parallelism, corner cases found in review, two gloo ranks in one process group:

- every rank handing in the full global weights ``[E, ...]`` instead of its ``[E / P, ...]`` slice ran
  with local ids indexing the wrong experts (relative error ~1); now a ValueError on every rank;
- an expert map rewritten in place (as expert rebalancing does) skipped the map check, which compared
  object identity only;
- a malformed ``weights`` argument on one rank raised AttributeError on that rank alone and left the
  peers' next call paired with the wrong step; now a TypeError there and "another rank rejected" on the
  peers, and the group stays in step;
- ``EPGroup.split_world`` created new process groups per call; ``EPGroup.from_group`` on a group this
  rank is not in said "got int".

Run as a script this file is one rank.
"""

from __future__ import annotations

import os
import sys
import traceback

import pytest

E, TOP_K, K, N = 8, 2, 32, 16


def _rank_main(out_dir: str) -> None:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import naive
    from moe_plugin import ModularKernel, MoEConfig, ParallelConfig
    from moe_plugin.distributed import EPGroup, build_expert_map, init_distributed, local_expert_ids
    from moe_plugin.experts.torch_ref import TorchExperts
    from moe_plugin.modular import ExpertWeights
    from moe_plugin.prepare_finalize.all2all import AllToAllPrepareAndFinalize

    torch.set_num_threads(1)
    ep = init_distributed("gloo", timeout=30.0)
    rank, world = ep.rank, ep.world_size
    cfg = MoEConfig(E, TOP_K, K, N, dtype=torch.float32, parallel=ParallelConfig(world, rank))
    kern = ModularKernel(AllToAllPrepareAndFinalize.from_config(cfg, ep.group, timeout=30.0), TorchExperts(cfg))
    g = torch.Generator().manual_seed(7)
    w1 = torch.randn(E, 2 * N, K, generator=g) * K**-0.5
    w2 = torch.randn(E, K, N, generator=g) * N**-0.5
    own = torch.tensor(local_expert_ids(E, cfg.parallel))
    local = ExpertWeights(w1[own].contiguous(), w2[own].contiguous())
    emap = build_expert_map(E, cfg.parallel, "cpu")

    def inputs(seed):
        gen = torch.Generator().manual_seed(100 * seed + rank)
        x = torch.randn(6, K, generator=gen)
        tw = torch.rand(6, TOP_K, generator=gen)
        ids = torch.stack([torch.randperm(E, generator=gen)[:TOP_K] for _ in range(6)]).to(torch.int32)
        return x, tw, ids

    def healthy(seed) -> float:
        x, tw, ids = inputs(seed)
        out = kern(x, local, tw, ids, expert_map=emap)
        ref = naive.moe(x, w1, w2, tw, ids)
        return float((out.double() - ref).norm() / ref.norm())

    def attempt(fn) -> dict:
        rec: dict = {}
        try:
            fn()
            rec["raised"] = None
        except Exception as exc:  # the test asserts on the type and message
            rec["raised"], rec["message"] = type(exc).__name__, str(exc)
        try:
            rec["after_err"] = healthy(len(results))
        except Exception:
            rec["after_err"] = traceback.format_exc()
        return rec

    results: dict = {}
    x, tw, ids = inputs(0)
    results["full_weights"] = attempt(lambda: kern(x, ExpertWeights(w1, w2), tw, ids, expert_map=emap))

    def rewritten_map():
        stale = emap.clone()
        kern(x, local, tw, ids, expert_map=stale)  # checked and cached
        stale.copy_(stale.flip(0))  # another placement, same tensor
        kern(x, local, tw, ids, expert_map=stale)

    results["map_rewritten_in_place"] = attempt(rewritten_map)
    bad = (w1, w2) if rank == 1 else local
    results["tuple_weights_on_rank1"] = attempt(lambda: kern(x, bad, tw, ids, expert_map=emap))

    first, second = EPGroup.split_world(1), EPGroup.split_world(1)
    results["split_world_reuses_groups"] = {"same": first.group is second.group, "size": first.world_size}
    outsider = torch.distributed.new_group([0])  # collective: every rank calls it
    if rank == 1:
        results["non_member"] = attempt(lambda: EPGroup.from_group(outsider))
    import ep_launch

    ep_launch.finish_rank(out_dir, rank, results, ep)


def results(tmp_path_factory) -> dict:
    import ep_launch

    return ep_launch.script_results(os.path.abspath(__file__), tmp_path_factory)


EXPECTED = {
    "full_weights": {r: ("ValueError", "weights hold 8 local experts (w1.shape[0])") for r in (0, 1)},
    "map_rewritten_in_place": {r: ("ValueError", "expert_map does not match ParallelConfig") for r in (0, 1)},
    "tuple_weights_on_rank1": {0: ("ValueError", "another rank of the expert-parallel group rejected"),
                               1: ("TypeError", "weights must be a moe_plugin ExpertWeights, got tuple")},
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_call_fails_every_rank_and_keeps_the_group_in_step(case, tmp_path_factory):
    res = results(tmp_path_factory)
    for rank in (0, 1):
        rec = res[rank][case]
        kind, needle = EXPECTED[case][rank]
        assert rec["raised"] == kind, (rank, rec)
        assert needle in rec["message"], (rank, rec["message"])
        # a healthy call right after gives the reference answer: no rank fell out of step
        assert isinstance(rec["after_err"], float) and rec["after_err"] < 1e-5, (rank, rec["after_err"])


def test_split_world_reuses_its_groups_and_non_members_are_named(tmp_path_factory):
    res = results(tmp_path_factory)
    for rank in (0, 1):
        assert res[rank]["split_world_reuses_groups"] == {"same": True, "size": 1}
    rec = res[1]["non_member"]
    assert rec["raised"] == "ValueError" and "not a member of the given process group" in rec["message"]


if __name__ == "__main__":
    _rank_main(sys.argv[1])
