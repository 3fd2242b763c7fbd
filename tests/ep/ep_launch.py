"""Start the ranks of ``ep_worker.py`` as plain subprocesses on a free port and collect their JSON results.

Plain subprocesses (not torchrun) keep a launch to one interpreter start per rank; the worker joins the
group through ``init_distributed`` from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "ep_worker.py")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """The ranks of one worker run; ``wait`` returns ``{rank: results}``."""

    def __init__(self, world: int, out_dir: str, *args: str, backend: str = "gloo", device: str = "cpu",
                 ranks_to_wait: tuple[int, ...] | None = None):
        self.out_dir = out_dir
        self.world = world
        self.ranks_to_wait = tuple(range(world)) if ranks_to_wait is None else ranks_to_wait
        env = dict(os.environ)
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.procs: list[subprocess.Popen] = []
        for rank in range(world):
            # The child keeps its own descriptor; ours is closed once it is started.
            with open(self._log_path(rank), "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, WORKER, "--out", out_dir, "--backend", backend, "--device", device, *args],
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT,
                ))

    def _log_path(self, rank: int) -> str:
        return os.path.join(self.out_dir, f"rank{rank}.log")

    def wait(self, timeout: float) -> dict[int, dict]:
        """Wait for the ranks in ``ranks_to_wait``, then kill every rank still running (ours only)."""
        deadline = time.monotonic() + timeout
        try:
            for rank in self.ranks_to_wait:
                remaining = max(deadline - time.monotonic(), 0.1)
                try:
                    self.procs[rank].wait(remaining)
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"rank {rank} did not finish within {timeout}s:\n{self.log(rank)}") from None
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        results = {}
        for rank in self.ranks_to_wait:
            path = os.path.join(self.out_dir, f"rank{rank}.json")
            if not os.path.exists(path):
                raise AssertionError(
                    f"rank {rank} exited with {self.procs[rank].returncode} and no results:\n{self.log(rank)}"
                )
            with open(path) as f:
                results[rank] = json.load(f)
        return results

    def log(self, rank: int) -> str:
        with open(self._log_path(rank)) as f:
            return f.read()[-6000:]


def check_case(results: dict[int, dict], case: str) -> None:
    """Assert one case passed on every rank: no problems, errors within their tolerances."""
    failures = []
    for rank, res in sorted(results.items()):
        rec = res.get(case)
        if rec is None:
            failures.append(f"rank {rank}: case did not run")
            continue
        for problem in rec.get("problems", []):
            failures.append(f"rank {rank}: {problem}")
        for ref in ("naive", "torch"):
            if f"err_{ref}" in rec and not rec[f"err_{ref}"] <= rec[f"tol_{ref}"]:
                failures.append(f"rank {rank}: error vs {ref} reference {rec[f'err_{ref}']:.3g} > {rec[f'tol_{ref}']:.3g}")
    assert not failures, f"{case}:\n" + "\n".join(failures)


def run_script_ranks(script: str, out_dir: str, world: int = 2, timeout: float = 120.0) -> dict[int, dict]:
    """Run ``script out_dir`` as ``world`` gloo ranks (each writes ``rank{r}.json`` under ``out_dir``) and
    return ``{rank: results}``; a rank that hangs or writes nothing fails the calling test with its log."""
    import pytest

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in range(world):
        with open(os.path.join(out_dir, f"rank{rank}.log"), "w") as log:
            procs.append(subprocess.Popen([sys.executable, script, out_dir],
                                          env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                          stdout=log, stderr=subprocess.STDOUT))
    try:
        for rank, proc in enumerate(procs):
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} hung (a rank left waiting in a collective?)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = {}
    for rank in range(world):
        path = os.path.join(out_dir, f"rank{rank}.json")
        if not os.path.exists(path):
            with open(os.path.join(out_dir, f"rank{rank}.log")) as f:
                pytest.fail(f"rank {rank} wrote no results:\n{f.read()[-4000:]}")
        with open(path) as f:
            results[rank] = json.load(f)
    return results


_SCRIPT_RESULTS: dict[str, dict[int, dict]] = {}


def script_results(script: str, tmp_path_factory, world: int = 2) -> dict[int, dict]:
    """``run_script_ranks`` once per test module (its tests share the one multi-rank run)."""
    if script not in _SCRIPT_RESULTS:
        tag = os.path.splitext(os.path.basename(script))[0]
        _SCRIPT_RESULTS[script] = run_script_ranks(script, str(tmp_path_factory.mktemp(tag)), world)
    return _SCRIPT_RESULTS[script]


def finish_rank(out_dir: str, rank: int, results: dict, ep) -> None:
    """A rank script's last step: its results as ``rank{r}.json``, then leave the group together."""
    import torch.distributed

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    ep.barrier(30.0)
    torch.distributed.destroy_process_group()
