"""Activations and the masked SiLU-mul-FP8-quant against per-element references, on both CPU backends."""

from __future__ import annotations

import math

import pytest
import torch

from moe_plugin.ops import activation as act

FP8 = torch.float8_e4m3fn


def silu(g):
    return g / (1.0 + math.exp(-g))


def naive_gated(x, kind, alpha=1.702, limit=7.0):
    """float64 reference, element by element."""
    rows = x.double().reshape(-1, x.shape[-1]).tolist()
    n = x.shape[-1] // 2
    out = []
    for row in rows:
        vals = []
        for g, u in zip(row[:n], row[n:]):
            if kind == "silu":
                vals.append(silu(g) * u)
            elif kind == "gelu":
                vals.append(0.5 * g * (1.0 + math.erf(g / math.sqrt(2.0))) * u)
            else:
                g, u = min(g, limit), max(-limit, min(u, limit))
                vals.append(g / (1.0 + math.exp(-alpha * g)) * (u + 1.0))
        out.append(vals)
    return torch.tensor(out, dtype=torch.float64).reshape(*x.shape[:-1], n)


TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2**-8, atol=1e-3),
    torch.float16: dict(rtol=2**-11, atol=1e-4),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["silu", "gelu", "swiglu"])
def test_gated_matches_reference(backend, kind, dtype):
    g = torch.Generator().manual_seed(len(kind))
    x = (torch.randn(3, 4, 2 * 40, generator=g) * 5).to(dtype)  # |x| > limit occurs: the clamp is exercised
    fn = {"silu": act.silu_and_mul, "gelu": act.gelu_and_mul, "swiglu": act.swiglu}[kind]
    out = fn(x)
    assert out.shape == (3, 4, 40) and out.dtype == dtype
    torch.testing.assert_close(out.double(), naive_gated(x, kind), **TOL[dtype])


def test_swiglu_custom_alpha_and_limit(backend):
    x = torch.linspace(-12, 12, 2 * 64).reshape(2, 64)
    out = act.swiglu(x, alpha=1.0, limit=3.0)
    torch.testing.assert_close(out.double(), naive_gated(x, "swiglu", 1.0, 3.0), **TOL[torch.float32])


def test_relu2_and_out_buffers(backend):
    x = torch.randn(5, 33, generator=torch.Generator().manual_seed(2))
    out = torch.empty(5, 33, dtype=torch.bfloat16)
    assert act.relu2(x, out) is out
    ref = torch.tensor([[max(v, 0.0) ** 2 for v in row] for row in x.double().tolist()], dtype=torch.float64)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.bfloat16])
    # a non-contiguous gated output buffer
    y = torch.randn(4, 64)
    wide = torch.zeros(4, 64)
    view = wide[:, ::2]
    assert act.silu_and_mul(y, view) is view
    torch.testing.assert_close(view.double(), naive_gated(y, "silu"), **TOL[torch.float32])
    assert torch.equal(wide[:, 1::2], torch.zeros(4, 32))


def test_odd_width_is_refused(backend):
    backend.expect_launch = False
    with pytest.raises(ValueError, match="even last dimension"):
        act.silu_and_mul(torch.zeros(2, 7))


# ---- masked SiLU-mul-FP8-quant ----------------------------------------------------------------------------


def ceil_pow2(v):
    mant, exp = math.frexp(v)
    return v if mant == 0.5 else math.ldexp(1.0, exp)


