#!/usr/bin/env python3
"""Benchmark the Triton experts on the GPU: CUDA-graph replay medians against the roofline floor.

For each shape, token count M and dtype it times ``fused_experts_triton`` (routing-aware grouped GEMMs,
activation, reduction; for fp8 also the on-the-fly activation quantization) captured in one CUDA graph,
the L2 flushed before every timed replay (a model runs other layers between two MoE layers), and reports

- us: median over ``--replays`` (>= 20) replays,
- TFLOP/s and GB/s (bytes = weights of the local experts the routing touched, plus activations in/out),
- % of the roofline floor: floor = max(bytes / copy bandwidth, FLOPs / matmul peak), both measured at the
  start of the run (device-to-device copy; an 8192^3 bf16 matmul, and for fp8 rows torch._scaled_mm when
  it runs, else the bf16 peak),
- relative error ||out - ref|| / ||ref|| against a float32 reference (fp8: on the dequantized weights and
  the unquantized activations, so it includes the quantization error).

Writes ``bench_experts.json`` and ``bench_experts.png`` under ``--out-dir`` and prints a markdown table.
Shapes: qwen3-30b-a3b (E 128, top-8, K 2048, N 768), mixtral-8x7b (E 8, top-2, K 4096, N 14336),
deepseek-v3-ep8 (E 256 with 32 local on this rank, top-8, K 7168, N 2048; ids outside the 32 are remote).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass

import torch

SHAPES = {
    "qwen3-30b-a3b": dict(num_experts=128, num_local=128, top_k=8, hidden=2048, inter=768),
    "mixtral-8x7b": dict(num_experts=8, num_local=8, top_k=2, hidden=4096, inter=14336),
    "deepseek-v3-ep8": dict(num_experts=256, num_local=32, top_k=8, hidden=7168, inter=2048),
}
M_VALUES = (1, 8, 64, 256, 1024, 4096, 16384)
DTYPES = ("bf16", "fp8-block")
# The targets (bf16, H100, CUDA-graph median us), for the table's last column.
GOALS_BF16 = {
    "qwen3-30b-a3b": dict(zip(M_VALUES, (36, 184, 431, 440, 500, 870, 2990))),
    "mixtral-8x7b": dict(zip(M_VALUES, (259, 600, 975, 1040, 1430, 4210, 15900))),
    "deepseek-v3-ep8": dict(zip(M_VALUES, (42, 170, 883, 960, 1100, 1230, 3100))),
}


@dataclass
class Problem:
    shape: str
    dtype: str
    w1: torch.Tensor
    w2: torch.Tensor
    w1_scale: torch.Tensor | None
    w2_scale: torch.Tensor | None
    expert_map: torch.Tensor | None
    quant: object
    num_experts: int
    top_k: int
    hidden: int
    inter: int


def make_problem(shape: str, dtype: str, device: str = "cuda", seed: int = 0) -> Problem:
    """Random weights for ``shape`` (local experts only), bf16 or FP8 with 128x128 block scales."""
    from moe_plugin.config import QuantConfig
    from moe_plugin.ops.quant import quantize_block_weight

    s = SHAPES[shape]
    e, k, n = s["num_local"], s["hidden"], s["inter"]
    g = torch.Generator(device=device).manual_seed(seed)
    w1 = torch.empty((e, 2 * n, k), dtype=torch.bfloat16, device=device)
    w2 = torch.empty((e, k, n), dtype=torch.bfloat16, device=device)
    for i in range(e):  # per expert keeps the fp32 temporaries small
        w1[i] = (torch.randn((2 * n, k), generator=g, device=device) * k**-0.5).to(torch.bfloat16)
        w2[i] = (torch.randn((k, n), generator=g, device=device) * n**-0.5).to(torch.bfloat16)
    expert_map = None
    if s["num_local"] != s["num_experts"]:
        # EP rank 0 of a contiguous placement: global experts [0, 32) live here.
        expert_map = torch.full((s["num_experts"],), -1, dtype=torch.int32, device=device)
        expert_map[: s["num_local"]] = torch.arange(s["num_local"], dtype=torch.int32, device=device)
    w1s = w2s = None
    quant = QuantConfig()
    if dtype == "fp8-block":
        quant = QuantConfig.fp8_block(128)
        q1, q2, s1, s2 = [], [], [], []
        for i in range(e):
            a, b = quantize_block_weight(w1[i], (128, 128))
            q1.append(a)
            s1.append(b)
            a, b = quantize_block_weight(w2[i], (128, 128))
            q2.append(a)
            s2.append(b)
        w1, w2 = torch.stack(q1), torch.stack(q2)
        w1s, w2s = torch.stack(s1).contiguous(), torch.stack(s2).contiguous()
    elif dtype != "bf16":
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return Problem(shape, dtype, w1, w2, w1s, w2s, expert_map, quant, s["num_experts"], s["top_k"], k, n)


def make_routing(m: int, num_experts: int, top_k: int, hidden: int, device: str = "cuda", seed: int = 1):
    """Random tokens and softmax top-k routing (renormalized), as a router with random logits gives."""
    g = torch.Generator(device=device).manual_seed(seed + m)
    x = torch.randn((m, hidden), generator=g, device=device).to(torch.bfloat16)
    logits = torch.randn((m, num_experts), generator=g, device=device)
    w, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return x, w.float().contiguous(), ids.to(torch.int32).contiguous()


def touched_local_experts(ids: torch.Tensor, expert_map: torch.Tensor | None) -> tuple[int, int]:
    """(distinct local experts used, local slots) of a routing."""
    loc = ids.long().flatten()
    if expert_map is not None:
        loc = expert_map.long()[loc]
    loc = loc[loc >= 0]
    return int(torch.unique(loc).numel()), int(loc.numel())


def reference_fp32(p: Problem, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float32 experts (no TF32) on dequantized weights, per local expert."""
    from moe_plugin.ops.quant import dequant_block_weight

    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    loc = ids.long()
    if p.expert_map is not None:
        loc = p.expert_map.long()[loc]
    flat = loc.flatten()
    xf = x.float()
    for e in torch.unique(flat[flat >= 0]).tolist():
        slots = torch.nonzero(flat == e).flatten()
        tok = slots // p.top_k
        if p.w1_scale is not None:
            w1 = dequant_block_weight(p.w1[e], p.w1_scale[e], (128, 128))
            w2 = dequant_block_weight(p.w2[e], p.w2_scale[e], (128, 128))
        else:
            w1, w2 = p.w1[e].float(), p.w2[e].float()
        h = xf[tok] @ w1.t()
        a = torch.nn.functional.silu(h[:, : p.inter]) * h[:, p.inter :]
        y = (a @ w2.t()) * w.flatten()[slots, None]
        out.index_add_(0, tok, y)
    return out


