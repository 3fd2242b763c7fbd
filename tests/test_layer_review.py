"""FusedMoE corner cases found in review: per-tensor FP8 scales in the state dict before the first
forward, router-gate names, the correction bias without grouped routing, unknown keywords, a trainable
gate under torch.compile, block-scale shapes, routing parameter types. References are float64 loops."""

from __future__ import annotations

import pytest
import torch

import naive
from moe_plugin import FusedMoE, MoEConfig, QuantConfig
from moe_plugin.routing import grouped_topk

FP8 = torch.float8_e4m3fn


def test_state_dict_before_first_forward_holds_merged_per_tensor_scales():
    torch.manual_seed(0)
    e, k, n = 4, 16, 8
    cfg = MoEConfig(e, 2, k, n, dtype=torch.bfloat16, quant=QuantConfig("fp8_w8a8"))
    layer = FusedMoE(cfg)
    for i in range(e):
        gate, up, down = (torch.randn(n, k) / 4).to(FP8), (torch.randn(n, k) / 4).to(FP8), (torch.randn(k, n) / 4).to(FP8)
        # gate and up with different scales: they must be merged into one per expert
        layer.load_expert(i, gate=gate, up=up, down=down, gate_scale=torch.tensor(0.5 + i), up_scale=torch.tensor(2.0 + i),
                          down_scale=torch.tensor(1.5))
    copy = FusedMoE(cfg)
    copy.load_state_dict(layer.state_dict())
    assert not torch.equal(copy.w13_weight_scale, torch.ones(e))
    x = torch.randn(5, k).to(torch.bfloat16)
    logits = torch.randn(5, e)
    out_a, out_b = layer(x, logits), copy(x, logits)
    assert torch.equal(out_a, out_b)


def test_router_gate_is_matched_by_its_exact_name_and_shape():
    e, k = 8, 16
    layer = FusedMoE(MoEConfig(e, 2, k, 8, dtype=torch.float32), with_gate=True)
    gate = torch.randn(e, k)
    consumed = layer.load_weights({"mlp.gate.weight": gate, "mlp.shared_expert_gate.weight": torch.randn(1, k)})
    assert consumed == {"mlp.gate.weight"}
    assert torch.equal(layer.gate.weight, gate)
    with pytest.raises(ValueError, match="gate.weight must have shape"):
        layer.load_weights({"mlp.gate.weight": torch.randn(k)})
    biased = FusedMoE(MoEConfig(e, 2, k, 8, dtype=torch.float32), use_correction_bias=True)
    with pytest.raises(ValueError, match="e_score_correction_bias must have shape"):
        biased.load_weights({"mlp.gate.e_score_correction_bias": torch.tensor(1.0)})


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_correction_bias_steers_selection_without_grouped_routing(scoring):
    torch.manual_seed(1)
    e, top_k = 8, 2
    layer = FusedMoE(MoEConfig(e, top_k, 16, 8, dtype=torch.float32), use_correction_bias=True, scoring_func=scoring,
                     renormalize=True)
    bias = torch.zeros(e)
    bias[7] = 100.0
    layer.e_score_correction_bias.copy_(bias)
    x, logits = torch.randn(6, 16), torch.randn(6, e)
    weights, ids = layer.route(x, logits)
    assert (ids == 7).any(dim=1).all()
    # weights are the unbiased scores of the chosen experts, renormalized
    scores = torch.softmax(logits.double(), -1) if scoring == "softmax" else torch.sigmoid(logits.double())
    want = scores.gather(1, ids.long())
    want = want / want.sum(dim=1, keepdim=True)
    assert torch.allclose(weights.double(), want, atol=1e-6)


def test_unknown_keywords_are_refused():
    cfg = MoEConfig(4, 2, 16, 8, dtype=torch.float32)
    with pytest.raises(TypeError, match="renormalise"):
        FusedMoE(cfg, renormalise=False)


