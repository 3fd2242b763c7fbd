"""Token -> expert sorting padded to the GEMM block: ``moe_align_block_size`` and its CUDA-graph-safe form.

Semantics (vLLM's ``moe_align_block_size``):

- The ``numel = M * top_k`` slots of ``topk_ids`` (flat index ``t * top_k + j``) are grouped by expert,
  experts in ascending id order, and within an expert in ascending flat index (a stable sort).
- Each expert's group is padded up to a multiple of ``block_size``; padding and the unused tail hold the
  sentinel ``numel``. The buffer holds ``numel + num_experts * (block_size - 1)`` entries (rounded up to
  a multiple of ``block_size`` with ``pad_sorted_ids``), the worst case over every routing.
- ``expert_ids[b]`` is the expert of block ``b``; blocks past ``num_tokens_post_padded`` hold expert 0.
  With ``expert_map`` the alignment still runs over all ``num_experts`` global experts and the block ids
  are mapped through the map at the end, so blocks of experts owned by another rank read -1 (and the
  tail reads ``expert_map[0]``).
- Slots whose id lies outside ``[0, num_experts)`` (e.g. -1 for "dropped") are neither counted nor placed.

The Triton implementation runs without host synchronisation, with a grid that depends only on ``numel``
and ``num_experts``: one launch up to 512 slots (fewer with more than 128 experts), two while the chunks'
count table is small (up to 4096 tokens x top-8 with 256 experts), three above. Inside a CUDA graph each
launch costs a few microseconds of its own, which dominates small problems; a program's cost grows with
the slots it sorts, which dominates large ones. Measured on an H100 (median of CUDA-graph replays, top-8,
block 64; "before" is the previous commit, one program or three launches, in the same run):

    tokens (slots)    E=128: now (path)    before    E=256: now (path)    before
    1      (8)          3.2 us (one)       3.0 us      4.1 us (one)       4.1 us
    64     (512)        5.1 us (one)       5.2 us      6.0 us (two)       6.4 us
    512    (4096)       6.0 us (two)       7.2 us      6.0 us (two)       7.2 us
    2048   (16384)      6.8 us (two)       8.2 us      7.5 us (two)       8.2 us
    4096   (32768)      8.1 us (two)      10.7 us      9.0 us (two)      11.1 us
    16384  (131072)    17.9 us (three)    18.2 us     18.4 us (three)    18.6 us
    65536  (524288)    44.5 us (three)    44.5 us     46.6 us (three)    46.2 us

(Three launches at every size, session 2: 6.4 / 7.1 us at one token.)

- One program (at most 512 slots, 1024 experts, 512 x 128 slots x experts and 4095 blocks): the program
  loads every slot, counts the experts with a histogram, sorts the distinct codes ``(expert, slot)`` (a
  stable sort by expert), and writes each sorted slot to its expert's padded offset plus its position
  within the expert. Block ids come from a histogram of the experts' end blocks.
- Two launches (at most 64 chunks, and chunks x experts padded to a power of two <= 128 x 128):

  1. chunk rank: each program sorts a chunk of 128, 256 or 512 slots (by size) the one program's way and
     writes its row of a ``[chunks, experts]`` count table and each slot's rank within the chunk's slots
     of its expert; it also writes the sentinel over its share of ``sorted_token_ids``.
  2. chunk place: every program loads the whole count table in one tile and reduces it to the experts'
     totals (hence the padded offsets) and its own chunk's prefix, then places its slots; the programs
     past the chunks write the expert id of a tile of blocks.

  (A two-launch variant with the scan folded into the rank launch through self-resetting atomic tickets
  measured 16.0 us at 4096 tokens and was removed.)
- Three launches otherwise:

  1. rank: each program takes a chunk of slots (32 up to 32k slots, larger beyond so that there are at
     most 1024 chunks) and computes every slot's rank among the chunk's slots of the same expert: a
     stable 32 x 32 comparison per sub-block of 32 slots, carried across sub-blocks in the program's own
     row of a ``[chunks, experts]`` count table, which ends holding the chunk's count per expert. It also
     writes the sentinel over its share of ``sorted_token_ids``.
  2. scan: per expert, exclusive prefix of the counts over the chunks (in place) and the expert's total.
  3. place: every program derives the padded expert offsets from the totals (a cumsum over experts in
     registers); chunk programs write ``sorted_token_ids[offset + prefix + rank] = slot``, the others
     write the expert id of a tile of blocks.

  The count table is ``chunks x experts`` (at most 1024 rows) and every stage is parallel. Comparisons
  wider than 32 x 32 spill registers (measured on an H100), hence the sub-blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._dispatch import use_triton
from ._jit import kernel, load_valid_count

try:
    import triton.language as tl
except ImportError:  # torch-only installs: the kernels below are never launched
    tl = None

# One program sorts problems up to this many slots (and keys, and blocks) in a single launch. Its cost grows
# with the slots (H100, top-8, E=128: 2.9 us at 8 slots, 5.1 at 512, 10.2 at 1024, 26.2 at 2048) while the
# three launches cost 6.1-6.5 us at 512-1024 slots: 512 is the last size where one program wins.
_ONE_PROGRAM_MAX_SLOTS = 512
_ONE_PROGRAM_MAX_KEYS = 1024
# ... and its histogram and offsets grow with the keys: at 512 slots one program costs 5.2 us with 128
# experts but 6.5 us with 256, where three launches take 6.2 (H100); at 8 slots it wins with either
# (3.0 / 4.1 vs 6.4 / 7.1 us). Slots x keys bounds both.
_ONE_PROGRAM_MAX_WORK = 512 * 128
_ONE_PROGRAM_MAX_BLOCKS = 4096
# Two-launch path: chunks of slots sorted in registers like the one program; smaller chunks sort faster,
# fewer chunks make the count table that every place program reads smaller. (slots up to, chunk) pairs:
# the best of 128 / 256 / 512 at each size from 128 to 4096 tokens x top-8 (H100); _TWO_LAUNCH_CHUNK fixes
# one. Taken while there are at most _TWO_LAUNCH_MAX_CHUNKS chunks (the measured range: every place
# program reads all of them) and the table, its expert axis padded to a power of two, has at most
# _TWO_LAUNCH_MAX_TABLE entries, which a place program loads in one tile (_TABLE_TILE: at 4096 tokens one
# tile measured 8.3 / 9.0 us with 128 / 256 experts, tiles of 4096 entries 9.1 / 10.5 us; 8 warps were
# slower everywhere).
_TWO_LAUNCH_CHUNKS = ((4096, 128), (16384, 256))
_TWO_LAUNCH_LARGEST_CHUNK = 512
_TWO_LAUNCH_CHUNK: int | None = None
_TWO_LAUNCH_MAX_TABLE = 128 * 128
_TWO_LAUNCH_MAX_CHUNKS = 64
_TWO_LAUNCH_WARPS = 4
_TABLE_TILE = 128 * 128
# Three-launch path: at most this many chunks (the scan's rows).
_MAX_CHUNKS = 1024
_SCAN_TILE = 4096
# 32x32 comparisons per sub-block: larger tiles spill registers and run several times slower (H100).
_RANK_SUB = 32
_FILL_BLOCK = 1024
_BLOCKS_PER_PROGRAM = 64


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def align_buffer_sizes(numel: int, block_size: int, num_experts: int, pad_sorted_ids: bool = False) -> tuple[int, int]:
    """``(len(sorted_token_ids), len(expert_ids))`` for ``numel`` routed slots: the worst case over routings."""
    max_padded = numel + num_experts * (block_size - 1)
    if pad_sorted_ids:
        max_padded = _cdiv(max_padded, block_size) * block_size
    return max_padded, _cdiv(max_padded, block_size)


# ----------------------------------------------------------------------------------------------------
# validation


def _check_topk_ids(topk_ids: object, name: str = "topk_ids") -> torch.Tensor:
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [num_tokens, top_k], got {type(topk_ids).__name__}")
    if topk_ids.dim() != 2:
        raise ValueError(f"{name} must be 2-D [num_tokens, top_k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 (or int64), got {topk_ids.dtype}")
    return topk_ids


def _check_positive_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_expert_map(expert_map: object, num_experts: int, device: torch.device) -> torch.Tensor | None:
    if expert_map is None:
        return None
    if not isinstance(expert_map, torch.Tensor):
        raise TypeError(f"expert_map must be a torch.Tensor [{num_experts}] or None, got {type(expert_map).__name__}")
    if expert_map.dim() != 1 or expert_map.shape[0] != num_experts:
        raise ValueError(f"expert_map must have shape [{num_experts}] (one entry per global expert), got {tuple(expert_map.shape)}")
    if expert_map.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"expert_map must be int32 (or int64), got {expert_map.dtype}")
    if expert_map.device != device:
        raise ValueError(f"expert_map must be on {device} like topk_ids, got {expert_map.device}")
    return expert_map.contiguous()


def _check_valid_tokens(valid_tokens: object, device: torch.device, like: str = "topk_ids") -> torch.Tensor:
    if not isinstance(valid_tokens, torch.Tensor):
        raise TypeError(
            "valid_tokens must be a one-element integer torch.Tensor on the device (a Python int would be baked "
            f"into a captured graph), got {type(valid_tokens).__name__}"
        )
    if valid_tokens.numel() != 1 or valid_tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"valid_tokens must hold one int32/int64 value, got shape {tuple(valid_tokens.shape)} dtype {valid_tokens.dtype}"
        )
    if valid_tokens.device != device:
        raise ValueError(f"valid_tokens must be on {device} like {like}, got {valid_tokens.device}")
    return valid_tokens.reshape(1)


# ----------------------------------------------------------------------------------------------------
# the shared sorting engine (also used by ops.permute)


@dataclass
class SlotSortOutputs:
    """Buffers the engine fills; every one is optional. Lengths are the caller's business."""

    sorted_ids: torch.Tensor | None = None
    """``[L]`` int32: ``sorted_ids[dest] = slot``; every other entry receives ``sentinel``."""
    sentinel: int = 0
    inv: torch.Tensor | None = None
    """``[numel]`` int32: ``inv[slot] = dest``, -1 for slots that are not placed."""
    block_keys: torch.Tensor | None = None
    """``[num_blocks * repeat]`` int32: the key owning each ``block``-row block, ``block_tail`` past the end."""
    block_tail: int = 0
    block_repeat: int = 1
    block_key_map: torch.Tensor | None = None
    """Optional map applied to ``block_keys`` values (``expert_ids = expert_map[expert_ids]``)."""
    num_tokens_post_padded: torch.Tensor | None = None
    """``[1]`` int32: the padded total."""
    offsets: torch.Tensor | None = None
    """``[num_keys + 1]`` int64: padded start of each key, then the padded total."""
    counts: torch.Tensor | None = None
    """``[num_keys]`` int32: unpadded slots per key."""


