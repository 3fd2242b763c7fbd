"""Dispatch and combine latency and bandwidth of the EP prepare/finalize backends, under torchrun.

    torchrun --standalone --nproc-per-node 2 scripts/bench_ep.py                      # CPU / gloo sweep
    torchrun --standalone --nproc-per-node 8 scripts/bench_ep.py --backend nccl \\
        --preset deepseek-v3-decode --preset deepseek-v3-prefill                       # GPUs / NCCL
    torchrun --standalone --nproc-per-node 8 scripts/bench_ep.py --backend nccl --pf deepep_ll \\
        --preset deepseek-v3-decode                                                    # DeepEP low-latency

``--pf`` picks the backend: ``all2all`` (ours; ``--format`` standard or batched), ``deepep_ht`` (DeepEP
high-throughput, Standard format) or ``deepep_ll`` (DeepEP low-latency, Batched format; its buffer is sized
for the point's tokens per rank).

For every (hidden size, tokens per rank) point, each rank routes random tokens (uniform top-k), then times
``prepare`` (dispatch: count exchange, packing, FP8 quantization when asked, the all-to-all) and
``finalize`` (combine: the receiver's reduction, the all-to-all back, the origin's sum) separately, with a
barrier before every timed step. The experts are not run: combine sends a ready-made ``[R, K]`` output.
Latency is the median over iterations of the slowest rank; bandwidth is the bytes a rank sends per step
over that latency. For every backend the bytes are counted the same way, from the routing: one payload
row (plus its FP8 scales when dispatching FP8) per (token, destination rank) pair whose destination is
another rank; combine sends the rows back in the model dtype. DeepEP's low-latency mode actually sends one
row per (token, expert) pair, so its real traffic is higher than this count.

Presets (DeepSeek-V3: hidden 7168, top-8 of 256 experts, FP8 block dispatch, bf16 combine):
``deepseek-v3-decode`` (128 tokens per rank) and ``deepseek-v3-prefill`` (4096 tokens per rank).

Rank 0 writes ``bench_ep_<backend>_w<world>.json`` and, when matplotlib imports, a PNG next to it under
``--out`` (default ``$OUT`` if set, else ``bench_out/``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from moe_plugin import MoEConfig, ParallelConfig, QuantConfig
from moe_plugin.distributed import init_distributed
from moe_plugin.modular import WeightAndReduceDelegate, WeightAndReduceNoOp
from moe_plugin.prepare_finalize.all2all import AllToAllPrepareAndFinalize, BatchedAllToAllPrepareAndFinalize

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PRESETS = {
    "deepseek-v3-decode": dict(hidden=7168, experts=256, top_k=8, tokens=128, dtype="bf16", fp8=True),
    "deepseek-v3-prefill": dict(hidden=7168, experts=256, top_k=8, tokens=4096, dtype="bf16", fp8=True),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["gloo", "nccl"], default=None, help="default: nccl with CUDA, else gloo")
    p.add_argument("--tokens", default="1,8,32,128,512,2048", help="comma-separated tokens per rank (sweep)")
    p.add_argument("--hidden", default="1024,4096", help="comma-separated hidden sizes (sweep)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="model dtype (combine travels in it)")
    p.add_argument("--fp8", action="store_true", help="FP8 block dispatch in the sweep (hidden % 128 == 0)")
    p.add_argument("--format", choices=["standard", "batched"], default="standard",
                   help="all2all's output format (DeepEP HT is standard, DeepEP LL batched)")
    p.add_argument("--pf", choices=["all2all", "deepep_ht", "deepep_ll"], default="all2all",
                   help="prepare/finalize backend")
    p.add_argument("--preset", action="append", choices=sorted(PRESETS), default=[],
                   help="run a named point instead of the sweep (repeatable)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="also profile 3 dispatch+combine steps of each point (torch.profiler, rank 0 writes a table)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    return p.parse_args()


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"expected positive ints, got {text!r}")
    return values


def points(args) -> list[dict]:
    if args.preset:
        return [dict(name=name, **PRESETS[name]) for name in args.preset]
    return [
        dict(name=f"sweep-h{h}-t{t}", hidden=h, experts=args.experts, top_k=args.top_k, tokens=t,
             dtype=args.dtype, fp8=args.fp8)
        for h in _ints(args.hidden)
        for t in _ints(args.tokens)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_prepare_finalize(name: str, batched: bool, config: MoEConfig, ep, tokens: int):
    if name == "deepep_ht":
        from moe_plugin.prepare_finalize.deepep_ht import DeepEPHTPrepareAndFinalize

        return DeepEPHTPrepareAndFinalize.from_config(config, ep)
    if name == "deepep_ll":
        from moe_plugin.prepare_finalize.deepep_ll import DeepEPLLPrepareAndFinalize

        return DeepEPLLPrepareAndFinalize.from_config(config, ep, max_num_tokens=max(tokens, 1))
    cls = BatchedAllToAllPrepareAndFinalize if batched else AllToAllPrepareAndFinalize
    return cls.from_config(config, ep)


def routed_bytes(ids: torch.Tensor, experts: int, world: int, rank: int, row_bytes: int) -> int:
    """Bytes of the rows this rank sends to other ranks: one per (token, other destination rank) pair."""
    per_rank = -(-experts // world)
    dst = ids.long().cpu() // per_rank
    hit = torch.zeros(ids.shape[0], world, dtype=torch.bool)
    hit.scatter_(1, dst, True)
    hit[:, rank] = False
    return int(hit.sum()) * row_bytes


def bench_point(pt: dict, args, ep, device) -> dict:
    world, rank = ep.world_size, ep.rank
    dtype = DTYPES[pt["dtype"]]
    quant = QuantConfig.fp8_block() if pt["fp8"] else QuantConfig()
    batched = args.format == "batched" or args.pf == "deepep_ll"
    if args.pf.startswith("deepep") and dtype != torch.bfloat16:
        raise SystemExit(f"--pf {args.pf} dispatches bfloat16 models only, got --dtype {pt['dtype']}")
    config = MoEConfig(pt["experts"], pt["top_k"], pt["hidden"], 128, dtype=dtype, quant=quant,
                       parallel=ParallelConfig(world, rank), max_num_tokens=max(pt["tokens"], 1))
    pf = make_prepare_finalize(args.pf, batched, config, ep, pt["tokens"])
    g = torch.Generator().manual_seed(args.seed * 1000 + rank)
    m = pt["tokens"]
    x = torch.randn(m, pt["hidden"], generator=g).to(dtype).to(device)
    ids = torch.rand(m, pt["experts"], generator=g).topk(pt["top_k"], dim=1).indices.to(torch.int32).to(device)
    weights = torch.rand(m, pt["top_k"], generator=g).to(device)
    out = torch.empty_like(x)
    wr = WeightAndReduceDelegate() if batched else WeightAndReduceNoOp()
    kw = dict(num_experts=pt["experts"], expert_map=None, apply_router_weight_on_input=False, a1_scale=None)
    dispatch_s, combine_s = [], []
    for it in range(args.warmup + args.iters):
        dist.barrier(group=ep.group)
        _sync(device)
        t0 = time.perf_counter()
        prepared = pf.prepare(x, weights, ids, **kw)
        _sync(device)
        t1 = time.perf_counter()
        if batched:
            fused = torch.zeros(prepared.hidden_states.shape[:-1] + (pt["hidden"],), dtype=dtype, device=device)
        else:
            fused = torch.zeros(prepared.hidden_states.shape[0], pt["hidden"], dtype=dtype, device=device)
        dist.barrier(group=ep.group)
        _sync(device)
        t2 = time.perf_counter()
        pf.finalize(out, fused, prepared, weights, ids, apply_router_weight_on_input=False, weight_and_reduce=wr)
        _sync(device)
        t3 = time.perf_counter()
        if it >= args.warmup:
            dispatch_s.append(t1 - t0)
            combine_s.append(t3 - t2)
    if args.profile:
        profile_steps(pf, x, weights, ids, kw, batched, dtype, pt, wr, ep, device, args.out)
    in_bytes = pt["hidden"] + 4 * (pt["hidden"] // 128) if pt["fp8"] else pt["hidden"] * x.element_size()
    dispatch_bytes = routed_bytes(ids, pt["experts"], world, rank, in_bytes)
    mine = {
        "dispatch_s": statistics.median(dispatch_s),
        "combine_s": statistics.median(combine_s),
        "dispatch_bytes": dispatch_bytes,
        "combine_bytes": dispatch_bytes // in_bytes * pt["hidden"] * x.element_size(),
        "rows_sent": dispatch_bytes // in_bytes,
    }
    every = [None] * world
    dist.all_gather_object(every, mine, group=ep.group)
    slow_d = max(r["dispatch_s"] for r in every)
    slow_c = max(r["combine_s"] for r in every)
    d_bytes = statistics.mean(r["dispatch_bytes"] for r in every)
    c_bytes = statistics.mean(r["combine_bytes"] for r in every)
    return {
        **pt,
        "format": "batched" if batched else "standard",
        "pf": args.pf,
        "quant": quant.name,
        "world": world,
        "backend": ep.backend,
        "dispatch_ms": slow_d * 1e3,
        "combine_ms": slow_c * 1e3,
        "dispatch_bytes_per_rank": d_bytes,
        "combine_bytes_per_rank": c_bytes,
        "dispatch_GBps": d_bytes / slow_d / 1e9 if slow_d > 0 else None,
        "combine_GBps": c_bytes / slow_c / 1e9 if slow_c > 0 else None,
        "rows_sent_per_rank": statistics.mean(r["rows_sent"] for r in every),
        "per_rank": every,
    }


def profile_steps(pf, x, weights, ids, kw, batched, dtype, pt, wr, ep, device, out_dir) -> None:
    """Where the time of a step goes: CPU ops, host syncs and kernels of three dispatch+combine steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = torch.empty_like(x)
    dist.barrier(group=ep.group)
    with profile(activities=activities) as prof:
        for _ in range(3):
            prepared = pf.prepare(x, weights, ids, **kw)
            rows = prepared.hidden_states.shape[:-1] if batched else prepared.hidden_states.shape[:1]
            fused = torch.zeros(rows + (pt["hidden"],), dtype=dtype, device=device)
            pf.finalize(out, fused, prepared, weights, ids, apply_router_weight_on_input=False, weight_and_reduce=wr)
            _sync(device)
    if ep.rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"profile_{pt['name']}_rank0.txt")
        with open(path, "w") as f:
            f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
            if device.type == "cuda":
                f.write("\n\n")
                f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
        print(f"wrote {path}", flush=True)


