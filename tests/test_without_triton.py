"""The package without triton (a torch-only install): every module imports, the torch path runs, and the
oracle names the missing module as the reason the Triton backends are out. Run in a subprocess where
``triton`` cannot be imported, since this environment has it installed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    for name in ("triton", "triton.language", "triton.language.extra.cuda", "triton.runtime",
                 "triton.runtime.jit", "triton.tools", "triton.tools.tensor_descriptor"):
        sys.modules[name] = None  # import raises, find_spec says absent
    import torch
    import moe_plugin
    import moe_plugin.experts.batched_triton
    import moe_plugin.experts.triton
    import moe_plugin.ops.fused_moe
    import moe_plugin.ops.tma_gemm
    from moe_plugin import MoEConfig, fused_experts, oracle
    from moe_plugin.ops.launch_config import get_launch_config

    cfg = get_launch_config(512, num_local=4, num_global=4, n=32, k=64, top_k=2, dtype=torch.bfloat16,
                            quant=moe_plugin.QuantConfig(), device="cpu")
    assert cfg.tma == "off", cfg
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g)
    w1 = torch.randn(4, 64, 64, generator=g) / 8
    w2 = torch.randn(4, 64, 32, generator=g) / 8
    w = torch.rand(5, 2, generator=g)
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2]], dtype=torch.int32)
    out = fused_experts(x, w1, w2, w, ids)
    ref = torch.zeros(5, 64)
    for t in range(5):
        for j in range(2):
            h = w1[ids[t, j]] @ x[t]
            ref[t] += w[t, j] * (w2[ids[t, j]] @ (torch.nn.functional.silu(h[:32]) * h[32:]))
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (out - ref).abs().max()
    text = oracle.explain(MoEConfig(4, 2, 64, 32, dtype=torch.float32))
    triton_lines = [line for line in text.splitlines() if line.strip().startswith("triton ")]
    assert triton_lines and "needs triton" in triton_lines[0], text
    print("ok")
    """
)


def test_package_works_without_triton():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
