"""DeepEP high-throughput and low-latency prepare/finalize on real GPUs, against the single-process
reference (bf16 and FP8 dispatch, skewed routing, a rank with no tokens, chunking, round-robin placement).

Launches ``deepep_worker.py`` under torchrun on every visible GPU (2, 4 or 8). Skipped unless at least two
GPUs and DeepSeek's deep_ep are present. Run: ``pytest -m multigpu tests/deep/test_deepep_multigpu.py``.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.multigpu, pytest.mark.gpu]

HERE = os.path.dirname(os.path.abspath(__file__))


def _status() -> str:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return "needs >= 2 CUDA GPUs"
    try:
        from moe_plugin.prepare_finalize.deepep_common import import_deep_ep

        import_deep_ep()
    except Exception as exc:
        return f"deep_ep unavailable: {exc}"
    return ""


_STATUS = _status()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if _STATUS:
        pytest.skip(_STATUS)
    world = min(torch.cuda.device_count(), 8)
    world = max(w for w in (2, 4, 8) if w <= world)
    out = tmp_path_factory.mktemp("deepep")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           os.path.join(HERE, "deepep_worker.py"), "--out", str(out)]
    # DeepEP kernels spin rather than time out if a peer is lost: bound the whole run
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    except subprocess.TimeoutExpired as exc:
        tail = ((exc.stdout or b"") + (exc.stderr or b""))[-8000:]
        pytest.fail(f"torchrun did not finish within 420 s:\n{tail.decode(errors='replace') if isinstance(tail, bytes) else tail}")
    log = (proc.stdout + proc.stderr)[-8000:]
    found = {}
    for rank in range(world):
        path = out / f"rank{rank}.json"
        if not path.exists():
            pytest.fail(f"rank {rank} wrote no results (exit {proc.returncode}):\n{log}")
        found[rank] = json.loads(path.read_text())
    return world, found, log


def test_every_case_passes_on_every_rank(results):
    world, found, log = results
    failures = []
    names = set()
    for rank, res in sorted(found.items()):
        names |= set(res)
        for name, rec in sorted(res.items()):
            for problem in rec["problems"]:
                failures.append(f"rank {rank} {name}: {problem}")
    assert names, f"no case ran:\n{log}"
    for needle in ("ht-torch-bf16-uniform", "ht-torch-fp8-skewed", "ll-batched_torch-fp8-empty-rank", "ll-chunked"):
        assert needle in names, f"case {needle} did not run"
    assert not failures, "\n".join(failures)
    for rank, res in found.items():
        assert set(res) == names, f"rank {rank} ran a different set of cases"
