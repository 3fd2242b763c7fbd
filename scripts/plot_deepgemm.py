"""Plot scripts/bench_deepgemm.py results: microseconds per call vs tokens, one panel per shape.

    python scripts/plot_deepgemm.py docs/results/bench_deepgemm_*.json --out docs/img/deepgemm.png

Needs matplotlib (not a dependency of the package). Stage rows (``stage:*``) are left out; every other
backend with at least one timed point is drawn, log-log, with the device and versions in the title.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

LABELS = {
    "deep_gemm": "DeepGEMM contiguous (whole call)",
    "deep_gemm_prequant": "DeepGEMM, prepare quantizes",
    "deep_gemm_two_step": "DeepGEMM, two-step act+quant",
    "deep_gemm_gemm_only": "DeepGEMM, two GEMMs only",
    "batched_deep_gemm": "DeepGEMM masked",
    "triton_fp8": "Triton FP8",
    "triton_bf16": "Triton bf16",
}


def load(paths: list[str]) -> tuple[dict, str]:
    """``{shape: {backend: [(M, us), ...]}}`` and a title line from the first file's metadata."""
    # {shape: {backend: {M: us}}}: a point measured in several files is drawn once (the last file's)
    points: dict = defaultdict(lambda: defaultdict(dict))
    title = ""
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        if not title:
            title = (
                f"{report.get('device', '?')}, torch {report.get('torch', '?')}, CUDA {report.get('cuda', '?')}, "
                f"DeepGEMM {report.get('deep_gemm', '?')}"
            )
        for row in report.get("results", []):
            if row.get("us") is None or row["backend"].startswith("stage:"):
                continue
            points[row["shape"]][row["backend"]][row["M"]] = row["us"]
    series = {shape: {b: sorted(ms.items()) for b, ms in backends.items()} for shape, backends in points.items()}
    return series, title


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="bench_deepgemm.py JSON files")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is needed to plot: pip install matplotlib", file=sys.stderr)
        return 2
    series, title = load(args.results)
    if not series:
        print("no timed rows in the given files", file=sys.stderr)
        return 1
    shapes = sorted(series)
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for backend, points in sorted(series[shape].items()):
            points.sort()
            ms, us = zip(*points)
            style = "--" if backend == "deep_gemm_gemm_only" else "-"
            # one colour per backend across panels
            color = f"C{list(LABELS).index(backend)}" if backend in LABELS else None
            ax.plot(ms, us, style, marker="o", color=color, label=LABELS.get(backend, backend))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(shape)
        ax.set_xlabel("tokens per call (M)")
        ax.set_ylabel("us per call (CUDA-graph median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"FP8 block w8a8 experts: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
