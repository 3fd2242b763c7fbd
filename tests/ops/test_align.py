"""moe_align_block_size and its graph-safe form against a plain-loop reference, on both CPU backends.

The Triton engine has three paths (one program up to 512 slots; chunk sort then place while the count
table is small; else rank, scan and place launches); under the interpreter the ``path`` fixture runs a
test through each of them and checks that every call made the launches of its path.
"""

from __future__ import annotations

import math

import pytest
import torch

import moe_plugin.ops.align as align_mod
from moe_plugin.ops.align import (
    SlotSortOutputs,
    align_buffer_sizes,
    moe_align_block_size,
    moe_align_block_size_graph_safe,
    sort_slots_torch,
    sort_slots_triton,
)

LAUNCHES = {"one_launch": 1, "two_launches": 2, "three_launches": 3}


def force_three_launches(monkeypatch, max_chunks=None):
    """Send every problem to the three-launch path; a small ``max_chunks`` gives each rank program several
    32-slot sub-blocks (large inputs do that by themselves)."""
    monkeypatch.setattr(align_mod, "_ONE_PROGRAM_MAX_SLOTS", -1)
    monkeypatch.setattr(align_mod, "_TWO_LAUNCH_MAX_TABLE", -1)
    if max_chunks is not None:
        monkeypatch.setattr(align_mod, "_MAX_CHUNKS", max_chunks)


def force_two_launches(monkeypatch, chunk=32):
    """Send every problem to the two-launch path, in chunks small enough that tests' inputs span several."""
    monkeypatch.setattr(align_mod, "_ONE_PROGRAM_MAX_SLOTS", -1)
    monkeypatch.setattr(align_mod, "_TWO_LAUNCH_CHUNK", chunk)


@pytest.fixture(params=list(LAUNCHES))
def path(request, backend, monkeypatch):
    """Which Triton path runs (the torch backend has one path: its second parametrization is skipped)."""
    if not backend.interpreted:
        if request.param != "one_launch":
            pytest.skip("the torch fallback has a single path")
        yield request.param
        return
    if request.param == "three_launches":
        force_three_launches(monkeypatch)
    elif request.param == "two_launches":
        force_two_launches(monkeypatch)
    calls = []
    engine = align_mod.sort_slots_triton

    def counted(*args, **kwargs):
        calls.append(None)
        return engine(*args, **kwargs)

    monkeypatch.setattr(align_mod, "sort_slots_triton", counted)
    yield request.param
    assert calls, "the test never reached the Triton engine"
    assert backend.counter.launches == LAUNCHES[request.param] * len(calls)


def naive_align(ids, block_size, num_experts, expert_map=None, pad_sorted_ids=False, valid_tokens=None):
    """vLLM's moe_align_block_size written out with lists. ``valid_tokens`` keeps only the first rows while
    buffer sizes and the sentinel still come from all rows (the graph-safe contract)."""
    rows = ids.tolist()
    top_k = len(rows[0]) if rows else ids.shape[1]
    numel = len(rows) * top_k
    if valid_tokens is not None:
        rows = rows[: max(0, min(valid_tokens, len(rows)))]
    flat = [e for row in rows for e in row]
    length = numel + num_experts * (block_size - 1)
    if pad_sorted_ids:
        length = math.ceil(length / block_size) * block_size
    sorted_ids, expert_ids = [], []
    for e in range(num_experts):
        mine = [slot for slot, x in enumerate(flat) if x == e]
        padded = math.ceil(len(mine) / block_size) * block_size
        sorted_ids += mine + [numel] * (padded - len(mine))
        expert_ids += [e] * (padded // block_size)
    total = len(sorted_ids)
    sorted_ids += [numel] * (length - total)
    expert_ids += [0] * (math.ceil(length / block_size) - len(expert_ids))
    if expert_map is not None:
        table = expert_map.tolist()
        expert_ids = [table[e] for e in expert_ids]
    return sorted_ids, expert_ids, total


def check(result, expected):
    sorted_ids, expert_ids, ntpp = result
    assert sorted_ids.dtype == torch.int32 and expert_ids.dtype == torch.int32 and ntpp.dtype == torch.int32
    assert sorted_ids.tolist() == expected[0]
    assert expert_ids.tolist() == expected[1]
    assert ntpp.tolist() == [expected[2]]


def random_ids(m, k, e, seed, invalid=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(m)]) if k <= e and m else torch.randint(0, e, (m, k), generator=g)
    ids = ids.to(torch.int32).reshape(m, k)
    if invalid and m > 2:
        ids[1, 0] = -1
        ids[2, -1] = e + 5
    return ids


def test_seed_example(backend):
    # The documented example, with the experts numbered from 0.
    ids = torch.tensor([[1, 2, 3], [0, 1, 3], [0, 2, 3], [0, 1, 2]], dtype=torch.int32)
    sorted_ids, expert_ids, ntpp = moe_align_block_size(ids, 4, 4)
    assert sorted_ids.tolist()[:16] == [3, 6, 9, 12, 0, 4, 10, 12, 1, 7, 11, 12, 2, 5, 8, 12]
    assert sorted_ids.tolist()[16:] == [12] * 8  # buffer = 12 + 4 * 3
    assert expert_ids.tolist() == [0, 1, 2, 3, 0, 0]
    assert ntpp.tolist() == [16]


