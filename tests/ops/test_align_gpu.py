"""Both Triton paths of moe_align_block_size on a CUDA GPU against the torch path on the CPU: repeated
calls and graph replays.

Compile time dominates these tests: every distinct set of constexprs (the one program's slot, expert and
block counts rounded to powers of two; the three launches' chunk and scan tiles) and every change in
Triton's specialisation of the integer arguments (== 1, multiple of 16) compiles the kernels anew, and a
one-program sort of thousands of slots takes seconds to compile. Hence few shapes, each picked for a
path or a regime: one program at 8 and 512 slots, two launches just past the limit and at 32k slots, three
launches at 128k slots (chunks of 4 sub-blocks), at 512k slots (chunks of 16 sub-blocks), and forced on
tiny inputs.
"""

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


@pytest.mark.parametrize(
    "m,e,force_three",
    [
        (1, 128, False),  # one program, 8 slots
        (64, 128, False),  # one program, 512 slots: the limit
        (65, 128, False),  # two launches, 520 slots in 5 chunks of 128
        (4096, 128, False),  # two launches, 64 chunks of 512 slots
        (4096, 256, False),  # two launches, the largest count table (64 x 256)
        (16384, 128, False),  # three launches, 1024 chunks of 128 slots
        (65536, 256, False),  # three launches, 1024 chunks of 512 slots (16 sub-blocks each)
        (1, 128, True),  # three launches on the smallest input (one chunk of 16 slots)
        (64, 256, True),
    ],
)
def test_all_paths_match_cpu_twice(monkeypatch, m, e, force_three):
    # Twice: the second call gets the first call's freed (non-zero) count table and ranks from the caching
    # allocator, so a row the rank launch failed to clear would show.
    if force_three:
        monkeypatch.setattr(align_mod, "_ONE_PROGRAM_MAX_SLOTS", -1)
        monkeypatch.setattr(align_mod, "_TWO_LAUNCH_MAX_TABLE", -1)
    ids = routing(m, 8, e, seed=m + e)
    ref = moe_align_block_size(ids, 64, e)
    for _ in range(2):
        assert_same(moe_align_block_size(ids.cuda(), 64, e), ref)


@pytest.mark.parametrize("max_tokens,e", [(64, 256), (4096, 256), (16384, 256)])
def test_graph_replays_every_path(max_tokens, e):
    # 64 tokens: one program; 4096: two launches; 16384: three.
    bs, k = 64, 8
    ids = routing(max_tokens, k, e, seed=9).cuda()
    valid = torch.tensor([max_tokens], dtype=torch.int32, device="cuda")
    moe_align_block_size_graph_safe(ids, bs, e, valid)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_align_block_size_graph_safe(ids, bs, e, valid)
    for n in [max_tokens, 3, 0, max_tokens // 2, max_tokens]:
        valid.fill_(n)
        graph.replay()
        torch.cuda.synchronize()
        ref = moe_align_block_size(ids[:n].cpu(), bs, e)
        sentinel = max_tokens * k
        length = ref[0].numel()
        expect = torch.where(ref[0] == n * k, torch.tensor(sentinel, dtype=torch.int32), ref[0])
        assert torch.equal(out[0].cpu()[:length], expect)
        assert bool((out[0].cpu()[length:] == sentinel).all())
        assert torch.equal(out[1].cpu()[: ref[1].numel()], ref[1])
        assert torch.equal(out[2].cpu(), ref[2])
