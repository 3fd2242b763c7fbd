"""DeepGEMM experts without DeepGEMM: the contiguous layout, weight preparation, expected_m, and whole
experts calls on CPU with only the grouped GEMM emulated in torch (tests/deep/dg_emulation.py).

The emulation implements DeepGEMM's documented contract (contiguous: rows grouped by ``m_indices``, -1 =
skip; masked: the first ``masked_m[e]`` rows of each group), so these tests check everything around the
library call: permutation, padding, scale layouts, activation + re-quantization, unpermute, workspaces.
"""

import pytest
import torch

import naive
from dg_emulation import EmulatedBatchedDeepGemmExperts, EmulatedDeepGemmExperts
from moe_plugin import ExpertWeights, ModularKernel, MoEConfig, ParallelConfig, QuantConfig
from moe_plugin.distributed import build_expert_map
from moe_plugin.experts.batched_deep_gemm import estimate_expected_m
from moe_plugin.experts.deep_gemm import (
    DeepGemmExperts,
    PreparedWeightCache,
    check_fp8_block_weights,
    is_power_of_two,
    local_counts,
    local_expert_ids_of_slots,
    mn_major_scales,
    prepare_deep_gemm_weights,
    requant_block_weight_ue8m0,
    tma_aligned_size,
)
from moe_plugin.experts.torch_ref import BatchedTorchExperts, TorchExperts
from moe_plugin.modular import ExpertTokensMetadata
from moe_plugin.ops.permute import ep_scatter
from moe_plugin.ops.quant import dequant_block_weight, quantize_block_weight
from moe_plugin.prepare_finalize.local import BatchedLocalPrepareAndFinalize, LocalPrepareAndFinalize

FP8 = torch.float8_e4m3fn


# ---- the contiguous layout as DeepGemmExperts builds it (ops.permute.ep_scatter + DeepGEMM's contract) ----------


def test_rows_exact_from_host_counts_worst_case_otherwise():
    ids = torch.tensor([[0, 2], [2, 2], [0, -1]])
    counts = torch.tensor([2, 0, 3], dtype=torch.int32)
    assert DeepGemmExperts._rows(ids, None, 3, 128, ExpertTokensMetadata(counts, counts)) == 256
    # eager CPU: the counts are fetched (2 + 0 + 3 slots -> two padded runs)
    assert DeepGemmExperts._rows(ids, None, 3, 128, None) == 256
    # the fused path does not fetch them: worst case, round_up(6 + 3 * 127, 128)
    assert DeepGemmExperts._rows(ids, None, 3, 128, None, fetch_counts=False) == 512
    # through an expert map: global 5 -> local 0, global 1 -> elsewhere
    emap = torch.tensor([-1, -1, 1, -1, -1, 0], dtype=torch.int32)
    assert DeepGemmExperts._rows(torch.tensor([[5, 1], [2, 5]]), emap, 3, 128, None) == 256
    # nothing local: still one (skipped) block, so every view stays non-empty
    assert DeepGemmExperts._rows(torch.full((4, 2), -1), None, 3, 128, None) == 128
    assert local_counts(ids, 3).tolist() == [2, 0, 3]


def naive_contiguous(local_ids, num_local, alignment):
    """Plain loops: expert runs in order, each padded to ``alignment``, slots ascending inside a run."""
    flat = local_ids.reshape(-1).tolist()
    rows, owner = {}, []
    for e in range(num_local):
        mine = [s for s, x in enumerate(flat) if x == e]
        for i, s in enumerate(mine):
            rows[s] = len(owner) + i
        owner += [e] * (len(mine) + (-len(mine)) % alignment)
    return owner, [rows.get(s, -1) for s in range(len(flat))]


