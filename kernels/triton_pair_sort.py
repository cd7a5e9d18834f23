"""Routing of (token, expert) pairs to tiles, on the GPU, without a host sync.

A MoE-LoRA tile is either ONE pair ("naive": no metadata at all; for batches whose pairs rarely
share a (slot, expert) weight block) or up to BLOCK_M pairs of ONE (slot, expert) group
("grouped": the block is read once for all of them). Grouping needs the pairs sorted by
group; the pair sorters do it (the plan picks onepass, count1r, countr or count4):

  onepass  ONE program packs (key = slot*E + expert, pair) into an int32, tl.sort's it, finds
           each pair's rank inside its key run with a segmented scan and writes the tile table
           directly. At decode sizes a launch costs more than this work.
  count1   counting sort in ONE program (up to 8192 pairs, all in registers): ranks from
           atomic_add, then the counts read and zeroed by atomic exchange, the scan, the tile
           table and the scatter, all in that program. The plan's choice from 1025 to 4096 pairs
           (docs/kernels.md, round three); count1_cg: the same with plain loads (measured only);
           count1r: the same with relaxed atomics (round four, see _sort_count1_kernel).
  countr, count4r  count and count4 with relaxed counting atomics (their counts are read only
           after a kernel boundary; round four, measured).
  count    counting sort in two launches: (1) per-group counters, a pair's rank in its group =
           the atomic_add's return value; (2) every program scans the counts into group
           offsets (program 0 also writes the tile table) and scatters its pairs; the LAST
           program to finish (a ticket, acq_rel) zeroes the counters again, after every
           program has read them, so no zero-fill launch is needed.
  count4   the same in four launches (zero-fill, count, one-program scan, scatter): no in-kernel
           cross-program dependency at all; the reference the two-launch sorter is checked
           against.
  count_last  two launches the other way round: the last COUNTING program (ticket) scans
           and reads-and-zeroes the counts with atomic exchanges; then the scatter.

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

from kernels.triton_util import pdl_trigger, pdl_wait, self_cleaning_counters

# Sort key of inactive pairs in the one-pass sorter; keys are slot * E + expert < this, and
# SENTINEL * BLOCK_P + pair must fit in int32 (BLOCK_P <= 4096).
_SENTINEL = 1 << 18
_ONEPASS_MAX_PAIRS = 4096
COUNT1_MAX_PAIRS = 16384  # the one-program counting sort holds every pair in registers


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
    sort_warps: int | None = None,
    sort_block: int | None = None,
    first_pdl: dict | None = None,
) -> PairRouting:
    """Group the active pairs by (slot, expert) into tiles of <= block_m pairs. first_pdl: the
    launch options of the first sorting kernel (round ten: without the PDL attribute where the
    kernel before the call is not ours); the later ones use pdl."""
    first = pdl if first_pdl is None else first_pdl
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
            **first,
        )
        return routing
    group_off = torch.empty(num_groups, dtype=torch.int32, device=dev)
    table = (tile_group, tile_row0, tile_cnt, num_tiles)
    if sorter in ("count1", "count1_cg", "count1r") and p <= COUNT1_MAX_PAIRS:
        block_p = max(16, triton.next_power_of_2(p))
        _sort_count1_kernel[(1,)](
            topk_ids,
            token_slots,
            enabled,
            self_cleaning_counters(dev, "count_sort1", num_groups),
            group_off,
            sorted_pairs,
            *table,
            p,
            num_slots,
            num_groups,
            TOPK=top_k,
            E=num_experts,
            HAS_ENABLED=has_en,
            BLOCK_P=block_p,
            BLOCK_M=block_m,
            BLOCK_G=1024,
            ATOMIC_READ=sorter != "count1_cg",
            RELAXED=sorter == "count1r",
            num_warps=sort_warps or max(4, min(16, block_p // 256)),
            **first,
        )
        return routing
    if sorter == "onepass":  # too many pairs for one tl.sort
        sorter = "count4"
    if sorter in ("count1", "count1_cg", "count1r"):  # too many pairs for one program's registers
        sorter = "count"
    relaxed = sorter in ("countr", "count4r")  # counts read only after a kernel boundary
    sorter = {"countr": "count", "count4r": "count4"}.get(sorter, sorter)
    key = torch.empty(p, dtype=torch.int32, device=dev)
    rank = torch.empty(p, dtype=torch.int32, device=dev)
    block = sort_block or 1024
    grid = (triton.cdiv(p, block),)
    route = dict(TOPK=top_k, E=num_experts, HAS_ENABLED=has_en, BLOCK=block)
    if sorter == "count4":
        counts = torch.zeros(num_groups, dtype=torch.int32, device=dev)
        _count_kernel[grid](
            topk_ids, token_slots, enabled, counts, key, rank, p, num_slots, **route, **first,
            RELAXED=relaxed,
        )  # fmt: skip
        _scan_kernel[(1,)](
            counts, group_off, *table, num_groups, BLOCK_M=block_m, BLOCK_G=1024, num_warps=8, **pdl
        )
        _scatter_kernel[grid](key, rank, group_off, sorted_pairs, p, BLOCK=block, **pdl)
        return routing
    # [0]: ticket; [1:]: per-group counts. Zero on entry, left zero by the last program.
    counters = self_cleaning_counters(dev, "count_sort", 1 + num_groups)
    counts = counters[1:]
    if sorter == "count_last":
        _count_last_scans_kernel[grid](
            topk_ids,
            token_slots,
            enabled,
            counters,
            key,
            rank,
            group_off,
            *table,
            p,
            num_slots,
            num_groups,
            grid[0],
            **route,
            BLOCK_M=block_m,
            BLOCK_G=1024,
            **first,
        )
        _scatter_kernel[grid](key, rank, group_off, sorted_pairs, p, BLOCK=block, **pdl)
        return routing
    if sorter != "count":
        raise ValueError(f"unknown pair sorter {sorter!r}")
    _count_kernel[grid](
        topk_ids, token_slots, enabled, counts, key, rank, p, num_slots, **route, **first,
        RELAXED=relaxed,
    )  # fmt: skip
    _scan_scatter_kernel[grid](
        counters,
        key,
        rank,
        group_off,
        sorted_pairs,
        *table,
        p,
        num_groups,
        grid[0],
        BLOCK=block,
        BLOCK_M=block_m,
        BLOCK_G=1024,
        **pdl,
    )
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


@triton.jit(do_not_specialize=["num_pairs", "num_slots", "num_groups"])
def _sort_count1_kernel(
    topk_ptr,
    slots_ptr,
    enabled_ptr,
    counts_ptr,
    group_off_ptr,
    sorted_ptr,
    tile_group_ptr,
    tile_row0_ptr,
    tile_cnt_ptr,
    num_tiles_ptr,
    num_pairs,
    num_slots,
    num_groups,
    TOPK: tl.constexpr,
    E: tl.constexpr,
    HAS_ENABLED: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
    ATOMIC_READ: tl.constexpr,
    RELAXED: tl.constexpr,
    PDL: tl.constexpr,
):
    """The counting sort in ONE program (batches of <= BLOCK_P pairs, all in registers): a
    pair's rank in its group = atomic_add on the group's counter; then the exclusive scan of the
    counts (reading each with an atomic exchange to zero, so the counters are clean for the next
    call and every increment of this program is seen), the tile table, and the scatter. No other
    program touches the counters: no cross-program ordering at all.

    RELAXED (sorter "count1r", round four): the rank increments and the read-and-zero exchanges
    are relaxed atomics. acq_rel makes every atomic a fence (each waits for the thread's earlier
    memory operations, and invalidates L1 after), so a thread's 8-16 increments ran one L2
    round trip after another; relaxed ones are all in flight at once. Ordering needs no fence
    here: every access is an atomic on the same counters, performed at L2 in one order per
    address, and the CTA barrier between the increments and the exchanges orders them (bar.sync
    orders the memory accesses of the threads of the CTA)."""
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
    key = tl.where(active, slot * E + expert, 0)
    if RELAXED:
        rank = tl.atomic_add(counts_ptr + key, 1, mask=active, sem="relaxed", scope="gpu")
    else:
        rank = tl.atomic_add(counts_ptr + key, 1, mask=active, sem="acq_rel", scope="gpu")
    tl.debug_barrier()  # every thread's increments are done (their ranks came back)
    _scan_groups(
        counts_ptr,
        group_off_ptr,
        tile_group_ptr,
        tile_row0_ptr,
        tile_cnt_ptr,
        num_tiles_ptr,
        num_groups,
        1,
        BLOCK_M,
        BLOCK_G,
        ATOMIC_READ,
        True,
        RELAXED,
    )
    tl.debug_barrier()  # group_off stores before the loads below (global memory, same CTA)
    start = tl.load(group_off_ptr + key, mask=active, other=0)
    tl.store(sorted_ptr + start + rank, offs, mask=active)


@triton.jit
def _count_pairs(
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
    RELAXED: tl.constexpr = False,
):
    """key[pair] = slot * E + expert (-1 inactive); rank[pair] = its position in its group.
    RELAXED: relaxed increments (all in flight at once), for sorters whose counts are read only
    after a kernel boundary ("countr", "count4r"); acq_rel where a ticket in the same launch
    must see them ("count_last")."""
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
    if RELAXED:
        rank = tl.atomic_add(
            counts_ptr + tl.where(active, key, 0), 1, mask=active, sem="relaxed", scope="gpu"
        )
    else:
        rank = tl.atomic_add(
            counts_ptr + tl.where(active, key, 0), 1, mask=active, sem="acq_rel", scope="gpu"
        )
    tl.store(key_ptr + offs, key, mask=in_range)
    tl.store(rank_ptr + offs, tl.where(active, rank, 0), mask=in_range)


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
    RELAXED: tl.constexpr = False,
):
    _count_pairs(
        topk_ptr,
        slots_ptr,
        enabled_ptr,
        counts_ptr,
        key_ptr,
        rank_ptr,
        num_pairs,
        num_slots,
        TOPK,
        E,
        HAS_ENABLED,
        BLOCK,
        PDL,
        RELAXED,
    )


@triton.jit
def _scan_groups(
    counts_ptr,
    group_off_ptr,
    tile_group_ptr,
    tile_row0_ptr,
    tile_cnt_ptr,
    num_tiles_ptr,
    num_groups,
    write_tiles,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
    ATOMIC_READ: tl.constexpr,
    ZERO: tl.constexpr = False,
    RELAXED: tl.constexpr = False,
):
    """Exclusive scan of the group counts into group offsets and (if write_tiles, 0 or 1) the
    tile table, in BLOCK_G chunks. ATOMIC_READ: read each count with an atomic exchange that
    also zeroes it (counts written by other threads or programs of the same launch); ZERO:
    zero each count with a plain store right after reading it (its only reader)."""
    row_carry = tl.sum(tl.zeros((BLOCK_G,), dtype=tl.int32), axis=0)
    tile_carry = tl.sum(tl.zeros((BLOCK_G,), dtype=tl.int32), axis=0)
    for g0 in range(0, num_groups, BLOCK_G):
        offs = g0 + tl.arange(0, BLOCK_G)
        g_mask = offs < num_groups
        if ATOMIC_READ and RELAXED:
            cnt = tl.atomic_xchg(counts_ptr + offs, 0, mask=g_mask, sem="relaxed", scope="gpu")
            cnt = tl.where(g_mask, cnt, 0)
        elif ATOMIC_READ:
            cnt = tl.atomic_xchg(counts_ptr + offs, 0, mask=g_mask, sem="acq_rel", scope="gpu")
            cnt = tl.where(g_mask, cnt, 0)
        else:
            # .cg: counts are atomics of another launch, kept in L2; never a stale L1 line.
            cnt = tl.load(counts_ptr + offs, mask=g_mask, other=0, cache_modifier=".cg")
            if ZERO:
                tl.store(counts_ptr + offs, tl.zeros_like(cnt), mask=g_mask)
        ntile = (cnt + BLOCK_M - 1) // BLOCK_M
        row_off = row_carry + tl.cumsum(cnt, axis=0) - cnt
        tile_off = tile_carry + tl.cumsum(ntile, axis=0) - ntile
        tl.store(group_off_ptr + offs, row_off, mask=g_mask)
        # Each group writes its own tiles; a group has at most max(ntile) of them.
        # A vector comparison (a scalar one and-ed in comes out int32 in the interpreter).
        t_mask = g_mask & ((offs * 0 + write_tiles) != 0)
        for j in range(0, tl.max(tl.where(t_mask, ntile, 0), axis=0)):
            sel = t_mask & (j < ntile)
            tl.store(tile_group_ptr + tile_off + j, offs, mask=sel)
            tl.store(tile_row0_ptr + tile_off + j, row_off + j * BLOCK_M, mask=sel)
            cnt_j = tl.minimum(cnt - j * BLOCK_M, BLOCK_M)
            tl.store(tile_cnt_ptr + tile_off + j, cnt_j, mask=sel)
        row_carry += tl.sum(cnt, axis=0)
        tile_carry += tl.sum(ntile, axis=0)
    if write_tiles != 0:
        tl.store(num_tiles_ptr, tile_carry)


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
    _scan_groups(
        counts_ptr,
        group_off_ptr,
        tile_group_ptr,
        tile_row0_ptr,
        tile_cnt_ptr,
        num_tiles_ptr,
        num_groups,
        1,
        BLOCK_M,
        BLOCK_G,
        False,
    )


@triton.jit(do_not_specialize=["num_pairs", "num_slots", "num_groups", "num_programs"])
def _count_last_scans_kernel(
    topk_ptr,
    slots_ptr,
    enabled_ptr,
    counters_ptr,
    key_ptr,
    rank_ptr,
    group_off_ptr,
    tile_group_ptr,
    tile_row0_ptr,
    tile_cnt_ptr,
    num_tiles_ptr,
    num_pairs,
    num_slots,
    num_groups,
    num_programs,
    TOPK: tl.constexpr,
    E: tl.constexpr,
    HAS_ENABLED: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
    PDL: tl.constexpr,
):
    """_count_kernel, then the last program to finish (ticket) reads every count with an atomic
    exchange to zero, writes the group offsets and the tile table, and resets the ticket."""
    _count_pairs(
        topk_ptr,
        slots_ptr,
        enabled_ptr,
        counters_ptr + 1,
        key_ptr,
        rank_ptr,
        num_pairs,
        num_slots,
        TOPK,
        E,
        HAS_ENABLED,
        BLOCK,
        PDL,
    )
    # All of this program's counter increments (acq_rel atomics) come before its ticket.
    tl.debug_barrier()
    done = tl.atomic_add(counters_ptr, 1, sem="acq_rel", scope="gpu")
    if done == num_programs - 1:
        _scan_groups(
            counters_ptr + 1,
            group_off_ptr,
            tile_group_ptr,
            tile_row0_ptr,
            tile_cnt_ptr,
            num_tiles_ptr,
            num_groups,
            True,
            BLOCK_M,
            BLOCK_G,
            True,
        )
        tl.atomic_xchg(counters_ptr, 0, sem="acq_rel", scope="gpu")


@triton.jit(do_not_specialize=["num_pairs", "num_groups", "num_programs"])
def _scan_scatter_kernel(
    counters_ptr,
    key_ptr,
    rank_ptr,
    group_off_ptr,
    sorted_ptr,
    tile_group_ptr,
    tile_row0_ptr,
    tile_cnt_ptr,
    num_tiles_ptr,
    num_pairs,
    num_groups,
    num_programs,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
    PDL: tl.constexpr,
):
    """Second launch of the two-launch counting sort. The counts are complete (the counting
    launch has finished: a kernel boundary, no in-kernel handoff), so every program scans them
    itself (a few thousand groups at most) and scatters its BLOCK pairs; program 0 also writes
    the tile table. Every program writes the same group offsets; each reads back only after its
    own writes (barrier). The counts are then zeroed for the next call by the LAST program to
    finish: its ticket (acq_rel) comes after every program's reads of them."""
    pdl_wait(PDL)
    pid = tl.program_id(0)
    counts_ptr = counters_ptr + 1
    _scan_groups(
        counts_ptr,
        group_off_ptr,
        tile_group_ptr,
        tile_row0_ptr,
        tile_cnt_ptr,
        num_tiles_ptr,
        num_groups,
        (pid == 0).to(tl.int32),
        BLOCK_M,
        BLOCK_G,
        False,
    )
    tl.debug_barrier()  # this program's group_off stores before its loads (global, same CTA)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < num_pairs
    key = tl.load(key_ptr + offs, mask=in_range, other=-1)
    active = key >= 0
    start = tl.load(group_off_ptr + tl.where(active, key, 0), mask=active, other=0)
    rank = tl.load(rank_ptr + offs, mask=active, other=0)
    tl.store(sorted_ptr + start + rank, offs, mask=active)
    # Every thread's count loads are done (their values were used above) before the ticket.
    tl.debug_barrier()
    done = tl.atomic_add(counters_ptr, 1, sem="acq_rel", scope="gpu")
    if done == num_programs - 1:
        for g0 in range(0, num_groups, BLOCK_G):
            g_offs = g0 + tl.arange(0, BLOCK_G)
            tl.store(
                counts_ptr + g_offs, tl.zeros((BLOCK_G,), dtype=tl.int32), mask=g_offs < num_groups
            )
        tl.atomic_xchg(counters_ptr, 0, sem="acq_rel", scope="gpu")


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
