"""fused_experts against the naive per-token loop in tests/naive.py."""

import random

import pytest
import torch

import naive
from moe_plugin import QuantConfig, fused_experts
from moe_plugin.ops.quant import quantize_block_weight

TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def rel_err(out, ref):
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_case(m, e, k_top, hidden, inter, activation="silu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * inter if activation != "relu2" else inter
    x = torch.randn(m, hidden, generator=g).to(dtype)
    w1 = (torch.randn(e, rows, hidden, generator=g) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(e, hidden, inter, generator=g) * inter**-0.5).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:k_top] for _ in range(m)]) if m else torch.empty(0, k_top, dtype=torch.long)
    weights = torch.rand(m, k_top, generator=g)
    return x, w1, w2, weights, ids.to(torch.int32)


@pytest.mark.parametrize("seed", range(8))
def test_random_configs(seed):
    rnd = random.Random(seed)
    e = rnd.choice([1, 3, 8, 16])
    k_top = rnd.randint(1, min(e, 4))
    m = rnd.choice([0, 1, 7, 33])
    hidden = rnd.choice([16, 48, 64])
    inter = rnd.choice([8, 24, 32])
    activation = rnd.choice(["silu", "gelu", "relu2", "swiglu"])
    dtype = rnd.choice([torch.float32, torch.bfloat16, torch.float16])
    x, w1, w2, w, ids = make_case(m, e, k_top, hidden, inter, activation, dtype, seed)
    out = fused_experts(x, w1, w2, w, ids, activation=activation)
    assert out.shape == x.shape and out.dtype == dtype
    ref = naive.moe(x, w1, w2, w, ids, activation)
    if m:
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu2", "swiglu"])
def test_every_activation(activation):
    x, w1, w2, w, ids = make_case(11, 6, 2, 32, 16, activation, seed=3)
    x = x * 4  # push swiglu's clamp into play
    out = fused_experts(x, w1, w2, w, ids, activation=activation)
    assert rel_err(out, naive.moe(x, w1, w2, w, ids, activation)) < 1e-5


def test_top1_and_single_expert():
    x, w1, w2, w, ids = make_case(5, 1, 1, 16, 8)
    assert rel_err(fused_experts(x, w1, w2, w, ids), naive.moe(x, w1, w2, w, ids)) < 1e-5


def test_m_zero_returns_empty():
    x, w1, w2, w, ids = make_case(0, 4, 2, 16, 8)
    out = fused_experts(x, w1, w2, w, ids)
    assert out.shape == (0, 16)


def test_int64_ids_accepted():
    x, w1, w2, w, ids = make_case(6, 4, 2, 16, 8)
    torch.testing.assert_close(fused_experts(x, w1, w2, w, ids.long()), fused_experts(x, w1, w2, w, ids))


@pytest.mark.parametrize("seed", range(3))
def test_expert_map_half_remote_sums_to_full(seed):
    """EP sharding: each rank holds half the experts; the ranks' partial outputs sum to the full layer."""
    e, k_top = 8, 3
    x, w1, w2, w, ids = make_case(13, e, k_top, 32, 16, seed=seed)
    full = fused_experts(x, w1, w2, w, ids)
    total = torch.zeros_like(full)
    for rank in range(2):
        owned = torch.arange(rank * 4, rank * 4 + 4)
        expert_map = torch.full((e,), -1, dtype=torch.int32)
        expert_map[owned] = torch.arange(4, dtype=torch.int32)
        part = fused_experts(x, w1[owned].contiguous(), w2[owned].contiguous(), w, ids, expert_map=expert_map, global_num_experts=e)
        ref = naive.moe(x, w1[owned], w2[owned], w, ids, expert_map=expert_map)
        assert rel_err(part, ref) < 1e-5
        total += part
    assert rel_err(total, full) < 1e-5


def test_all_experts_remote_gives_zero():
    x, w1, w2, w, ids = make_case(5, 4, 2, 16, 8)
    expert_map = torch.full((8,), -1, dtype=torch.int32)
    expert_map[4:] = torch.arange(4, dtype=torch.int32)
    out = fused_experts(x, w1, w2, w, ids, expert_map=expert_map, global_num_experts=8)  # ids < 4: all remote
    assert torch.count_nonzero(out) == 0


def test_apply_router_weight_on_input():
    x, w1, w2, w, ids = make_case(9, 4, 1, 16, 8)
    out = fused_experts(x, w1, w2, w, ids, apply_router_weight_on_input=True)
    ref = naive.moe(x, w1, w2, w, ids, apply_router_weight_on_input=True)
    assert rel_err(out, ref) < 1e-5
    # Weighting before a nonlinear expert differs from weighting after it.
    assert rel_err(out, naive.moe(x, w1, w2, w, ids)) > 1e-3


