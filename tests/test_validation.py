"""Bad input: each case raises the right exception type with a message naming the argument."""

import pytest
import torch

from moe_plugin import MoEConfig, ParallelConfig, QuantConfig, fused_experts
from moe_plugin.ops.quant import quantize_block_weight
from test_fused_experts import make_case


@pytest.fixture
def case():
    return make_case(4, 4, 2, 32, 16)


def call(case, **changes):
    x, w1, w2, w, ids = case
    args = dict(x=x, w1=w1, w2=w2, topk_weights=w, topk_ids=ids)
    kwargs = {k: v for k, v in changes.items() if k not in args}
    args.update({k: v for k, v in changes.items() if k in args})
    return fused_experts(args["x"], args["w1"], args["w2"], args["topk_weights"], args["topk_ids"], **kwargs)


@pytest.mark.parametrize(
    "changes,exc,name",
    [
        (lambda c: {"x": c[0][0]}, ValueError, "x"),
        (lambda c: {"x": c[0].to(torch.int32)}, TypeError, "hidden_states"),
        (lambda c: {"w1": c[1][:, :, :16].contiguous()}, ValueError, "w1"),
        (lambda c: {"w1": c[1][:, :30].contiguous()}, ValueError, "w1"),
        (lambda c: {"w2": c[2][:, :16].contiguous()}, ValueError, "w2"),
        (lambda c: {"w2": c[2][:3]}, ValueError, "w1 and w2"),
        (lambda c: {"w1": c[1].transpose(1, 2).contiguous().transpose(1, 2)}, ValueError, "contiguous"),
        (lambda c: {"w1": c[1].half()}, TypeError, "w1"),
        (lambda c: {"topk_ids": c[4][:3]}, ValueError, "topk_ids"),
        (lambda c: {"topk_ids": c[4].float()}, TypeError, "topk_ids"),
        (lambda c: {"topk_weights": c[3][:, :1]}, ValueError, "topk_weights"),
        (lambda c: {"topk_ids": torch.full_like(c[4], 4)}, ValueError, "topk_ids"),
        (lambda c: {"topk_ids": torch.full_like(c[4], -1)}, ValueError, "topk_ids"),
        (lambda c: {"activation": "tanh"}, ValueError, "activation"),
        (lambda c: {"expert_map": torch.zeros(3, dtype=torch.int32)}, ValueError, "expert_map"),
        (lambda c: {"expert_map": torch.full((4,), 7, dtype=torch.int32)}, ValueError, "expert_map"),
        (lambda c: {"global_num_experts": 9}, ValueError, "expert_map"),
        (lambda c: {"apply_router_weight_on_input": True}, ValueError, "apply_router_weight_on_input"),
        (lambda c: {"w1_scale": torch.ones(4)}, ValueError, "w1_scale"),
        (lambda c: {"block_shape": [128, 128]}, ValueError, "block_shape"),
    ],
)
def test_bad_input(case, changes, exc, name):
    with pytest.raises(exc, match=name):
        call(case, **changes(case))


def test_device_mismatch():
    x, w1, w2, w, ids = make_case(4, 4, 2, 32, 16)
    with pytest.raises(ValueError, match="meta"):
        fused_experts(x, w1.to("meta"), w2, w, ids)


def fp8_case():
    x, w1, w2, w, ids = make_case(4, 4, 2, 256, 128)
    q1, s1 = quantize_block_weight(w1)
    q2, s2 = quantize_block_weight(w2)
    return x, q1, q2, w, ids, s1, s2


def test_fp8_missing_scale():
    x, q1, q2, w, ids, s1, s2 = fp8_case()
    with pytest.raises(ValueError, match="w2_scale"):
        fused_experts(x, q1, q2, w, ids, w1_scale=s1, block_shape=[128, 128])


def test_fp8_mismatched_scale_shape():
    x, q1, q2, w, ids, s1, s2 = fp8_case()
    with pytest.raises(ValueError, match="w1_scale"):
        fused_experts(x, q1, q2, w, ids, w1_scale=s1[:, :1], w2_scale=s2, block_shape=[128, 128])


