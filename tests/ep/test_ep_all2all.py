"""All-to-all expert parallelism over gloo at 2 and 4 CPU ranks, against the naive loop and the
single-process torch experts over the full weights.

Each world size is one launch of ``ep_worker.py`` running every case (one process-group setup); each case
is then asserted here on its own.
"""

import types

import pytest

import ep_launch
import ep_worker

CASES = list(ep_worker.cases(types.SimpleNamespace(world=2, rank=0, ep=None, device=None)))
_RESULTS: dict[int, dict] = {}


def results_for(world: int, tmp_path_factory) -> dict:
    if world not in _RESULTS:
        out = tmp_path_factory.mktemp(f"ep_world{world}")
        _RESULTS[world] = ep_launch.Launch(world, str(out), "--suite", "main").wait(timeout=240)
    return _RESULTS[world]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("world", [2, 4])
def test_ep_case(world, case, tmp_path_factory):
    ep_launch.check_case(results_for(world, tmp_path_factory), case)


def test_every_case_ran_on_every_rank(tmp_path_factory):
    for world in (2, 4):
        res = results_for(world, tmp_path_factory)
        assert sorted(res) == list(range(world))
        for rank, cases in res.items():
            assert set(cases) == set(CASES), (world, rank)
