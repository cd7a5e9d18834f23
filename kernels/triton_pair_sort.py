"""Routing of (token, expert) pairs to tiles, on the GPU, without a host sync.

A MoE-LoRA tile is either ONE pair ("naive": no metadata at all; for batches whose pairs rarely
share a (slot, expert) weight block) or up to BLOCK_M pairs of ONE (slot, expert) group
("grouped": the block is read once for all of them). Grouping needs the pairs sorted by
group; two pair sorters do it:

  onepass  ONE program packs (key = slot*E + expert, pair) into an int32, tl.sort's it, finds
           each pair's rank inside its key run with a segmented scan and writes the tile table
           directly. At decode sizes a launch costs more than this work.
  count    counting sort: per-group counters (rank = atomic_add) -> one-program exclusive scan
           that also writes the tile table -> scatter; plus the counters' zero-fill.

The tile table has a host-known upper bound (P / BLOCK_M + min(P, S * E)), so grids are fixed;
programs past the device-side tile count exit at once. Order inside a group may vary, but each
pair's result does not depend on its position: outputs are deterministic.
The routing is returned by the op so w2 reuses w13's (the vLLM plugin does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton_util import pdl_trigger, pdl_wait

# Sort key of inactive pairs in the one-pass sorter; keys are slot * E + expert < this, and
# SENTINEL * BLOCK_P + pair must fit in int32 (BLOCK_P <= 4096).
_SENTINEL = 1 << 18
_ONEPASS_MAX_PAIRS = 4096


@dataclass
class PairRouting:
    """How one batch's pairs map to tiles (reusable by w13 and w2 of the same layer call).

    Grouped only, all int32 on the device: tile_group/tile_row0/tile_cnt [max_tiles] (the
    tile's group slot*E+expert, its first row in sorted_pairs, its row count), num_tiles [1],
    sorted_pairs [P] (pair indices ordered by group)."""

    mode: str  # "naive" | "grouped"
    block_m: int
    num_pairs: int
    max_tiles: int
    tile_group: torch.Tensor | None = None
    tile_row0: torch.Tensor | None = None
    tile_cnt: torch.Tensor | None = None
    num_tiles: torch.Tensor | None = None
    sorted_pairs: torch.Tensor | None = None


def naive_routing(num_pairs: int) -> PairRouting:
    return PairRouting("naive", 16, num_pairs, num_pairs)


def sort_pairs(
    topk_ids: torch.Tensor,  # [M, top_k] int
    token_slots: torch.Tensor,  # [M] int, -1 = no adapter
    slot_enabled: torch.Tensor | None,  # [>= S] int, 0 = slot disabled
    num_slots: int,
    num_experts: int,
    block_m: int,
    sorter: str,
    pdl: dict,
) -> PairRouting:
    """Group the active pairs by (slot, expert) into tiles of <= block_m pairs."""
    m, top_k = topk_ids.shape
    p = m * top_k
    num_groups = num_slots * num_experts
    dev = topk_ids.device
    max_tiles = triton.cdiv(p, block_m) + min(p, num_groups)
    has_en = slot_enabled is not None
    enabled = slot_enabled if has_en else token_slots  # dummy pointer when unused
    # One buffer for the tile table: tile_group | tile_row0 | tile_cnt | num_tiles.
    tiles = torch.empty(3 * max_tiles + 1, dtype=torch.int32, device=dev)
    tile_group, tile_row0, tile_cnt = (
        tiles[:max_tiles],
        tiles[max_tiles : 2 * max_tiles],
        tiles[2 * max_tiles : 3 * max_tiles],
    )
    num_tiles = tiles[3 * max_tiles :]
    sorted_pairs = torch.empty(p, dtype=torch.int32, device=dev)
    routing = PairRouting(
        "grouped", block_m, p, max_tiles, tile_group, tile_row0, tile_cnt, num_tiles, sorted_pairs
    )
    if sorter == "onepass" and p <= _ONEPASS_MAX_PAIRS and num_groups < _SENTINEL:
        # BLOCK_P is a power of two >= P: one compile per size class, not per M.
        block_p = max(16, triton.next_power_of_2(p))
        _sort_onepass_kernel[(1,)](
            topk_ids,
            token_slots,
            enabled,
            sorted_pairs,
            tile_group,
            tile_row0,
            tile_cnt,
            num_tiles,
            p,
            num_slots,
            TOPK=top_k,
            E=num_experts,
            HAS_ENABLED=has_en,
            BLOCK_M=block_m,
            BLOCK_P=block_p,
            SENTINEL=_SENTINEL,
            num_warps=4 if block_p <= 512 else 8,
            **pdl,
        )
        return routing
    counts = torch.zeros(num_groups, dtype=torch.int32, device=dev)
    key = torch.empty(p, dtype=torch.int32, device=dev)
    rank = torch.empty(p, dtype=torch.int32, device=dev)
    group_off = torch.empty(num_groups, dtype=torch.int32, device=dev)
    block = 1024
    grid = (triton.cdiv(p, block),)
    _count_kernel[grid](
        topk_ids,
        token_slots,
        enabled,
        counts,
        key,
        rank,
        p,
        num_slots,
        TOPK=top_k,
        E=num_experts,
        HAS_ENABLED=has_en,
        BLOCK=block,
        **pdl,
    )
    _scan_kernel[(1,)](
        counts,
        group_off,
        tile_group,
        tile_row0,
        tile_cnt,
        num_tiles,
        num_groups,
        BLOCK_M=block_m,
        BLOCK_G=1024,
        num_warps=8,
        **pdl,
    )
    _scatter_kernel[grid](key, rank, group_off, sorted_pairs, p, BLOCK=block, **pdl)
    return routing


@triton.jit
def _seg_count(k1, c1, k2, c2):
    # Segmented running count over a sorted key sequence: counts restart where the key changes.
    return k2, c2 + tl.where(k1 == k2, c1, 0)


@triton.jit(do_not_specialize=["num_pairs", "num_slots"])
def _sort_onepass_kernel(
    topk_ptr,
    slots_ptr,
    enabled_ptr,
    sorted_ptr,
    tile_group_ptr,
    tile_row0_ptr,
    tile_cnt_ptr,
    num_tiles_ptr,
    num_pairs,
    num_slots,
    TOPK: tl.constexpr,
    E: tl.constexpr,
    HAS_ENABLED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    SENTINEL: tl.constexpr,
    PDL: tl.constexpr,
):
    """The whole grouping in ONE program (batches of <= BLOCK_P pairs): sort (key, pair) packed
    in one int32, find each pair's rank inside its (slot, expert) run with a segmented scan, and
    emit one tile per BLOCK_M rows of a run."""
    pdl_wait(PDL)
    pdl_trigger(PDL)  # one program: the shrink's programs may take their SM slots now
    offs = tl.arange(0, BLOCK_P)
    in_range = offs < num_pairs
    slot = tl.load(slots_ptr + offs // TOPK, mask=in_range, other=-1).to(tl.int32)
    expert = tl.load(topk_ptr + offs, mask=in_range, other=-1).to(tl.int32)
    active = in_range & (slot >= 0) & (slot < num_slots) & (expert >= 0) & (expert < E)
    if HAS_ENABLED:
        en = tl.load(enabled_ptr + tl.where(active, slot, 0), mask=active, other=0)
        active = active & (en != 0)
    key = tl.where(active, slot * E + expert, SENTINEL)
    packed = tl.sort(key * BLOCK_P + offs)  # inactive pairs (SENTINEL) sort last
    skey = packed // BLOCK_P
    spair = packed % BLOCK_P
    valid = skey < SENTINEL
    ones = tl.full((BLOCK_P,), 1, dtype=tl.int32)
    _, upto = tl.associative_scan((skey, ones), 0, _seg_count)  # rank in run + 1
    _, from_ = tl.associative_scan((skey, ones), 0, _seg_count, reverse=True)  # run rest
    rank = upto - 1
    run_len = rank + from_
    starts = valid & (rank % BLOCK_M == 0)
    tile = tl.cumsum(starts.to(tl.int32), axis=0) - 1
    tl.store(sorted_ptr + offs, spair, mask=valid)
    tl.store(tile_group_ptr + tile, skey, mask=starts)
    tl.store(tile_row0_ptr + tile, offs, mask=starts)
    tl.store(tile_cnt_ptr + tile, tl.minimum(run_len - rank, BLOCK_M), mask=starts)
    tl.store(num_tiles_ptr, tl.sum(starts.to(tl.int32), axis=0))


@triton.jit(do_not_specialize=["num_pairs", "num_slots"])
def _count_kernel(
    topk_ptr,
    slots_ptr,
    enabled_ptr,
    counts_ptr,
    key_ptr,
    rank_ptr,
    num_pairs,
    num_slots,
    TOPK: tl.constexpr,
    E: tl.constexpr,
    HAS_ENABLED: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < num_pairs
    slot = tl.load(slots_ptr + offs // TOPK, mask=in_range, other=-1).to(tl.int32)
    expert = tl.load(topk_ptr + offs, mask=in_range, other=-1).to(tl.int32)
    active = in_range & (slot >= 0) & (slot < num_slots) & (expert >= 0) & (expert < E)
    if HAS_ENABLED:
        en = tl.load(enabled_ptr + tl.where(active, slot, 0), mask=active, other=0)
        active = active & (en != 0)
    key = tl.where(active, slot * E + expert, -1)
    # Rank of the pair inside its (slot, expert) group: the counter's value before our add.
    rank = tl.atomic_add(counts_ptr + tl.where(active, key, 0), 1, mask=active)
    tl.store(key_ptr + offs, key, mask=in_range)
    tl.store(rank_ptr + offs, tl.where(active, rank, 0), mask=in_range)


@triton.jit(do_not_specialize=["num_groups"])
def _scan_kernel(
    counts_ptr,
    group_off_ptr,
    tile_group_ptr,
    tile_row0_ptr,
    tile_cnt_ptr,
    num_tiles_ptr,
    num_groups,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program: exclusive scan of the group counts and the tile table, in BLOCK_G chunks."""
    pdl_wait(PDL)
    row_carry = tl.sum(tl.zeros((BLOCK_G,), dtype=tl.int32), axis=0)
    tile_carry = tl.sum(tl.zeros((BLOCK_G,), dtype=tl.int32), axis=0)
    for g0 in range(0, num_groups, BLOCK_G):
        offs = g0 + tl.arange(0, BLOCK_G)
        g_mask = offs < num_groups
        cnt = tl.load(counts_ptr + offs, mask=g_mask, other=0)
        ntile = (cnt + BLOCK_M - 1) // BLOCK_M
        row_off = row_carry + tl.cumsum(cnt, axis=0) - cnt
        tile_off = tile_carry + tl.cumsum(ntile, axis=0) - ntile
        tl.store(group_off_ptr + offs, row_off, mask=g_mask)
        # Each group writes its own tiles; a group has at most max(ntile) of them.
        for j in range(0, tl.max(ntile, axis=0)):
            sel = g_mask & (j < ntile)
            tl.store(tile_group_ptr + tile_off + j, offs, mask=sel)
            tl.store(tile_row0_ptr + tile_off + j, row_off + j * BLOCK_M, mask=sel)
            cnt_j = tl.minimum(cnt - j * BLOCK_M, BLOCK_M)
            tl.store(tile_cnt_ptr + tile_off + j, cnt_j, mask=sel)
        row_carry += tl.sum(cnt, axis=0)
        tile_carry += tl.sum(ntile, axis=0)
    tl.store(num_tiles_ptr, tile_carry)


@triton.jit(do_not_specialize=["num_pairs"])
def _scatter_kernel(
    key_ptr, rank_ptr, group_off_ptr, sorted_ptr, num_pairs, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    pdl_wait(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < num_pairs
    key = tl.load(key_ptr + offs, mask=in_range, other=-1)
    active = key >= 0
    start = tl.load(group_off_ptr + tl.where(active, key, 0), mask=active, other=0)
    rank = tl.load(rank_ptr + offs, mask=active, other=0)
    tl.store(sorted_ptr + start + rank, offs, mask=active)
