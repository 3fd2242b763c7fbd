"""scripts/bench_ep.py on CPU ranks (gloo): it runs, writes its JSON, counts bytes from the routing, and
skips the points DeepEP low-latency cannot serve before touching deep_ep."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "bench_ep.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_ep_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchrun(args, tmp_path, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SCRIPT,
           "--backend", "gloo", "--out", str(tmp_path), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


@pytest.mark.parametrize("world,rank", [(2, 0), (2, 1), (4, 2)])
def test_routed_bytes_counts_token_rank_pairs_to_other_ranks(world, rank):
    bench = _load_script()
    experts, row = 16, 10
    ids = torch.stack([torch.randperm(experts)[:4] for _ in range(9)]).to(torch.int32)
    per_rank = experts // world
    naive = 0
    for token in ids.tolist():
        naive += len({e // per_rank for e in token} - {rank})
    assert bench.routed_bytes(ids, experts, world, rank, row) == naive * row


def test_sweep_on_gloo_writes_records_and_a_profile(tmp_path):
    out = _torchrun(["--tokens", "1,16", "--hidden", "256", "--experts", "8", "--top-k", "2", "--iters", "2",
                     "--warmup", "1", "--profile"], tmp_path)
    assert "all2all" in out
    data = json.loads((tmp_path / "bench_ep_gloo_w2.json").read_text())
    assert [r["tokens"] for r in data["records"]] == [1, 16]
    for r in data["records"]:
        assert r["pf"] == "all2all" and r["world"] == 2 and r["dispatch_ms"] > 0 and r["combine_ms"] > 0
        # bf16 rows of 256 columns: each rank sends whole rows, and combine sends the same rows back
        for mine in r["per_rank"]:
            assert mine["dispatch_bytes"] % 512 == 0 and mine["combine_bytes"] == mine["dispatch_bytes"]
        assert r["dispatch_bytes_per_rank"] == sum(m["dispatch_bytes"] for m in r["per_rank"]) / 2
    assert (tmp_path / "profile_sweep-h256-t16_rank0.txt").read_text().count("all_to_all") >= 1


def test_low_latency_points_it_cannot_serve_are_skipped_with_the_reason(tmp_path):
    out = _torchrun(["--pf", "deepep_ll", "--tokens", "600", "--hidden", "2048", "--experts", "8",
                     "--iters", "1"], tmp_path)
    assert "skipped: max_num_tokens=600 per rank exceeds 511" in out
    assert json.loads((tmp_path / "bench_ep_gloo_deepep_ll_w2.json").read_text())["records"] == []