def naive_masked_quant(y, counts, group, use_ue8m0, eps=1e-10):
    """Per valid (expert, token, group): the float64 activation, its fp32 scale and the dequantization bound."""
    e, t, h2 = y.shape
    h = h2 // 2
    out = {}
    for ex in range(e):
        for tok in range(min(int(counts[ex]), t)):
            row = y[ex, tok].double().tolist()
            acts = [silu(gv) * uv for gv, uv in zip(row[:h], row[h:])]
            for gi in range(h // group):
                vals = acts[gi * group : (gi + 1) * group]
                scale = float(torch.tensor(max(max(abs(v) for v in vals), eps), dtype=torch.float32) / 448.0)
                if use_ue8m0:
                    scale = ceil_pow2(scale)
                out[ex, tok, gi] = (vals, scale)
    return out


def check_masked(y_q, y_s, ref, group, use_ue8m0):
    for (ex, tok, gi), (vals, scale) in ref.items():
        got_scale = float(y_s[ex, tok, gi])
        if use_ue8m0:
            # exp/log in fp32 vs float64 can move amax by an ulp, never across more than one power of two
            assert math.frexp(got_scale)[0] == 0.5 and got_scale / scale in (0.5, 1.0, 2.0)
        else:
            assert math.isclose(got_scale, scale, rel_tol=1e-5)
        deq = (y_q[ex, tok, gi * group : (gi + 1) * group].float() * got_scale).double()
        want = torch.tensor(vals, dtype=torch.float64)
        # round-to-nearest into e4m3: relative error <= 2^-4, absolute <= half the subnormal step
        bound = want.abs() * 2**-4 + got_scale * 2**-10 + 1e-6 * want.abs().max()
        assert bool(((deq - want).abs() <= bound).all()), (ex, tok, gi)


@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("column_major", [True, False])
def test_masked_quant_matches_reference(backend, use_ue8m0, column_major):
    e, t, h, group = 4, 10, 256, 128
    g = torch.Generator().manual_seed(int(use_ue8m0) + 2 * int(column_major))
    y = (torch.randn(e, t, 2 * h, generator=g) * 3).to(torch.bfloat16)
    counts = torch.tensor([0, 3, 10, 7], dtype=torch.int32)
    y_q, y_s = act.silu_mul_fp8_quant_masked(y, counts, group, use_ue8m0=use_ue8m0, column_major_scales=column_major)
    assert y_q.shape == (e, t, h) and y_q.dtype == FP8
    assert y_s.shape == (e, t, h // group) and y_s.dtype == torch.float32
    assert y_s.stride() == ((t * 2, 1, t) if column_major else (t * 2, 2, 1))
    check_masked(y_q, y_s, naive_masked_quant(y, counts, group, use_ue8m0), group, use_ue8m0)


def test_masked_quant_never_reads_rows_past_the_count(backend):
    e, t, h = 2, 6, 128
    y = torch.randn(e, t, 2 * h, generator=torch.Generator().manual_seed(7))
    counts = torch.tensor([2, 5])
    clean = act.silu_mul_fp8_quant_masked(y, counts, column_major_scales=False)
    poisoned = y.clone()
    poisoned[0, 2:] = float("nan")
    poisoned[1, 5:] = float("inf")
    dirty = act.silu_mul_fp8_quant_masked(poisoned, counts, column_major_scales=False)
    for ex, n in enumerate(counts.tolist()):
        assert torch.equal(clean[0][ex, :n].view(torch.uint8), dirty[0][ex, :n].view(torch.uint8))
        assert torch.equal(clean[1][ex, :n], dirty[1][ex, :n])


def test_masked_quant_counts_clamped_and_fp32_input(backend):
    y = torch.randn(2, 3, 2 * 128, generator=torch.Generator().manual_seed(8))
    counts = torch.tensor([-4, 99], dtype=torch.int64)  # negative -> 0, past T -> T
    y_q, y_s = act.silu_mul_fp8_quant_masked(y, counts)
    check_masked(y_q, y_s, naive_masked_quant(y, torch.tensor([0, 3]), 128, False), 128, False)


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((torch.zeros(2, 4, 256), torch.zeros(3, dtype=torch.int32)), ValueError, r"tokens_per_expert must be a tensor of shape \[2\]"),
        ((torch.zeros(4, 256), torch.zeros(4, dtype=torch.int32)), ValueError, r"\[E, T, 2H\]"),
        ((torch.zeros(2, 4, 200), torch.zeros(2, dtype=torch.int32)), ValueError, "group_size"),
        ((torch.zeros(2, 4, 256), torch.zeros(2)), TypeError, "int32 or int64"),
    ],
)
def test_masked_quant_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        act.silu_mul_fp8_quant_masked(*args)
