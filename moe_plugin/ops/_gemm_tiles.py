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
