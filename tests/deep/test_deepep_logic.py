"""The logic around DeepEP's calls, on tensors shaped as DeepEP documents its outputs (no DeepEP needed).

- high-throughput dispatch returns, per received token, rank-LOCAL expert ids with -1 for slots on other
  ranks, and weights zeroed on those slots; combine sums rows without weights;
- low-latency dispatch returns ``[E_local, T, K]`` FP8 with scales ``[E_local, T, K/128]`` fp32 (or packed
  UE8M0 int32 ``[E_local, T, K/512]``), column-major in the last two dimensions, plus counts per expert;
  its combine applies the weights.
"""

import pytest
import torch

from moe_plugin import ExpertPlacement, ModularKernel, MoEConfig, ParallelConfig, QuantConfig
from moe_plugin.distributed import build_expert_map, local_expert_ids
from moe_plugin.experts.torch_ref import BatchedTorchExperts, TorchExperts
from moe_plugin.modular import (
    PreparedTokens,
    WeightAndReduceContiguous,
    WeightAndReduceDelegate,
    WeightAndReduceNoOp,
)
from moe_plugin.ops.quant import per_token_group_quant_fp8, round_scale_ue8m0
from moe_plugin.prepare_finalize import deepep_common as dc
from moe_plugin.prepare_finalize.deepep_ht import DeepEPHTPrepareAndFinalize, reduce_before_combine
from moe_plugin.prepare_finalize.deepep_ll import DeepEPLLPrepareAndFinalize


def ht_received_ids(global_ids: torch.Tensor, rank: int, num_local: int, physical=None) -> torch.Tensor:
    """What DeepEP's intranode dispatch writes into recv_topk_idx on ``rank`` (its documented transform,
    applied to the rank-major ids it was given)."""
    ids = global_ids.long()
    if physical is not None:
        ids = torch.where(ids >= 0, physical[ids.clamp(min=0)], ids)
    lo, hi = rank * num_local, (rank + 1) * num_local
    return torch.where((ids >= lo) & (ids < hi), ids - lo, -1)


