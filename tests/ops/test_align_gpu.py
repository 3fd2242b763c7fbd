"""The two Triton paths of moe_align_block_size on a CUDA GPU against the torch path on the CPU: repeated
calls (the tickets must come back to zero), graph replays, and two streams at once (one ticket row each)."""

from __future__ import annotations

import pytest
import torch

import moe_plugin.ops.align as align_mod
from moe_plugin.ops.align import moe_align_block_size, moe_align_block_size_graph_safe

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _torch_path_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def routing(m, k, e, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, e, (m, k), generator=g, dtype=torch.int32)
    if m > 3:
        ids[3, 0] = -1
    return ids


def assert_same(got, ref):
    for g, r in zip(got, ref):
        assert torch.equal(g.cpu(), r)


@pytest.mark.parametrize("limit", [-1, 1 << 20])
@pytest.mark.parametrize("m", [1, 100, 128, 129, 500, 4096, 20000])
@pytest.mark.parametrize("e", [128, 256])
def test_both_paths_match_cpu_twice(monkeypatch, limit, m, e):
    if limit > 0 and m * 8 > 8192:
        pytest.skip("one program only for small problems")
    monkeypatch.setattr(align_mod, "_ONE_PROGRAM_MAX_SLOTS", limit)
    ids = routing(m, 8, e, seed=m + e)
    ref = moe_align_block_size(ids, 64, e)
    for _ in range(3):
        assert_same(moe_align_block_size(ids.cuda(), 64, e), ref)


@pytest.mark.parametrize("max_tokens", [100, 4096])
def test_graph_replays_both_paths(max_tokens):
    e, bs, k = 256, 64, 8
    ids = routing(max_tokens, k, e, seed=9).cuda()
    valid = torch.tensor([max_tokens], dtype=torch.int32, device="cuda")
    moe_align_block_size_graph_safe(ids, bs, e, valid)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_align_block_size_graph_safe(ids, bs, e, valid)
    for n in [max_tokens, 3, max_tokens, 0, max_tokens // 2] * 2:
        valid.fill_(n)
        graph.replay()
        torch.cuda.synchronize()
        ref = moe_align_block_size(ids[:n].cpu(), bs, e)
        sentinel = max_tokens * k
        length = ref[0].numel()
        expect = torch.where(ref[0] == n * k, torch.tensor(sentinel, dtype=torch.int32), ref[0])
        assert torch.equal(out[0].cpu()[:length], expect)
        assert torch.equal(out[1].cpu()[: ref[1].numel()], ref[1])
        assert torch.equal(out[2].cpu(), ref[2])


def test_two_streams_at_once():
    e, bs = 256, 64
    inputs = [routing(m, 8, e, seed=m).cuda() for m in (4096, 3000)]
    refs = [moe_align_block_size(x.cpu(), bs, e) for x in inputs]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    outs = [[], []]
    torch.cuda.synchronize()
    for _ in range(50):
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                outs[i].append(moe_align_block_size(inputs[i], bs, e))
    torch.cuda.synchronize()
    for i in range(2):
        for got in outs[i]:
            assert_same(got, refs[i])
