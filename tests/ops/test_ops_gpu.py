"""The compiled Triton kernels on a CUDA GPU at real sizes, against the torch path on the CPU.

Index outputs must match exactly; float outputs to the documented tolerance. The graph-safe align is
captured once and replayed for several token counts.
"""

from __future__ import annotations

import pytest
import torch

from moe_plugin.ops import activation as act
from moe_plugin.ops import quant as Q
from moe_plugin.ops.align import moe_align_block_size, moe_align_block_size_graph_safe
from moe_plugin.ops.moe_sum import moe_sum
from moe_plugin.ops.permute import ep_gather, ep_scatter, moe_permute, moe_unpermute

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def _torch_path_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def routing(m, k, e, seed, skew=False):
    g = torch.Generator().manual_seed(seed)
    if skew:  # a few hot experts, like real routers
        probs = torch.softmax(torch.randn(e, generator=g) * 3, 0)
        return torch.multinomial(probs.expand(m, e), k, replacement=False, generator=g).to(torch.int32)
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(m)]).to(torch.int32) if m else torch.zeros(0, k, dtype=torch.int32)


def ep_map(e, rank, ranks):
    em = torch.full((e,), -1, dtype=torch.int32)
    per = e // ranks
    em[rank * per : (rank + 1) * per] = torch.arange(per, dtype=torch.int32)
    return em


@pytest.mark.parametrize("m", [1, 64, 4096, 65536])
@pytest.mark.parametrize("e,bs", [(128, 16), (256, 64), (512, 128)])
def test_align_matches_cpu(m, e, bs):
    ids = routing(m, 8, e, seed=m + e, skew=m >= 4096)
    em = ep_map(e, 1, 4)
    for kwargs in ({}, {"expert_map": em, "pad_sorted_ids": True}):
        ref = moe_align_block_size(ids, bs, e, **kwargs)
        got = moe_align_block_size(ids.cuda(), bs, e, **{k: v.cuda() if torch.is_tensor(v) else v for k, v in kwargs.items()})
        for r, g_ in zip(ref, got):
            assert torch.equal(r, g_.cpu())


def test_align_graph_capture_and_replay():
    max_tokens, k, e, bs = 4096, 8, 256, 64
    ids = routing(max_tokens, k, e, seed=3).cuda()
    em = ep_map(e, 0, 2).cuda()
    valid = torch.tensor([max_tokens], dtype=torch.int32, device="cuda")
    moe_align_block_size_graph_safe(ids, bs, e, valid, expert_map=em)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_align_block_size_graph_safe(ids, bs, e, valid, expert_map=em)
    sentinel = max_tokens * k
    for n in [1, 7, 100, 1000, max_tokens, max_tokens + 50, 0]:
        valid.fill_(n)
        graph.replay()
        torch.cuda.synchronize()
        v = min(n, max_tokens)
        ref = moe_align_block_size(ids[:v].cpu(), bs, e, expert_map=em.cpu())
        length = ref[0].numel()
        got_sorted = out[0].cpu()
        expect = torch.where(ref[0] == v * k, torch.tensor(sentinel, dtype=torch.int32), ref[0])
        assert torch.equal(got_sorted[:length], expect)
        assert bool((got_sorted[length:] == sentinel).all())
        assert torch.equal(out[1].cpu()[: ref[1].numel()], ref[1])
        assert torch.equal(out[2].cpu(), ref[2])


