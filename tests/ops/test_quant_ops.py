"""FP8 quantization (per-token-group, per-token, per-tensor) against a per-group loop, bit for bit, on both
CPU backends."""

from __future__ import annotations

import math

import pytest
import torch

from moe_plugin.ops import quant as Q

FP8 = torch.float8_e4m3fn


def ceil_pow2(v):
    mant, exp = math.frexp(v)
    return v if mant == 0.5 else math.ldexp(1.0, exp)


def naive_group_quant(x, group, use_ue8m0=False, eps=1e-10):
    """One group at a time: fp32 amax, fp32 ``amax / 448`` (exact power-of-two round-up for UE8M0),
    fp32 ``x * (1 / scale)`` (the reciprocal rounded to fp32 once) clamped to +-448, then round-to-nearest-even
    into e4m3."""
    rows = x.float().reshape(-1, x.shape[-1])
    k = x.shape[-1]
    groups = math.ceil(k / group)
    q = torch.empty(rows.shape, dtype=FP8)
    s = torch.empty(rows.shape[0], groups, dtype=torch.float32)
    for r in range(rows.shape[0]):
        for gi in range(groups):
            vals = rows[r, gi * group : min((gi + 1) * group, k)]
            amax = max(float(vals.abs().max()), eps)
            scale = torch.tensor(amax, dtype=torch.float32) / 448.0
            if use_ue8m0:
                scale = torch.tensor(ceil_pow2(float(scale)), dtype=torch.float32)
            s[r, gi] = scale
            inv_scale = torch.tensor(1.0, dtype=torch.float32) / scale
            q[r, gi * group : gi * group + vals.numel()] = (vals * inv_scale).clamp(-448.0, 448.0).to(FP8)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], groups)


def assert_bits_equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.uint8) if a.dtype == FP8 else a, b.view(torch.uint8) if b.dtype == FP8 else b)


def wide_range(shape, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 20, (*shape[:-1], 1), generator=g).float())
    limit = torch.finfo(dtype).max / 8
    return x.clamp(-limit, limit).to(dtype)


@pytest.mark.parametrize(
    "shape,group,dtype",
    [((7, 256), 128, torch.float32), ((2, 3, 384), 128, torch.bfloat16), ((9, 192), 64, torch.float16), ((4, 96), 32, torch.float32)],
)
@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_group_quant_bit_exact(backend, shape, group, dtype, use_ue8m0):
    x = wide_range(shape, seed=shape[-1] + group, dtype=dtype)
    q, s = Q.per_token_group_quant_fp8(x, group, use_ue8m0=use_ue8m0)
    ref_q, ref_s = naive_group_quant(x, group, use_ue8m0)
    assert_bits_equal(q, ref_q)
    assert torch.equal(s, ref_s)


def test_group_quant_column_major_scales(backend):
    x = wide_range((6, 512), seed=1, dtype=torch.bfloat16)
    q, s = Q.per_token_group_quant_fp8(x, 128, column_major_scales=True)
    assert s.shape == (6, 4) and s.stride() == (1, 6)
    ref_q, ref_s = naive_group_quant(x, 128)
    assert_bits_equal(q, ref_q)
    assert torch.equal(s, ref_s)


def test_group_quant_zero_rows_use_eps(backend):
    x = torch.zeros(2, 128)
    q, s = Q.per_token_group_quant_fp8(x, 128, eps=1e-6)
    assert torch.equal(s, torch.full((2, 1), torch.tensor(1e-6) / 448.0))
    assert not q.float().any()


def test_ragged_last_group_through_the_kernel(interpreter):
    # ops.quant only sends K % group == 0 to Triton; the kernel itself also handles a ragged last group.
    from moe_plugin.ops._quant_triton import per_token_group_quant_fp8_triton

    x = wide_range((5, 200), seed=4, dtype=torch.float32)
    q, s = per_token_group_quant_fp8_triton(x, 128)
    ref_q, ref_s = naive_group_quant(x, 128)
    assert_bits_equal(q, ref_q)
    assert torch.equal(s, ref_s)
    assert interpreter.launches == 1