class L2Flusher:
    def __init__(self, device: str, nbytes: int = 256 << 20):
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def __call__(self) -> None:
        self.buf.zero_()


def graph_times_us(fn, replays: int, flush: L2Flusher | None) -> list[float]:
    """Per-replay times of ``fn`` captured in one CUDA graph (warm-up and compilation excluded)."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        if flush is not None:
            flush()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    del graph
    return times


def measure_ceilings(device: str) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and matmul peaks, measured here and now."""
    torch.backends.cuda.matmul.allow_tf32 = False
    out: dict[str, float] = {}
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    t = _median_ms(lambda: dst.copy_(src), 10)
    out["copy_bytes_per_s"] = 2 * n / (t * 1e-3)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t = _median_ms(lambda: a @ b, 10)
    out["bf16_flops_per_s"] = 2 * 8192**3 / (t * 1e-3)
    try:
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.t().contiguous().t().to(torch.float8_e4m3fn)
        if not b8.t().is_contiguous():
            b8 = b.t().contiguous().to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device)
        t = _median_ms(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), 10)
        out["fp8_flops_per_s"] = 2 * 8192**3 / (t * 1e-3)
    except Exception as exc:  # the fp8 peak is a refinement; without it fp8 rows use the bf16 peak
        print(f"# fp8 matmul peak not measured ({type(exc).__name__}: {exc}); fp8 rows use the bf16 peak")
    return out


def _median_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


@dataclass
class Row:
    shape: str
    dtype: str
    m: int
    us: float
    tflops: float
    gbps: float
    floor_us: float
    pct_roofline: float
    rel_err: float | None
    experts_touched: int
    local_slots: int
    bytes: int
    flops: int
    config: str
    goal_us: float | None