@pytest.mark.parametrize("m,align,dtype", [(4096, 128, FP8), (777, None, torch.bfloat16), (1, 128, torch.bfloat16)])
def test_permute_unpermute_match_cpu(m, align, dtype):
    e, k, hidden = 256, 8, 7168
    ids = routing(m, k, e, seed=5, skew=True)
    em = ep_map(e, 1, 2)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(m, hidden, generator=g) * 2).to(dtype)
    scales = torch.rand(m, hidden // 128, generator=g)
    ref = moe_permute(x, scales, ids, e, e // 2, em, align)
    got = moe_permute(x.cuda(), scales.cuda(), ids.cuda(), e, e // 2, em.cuda(), align)
    for i in (2, 3, 4):
        assert torch.equal(ref[i], got[i].cpu())
    inv = ref[3].long()
    placed = inv >= 0
    rows = inv[placed]
    assert torch.equal(got[0].cpu()[rows].view(torch.uint8), ref[0][rows].view(torch.uint8))
    assert torch.equal(got[1].cpu()[rows], ref[1][rows])

    permuted = torch.randn(ref[0].shape, generator=g).to(torch.bfloat16)
    w = torch.rand(m, k, generator=g)
    out_ref = torch.empty(m, hidden, dtype=torch.bfloat16)
    moe_unpermute(out_ref, permuted, w, ref[3], ref[2])
    out = torch.empty(m, hidden, dtype=torch.bfloat16, device="cuda")
    moe_unpermute(out, permuted.cuda(), w.cuda(), got[3], got[2])
    # fp32 accumulation in the same order; the GPU may fuse multiply-adds (last-bit differences)
    torch.testing.assert_close(out.cpu().float(), out_ref.float(), rtol=2**-7, atol=2**-6)


def test_ep_scatter_gather_match_cpu():
    m, k, e, hidden = 2048, 8, 256, 4096
    ids = routing(m, k, e, seed=9, skew=True)
    em = ep_map(e, 3, 4)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(m, hidden, generator=g).to(FP8)
    scales = torch.rand(m, hidden // 128, generator=g)
    ref = ep_scatter(x, scales, ids, e // 4, em)
    got = ep_scatter(x.cuda(), scales.cuda(), ids.cuda(), e // 4, em.cuda())
    assert torch.equal(ref.m_indices, got.m_indices.cpu())
    assert torch.equal(ref.inv_perm, got.inv_perm.cpu())
    assert torch.equal(ref.expert_num_tokens, got.expert_num_tokens.cpu())
    rows = ref.inv_perm[ref.inv_perm >= 0].long()
    assert torch.equal(got.hidden_states.cpu()[rows].view(torch.uint8), ref.hidden_states[rows].view(torch.uint8))
    assert torch.equal(got.scales.cpu()[rows], ref.scales[rows])
    y = torch.randn(ref.hidden_states.shape, generator=g).to(torch.bfloat16)
    w = torch.rand(m, k, generator=g)
    torch.testing.assert_close(
        ep_gather(y.cuda(), w.cuda(), got.inv_perm).cpu().float(), ep_gather(y, w, ref.inv_perm).float(), rtol=2**-7, atol=2**-6
    )


@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_ep_scatter_quantizing_bit_exact_on_gpu(use_ue8m0):
    # DeepSeek-V3's hidden size (56 groups, not a power of two) with one EP8 rank's experts.
    m, k, e, hidden = 3000, 8, 256, 7168
    ids = routing(m, k, e, seed=4, skew=True)
    em = ep_map(e, 2, 8)
    x = (torch.randn(m, hidden, generator=torch.Generator().manual_seed(4)) * 4).to(torch.bfloat16)
    kw = dict(alignment=128, fill_invalid_expert=-1, quant_group_size=128, use_ue8m0=use_ue8m0)
    ref = ep_scatter(x, None, ids, e // 8, em, **kw)
    got = ep_scatter(x.cuda(), None, ids.cuda(), e // 8, em.cuda(), **kw)
    assert torch.equal(ref.inv_perm, got.inv_perm.cpu()) and torch.equal(ref.m_indices, got.m_indices.cpu())
    rows = ref.inv_perm[ref.inv_perm >= 0].long()
    assert rows.numel() > 1000
    assert torch.equal(got.hidden_states.cpu()[rows].view(torch.uint8), ref.hidden_states[rows].view(torch.uint8))
    assert torch.equal(got.scales.cpu()[rows], ref.scales[rows])


def test_moe_sum_matches_cpu():
    x = torch.randn(3000, 8, 2048).to(torch.bfloat16)
    torch.testing.assert_close(moe_sum(x.cuda()).cpu().float(), moe_sum(x).float(), rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("splits", [1, 2])
def test_moe_sum_routed_matches_cpu(splits):
    # The Triton experts' reduction: remote slots skipped, split-K partials summed, valid count on the device.
    m, k, h, e = 300, 8, 7168, 64
    ids = routing(m, k, e, seed=5)
    em = ep_map(e, 1, 4)
    x = torch.randn(splits, m, k, h).to(torch.float32 if splits > 1 else torch.bfloat16)
    valid = torch.tensor([250], dtype=torch.int32)
    before = torch.full((m, h), 3.0, dtype=torch.bfloat16)
    kw = dict(num_experts=e // 4)
    got = moe_sum(
        x.cuda(), before.cuda(), topk_ids=ids.cuda(), expert_map=em.cuda(), valid_tokens=valid.cuda(), **kw
    ).cpu()
    ref = moe_sum(x, before.clone(), topk_ids=ids, expert_map=em, valid_tokens=valid, **kw)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2**-7, atol=1e-2)
    assert torch.equal(got[250:], before[250:])


@pytest.mark.parametrize("name", ["silu_and_mul", "gelu_and_mul", "swiglu", "relu2"])
def test_activations_match_cpu(name):
    x = (torch.randn(512, 2 * 2048) * 4).to(torch.bfloat16)
    fn = getattr(act, name)
    torch.testing.assert_close(fn(x.cuda()).cpu().float(), fn(x).float(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_quant_bit_exact_on_gpu(use_ue8m0, dtype):
    x = (torch.randn(1000, 7168) * torch.exp2(torch.randint(-12, 12, (1000, 1)).float())).to(dtype)
    for column_major in (False, True):
        q_ref, s_ref = Q.per_token_group_quant_fp8(x, 128, use_ue8m0=use_ue8m0, column_major_scales=column_major)
        q, s = Q.per_token_group_quant_fp8(x.cuda(), 128, use_ue8m0=use_ue8m0, column_major_scales=column_major)
        assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
        assert torch.equal(s.cpu(), s_ref) and s.stride() == s_ref.stride()
    q_ref, s_ref = Q.per_token_quant_fp8(x)
    q, s = Q.per_token_quant_fp8(x.cuda())
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s.cpu(), s_ref)


def test_masked_silu_quant_graph_replay_matches_cpu():
    e, t, h = 16, 256, 2048
    y = (torch.randn(e, t, 2 * h) * 2).to(torch.bfloat16)
    counts = torch.zeros(e, dtype=torch.int32, device="cuda")
    yc = y.cuda()
    act.silu_mul_fp8_quant_masked(yc, counts)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, s = act.silu_mul_fp8_quant_masked(yc, counts)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        new = torch.randint(0, t + 1, (e,), generator=g, dtype=torch.int32)
        counts.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        q_ref, s_ref = act.silu_mul_fp8_quant_masked(y, new)
        for ex, n in enumerate(new.tolist()):
            torch.testing.assert_close(s[ex, :n].cpu(), s_ref[ex, :n], rtol=1e-5, atol=0)
            deq = q[ex, :n].cpu().float() * s[ex, :n].cpu().repeat_interleave(128, -1)
            deq_ref = q_ref[ex, :n].float() * s_ref[ex, :n].repeat_interleave(128, -1)
            torch.testing.assert_close(deq, deq_ref, rtol=2**-3, atol=float(s_ref[ex, :n].max()) * 2**-9 if n else 0)
