"""Run an MoE layer through moe_plugin and check it against the torch reference.

Single process by default; the EP version (torchrun) arrives with the all-to-all backend.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

import moe_plugin as mp
from moe_plugin.experts.torch_ref import TorchExperts
from moe_plugin.modular import ModularKernel
from moe_plugin.prepare_finalize.local import LocalPrepareAndFinalize

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    config = mp.MoEConfig(args.experts, args.top_k, args.hidden, args.intermediate, dtype=dtype)
    torch.manual_seed(args.seed)
    layer = mp.FusedMoE(config, with_gate=True, device=device)
    with torch.no_grad():
        layer.w13_weight.normal_(0, args.hidden**-0.5)
        layer.w2_weight.normal_(0, args.intermediate**-0.5)
        layer.gate.weight.normal_(0, args.hidden**-0.5)
    x = torch.randn(args.tokens, args.hidden, dtype=dtype, device=device)

    print(mp.explain(config, device))
    out = layer(x)
    reference = ModularKernel(LocalPrepareAndFinalize(config.quant), TorchExperts(config))
    w, ids = layer.route(x, layer.gate(x))
    ref = reference(x.float(), mp.ExpertWeights(layer.w13_weight.float(), layer.w2_weight.float()), w, ids)
    err = ((out.float() - ref).norm() / ref.norm()).item()

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.iters):
        layer(x)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / args.iters
    print(f"kernel: {layer.kernel.describe()}")
    print(f"relative error vs fp32 torch reference: {err:.2e}")
    print(f"tokens/s: {args.tokens / elapsed:,.0f}")
    tolerance = 2e-2 if dtype != torch.float32 else 1e-5
    if err > tolerance:
        raise SystemExit(f"error {err:.2e} above tolerance {tolerance:.0e}")


if __name__ == "__main__":
    main()