@pytest.mark.parametrize("placement", ["contiguous", "round_robin"])
def test_ht_received_local_ids_become_global_ids_that_expert_map_maps_back(placement):
    e, world, k = 16, 4, 6
    g = torch.Generator().manual_seed(0)
    global_ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(11)])
    global_ids[3, 2] = -1  # a slot routed nowhere
    for rank in range(world):
        parallel = ParallelConfig(world, rank, placement)
        physical = dc.physical_expert_ids(e, parallel)
        recv = ht_received_ids(global_ids, rank, e // world, physical)
        mine = torch.tensor(local_expert_ids(e, parallel))
        got = dc.local_to_global_ids(recv, mine)
        assert got.dtype == torch.int32
        emap = build_expert_map(e, parallel)
        owned = emap[global_ids.clamp(min=0)] >= 0
        want = torch.where((global_ids >= 0) & owned, global_ids, -1)
        assert torch.equal(got.long(), want)
        # the experts' view: expert_map turns them into the local id DeepEP numbered
        local_again = torch.where(got >= 0, emap[got.clamp(min=0).long()].long(), -1)
        assert torch.equal(local_again, recv)


def test_physical_ids_are_rank_major():
    parallel = ParallelConfig(4, 0, ExpertPlacement.ROUND_ROBIN)
    physical = dc.physical_expert_ids(12, parallel)
    owner = torch.arange(12) % 4
    local = torch.arange(12) // 4
    assert torch.equal(physical, owner * 3 + local)
    assert sorted(physical.tolist()) == list(range(12))
    assert dc.physical_expert_ids(12, ParallelConfig(4, 0)) is None


def test_to_deepep_ids_keeps_minus_one_and_makes_int64_contiguous():
    parallel = ParallelConfig(2, 0, ExpertPlacement.ROUND_ROBIN)
    physical = dc.physical_expert_ids(4, parallel)  # 0->0, 1->2, 2->1, 3->3
    ids = torch.tensor([[1, -1], [2, 3]], dtype=torch.int32).t()  # non-contiguous input
    out = dc.to_deepep_ids(ids, physical)
    assert out.dtype == torch.int64 and out.is_contiguous()
    assert out.tolist() == [[2, 1], [-1, 3]]
    assert dc.to_deepep_ids(ids, None).tolist() == [[1, 2], [-1, 3]]


def test_count_local_tokens_matches_bincount_and_ignores_minus_one():
    g = torch.Generator().manual_seed(1)
    recv = torch.randint(-1, 5, (40, 8), generator=g)
    got = dc.count_local_tokens(recv, 5)
    want = torch.bincount(recv[recv >= 0], minlength=5)
    assert got.dtype == torch.int32 and got.tolist() == want.tolist()
    assert dc.count_local_tokens(torch.full((3, 2), -1), 4).tolist() == [0, 0, 0, 0]


# ---- scales ----------------------------------------------------------------------------------------------


def test_ue8m0_pack_unpack_on_low_latency_shaped_scales():
    e_local, t, hidden = 3, 8, 2048
    x = torch.randn(e_local * t, hidden) * torch.logspace(-3, 3, e_local * t).unsqueeze(1)
    _, s = per_token_group_quant_fp8(x, 128, use_ue8m0=True)
    s = s.view(e_local, t, hidden // 128)
    packed = dc.pack_ue8m0(s)
    assert packed.dtype == torch.int32 and packed.shape == (e_local, t, hidden // 512)
    # byte i of word j is the exponent of group 4j+i
    exps = (s.view(torch.int32) >> 23) & 0xFF
    word = int(packed[1, 2, 0])
    assert [(word >> (8 * i)) & 0xFF for i in range(4)] == exps[1, 2, :4].tolist()
    # DeepEP hands them column-major ([E, T, G'] with strides (T*G', 1, T)); unpacking reads through strides
    col_major = dc.column_major_batched(packed)
    assert col_major.stride() == (t * hidden // 512, 1, t)
    assert torch.equal(dc.ll_scales_to_standard(col_major, hidden), s)
    fp32 = dc.column_major_batched(s)
    assert dc.ll_scales_to_standard(fp32, hidden) is fp32


def test_ue8m0_pack_rejects_scales_that_are_not_powers_of_two_and_pads():
    with pytest.raises(ValueError, match="power-of-two"):
        dc.pack_ue8m0(torch.tensor([0.3, 0.5, 1.0, 2.0]))
    with pytest.raises(ValueError, match="power-of-two"):
        dc.pack_ue8m0(torch.tensor([-0.5, 0.5, 1.0, 2.0]))
    s = round_scale_ue8m0(torch.tensor([[0.3, 3.0, 7.0]]))
    packed = dc.pack_ue8m0(s)
    assert packed.shape == (1, 1)
    assert torch.equal(dc.unpack_ue8m0(packed, 3), s)
    assert (int(packed[0, 0]) >> 24) & 0xFF == 127  # the padding group reads as 1.0
    with pytest.raises(ValueError, match="fewer than"):
        dc.unpack_ue8m0(packed, 5)


# ---- limits ----------------------------------------------------------------------------------------------


def ll_limits(**over):
    base = dict(hidden_size=7168, top_k=8, max_tokens_per_rank=128, world_size=8, num_experts=256,
                dtype=torch.bfloat16, quant=QuantConfig.fp8_block())
    base.update(over)
    return base


def test_low_latency_limits_each_named():
    assert dc.low_latency_problems(**ll_limits()) == []
    cases = {
        "hidden_size=7000": dict(hidden_size=7000),
        "top_k=12 exceeds": dict(top_k=12),
        "max_num_tokens=512 per rank exceeds 511": dict(max_tokens_per_rank=512),
        "multiple of 4": dict(max_tokens_per_rank=3, world_size=2),
        "not divisible by ep_size=3": dict(num_experts=256, world_size=3, max_tokens_per_rank=4),
        "bfloat16 activations only": dict(dtype=torch.float16),
        "per-token 1x128 groups only": dict(quant=QuantConfig.fp8_block(64)),
    }
    for needle, over in cases.items():
        problems = dc.low_latency_problems(**ll_limits(**over))
        assert any(needle in p for p in problems), (needle, problems)
    with pytest.raises(ValueError, match="hidden_size=1000.*top_k=20"):
        dc.check_low_latency(**ll_limits(hidden_size=1000, top_k=20))
    assert dc.low_latency_problems(**ll_limits(max_tokens_per_rank=511)) == []
    for hidden in dc.LL_HIDDEN_SIZES:
        assert dc.low_latency_problems(**ll_limits(hidden_size=hidden)) == []


def test_low_latency_token_limit_follows_the_queue_depth(monkeypatch):
    assert dc.ll_max_tokens_per_rank() == 511
    monkeypatch.setenv("NVSHMEM_QP_DEPTH", "2048")
    assert dc.ll_max_tokens_per_rank() == 1023
    assert dc.low_latency_problems(**ll_limits(max_tokens_per_rank=1000)) == []
    monkeypatch.setenv("NVSHMEM_QP_DEPTH", "lots")
    with pytest.raises(ValueError, match="NVSHMEM_QP_DEPTH"):
        dc.ll_max_tokens_per_rank()


def test_high_throughput_limits():
    ok = MoEConfig(64, 8, 4096, 1024, parallel=ParallelConfig(8, 0))
    assert dc.high_throughput_problems(ok) == []
    assert any("ep_size=6" in p for p in dc.high_throughput_problems(MoEConfig(60, 8, 4096, 1024, parallel=ParallelConfig(6, 0))))
    assert any("combines bfloat16" in p for p in dc.high_throughput_problems(MoEConfig(64, 8, 4096, 1024, dtype=torch.float16, parallel=ParallelConfig(8, 0))))
    assert any("16-byte" in p for p in dc.high_throughput_problems(MoEConfig(64, 8, 4100, 1024, parallel=ParallelConfig(8, 0))))


def test_ll_backend_validates_up_front_and_chunks_through_modular_kernel():
    cfg = MoEConfig(32, 4, 2048, 256, quant=QuantConfig.fp8_block(), parallel=ParallelConfig(2, 0), max_num_tokens=64)
    pf = DeepEPLLPrepareAndFinalize(cfg)
    assert pf.max_num_tokens_per_rank() == 64 and pf.num_dispatchers == 2
    kernel = ModularKernel(pf, BatchedTorchExperts(cfg))
    assert kernel.chunk_size == 64  # a 200-token batch runs as 4 dispatch/combine pairs
    assert DeepEPLLPrepareAndFinalize(cfg, max_num_tokens=32).max_num_tokens_per_rank() == 32
    with pytest.raises(ValueError, match="max_num_tokens=600 per rank exceeds 511"):
        DeepEPLLPrepareAndFinalize(cfg, max_num_tokens=600)
    with pytest.raises(ValueError, match="hidden_size=1000"):
        DeepEPLLPrepareAndFinalize(MoEConfig(32, 4, 1000, 256, parallel=ParallelConfig(2, 0)))
    with pytest.raises(ValueError, match="pack_ue8m0"):
        DeepEPLLPrepareAndFinalize(cfg, pack_ue8m0=True)
    x = torch.zeros(4, 2048, dtype=torch.bfloat16)
    ids = torch.zeros(4, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="CUDA tensors"):
        pf.prepare(x, torch.ones(4, 4), ids, num_experts=32, expert_map=None, apply_router_weight_on_input=False,
                   a1_scale=None)


def test_ll_finalize_insists_the_combine_applies_the_weights():
    cfg = MoEConfig(32, 4, 2048, 256, parallel=ParallelConfig(2, 0), max_num_tokens=64)
    pf = DeepEPLLPrepareAndFinalize(cfg)
    with pytest.raises(ValueError, match="applies the routing weights itself"):
        pf.finalize(torch.empty(2, 2048, dtype=torch.bfloat16), torch.empty(16, 128, 2048, dtype=torch.bfloat16),
                    None, torch.ones(2, 4), torch.zeros(2, 4, dtype=torch.int32),
                    apply_router_weight_on_input=False, weight_and_reduce=WeightAndReduceNoOp())


def test_ht_backend_construction_checks():
    cfg = MoEConfig(16, 2, 2048, 256, parallel=ParallelConfig(2, 0))
    pf = DeepEPHTPrepareAndFinalize(cfg)
    assert pf.max_num_tokens_per_rank() is None and pf.num_dispatchers == 2
    assert DeepEPHTPrepareAndFinalize(cfg, num_worst_tokens=512).max_num_tokens_per_rank() == 256
    with pytest.raises(ValueError, match="intranode only"):
        DeepEPHTPrepareAndFinalize(MoEConfig(32, 2, 2048, 256, parallel=ParallelConfig(16, 0)), num_worst_tokens=64)
    with pytest.raises(ValueError, match="ep_size=6"):
        DeepEPHTPrepareAndFinalize(MoEConfig(12, 2, 2048, 256, parallel=ParallelConfig(6, 0)))
    assert ModularKernel(pf, TorchExperts(cfg)).chunk_size == cfg.chunk_size


def test_deepep_needs_an_initialized_nccl_group_and_the_real_library():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a default process group is initialized in this process")
    with pytest.raises(dc.DeepEPUnavailableError, match="torch.distributed initialized"):
        dc.check_group(None, ParallelConfig(2, 0))
    import importlib.util

    if importlib.util.find_spec("deep_ep") is None:
        with pytest.raises(dc.DeepEPUnavailableError, match="PyPI package named deep-ep"):
            dc.import_deep_ep()


def test_gloo_group_is_rejected_with_the_backend_named():
    # a one-process gloo group in a subprocess, so this test process stays uninitialized
    import subprocess
    import sys

    code = (
        "import os, torch.distributed as dist\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='0')\n"
        "dist.init_process_group('gloo', rank=0, world_size=1, init_method='tcp://127.0.0.1:0')\n"
        "from moe_plugin.config import ParallelConfig\n"
        "from moe_plugin.prepare_finalize.deepep_common import check_group, DeepEPUnavailableError\n"
        "try:\n"
        "    check_group(None, ParallelConfig(1, 0))\n"
        "except DeepEPUnavailableError as e:\n"
        "    print('REJECTED', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "REJECTED" in out.stdout and "'gloo'" in out.stdout, out.stderr


# ---- finalize's local reduction before the unweighted combine ------------------------------------------------


def prepared_ht(m_recv=5, k=3, hidden=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, 4, (m_recv, k), generator=g).to(torch.int32)
    w = torch.rand(m_recv, k, generator=g) * (ids >= 0)  # DeepEP zeroes weights of slots elsewhere
    return PreparedTokens(hidden_states=torch.zeros(m_recv, hidden), scale=None, topk_ids=ids, topk_weights=w)


def test_reduce_before_combine_weights_per_slot_outputs():
    prepared = prepared_ht()
    m, k = prepared.topk_ids.shape
    per_slot = torch.randn(m, k, 8)
    per_slot[prepared.topk_ids < 0] = 0  # the contract: slots elsewhere hold zeros
    for strategy in (WeightAndReduceDelegate(), WeightAndReduceContiguous()):
        rows = reduce_before_combine(per_slot.view(m * k, 8), prepared, strategy, False)
        assert rows.dtype == torch.bfloat16 and rows.is_contiguous()
        for t in range(m):
            want = sum(float(prepared.topk_weights[t, j]) * per_slot[t, j] for j in range(k))
            assert torch.allclose(rows[t].float(), torch.as_tensor(want).float(), atol=2e-2, rtol=1e-2)
    rows = reduce_before_combine(per_slot.view(m * k, 8), prepared, WeightAndReduceDelegate(), True)
    assert torch.allclose(rows.float(), per_slot.sum(1), atol=2e-2, rtol=1e-2)


def test_reduce_before_combine_passes_reduced_rows_through():
    prepared = prepared_ht()
    reduced = torch.randn(5, 8, dtype=torch.bfloat16)
    assert torch.equal(reduce_before_combine(reduced, prepared, WeightAndReduceNoOp(), False), reduced)
    with pytest.raises(ValueError, match=r"\[M_recv=5, K=8\]"):
        reduce_before_combine(torch.randn(5, 3, 8), prepared, WeightAndReduceNoOp(), False)


def test_quantize_for_dispatch_per_scheme():
    x = torch.randn(6, 256, dtype=torch.bfloat16)
    q, s, done = dc.quantize_for_dispatch(x, QuantConfig.fp8_block(), None)
    assert done and q.dtype == torch.float8_e4m3fn and s.shape == (6, 2) and s.dtype == torch.float32
    q, s, done = dc.quantize_for_dispatch(x, QuantConfig("fp8_w8a8", per_act_token=True), None)
    assert done and s.shape == (6, 1)
    q, s, done = dc.quantize_for_dispatch(x, QuantConfig("fp8_w8a8"), None)
    assert not done and q is x and s is None  # per-tensor: quantized after the dispatch
    q, s, done = dc.quantize_for_dispatch(x, QuantConfig(), None)
    assert not done and q is x


@pytest.mark.parametrize("m", [0, 1, 5])
def test_quantize_for_dispatch_keeps_the_scale_width_for_any_token_count(m):
    # A rank with no tokens still dispatches: its [0, G] scales must agree with the other ranks' width.
    x = torch.randn(m, 384).to(torch.bfloat16)
    q, s, done = dc.quantize_for_dispatch(x, QuantConfig.fp8_block(), None)
    assert done and q.shape == (m, 384) and s.shape == (m, 3) and s.dtype == torch.float32
    q, s, done = dc.quantize_for_dispatch(x, QuantConfig("fp8_w8a8", per_act_token=True), None)
    assert done and s.shape == (m, 1)
    torch.testing.assert_close(s, x.float().abs().amax(dim=1, keepdim=True) / 448.0, rtol=1e-6, atol=0)
