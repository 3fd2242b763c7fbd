"""moe_sum against a plain-loop reference on both CPU backends."""

from __future__ import annotations

import pytest
import torch

from moe_plugin.ops.moe_sum import moe_sum


def naive_sum(x):
    m, k, h = x.shape
    out = torch.zeros(m, h, dtype=torch.float64)
    for t in range(m):
        for j in range(k):
            out[t] += x[t, j].double()
    return out


@pytest.mark.parametrize(
    "m,k,h,dtype",
    [(5, 1, 16, torch.float32), (7, 8, 48, torch.bfloat16), (3, 3, 100, torch.float16), (4, 2, 2500, torch.float32)],
)
def test_matches_reference(backend, m, k, h, dtype):
    g = torch.Generator().manual_seed(m * k)
    x = (torch.randn(m, k, h, generator=g) * 4).to(dtype)
    out = moe_sum(x)
    assert out.dtype == dtype and out.shape == (m, h)
    ulp = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    torch.testing.assert_close(out.double(), naive_sum(x), rtol=ulp, atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_fp32_accumulation_into_a_wider_out(backend):
    # bf16 inputs whose bf16 running sum would lose the small terms; fp32 accumulation keeps them.
    x = torch.tensor([[[256.0] * 16, [1.0] * 16, [1.0] * 16]], dtype=torch.bfloat16)
    out = torch.empty(1, 16, dtype=torch.float32)
    assert moe_sum(x, out) is out
    assert torch.equal(out, torch.full((1, 16), 258.0))


def test_strided_input(backend):
    base = torch.randn(6, 4, 64)
    x = base[:, ::2, :32]
    torch.testing.assert_close(moe_sum(x).double(), naive_sum(x), rtol=1e-6, atol=1e-6)


def test_empty_and_bad_inputs(backend):
    backend.expect_launch = False
    assert moe_sum(torch.zeros(0, 4, 16)).shape == (0, 16)
    with pytest.raises(ValueError, match=r"\[M, top_k, K\]"):
        moe_sum(torch.zeros(4, 16))
    with pytest.raises(ValueError, match="out must be"):
        moe_sum(torch.zeros(2, 2, 16), torch.zeros(2, 15))
