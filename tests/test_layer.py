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
    tw, ti = naive.topk_softmax(logits, 2, True)
    q1, q2 = stacked(fp8, e=4)
    s13 = torch.stack([torch.cat([fp8[f"model.layers.0.mlp.experts.{i}.gate_proj.weight_scale_inv"],
                                  fp8[f"model.layers.0.mlp.experts.{i}.up_proj.weight_scale_inv"]]) for i in range(4)])
    s2 = torch.stack([fp8[f"model.layers.0.mlp.experts.{i}.down_proj.weight_scale_inv"] for i in range(4)])
    # Against the block-FP8 naive reference on the same quantized weights: a tight bound that a swapped
    # or misplaced scale block cannot meet.
    ref = naive.moe(x, q1, q2, tw, ti, w1_scale=s13, w2_scale=s2, block=(128, 128))
    assert rel_err(out, ref) < 3e-2


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


def test_router_logits_shape_checked():
    layer = FusedMoE(MoEConfig(E, K_TOP, H, N, dtype=torch.float32))
    x = torch.randn(8, H)
    with pytest.raises(ValueError, match="router_logits"):
        layer(x, torch.randn(8, E - 2))
    with pytest.raises(ValueError, match="router_logits"):
        layer(x, torch.randn(4, 2 * E))


def test_fp8_scale_shape_checked():
    layer = FusedMoE(MoEConfig(4, 2, 256, 128, dtype=torch.bfloat16, quant=QuantConfig.fp8_block()))
    with pytest.raises(ValueError, match="experts.0.gate scale"):
        layer.load_expert(0, gate_scale=torch.ones(3, 3))


def test_fp8_per_tensor_gate_up_scales_merged():
    """Per-tensor FP8 checkpoints give gate and up their own scales; the layer shares one per expert, so
    it requantizes the half with the smaller scale to the max (as vLLM does) instead of dropping one."""
    e, h, n = 2, 32, 16
    cfg = MoEConfig(e, 1, h, n, dtype=torch.float32, quant=QuantConfig("fp8_w8a8"))
    layer = FusedMoE(cfg)
    w = hf_weights(seed=6, e=e, h=h, n=n)
    w[f"model.layers.0.mlp.experts.0.gate_proj.weight"] *= 0.01  # very different ranges for gate and up
    fp8 = {}
    for name, t in w.items():
        s = t.abs().max() / 448.0
        fp8[name] = (t / s).to(torch.float8_e4m3fn)
        fp8[name.replace(".weight", ".weight_scale")] = s.reshape(1)
    layer.load_weights(fp8)
    x, logits = torch.randn(6, h), torch.randn(6, e)
    out = layer(x, logits)
    w1, w2 = stacked(w, e=e)
    tw, ti = naive.topk_softmax(logits, 1, True)
    # FP8 weights and activations: a few percent; dropping the gate scale would be off by ~100x.
    assert rel_err(out, naive.moe(x, w1, w2, tw, ti)) < 0.1
    assert torch.allclose(layer.w13_weight_scale, layer._w13_half_scales.amax(dim=1))


def test_fp8_layer_refuses_16bit_weights():
    layer = FusedMoE(MoEConfig(4, 2, 256, 128, dtype=torch.bfloat16, quant=QuantConfig.fp8_block()))
    with pytest.raises(TypeError, match="experts.1.down must be float8_e4m3fn"):
        layer.load_expert(1, down=torch.randn(256, 128, dtype=torch.bfloat16))


def test_a_deep_copy_runs_its_own_weights():
    import copy
    import gc

    cfg = MoEConfig(E, K_TOP, H, N, dtype=torch.float32)
    layer = FusedMoE(cfg)
    w1, w2 = stacked(hf_weights(seed=3))
    layer.load_weights([("experts.w13_weight", w1), ("experts.w2_weight", w2)])
    x, logits = torch.randn(6, H), torch.randn(6, E)
    before = layer(x, logits)
    twin = copy.deepcopy(layer)
    assert twin.layer_name != layer.layer_name
    assert torch.equal(twin(x, logits), before)
    with torch.no_grad():
        twin.w2_weight.zero_()
    assert bool((twin(x, logits) == 0).all())
    assert torch.equal(layer(x, logits), before)  # the original still runs its own weights
    del layer
    gc.collect()
    assert bool((twin(x, logits) == 0).all())  # and the copy outlives it