def bench_case(p: Problem, m: int, ceilings: dict, replays: int, flush, check: bool) -> Row:
    from moe_plugin.ops.fused_moe import fused_experts_triton
    from moe_plugin.ops.launch_config import get_launch_config

    x, w, ids = make_routing(m, p.num_experts, p.top_k, p.hidden, device=p.w1.device)
    out = torch.empty_like(x)
    kw = dict(
        quant=p.quant,
        w1_scale=p.w1_scale,
        w2_scale=p.w2_scale,
        expert_map=p.expert_map,
        global_num_experts=p.num_experts,
        out=out,
        check_inputs=False,
    )

    def run():
        fused_experts_triton(x, p.w1, p.w2, w, ids, **kw)

    times = graph_times_us(run, replays, flush)
    us = statistics.median(times)
    rel = None
    if check:
        run()
        ref = reference_fp32(p, x, w, ids)
        rel = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        del ref
    touched, local_slots = touched_local_experts(ids, p.expert_map)
    w_item = p.w1.element_size()
    w_bytes = touched * (p.w1[0].numel() + p.w2[0].numel()) * w_item
    if p.w1_scale is not None:
        w_bytes += touched * (p.w1_scale[0].numel() + p.w2_scale[0].numel()) * 4
    nbytes = w_bytes + 2 * m * p.hidden * x.element_size()
    flops = 2 * local_slots * (2 * p.inter * p.hidden + p.hidden * p.inter)
    peak = ceilings["bf16_flops_per_s"]
    if p.dtype == "fp8-block" and "fp8_flops_per_s" in ceilings:
        peak = ceilings["fp8_flops_per_s"]
    floor_us = max(nbytes / ceilings["copy_bytes_per_s"], flops / peak) * 1e6
    cfg = get_launch_config(
        m, num_local=p.w1.shape[0], num_global=p.num_experts, n=p.inter, k=p.hidden, top_k=p.top_k,
        dtype=torch.bfloat16, quant=p.quant, device=x.device,
    )
    g1, g2 = cfg.gemm1, cfg.gemm2
    desc = (
        f"{cfg.source}: {cfg.routing} bm{g1.block_m} g1 n{g1.block_n}k{g1.block_k}w{g1.num_warps}s{g1.num_stages}"
        f" g2 n{g2.block_n}k{g2.block_k}w{g2.num_warps}s{g2.num_stages}x{g2.split_k}{' P' if cfg.persistent else ''}"
        f"{' tma=' + cfg.tma if cfg.tma != 'off' else ''}"
    )
    goal = GOALS_BF16.get(p.shape, {}).get(m) if p.dtype == "bf16" else None
    return Row(
        p.shape, p.dtype, m, us, flops / us / 1e6, nbytes / us / 1e3, floor_us, 100.0 * floor_us / us, rel,
        touched, local_slots, nbytes, flops, desc, goal,
    )


