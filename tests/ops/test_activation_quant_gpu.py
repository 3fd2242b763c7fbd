"""gated_act_fp8_quant on the GPU: against the two-step Triton path (bf16, bit for bit or within one FP8
step), the CPU torch path, and under CUDA-graph replay with skipped (-1) rows left untouched."""

from __future__ import annotations

import pytest
import torch

from moe_plugin.ops import activation as act
from moe_plugin.ops.quant import per_token_group_quant_fp8

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GROUP = 128


def contiguous_layout(m_sum, live_rows, align=128):
    mi = torch.full((m_sum,), -1, dtype=torch.int32)
    mi[:live_rows] = torch.arange(live_rows, dtype=torch.int32) // (3 * align)
    return mi


def assert_bitwise_or_near(q, s, q2, s2):
    qa, qb = q.view(torch.uint8), q2.view(torch.uint8)
    differ = (qa != qb)
    # identical code in both kernels: any difference is a rare last-bit one, never more than one FP8 step
    assert differ.float().mean().item() <= 1e-4
    if differ.any():
        assert ((q.float()[differ] - q2.float()[differ]).abs() <= q2.float()[differ].abs() * 2**-3 + 2**-9).all()
    same_scale = (s == s2).float().mean().item()
    assert same_scale >= 0.9999 and torch.allclose(s, s2, rtol=2**-7, atol=0)


@needs_cuda
@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("kind", ["silu", "gelu", "swiglu"])
@pytest.mark.parametrize("m,n", [(4096, 768), (1000, 2048)])
def test_fused_matches_two_step_bf16(kind, use_ue8m0, m, n):
    g = torch.Generator(device="cuda").manual_seed(m + n)
    x = (torch.randn(m, 2 * n, device="cuda", generator=g) * 3).bfloat16()
    q, s = act.gated_act_fp8_quant(x, kind, GROUP, use_ue8m0=use_ue8m0)
    y = act.apply_activation(kind, x)
    q2, s2 = per_token_group_quant_fp8(y, GROUP, use_ue8m0=use_ue8m0, column_major_scales=True)
    assert s.stride() == (1, (m + 3) // 4 * 4)
    assert_bitwise_or_near(q, s, q2, s2)
    # and the CPU torch path (GPU exp / erf approximations may move an amax by a bf16 ulp)
    qc, sc = act.gated_act_fp8_quant(x.cpu(), kind, GROUP, use_ue8m0=use_ue8m0)
    diff = (q.cpu().view(torch.uint8) != qc.view(torch.uint8)).float().mean().item()
    assert diff <= 1e-3 and torch.allclose(s.cpu(), sc, rtol=2**-6 if not use_ue8m0 else 1.0)


@needs_cuda
def test_fused_graph_replay_skips_padding_rows():
    m_sum, n = 8 * 128, 512
    x = torch.randn(m_sum, 2 * n, device="cuda").bfloat16()
    mi = contiguous_layout(m_sum, 3 * 128 + 128).cuda()
    out = torch.full((m_sum, n), 3.0, device="cuda").to(torch.float8_e4m3fn)
    out_s = torch.full((n // GROUP, m_sum), -1.0, device="cuda").t()
    act.gated_act_fp8_quant(x, "silu", GROUP, m_indices=mi, out=out, out_scales=out_s)  # warm up / compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        act.gated_act_fp8_quant(x, "silu", GROUP, m_indices=mi, out=out, out_scales=out_s)
    # new routing replayed into the same buffers: fewer live rows, the rest must stay as they were
    out.view(torch.uint8).fill_(torch.tensor(3.0).to(torch.float8_e4m3fn).view(torch.uint8).item())
    out_s.fill_(-1.0)
    mi.copy_(contiguous_layout(m_sum, 2 * 128).cuda())
    x.copy_(torch.randn(m_sum, 2 * n, device="cuda").bfloat16())
    graph.replay()
    torch.cuda.synchronize()
    live = (mi >= 0).cpu()
    q2, s2 = per_token_group_quant_fp8(act.silu_and_mul(x), GROUP, column_major_scales=True)

    def rows(t, keep):  # boolean row indexing through bytes: not every device indexes FP8 directly
        return t.cpu().view(torch.uint8)[keep].view(torch.float8_e4m3fn)

    assert_bitwise_or_near(rows(out, live), out_s.cpu()[live], rows(q2, live), s2.cpu()[live])
    assert (rows(out, ~live).float() == 3.0).all() and (out_s.cpu()[~live] == -1.0).all()
