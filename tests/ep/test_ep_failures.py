"""A rank that dies or stalls makes the others fail with a clear error within the timeout, not hang.

Four scenarios at 2 gloo ranks, launched together (each leaves its process group unusable):
- ``stall_pg``: rank 1 stops answering; the process-group timeout given at init (3 s) ends rank 0's wait.
- ``stall_call``: the same with a long group timeout, ended by the backend's own ``timeout=`` (3 s).
- ``dead_rank``: rank 1 exits after one healthy step; rank 0's next step fails at once.
- ``stall_barrier``: ``EPGroup.barrier(timeout=3)`` (gloo monitored barrier) names the rank that did not
  arrive.
"""

import pytest

import ep_launch

TIMEOUT = 3.0
SLACK = 10.0
SCENARIOS = {
    "stall_pg": ["--timeout", str(TIMEOUT)],
    "stall_call": ["--timeout", "300", "--call-timeout", str(TIMEOUT)],
    "dead_rank": ["--timeout", "300", "--call-timeout", "60"],
    "stall_barrier": ["--timeout", "300", "--call-timeout", str(TIMEOUT)],
}
_RESULTS: dict = {}


def results(tmp_path_factory) -> dict:
    if not _RESULTS:
        launches = {
            name: ep_launch.Launch(2, str(tmp_path_factory.mktemp(name)), "--suite", name, *args, ranks_to_wait=(0,))
            for name, args in SCENARIOS.items()
        }
        for name, launch in launches.items():
            _RESULTS[name] = launch.wait(timeout=90)[0][name]
    return _RESULTS


@pytest.mark.parametrize("scenario", ["stall_pg", "stall_call"])
def test_stalled_rank_fails_the_others_after_the_timeout(scenario, tmp_path_factory):
    rec = results(tmp_path_factory)[scenario]
    assert not rec.get("problems"), rec
    assert TIMEOUT - 0.5 <= rec["elapsed"] <= TIMEOUT + SLACK, rec
    msg = rec["message"]
    assert "EP chunk-count agreement failed on EP rank 0/2 over gloo" in msg
    assert "exited, crashed or stalled" in msg
    if scenario == "stall_call":
        assert f"longer than {TIMEOUT:g}s" in msg


def test_dead_rank_fails_the_others_quickly(tmp_path_factory):
    rec = results(tmp_path_factory)["dead_rank"]
    assert not rec.get("problems"), rec
    assert rec["elapsed"] < SLACK, rec  # well before the 60 s call timeout: the peer's socket closed
    assert "EP rank 0/2" in rec["message"] and "exited, crashed or stalled" in rec["message"]


def test_monitored_barrier_names_the_missing_rank(tmp_path_factory):
    rec = results(tmp_path_factory)["stall_barrier"]
    assert not rec.get("problems"), rec
    assert rec["elapsed"] <= TIMEOUT + SLACK and "Ranks 1 failed to pass monitoredBarrier" in rec["message"], rec
    assert "EP health check failed" in rec["message"]
