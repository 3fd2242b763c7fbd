"""Expert-parallel MoE layer under torchrun, checked against the single-process torch reference.

    torchrun --standalone --nproc-per-node 2 examples/ep_moe.py            # CPU, gloo
    torchrun --standalone --nproc-per-node 8 examples/ep_moe.py --backend nccl
    python examples/ep_moe.py                                               # one rank, no communication

Every rank generates the same full expert weights from one seed, builds a ``FusedMoE`` that owns its
``num_experts / world`` slice (``ParallelConfig(ep_size=world, ep_rank=rank)``), loads that slice from the
stacked global tensors and runs its own tokens; the oracle picks the all-to-all backend. Each rank then
computes the reference for its tokens with the torch experts over the *full* weights in one process and
compares. Rank 0 prints the oracle's explanation and one line per rank: tokens, tokens/s, bytes moved per
step, errors. The exit status is non-zero on every rank when any rank's error is above the tolerance.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch
import torch.distributed as dist

import moe_plugin as mp
from moe_plugin.distributed import init_distributed
from moe_plugin.experts.torch_ref import TorchExperts
from moe_plugin.modular import ModularKernel
from moe_plugin.ops.quant import quantize_block_weight
from moe_plugin.prepare_finalize.local import LocalPrepareAndFinalize

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative L2 error against the single-process reference. With low precision the per-rank partial sums
# are rounded to the model dtype before the origin adds them; FP8 runs both sides with the same quantized
# weights and the same per-token activation quantization, so its bound is the model dtype's too.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=64, help="global experts (Qwen3-MoE: 128)")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512, help="hidden size K (Qwen3-30B-A3B: 2048)")
    p.add_argument("--intermediate", type=int, default=192, help="expert intermediate size N (Qwen3-30B-A3B: 768)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--fp8", action="store_true", help="FP8 block-quantized weights and dispatch (hidden % 128 == 0)")
    p.add_argument("--batched", action="store_true", help="force the batched all-to-all backend")
    p.add_argument("--max-num-tokens", type=int, default=256, help="tokens per rank the batched layout holds")
    p.add_argument("--placement", choices=["contiguous", "round_robin"], default="contiguous")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["gloo", "nccl"], default=None, help="default: nccl with CUDA, else gloo")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a stalled peer fails the others")
    return p.parse_args()


def full_weights(args, dtype, quant: mp.QuantConfig) -> dict[str, torch.Tensor]:
    """The whole layer's weights, identical on every rank (same seed), as stacked global tensors."""
    g = torch.Generator().manual_seed(args.seed)
    e, k, n = args.experts, args.hidden, args.intermediate
    w13 = torch.randn(e, 2 * n, k, generator=g) * k**-0.5
    w2 = torch.randn(e, k, n, generator=g) * n**-0.5
    gate = torch.randn(e, k, generator=g) * k**-0.5
    out = {"mlp.gate.weight": gate.to(dtype)}
    if quant.is_quantized:
        out["mlp.experts.w13_weight"], out["mlp.experts.w13_weight_scale"] = quantize_block_weight(w13, quant.block_shape)
        out["mlp.experts.w2_weight"], out["mlp.experts.w2_weight_scale"] = quantize_block_weight(w2, quant.block_shape)
    else:
        out["mlp.experts.w13_weight"], out["mlp.experts.w2_weight"] = w13.to(dtype), w2.to(dtype)
    return out


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    ep = init_distributed(args.backend, timeout=args.timeout)
    rank, world = ep.rank, ep.world_size
    device = ep.device if ep.device.type == "cuda" else torch.device("cpu")
    dtype = DTYPES[args.dtype]
    quant = mp.QuantConfig.fp8_block() if args.fp8 else mp.QuantConfig()
    config = mp.MoEConfig(
        args.experts, args.top_k, args.hidden, args.intermediate, dtype=dtype, quant=quant,
        parallel=mp.ParallelConfig(ep_size=world, ep_rank=rank, placement=args.placement),
        max_num_tokens=args.max_num_tokens,
    )
    forced = "batched_all2all" if args.batched and world > 1 else None
    layer = mp.FusedMoE(config, with_gate=True, device=device, prepare_finalize_backend=forced)
    weights = full_weights(args, dtype, quant)
    layer.load_weights({name: t.to(device) for name, t in weights.items()})

    g = torch.Generator().manual_seed(args.seed * 1000 + 1 + rank)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(dtype).to(device)
    with torch.no_grad():
        out = layer(x)
        # The reference: this rank's tokens through the torch experts over all experts, in one process.
        topk_weights, topk_ids = layer.route(x, layer.gate(x))
        full = mp.MoEConfig(args.experts, args.top_k, args.hidden, args.intermediate, dtype=dtype, quant=quant)
        reference = ModularKernel(LocalPrepareAndFinalize(quant), TorchExperts(full))
        ew = mp.ExpertWeights(
            weights["mlp.experts.w13_weight"].to(device), weights["mlp.experts.w2_weight"].to(device),
            weights.get("mlp.experts.w13_weight_scale", None), weights.get("mlp.experts.w2_weight_scale", None),
        )
        if quant.is_quantized:
            ew.w1_scale, ew.w2_scale = ew.w1_scale.to(device), ew.w2_scale.to(device)
        else:
            ew = mp.ExpertWeights(ew.w1.float(), ew.w2.float())
        ref = reference(x.float() if not quant.is_quantized else x, ew, topk_weights, topk_ids).float()
        diff = (out.float() - ref).abs()
        max_err = diff.max().item() if diff.numel() else 0.0
        rel_err = (diff.norm() / ref.norm().clamp_min(1e-30)).item() if diff.numel() else 0.0

        stats = getattr(layer.kernel.prepare_finalize, "stats", None)
        if stats is not None:
            stats.reset()
        if world > 1:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.iters):
            layer(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) / max(args.iters, 1)

    moved = 0
    if stats is not None and stats.steps:
        moved = (stats.total_bytes["dispatch_bytes_sent"] + stats.total_bytes["combine_bytes_sent"]) // args.iters
    tolerance = TOLERANCE[dtype]
    row = {
        "rank": rank,
        "tokens": args.tokens,
        "tokens_per_s": args.tokens / elapsed if elapsed > 0 else float("inf"),
        "bytes_per_step": moved,
        "max_err": max_err,
        "rel_err": rel_err,
        "ok": rel_err <= tolerance,
        "kernel": layer.kernel.describe(),
    }
    rows = [None] * world
    if world > 1:
        dist.all_gather_object(rows, row)
    else:
        rows = [row]
    if rank == 0:
        print(mp.explain(config, device, prepare_finalize=forced))
        print(f"explain: {rows[0]['kernel']} | {ep.describe()} | {config.num_experts} experts "
              f"({config.num_local_experts}/rank, {args.placement}), top-{config.top_k}, K={config.hidden_size}, "
              f"N={config.intermediate_size}, {args.dtype}{' + fp8 dispatch' if args.fp8 else ''}")
        for r in rows:
            print(
                f"rank {r['rank']}: {r['tokens']} tokens, {r['tokens_per_s']:,.0f} tokens/s, "
                f"{r['bytes_per_step'] / 1e6:.3f} MB moved/step (dispatch+combine sent), "
                f"max error {r['max_err']:.3e}, relative error {r['rel_err']:.2e} "
                f"(tolerance {tolerance:.0e}) {'OK' if r['ok'] else 'FAIL'}"
            )
        print(f"total: {sum(r['tokens_per_s'] for r in rows):,.0f} tokens/s over {world} rank(s)")
    failed = not all(r["ok"] for r in rows)
    if world > 1:
        dist.barrier()
    dist.destroy_process_group()
    if failed:
        print(f"rank {rank}: error above tolerance {tolerance:.0e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
