"""End-to-end FusedMoE layer throughput (tokens/s) under torchrun, with the oracle's backend pair.

    torchrun --nproc-per-node 2 scripts/bench_layer.py --preset deepseek-v3 --out layer.json

Every rank builds the layer for its slice of the experts (ParallelConfig(ep_size=world)), routes random
tokens with DeepSeek-V3's grouped top-k, and times decode (128 tokens per rank) and prefill (4096 tokens
per rank) steps. Rank 0 writes JSON with per-rank tokens/s and the explain() line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

import moe_plugin as mp

PRESETS = {
    # E, top-k, K (hidden), N (intermediate), groups, topk_group
    "deepseek-v3": (256, 8, 7168, 2048, 8, 4),
    "qwen3-30b-a3b": (128, 8, 2048, 768, 0, 0),
    "tiny": (16, 4, 256, 128, 0, 0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="deepseek-v3")
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 4096], help="tokens per rank per step")
    p.add_argument("--dtype", choices=["bf16", "fp8"], default="bf16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")

    e, top_k, hidden, inter, groups, topk_group = PRESETS[args.preset]
    quant = mp.QuantConfig.fp8_block() if args.dtype == "fp8" else mp.QuantConfig()
    dtype = torch.bfloat16 if use_cuda else torch.float32
    results = []
    for tokens in args.tokens:
        config = mp.MoEConfig(
            e, top_k, hidden, inter, dtype=dtype, quant=quant,
            parallel=mp.ParallelConfig(world, rank), max_num_tokens=max(tokens, 1),
        )
        layer = mp.FusedMoE(
            config, device=device, use_grouped_topk=groups > 0, num_expert_group=groups, topk_group=topk_group,
            scoring_func="sigmoid" if groups else "softmax",
        )
        with torch.no_grad():
            if quant.is_quantized:
                layer.w13_weight.copy_(torch.randn(layer.w13_weight.shape, device=device).mul_(0.5).to(layer.w13_weight.dtype))
                layer.w2_weight.copy_(torch.randn(layer.w2_weight.shape, device=device).mul_(0.5).to(layer.w2_weight.dtype))
                layer.w13_weight_scale.fill_(hidden**-0.5 / 8)
                layer.w2_weight_scale.fill_(inter**-0.5 / 8)
            else:
                layer.w13_weight.normal_(0, hidden**-0.5)
                layer.w2_weight.normal_(0, inter**-0.5)
        gen = torch.Generator(device=device).manual_seed(1234 + rank)
        x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=gen)
        logits = torch.randn(tokens, e, device=device, dtype=torch.float32, generator=gen)
        with torch.no_grad():
            for _ in range(args.warmup):
                layer(x, logits)
            if use_cuda:
                torch.cuda.synchronize()
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            for _ in range(args.iters):
                layer(x, logits)
            if use_cuda:
                torch.cuda.synchronize()
            elapsed = (time.perf_counter() - start) / args.iters
        row = {
            "tokens_per_rank": tokens,
            "ms_per_step": elapsed * 1e3,
            "tokens_per_s_per_rank": tokens / elapsed,
            "kernel": layer.kernel.describe(),
        }
        gathered = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, row)
        else:
            gathered = [row]
        if rank == 0:
            total = sum(r["tokens_per_s_per_rank"] for r in gathered)
            print(f"{args.preset} {args.dtype} world={world} tokens/rank={tokens}: "
                  f"{total:,.0f} tokens/s total, {gathered[0]['ms_per_step']:.2f} ms/step, {row['kernel']}")
            results.append({"world_size": world, "per_rank": gathered, "tokens_per_s_total": total})
        del layer
        if use_cuda:
            torch.cuda.empty_cache()
    if rank == 0:
        meta = {
            "preset": args.preset, "dtype": args.dtype, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if use_cuda else "cpu",
            "date": time.strftime("%Y-%m-%d"),
        }
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
