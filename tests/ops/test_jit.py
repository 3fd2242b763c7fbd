"""``ops._jit``: kernels follow TRITON_INTERPRET at launch time, and stores round to nearest-even even in
Triton 3.9's interpreter (whose own float32 -> bf16 / e4m3 casts do not)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from moe_plugin.ops._jit import cast_for_store, kernel  # noqa: E402

FP8 = torch.float8_e4m3fn


@kernel
def _store_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, SOFT_ROUND: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, cast_for_store(x, out_ptr.dtype.element_ty, SOFT_ROUND), mask=mask)


def _cast(x, dtype, soft):
    out = torch.empty(x.shape, dtype=dtype)
    _store_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024, SOFT_ROUND=soft)
    return out


def _values():
    g = torch.Generator().manual_seed(0)
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[~grid.isnan()]
    midpoints = (grid.sort().values[1:] + grid.sort().values[:-1]) / 2  # exact ties
    return torch.cat([grid, midpoints, torch.randn(4000, generator=g) * 50, torch.randn(4000, generator=g) * 1e-3, torch.tensor([-0.0])])


@pytest.mark.parametrize("dtype", [FP8, torch.bfloat16, torch.float16])
def test_interpreted_store_rounds_like_torch(interpreter, dtype):
    x = _values().clamp(-448, 448)
    got = _cast(x, dtype, soft=True)
    want = x.to(dtype)
    assert torch.equal(got.view(torch.uint8) if dtype == FP8 else got.view(torch.int16), want.view(torch.uint8) if dtype == FP8 else want.view(torch.int16))
    assert interpreter.launches == 1


def test_launch_time_switch(monkeypatch):
    # The same kernel object interprets once TRITON_INTERPRET=1 is set, although it was decorated (at import)
    # without it.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.tensor([1.5, -2.25])
    assert torch.equal(_cast(x, torch.float32, soft=True), x)
