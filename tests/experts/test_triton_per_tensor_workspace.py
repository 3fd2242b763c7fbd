"""Per-tensor dynamic FP8 in the Triton experts: the scale must come from this call's rows only.

The workspaces are reused across calls; slots GEMM1 skips (remote experts) must not leak an earlier
call's intermediate values into the one scale of the tensor.
"""

import pytest
import torch

from moe_plugin import ExpertWeights, ModularKernel, MoEConfig, QuantConfig
from moe_plugin.experts.torch_ref import TorchExperts
from moe_plugin.prepare_finalize.local import LocalPrepareAndFinalize

pytest.importorskip("triton")


def test_reused_workspace_does_not_leak_into_per_tensor_scale(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from moe_plugin.experts.triton import TritonExperts

    torch.manual_seed(0)
    e, h, n, m = 4, 32, 16, 6
    quant = QuantConfig("fp8_w8a8")
    cfg = MoEConfig(e, 2, h, n, dtype=torch.float32, quant=quant)
    w1f, w2f = torch.randn(e, 2 * n, h) * 0.2, torch.randn(e, h, n) * 0.2
    s1, s2 = w1f.abs().amax(dim=(1, 2)) / 448, w2f.abs().amax(dim=(1, 2)) / 448
    weights = ExpertWeights((w1f / s1[:, None, None]).to(torch.float8_e4m3fn),
                            (w2f / s2[:, None, None]).to(torch.float8_e4m3fn), s1, s2)
    kernel = ModularKernel(LocalPrepareAndFinalize(quant), TritonExperts(cfg))
    ids = torch.stack([torch.randperm(e)[:2] for _ in range(m)]).to(torch.int32)
    tw = torch.rand(m, 2)
    kernel(torch.randn(m, h) * 1000, weights, tw, ids)  # fills the workspaces with large values

    x = torch.randn(m, h)
    expert_map = torch.tensor([0, 1, -1, -1], dtype=torch.int32)  # experts 2, 3 remote: their slots skipped
    got = kernel(x, weights, tw, ids, expert_map=expert_map)
    fresh = ModularKernel(LocalPrepareAndFinalize(quant), TritonExperts(cfg))(x, weights, tw, ids, expert_map=expert_map)
    ref = ModularKernel(LocalPrepareAndFinalize(quant), TorchExperts(cfg))(x, weights, tw, ids, expert_map=expert_map)
    assert torch.count_nonzero(got) > 0
    torch.testing.assert_close(got, fresh)
    assert ((got - ref).norm() / ref.norm()).item() < 0.1
