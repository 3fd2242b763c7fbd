"""DeepGEMM experts on a GPU against the torch FP8 reference (and the Triton FP8 experts when present),
on the same quantized inputs. Skipped without CUDA or without DeepSeek's deep_gemm.

Run on the GPU machine: ``pytest -m gpu tests/deep/test_deep_gemm_gpu.py`` (third_party/gpu_deep_check.sh
builds DeepGEMM first).
"""

import pytest
import torch

from moe_plugin import ExpertWeights, ModularKernel, MoEConfig, ParallelConfig, QuantConfig
from moe_plugin.distributed import build_expert_map
from moe_plugin.experts.torch_ref import BatchedTorchExperts, TorchExperts
from moe_plugin.ops.quant import quantize_block_weight
from moe_plugin.prepare_finalize.local import BatchedLocalPrepareAndFinalize, LocalPrepareAndFinalize

pytestmark = pytest.mark.gpu


def _deep_gemm_status() -> str:
    if not torch.cuda.is_available():
        return "needs CUDA"
    try:
        from moe_plugin.experts.deep_gemm import deep_gemm_api

        deep_gemm_api()
    except Exception as exc:
        return f"deep_gemm unavailable: {exc}"
    major = torch.cuda.get_device_capability()[0]
    if major not in (9, 10):
        return f"DeepGEMM needs SM90/SM100, this GPU is SM{major}x"
    return ""


_STATUS = _deep_gemm_status()
needs_deep_gemm = pytest.mark.skipif(bool(_STATUS), reason=_STATUS or "ok")


def quant_for_device() -> QuantConfig:
    # SM100 DeepGEMM reads UE8M0 scales; SM90 takes fp32
    ue8m0 = torch.cuda.get_device_capability()[0] == 10
    return QuantConfig.fp8_block(scale_format="ue8m0" if ue8m0 else "fp32")


def make_weights(e, n, k, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w1, s1 = quantize_block_weight(torch.randn(e, 2 * n, k, device="cuda", generator=g) * 0.03)
    w2, s2 = quantize_block_weight(torch.randn(e, k, n, device="cuda", generator=g) * 0.03)
    return ExpertWeights(w1, w2, s1, s2)


def make_routing(m, e, k, seed, skew=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(m, e, device="cuda", generator=g)
    if skew:
        logits[:, : e // 2] -= 6.0  # half the experts get (almost) nothing
    w, ids = torch.topk(torch.softmax(logits, -1), k)
    return w.float(), ids.to(torch.int32)


def rel_err(got, ref):
    return ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-6)).item()


def triton_experts_class():
    try:
        from moe_plugin.experts.triton import TritonExperts
    except ImportError:
        return None
    return TritonExperts


@needs_deep_gemm
@pytest.mark.parametrize(
    "m,e,k,hidden,inter,skew",
    # few distinct (K, N): each is a DeepGEMM JIT compilation
    [(1, 8, 2, 1024, 512, False), (64, 8, 4, 1024, 512, True), (300, 16, 8, 2048, 768, False), (2048, 8, 2, 1024, 512, True)],
)
def test_deep_gemm_experts_match_reference(m, e, k, hidden, inter, skew):
    from moe_plugin.experts.deep_gemm import DeepGemmExperts

    quant = quant_for_device()
    cfg = MoEConfig(e, k, hidden, inter, quant=quant)
    weights = make_weights(e, inter, hidden, seed=m)
    x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16)
    w, ids = make_routing(m, e, k, seed=m, skew=skew)
    experts = DeepGemmExperts(cfg)
    got = ModularKernel(LocalPrepareAndFinalize(quant), experts)(x, weights, w, ids)
    # DeepGemmExperts may re-quantize weights in place (SM100): the reference sees the same tensors
    ref = ModularKernel(LocalPrepareAndFinalize(quant), TorchExperts(cfg))(x, weights, w, ids)
    assert torch.isfinite(got).all()
    assert rel_err(got, ref) < 0.02
    again = ModularKernel(LocalPrepareAndFinalize(quant), experts)(x, weights, w, ids)
    assert torch.equal(again, got) and len(experts.weight_cache) == 1  # weights prepared once
    tri = triton_experts_class()
    if tri is not None:
        out_t = ModularKernel(LocalPrepareAndFinalize(quant), tri(cfg))(x, weights, w, ids)
        assert rel_err(got, out_t) < 0.02


