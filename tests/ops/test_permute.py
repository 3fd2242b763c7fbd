"""moe_permute / moe_unpermute, ep_scatter / ep_gather and compute_aligned_M against plain-loop references."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from moe_plugin.ops.permute import (
    compute_aligned_M,
    ep_gather,
    ep_scatter,
    moe_permute,
    moe_unpermute,
    permuted_row_size,
)

FP8 = torch.float8_e4m3fn


def local_key(x, n_local, expert_map):
    if expert_map is not None:
        if not 0 <= x < len(expert_map):
            return -1
        x = expert_map[x]
    return x if 0 <= x < n_local else -1


def naive_layout(ids, n_local, expert_map, align, rows, fill):
    """(offsets, inv, m_indices): local slots expert by expert in flat order, each expert's run starting on a
    multiple of ``align`` (1 = packed); m_indices labels aligned runs when ``align`` is not None."""
    table = expert_map.tolist() if expert_map is not None else None
    flat = [x for row in ids.tolist() for x in row]
    keys = [local_key(x, n_local, table) for x in flat]
    inv = [-1] * len(flat)
    m_indices = [fill] * rows
    offsets, start = [0], 0
    for e in range(n_local):
        mine = [slot for slot, key in enumerate(keys) if key == e]
        for rank, slot in enumerate(mine):
            inv[slot] = start + rank
        run = len(mine) if align is None else math.ceil(len(mine) / align) * align
        if align is not None:
            m_indices[start : start + run] = [e] * run
        start += run
        offsets.append(start)
    return offsets, inv, m_indices


def make_inputs(m, k, e, hidden, dtype, seed, with_invalid=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, hidden, generator=g) * 3
    x = x.to(dtype)
    ids = torch.randint(0, e, (m, k), generator=g).to(torch.int32)
    if with_invalid and m > 1:
        ids[1, 0] = -1
    scales = torch.rand(m, max(hidden // 16, 1), generator=g) + 0.25
    weights = torch.rand(m, k, generator=g)
    return x, ids, scales, weights


def expert_map_for(kind, e):
    if kind is None:
        return None, -1
    if kind == "ep":
        em = torch.full((e,), -1, dtype=torch.int32)
        owned = list(range(1, e, 2))
        em[owned] = torch.arange(len(owned), dtype=torch.int32)
        return em, len(owned)
    return torch.full((e,), -1, dtype=torch.int32), 2  # all remote


PERMUTE_CASES = [
    # m, k, experts, hidden, dtype, map, align
    (0, 2, 4, 16, torch.bfloat16, None, None),
    (0, 2, 4, 16, torch.bfloat16, None, 16),
    (7, 1, 1, 16, torch.float32, None, None),
    (9, 2, 5, 32, torch.bfloat16, "ep", None),
    (13, 4, 6, 48, FP8, None, 16),
    (10, 8, 9, 16, torch.float16, "ep", 128),
    (6, 3, 4, 16, torch.bfloat16, "all_remote", 32),
]


@pytest.mark.parametrize("m,k,e,hidden,dtype,map_kind,align", PERMUTE_CASES)
def test_permute_matches_reference(backend, m, k, e, hidden, dtype, map_kind, align):
    x, ids, scales, _ = make_inputs(m, k, e, hidden, dtype, seed=m + 7 * e)
    expert_map, n_local = expert_map_for(map_kind, e)
    n_local_resolved = e if n_local == -1 else n_local
    permuted, out_scales, offsets, inv, m_indices = moe_permute(
        x, scales, ids, e, n_local, expert_map, align, fill_invalid_expert=-7
    )
    rows = permuted_row_size(m, k, e, align)
    exp_offsets, exp_inv, exp_m = naive_layout(ids, n_local_resolved, expert_map, align, rows, -7)
    assert permuted.shape == (rows, hidden) and permuted.dtype == dtype
    assert offsets.dtype == torch.int64 and offsets.tolist() == exp_offsets
    assert inv.dtype == torch.int32 and inv.tolist() == exp_inv
    assert m_indices.dtype == torch.int32 and m_indices.tolist() == exp_m
    assert out_scales.shape == (rows, scales.shape[1])
    for slot, r in enumerate(exp_inv):
        if r >= 0:
            assert torch.equal(permuted[r].view(torch.uint8), x[slot // k].view(torch.uint8))
            assert torch.equal(out_scales[r], scales[slot // k])


def test_permute_per_tensor_scale_is_returned_unchanged(backend):
    x, ids, _, _ = make_inputs(5, 2, 3, 16, torch.bfloat16, seed=1)
    scale = torch.tensor([0.5])
    assert moe_permute(x, scale, ids, 3)[1] is scale


def test_permute_into_given_buffer(backend):
    x, ids, _, _ = make_inputs(6, 2, 3, 16, torch.bfloat16, seed=2, with_invalid=False)
    buf = torch.zeros(permuted_row_size(6, 2, 3, None), 16, dtype=torch.bfloat16)
    out = moe_permute(x, None, ids, 3, permuted_hidden_states=buf)
    assert out[0] is buf
    for slot, r in enumerate(out[3].tolist()):
        assert torch.equal(buf[r], x[slot // 2])


def naive_unpermute(permuted, weights, inv, limit):
    m, k = weights.shape
    out = torch.zeros(m, permuted.shape[1], dtype=torch.float64)
    for t in range(m):
        for j in range(k):
            r = int(inv[t * k + j])
            if 0 <= r < limit:
                out[t] += float(weights[t, j]) * permuted[r].double()
    return out


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_offsets", [False, True])
def test_unpermute_matches_reference(backend, out_dtype, use_offsets):
    m, k, e, hidden = 9, 3, 5, 32
    x, ids, _, weights = make_inputs(m, k, e, hidden, torch.bfloat16, seed=5)
    expert_map, n_local = expert_map_for("ep", e)
    permuted, _, offsets, inv, _ = moe_permute(x, None, ids, e, n_local, expert_map, 16)
    # Poison every row no slot owns: the inverse must never read one.
    owned = torch.zeros(permuted.shape[0], dtype=torch.bool)
    owned[inv[inv >= 0].long()] = True
    permuted[~owned] = float("nan")
    out = torch.full((m, hidden), float("nan"), dtype=out_dtype)
    assert moe_unpermute(out, permuted, weights, inv, offsets if use_offsets else None) is None
    ref = naive_unpermute(permuted, weights, inv, int(offsets[-1]) if use_offsets else permuted.shape[0])
    tol = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=2**-8, atol=1e-2)}[out_dtype]
    torch.testing.assert_close(out.double(), ref, **tol)


def test_unpermute_limit_from_offsets_skips_rows(backend):
    permuted = torch.arange(4 * 16, dtype=torch.float32).reshape(4, 16)
    inv = torch.tensor([0, 3, 1, 2], dtype=torch.int32)
    weights = torch.ones(2, 2)
    out = torch.empty(2, 16)
    moe_unpermute(out, permuted, weights, inv, torch.tensor([0, 2], dtype=torch.int64))
    assert torch.equal(out[0], permuted[0])  # row 3 is past offsets[-1] = 2
    assert torch.equal(out[1], permuted[1])


def test_bf16_rows_that_are_not_16_bytes_are_refused():
    x = torch.zeros(4, 6, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        moe_permute(x, None, torch.zeros(4, 2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        moe_unpermute(torch.zeros(4, 6), x, torch.ones(4, 1), torch.zeros(4, dtype=torch.int32))


def test_permute_rejects_a_wrong_buffer_and_mismatched_ids():
    x = torch.zeros(4, 16, dtype=torch.bfloat16)
    ids = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="permuted_hidden_states must be"):
        moe_permute(x, None, ids, 4, permuted_hidden_states=torch.zeros(3, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="topk_ids must be"):
        moe_permute(x, None, ids[:3], 4)
    with pytest.raises(ValueError, match="n_local_expert"):
        moe_permute(x, None, ids, 4, n_local_expert=5)


# ---- DeepGEMM contiguous layout ------------------------------------------------------------------------


def test_compute_aligned_m():
    assert compute_aligned_M(1, 8, 256, 128) == 8 * 128  # decode: only top_k experts can be active
    assert compute_aligned_M(100, 8, 16, 128) == math.ceil((800 + 16 * 127) / 128) * 128
    assert compute_aligned_M(0, 8, 16, 128) == 0
    meta = SimpleNamespace(expert_num_tokens_cpu=torch.tensor([0, 1, 128, 129]))
    assert compute_aligned_M(100, 8, 4, 128, meta) == 0 + 128 + 128 + 256


SCATTER_CASES = [
    # m, k, experts, map, alignment, with scales
    (0, 2, 4, None, 16, True),
    (11, 4, 6, None, 16, True),
    (9, 2, 8, "ep", 8, False),
    (5, 3, 4, "all_remote", 16, True),
    (16, 8, 3, None, 32, True),
]


@pytest.mark.parametrize("m,k,e,map_kind,align,with_scales", SCATTER_CASES)
def test_ep_scatter_matches_reference(backend, m, k, e, map_kind, align, with_scales):
    x, ids, scales, _ = make_inputs(m, k, e, 64, FP8, seed=3 * m + e)
    expert_map, n_local = expert_map_for(map_kind, e)
    n_local = e if n_local == -1 else n_local
    res = ep_scatter(x, scales if with_scales else None, ids, n_local, expert_map, alignment=align)
    m_sum = compute_aligned_M(m, k, n_local, align)
    _, exp_inv, exp_m = naive_layout(ids, n_local, expert_map, align, m_sum, 0)
    assert res.hidden_states.shape == (m_sum, 64)
    assert res.m_indices.tolist() == exp_m
    assert res.inv_perm.shape == (m, k) and res.inv_perm.reshape(-1).tolist() == exp_inv
    table = expert_map.tolist() if expert_map is not None else None
    keys = [local_key(x_, n_local, table) for x_ in ids.reshape(-1).tolist()]
    assert res.expert_num_tokens.tolist() == [keys.count(i) for i in range(n_local)]
    for slot, r in enumerate(exp_inv):
        if r >= 0:
            assert torch.equal(res.hidden_states[r].view(torch.uint8), x[slot // k].view(torch.uint8))
            if with_scales:
                assert torch.equal(res.scales[r], scales[slot // k])
    assert (res.scales is None) == (not with_scales)


def test_ep_scatter_exact_rows_and_strided_scale_buffer(backend):
    x, ids, scales, _ = make_inputs(10, 2, 4, 32, torch.bfloat16, seed=9, with_invalid=False)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=4)
    m_sum = compute_aligned_M(10, 2, 4, 8, SimpleNamespace(expert_num_tokens_cpu=counts))
    col_major = torch.empty_strided((m_sum, scales.shape[1]), (1, m_sum + 4), dtype=torch.float32)
    res = ep_scatter(x, scales, ids, 4, alignment=8, m_sum=m_sum, fill_invalid_expert=-1, out_scales=col_major)
    assert res.scales is col_major
    _, exp_inv, exp_m = naive_layout(ids, 4, None, 8, m_sum, -1)
    assert res.m_indices.tolist() == exp_m and -1 not in exp_m  # exact rows: nothing past the last run
    for slot, r in enumerate(exp_inv):
        assert torch.equal(col_major[r], scales[slot // 2])


def naive_group_quant(row, group, ue8m0):
    """(fp8 values as fp32, scales) of one row, group by group, written out."""
    q, scales = [], []
    for start in range(0, row.numel(), group):
        g = row[start : start + group].float()
        scale = max(float(g.abs().max()), 1e-10) / 448.0
        if ue8m0:
            scale = 2.0 ** math.ceil(math.log2(scale))
        scales.append(scale)
        # fp32 reciprocal of the fp32 scale, then one multiply per value (ops.quant's definition)
        inv_scale = torch.tensor(1.0) / torch.tensor(scale, dtype=torch.float32)
        q.append((g * inv_scale).clamp(-448, 448).to(FP8).float())
    return torch.cat(q), torch.tensor(scales)


@pytest.mark.parametrize(
    "m,k,e,map_kind,group,ue8m0,dtype",
    [
        (0, 2, 4, None, 64, False, torch.bfloat16),
        (11, 4, 6, None, 64, False, torch.bfloat16),
        (9, 2, 8, "ep", 128, True, torch.float16),
        (5, 3, 4, "all_remote", 64, False, torch.float32),
        (16, 8, 3, "ep", 32, False, torch.bfloat16),
    ],
)
def test_ep_scatter_quantizing_matches_quantize_then_scatter(backend, m, k, e, map_kind, group, ue8m0, dtype):
    hidden = 256
    x, ids, _, _ = make_inputs(m, k, e, hidden, dtype, seed=5 * m + e)
    expert_map, n_local = expert_map_for(map_kind, e)
    n_local = e if n_local == -1 else n_local
    m_sum = compute_aligned_M(m, k, n_local, 16)
    # Column-major scales with a padded stride, as DeepGEMM reads them; the buffers start as garbage.
    col_major = torch.empty_strided((m_sum, hidden // group), (1, m_sum + 4), dtype=torch.float32).fill_(-3.0)
    out = torch.full((m_sum, hidden), 7.0).to(FP8)
    res = ep_scatter(x, None, ids, n_local, expert_map, alignment=16, out=out, out_scales=col_major,
                     quant_group_size=group, use_ue8m0=ue8m0)
    assert res.hidden_states is out and res.scales is col_major
    _, exp_inv, exp_m = naive_layout(ids, n_local, expert_map, 16, m_sum, 0)
    assert res.m_indices.tolist() == exp_m and res.inv_perm.reshape(-1).tolist() == exp_inv
    written = set()
    for slot, r in enumerate(exp_inv):
        if r >= 0:
            q_ref, s_ref = naive_group_quant(x[slot // k], group, ue8m0)
            assert torch.equal(out[r].float(), q_ref), (slot, r)
            assert torch.equal(col_major[r], s_ref)
            written.add(r)
    for r in set(range(m_sum)) - written:  # padding rows are not written
        assert bool((out[r].float() == 7.0).all()) and bool((col_major[r] == -3.0).all())


def test_ep_scatter_quantizing_refuses_bad_input():
    ids = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="bf16, fp16 or fp32 to quantize"):
        ep_scatter(torch.zeros(4, 128, dtype=FP8), None, ids, 2, quant_group_size=128)
    with pytest.raises(ValueError, match="hidden_scales must be None"):
        ep_scatter(torch.zeros(4, 128, dtype=torch.bfloat16), torch.ones(4, 1), ids, 2, quant_group_size=128)
    with pytest.raises(ValueError, match="multiple of quant_group_size=128"):
        ep_scatter(torch.zeros(4, 192, dtype=torch.bfloat16), None, ids, 2, quant_group_size=128)
    with pytest.raises(ValueError, match="out must be a contiguous-row torch.float8_e4m3fn"):
        ep_scatter(torch.zeros(4, 128, dtype=torch.bfloat16), None, ids, 2, alignment=16,
                   out=torch.empty(compute_aligned_M(4, 2, 2, 16), 128, dtype=torch.bfloat16), quant_group_size=128)


def test_ep_gather_matches_reference(backend):
    m, k, e = 12, 4, 6
    x, ids, _, weights = make_inputs(m, k, e, 32, torch.bfloat16, seed=4)
    expert_map, n_local = expert_map_for("ep", e)
    res = ep_scatter(x, None, ids, n_local, expert_map, alignment=16)
    out = ep_gather(res.hidden_states, weights, res.inv_perm)
    assert out.dtype == torch.bfloat16 and out.shape == (m, 32)
    ref = naive_unpermute(res.hidden_states, weights, res.inv_perm.reshape(-1), res.hidden_states.shape[0])
    torch.testing.assert_close(out.double(), ref, rtol=2**-8, atol=1e-2)
    given = torch.empty(m, 32, dtype=torch.float32)
    assert ep_gather(res.hidden_states, weights, res.inv_perm, out=given) is given
    torch.testing.assert_close(given.double(), ref, rtol=1e-6, atol=1e-6)


def test_ep_gather_without_weights_sums_the_local_rows(backend):
    m, k, e = 9, 3, 6
    x, ids, _, _ = make_inputs(m, k, e, 48, torch.bfloat16, seed=6)
    expert_map, n_local = expert_map_for("ep", e)
    res = ep_scatter(x, None, ids, n_local, expert_map, alignment=16)
    out = ep_gather(res.hidden_states, None, res.inv_perm, out=torch.empty(m, 48, dtype=torch.float32))
    # plain loop: the unweighted fp32 sum of each token's rows that were placed on this rank
    for t in range(m):
        want = torch.zeros(48, dtype=torch.float64)
        for j in range(k):
            r = int(res.inv_perm[t, j])
            if r >= 0:
                want += x[t].double()  # a placed slot's row is the token itself
        torch.testing.assert_close(out[t].double(), want, rtol=1e-6, atol=1e-6)
    assert (res.inv_perm < 0).any() and (res.inv_perm >= 0).any()  # both kinds of slot occurred
    with pytest.raises(ValueError, match=r"2-D \[num_tokens, top_k\]"):
        ep_gather(res.hidden_states, None, res.inv_perm.reshape(-1))


def test_ep_scatter_rejects_a_bad_m_sum():
    x = torch.zeros(4, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of alignment"):
        ep_scatter(x, None, torch.zeros(4, 2, dtype=torch.int32), 2, alignment=16, m_sum=20)


def test_wide_rows_skip_remote_slots_exactly(backend):
    # Rows of several column blocks (4 KB per program: 2 for the FP8 scatter, 3+ for the bf16 gather),
    # top_k not a power of two, most slots
    # remote (EP): the rows a remote slot would point at hold NaN and its weight is NaN, so any read of
    # a remote slot shows up; per-row scales must reach each destination once, whatever column block.
    m, k, e, hidden = 7, 3, 8, 4096 + 64
    x, ids, scales, weights = make_inputs(m, k, e, hidden, FP8, seed=21)
    ids[0] = torch.tensor([0, 2, 4], dtype=torch.int32)  # token 0: only remote experts under this map
    expert_map, n_local = expert_map_for("ep", e)
    res = ep_scatter(x, scales, ids, n_local, expert_map, alignment=8)
    inv = res.inv_perm
    assert (inv[0] < 0).all() and (inv >= 0).any() and (inv < 0).sum() > inv.numel() // 3
    for t in range(m):
        for j in range(k):
            r = int(inv[t, j])
            if r >= 0:
                assert torch.equal(res.hidden_states[r].view(torch.uint8), x[t].view(torch.uint8))
                assert torch.equal(res.scales[r], scales[t])
    rows = torch.full((res.hidden_states.shape[0], hidden), float("nan"), dtype=torch.bfloat16)
    placed = inv[inv >= 0].long()
    rows[placed] = torch.randn(placed.numel(), hidden).to(torch.bfloat16)
    w = torch.where(inv >= 0, weights, torch.full_like(weights, float("nan")))
    out = ep_gather(rows, w, inv, out=torch.empty(m, hidden, dtype=torch.float32))
    want = torch.zeros(m, hidden, dtype=torch.float64)
    for t in range(m):
        for j in range(k):
            r = int(inv[t, j])
            if r >= 0:
                want[t] += rows[r].double() * float(w[t, j])
    assert torch.equal(out[0], torch.zeros(hidden))
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-5)
