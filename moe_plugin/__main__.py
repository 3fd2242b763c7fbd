"""``python -m moe_plugin info``: device, capabilities, optional modules and the oracle's choice."""

from __future__ import annotations

import argparse
import sys

import torch


def info(args: argparse.Namespace) -> int:
    from . import MoEConfig, QuantConfig, __version__
    from .oracle import probe, select

    caps = probe(args.device)
    print(f"moe_plugin {__version__}  torch {torch.__version__}")
    print(f"device: {caps.describe()}")
    print("optional modules:")
    for name, why in caps.modules.items():
        print(f"  {name:<10} {'found' if not why else 'missing: ' + why}")
    quant = QuantConfig.fp8_block() if args.fp8 else QuantConfig()
    dtype = torch.bfloat16 if caps.is_cuda else torch.float32
    config = MoEConfig(args.experts, args.top_k, args.hidden, args.intermediate, dtype=dtype, quant=quant)
    print(f"default config: E={config.num_experts} top_k={config.top_k} K={config.hidden_size} "
          f"N={config.intermediate_size} {dtype} {quant.name}")
    selection = select(config, args.device, caps=caps)
    print(f"chosen: {selection.summary()}")
    print(selection.explain())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_plugin")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print device, optional modules and the backends chosen for a default config")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--fp8", action="store_true", help="FP8 w8a8 with 128x128 block scales")
    args = parser.parse_args(argv)
    return info(args)


if __name__ == "__main__":
    sys.exit(main())
