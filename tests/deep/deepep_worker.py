"""One rank of the DeepEP multi-GPU tests; launched by ``test_deepep_multigpu.py`` under torchrun.

Every case builds the same global problem on every rank from fixed seeds (all experts' weights, every
rank's tokens and routing), runs this rank's tokens through ``ModularKernel(DeepEP backend, experts)`` with
this rank's slice of the weights, and compares with the single-process reference: ``TorchExperts`` over
ALL experts on the same tokens, with the same activation quantization. Results go to ``rank{R}.json``.

Usage: ``torchrun --standalone --nproc-per-node=N tests/deep/deepep_worker.py --out DIR [--only SUBSTR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

from moe_plugin import ExpertPlacement, ExpertWeights, ModularKernel, MoEConfig, ParallelConfig, QuantConfig
from moe_plugin.distributed import build_expert_map, init_distributed, local_expert_ids
from moe_plugin.experts.torch_ref import BatchedTorchExperts, TorchExperts
from moe_plugin.ops.quant import quantize_block_weight
from moe_plugin.prepare_finalize.local import LocalPrepareAndFinalize

HIDDEN = 2048  # a low-latency hidden size
INTER = 256
LOCAL_EXPERTS = 4
TOP_K = 4


def global_problem(world: int, tokens_per_rank: list[int], seed: int, skew: bool, quant: QuantConfig):
    g = torch.Generator(device="cuda").manual_seed(seed)
    e = LOCAL_EXPERTS * world
    w1 = torch.randn(e, 2 * INTER, HIDDEN, device="cuda", generator=g) * 0.03
    w2 = torch.randn(e, HIDDEN, INTER, device="cuda", generator=g) * 0.03
    if quant.is_quantized:
        (w1, s1), (w2, s2) = quantize_block_weight(w1), quantize_block_weight(w2)
        weights = ExpertWeights(w1, w2, s1, s2)
    else:
        weights = ExpertWeights(w1.bfloat16(), w2.bfloat16())
    xs, ws, ids = [], [], []
    for m in tokens_per_rank:
        x = torch.randn(m, HIDDEN, device="cuda", generator=g).bfloat16()
        logits = torch.randn(m, e, device="cuda", generator=g)
        if skew:
            logits[:, :LOCAL_EXPERTS] += 5.0  # nearly everything goes to rank 0's experts
        w, i = torch.topk(torch.softmax(logits, -1), TOP_K)
        xs.append(x)
        ws.append(w.float())
        ids.append(i.to(torch.int32))
    return weights, xs, ws, ids


def slice_weights(weights: ExpertWeights, owned: list[int]) -> ExpertWeights:
    idx = torch.tensor(owned, device=weights.w1.device)
    pick = lambda t: None if t is None else t.index_select(0, idx).contiguous()  # noqa: E731
    return ExpertWeights(pick(weights.w1), pick(weights.w2), pick(weights.w1_scale), pick(weights.w2_scale))


def rel_err(got, ref) -> float:
    if ref.numel() == 0:
        return 0.0 if got.numel() == 0 else float("inf")
    return ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-6)).item()


def deep_gemm_ok() -> bool:
    try:
        from moe_plugin.experts.deep_gemm import deep_gemm_api

        deep_gemm_api()
        return torch.cuda.get_device_capability()[0] == 9  # fp32-scale configs below
    except Exception:
        return False


def cases(world: int):
    fp8, bf16 = QuantConfig.fp8_block(), QuantConfig()
    uneven = [97 + 61 * r for r in range(world)]
    for mode in ("ht", "ll"):
        batched = mode == "ll"
        experts = ["batched_torch"] if batched else ["torch"]
        if deep_gemm_ok():
            experts.append("batched_deep_gemm" if batched else "deep_gemm")
        for expert in experts:
            quants = [("fp8", fp8)] if "deep_gemm" in expert else [("bf16", bf16), ("fp8", fp8)]
            for qname, quant in quants:
                yield f"{mode}-{expert}-{qname}-uniform", dict(mode=mode, experts=expert, quant=quant, tokens=[64] * world)
                yield f"{mode}-{expert}-{qname}-skewed", dict(mode=mode, experts=expert, quant=quant, tokens=uneven, skew=True)
                empty = [0 if r == world - 1 else 80 for r in range(world)]
                yield f"{mode}-{expert}-{qname}-empty-rank", dict(mode=mode, experts=expert, quant=quant, tokens=empty)
        # more tokens than the low-latency buffer holds: ModularKernel chunks, ranks agree on the count
        big = [300 if r == 0 else 40 for r in range(world)]
        yield f"{mode}-chunked", dict(mode=mode, experts=experts[0], quant=fp8, tokens=big)
        yield f"{mode}-round-robin", dict(mode=mode, experts=experts[0], quant=bf16, tokens=uneven,
                                          placement=ExpertPlacement.ROUND_ROBIN)


def build_experts(name: str, cfg: MoEConfig):
    if name == "torch":
        return TorchExperts(cfg)
    if name == "batched_torch":
        return BatchedTorchExperts(cfg)
    if name == "deep_gemm":
        from moe_plugin.experts.deep_gemm import DeepGemmExperts

        return DeepGemmExperts(cfg)
    from moe_plugin.experts.batched_deep_gemm import BatchedDeepGemmExperts

    return BatchedDeepGemmExperts(cfg)


def run_case(rank: int, world: int, spec: dict, seed: int) -> dict:
    quant = spec["quant"]
    placement = spec.get("placement", ExpertPlacement.CONTIGUOUS)
    parallel = ParallelConfig(world, rank, placement)
    e = LOCAL_EXPERTS * world
    cfg = MoEConfig(e, TOP_K, HIDDEN, INTER, quant=quant, parallel=parallel, max_num_tokens=128)
    weights, xs, ws, ids = global_problem(world, spec["tokens"], seed, spec.get("skew", False), quant)
    if spec["mode"] == "ht":
        from moe_plugin.prepare_finalize.deepep_ht import DeepEPHTPrepareAndFinalize as PF
    else:
        from moe_plugin.prepare_finalize.deepep_ll import DeepEPLLPrepareAndFinalize as PF
    kernel = ModularKernel(PF.from_config(cfg), build_experts(spec["experts"], cfg))
    local = slice_weights(weights, local_expert_ids(e, parallel))
    emap = build_expert_map(e, parallel, "cuda")
    x, w, i = xs[rank], ws[rank], ids[rank]
    out = kernel(x, local, w, i, global_num_experts=e, expert_map=emap)
    torch.cuda.synchronize()
    full_cfg = MoEConfig(e, TOP_K, HIDDEN, INTER, quant=quant)
    ref = ModularKernel(LocalPrepareAndFinalize(quant), TorchExperts(full_cfg))(x, weights, w, i)
    err = rel_err(out, ref)
    tol = 0.03 if quant.is_quantized else 0.01
    problems = [] if err <= tol else [f"relative error {err:.4g} > {tol}"]
    if not torch.isfinite(out).all():
        problems.append("non-finite values in the output")
    return {"err_torch": err, "tol_torch": tol, "tokens": x.shape[0], "problems": problems}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    ep = init_distributed("nccl", timeout=300)
    rank, world = ep.rank, ep.world_size
    results = {}
    for seed, (name, spec) in enumerate(cases(world)):
        if args.only and args.only not in name:
            continue
        start = time.perf_counter()
        try:
            rec = run_case(rank, world, spec, seed)
        except Exception:
            rec = {"problems": [traceback.format_exc()[-3000:]]}
        rec["seconds"] = round(time.perf_counter() - start, 3)
        results[name] = rec
        status = "ok" if not rec["problems"] else "FAIL"
        print(f"[rank {rank}] {name}: {status} {rec.get('err_torch', '')}", flush=True)
    from moe_plugin.prepare_finalize.deepep_common import release_buffers

    torch.distributed.barrier()
    release_buffers()
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    torch.distributed.destroy_process_group()
    return 0 if all(not r["problems"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
