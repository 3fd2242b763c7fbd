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


def naive_routed_sum(x, ids, num_local, expert_map, valid, before):
    """x [S, M, k, H] split-K partials; slots whose expert is not local are skipped; rows >= valid keep
    ``before``."""
    splits, m, k, h = x.shape
    out = before.double().clone()
    for t in range(min(valid, m)):
        out[t] = 0
        for j in range(k):
            e = int(ids[t, j])
            if expert_map is not None and e >= 0:
                e = int(expert_map[e])
            if 0 <= e < num_local:
                for s in range(splits):
                    out[t] += x[s, t, j].double()
    return out


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("with_map", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_routed_split_k_and_valid_tokens(backend, splits, with_map, dtype):
    m, k, h, num_global, num_local = 7, 3, 40, 8, 4
    g = torch.Generator().manual_seed(splits * 10 + with_map)
    ids = torch.randint(-1, num_global, (m, k), generator=g, dtype=torch.int32)
    ids[0] = torch.tensor([num_local, num_global - 1, -1])  # token 0: no slot is local without the map
    expert_map = None
    if with_map:
        expert_map = torch.full((num_global,), -1, dtype=torch.int32)
        expert_map[torch.tensor([1, 4, 6, 7])] = torch.arange(num_local, dtype=torch.int32)
    x = torch.randn(splits, m, k, h, generator=g).to(dtype)
    # Rows of skipped slots are never read: garbage there must not reach the output.
    e = ids.long() if expert_map is None else torch.where(ids >= 0, expert_map.long()[ids.clamp(min=0).long()], -1)
    skipped = (e < 0) | (e >= num_local)
    x[:, skipped] = float("nan")
    for valid in (m, 4, 0):
        before = torch.full((m, h), 7.0, dtype=dtype)
        out = before.clone()
        got = moe_sum(x if splits > 1 else x[0], out, topk_ids=ids, num_experts=num_local, expert_map=expert_map,
                      valid_tokens=torch.tensor([valid], dtype=torch.int32))
        assert got is out
        ref = naive_routed_sum(x, ids, num_local, expert_map, valid, before)
        ulp = 1e-6 if dtype == torch.float32 else 2**-10
        torch.testing.assert_close(out.double(), ref, rtol=ulp, atol=1e-5)
        assert torch.equal(out[valid:], before[valid:])
    # Without valid every row is written.
    out = moe_sum(x, torch.empty(m, h, dtype=dtype), topk_ids=ids.long(), num_experts=num_local, expert_map=expert_map)
    ref = naive_routed_sum(x, ids, num_local, expert_map, m, out)
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3)


def test_kernel_and_fallback_agree_bitwise(interpreter, monkeypatch):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 9, 4, 33, generator=g) * 100).to(torch.float32)
    ids = torch.randint(-1, 6, (9, 4), generator=g, dtype=torch.int32)
    outs = []
    for interpret in (True, False):
        if not interpret:
            monkeypatch.delenv("TRITON_INTERPRET")
        out = torch.zeros(9, 33, dtype=torch.bfloat16)
        outs.append(moe_sum(x, out, topk_ids=ids, num_experts=5, valid_tokens=torch.tensor([7])))
        outs.append(moe_sum(x[0]))
    assert interpreter.launches == 2
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


def test_routed_bad_inputs(backend):
    backend.expect_launch = False
    x = torch.zeros(2, 3, 16)
    ids = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"topk_ids must have shape \(2, 3\)"):
        moe_sum(x, topk_ids=ids[:, :2], num_experts=4)
    with pytest.raises(TypeError, match="topk_ids must be an int32/int64"):
        moe_sum(x, topk_ids=ids.float(), num_experts=4)
    with pytest.raises(ValueError, match="num_experts"):
        moe_sum(x, topk_ids=ids)
    with pytest.raises(ValueError, match="topk_ids is missing"):
        moe_sum(x, expert_map=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="expert_map must be a 1-D"):
        moe_sum(x, topk_ids=ids, num_experts=4, expert_map=torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="valid_tokens needs out"):
        moe_sum(x, valid_tokens=torch.tensor([1]))
    with pytest.raises(ValueError, match="valid_tokens must hold one int32/int64 value"):
        moe_sum(x, torch.zeros(2, 16), valid_tokens=torch.tensor([1.0]))
    with pytest.raises(TypeError, match="valid_tokens must be a one-element integer torch.Tensor"):
        moe_sum(x, torch.zeros(2, 16), valid_tokens=1)
