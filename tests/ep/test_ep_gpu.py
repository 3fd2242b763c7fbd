"""The EP integration cases over NCCL: one GPU (a one-rank group, marker gpu) and every GPU of the host
under torchrun (marker multigpu, skipped below 2 GPUs)."""

import os
import subprocess
import sys
import types

import pytest
import torch

import ep_launch
import ep_worker

CASES = list(ep_worker.cases(types.SimpleNamespace(world=2, rank=0, ep=None, device=None)))
_RESULTS: dict = {}


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_ep_case_nccl_one_gpu(case, tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if "one" not in _RESULTS:
        out = tmp_path_factory.mktemp("ep_nccl1")
        _RESULTS["one"] = ep_launch.Launch(1, str(out), "--suite", "main", backend="nccl", device="cuda").wait(300)
    ep_launch.check_case(_RESULTS["one"], case)


@pytest.mark.multigpu
@pytest.mark.parametrize("case", CASES)
def test_ep_case_nccl_all_gpus_torchrun(case, tmp_path_factory):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        pytest.skip("needs >= 2 CUDA GPUs")
    if "all" not in _RESULTS:
        out = tmp_path_factory.mktemp("ep_nccl_all")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
               ep_launch.WORKER, "--suite", "main", "--out", str(out), "--backend", "nccl", "--device", "cuda"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        import json

        _RESULTS["all"] = {r: json.load(open(out / f"rank{r}.json")) for r in range(gpus)}
    ep_launch.check_case(_RESULTS["all"], case)
