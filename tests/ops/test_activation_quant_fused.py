"""gated_act_fp8_quant (contiguous layout) against a float64 reference and the two-step path, on both CPU
backends (torch; Triton interpreter with fp16 / fp32 inputs)."""

from __future__ import annotations

import math

import pytest
import torch

from moe_plugin.ops import activation as act
from moe_plugin.ops.quant import per_token_group_quant_fp8

FP8 = torch.float8_e4m3fn
GROUP = 128


def naive_act(row, kind, alpha=1.702, limit=7.0):
    n = len(row) // 2
    vals = []
    for g, u in zip(row[:n], row[n:]):
        if kind == "silu":
            vals.append(g / (1.0 + math.exp(-g)) * u)
        elif kind == "gelu":
            vals.append(0.5 * g * (1.0 + math.erf(g / math.sqrt(2.0))) * u)
        else:
            g, u = min(g, limit), max(-limit, min(u, limit))
            vals.append(g / (1.0 + math.exp(-alpha * g)) * (u + 1.0))
    return vals


def dtypes_for(backend):
    # The 3.9 interpreter's bf16 conversions are emulated; the brief keeps bf16 to the torch path.
    return [torch.float32, torch.float16] if backend.interpreted else [torch.float32, torch.float16, torch.bfloat16]


def layout(m, poison_rows=()):
    """m_indices of a small contiguous layout: experts in runs, -1 rows (skipped) in between and at the end."""
    owners = [0, 0, 0, 1, -1, -1, 2, 2, 2, 2, -1, -1]
    mi = torch.tensor((owners * math.ceil(m / len(owners)))[:m], dtype=torch.int32)
    return mi


@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("kind", ["silu", "gelu", "swiglu"])
def test_fused_matches_float64_reference_and_two_step(backend, kind, use_ue8m0):
    m, n = 13, 2 * GROUP
    for dtype in dtypes_for(backend):
        g = torch.Generator().manual_seed(hash((kind, use_ue8m0, str(dtype))) % 1000)
        x = (torch.randn(m, 2 * n, generator=g) * 4).to(dtype)  # beyond swiglu's limit now and then
        x[2, :GROUP] = 0.0  # an all-zero gate group: the eps floor sets its scale
        mi = layout(m)
        q, s = act.gated_act_fp8_quant(x, kind, GROUP, m_indices=mi, use_ue8m0=use_ue8m0)
        assert q.shape == (m, n) and q.dtype == FP8 and s.shape == (m, n // GROUP) and s.dtype == torch.float32
        assert s.stride() == (1, 16)  # column-major, column stride rounded up to 4 rows (TMA)

        # the two-step path on the same backend: bit for bit
        y = act.apply_activation(kind, x)
        q2, s2 = per_token_group_quant_fp8(y, GROUP, use_ue8m0=use_ue8m0)
        live = mi >= 0
        assert torch.equal(q.view(torch.uint8)[live], q2.view(torch.uint8)[live]), (kind, dtype)
        assert torch.equal(s[live], s2[live]), (kind, dtype)

        # the independent float64 reference
        for r in range(m):
            if mi[r] < 0:
                continue
            want_row = torch.tensor(naive_act(x[r].double().tolist(), kind), dtype=torch.float64)
            for gi in range(n // GROUP):
                want = want_row[gi * GROUP : (gi + 1) * GROUP]
                scale = float(s[r, gi])
                ref_scale = max(float(want.to(dtype).abs().max()), 1e-10) / 448.0
                if use_ue8m0:
                    assert math.frexp(scale)[0] == 0.5, scale  # a power of two
                    assert ref_scale * (1 - 1e-3) <= scale < 2 * ref_scale * (1 + 1e-3)
                else:
                    # amax of the activation rounded to x's dtype; libm differences move it by an ulp at most
                    assert math.isclose(scale, ref_scale, rel_tol=2 * torch.finfo(dtype).eps + 1e-6), (r, gi)
                deq = q[r, gi * GROUP : (gi + 1) * GROUP].double() * scale
                # rounding to x's dtype, then to e4m3 (relative 2^-4, half a subnormal step absolute)
                bound = want.abs() * (2**-4 + 2 * torch.finfo(dtype).eps) + scale * 2**-9 + 1e-9
                assert bool(((deq - want).abs() <= bound).all()), (kind, dtype, r, gi)


def test_padding_rows_neither_read_nor_written(backend):
    m, n = 12, GROUP
    x = torch.randn(m, 2 * n, generator=torch.Generator().manual_seed(3))
    mi = layout(m)
    dead = mi < 0
    poisoned = x.clone()
    poisoned[dead] = float("nan")
    out = torch.full((m, n), 7.0).to(FP8)
    out_s = torch.full((n // GROUP, m), -3.0).t()  # column-major, as DeepGEMM reads it
    q, s = act.gated_act_fp8_quant(poisoned, "silu", GROUP, m_indices=mi, out=out, out_scales=out_s)
    assert q is out and s is out_s
    assert (out[dead].float() == 7.0).all() and (out_s[dead] == -3.0).all()
    clean_q, clean_s = act.gated_act_fp8_quant(x, "silu", GROUP)
    assert torch.equal(out.view(torch.uint8)[~dead], clean_q.view(torch.uint8)[~dead])
    assert torch.equal(out_s[~dead], clean_s[~dead])
    assert torch.isfinite(out_s[~dead]).all()


def test_without_m_indices_every_row_and_row_major_scales(backend):
    m, n = 5, 2 * GROUP
    x = torch.randn(m, 2 * n, generator=torch.Generator().manual_seed(4)).to(torch.float16)
    q, s = act.gated_act_fp8_quant(x, "gelu", GROUP, column_major_scales=False, m_indices=None)
    assert s.is_contiguous()
    q2, s2 = per_token_group_quant_fp8(act.gelu_and_mul(x), GROUP)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)


def test_all_rows_skipped_and_empty(backend):
    backend.expect_launch = False  # the empty call launches nothing; the all-skipped one may
    x = torch.randn(4, 2 * GROUP)
    out_s = torch.full((4, 1), 5.0)
    act.gated_act_fp8_quant(x, "silu", m_indices=torch.full((4,), -1, dtype=torch.int64), out_scales=out_s)
    assert (out_s == 5.0).all()
    q, s = act.gated_act_fp8_quant(torch.empty(0, 2 * GROUP), "silu")
    assert q.shape == (0, GROUP) and s.shape == (0, 1)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((torch.zeros(2, 3, 256),), {}, ValueError, r"2-D tensor \[M, 2N\]"),
        ((torch.zeros(2, 256, dtype=torch.int32),), {}, TypeError, "bf16, fp16 or fp32"),
        ((torch.zeros(2, 256), "relu2"), {}, ValueError, "activation must be one of"),
        ((torch.zeros(2, 255),), {}, ValueError, "even"),
        ((torch.zeros(2, 200),), {}, ValueError, "group_size must be a positive int dividing N=100"),
        ((torch.zeros(2, 256),), dict(m_indices=torch.zeros(3, dtype=torch.int32)), ValueError, r"shape \[2\]"),
        ((torch.zeros(2, 256),), dict(m_indices=torch.zeros(2)), TypeError, "int32 or int64"),
        ((torch.zeros(2, 256),), dict(out=torch.zeros(2, 128)), ValueError, "float8_e4m3fn tensor of shape"),
        ((torch.zeros(2, 256),), dict(out_scales=torch.zeros(2, 2)), ValueError, r"fp32 tensor of shape \(2, 1\)"),
    ],
)
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        act.gated_act_fp8_quant(*args, **kwargs)