@needs_deep_gemm
def test_deep_gemm_experts_with_expert_map_skip_other_ranks():
    from moe_plugin.experts.deep_gemm import DeepGemmExperts

    quant = quant_for_device()
    e_global, k, hidden, inter = 32, 4, 1024, 512
    parallel = ParallelConfig(4, 2)
    cfg = MoEConfig(e_global, k, hidden, inter, quant=quant, parallel=parallel)
    weights = make_weights(8, inter, hidden, seed=11)
    emap = build_expert_map(e_global, parallel, "cuda")
    x = torch.randn(200, hidden, device="cuda", dtype=torch.bfloat16)
    w, ids = make_routing(200, e_global, k, seed=3)
    kw = dict(global_num_experts=e_global, expert_map=emap)
    got = ModularKernel(LocalPrepareAndFinalize(quant), DeepGemmExperts(cfg))(x, weights, w, ids, **kw)
    ref = ModularKernel(LocalPrepareAndFinalize(quant), TorchExperts(cfg))(x, weights, w, ids, **kw)
    assert rel_err(got, ref) < 0.02
    local = emap[ids.long()] >= 0
    assert (got[~local.any(1)] == 0).all()  # tokens with no local expert stay exactly zero


@needs_deep_gemm
def test_deep_gemm_experts_in_a_cuda_graph():
    from moe_plugin.experts.deep_gemm import DeepGemmExperts

    quant = quant_for_device()
    cfg = MoEConfig(8, 2, 1024, 512, quant=quant)
    weights = make_weights(8, 512, 1024, seed=5)
    kernel = ModularKernel(LocalPrepareAndFinalize(quant), DeepGemmExperts(cfg))
    x = torch.randn(96, 1024, device="cuda", dtype=torch.bfloat16)
    w, ids = make_routing(96, 8, 2, seed=5)
    eager = kernel(x, weights, w, ids)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernel(x, weights, w, ids, check_inputs=False)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    fresh = kernel(x, weights, w, ids)
    assert rel_err(captured, fresh) < 1e-3 and not torch.equal(captured, eager)


@needs_deep_gemm
@pytest.mark.parametrize("m,skew", [(1, False), (48, True), (256, False)])
def test_batched_deep_gemm_experts_match_reference(m, skew):
    from moe_plugin.experts.batched_deep_gemm import BatchedDeepGemmExperts

    quant = quant_for_device()
    e, k, hidden, inter, t = 8, 4, 1024, 512, 256
    cfg = MoEConfig(e, k, hidden, inter, quant=quant, max_num_tokens=t)
    weights = make_weights(e, inter, hidden, seed=m + 1)
    x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16)
    w, ids = make_routing(m, e, k, seed=m, skew=skew)
    got = ModularKernel(BatchedLocalPrepareAndFinalize(quant, t, e), BatchedDeepGemmExperts(cfg))(x, weights, w, ids)
    ref = ModularKernel(BatchedLocalPrepareAndFinalize(quant, t, e), BatchedTorchExperts(cfg))(x, weights, w, ids)
    assert torch.isfinite(got).all()
    assert rel_err(got, ref) < 0.02


@needs_deep_gemm
def test_batched_deep_gemm_apply_in_a_cuda_graph():
    from moe_plugin.experts.batched_deep_gemm import BatchedDeepGemmExperts
    from moe_plugin.modular import ExpertTokensMetadata
    from moe_plugin.ops.quant import per_token_group_quant_fp8

    quant = quant_for_device()
    e, t, hidden, inter = 4, 64, 1024, 512
    cfg = MoEConfig(e, 2, hidden, inter, quant=quant, max_num_tokens=t)
    weights = make_weights(e, inter, hidden, seed=2)
    experts = BatchedDeepGemmExperts(cfg)
    x = torch.randn(e * t, hidden, device="cuda", dtype=torch.bfloat16)
    q, s = per_token_group_quant_fp8(x, 128, use_ue8m0=quant.scale_format.value == "ue8m0")
    q, s = q.view(e, t, hidden), s.view(e, t, -1)
    counts = torch.tensor([0, 5, 64, 17], dtype=torch.int32, device="cuda")
    meta = ExpertTokensMetadata(counts)
    ids = torch.zeros(32, 2, dtype=torch.int32, device="cuda")
    ws13 = torch.empty(e, t, 2 * inter, device="cuda", dtype=torch.bfloat16)
    out = torch.zeros(e, t, hidden, device="cuda", dtype=torch.bfloat16)

    def run():
        experts.apply(out, q, weights, torch.ones(32, 2, device="cuda"), ids, activation="silu",
                      global_num_experts=e, expert_map=None, a1q_scale=s, workspace13=ws13,
                      workspace2=torch.empty(0, device="cuda"), expert_tokens_meta=meta,
                      apply_router_weight_on_input=False)

    run()
    torch.cuda.synchronize()
    eager = out.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for i, c in enumerate(counts.tolist()):
        assert torch.equal(out[i, :c], eager[i, :c])
    ref = torch.zeros_like(out)
    BatchedTorchExperts(cfg).apply(ref, q, weights, None, ids, activation="silu", global_num_experts=e,
                                   expert_map=None, a1q_scale=s, workspace13=None, workspace2=None,
                                   expert_tokens_meta=ExpertTokensMetadata(counts, counts.cpu()),
                                   apply_router_weight_on_input=False)
    for i, c in enumerate(counts.tolist()):
        if c:
            assert rel_err(out[i, :c], ref[i, :c]) < 0.02
