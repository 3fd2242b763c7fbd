"""Tile groups bounded by experts (``_gemm_tiles.expert_tile_coords``): the order it walks the tiles in,
against a loop written out here, and the Triton experts with it forced on (pointer and TMA kernels, under
the interpreter) against float64 and bit for bit against the fixed-group order."""

from __future__ import annotations

import pytest
import torch

import naive
from moe_plugin.ops import fused_moe as fm
from moe_plugin.ops import launch_config
from moe_plugin.ops.align import SlotSortOutputs, align_buffer_sizes, sort_slots_triton
from moe_plugin.config import QuantConfig
from moe_plugin.ops.fused_moe import GemmLaunch, LaunchConfig, fused_experts_triton
from moe_plugin.ops.quant import dequant_block_weight, quantize_block_weight

triton = pytest.importorskip("triton")
tl = triton.language

from moe_plugin.ops._gemm_tiles import expert_tile_coords  # noqa: E402
from moe_plugin.ops._jit import kernel  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter(monkeypatch, request):
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(fm.FORCE_CONFIG_ENV, raising=False)
    monkeypatch.delenv(fm.CONFIG_DIR_ENV, raising=False)


@kernel
def _coords_kernel(block_expert_ptr, offsets_ptr, out_ptr, num_pid_n, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    t = tl.program_id(0)
    pid_m, pid_n, expert = expert_tile_coords(t, num_pid_n, block_expert_ptr, offsets_ptr, BLOCK_M, GROUP_M)
    tl.store(out_ptr + 3 * t, pid_m)
    tl.store(out_ptr + 3 * t + 1, pid_n)
    tl.store(out_ptr + 3 * t + 2, expert)


def sorted_layout(counts_per_expert, block):
    """The real sort's block owners and padded offsets for slots with these per-expert counts."""
    ids = torch.cat([torch.full((c,), e, dtype=torch.int32) for e, c in enumerate(counts_per_expert)])
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))]
    n_local = len(counts_per_expert)
    length, n_blocks = align_buffer_sizes(ids.numel(), block, n_local)
    out = SlotSortOutputs(
        sorted_ids=torch.empty(length, dtype=torch.int32),
        sentinel=ids.numel(),
        block_keys=torch.empty(n_blocks, dtype=torch.int32),
        block_tail=-1,
        num_tokens_post_padded=torch.empty(1, dtype=torch.int32),
        offsets=torch.empty(n_local + 1, dtype=torch.int64),
    )
    sort_slots_triton(ids, 1, n_local, block, out)
    return out


