"""FusedMoE: routing + experts + shared experts + weight loading, against the naive loop."""

import pytest
import torch

import naive
from moe_plugin import FusedMoE, ModularKernel, MoEConfig, ParallelConfig, QuantConfig
from moe_plugin.experts.torch_ref import TorchExperts
from moe_plugin.ops.quant import quantize_block_weight
from moe_plugin.prepare_finalize.local import LocalPrepareAndFinalize
from test_fused_experts import rel_err

E, K_TOP, H, N = 8, 2, 32, 16


def hf_weights(seed=0, e=E, h=H, n=N, prefix="model.layers.0.mlp.experts", names=("gate_proj", "up_proj", "down_proj")):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(e):
        out[f"{prefix}.{i}.{names[0]}.weight"] = torch.randn(n, h, generator=g) * h**-0.5
        out[f"{prefix}.{i}.{names[1]}.weight"] = torch.randn(n, h, generator=g) * h**-0.5
        out[f"{prefix}.{i}.{names[2]}.weight"] = torch.randn(h, n, generator=g) * n**-0.5
    return out


def stacked(w, names=("gate_proj", "up_proj", "down_proj"), prefix="model.layers.0.mlp.experts", e=E):
    w1 = torch.stack([torch.cat([w[f"{prefix}.{i}.{names[0]}.weight"], w[f"{prefix}.{i}.{names[1]}.weight"]]) for i in range(e)])
    w2 = torch.stack([w[f"{prefix}.{i}.{names[2]}.weight"] for i in range(e)])
    return w1, w2


@pytest.mark.parametrize("names", [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")])
def test_layer_loads_hf_and_matches_naive(names):
    cfg = MoEConfig(E, K_TOP, H, N, dtype=torch.float32)
    layer = FusedMoE(cfg, with_gate=True)
    w = hf_weights(names=names)
    gate = torch.randn(E, H)
    loaded = layer.load_weights({**w, "model.layers.0.mlp.gate.weight": gate})
    assert len(loaded) == len(w) + 1
    x = torch.randn(9, H)
    out = layer(x)
    w1, w2 = stacked(w, names)
    tw, ti = naive.topk_softmax(x @ gate.t(), K_TOP, True)
    assert rel_err(out, naive.moe(x, w1, w2, tw, ti)) < 1e-5


def test_layer_stacked_load_and_3d_input():
    cfg = MoEConfig(E, K_TOP, H, N, dtype=torch.float32)
    layer = FusedMoE(cfg)
    w1, w2 = stacked(hf_weights(seed=1))
    layer.load_weights([("experts.w13_weight", w1), ("experts.w2_weight", w2)])
    x = torch.randn(2, 5, H)
    logits = torch.randn(10, E)
    out = layer(x, logits)
    assert out.shape == x.shape
    tw, ti = naive.topk_softmax(logits, K_TOP, True)
    assert rel_err(out.reshape(10, H), naive.moe(x.reshape(10, H), w1, w2, tw, ti)) < 1e-5


def test_expert_parallel_shards_sum_to_full_layer():
    """Each rank creates only its experts; with the same routing the ranks' outputs sum to the full layer."""
    w = hf_weights(seed=2)
    w1, w2 = stacked(w)
    x, logits = torch.randn(11, H), torch.randn(11, E)
    total = torch.zeros(11, H)
    for placement in ("contiguous", "round_robin"):
        total.zero_()
        for rank in range(4):
            cfg = MoEConfig(E, K_TOP, H, N, dtype=torch.float32, parallel=ParallelConfig(4, rank, placement))
            kernel = ModularKernel(LocalPrepareAndFinalize(cfg.quant), TorchExperts(cfg))
            layer = FusedMoE(cfg, kernel=kernel)
            assert layer.w13_weight.shape[0] == 2
            layer.load_weights(w)
            total += layer(x, logits)
        tw, ti = naive.topk_softmax(logits, K_TOP, True)
        assert rel_err(total, naive.moe(x, w1, w2, tw, ti)) < 1e-5


def test_grouped_topk_and_shared_experts():
    cfg = MoEConfig(16, 4, H, N, dtype=torch.float32)
    shared = torch.nn.Linear(H, H, bias=False)
    layer = FusedMoE(
        cfg, use_grouped_topk=True, num_expert_group=4, topk_group=2, scoring_func="sigmoid",
        routed_scaling_factor=2.0, use_correction_bias=True, shared_experts=shared,
    )
    w = hf_weights(seed=3, e=16)
    bias = torch.randn(16) * 0.1
    layer.load_weights({**w, "mlp.gate.e_score_correction_bias": bias})
    x, logits = torch.randn(6, H), torch.randn(6, 16)
    with torch.no_grad():
        out = layer(x, logits)
        tw, ti = naive.grouped_topk(logits, 4, True, 4, 2, "sigmoid", 2.0, bias)
        w1, w2 = stacked(w, e=16)
        ref = naive.moe(x, w1, w2, tw, ti) + shared(x).double()
    assert rel_err(out, ref) < 1e-5


def test_fp8_layer_loads_block_scales():
    h, n = 256, 128
    cfg = MoEConfig(4, 2, h, n, dtype=torch.bfloat16, quant=QuantConfig.fp8_block())
    layer = FusedMoE(cfg)
    w = hf_weights(seed=4, e=4, h=h, n=n)
    fp8 = {}
    for name, t in w.items():
        q, s = quantize_block_weight(t)
        fp8[name] = q
        fp8[name.replace(".weight", ".weight_scale_inv")] = s
    layer.load_weights(fp8)
    x, logits = torch.randn(5, h, dtype=torch.bfloat16), torch.randn(5, 4)
    out = layer(x, logits)
    w1, w2 = stacked(w, e=4)
    tw, ti = naive.topk_softmax(logits, 2, True)
    assert rel_err(out, naive.moe(x.float(), w1, w2, tw, ti)) < 8e-2


def test_layer_errors():
    cfg = MoEConfig(E, K_TOP, H, N, dtype=torch.float32)
    layer = FusedMoE(cfg)
    with pytest.raises(ValueError, match="router_logits"):
        layer(torch.randn(3, H))
    with pytest.raises(ValueError, match="experts.0.gate"):
        layer.load_expert(0, gate=torch.randn(N + 1, H))
    with pytest.raises(ValueError, match="expert id"):
        layer.load_expert(E, up=torch.randn(N, H))
    with pytest.raises(TypeError, match="config"):
        FusedMoE({"num_experts": 8})