def markdown(rows: list[Row]) -> str:
    lines = [
        "| shape | dtype | M | us | TFLOP/s | GB/s | floor us | % roofline | rel err | goal us | config |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        err = f"{r.rel_err:.2e}" if r.rel_err is not None else "-"
        goal = f"{r.goal_us:.0f}" if r.goal_us else "-"
        lines.append(
            f"| {r.shape} | {r.dtype} | {r.m} | {r.us:.1f} | {r.tflops:.1f} | {r.gbps:.0f} | {r.floor_us:.1f} | "
            f"{r.pct_roofline:.0f}% | {err} | {goal} | {r.config} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> str:
    """us vs M per shape (log-log), bf16 and fp8, with the floor dashed; matplotlib when importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        _plot_builtin(rows, path)
        return "built-in rasterizer (no matplotlib): one panel per shape; blue bf16, red fp8, grey floor"
    shapes = sorted({r.shape for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for dtype, color in (("bf16", "tab:blue"), ("fp8-block", "tab:red")):
            rs = sorted((r for r in rows if r.shape == shape and r.dtype == dtype), key=lambda r: r.m)
            if not rs:
                continue
            ax.plot([r.m for r in rs], [r.us for r in rs], "o-", color=color, label=f"{dtype} triton")
            ax.plot([r.m for r in rs], [r.floor_us for r in rs], "--", color=color, alpha=0.5, label=f"{dtype} floor")
            goals = [(r.m, r.goal_us) for r in rs if r.goal_us]
            if goals:
                ax.plot(*zip(*goals), "x", color="black", label="goal (bf16)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens M")
        ax.set_ylabel("us (CUDA graph median)")
        ax.set_title(shape)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return "matplotlib"


def _plot_builtin(rows: list[Row], path: str) -> None:
    shapes = sorted({r.shape for r in rows})
    pw, ph, pad = 360, 260, 20
    width, height = pw * max(1, len(shapes)), ph
    img = bytearray(b"\xff" * (width * height * 3))

    def put(x, y, color):
        if 0 <= x < width and 0 <= y < height:
            i = (y * width + x) * 3
            img[i : i + 3] = bytes(color)

    def line(x0, y0, x1, y1, color, dashed=False):
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for s in range(steps + 1):
            if dashed and (s // 4) % 2:
                continue
            x = round(x0 + (x1 - x0) * s / steps)
            y = round(y0 + (y1 - y0) * s / steps)
            for dx in (0, 1):
                put(x + dx, y, color)

    for p_i, shape in enumerate(shapes):
        rs = [r for r in rows if r.shape == shape]
        ms = [math.log2(r.m) for r in rs]
        ys = [math.log10(v) for r in rs for v in (r.us, r.floor_us)]
        x_lo, x_hi = min(ms), max(ms) + 1e-9
        y_lo, y_hi = min(ys), max(ys) + 1e-9
        ox = p_i * pw

        def tx(m):
            return ox + pad + int((math.log2(m) - x_lo) / (x_hi - x_lo) * (pw - 2 * pad))

        def ty(v):
            return ph - pad - int((math.log10(v) - y_lo) / (y_hi - y_lo) * (ph - 2 * pad))

        grey = (200, 200, 200)
        line(ox + pad, ph - pad, ox + pw - pad, ph - pad, (0, 0, 0))
        line(ox + pad, pad, ox + pad, ph - pad, (0, 0, 0))
        for decade in range(math.floor(y_lo), math.ceil(y_hi) + 1):
            if y_lo <= decade <= y_hi:
                line(ox + pad, ty(10**decade), ox + pw - pad, ty(10**decade), grey, dashed=True)
        for dtype, color in (("bf16", (31, 119, 180)), ("fp8-block", (214, 39, 40))):
            pts = sorted((r for r in rs if r.dtype == dtype), key=lambda r: r.m)
            for a, b in zip(pts, pts[1:]):
                line(tx(a.m), ty(a.us), tx(b.m), ty(b.us), color)
                line(tx(a.m), ty(a.floor_us), tx(b.m), ty(b.floor_us), (150, 150, 150), dashed=True)
    raw = b"".join(b"\x00" + bytes(img[y * width * 3 : (y + 1) * width * 3]) for y in range(height))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    ap.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma list of token counts")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma list of {list(DTYPES)}")
    ap.add_argument("--replays", type=int, default=30, help="timed CUDA-graph replays per case (>= 20)")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "."), help="where the JSON and PNG go")
    ap.add_argument("--no-check", action="store_true", help="skip the float32 reference comparison")
    ap.add_argument("--no-flush", action="store_true", help="do not flush L2 between replays")
    ap.add_argument("--time-limit", type=float, default=0, help="stop starting new cases after this many seconds")
    args = ap.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.m = [int(v) for v in args.m.split(",") if v]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    for s in args.shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}; known: {list(SHAPES)}")
    for d in args.dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r}; known: {list(DTYPES)}")
    if args.replays < 20:
        ap.error("--replays must be >= 20")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_experts.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    t_start = time.monotonic()
    device = "cuda"
    os.makedirs(args.out_dir, exist_ok=True)
    ceilings = measure_ceilings(device)
    torch.cuda.empty_cache()
    name = torch.cuda.get_device_name()
    print(
        f"# {name}: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
        f"{ceilings['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s"
        + (f", fp8 matmul {ceilings['fp8_flops_per_s'] / 1e12:.0f} TFLOP/s" if "fp8_flops_per_s" in ceilings else "")
        + f"; torch {torch.__version__}, triton {triton.__version__}",
        flush=True,
    )
    flush = None if args.no_flush else L2Flusher(device)
    rows: list[Row] = []
    stopped_early = False
    # dtype-major: with a time limit, every shape's bf16 rows come before any fp8 row.
    for dtype in args.dtypes:
        for shape in args.shapes:
            if args.time_limit and time.monotonic() - t_start > args.time_limit:
                stopped_early = True
                break
            problem = make_problem(shape, dtype, device)
            for m in args.m:
                if args.time_limit and time.monotonic() - t_start > args.time_limit:
                    stopped_early = True
                    break
                row = bench_case(problem, m, ceilings, args.replays, flush, not args.no_check)
                rows.append(row)
                err = f"{row.rel_err:.2e}" if row.rel_err is not None else "-"
                print(
                    f"{shape:16s} {dtype:9s} M={m:<6d} {row.us:9.1f} us  {row.pct_roofline:5.1f}% roofline  "
                    f"err {err}  [{row.config}]",
                    flush=True,
                )
            del problem
            torch.cuda.empty_cache()
    table = markdown(rows)
    png_path = os.path.join(args.out_dir, "bench_experts.png")
    how = plot(rows, png_path) if rows else "no rows"
    result = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "ceilings": ceilings,
        "l2_flushed": not args.no_flush,
        "replays": args.replays,
        "stopped_early": stopped_early,
        "config_dirs": os.environ.get("MOE_PLUGIN_TRITON_CONFIG_DIR", ""),
        "plot": how,
        "rows": [asdict(r) for r in rows],
    }
    with open(os.path.join(args.out_dir, "bench_experts.json"), "w") as f:
        json.dump(result, f, indent=1)
    print()
    print(table)
    if stopped_early:
        print(f"\n(stopped early at --time-limit {args.time_limit:.0f} s)")
    bad = [r for r in rows if r.rel_err is not None and r.rel_err > (2e-2 if r.dtype == "bf16" else 8e-2)]
    if bad:
        print(f"\nWARNING: {len(bad)} case(s) above the error bound: " + ", ".join(f"{r.shape}/{r.dtype}/M={r.m}" for r in bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