def expected_order(counts_per_expert, block, num_pid_n, group_m):
    """Expert by expert; inside one, its row blocks dealt into the fewest groups of at most ``group_m``,
    sizes differing by at most one (larger first), each group sweeping the columns with its row blocks
    fastest."""
    order, first = [], 0
    for e, c in enumerate(counts_per_expert):
        blocks = -(-c // block)
        n_groups = -(-blocks // group_m)
        sizes = [blocks // n_groups + (1 if g < blocks % n_groups else 0) for g in range(n_groups)] if blocks else []
        assert sum(sizes) == blocks and all(0 < s <= group_m for s in sizes)
        start = first
        for size in sizes:
            for n in range(num_pid_n):
                for m in range(size):
                    order.append((start + m, n, e))
            start += size
        first += blocks
    return order


@pytest.mark.parametrize("counts", [[5, 1, 0, 17, 9], [16], [0, 3, 0, 0, 40, 2], [36, 33, 20]])
@pytest.mark.parametrize("group_m", [1, 2, 4, 8])
@pytest.mark.parametrize("num_pid_n", [1, 3])
def test_order_follows_expert_bounds(counts, group_m, num_pid_n):
    block = 4
    sort = sorted_layout(counts, block)
    total_blocks = int(sort.num_tokens_post_padded) // block
    tiles = total_blocks * num_pid_n
    out = torch.full((tiles, 3), -9, dtype=torch.int32)
    _coords_kernel[(tiles,)](sort.block_keys, sort.offsets, out, num_pid_n, BLOCK_M=block, GROUP_M=group_m)
    assert [tuple(r) for r in out.tolist()] == expected_order(counts, block, num_pid_n, group_m)
    # every tile once, each at a block its expert owns
    assert len(set(map(tuple, out[:, :2].tolist()))) == tiles
    assert torch.equal(sort.block_keys[out[:, 0].long()], out[:, 2])


def make_case(m, e, top_k, hidden, inter, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, hidden, generator=g).to(dtype)
    w1 = (torch.randn(e, 2 * inter, hidden, generator=g) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(e, hidden, inter, generator=g) * inter**-0.5).to(dtype)
    # Skewed routing: experts get 1 to several row blocks, so fixed groups of 2 split some of them.
    logits = torch.randn(m, e, generator=g) + torch.linspace(0, 2, e)
    ids = torch.topk(logits, top_k, dim=-1).indices.to(torch.int32)
    weights = torch.rand(m, top_k, generator=g)
    return x, w1, w2, weights, ids


def grouped_and_fixed(monkeypatch, x, w1, w2, w, ids, **kw):
    """The call with fixed tile groups, then with expert-bounded ones (checked to have run for both GEMMs)."""
    monkeypatch.setattr(launch_config, "EXPERT_GROUP_MIN_WEIGHT_BYTES", 1 << 40)
    fixed = fused_experts_triton(x, w1, w2, w, ids, **kw)
    monkeypatch.setattr(launch_config, "EXPERT_GROUP_MIN_WEIGHT_BYTES", 0)
    monkeypatch.setattr(launch_config, "EXPERT_GROUP_MAX_BF16_BLOCKS", 1 << 30)
    seen = []
    original = fm.expert_grouped_raster
    monkeypatch.setattr(fm, "expert_grouped_raster", lambda *a: seen.append(original(*a)) or seen[-1])
    grouped = fused_experts_triton(x, w1, w2, w, ids, **kw)
    assert len(seen) == 2 and all(seen)
    return grouped, fixed


@pytest.mark.parametrize("tma,persistent", [("off", False), ("off", True), ("weights", False), ("all", True)])
def test_experts_with_expert_groups_match(monkeypatch, tma, persistent):
    x, w1, w2, w, ids = make_case(40, 5, 2, 32, 24, torch.float16, seed=3)
    expert_map = torch.tensor([0, 1, -1, 2, 3, 4, -1], dtype=torch.int32)  # 7 global experts, 5 here
    ids = torch.where(ids >= 2, ids + 1, ids)  # global ids; 2 and 6 are remote (none routed there)
    ids[::7, 0] = 2  # some slots to a remote expert
    cfg = LaunchConfig(GemmLaunch(16, 16, 32, group_m=2), GemmLaunch(16, 16, 32, group_m=2), routing="sorted",
                       persistent=persistent, tma=tma)
    grouped, fixed = grouped_and_fixed(monkeypatch, x, w1, w2, w, ids, config=cfg, expert_map=expert_map,
                                       global_num_experts=7)
    assert torch.equal(grouped, fixed)  # each tile computes the same values, whatever the order
    ref = naive.moe(x, w1, w2, w, ids, "silu", expert_map=expert_map)
    err = ((grouped.double() - ref).norm() / ref.norm()).item()
    assert err < 3e-3


def test_rule_weight_size_then_dtype_and_rows(monkeypatch):
    monkeypatch.setattr(launch_config, "EXPERT_GROUP_MIN_WEIGHT_BYTES", 1000)
    rule = launch_config.expert_grouped_raster
    bf16_big = torch.empty(3, 10, 50, dtype=torch.bfloat16)  # 1000 bytes per expert
    assert rule(bf16_big, 128, 64, 8) and rule(bf16_big, 2 * 64, 64, 8)
    assert not rule(bf16_big, 2 * 64 + 1, 64, 8)  # compute-bound bf16: fixed groups measured faster
    assert not rule(bf16_big, 1, 64, 1)  # groups of one block: the same order, without the index loads
    assert not rule(torch.empty(3, 10, 49, dtype=torch.bfloat16), 1, 64, 8)  # an expert L2 absorbs
    fp8 = torch.empty(3, 10, 100, dtype=torch.float8_e4m3fn)
    assert rule(fp8, 1e6, 64, 8) and not rule(fp8[:, :, :99], 1, 64, 8)
    assert rule(torch.empty(0, 10, 50, dtype=torch.bfloat16), 1, 64, 8)  # no local experts: no indexing


def test_sorted_routing_with_no_local_experts(monkeypatch):
    # An EP rank owning none of the experts: every slot is remote, the output is zero.
    monkeypatch.setattr(launch_config, "EXPERT_GROUP_MIN_WEIGHT_BYTES", 0)
    x, _, _, w, ids = make_case(24, 4, 2, 32, 16, torch.float16, seed=7)
    w1, w2 = torch.randn(0, 32, 32, dtype=torch.float16), torch.randn(0, 32, 16, dtype=torch.float16)
    cfg = LaunchConfig(GemmLaunch(16, 16, 32, group_m=2), GemmLaunch(16, 16, 32, group_m=2), routing="sorted")
    out = fused_experts_triton(x, w1, w2, w, ids, config=cfg, expert_map=torch.full((4,), -1, dtype=torch.int32),
                               global_num_experts=4)
    assert out.shape == x.shape and not out.any()


@pytest.mark.parametrize("variant", ["fp8_block", "split_k", "valid_tokens"])
def test_expert_groups_with_fp8_split_k_and_device_counts(monkeypatch, variant):
    x, w1, w2, w, ids = make_case(48, 5, 2, 64, 32, torch.float16, seed=11)
    g2 = GemmLaunch(16, 16, 32, group_m=2, split_k=2 if variant == "split_k" else 1)
    cfg = LaunchConfig(GemmLaunch(16, 16, 32, group_m=2), g2, routing="sorted")
    kw = dict(config=cfg)
    ref_w1, ref_w2 = w1, w2
    if variant == "fp8_block":
        q1, s1 = quantize_block_weight(w1, (32, 32))
        q2, s2 = quantize_block_weight(w2, (32, 32))
        kw.update(quant=QuantConfig.fp8_block(32), w1_scale=s1, w2_scale=s2)
        ref_w1, ref_w2 = dequant_block_weight(q1, s1, (32, 32)), dequant_block_weight(q2, s2, (32, 32))
        w1, w2 = q1, q2
    valid = 30
    if variant == "valid_tokens":
        kw.update(valid_tokens=torch.tensor([valid], dtype=torch.int32), num_tokens_hint=4)
    grouped, fixed = grouped_and_fixed(monkeypatch, x, w1, w2, w, ids, **kw)
    rows = valid if variant == "valid_tokens" else x.shape[0]  # rows past a device count are not written
    assert torch.equal(grouped[:rows], fixed[:rows])
    ref = naive.moe(x[:rows], ref_w1.to(x.dtype), ref_w2.to(x.dtype), w[:rows], ids[:rows], "silu")
    err = ((grouped[:rows].double() - ref).norm() / ref.norm()).item()
    assert err < (6e-2 if variant == "fp8_block" else 3e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("tma", ["off", "weights"])
def test_experts_with_expert_groups_match_on_gpu(monkeypatch, tma):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x, w1, w2, w, ids = (t.cuda() for t in make_case(1000, 8, 2, 256, 512, torch.bfloat16, seed=5))
    cfg = LaunchConfig(GemmLaunch(64, 64, 64, group_m=4), GemmLaunch(64, 64, 64, group_m=4), routing="sorted",
                       tma=tma)
    grouped, fixed = grouped_and_fixed(monkeypatch, x, w1, w2, w, ids, config=cfg)
    assert torch.equal(grouped, fixed)
    ref = naive.moe(x.cpu(), w1.cpu(), w2.cpu(), w.cpu(), ids.cpu(), "silu")
    err = ((grouped.cpu().double() - ref).norm() / ref.norm()).item()
    assert err < 2e-2