@pytest.mark.parametrize("seed", [0, 1])
def test_scatter_as_deep_gemm_experts_calls_it_meets_deep_gemms_contract(seed):
    g = torch.Generator().manual_seed(seed)
    m, k, e, hidden, align = 37, 4, 6, 256, 16
    ids = torch.randint(-1, e, (m, k), generator=g).to(torch.int32)
    ids[5] = -1
    local = local_expert_ids_of_slots(ids, None)
    m_sum = DeepGemmExperts._rows(ids, None, e, align, None)
    q = torch.randn(m, hidden, generator=g).to(FP8)
    s = torch.rand(m, 2, generator=g) + 0.5
    scales = mn_major_scales(m_sum, 2, torch.device("cpu"))
    out = torch.empty(m_sum, hidden, dtype=FP8)
    res = ep_scatter(q, s, ids, e, None, alignment=align, m_sum=m_sum, fill_invalid_expert=-1, out=out,
                     out_scales=scales)
    owner, dest = naive_contiguous(local, e, align)
    assert m_sum == len(owner)  # exact rows: no trailing block at all
    assert res.m_indices.tolist() == owner
    assert res.inv_perm.reshape(-1).tolist() == dest
    # scales landed in the column-major TMA layout DeepGEMM reads, next to their rows
    assert res.scales.stride() == (1, tma_aligned_size(m_sum))
    for slot, r in enumerate(dest):
        if r >= 0:
            assert torch.equal(res.hidden_states[r].view(torch.uint8), q[slot // k].view(torch.uint8))
            assert torch.equal(res.scales[r], s[slot // k])
    # DeepGEMM reads a block's expert from its first row: one expert per aligned block
    for block in res.m_indices.view(-1, align).tolist():
        assert len(set(block)) == 1


def test_scatter_worst_case_rows_end_in_skipped_blocks():
    ids = torch.tensor([[0, 1], [1, 1]], dtype=torch.int32)
    m_sum = 6 * 128  # a worst-case sized layout (graph capture)
    res = ep_scatter(torch.zeros(2, 128, dtype=torch.bfloat16), None, ids, 3, None, alignment=128, m_sum=m_sum,
                     fill_invalid_expert=-1)
    assert res.m_indices[:256].tolist() == [0] * 128 + [1] * 128
    assert (res.m_indices[256:] == -1).all()


def test_local_ids_through_expert_map():
    parallel = ParallelConfig(2, 1)
    emap = build_expert_map(8, parallel)
    ids = torch.tensor([[0, 4], [7, 3], [5, 5]], dtype=torch.int32)
    assert local_expert_ids_of_slots(ids, emap).tolist() == [[-1, 0], [3, -1], [1, 1]]
    assert local_expert_ids_of_slots(ids, None).tolist() == ids.tolist()


# ---- scale layouts and weights ---------------------------------------------------------------------------


def test_mn_major_scales_are_tma_aligned_column_major():
    s = mn_major_scales(130, 7, torch.device("cpu"))
    assert s.shape == (130, 7) and s.stride() == (1, 132)
    assert tma_aligned_size(130) == 132 and tma_aligned_size(128) == 128 and tma_aligned_size(5, 1) == 16
    b = mn_major_scales(10, 3, torch.device("cpu"), batch=4)
    assert b.shape == (4, 10, 3) and b.stride() == (36, 1, 12)


def test_requant_ue8m0_gives_power_of_two_scales_and_the_same_weight():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(256, 384, generator=g) * 0.02
    w[:128, :128] *= 50  # a block with a large scale
    q, s = quantize_block_weight(w)
    assert not is_power_of_two(s)
    q2, s2 = requant_block_weight_ue8m0(q, s)
    assert is_power_of_two(s2) and (s2 >= s).all() and (s2 < 2 * s).all()
    before, after = dequant_block_weight(q, s, (128, 128)), dequant_block_weight(q2, s2, (128, 128))
    # one lost mantissa bit at most: relative error of an e4m3 value is 2^-3, twice that after requant
    assert ((after - before).abs() <= before.abs() * 2**-3 + 1e-6).all()
    assert torch.isfinite(after).all()


def fp8_weights(e, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1, s1 = quantize_block_weight(torch.randn(e, 2 * n, k, generator=g) * 0.05)
    w2, s2 = quantize_block_weight(torch.randn(e, k, n, generator=g) * 0.05)
    return ExpertWeights(w1, w2, s1, s2)


def test_prepare_weights_sm100_requantizes_in_place_and_cache_tracks_versions():
    weights = fp8_weights(2, 128, 256)
    calls = []

    def prepare(w):
        calls.append(1)
        return prepare_deep_gemm_weights(w, 10, None)

    cache = PreparedWeightCache()
    first = cache.get(weights, prepare)
    assert is_power_of_two(weights.w1_scale) and is_power_of_two(weights.w2_scale)
    assert first.w1 is weights.w1 and first.arch_major == 10
    assert cache.get(weights, prepare) is first and len(calls) == 1  # in-place requant did not invalidate
    weights.w2_scale.mul_(2.0)  # a later in-place update of the weights re-prepares
    assert cache.get(weights, prepare) is not first and len(calls) == 2
    other = fp8_weights(2, 128, 256, seed=1)
    cache.get(other, prepare)
    assert len(cache) == 2 and len(calls) == 3


def test_prepare_weights_sm90_keeps_the_tensors():
    weights = fp8_weights(2, 128, 256)
    scale_before = weights.w1_scale.clone()
    prepared = prepare_deep_gemm_weights(weights, 9, None)
    assert prepared.w1 is weights.w1 and torch.equal(prepared.w1_scale, scale_before)
    with pytest.raises(ValueError, match="SM90 / SM100"):
        prepare_deep_gemm_weights(weights, 8, None)


def test_check_weights_errors_name_the_problem():
    weights = fp8_weights(2, 128, 256)
    with pytest.raises(TypeError, match="w1 must be float8_e4m3fn"):
        check_fp8_block_weights(ExpertWeights(weights.w1.float(), weights.w2, weights.w1_scale, weights.w2_scale))
    with pytest.raises(ValueError, match=r"w2_scale must be fp32 \(2, 2, 1\)"):
        check_fp8_block_weights(ExpertWeights(weights.w1, weights.w2, weights.w1_scale, weights.w2_scale[:, :1]))


def test_estimate_expected_m():
    # 64 tokens on each of 8 ranks, top-8 over 256 experts: 16 rows per expert on average
    assert estimate_expected_m(64, 8, 8, 256, 512) == 16
    assert estimate_expected_m(512, 8, 8, 256, 4096) == 128
    assert estimate_expected_m(1, 1, 1, 256, 64) == 16  # floor of 16
    assert estimate_expected_m(4096, 8, 8, 32, 256) == 256  # clamped to the buffer
    assert estimate_expected_m(100, 1, 3, 7, 1000) == 48  # 300 // 7 = 42 -> 48


def test_experts_reject_non_deepgemm_quant():
    with pytest.raises(ValueError, match="fp8_block"):
        DeepGemmExperts(MoEConfig(8, 2, 256, 128, quant=QuantConfig()))
    from moe_plugin.experts.batched_deep_gemm import BatchedDeepGemmExperts

    with pytest.raises(ValueError, match="SiLU only"):
        BatchedDeepGemmExperts(MoEConfig(8, 2, 256, 128, activation="gelu", quant=QuantConfig.fp8_block()))


# ---- whole calls with the GEMM emulated --------------------------------------------------------------------


def rel_err(got, ref):
    """Relative Frobenius error: robust to the odd FP8 level flipped by a different rounding order."""
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def routing(m, e, k, seed, skew=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, e, generator=g)
    if skew:
        logits[:, 0] += 4.0  # most tokens pick expert 0
    w, ids = torch.topk(torch.softmax(logits, -1), k)
    return w, ids.to(torch.int32)


@pytest.mark.parametrize("m,skew,ue8m0", [(1, False, False), (33, True, False), (20, False, True)])
def test_emulated_deep_gemm_experts_match_torch_reference(m, skew, ue8m0):
    e, k, hidden, inter = 6, 3, 256, 128
    quant = QuantConfig.fp8_block(scale_format="ue8m0" if ue8m0 else "fp32")
    cfg = MoEConfig(e, k, hidden, inter, quant=quant)
    weights = fp8_weights(e, inter, hidden, seed=m)
    x = torch.randn(m, hidden, generator=torch.Generator().manual_seed(m)).bfloat16()
    w, ids = routing(m, e, k, m, skew)
    got = ModularKernel(LocalPrepareAndFinalize(quant), EmulatedDeepGemmExperts(cfg))(x, weights, w, ids)
    ref = ModularKernel(LocalPrepareAndFinalize(quant), TorchExperts(cfg))(x, weights, w, ids)
    assert rel_err(got, ref) < 0.01
    if m == 1:  # and against the independent float64 loop
        nv = naive.moe(x, weights.w1, weights.w2, w, ids, w1_scale=weights.w1_scale, w2_scale=weights.w2_scale,
                       block=(128, 128))
        assert (got.double() - nv).abs().max() <= 0.03 * nv.abs().max()


def test_emulated_deep_gemm_experts_with_expert_map_and_foreign_ids():
    e_global, k, hidden, inter = 8, 2, 256, 128
    parallel = ParallelConfig(2, 1)
    quant = QuantConfig.fp8_block()
    cfg = MoEConfig(e_global, k, hidden, inter, quant=quant, parallel=parallel)
    weights = fp8_weights(4, inter, hidden, seed=5)
    emap = build_expert_map(e_global, parallel)
    x = torch.randn(10, hidden).bfloat16()
    w, ids = routing(10, e_global, k, 7)
    experts = EmulatedDeepGemmExperts(cfg)
    got = ModularKernel(LocalPrepareAndFinalize(quant), experts)(x, weights, w, ids, global_num_experts=e_global,
                                                                 expert_map=emap)
    ref = ModularKernel(LocalPrepareAndFinalize(quant), TorchExperts(cfg))(x, weights, w, ids,
                                                                          global_num_experts=e_global, expert_map=emap)
    assert rel_err(got, ref) < 0.01
    assert len(experts.weight_cache) == 1  # prepared once for all calls
    # a token whose experts all live on the other rank gets exactly zero
    ids2 = torch.tensor([[0, 1]] * 3, dtype=torch.int32)
    out = ModularKernel(LocalPrepareAndFinalize(quant), experts)(x[:3], weights, w[:3], ids2,
                                                                 global_num_experts=e_global, expert_map=emap)
    assert (out == 0).all()


def test_ep_shard_without_host_counts_sizes_the_layout_from_the_real_rows():
    # Worst case on a shard would size for every slot of every rank; eager calls read the counts instead.
    e_global, k, hidden, inter, m = 16, 4, 256, 128, 256
    parallel = ParallelConfig(4, 0)
    quant = QuantConfig.fp8_block()
    cfg = MoEConfig(e_global, k, hidden, inter, quant=quant, parallel=parallel)
    weights = fp8_weights(4, inter, hidden, seed=3)
    emap = build_expert_map(e_global, parallel)
    x = torch.randn(m, hidden).bfloat16()
    w, ids = routing(m, e_global, k, 11)
    rows_seen = []

    class Spy(EmulatedDeepGemmExperts):
        def _gemm(self, a, a_scale, w_, w_scale, out, m_indices):
            rows_seen.append(a.shape[0])
            super()._gemm(a, a_scale, w_, w_scale, out, m_indices)

    got = ModularKernel(LocalPrepareAndFinalize(quant), Spy(cfg))(x, weights, w, ids, global_num_experts=e_global,
                                                                  expert_map=emap)
    local = emap.long()[ids.long()]
    counts = torch.bincount(local[local >= 0], minlength=4)
    exact = int(((counts + 127) // 128 * 128).sum().clamp_min(128))
    worst = DeepGemmExperts._rows(ids, emap, 4, 128, None, fetch_counts=False)
    assert rows_seen == [exact, exact] and exact < worst
    ref = ModularKernel(LocalPrepareAndFinalize(quant), TorchExperts(cfg))(x, weights, w, ids,
                                                                          global_num_experts=e_global, expert_map=emap)
    assert rel_err(got, ref) < 0.01


def test_emulated_batched_deep_gemm_experts_match_reference():
    e, k, hidden, inter, t = 4, 2, 256, 128, 16
    quant = QuantConfig.fp8_block()
    cfg = MoEConfig(e, k, hidden, inter, quant=quant, max_num_tokens=t)
    weights = fp8_weights(e, inter, hidden, seed=9)
    x = torch.randn(12, hidden, generator=torch.Generator().manual_seed(1)).bfloat16()
    w, ids = routing(12, e, k, 2, skew=True)
    pf = BatchedLocalPrepareAndFinalize(quant, t, e)
    experts = EmulatedBatchedDeepGemmExperts(cfg)
    got = ModularKernel(pf, experts)(x, weights, w, ids)
    ref = ModularKernel(BatchedLocalPrepareAndFinalize(quant, t, e), BatchedTorchExperts(cfg))(x, weights, w, ids)
    # the fused masked SiLU-quant keeps the activation in fp32; the reference rounds it to bf16 first
    assert rel_err(got, ref) < 0.02
    assert experts.expected_ms == [16, 16]  # 12 tokens * 2 / 4 experts = 6 -> 16, for both GEMMs


def test_emulated_deep_gemm_experts_with_router_weight_on_input():
    e, hidden, inter = 4, 256, 128
    quant = QuantConfig.fp8_block()
    cfg = MoEConfig(e, 1, hidden, inter, quant=quant)
    weights = fp8_weights(e, inter, hidden, seed=12)
    x = torch.randn(9, hidden, generator=torch.Generator().manual_seed(3)).bfloat16()
    w, ids = routing(9, e, 1, 4)
    kw = dict(apply_router_weight_on_input=True)
    got = ModularKernel(LocalPrepareAndFinalize(quant), EmulatedDeepGemmExperts(cfg))(x, weights, w, ids, **kw)
    ref = ModularKernel(LocalPrepareAndFinalize(quant), TorchExperts(cfg))(x, weights, w, ids, **kw)
    assert rel_err(got, ref) < 0.01
    plain = ModularKernel(LocalPrepareAndFinalize(quant), TorchExperts(cfg))(x, weights, w, ids)
    assert rel_err(got, plain) > 0.05  # the weight was applied once, on the input, not twice or never


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu2"])
def test_emulated_fused_and_two_step_paths_agree(activation, monkeypatch):
    """The fused activation-quant (silu, gelu) gives the two-step path's bits, worst-case rows and all; relu2
    always runs two-step. Both against the torch reference experts."""
    e, k, hidden, inter, m = 5, 2, 256, 128, 17
    quant = QuantConfig.fp8_block()
    cfg = MoEConfig(e, k, hidden, inter, quant=quant, activation=activation)
    g = torch.Generator().manual_seed(21)
    w1_rows = 2 * inter if activation != "relu2" else inter
    w1, s1 = quantize_block_weight(torch.randn(e, w1_rows, hidden, generator=g) * 0.05)
    w2, s2 = quantize_block_weight(torch.randn(e, hidden, inter, generator=g) * 0.05)
    weights = ExpertWeights(w1, w2, s1, s2)
    x = torch.randn(m, hidden, generator=g).bfloat16()
    w, ids = routing(m, e, k, 5)
    calls = []
    import moe_plugin.experts.deep_gemm as dgm

    real = dgm.gated_act_fp8_quant
    monkeypatch.setattr(dgm, "gated_act_fp8_quant", lambda *a, **kw: calls.append(kw["m_indices"]) or real(*a, **kw))
    fused = EmulatedDeepGemmExperts(cfg)
    two_step = EmulatedDeepGemmExperts(cfg)
    two_step.fuse_activation_quant = False
    got = ModularKernel(LocalPrepareAndFinalize(quant), fused)(x, weights, w, ids)
    assert len(calls) == (0 if activation == "relu2" else 1)
    if calls:  # worst-case rows, round_up(34 + 5 * 127, 128), with no count fetch; the unused tail is -1
        assert calls[0].numel() == 768 and (calls[0][-128:] == -1).all()
    base = ModularKernel(LocalPrepareAndFinalize(quant), two_step)(x, weights, w, ids)
    assert torch.equal(got, base)
    ref = ModularKernel(LocalPrepareAndFinalize(quant), TorchExperts(cfg))(x, weights, w, ids)
    assert rel_err(got, ref) < 0.01


def test_bench_summary_crossover_and_targets():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "bench_deepgemm.py")
    spec = importlib.util.spec_from_file_location("bench_deepgemm", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = []
    for m, dg, tri in [(64, 50.0, 30.0), (256, 40.0, 45.0), (1024, 90.0, 80.0), (4096, 100.0, 200.0), (16384, 300.0, 900.0)]:
        rows.append(dict(shape="qwen3-30b-a3b", M=m, backend="deep_gemm", us=dg))
        rows.append(dict(shape="qwen3-30b-a3b", M=m, backend="triton_fp8", us=tri))
    rows.append(dict(shape="dsv3-ep8", M=1024, backend="deep_gemm", us=650.0))
    rows.append(dict(shape="dsv3-ep8", M=1024, backend="deep_gemm_gemm_only", us=600.0))
    rows.append(dict(shape="dsv3-ep8", M=64, backend="batched_deep_gemm", us=540.0))
    out = bench.summarize(rows)
    # DeepGEMM wins at 256 but loses again at 1024: the crossover is where it keeps winning
    assert out["crossover"]["qwen3-30b-a3b"] == 4096
    target = next(t for t in out["targets"] if t["M"] == 1024 and "reference_gemm_only_us" in t)
    assert target["whole_within_1_15x_of_reference"] is True and target["whole_within_1_15x_of_measured_gemm_only"] is True
    masked = next(t for t in out["targets"] if t["M"] == 64)
    assert masked["within_reference"] is False


@pytest.mark.parametrize("ue8m0,expert_map", [(False, False), (True, True)])
def test_input_quantized_in_the_scatter_gives_the_prepare_quantized_bits(ue8m0, expert_map):
    """Behind a local prepare the experts get bf16 tokens and quantize them inside ep_scatter; the result
    must be the bits of the path where prepare quantizes (the communicating backends' path)."""
    e_global, k, hidden, inter, m = 8, 3, 256, 128, 21
    parallel = ParallelConfig(2, 1) if expert_map else ParallelConfig()
    quant = QuantConfig.fp8_block(scale_format="ue8m0" if ue8m0 else "fp32")
    cfg = MoEConfig(e_global, k, hidden, inter, quant=quant, parallel=parallel)
    weights = fp8_weights(e_global // 2 if expert_map else e_global, inter, hidden, seed=8)
    x = torch.randn(m, hidden, generator=torch.Generator().manual_seed(8)).bfloat16()
    w, ids = routing(m, e_global, k, 8)
    kw = dict(global_num_experts=e_global, expert_map=build_expert_map(e_global, parallel, "cpu") if expert_map else None)

    deferred_pf = LocalPrepareAndFinalize(quant)
    deferred = ModularKernel(deferred_pf, EmulatedDeepGemmExperts(cfg))
    assert deferred.quantize_in_experts
    prepared = deferred_pf.prepare(x, w, ids, num_experts=e_global, expert_map=None,
                                   apply_router_weight_on_input=False, a1_scale=None, leave_quant_to_experts=True)
    assert prepared.hidden_states.dtype == torch.bfloat16 and prepared.scale is None

    prequantized_experts = EmulatedDeepGemmExperts(cfg)
    prequantized_experts.quantizes_own_input = False
    prequantized = ModularKernel(LocalPrepareAndFinalize(quant), prequantized_experts)
    assert not prequantized.quantize_in_experts

    got = deferred(x, weights, w, ids, **kw)
    assert torch.equal(got, prequantized(x, weights, w, ids, **kw))
    ref = ModularKernel(LocalPrepareAndFinalize(quant), TorchExperts(cfg))(x, weights, w, ids, **kw)
    assert rel_err(got, ref) < 0.01


def test_only_deep_gemm_behind_a_local_prepare_leaves_the_quant_to_the_experts():
    from moe_plugin.experts.triton import TritonExperts
    from moe_plugin.prepare_finalize.local import BatchedLocalPrepareAndFinalize

    quant = QuantConfig.fp8_block()
    cfg = MoEConfig(8, 2, 256, 128, quant=quant)
    # One prepare instance shared by kernels whose experts differ: each kernel keeps its own decision.
    pf = LocalPrepareAndFinalize(quant)
    torch_kernel = ModularKernel(pf, TorchExperts(cfg))
    weights = fp8_weights(8, 128, 256, seed=2)
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(2)).bfloat16()
    w, ids = routing(6, 8, 2, 2)
    before = torch_kernel(x, weights, w, ids)
    deep_kernel = ModularKernel(pf, EmulatedDeepGemmExperts(cfg))
    assert deep_kernel.quantize_in_experts and not torch_kernel.quantize_in_experts
    assert torch.equal(torch_kernel(x, weights, w, ids), before)  # still handed FP8 tokens
    assert rel_err(deep_kernel(x, weights, w, ids), before) < 0.01
    assert not ModularKernel(pf, TritonExperts(cfg)).quantize_in_experts
    assert not BatchedLocalPrepareAndFinalize.can_leave_quant_to_experts
    unquantized = ModularKernel(LocalPrepareAndFinalize(QuantConfig()), TorchExperts(MoEConfig(8, 2, 256, 128)))
    assert not unquantized.quantize_in_experts
