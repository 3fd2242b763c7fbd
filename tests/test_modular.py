"""ModularKernel: pairing checks, chunking, workspaces, shared experts, the batched local path."""

import pytest
import torch

import naive
from moe_plugin import ExpertWeights, ModularKernel, MoEConfig, QuantConfig
from moe_plugin.experts.torch_ref import BatchedTorchExperts, TorchExperts
from moe_plugin.modular import PermuteExpertsUnpermute, WeightAndReduceContiguous, WorkspaceShapes
from moe_plugin.ops.quant import quantize_block_weight
from moe_plugin.prepare_finalize.local import BatchedLocalPrepareAndFinalize, LocalPrepareAndFinalize
from test_fused_experts import make_case, rel_err


def config(e=8, k=2, hidden=32, inter=16, **kw):
    return MoEConfig(e, k, hidden, inter, dtype=torch.float32, **kw)


def test_format_mismatch_rejected():
    cfg = config()
    with pytest.raises(ValueError, match="activation format mismatch"):
        ModularKernel(LocalPrepareAndFinalize(cfg.quant), BatchedTorchExperts(cfg))


def test_quant_mismatch_rejected():
    cfg = config(quant=QuantConfig.fp8_block())
    with pytest.raises(ValueError, match="quant scheme mismatch"):
        ModularKernel(LocalPrepareAndFinalize(QuantConfig()), TorchExperts(cfg))


def test_bad_halves_rejected():
    with pytest.raises(TypeError, match="prepare_finalize"):
        ModularKernel(object(), TorchExperts(config()))
    with pytest.raises(ValueError, match="chunk_size"):
        ModularKernel(LocalPrepareAndFinalize(QuantConfig()), TorchExperts(config()), chunk_size=0)


class PerSlotExperts(TorchExperts):
    """Leaves weighting and the k-reduction to finalize ([M, k, K] output), to exercise that strategy."""

    name = "per_slot_test"

    def workspace_shapes(self, num_tokens, n, k, top_k, *args):
        return WorkspaceShapes((num_tokens, top_k, n), (0,), (num_tokens, top_k, k))

    def weight_and_reduce(self):
        return WeightAndReduceContiguous()

    def apply(self, output, hidden_states, weights, topk_weights, topk_ids, **kw):
        m, top_k = topk_ids.shape
        for j in range(top_k):
            ones = torch.ones(m, 1)
            reduced = torch.empty(m, output.shape[-1])
            super().apply(reduced, hidden_states, weights, ones, topk_ids[:, j : j + 1], **kw)
            output[:, j] = reduced


@pytest.mark.parametrize("experts_cls", [TorchExperts, PerSlotExperts])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_equals_unchunked(experts_cls, chunk):
    cfg = config()
    x, w1, w2, w, ids = make_case(17, 8, 2, 32, 16, seed=5)
    weights = ExpertWeights(w1, w2)
    whole = ModularKernel(LocalPrepareAndFinalize(cfg.quant), experts_cls(cfg), chunk_size=1 << 20)(x, weights, w, ids)
    chunked = ModularKernel(LocalPrepareAndFinalize(cfg.quant), experts_cls(cfg), chunk_size=chunk)(x, weights, w, ids)
    # Identical up to the BLAS's M-dependent summation order (CPU GEMMs pick kernels by M).
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    assert rel_err(whole, naive.moe(x, w1, w2, w, ids)) < 1e-5


def test_workspace_reused_across_sizes():
    cfg = config()
    kernel = ModularKernel(LocalPrepareAndFinalize(cfg.quant), PerSlotExperts(cfg))
    x, w1, w2, w, ids = make_case(40, 8, 2, 32, 16, seed=1)
    weights = ExpertWeights(w1, w2)
    kernel(x, weights, w, ids)
    ptrs = kernel.workspaces.storage_ptrs()
    for m in (1, 7, 39):
        out = kernel(x[:m], weights, w[:m], ids[:m])
        assert rel_err(out, naive.moe(x[:m], w1, w2, w[:m], ids[:m])) < 1e-5
    assert kernel.workspaces.storage_ptrs() == ptrs  # smaller calls reuse the first call's buffers