CASES = [
    # m, k, experts, block, pad, map kind
    (0, 2, 8, 16, False, None),
    (1, 1, 1, 16, False, None),
    (5, 8, 12, 16, True, "ep"),
    (9, 3, 7, 32, False, "ep"),
    (6, 4, 33, 64, True, None),
    (4, 2, 5, 256, False, "all_remote"),
    (11, 6, 6, 128, True, "ep"),
]


@pytest.mark.parametrize("m,k,e,bs,pad,map_kind", CASES)
def test_matches_reference(backend, path, m, k, e, bs, pad, map_kind):
    ids = random_ids(m, k, e, seed=m * 31 + e, invalid=True)
    expert_map = None
    if map_kind == "ep":
        expert_map = torch.full((e,), -1, dtype=torch.int32)
        expert_map[e // 2 :] = torch.arange(e - e // 2, dtype=torch.int32)
    elif map_kind == "all_remote":
        expert_map = torch.full((e,), -1, dtype=torch.int32)
    result = moe_align_block_size(ids, bs, e, expert_map=expert_map, pad_sorted_ids=pad)
    check(result, naive_align(ids, bs, e, expert_map, pad))
    assert result[0].numel() == align_buffer_sizes(m * k, bs, e, pad)[0]


def test_all_slots_on_one_expert(backend, path):
    ids = torch.full((20, 1), 3, dtype=torch.int32)
    ids[::2] = 3
    check(moe_align_block_size(ids, 16, 5), naive_align(ids, 16, 5))


def test_stable_within_an_expert_across_chunks(backend, path):
    # More slots than one program's chunk: the order inside each expert must still be the flat order.
    ids = torch.tensor([[i % 3, (i * 7 + 1) % 3] for i in range(80)], dtype=torch.int32)
    check(moe_align_block_size(ids, 16, 3), naive_align(ids, 16, 3))


def test_chunks_of_several_sub_blocks(backend, monkeypatch):
    # Inputs past 32k slots give each rank program several 32-slot sub-blocks, carried by running counts;
    # two chunks of 128 slots force that here.
    force_three_launches(monkeypatch, max_chunks=2)
    ids = random_ids(40, 4, 6, seed=5, invalid=True)
    expert_map = torch.tensor([1, -1, 0, 3, 2, -1], dtype=torch.int32)
    check(moe_align_block_size(ids, 16, 6, expert_map=expert_map), naive_align(ids, 16, 6, expert_map))
    valid = torch.tensor([23], dtype=torch.int32)
    check(moe_align_block_size_graph_safe(ids, 16, 6, valid), naive_align(ids, 16, 6, valid_tokens=23))
    if backend.interpreted:
        assert backend.counter.launches == 6


def test_int64_ids_accepted(backend, path):
    ids = random_ids(7, 2, 9, seed=3).long()
    check(moe_align_block_size(ids, 16, 9), naive_align(ids, 16, 9))


@pytest.mark.parametrize("valid", [0, 1, 5, 12, 40])
def test_graph_safe_equals_the_sliced_call(backend, path, valid):
    max_tokens, k, e, bs = 12, 3, 7, 16
    ids = random_ids(max_tokens, k, e, seed=11)
    expert_map = torch.tensor([0, -1, 1, -1, 2, 3, -1], dtype=torch.int32)
    count = torch.tensor([valid], dtype=torch.int32)
    result = moe_align_block_size_graph_safe(ids, bs, e, count, expert_map=expert_map, pad_sorted_ids=True)
    check(result, naive_align(ids, bs, e, expert_map, True, valid_tokens=valid))


@pytest.mark.parametrize("valid", [-(2**40), 2**31 + 5, 2**32 + 5])
def test_graph_safe_int64_count_clamps_without_wrapping(backend, path, valid):
    # 2**32 + 5 cast to int32 first would read as 5 tokens; clamped first it reads as all of them.
    max_tokens, k, e, bs = 12, 3, 7, 16
    ids = random_ids(max_tokens, k, e, seed=12)
    count = torch.tensor([valid], dtype=torch.int64)
    check(moe_align_block_size_graph_safe(ids, bs, e, count), naive_align(ids, bs, e, valid_tokens=valid))


@pytest.mark.parametrize(
    "m,k,e,launches",
    [(64, 8, 128, 1), (64, 8, 256, 2), (1, 8, 256, 1), (171, 3, 128, 2), (3, 2, 1025, 3), (3, 2, 1024, 1)],
)
def test_path_boundaries(interpreter, m, k, e, launches):
    # The default limits: 512 slots, 1024 experts and 512 x 128 slots x experts go to one program, one more
    # of any to two launches (three past 1024 experts, whose histogram one program does not hold).
    assert (align_mod._ONE_PROGRAM_MAX_SLOTS, align_mod._ONE_PROGRAM_MAX_KEYS) == (512, 1024)
    ids = random_ids(m, k, e, seed=m + e, invalid=True)
    check(moe_align_block_size(ids, 64, e), naive_align(ids, 64, e))
    assert interpreter.launches == launches


@pytest.mark.parametrize("n_blocks,launches", [(4095, 1), (4096, 2)])
def test_block_limit(interpreter, n_blocks, launches):
    # align's own buffers never reach 4096 blocks within the other limits, but an engine caller may pass a
    # longer block_keys buffer: its tail must still read block_tail (a one-program histogram holds 4095).
    ids = random_ids(10, 2, 5, seed=4)
    keys = ids.reshape(-1).long()
    ref, got = (
        SlotSortOutputs(block_keys=torch.full((n_blocks,), -7, dtype=torch.int32), block_tail=3) for _ in range(2)
    )
    sort_slots_torch(keys, 5, 2, ref)
    sort_slots_triton(ids.reshape(-1), 2, 5, 2, got)
    assert interpreter.launches == launches
    assert torch.equal(got.block_keys, ref.block_keys)
    assert got.block_keys[-1] == 3 and got.block_keys[0] == ids.min()


@pytest.mark.parametrize("engine_path", ["one_launch", "two_launches", "three_launches", "sub_blocks"])
@pytest.mark.parametrize("valid", [None, 9])
def test_engine_outputs_match_torch(interpreter, monkeypatch, engine_path, valid):
    # Every optional output of the shared engine (ops.permute uses inv, offsets, counts, repeated block keys)
    # on every path, against the torch engine on the local keys.
    if engine_path == "three_launches":
        force_three_launches(monkeypatch)
    elif engine_path == "two_launches":
        force_two_launches(monkeypatch, chunk=16)
    elif engine_path == "sub_blocks":
        force_three_launches(monkeypatch, max_chunks=1)
    m, k, e_global, n_local, block, repeat = 13, 4, 12, 5, 8, 3
    ids = random_ids(m, k, e_global, seed=21, invalid=True)
    key_map = torch.full((e_global,), -1, dtype=torch.int32)
    key_map[torch.tensor([2, 3, 5, 8, 11])] = torch.tensor([4, 0, 1, 3, 2], dtype=torch.int32)
    block_map = torch.tensor([10, 11, 12, 13, 14], dtype=torch.int32)
    numel = m * k
    flat = ids.reshape(-1).long()
    mapped = key_map.long()[flat.clamp(0, e_global - 1)]
    keys = torch.where((flat >= 0) & (flat < e_global), mapped, torch.full_like(flat, -1))
    if valid is not None:
        keys = keys[: valid * k]
    length, n_blocks = align_buffer_sizes(numel, block, n_local)

    def outputs():
        return SlotSortOutputs(
            sorted_ids=torch.full((length,), -7, dtype=torch.int32),
            sentinel=numel,
            inv=torch.full((numel,), -7, dtype=torch.int32),
            block_keys=torch.full((n_blocks * repeat,), -7, dtype=torch.int32),
            block_tail=4,
            block_repeat=repeat,
            block_key_map=block_map,
            num_tokens_post_padded=torch.full((1,), -7, dtype=torch.int32),
            offsets=torch.full((n_local + 1,), -7, dtype=torch.int64),
            counts=torch.full((n_local,), -7, dtype=torch.int32),
        )

    ref, got = outputs(), outputs()
    sort_slots_torch(keys, n_local, block, ref)
    valid_tokens = None if valid is None else torch.tensor([valid], dtype=torch.int32)
    sort_slots_triton(ids.reshape(-1), k, n_local, block, got, key_map=key_map, valid_tokens=valid_tokens)
    assert interpreter.launches == {"one_launch": 1, "two_launches": 2}.get(engine_path, 3)
    for field in ("sorted_ids", "inv", "block_keys", "num_tokens_post_padded", "offsets", "counts"):
        assert torch.equal(getattr(got, field), getattr(ref, field)), field
    if valid is not None:  # the torch engine saw only the valid slots: the others must read -1
        assert bool((got.inv[valid * k :] == -1).all())


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: moe_align_block_size(torch.zeros(4, 2), 16, 4), TypeError, "int32"),
        (lambda: moe_align_block_size(torch.zeros(8, dtype=torch.int32), 16, 4), ValueError, "2-D"),
        (lambda: moe_align_block_size(torch.zeros(4, 2, dtype=torch.int32), 0, 4), ValueError, "block_size"),
        (lambda: moe_align_block_size(torch.zeros(4, 2, dtype=torch.int32), 16, 0), ValueError, "num_experts"),
        (
            lambda: moe_align_block_size(torch.zeros(4, 2, dtype=torch.int32), 16, 4, torch.zeros(3, dtype=torch.int32)),
            ValueError,
            r"expert_map must have shape \[4\]",
        ),
        (lambda: moe_align_block_size_graph_safe(torch.zeros(4, 2, dtype=torch.int32), 16, 4, 3), TypeError, "valid_tokens"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