def test_per_token_quant(backend):
    x = wide_range((5, 3, 160), seed=2, dtype=torch.bfloat16)
    q, s = Q.per_token_quant_fp8(x)
    ref_q, ref_s = naive_group_quant(x, 160)
    assert s.shape == (5, 3, 1)
    assert_bits_equal(q, ref_q)
    assert torch.equal(s, ref_s)


def test_per_tensor_quant_dynamic_and_static(backend):
    x = wide_range((4, 64), seed=3, dtype=torch.float16)
    q, s = Q.per_tensor_quant_fp8(x)
    ref_scale = torch.tensor(float(x.float().abs().max()), dtype=torch.float32) / 448.0
    assert torch.equal(s, ref_scale.reshape(1))
    one = torch.tensor(1.0, dtype=torch.float32)
    assert_bits_equal(q, (x.float() * (one / ref_scale)).clamp(-448, 448).to(FP8))
    static = torch.tensor([0.01])
    q2, s2 = Q.per_tensor_quant_fp8(x, static)
    assert torch.equal(s2, static)
    assert_bits_equal(q2, (x.float() * (one / static)).clamp(-448, 448).to(FP8))  # saturates at +-448


# A value where x / scale and x * (1 / scale) round to different FP8 values (3.25 vs 3.5): pins the
# definition (reciprocal once, then a multiply) in every entry point.
_SPLIT_SCALE = 3.2611753940582275 / 448
_SPLIT_X = 0.02456800639629364


def test_reciprocal_definition_at_a_value_where_division_differs(backend):
    scale = torch.tensor(_SPLIT_SCALE, dtype=torch.float32)
    x = torch.tensor(_SPLIT_X, dtype=torch.float32)
    assert float((x / scale).to(FP8)) == 3.25 and float((x * (1 / scale)).to(FP8)) == 3.5
    q, _ = Q.per_tensor_quant_fp8(torch.full((3, 8), _SPLIT_X), scale.reshape(1))
    assert (q.float() == 3.5).all()
    # group: the group's amax sets the scale to exactly _SPLIT_SCALE
    row = torch.tensor([[_SPLIT_X, 3.2611753940582275, 0.0, 0.0]], dtype=torch.float32)
    qg, sg = Q.per_token_group_quant_fp8(row, 4)
    assert float(sg) == float(scale) and float(qg[0, 0].float()) == 3.5


def test_scales_below_the_smallest_normal_float_stay_finite(backend):
    # eps=0 lets a group of tiny values produce a subnormal scale, whose reciprocal overflows to inf (zeros
    # became 0 * inf = NaN, or -448 after Triton's clamp): it counts as the smallest normal scale instead.
    x = torch.tensor([[3e-37, 0.0, -1e-37, 0.0]], dtype=torch.float32)
    inv_tiny = torch.tensor(1.0) / torch.tensor(torch.finfo(torch.float32).tiny)
    expected = (x * inv_tiny).clamp(-448, 448).to(FP8).float().tolist()
    assert expected == [[26.0, 0.0, -9.0, 0.0]]
    q, s = Q.per_token_group_quant_fp8(x, 4, eps=0.0)
    assert float(s) < torch.finfo(torch.float32).tiny  # the scale itself is kept as computed
    assert q.float().tolist() == expected
    q2, _ = Q.per_tensor_quant_fp8(x, torch.tensor([1e-40]))
    assert q2.float().tolist() == expected


def test_round_scale_ue8m0_is_exact_at_binade_edges():
    just_above = torch.tensor([2.0**-10, 2.0**-10 * (1 + 2**-23), 3.0, 0.75, 1e-30], dtype=torch.float32)
    got = Q.round_scale_ue8m0(just_above)
    assert got.tolist() == [2.0**-10, 2.0**-9, 4.0, 1.0, ceil_pow2(float(torch.tensor(1e-30)))]