def test_layer_with_its_own_gate_compiles_with_grad_mode_on():
    torch.manual_seed(2)
    e, k, n = 4, 16, 8
    layer = FusedMoE(MoEConfig(e, 2, k, n, dtype=torch.float32), with_gate=True)
    w1, w2 = torch.randn(e, 2 * n, k) / 4, torch.randn(e, k, n) / 4
    layer.load_weights({"w13_weight": w1, "w2_weight": w2, "gate.weight": torch.randn(e, k)})
    x = torch.randn(2, 3, k)
    assert not layer.gate.weight.requires_grad
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    out = compiled(x)
    eager = layer(x)
    assert torch.allclose(out, eager, atol=1e-5)
    w, ids = torch.topk(torch.softmax(layer.gate(x.reshape(-1, k)).double(), -1), 2)
    w = w / w.sum(-1, keepdim=True)
    ref = naive.moe(x.reshape(-1, k), w1, w2, w, ids.to(torch.int32))
    assert torch.allclose(eager.reshape(-1, k).double(), ref, atol=1e-4)


def test_block_scales_must_have_their_exact_shape():
    layer = FusedMoE(MoEConfig(4, 2, 32, 48, dtype=torch.float32, quant=QuantConfig.fp8_block(16)))
    down = torch.randn(32, 48).to(FP8)
    assert layer.load_expert(0, down=down, down_scale=torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        layer.load_expert(0, down=down, down_scale=torch.rand(3, 2))
    odd = FusedMoE(MoEConfig(4, 2, 32, 8, dtype=torch.float32, quant=QuantConfig.fp8_block(16)))
    with pytest.raises(ValueError, match="share a block"):
        odd.load_expert(0, gate=torch.randn(8, 32).to(FP8), gate_scale=torch.rand(1, 2))


@pytest.mark.parametrize("kw", [dict(num_expert_group=2.0), dict(topk_group=True), dict(routed_scaling_factor="2")])
def test_grouped_topk_parameter_types(kw):
    (name,) = kw
    with pytest.raises(TypeError, match=name):
        grouped_topk(torch.randn(3, 8), torch.randn(3, 8), 2, True, **kw)


@pytest.mark.parametrize(
    "call,error,needle",
    [
        (lambda m, x: m("x", torch.randn(3, 4)), TypeError, "hidden_states must be a torch.Tensor"),
        (lambda m, x: m(torch.randn(3, 31), torch.randn(3, 4)), ValueError, "hidden_states must have shape [..., 32]"),
        (lambda m, x: m(torch.tensor(1.0), torch.randn(1, 4)), ValueError, "got ()"),
        (lambda m, x: m.load_expert("0", gate=x), TypeError, "expert id must be an int, got str"),
        (lambda m, x: m.load_expert(0.0, gate=x), TypeError, "expert id must be an int, got float"),
        (lambda m, x: m.load_expert(True, gate=x), TypeError, "got bool"),
        (lambda m, x: m.load_expert(0, gate=x.to(torch.int64)), TypeError, "experts.0.gate must be a floating-point tensor"),
        (lambda m, x: m.load_weights(5), TypeError, "weights must be a mapping"),
        (lambda m, x: m.load_weights("experts.0.w1.weight"), TypeError, "weights must be a mapping"),
        (lambda m, x: m.load_weights([("experts.0.w1.weight",)]), TypeError, "(name: str, tensor) pairs"),
        (lambda m, x: m.load_weights({"w13_weight": "x"}), TypeError, "w13_weight must be a torch.Tensor, got str"),
    ],
)
def test_bad_forward_and_loading_arguments_are_named(call, error, needle):
    layer = FusedMoE(MoEConfig(4, 2, 32, 16, dtype=torch.float32))
    with pytest.raises(error) as info:
        call(layer, torch.zeros(16, 32))
    assert needle in str(info.value)


def test_expert_ids_may_be_any_integer_type():
    layer = FusedMoE(MoEConfig(4, 2, 32, 16, dtype=torch.float32))
    gate = torch.randn(16, 32)
    assert layer.load_expert(torch.tensor(2), gate=gate)
    assert torch.equal(layer.w13_weight[2, :16], gate)
    consumed = layer.load_weights([["experts.1.w1.weight", gate * 2]])
    assert consumed == {"experts.1.w1.weight"} and torch.equal(layer.w13_weight[1, :16], gate * 2)


def _pending_per_tensor_layer():
    torch.manual_seed(3)
    e, k, n = 4, 32, 16
    layer = FusedMoE(MoEConfig(e, 2, k, n, dtype=torch.bfloat16, quant=QuantConfig("fp8_w8a8")))
    for i in range(e):
        layer.load_expert(i, gate=(torch.randn(n, k) / 4).to(FP8), up=(torch.randn(n, k) / 4).to(FP8),
                          down=(torch.randn(k, n) / 4).to(FP8), gate_scale=torch.tensor(0.5 + i),
                          up_scale=torch.tensor(2.0), down_scale=torch.tensor(1.0))
    return layer, torch.randn(5, k).to(torch.bfloat16), torch.randn(5, e)


def test_compile_with_pending_per_tensor_merge():
    torch._dynamo.reset()
    eager, x, logits = _pending_per_tensor_layer()
    want = eager(x, logits)
    # fullgraph stops at the eager merge; after finalize_weights the whole forward is one graph
    layer, _, _ = _pending_per_tensor_layer()
    with pytest.raises(Exception, match="finalize_weights|_requantize_per_tensor_w13"):
        torch.compile(layer, fullgraph=True, backend="eager")(x, logits)
    layer, _, _ = _pending_per_tensor_layer()
    layer.finalize_weights()
    assert torch.equal(torch.compile(layer, fullgraph=True, backend="eager")(x, logits), want)
    # without fullgraph the first compiled call merges eagerly
    layer, _, _ = _pending_per_tensor_layer()
    compiled = torch.compile(layer, backend="eager")
    assert torch.equal(compiled(x, logits), want) and torch.equal(compiled(x, logits), want)
    assert not layer._pending_requant


@pytest.mark.parametrize(
    "call,error,needle",
    [
        (lambda m: m.load_expert(0, down_scale=0.5), TypeError, "experts.0.down scale must be a torch.Tensor, got float"),
        (lambda m: m.load_expert(0, down_scale=torch.ones((), dtype=torch.int32)), TypeError,
         "experts.0.down scale must be a floating-point tensor"),
        (lambda m: m.load_weights({"experts.0.w2.weight_scale": 0.5}), TypeError, "experts.0.down scale must be a torch.Tensor"),
        (lambda m: m.load_expert(torch.tensor(True), down_scale=torch.ones(())), TypeError, "got bool"),
    ],
)
def test_bad_scale_arguments_are_named(call, error, needle):
    layer = FusedMoE(MoEConfig(4, 2, 32, 16, dtype=torch.bfloat16, quant=QuantConfig("fp8_w8a8")))
    with pytest.raises(error) as info:
        call(layer)
    assert needle in str(info.value)


def test_gate_and_bias_refuse_integer_tensors_and_getitem_iterables_load():
    layer = FusedMoE(MoEConfig(4, 2, 32, 16, dtype=torch.float32), with_gate=True, use_correction_bias=True)
    with pytest.raises(TypeError, match="gate.weight must be a floating-point tensor"):
        layer.load_weights({"gate.weight": torch.ones(4, 32, dtype=torch.int64)})
    with pytest.raises(TypeError, match="e_score_correction_bias must be a floating-point tensor"):
        layer.load_weights({"e_score_correction_bias": torch.ones(4, dtype=torch.int64)})

    class OldStyleSequence:  # iterable through __getitem__ only
        def __init__(self, items):
            self.items = items

        def __getitem__(self, i):
            return self.items[i]

    gate = torch.randn(4, 32)
    assert layer.load_weights(OldStyleSequence([("gate.weight", gate)])) == {"gate.weight"}
    assert torch.equal(layer.gate.weight, gate)