def _sort_slots_torch(keys: torch.Tensor, num_keys: int, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dest per slot or -1, counts [num_keys], padded sizes [num_keys])`` for flat int64 ``keys``."""
    valid = (keys >= 0) & (keys < num_keys)
    bucket = torch.where(valid, keys, torch.full_like(keys, num_keys))
    counts = torch.bincount(bucket, minlength=num_keys + 1)[:num_keys]
    padded = (counts + block - 1) // block * block
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(bucket, stable=True)
    sorted_keys = bucket[order]
    kept = sorted_keys < num_keys
    order, sorted_keys = order[kept], sorted_keys[kept]
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=keys.device) - first[sorted_keys]
    dest = torch.full_like(keys, -1)
    dest[order] = (ends - padded)[sorted_keys] + rank
    return dest, counts, padded


def sort_slots_torch(keys: torch.Tensor, num_keys: int, block: int, out: SlotSortOutputs) -> None:
    """Reference implementation of the engine on flat int64 ``keys`` (slots past the valid count already
    removed by the caller, invalid keys < 0 or >= num_keys)."""
    dest, counts, padded = _sort_slots_torch(keys, num_keys, block)
    ends = torch.cumsum(padded, 0)
    total = int(ends[-1])
    placed = dest >= 0
    if out.sorted_ids is not None:
        out.sorted_ids.fill_(out.sentinel)
        out.sorted_ids[dest[placed]] = torch.nonzero(placed).flatten().to(torch.int32)
    if out.inv is not None:
        out.inv.fill_(-1)
        out.inv[: dest.numel()] = dest.to(torch.int32)
    if out.block_keys is not None:
        n_blocks = out.block_keys.numel() // out.block_repeat
        per_block = torch.full((n_blocks,), out.block_tail, dtype=torch.int64, device=keys.device)
        used = torch.repeat_interleave(torch.arange(num_keys, device=keys.device), padded // block)
        per_block[: used.numel()] = used
        if out.block_key_map is not None:
            per_block = out.block_key_map.long()[per_block]
        out.block_keys.copy_(per_block.repeat_interleave(out.block_repeat))
    if out.num_tokens_post_padded is not None:
        out.num_tokens_post_padded.fill_(total)
    if out.offsets is not None:
        out.offsets[0] = 0
        out.offsets[1:] = ends
    if out.counts is not None:
        out.counts.copy_(counts)


def _single_program_fits(numel: int, num_keys: int, n_blocks: int) -> bool:
    """Whether one program sorts the whole problem (see the module docstring)."""
    return (
        numel <= _ONE_PROGRAM_MAX_SLOTS
        and num_keys <= _ONE_PROGRAM_MAX_KEYS
        and numel * num_keys <= _ONE_PROGRAM_MAX_WORK
        and n_blocks < _ONE_PROGRAM_MAX_BLOCKS
    )


def _two_launch_chunk(numel: int) -> int:
    if _TWO_LAUNCH_CHUNK is not None:
        return _TWO_LAUNCH_CHUNK
    return next((chunk for limit, chunk in _TWO_LAUNCH_CHUNKS if numel <= limit), _TWO_LAUNCH_LARGEST_CHUNK)


def _two_launch_chunks(numel: int, num_keys: int) -> int:
    """Chunks of the two-launch path, 0 where its count table would be too large (or the keys too many for
    a chunk's histogram)."""
    n_chunks = max(1, _cdiv(numel, _two_launch_chunk(numel)))
    keys_p2 = max(32, _next_pow2(num_keys))
    if num_keys > _ONE_PROGRAM_MAX_KEYS or n_chunks > _TWO_LAUNCH_MAX_CHUNKS or n_chunks * keys_p2 > _TWO_LAUNCH_MAX_TABLE:
        return 0
    return n_chunks


def align_launches(numel: int, num_keys: int, n_blocks: int) -> int:
    """How many kernel launches the Triton engine makes for a problem (1, 2 or 3)."""
    if _single_program_fits(numel, num_keys, n_blocks):
        return 1
    return 2 if _two_launch_chunks(numel, num_keys) else 3


def sort_slots_triton(
    ids: torch.Tensor,
    top_k: int,
    num_keys: int,
    block: int,
    out: SlotSortOutputs,
    *,
    key_map: torch.Tensor | None = None,
    valid_tokens: torch.Tensor | None = None,
) -> None:
    """Sort flat contiguous ``ids`` (int32/int64, ``num_tokens * top_k`` of them) in one, two or three launches.

    ``key_map`` turns an id into its key (ids outside ``[0, len(key_map))`` get no key); without it the id
    is the key. With ``valid_tokens`` only the first ``valid_tokens * top_k`` slots take part; the grid and
    every buffer still depend on ``ids.numel()`` alone.
    """
    numel = ids.numel()
    device = ids.device
    dummy = ids  # stands in for absent optional pointers; never dereferenced
    fill_len = out.sorted_ids.numel() if out.sorted_ids is not None else 0
    max_tokens = numel // top_k if top_k else 0
    # The slots and their keys, as every kernel reads them (their leading parameters).
    slot_args = (
        ids,
        valid_tokens if valid_tokens is not None else dummy,
        numel,
        max_tokens,
        top_k,
        key_map if key_map is not None else dummy,
        key_map.numel() if key_map is not None else 0,
        num_keys,
    )
    slot_flags = dict(HAS_VALID=valid_tokens is not None, HAS_KEY_MAP=key_map is not None)
    n_blocks = out.block_keys.numel() // out.block_repeat if out.block_keys is not None else 0
    output_args = (
        out.sorted_ids if out.sorted_ids is not None else dummy,
        out.inv if out.inv is not None else dummy,
        out.num_tokens_post_padded if out.num_tokens_post_padded is not None else dummy,
        out.offsets if out.offsets is not None else dummy,
        out.block_keys if out.block_keys is not None else dummy,
        n_blocks,
        out.block_tail,
        out.block_key_map if out.block_key_map is not None else dummy,
    )
    output_flags = dict(
        HAS_SORTED=out.sorted_ids is not None,
        HAS_INV=out.inv is not None,
        HAS_NTPP=out.num_tokens_post_padded is not None,
        HAS_OFFSETS=out.offsets is not None,
        HAS_BLOCK_MAP=out.block_key_map is not None,
        REPEAT=out.block_repeat,
        REPEAT_P2=_next_pow2(out.block_repeat),
    )

    if _single_program_fits(numel, num_keys, n_blocks):
        _one_program_kernel[(1,)](
            *slot_args,
            block,
            fill_len,
            out.sentinel,
            out.counts if out.counts is not None else dummy,
            *output_args,
            **slot_flags,
            **output_flags,
            HAS_COUNTS=out.counts is not None,
            SLOTS=max(32, _next_pow2(numel)),
            # tl.histogram wants at least a warp's worth of bins.
            KEYS_P2=max(32, _next_pow2(num_keys)),
            BLOCKS_P2=max(32, _next_pow2(n_blocks + 1)),
            FILL_BLOCK=_FILL_BLOCK,
            num_warps=4,
        )
        return

    two_launch_chunks = _two_launch_chunks(numel, num_keys)
    if two_launch_chunks:
        _sort_in_chunks(slot_args, slot_flags, output_args, output_flags, out, block, fill_len, n_blocks, two_launch_chunks)
        return

    sub = min(_RANK_SUB, max(16, _next_pow2(numel)))
    chunk = max(sub, _next_pow2(_cdiv(numel, _MAX_CHUNKS)))
    n_chunks = max(1, _cdiv(numel, chunk))
    keys_p2 = max(16, _next_pow2(num_keys))

    # counts[chunk, key]: slots of `key` in `chunk`, then (after the scan) those in earlier chunks.
    counts = torch.empty((n_chunks, num_keys), dtype=torch.int32, device=device)
    ranks = torch.empty((max(numel, 1),), dtype=torch.int32, device=device)
    totals = out.counts if out.counts is not None else torch.empty((num_keys,), dtype=torch.int32, device=device)
    fill_per_program = _cdiv(_cdiv(fill_len, n_chunks), _FILL_BLOCK) * _FILL_BLOCK

    _rank_kernel[(n_chunks,)](
        *slot_args,
        counts,
        ranks,
        out.sorted_ids if out.sorted_ids is not None else dummy,
        fill_len,
        out.sentinel,
        fill_per_program,
        **slot_flags,
        CHUNK=chunk,
        SUB=sub,
        FILL_BLOCK=_FILL_BLOCK,
        KEYS_BLOCK=min(keys_p2, 1024),
        num_warps=4,
        # The loop reads counts the previous iteration stored; a pipelined (prefetched) load would not.
        num_stages=1,
    )

    # One tile of all chunks x (4096 / chunks) keys per program: a serial walk over chunk tiles costs an L2
    # round trip per tile, and much larger tiles spill registers (both measured on an H100).
    block_c = max(16, min(_next_pow2(n_chunks), _SCAN_TILE))
    block_k = max(1, _SCAN_TILE // block_c)
    _scan_kernel[(_cdiv(num_keys, block_k),)](
        counts, n_chunks, num_keys, totals, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=4
    )

    n_block_programs = _cdiv(n_blocks, _BLOCKS_PER_PROGRAM)
    _place_kernel[(n_chunks + n_block_programs,)](
        *slot_args,
        block,
        counts,
        ranks,
        totals,
        n_chunks,
        *output_args,
        **slot_flags,
        **output_flags,
        KEYS_P2=keys_p2,
        CHUNK=chunk,
        BLOCK_TILE=_BLOCKS_PER_PROGRAM,
        num_warps=4,
    )


def _sort_in_chunks(slot_args, slot_flags, output_args, output_flags, out, block, fill_len, n_blocks, n_chunks) -> None:
    """The two-launch path: chunk ranks and counts, then every program scans the count table itself."""
    ids, num_keys = slot_args[0], slot_args[-1]
    device = ids.device
    chunk = _two_launch_chunk(ids.numel())
    keys_p2 = max(32, _next_pow2(num_keys))
    counts = torch.empty((n_chunks, num_keys), dtype=torch.int32, device=device)
    ranks = torch.empty((max(ids.numel(), 1),), dtype=torch.int32, device=device)
    fill_per_program = _cdiv(_cdiv(fill_len, n_chunks), _FILL_BLOCK) * _FILL_BLOCK
    _chunk_rank_kernel[(n_chunks,)](
        *slot_args,
        counts,
        ranks,
        out.sorted_ids if out.sorted_ids is not None else ids,
        fill_len,
        out.sentinel,
        fill_per_program,
        **slot_flags,
        CHUNK=chunk,
        KEYS_P2=keys_p2,
        FILL_BLOCK=_FILL_BLOCK,
        num_warps=_TWO_LAUNCH_WARPS,
    )
    rows_tile = max(1, min(_next_pow2(n_chunks), _TABLE_TILE // keys_p2))
    _chunk_place_kernel[(n_chunks + _cdiv(n_blocks, _BLOCKS_PER_PROGRAM),)](
        *slot_args,
        block,
        counts,
        ranks,
        n_chunks,
        out.counts if out.counts is not None else ids,
        *output_args,
        **slot_flags,
        **output_flags,
        HAS_COUNTS=out.counts is not None,
        KEYS_P2=keys_p2,
        CHUNK=chunk,
        ROWS_TILE=rows_tile,
        BLOCK_TILE=_BLOCKS_PER_PROGRAM,
        num_warps=_TWO_LAUNCH_WARPS,
    )


@kernel
def _valid_slots(valid_ptr, numel, max_tokens, top_k, HAS_VALID: tl.constexpr):
    n_valid = numel
    if HAS_VALID:
        n_valid = load_valid_count(valid_ptr, max_tokens) * top_k
    return n_valid


@kernel
def _slot_keys(ids_ptr, offs, n_valid, key_map_ptr, n_ids, num_keys, HAS_KEY_MAP: tl.constexpr):
    in_range = offs < n_valid
    ids = tl.load(ids_ptr + offs, mask=in_range, other=-1).to(tl.int32)
    if HAS_KEY_MAP:
        mapped = in_range & (ids >= 0) & (ids < n_ids)
        keys = tl.load(key_map_ptr + ids, mask=mapped, other=-1).to(tl.int32)
    else:
        keys = ids
    valid = in_range & (keys >= 0) & (keys < num_keys)
    return tl.where(valid, keys, -1), valid


@kernel
def _store_block_keys(block_keys_ptr, blocks, owner, n_blocks, block_map_ptr, HAS_BLOCK_MAP: tl.constexpr,
                      REPEAT: tl.constexpr, REPEAT_P2: tl.constexpr):
    in_range = blocks < n_blocks
    if HAS_BLOCK_MAP:
        owner = tl.load(block_map_ptr + owner, mask=in_range, other=0).to(tl.int32)
    if REPEAT == 1:
        tl.store(block_keys_ptr + blocks, owner, mask=in_range)
    else:
        rep = tl.arange(0, REPEAT_P2)
        ptrs = block_keys_ptr + blocks[:, None] * REPEAT + rep[None, :]
        vals = tl.broadcast_to(owner[:, None], (owner.shape[0], REPEAT_P2))
        tl.store(ptrs, vals, mask=in_range[:, None] & (rep[None, :] < REPEAT))


@kernel
def _fill_share(fill_ptr, fill_len, fill_value, fill_per_program, pid, FILL_BLOCK: tl.constexpr):
    """Program ``pid``'s share of the sentinel fill of ``sorted_token_ids``."""
    fill_offs = tl.arange(0, FILL_BLOCK)
    fill_start = pid * fill_per_program
    fill_end = tl.minimum(fill_start + fill_per_program, fill_len)
    for f in range(fill_start, fill_end, FILL_BLOCK):
        tl.store(fill_ptr + f + fill_offs, tl.zeros((FILL_BLOCK,), tl.int32) + fill_value, mask=f + fill_offs < fill_end)


@kernel
def _store_totals(ntpp_ptr, offsets_ptr, ends, total, key_ok, HAS_NTPP: tl.constexpr, HAS_OFFSETS: tl.constexpr):
    if HAS_NTPP:
        tl.store(ntpp_ptr, total)
    if HAS_OFFSETS:
        keys = tl.arange(0, ends.shape[0])
        tl.store(offsets_ptr + 1 + keys, ends.to(tl.int64), mask=key_ok)
        tl.store(offsets_ptr, total.to(tl.int64) * 0)


@kernel
def _one_program_kernel(
    ids_ptr,
    valid_ptr,
    numel,
    max_tokens,
    top_k,
    key_map_ptr,
    n_ids,
    num_keys,
    block,
    fill_len,
    fill_value,
    counts_ptr,
    sorted_ptr,
    inv_ptr,
    ntpp_ptr,
    offsets_ptr,
    block_keys_ptr,
    n_blocks,
    block_tail,
    block_map_ptr,
    HAS_VALID: tl.constexpr,
    HAS_KEY_MAP: tl.constexpr,
    HAS_SORTED: tl.constexpr,
    HAS_INV: tl.constexpr,
    HAS_NTPP: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    HAS_BLOCK_MAP: tl.constexpr,
    REPEAT: tl.constexpr,
    REPEAT_P2: tl.constexpr,
    HAS_COUNTS: tl.constexpr,
    SLOTS: tl.constexpr,
    KEYS_P2: tl.constexpr,
    BLOCKS_P2: tl.constexpr,
    FILL_BLOCK: tl.constexpr,
):
    n_valid = _valid_slots(valid_ptr, numel, max_tokens, top_k, HAS_VALID)
    slots = tl.arange(0, SLOTS)
    keys, valid = _slot_keys(ids_ptr, slots, n_valid, key_map_ptr, n_ids, num_keys, HAS_KEY_MAP)

    if HAS_SORTED:
        fill_offs = tl.arange(0, FILL_BLOCK)
        sentinels = tl.zeros((FILL_BLOCK,), tl.int32) + fill_value
        for f in range(0, fill_len, FILL_BLOCK):
            tl.store(sorted_ptr + f + fill_offs, sentinels, mask=f + fill_offs < fill_len)

    all_keys = tl.arange(0, KEYS_P2)
    key_ok = all_keys < num_keys
    # A histogram bins every input: invalid slots go to bin 0 and are taken out again.
    n_invalid = SLOTS - tl.sum(valid.to(tl.int32), axis=0)
    counts = tl.histogram(tl.where(valid, keys, 0), KEYS_P2) - tl.where(all_keys == 0, n_invalid, 0)
    padded = (counts + block - 1) // block * block
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)

    # (key, slot) codes are distinct, so sorting them is a stable sort by key; invalid slots sort last.
    code = tl.sort(tl.where(valid, keys, KEYS_P2) * SLOTS + slots)
    s_key = code // SLOTS
    s_slot = code % SLOTS
    s_valid = s_key < num_keys
    # Sorted position p holds the (p - first[key])-th slot of its key, which goes to starts[key] + that.
    shift = starts - (tl.cumsum(counts, axis=0) - counts)
    dest = slots + tl.gather(shift, tl.where(s_valid, s_key, 0), 0)
    if HAS_SORTED:
        # The sentinel stores of other threads to these entries come first.
        tl.debug_barrier()
        tl.store(sorted_ptr + dest, s_slot, mask=s_valid)
    if HAS_INV:
        tl.store(inv_ptr + s_slot, tl.where(s_valid, dest, -1), mask=s_slot < numel)
    if HAS_COUNTS:
        tl.store(counts_ptr + all_keys, counts, mask=key_ok)
    _store_totals(ntpp_ptr, offsets_ptr, ends, total, key_ok, HAS_NTPP, HAS_OFFSETS)

    # Block b belongs to the first key ending past it: the owner is the number of keys ending at or before
    # it, a running sum of the histogram of the keys' end blocks. Padding keys end past every block.
    # (The clamp keeps the histogram's input in range should the keys fill more than the n_blocks buffer.)
    if n_blocks > 0:
        end_blocks = tl.where(key_ok, tl.minimum(ends // block, BLOCKS_P2 - 1), BLOCKS_P2 - 1)
        owner = tl.cumsum(tl.histogram(end_blocks, BLOCKS_P2), axis=0)
        blocks = tl.arange(0, BLOCKS_P2)
        owner = tl.where(blocks * block < total, owner, block_tail)
        _store_block_keys(block_keys_ptr, blocks, owner, n_blocks, block_map_ptr, HAS_BLOCK_MAP, REPEAT, REPEAT_P2)


@kernel
def _chunk_rank_kernel(
    ids_ptr,
    valid_ptr,
    numel,
    max_tokens,
    top_k,
    key_map_ptr,
    n_ids,
    num_keys,
    counts_ptr,
    ranks_ptr,
    fill_ptr,
    fill_len,
    fill_value,
    fill_per_program,
    HAS_VALID: tl.constexpr,
    HAS_KEY_MAP: tl.constexpr,
    CHUNK: tl.constexpr,
    KEYS_P2: tl.constexpr,
    FILL_BLOCK: tl.constexpr,
):
    # The one program's histogram and sort, on one chunk: its count per key and each slot's rank among the
    # chunk's slots of the same key.
    pid = tl.program_id(0)
    n_valid = _valid_slots(valid_ptr, numel, max_tokens, top_k, HAS_VALID)
    lane = tl.arange(0, CHUNK)
    offs = pid * CHUNK + lane
    keys, valid = _slot_keys(ids_ptr, offs, n_valid, key_map_ptr, n_ids, num_keys, HAS_KEY_MAP)

    _fill_share(fill_ptr, fill_len, fill_value, fill_per_program, pid, FILL_BLOCK)

    all_keys = tl.arange(0, KEYS_P2)
    n_invalid = CHUNK - tl.sum(valid.to(tl.int32), axis=0)
    counts = tl.histogram(tl.where(valid, keys, 0), KEYS_P2) - tl.where(all_keys == 0, n_invalid, 0)
    tl.store(counts_ptr + pid * num_keys + all_keys, counts, mask=all_keys < num_keys)

    code = tl.sort(tl.where(valid, keys, KEYS_P2) * CHUNK + lane)
    s_key = code // CHUNK
    s_lane = code % CHUNK
    s_valid = s_key < num_keys
    first = tl.cumsum(counts, axis=0) - counts
    rank = lane - tl.gather(first, tl.where(s_valid, s_key, 0), 0)
    tl.store(ranks_ptr + pid * CHUNK + s_lane, rank, mask=s_valid)


@kernel
def _chunk_place_kernel(
    ids_ptr,
    valid_ptr,
    numel,
    max_tokens,
    top_k,
    key_map_ptr,
    n_ids,
    num_keys,
    block,
    counts_ptr,
    ranks_ptr,
    n_chunks,
    totals_ptr,
    sorted_ptr,
    inv_ptr,
    ntpp_ptr,
    offsets_ptr,
    block_keys_ptr,
    n_blocks,
    block_tail,
    block_map_ptr,
    HAS_VALID: tl.constexpr,
    HAS_KEY_MAP: tl.constexpr,
    HAS_SORTED: tl.constexpr,
    HAS_INV: tl.constexpr,
    HAS_NTPP: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    HAS_BLOCK_MAP: tl.constexpr,
    REPEAT: tl.constexpr,
    REPEAT_P2: tl.constexpr,
    HAS_COUNTS: tl.constexpr,
    KEYS_P2: tl.constexpr,
    CHUNK: tl.constexpr,
    ROWS_TILE: tl.constexpr,
    BLOCK_TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    n_valid = _valid_slots(valid_ptr, numel, max_tokens, top_k, HAS_VALID)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    keys, valid = _slot_keys(ids_ptr, offs, n_valid, key_map_ptr, n_ids, num_keys, HAS_KEY_MAP)
    rank = tl.load(ranks_ptr + offs, mask=valid, other=0)

    # Every program scans the (small) count table: the totals per key, and the counts of earlier chunks.
    all_keys = tl.arange(0, KEYS_P2)
    key_ok = all_keys < num_keys
    totals = tl.zeros((KEYS_P2,), tl.int32)
    earlier = tl.zeros((KEYS_P2,), tl.int32)
    rows = tl.arange(0, ROWS_TILE)
    for r in range(0, n_chunks, ROWS_TILE):
        row = r + rows
        tile = tl.load(
            counts_ptr + row[:, None] * num_keys + all_keys[None, :],
            mask=(row[:, None] < n_chunks) & key_ok[None, :],
            other=0,
        )
        totals += tl.sum(tile, axis=0)
        earlier += tl.sum(tl.where(row[:, None] < pid, tile, 0), axis=0)
    padded = (totals + block - 1) // block * block
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)

    if pid == 0:
        _store_totals(ntpp_ptr, offsets_ptr, ends, total, key_ok, HAS_NTPP, HAS_OFFSETS)
        if HAS_COUNTS:
            tl.store(totals_ptr + all_keys, totals, mask=key_ok)

    if pid < n_chunks:
        dest = tl.gather(starts + earlier, tl.where(valid, keys, 0), 0) + rank
        if HAS_SORTED:
            tl.store(sorted_ptr + dest, offs, mask=valid)
        if HAS_INV:
            tl.store(inv_ptr + offs, tl.where(valid, dest, -1), mask=offs < numel)
    else:
        blocks = (pid - n_chunks) * BLOCK_TILE + tl.arange(0, BLOCK_TILE)
        first_row = blocks * block
        owner = tl.sum(((ends[None, :] <= first_row[:, None]) & key_ok[None, :]).to(tl.int32), axis=1)
        owner = tl.where(first_row < total, owner, block_tail)
        _store_block_keys(block_keys_ptr, blocks, owner, n_blocks, block_map_ptr, HAS_BLOCK_MAP, REPEAT, REPEAT_P2)


@kernel
def _rank_kernel(
    ids_ptr,
    valid_ptr,
    numel,
    max_tokens,
    top_k,
    key_map_ptr,
    n_ids,
    num_keys,
    counts_ptr,
    ranks_ptr,
    fill_ptr,
    fill_len,
    fill_value,
    fill_per_program,
    HAS_VALID: tl.constexpr,
    HAS_KEY_MAP: tl.constexpr,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    FILL_BLOCK: tl.constexpr,
    KEYS_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n_valid = _valid_slots(valid_ptr, numel, max_tokens, top_k, HAS_VALID)
    lane = tl.arange(0, SUB)
    # This program's row of the count table.
    row = counts_ptr + pid * num_keys

    if CHUNK == SUB:
        # Issue the slot loads before the stores below so their latency overlaps.
        offs = pid * CHUNK + lane
        keys, valid = _slot_keys(ids_ptr, offs, n_valid, key_map_ptr, n_ids, num_keys, HAS_KEY_MAP)

    _fill_share(fill_ptr, fill_len, fill_value, fill_per_program, pid, FILL_BLOCK)

    key_offs = tl.arange(0, KEYS_BLOCK)
    for k in range(0, num_keys, KEYS_BLOCK):
        tl.store(row + k + key_offs, tl.zeros((KEYS_BLOCK,), tl.int32), mask=k + key_offs < num_keys)
    # The row is this program's count per key; its threads read and write each other's entries.
    tl.debug_barrier()

    if CHUNK == SUB:
        # One sub-block: (key, lane) packed into one int orders it stably; a slot's rank is the number of
        # codes in [key * SUB, its own code), its key's count the number in [key * SUB, (key + 1) * SUB).
        # Invalid slots have negative codes and are never counted.
        code = keys * SUB + lane
        low = keys * SUB
        rank = tl.sum(((code[None, :] >= low[:, None]) & (code[None, :] < code[:, None])).to(tl.int32), axis=1)
        same = tl.sum(((code[None, :] >= low[:, None]) & (code[None, :] < low[:, None] + SUB)).to(tl.int32), axis=1)
        tl.store(ranks_ptr + offs, rank, mask=valid)
        # Every slot of a key writes the same count: which store lands does not matter.
        tl.store(row + keys, same, mask=valid)
    else:
        for s in range(0, CHUNK, SUB):
            offs = pid * CHUNK + s + lane
            keys, valid = _slot_keys(ids_ptr, offs, n_valid, key_map_ptr, n_ids, num_keys, HAS_KEY_MAP)
            code = keys * SUB + lane
            low = keys * SUB
            rank_in_sub = tl.sum(
                ((code[None, :] >= low[:, None]) & (code[None, :] < code[:, None])).to(tl.int32), axis=1
            )
            # .cg: read the counts from L2, where the atomics of the previous sub-block landed.
            rank = tl.load(row + keys, mask=valid, other=0, cache_modifier=".cg") + rank_in_sub
            tl.store(ranks_ptr + offs, rank, mask=valid)
            tl.atomic_max(row + keys, rank + 1, mask=valid)
            tl.debug_barrier()


@kernel
def _scan_kernel(counts_ptr, n_chunks, num_keys, totals_ptr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    # A strip of keys of the row-major table per program; the loop runs once unless chunks > BLOCK_C.
    keys = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    key_ok = keys < num_keys
    running = tl.zeros((BLOCK_K,), tl.int32)
    chunk_lane = tl.arange(0, BLOCK_C)
    for c in range(0, n_chunks, BLOCK_C):
        chunks = c + chunk_lane
        mask = (chunks[:, None] < n_chunks) & key_ok[None, :]
        ptrs = counts_ptr + chunks[:, None] * num_keys + keys[None, :]
        tile = tl.load(ptrs, mask=mask, other=0)
        inclusive = tl.cumsum(tile, axis=0)
        tl.store(ptrs, inclusive - tile + running[None, :], mask=mask)
        running += tl.sum(tile, axis=0)
    tl.store(totals_ptr + keys, running, mask=key_ok)


@kernel
def _place_kernel(
    ids_ptr,
    valid_ptr,
    numel,
    max_tokens,
    top_k,
    key_map_ptr,
    n_ids,
    num_keys,
    block,
    counts_ptr,
    ranks_ptr,
    totals_ptr,
    n_chunks,
    sorted_ptr,
    inv_ptr,
    ntpp_ptr,
    offsets_ptr,
    block_keys_ptr,
    n_blocks,
    block_tail,
    block_map_ptr,
    HAS_VALID: tl.constexpr,
    HAS_KEY_MAP: tl.constexpr,
    HAS_SORTED: tl.constexpr,
    HAS_INV: tl.constexpr,
    HAS_NTPP: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    HAS_BLOCK_MAP: tl.constexpr,
    KEYS_P2: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_TILE: tl.constexpr,
    REPEAT: tl.constexpr,
    REPEAT_P2: tl.constexpr,
):
    pid = tl.program_id(0)
    # The slot loads do not depend on the offsets: issue them first (block programs load nothing: their
    # offsets lie past numel).
    n_valid = _valid_slots(valid_ptr, numel, max_tokens, top_k, HAS_VALID)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    keys, valid = _slot_keys(ids_ptr, offs, n_valid, key_map_ptr, n_ids, num_keys, HAS_KEY_MAP)
    rank = tl.load(ranks_ptr + offs, mask=valid, other=0)

    all_keys = tl.arange(0, KEYS_P2)
    key_ok = all_keys < num_keys
    totals = tl.load(totals_ptr + all_keys, mask=key_ok, other=0)
    padded = (totals + block - 1) // block * block
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)

    if pid == 0:
        _store_totals(ntpp_ptr, offsets_ptr, ends, total, key_ok, HAS_NTPP, HAS_OFFSETS)

    if pid < n_chunks:
        # Fold the key offsets into this program's row so each slot needs one gather.
        row = counts_ptr + pid * num_keys
        prefix = tl.load(row + all_keys, mask=key_ok, other=0)
        tl.store(row + all_keys, prefix + starts, mask=key_ok)
        tl.debug_barrier()
        dest = tl.load(row + keys, mask=valid, other=0, cache_modifier=".cg") + rank
        if HAS_SORTED:
            tl.store(sorted_ptr + dest, offs, mask=valid)
        if HAS_INV:
            tl.store(inv_ptr + offs, tl.where(valid, dest, -1), mask=offs < numel)
    else:
        blocks = (pid - n_chunks) * BLOCK_TILE + tl.arange(0, BLOCK_TILE)
        first_row = blocks * block
        owner = tl.sum(((ends[None, :] <= first_row[:, None]) & key_ok[None, :]).to(tl.int32), axis=1)
        owner = tl.where(first_row < total, owner, block_tail)
        _store_block_keys(block_keys_ptr, blocks, owner, n_blocks, block_map_ptr, HAS_BLOCK_MAP, REPEAT, REPEAT_P2)


# ----------------------------------------------------------------------------------------------------
# public API


def moe_align_block_size(
    topk_ids: torch.Tensor,
    block_size: int,
    num_experts: int,
    expert_map: torch.Tensor | None = None,
    pad_sorted_ids: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the routed slots by expert, padding each expert to ``block_size`` (see the module docstring).

    Returns ``(sorted_token_ids [L] int32, expert_ids [ceil(L / block_size)] int32,
    num_tokens_post_padded [1] int32)`` with ``L = align_buffer_sizes(...)[0]``.
    """
    return _align(topk_ids, block_size, num_experts, expert_map, pad_sorted_ids, None)


def moe_align_block_size_graph_safe(
    topk_ids: torch.Tensor,
    block_size: int,
    num_experts: int,
    valid_tokens: torch.Tensor,
    expert_map: torch.Tensor | None = None,
    pad_sorted_ids: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``moe_align_block_size`` over the first ``valid_tokens`` rows of a static ``topk_ids [max_tokens, k]``.

    Buffer lengths, the sentinel (``max_tokens * k``) and the launch grid depend only on the static shape,
    and the token count is read on the device (clamped to ``[0, max_tokens]``), so one captured CUDA graph
    serves every batch up to ``max_tokens``. The result equals ``moe_align_block_size(topk_ids[:v])``
    apart from the longer buffers and the sentinel value.
    """
    return _align(topk_ids, block_size, num_experts, expert_map, pad_sorted_ids, valid_tokens)


def _align(topk_ids, block_size, num_experts, expert_map, pad_sorted_ids, valid_tokens):
    topk_ids = _check_topk_ids(topk_ids)
    block_size = _check_positive_int(block_size, "block_size")
    num_experts = _check_positive_int(num_experts, "num_experts")
    expert_map = _check_expert_map(expert_map, num_experts, topk_ids.device)
    if valid_tokens is not None:
        valid_tokens = _check_valid_tokens(valid_tokens, topk_ids.device)

    numel = topk_ids.numel()
    device = topk_ids.device
    sorted_len, n_blocks = align_buffer_sizes(numel, block_size, num_experts, pad_sorted_ids)
    out = SlotSortOutputs(
        sorted_ids=torch.empty((sorted_len,), dtype=torch.int32, device=device),
        sentinel=numel,
        block_keys=torch.empty((n_blocks,), dtype=torch.int32, device=device),
        block_tail=0,
        block_key_map=expert_map,
        num_tokens_post_padded=torch.empty((1,), dtype=torch.int32, device=device),
    )
    if use_triton(topk_ids):
        sort_slots_triton(
            topk_ids.reshape(-1).contiguous(), topk_ids.shape[1], num_experts, block_size, out, valid_tokens=valid_tokens
        )
    else:
        keys = topk_ids.reshape(-1).long()
        if valid_tokens is not None:
            v = min(max(int(valid_tokens.item()), 0), topk_ids.shape[0])
            keys = keys[: v * topk_ids.shape[1]]
        sort_slots_torch(keys, num_experts, block_size, out)
    return out.sorted_ids, out.block_keys, out.num_tokens_post_padded