def test_shared_experts_added_and_overlapped_once():
    cfg = config()
    calls = []
    shared = torch.nn.Linear(32, 32, bias=False)

    def shared_fn(t):
        calls.append(t.shape[0])
        return shared(t)

    kernel = ModularKernel(LocalPrepareAndFinalize(cfg.quant), TorchExperts(cfg), shared_experts=shared_fn, chunk_size=4)
    x, w1, w2, w, ids = make_case(10, 8, 2, 32, 16, seed=2)
    with torch.no_grad():
        out = kernel(x, ExpertWeights(w1, w2), w, ids)
        ref = naive.moe(x, w1, w2, w, ids) + shared(x).double()
    assert calls == [10]  # once over all tokens, not per chunk
    assert rel_err(out, ref) < 1e-5
    with torch.no_grad():
        other = torch.randn(10, 32)
        out2 = kernel(x, ExpertWeights(w1, w2), w, ids, shared_experts_input=other)
        assert rel_err(out2, naive.moe(x, w1, w2, w, ids) + shared(other).double()) < 1e-5
        with pytest.raises(ValueError, match=r"shared_experts_input must be \[M=10, K'\]"):
            kernel(x, ExpertWeights(w1, w2), w, ids, shared_experts_input=other[:1])


@pytest.mark.parametrize("quant", [QuantConfig(), QuantConfig.fp8_block()])
def test_batched_local_matches_standard(quant):
    hidden, inter = (256, 128) if quant.is_quantized else (32, 16)
    cfg = MoEConfig(6, 3, hidden, inter, dtype=torch.float32, quant=quant, max_num_tokens=8)
    x, w1, w2, w, ids = make_case(19, 6, 3, hidden, inter, seed=9)
    s1 = s2 = None
    if quant.is_quantized:
        w1, s1 = quantize_block_weight(w1)
        w2, s2 = quantize_block_weight(w2)
    weights = ExpertWeights(w1, w2, s1, s2)
    standard = ModularKernel(LocalPrepareAndFinalize(quant), TorchExperts(cfg))(x, weights, w, ids)
    batched_kernel = ModularKernel(BatchedLocalPrepareAndFinalize(quant, 8, 6), BatchedTorchExperts(cfg))
    assert batched_kernel.chunk_size == 8  # 19 tokens run as 3 chunks
    batched = batched_kernel(x, weights, w, ids)
    assert rel_err(batched, standard) < 1e-5


def test_batched_local_with_expert_map():
    cfg = MoEConfig(8, 2, 32, 16, dtype=torch.float32, max_num_tokens=16)
    x, w1, w2, w, ids = make_case(12, 8, 2, 32, 16, seed=4)
    expert_map = torch.tensor([-1, 0, -1, 1, -1, 2, -1, 3], dtype=torch.int32)
    keep = torch.tensor([1, 3, 5, 7])
    kernel = ModularKernel(BatchedLocalPrepareAndFinalize(cfg.quant, 16, 4), BatchedTorchExperts(cfg))
    out = kernel(x, ExpertWeights(w1[keep].contiguous(), w2[keep].contiguous()), w, ids, expert_map=expert_map)
    ref = naive.moe(x, w1[keep], w2[keep], w, ids, expert_map=expert_map)
    assert rel_err(out, ref) < 1e-5


def test_batched_prepare_rejects_overflow_without_chunking():
    pf = BatchedLocalPrepareAndFinalize(QuantConfig(), 4, 2)
    x, _, _, w, ids = make_case(5, 2, 1, 16, 8)
    with pytest.raises(ValueError, match="max_num_tokens"):
        pf.prepare(x, w, ids, num_experts=2, expert_map=None, apply_router_weight_on_input=False, a1_scale=None)


def test_abstract_halves_cannot_be_instantiated():
    with pytest.raises(TypeError):
        PermuteExpertsUnpermute(config())


def test_batched_prepare_refuses_weights_with_another_expert_count():
    # A batched layout built for 3 experts would drop every slot of expert 3 (treated as owned elsewhere).
    cfg = config(e=4)
    x, w1, w2, w, ids = make_case(6, 4, 2, 32, 16, dtype=torch.float32, seed=3)
    weights = ExpertWeights(w1, w2)
    kernel = ModularKernel(BatchedLocalPrepareAndFinalize(QuantConfig(), 8, 3), BatchedTorchExperts(cfg))
    with pytest.raises(ValueError, match=r"weights hold 4 local experts .* num_local_experts=3"):
        kernel(x, weights, w, ids)
    right = ModularKernel(BatchedLocalPrepareAndFinalize(QuantConfig(), 8, 4), BatchedTorchExperts(cfg))
    assert rel_err(right(x, weights, w, ids), naive.moe(x, w1, w2, w, ids)) < 1e-5