def plot(records: list[dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # optional dependency
        return f"matplotlib not importable ({type(exc).__name__}: {exc}); skipped the PNG"
    fig, (ax_lat, ax_bw) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["hidden"], r["quant"], r["name"] if r["name"] in PRESETS else ""), []).append(r)
    for (hidden, quant, preset), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["tokens"])
        label = preset or f"K={hidden} {quant}"
        t = [r["tokens"] for r in rs]
        ax_lat.plot(t, [r["dispatch_ms"] for r in rs], "o-", label=f"dispatch {label}")
        ax_lat.plot(t, [r["combine_ms"] for r in rs], "s--", label=f"combine {label}")
        ax_bw.plot([r["dispatch_bytes_per_rank"] for r in rs], [r["dispatch_GBps"] for r in rs], "o-",
                   label=f"dispatch {label}")
        ax_bw.plot([r["combine_bytes_per_rank"] for r in rs], [r["combine_GBps"] for r in rs], "s--",
                   label=f"combine {label}")
    r0 = records[0]
    ax_lat.set(xscale="log", yscale="log", xlabel="tokens per rank", ylabel="latency, ms (slowest rank, median)",
               title=f"{r0['pf']} EP, {r0['world']} ranks over {r0['backend']}")
    ax_bw.set(xscale="log", xlabel="bytes sent per rank per step", ylabel="GB/s per rank", title="bandwidth")
    for ax in (ax_lat, ax_bw):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main() -> int:
    args = parse_args()
    ep = init_distributed(args.backend, timeout=args.timeout)
    device = ep.device if ep.device.type == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ep.world_size))
    records = []
    for pt in points(args):
        if args.pf == "deepep_ll":
            from moe_plugin.prepare_finalize.deepep_ll import DeepEPLLPrepareAndFinalize

            cfg = MoEConfig(pt["experts"], pt["top_k"], pt["hidden"], 128, parallel=ParallelConfig(ep.world_size, ep.rank),
                            max_num_tokens=max(pt["tokens"], 1))
            problems = DeepEPLLPrepareAndFinalize._mode_problems(cfg)
            if problems:  # the same on every rank: a config fact, so no rank is left waiting
                if ep.rank == 0:
                    print(f"{args.pf:<9} {pt['name']:<22} skipped: {'; '.join(problems)}", flush=True)
                continue
        rec = bench_point(pt, args, ep, device)
        records.append(rec)
        if ep.rank == 0:
            print(
                f"{args.pf:<9} {rec['name']:<22} K={rec['hidden']:<5} tokens/rank={rec['tokens']:<5} {rec['quant']:<18} "
                f"dispatch {rec['dispatch_ms']:8.3f} ms {rec['dispatch_bytes_per_rank'] / 1e6:9.3f} MB "
                f"{rec['dispatch_GBps'] or 0:7.3f} GB/s | combine {rec['combine_ms']:8.3f} ms "
                f"{rec['combine_bytes_per_rank'] / 1e6:9.3f} MB {rec['combine_GBps'] or 0:7.3f} GB/s",
                flush=True,
            )
    if ep.rank == 0:
        os.makedirs(args.out, exist_ok=True)
        tag = "_presets" if args.preset else ("_fp8" if args.fp8 else "") + ("_batched" if args.format == "batched" else "")
        pf_tag = "" if args.pf == "all2all" else f"_{args.pf}"
        stem = os.path.join(args.out, f"bench_ep_{ep.backend}{pf_tag}_w{ep.world_size}{tag}")
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        with open(stem + ".json", "w") as f:
            json.dump({"device": device_name, "world": ep.world_size, "backend": ep.backend,
                       "torch": torch.__version__, "records": records}, f, indent=1)
        print(f"wrote {stem}.json")
        skipped = plot(records, stem + ".png") if records else "no point ran; no PNG"
        print(skipped or f"wrote {stem}.png")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
