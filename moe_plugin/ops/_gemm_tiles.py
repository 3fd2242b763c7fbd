"""Device helpers the grouped-GEMM kernels share (``fused_moe``'s pointer kernel and ``tma_gemm``'s)."""

from __future__ import annotations

from ._jit import kernel

try:
    import triton.language as tl
except ImportError:  # torch-only installs: the helpers are never called
    tl = None


if tl is not None:

    @kernel
    def dot_acc(a, b, acc, INTERPRET: tl.constexpr, DOT_IEEE: tl.constexpr):
        # The interpreter's dot is wrong for bf16 operands (triton 3.9), so it runs on fp32 copies there
        # (also for fp16 / fp8, which costs nothing there and keeps one interpreter path).
        if INTERPRET:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if DOT_IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @kernel
    def activate(g, u, alpha, limit, ACT: tl.constexpr):
        if ACT == "silu":
            out = g * tl.sigmoid(g) * u
        elif ACT == "gelu":
            out = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)) * u
        elif ACT == "swiglu":
            g = tl.minimum(g, limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
            out = g * tl.sigmoid(alpha * g) * (u + 1.0)
        elif ACT == "relu2":
            r = tl.maximum(g, 0.0)
            out = r * r
        else:
            out = g
        return out

    @kernel
    def tile_coords(t, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        # Grouped raster: GROUP_M consecutive row blocks sweep the columns together, so one expert's
        # weight tile is read by all of its row blocks while it is still in L2.
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = t // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((t % num_pid_in_group) % group_size_m)
        pid_n = (t % num_pid_in_group) // group_size_m
        return pid_m, pid_n

    @kernel
    def expert_tile_coords(t, num_pid_n, block_expert_ptr, expert_offsets_ptr, BLOCK_M: tl.constexpr,
                           GROUP_M: tl.constexpr):
        # ``tile_coords`` with groups that never straddle two experts (sorted row blocks): a fixed
        # GROUP_M-block group boundary inside an expert's blocks puts them in different waves, and that
        # expert's weights are read from HBM twice. Expert e's tiles are [first_e, first_e + blocks_e) *
        # num_pid_n, so the block t // num_pid_n names the expert whose range holds t. Its blocks split into
        # cdiv(blocks_e, GROUP_M) groups of near-equal size (9 blocks -> 5 + 4, not 8 + 1: a lone block
        # sweeping the columns reads each weight tile for one block's rows, memory-bound where the rest
        # is not), each sweeping the columns with its blocks fastest. Returns the expert too (-1: none),
        # which spares the caller reloading it.
        b0 = t // num_pid_n
        expert = tl.load(block_expert_ptr + b0)
        known = expert >= 0
        first = (tl.load(expert_offsets_ptr + expert, mask=known, other=0) // BLOCK_M).to(tl.int32)
        blocks = (tl.load(expert_offsets_ptr + expert + 1, mask=known, other=0) // BLOCK_M).to(tl.int32) - first
        blocks = tl.maximum(blocks, 1)
        groups = (blocks + GROUP_M - 1) // GROUP_M
        base = blocks // groups
        extra = blocks - base * groups  # the first `extra` groups take one block more
        local = t - first * num_pid_n
        big_tiles = extra * (base + 1) * num_pid_n
        in_big = local < big_tiles
        size = tl.where(in_big, base + 1, base)
        rest = tl.where(in_big, local, local - big_tiles)
        g = rest // (size * num_pid_n)
        start = tl.where(in_big, g * (base + 1), extra * (base + 1) + g * base)
        r = rest - g * size * num_pid_n
        pid_m = tl.where(known, first + start + r % size, b0)
        pid_n = tl.where(known, r // size, t % num_pid_n)
        return pid_m, pid_n, expert
