"""The all-to-all dispatch synchronises the host with the GPU exactly once (the copy of the count tables),
and the combine not at all.

``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising CUDA call (``.item()``, ``.cpu()``,
a pageable host-to-device copy, ``nonzero``, CUDA ``bincount``...) emit a warning; a one-rank NCCL group
runs a warm-up step, then one counted step per backend and wire format. Run as a script (one rank) it
prints the counts and where each synchronisation came from; ``--device cpu`` runs the same steps over gloo
without counting (to check the script itself where there is no GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

FORMATS = ("std_plain", "std_fp8_block", "bat_plain", "bat_fp8_block")


def _count(fn):
    """Run ``fn``; return its result and the places of the synchronisations it caused."""
    if not torch.cuda.is_available():
        return fn(), []
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    places = [f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    return out, places


def _rank_main(device_kind: str) -> dict:
    from moe_plugin import MoEConfig, ParallelConfig, QuantConfig
    from moe_plugin.distributed import init_distributed
    from moe_plugin.modular import WeightAndReduceDelegate, WeightAndReduceNoOp
    from moe_plugin.prepare_finalize.all2all import AllToAllPrepareAndFinalize, BatchedAllToAllPrepareAndFinalize

    ep = init_distributed("nccl" if device_kind == "cuda" else "gloo", timeout=60.0)
    device = torch.device("cuda", torch.cuda.current_device()) if device_kind == "cuda" else torch.device("cpu")
    e, top_k, k, m = 16, 4, 256, 32
    report = {}
    for name in FORMATS:
        batched = name.startswith("bat")
        quant = QuantConfig.fp8_block() if name.endswith("fp8_block") else QuantConfig()
        cfg = MoEConfig(e, top_k, k, 128, dtype=torch.bfloat16, quant=quant,
                        parallel=ParallelConfig(ep.world_size, ep.rank), max_num_tokens=m)
        cls = BatchedAllToAllPrepareAndFinalize if batched else AllToAllPrepareAndFinalize
        pf = cls.from_config(cfg, ep.group)
        g = torch.Generator().manual_seed(ep.rank)
        x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
        ids = torch.rand(m, e, generator=g).topk(top_k, dim=1).indices.to(torch.int32).to(device)
        w = torch.rand(m, top_k, generator=g).to(device)
        kw = dict(num_experts=e, expert_map=None, apply_router_weight_on_input=False, a1_scale=None)
        wr = WeightAndReduceDelegate() if batched else WeightAndReduceNoOp()
        out = torch.empty_like(x)

        def step():
            prepared, prep_syncs = _count(lambda: pf.prepare(x, w, ids, **kw))
            rows = prepared.hidden_states.shape[:-1] if batched else prepared.hidden_states.shape[:1]
            fused = torch.zeros(*rows, k, dtype=torch.bfloat16, device=device)
            _, fin_syncs = _count(lambda: pf.finalize(out, fused, prepared, w, ids, apply_router_weight_on_input=False,
                                                      weight_and_reduce=wr))
            return prep_syncs, fin_syncs

        step()  # first call: device tables are uploaded once
        prep_syncs, fin_syncs = step()
        report[name] = {"prepare": prep_syncs, "finalize": fin_syncs}
    torch.distributed.destroy_process_group()
    return report


def _launch(device_kind: str, tmp_path) -> dict:
    import ep_launch

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(ep_launch.free_port()), "WORLD_SIZE": "1",
           "RANK": "0", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "syncs.json"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), device_kind, str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_script_runs_without_a_gpu(tmp_path):
    report = _launch("cpu", tmp_path)
    assert sorted(report) == sorted(FORMATS)


@pytest.mark.gpu
def test_dispatch_synchronises_once_and_combine_never(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    report = _launch("cuda", tmp_path)
    for name, rec in report.items():
        assert len(rec["prepare"]) == 1, (name, rec)
        assert rec["finalize"] == [], (name, rec)


if __name__ == "__main__":
    result = _rank_main(sys.argv[1])
    print(json.dumps(result, indent=1))
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
