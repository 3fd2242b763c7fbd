"""Time the routing-side ops on a CUDA GPU and write the numbers as JSON.

Measured, each as the median of CUDA-graph replays (``triton.testing.do_bench_cudagraph``):

- ``moe_align_block_size`` (and its graph-safe form) for every M x E, top-k 8, with the number of kernel
  launches it makes (one program up to ``ops.align._ONE_PROGRAM_MAX_SLOTS`` slots, two launches while the
  chunk count table is small, three above); ``--one-program-max`` re-measures with other limits: ``-1``
  leaves the one program out, a limit above the default places the crossover but compiles a one-program
  sort of up to that many slots, which takes seconds per shape; ``--two-launch-chunk`` and
  ``--two-launch-max-table`` do the same for the two-launch path (``--two-launch-max-table -1``: never);
- ``moe_permute`` / ``moe_unpermute`` and ``ep_scatter`` / ``ep_gather`` for every M x E, reported also as
  achieved bandwidth (bytes that must move: each input row read once, each output row written once) and as
  a percentage of the device-to-device copy bandwidth measured in the same run.

Targets checked: align <= 10 us for M <= 4096; permute / unpermute >= 70 % of copy bandwidth for M >= 4096.

    python scripts/bench_ops.py --out bench_out/ops.json
    python scripts/bench_ops.py --out bench_out/align.json --align-only --tokens 1 64 128 256 512 4096 \
        --one-program-max 512 -1 --two-launch-max-table 16384 -1  # every combination of the limits

Align calls take a few microseconds on the GPU but tens of microseconds of Python to capture, so they are
timed with a shorter replay (``--align-rep-ms``): the graph of ``rep / eager time`` calls stays small.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ALIGN_TARGET_US = 10.0
BANDWIDTH_TARGET = 0.70


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where to write the JSON results")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 4096, 65536], help="M values")
    p.add_argument("--experts", type=int, nargs="+", default=[128, 256], help="global expert counts")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--hidden", type=int, default=7168, help="K of the permuted rows")
    p.add_argument("--dtype", choices=["bf16", "fp8"], default="bf16", help="dtype of the permuted rows")
    p.add_argument("--block-size", type=int, default=64, help="block_size for moe_align_block_size")
    p.add_argument("--align", type=int, default=128, help="align_block_size / alignment for permute and ep_scatter")
    p.add_argument("--rep-ms", type=int, default=100, help="replay time per measurement (ms)")
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the copy used as the bandwidth ceiling")
    p.add_argument(
        "--align-rep-ms", type=int, default=20, help="replay time per moe_align_block_size measurement (ms)"
    )
    p.add_argument("--align-only", action="store_true", help="time moe_align_block_size only")
    p.add_argument(
        "--one-program-max",
        type=int,
        nargs="+",
        default=None,
        help="time align with each of these one-program limits (slots; -1: never one program) instead of the default",
    )
    p.add_argument("--two-launch-chunk", type=int, nargs="+", default=None, help="two-launch chunk sizes to time (slots, power of two; default: by size)")
    p.add_argument(
        "--two-launch-max-table",
        type=int,
        nargs="+",
        default=None,
        help="two-launch count-table limits to time (chunks x experts; -1: never two launches)",
    )
    return p.parse_args(argv)


def bench(fn, rep_ms):
    """Median microseconds of ``fn`` replayed from a CUDA graph."""
    import triton.testing

    fn()  # compile and allocate outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3


def copy_bandwidth(mib, rep_ms):
    """Device-to-device copy rate (bytes read + written per second): the best of a few sizes up to ``mib``,
    each large enough to spill the L2 cache."""
    best = (0.0, 0.0, 0)
    for size in sorted({max(mib // 4, 64), mib}):
        src = torch.randn(size * 2**20 // 4, device="cuda")
        dst = torch.empty_like(src)
        us = bench(lambda: dst.copy_(src), rep_ms)
        gbps = 2 * src.numel() * 4 / (us * 1e-6) / 1e9
        if gbps > best[0]:
            best = (gbps, us, 2 * size * 2**20)
        del src, dst
    return best


def routing(m, k, e, device):
    scores = torch.randn(m, e, device=device)
    return torch.topk(scores, k, dim=-1).indices.to(torch.int32)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_ops.py needs a CUDA GPU")
    import triton

    from moe_plugin.ops.align import moe_align_block_size, moe_align_block_size_graph_safe
    from moe_plugin.ops.permute import ep_gather, ep_scatter, moe_permute, moe_unpermute

    dev = torch.device("cuda")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float8_e4m3fn
    elt = torch.empty((), dtype=dtype).element_size()
    k_hidden, top_k = args.hidden, args.topk
    groups = k_hidden // 128

    import moe_plugin.ops.align as align_mod

    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "args": vars(args),
        "align": [],
        "permute": [],
        "ep": [],
    }
    if not args.align_only:
        copy_gbps, copy_us, copy_bytes = copy_bandwidth(args.copy_mib, args.rep_ms)
        results["copy"] = {"GBps": copy_gbps, "us": copy_us, "bytes": copy_bytes}
        print(f"copy bandwidth: {copy_gbps:.0f} GB/s (read + write) on {results['device']}")

    defaults = (align_mod._ONE_PROGRAM_MAX_SLOTS, align_mod._TWO_LAUNCH_CHUNK, align_mod._TWO_LAUNCH_MAX_TABLE)
    variants = [
        (limit, chunk, table)
        for limit in args.one_program_max or [defaults[0]]
        for chunk in args.two_launch_chunk or [defaults[1]]
        for table in args.two_launch_max_table or [defaults[2]]
    ]
    variants.sort(key=lambda v: v != defaults)  # the defaults first, so deduplication never drops them
    for e in args.experts:
        for m in args.tokens:
            ids = routing(m, top_k, e, dev)
            valid = torch.tensor([m], dtype=torch.int32, device=dev)
            measured = set()
            for limit, chunk, table in variants:
                align_mod._ONE_PROGRAM_MAX_SLOTS, align_mod._TWO_LAUNCH_CHUNK, align_mod._TWO_LAUNCH_MAX_TABLE = (
                    limit,
                    chunk,
                    table,
                )
                n_blocks = align_mod.align_buffer_sizes(m * top_k, args.block_size, e)[1]
                launches = align_mod.align_launches(m * top_k, e, n_blocks)
                # Variants that land on the same kernels at this size are timed once.
                effective_chunk = align_mod._two_launch_chunk(m * top_k) if launches == 2 else None
                key = (launches, effective_chunk)
                if key in measured:
                    continue
                measured.add(key)
                align_us = bench(lambda: moe_align_block_size(ids, args.block_size, e), args.align_rep_ms)
                safe_us = bench(
                    lambda: moe_align_block_size_graph_safe(ids, args.block_size, e, valid), args.align_rep_ms
                )
                results["align"].append(
                    {
                        "M": m,
                        "E": e,
                        "block_size": args.block_size,
                        "one_program_max": limit,
                        "two_launch_chunk": effective_chunk,
                        "two_launch_max_table": table,
                        "default_limits": (limit, chunk, table) == defaults,
                        "launches": launches,
                        "us": align_us,
                        "graph_safe_us": safe_us,
                    }
                )
                print(
                    f"E={e:4d} M={m:6d}  align {align_us:7.1f} us (graph-safe {safe_us:7.1f})  {launches} launch(es), "
                    f"one-program limit {limit}, two-launch chunk {effective_chunk} table limit {table}",
                    flush=True,
                )
            align_mod._ONE_PROGRAM_MAX_SLOTS, align_mod._TWO_LAUNCH_CHUNK, align_mod._TWO_LAUNCH_MAX_TABLE = defaults
            if args.align_only:
                continue

            x = torch.randn(m, k_hidden, device=dev).to(dtype)
            scales = torch.rand(m, groups, device=dev) if dtype != torch.bfloat16 else None
            weights = torch.rand(m, top_k, device=dev)
            permuted, _, offsets, inv, _ = moe_permute(x, scales, ids, e, align_block_size=args.align)
            perm_us = bench(lambda: moe_permute(x, scales, ids, e, align_block_size=args.align), args.rep_ms)
            out = torch.empty(m, k_hidden, dtype=torch.bfloat16, device=dev)
            y = torch.randn(permuted.shape, device=dev).to(torch.bfloat16)
            unperm_us = bench(lambda: moe_unpermute(out, y, weights, inv, offsets), args.rep_ms)
            slots = m * top_k
            scale_bytes = (m + slots) * groups * 4 if scales is not None else 0
            perm_bytes = m * k_hidden * elt + slots * k_hidden * elt + scale_bytes
            unperm_bytes = slots * k_hidden * 2 + m * k_hidden * 2
            row = {
                "M": m,
                "E": e,
                "K": k_hidden,
                "dtype": args.dtype,
                "permute_us": perm_us,
                "permute_GBps": perm_bytes / (perm_us * 1e-6) / 1e9,
                "unpermute_us": unperm_us,
                "unpermute_GBps": unperm_bytes / (unperm_us * 1e-6) / 1e9,
            }
            row["permute_pct_copy"] = 100 * row["permute_GBps"] / copy_gbps
            row["unpermute_pct_copy"] = 100 * row["unpermute_GBps"] / copy_gbps
            results["permute"].append(row)

            scat = ep_scatter(x, scales, ids, e, alignment=args.align)
            scat_us = bench(lambda: ep_scatter(x, scales, ids, e, alignment=args.align), args.rep_ms)
            y2 = torch.randn(scat.hidden_states.shape, device=dev).to(torch.bfloat16)
            gath_us = bench(lambda: ep_gather(y2, weights, scat.inv_perm, out=out), args.rep_ms)
            results["ep"].append(
                {
                    "M": m,
                    "E": e,
                    "scatter_us": scat_us,
                    "scatter_pct_copy": 100 * perm_bytes / (scat_us * 1e-6) / 1e9 / copy_gbps,
                    "gather_us": gath_us,
                    "gather_pct_copy": 100 * unperm_bytes / (gath_us * 1e-6) / 1e9 / copy_gbps,
                }
            )
            print(
                f"E={e:4d} M={m:6d}  "
                f"permute {perm_us:8.1f} us {row['permute_pct_copy']:5.1f}%  unpermute {unperm_us:8.1f} us "
                f"{row['unpermute_pct_copy']:5.1f}%  ep_scatter {scat_us:8.1f} us  ep_gather {gath_us:8.1f} us",
                flush=True,
            )
            del x, permuted, y, y2, scat

    # The target is checked with the default limits only.
    small = [r for r in results["align"] if r["M"] <= 4096 and r["default_limits"]]
    large = [r for r in results["permute"] if r["M"] >= 4096]
    results["targets"] = {
        "align_max_us_M_le_4096": max((r["us"] for r in small), default=None),
        "align_ok": all(r["us"] <= ALIGN_TARGET_US for r in small) if small else None,
        "permute_min_pct_copy_M_ge_4096": min((r["permute_pct_copy"] for r in large), default=None),
        "unpermute_min_pct_copy_M_ge_4096": min((r["unpermute_pct_copy"] for r in large), default=None),
        "bandwidth_ok": all(
            min(r["permute_pct_copy"], r["unpermute_pct_copy"]) >= 100 * BANDWIDTH_TARGET for r in large
        ),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results["targets"], indent=2))


if __name__ == "__main__":
    main()