def test_fp8_scheme_needs_fp8_weights():
    x, q1, q2, w, ids, s1, s2 = fp8_case()
    with pytest.raises(TypeError, match="w1"):
        fused_experts(x, q1.float(), q2, w, ids, w1_scale=s1, w2_scale=s2, quant=QuantConfig.fp8_block())


@pytest.mark.parametrize(
    "build,exc,name",
    [
        (lambda: MoEConfig(0, 1, 8, 8), ValueError, "num_experts"),
        (lambda: MoEConfig(4, 5, 8, 8), ValueError, "top_k"),
        (lambda: MoEConfig(4, 2, 8, 8, dtype=torch.int8), TypeError, "dtype"),
        (lambda: MoEConfig(4, 2, 8, 8, activation="tanh"), ValueError, "activation"),
        (lambda: MoEConfig(6, 2, 8, 8, parallel=ParallelConfig(4, 0)), ValueError, "ep_size"),
        (lambda: ParallelConfig(2, 2), ValueError, "ep_rank"),
        (lambda: ParallelConfig(2, 0, placement="random"), ValueError, "placement"),
        (lambda: QuantConfig("int4"), ValueError, "scheme"),
        (lambda: QuantConfig(block_shape=(128, 128)), ValueError, "block_shape"),
        (lambda: QuantConfig("fp8_w8a8", (128,)), ValueError, "block_shape"),
        (lambda: QuantConfig("fp8_w8a8", scale_format="e5m2"), ValueError, "scale_format"),
    ],
)
def test_bad_config(build, exc, name):
    with pytest.raises(exc, match=name):
        build()


def test_static_activation_scales_are_checked():
    from moe_plugin import ExpertWeights, QuantConfig
    from moe_plugin.config import QuantScheme
    from moe_plugin.validation import check_moe_inputs

    fp8 = torch.float8_e4m3fn
    e, k, n = 3, 32, 16
    x = torch.randn(4, k)
    w1, w2 = torch.zeros(e, 2 * n, k, dtype=fp8), torch.zeros(e, k, n, dtype=fp8)
    per_tensor = QuantConfig(QuantScheme.FP8_W8A8, None)
    kw = dict(activation="silu", global_num_experts=e, expert_map=None, apply_router_weight_on_input=False)
    tw, ids = torch.rand(4, 2), torch.zeros(4, 2, dtype=torch.int32)

    def weights(**scales):
        return ExpertWeights(w1, w2, torch.ones(e), torch.ones(e), **scales)

    check_moe_inputs(x, weights(a1_scale=torch.tensor([0.5]), a2_scale=torch.tensor(0.25)), tw, ids, quant=per_tensor, **kw)
    with pytest.raises(ValueError, match=r"a1_scale must hold one value .* got shape \(3,\)"):
        check_moe_inputs(x, weights(a1_scale=torch.ones(e)), tw, ids, quant=per_tensor, **kw)
    with pytest.raises(TypeError, match="a2_scale must be a torch.Tensor"):
        check_moe_inputs(x, weights(a2_scale=0.5), tw, ids, quant=per_tensor, **kw)
    with pytest.raises(TypeError, match="a1_scale must have dtype"):
        check_moe_inputs(x, weights(a1_scale=torch.ones(1, dtype=torch.float64)), tw, ids, quant=per_tensor, **kw)
    with pytest.raises(ValueError, match="computes activation scales per token"):
        block = QuantConfig(QuantScheme.FP8_W8A8, (16, 16))
        wb = ExpertWeights(w1, w2, torch.ones(e, 2, 2), torch.ones(e, 2, 1), a1_scale=torch.ones(1))
        check_moe_inputs(x, wb, tw, ids, quant=block, **kw)
    with pytest.raises(ValueError, match="a1_scale given but the quant config is unquantized"):
        check_moe_inputs(x, ExpertWeights(torch.zeros(e, 2 * n, k), torch.zeros(e, k, n), a1_scale=torch.ones(1)),
                         tw, ids, quant=QuantConfig(), **kw)
