"""``python -m moe_plugin info``: device, capabilities, optional modules and the oracle's choice."""

from __future__ import annotations

import argparse
import os
import sys

import torch


_FORCING_VARIABLES = ("MOE_PLUGIN_EXPERTS", "MOE_PLUGIN_PREPARE_FINALIZE")


def info(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import MoEConfig, QuantConfig, __version__
    from .oracle import BackendUnavailableError, probe, select

    if args.device is not None:
        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError) as exc:
            parser.error(f"--device {args.device!r}: {exc}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: no CUDA device is available to torch {torch.__version__} here")
    quant = QuantConfig.fp8_block() if args.fp8 else QuantConfig()
    try:
        caps = probe(args.device)
        dtype = torch.bfloat16 if caps.is_cuda else torch.float32
        config = MoEConfig(args.experts, args.top_k, args.hidden, args.intermediate, dtype=dtype, quant=quant)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    print(f"moe_plugin {__version__}  torch {torch.__version__}")
    print(f"device: {caps.describe()}")
    print("optional modules:")
    for name, why in caps.modules.items():
        print(f"  {name:<10} {'found' if not why else 'missing: ' + why}")
    print(f"default config: E={config.num_experts} top_k={config.top_k} K={config.hidden_size} "
          f"N={config.intermediate_size} {dtype} {quant.name}")
    try:
        selection = select(config, args.device, caps=caps)
    except BackendUnavailableError as exc:
        print(f"error: {exc}")
        # Still show what the oracle would choose, so the user sees every backend's verdict.
        saved = {name: os.environ.pop(name) for name in _FORCING_VARIABLES if name in os.environ}
        try:
            selection = select(config, args.device, caps=caps)
        finally:
            os.environ.update(saved)
        print(f"without {' / '.join(sorted(saved))}: {selection.summary()}")
        print(selection.explain())
        return 1
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
    return info(args, p)


if __name__ == "__main__":
    sys.exit(main())