def test_inplace_writes_input():
    x, w1, w2, w, ids = make_case(7, 4, 2, 16, 8)
    expected = fused_experts(x.clone(), w1, w2, w, ids)
    out = fused_experts(x, w1, w2, w, ids, inplace=True)
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("use_map", [False, True])
def test_fp8_block(dtype, use_map):
    e, hidden, inter = 4, 256, 128
    x, w1f, w2f, w, ids = make_case(10, e, 2, hidden, inter, dtype=torch.float32, seed=7)
    x = x.to(dtype)
    w1, s1 = quantize_block_weight(w1f)
    w2, s2 = quantize_block_weight(w2f)
    expert_map = None
    if use_map:
        expert_map = torch.tensor([0, -1, 1, -1], dtype=torch.int32)
        keep = torch.tensor([0, 2])
        w1, s1, w2, s2 = w1[keep].contiguous(), s1[keep].contiguous(), w2[keep].contiguous(), s2[keep].contiguous()
    out = fused_experts(x, w1, w2, w, ids, w1_scale=s1, w2_scale=s2, block_shape=[128, 128], expert_map=expert_map, global_num_experts=e)
    ref = naive.moe(x, w1, w2, w, ids, expert_map=expert_map, w1_scale=s1, w2_scale=s2, block=(128, 128))
    # FP8 rounding of a bf16 intermediate flips a few codes against the float64 reference.
    assert rel_err(out, ref) < (2e-2 if dtype == torch.float32 else 4e-2)
    # and close to the unquantized layer (FP8 error, not a wrong result)
    full = naive.moe(x.float(), w1f, w2f, w, ids, expert_map=expert_map if not use_map else None) if not use_map else None
    if full is not None:
        assert rel_err(out, full) < 8e-2


def test_fp8_per_tensor_and_per_channel():
    from moe_plugin.ops.quant import FP8_MAX

    e, hidden, inter = 3, 32, 16
    x, w1f, w2f, w, ids = make_case(6, e, 2, hidden, inter, seed=11)
    s1 = w1f.abs().amax(dim=(1, 2)) / FP8_MAX
    s2 = w2f.abs().amax(dim=(1, 2)) / FP8_MAX
    w1 = (w1f / s1[:, None, None]).to(torch.float8_e4m3fn)
    w2 = (w2f / s2[:, None, None]).to(torch.float8_e4m3fn)
    out = fused_experts(x, w1, w2, w, ids, w1_scale=s1, w2_scale=s2)
    ref = naive.moe(x, w1f, w2f, w, ids)
    assert rel_err(out, ref) < 8e-2
    c1 = w1f.abs().amax(dim=2, keepdim=True) / FP8_MAX
    c2 = w2f.abs().amax(dim=2, keepdim=True) / FP8_MAX
    w1c = (w1f / c1).to(torch.float8_e4m3fn)
    w2c = (w2f / c2).to(torch.float8_e4m3fn)
    out_c = fused_experts(x, w1c, w2c, w, ids, w1_scale=c1, w2_scale=c2, quant=QuantConfig("fp8_w8a8", per_act_token=True))
    assert rel_err(out_c, ref) < 8e-2


def test_fp8_per_tensor_with_no_tokens():
    x, w1f, w2f, w, ids = make_case(0, 3, 2, 32, 16)
    s1 = torch.ones(3)
    w1, w2 = w1f.to(torch.float8_e4m3fn), w2f.to(torch.float8_e4m3fn)
    out = fused_experts(x, w1, w2, w, ids, w1_scale=s1, w2_scale=s1)
    assert out.shape == (0, 32)


@pytest.mark.parametrize("experts", ["batched_torch", "torch"])
def test_caller_expert_map_with_a_forced_batched_backend(monkeypatch, experts):
    # An engine's expert_map places 4 of 6 global experts here: the batched layout must be sized by the
    # weights (it was sized by the global count and every call raised).
    monkeypatch.setenv("MOE_PLUGIN_EXPERTS", experts)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g)
    w1, w2 = torch.randn(4, 64, 64, generator=g) * 0.2, torch.randn(4, 64, 32, generator=g) * 0.2
    emap = torch.tensor([0, 1, -1, 2, 3, -1], dtype=torch.int32)
    ids = torch.tensor([[0, 2], [1, 3], [4, 5], [2, 0], [5, 1]], dtype=torch.int32)
    w = torch.rand(5, 2, generator=g)
    out = fused_experts(x, w1, w2, w, ids, global_num_experts=6, expert_map=emap)
    ref = naive.moe(x, w1, w2, w, ids, expert_map=emap)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
