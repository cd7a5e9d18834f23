"""Triton kernels of the MoE-LoRA op (the CUDA backend behind kernels/moe_lora.py).

Semantics are those of kernels/torch_moe_lora.py (read it first): for every (token m, expert
slot k) pair whose token has an enabled adapter slot s and expert e = topk_ids[m, k],

    out[m, k, cols(i)] += B_i[s, e] @ round(A_i[s, e] @ row)        (w13: row = x[m], slices i)
    out[m, k, :]       += w[m, k] * (B[s, e] @ round(A[s, e] @ row)) (w2:  row = h[m*top_k + k])

with fp32 accumulation, the rank-R intermediate rounded to the activation dtype, and one rounding
of (out + delta) to out's dtype. Pairs without an adapter are never read or written.

Design
------
The work is bandwidth-bound (1-4 FLOP per byte; the H200 ridge is ~180), so every choice below is
about bytes and latency, not FLOPs. Measured design history and numbers: docs/kernels.md.

* Each projection has a *shrink* (K -> R, a reduction over K) followed by an *expand*
  (R -> N, independent per output column). The reduction is the only cross-program dependency.

* Tile path: two launches per projection, shrink then expand, with the fp32
  rank intermediate in a small workspace [KSPLIT, slices, pairs, R]:
    - shrink grid (tile, K-split): tl.dot of the tile's gathered activation rows with the
      (slot, expert) A block; each split writes its own partial (no atomics, no zero-fill).
      For w13 one program does both slices (gate, up): the activation tile is loaded once.
    - expand grid (tile, N-split): sums the K partials (unrolled for small batches, so every
      partial's load is in flight at once), rounds to the activation dtype, and multiplies by
      the B block in BLOCK_N column tiles, read-modify-writing out in place. The
      next column tile's B and out tiles are prefetched one iteration ahead (the out RMW is
      not a tl.dot operand, so Triton would not pipeline it; it dominates at large batch).
  A tile is one pair ("naive") or up to BLOCK_M pairs of one (slot, expert) group ("grouped",
  kernels/triton_pair_sort.py). Every A and B byte of a tile is read once from HBM.

* Programmatic dependent launch (sm_90) on every kernel: see kernels/triton_util.py. The expand
  issues its first B/out loads before its wait (they do not depend on the shrink).

* CUDA-graph safe: no .item(), no host reads of device data; workspaces come from the caching
  allocator (graph pools during capture). No recompilation across batch sizes: every M-like argument
  is in do_not_specialize; shapes fixed per model (K, N, R, E, top_k) are constexpr.

* A one-launch decode kernel (split-K shrink with a ticketed, spin-waiting handoff to the
  expand in the same grid) was built and measured slower than these two PDL launches in every
  decode cell on the H200 (docs/kernels.md, "What was built and tried in round two"): its
  in-grid handoff cost more than the launch boundary it removed. It is not kept.

* Decode path (round five, _decode_kernel): ONE launch per projection with no handoff at all:
  a program per (pair, slice, column block) computes the pair's whole shrink itself (A re-read
  from L2 by each column block of the pair) and adds B @ t to its columns. It wins only while a
  pair's A block is small (Qwen3 rank 16: 16 x 2048 / 16 x 768) and the batch is small (the
  plan's decode_* keys; docs/kernels.md, "Round five"); elsewhere the tile path runs. Round
  seven: from 64 pairs a column block is up to 1024 wide (A re-read half as often), and the
  kernel runs up to 512 pairs while pairs rarely share a (slot, expert) block. Round eight: it
  lets the next kernel launch right after its own wait (TRIGGER), and up to 64 pairs it loads
  its A block and B columns before its wait (EARLY_ROUTE), so in a chain of decode kernels
  each one's weight reads overlap the previous one's work; at <= 8 pairs it also runs where
  A is 16 x 2880 (GPT-OSS rank 16, 16 warps).

* No autotuning at run time: block sizes are rules of the shapes, and the plan thresholds come
  from kernels/configs/ by GPU name (kernels/triton_plan.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.triton_pair_sort import PairRouting, naive_routing, sort_pairs
from kernels.triton_plan import (
    DEFAULT_OPTIONS,
    LaunchOptions,
    choose_mode,
    choose_sorter,
    decode_config,
    early_route_max_a_elems,
    grouped_block_m,
    naive_shrink_warps,
    plan_config,
    tile_config,
    use_decode,
)
from kernels.triton_util import (
    INTERPRET,
    device_name,
    num_sms,
    pair_route,
    pdl_supported,
    pdl_trigger,
    pdl_wait,
    self_cleaning_counters,
)

# --------------------------------------------------------------------------------------------
# Route and pointer helpers shared by the tile kernels and the decode kernel (inlined by Triton)
# --------------------------------------------------------------------------------------------


@triton.jit
def _block_offset(slot, expert, stride_s, stride_e):
    """Element offset (int64) of the (slot, expert) block of a [S, E, ...] weight tensor."""
    return slot.to(tl.int64) * stride_s + expert.to(tl.int64) * stride_e


@triton.jit
def _slice_ptr(p0, p1, sl, NUM_SLICES: tl.constexpr):
    """Base pointer of slice sl (w13: 0 = gate, 1 = up) of a one- or two-slice launch."""
    p = p0
    if NUM_SLICES == 2:
        p = tl.where(sl == 0, p0, p1)
    return p


@triton.jit
def _act_row(pairs, TOPK: tl.constexpr, IS_W2: tl.constexpr):
    """Activation row (int64) of pairs: x[pair // TOPK] for w13, h[pair] for w2."""
    if IS_W2:
        row = pairs.to(tl.int64)
    else:
        row = (pairs // TOPK).to(tl.int64)
    return row


@triton.jit
def _out_row_ptr(out_ptr, pairs, stride_om, stride_ok, TOPK: tl.constexpr):
    """Pointer to out[pair // TOPK, pair % TOPK, 0] (column 0 of the pair's output row)."""
    m = pairs // TOPK
    kk = pairs % TOPK
    return out_ptr + m.to(tl.int64) * stride_om + kk.to(tl.int64) * stride_ok


@triton.jit
def _guess_route(topk_ptr, slots_ptr, pair, num_slots, TOPK: tl.constexpr, E: tl.constexpr):
    """(slot, expert) of a pair as it reads BEFORE the PDL wait, clamped to valid addresses:
    a speculative read (the previous kernel may still write it), for loads that do not depend
    on it being right (L2 prefetch hints; the decode kernel's early route re-checks it)."""
    slot = tl.minimum(tl.maximum(tl.load(slots_ptr + pair // TOPK), 0), num_slots - 1)
    expert = tl.minimum(tl.maximum(tl.load(topk_ptr + pair), 0), E - 1)
    return slot, expert


# --------------------------------------------------------------------------------------------
# Tile kernels: shrink, then expand
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_rows(
    tile,
    topk_ptr,
    slots_ptr,
    enabled_ptr,
    tile_group_ptr,
    tile_row0_ptr,
    tile_cnt_ptr,
    sorted_ptr,
    num_slots,
    TOPK: tl.constexpr,
    E: tl.constexpr,
    HAS_ENABLED: tl.constexpr,
    NAIVE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Resolve a tile: (slot, expert, active, pairs[BLOCK_M], row_mask, first workspace row).

    Naive: tile t is the single pair t (row 0 only). Grouped: tile t comes from the tile table
    written by _route_scan_kernel; the caller has already checked t < num_tiles.
    """
    offs_m = tl.arange(0, BLOCK_M)
    if NAIVE:
        slot, expert, active = pair_route(
            topk_ptr, slots_ptr, enabled_ptr, tile, num_slots, TOPK, E, HAS_ENABLED
        )
        row_mask = offs_m == 0
        pairs = tl.where(row_mask, tile, 0)
        row0 = tile
    else:
        g = tl.load(tile_group_ptr + tile)
        slot = g // E
        expert = g % E
        active = g >= 0
        row0 = tl.load(tile_row0_ptr + tile)
        cnt = tl.load(tile_cnt_ptr + tile)
        row_mask = offs_m < cnt
        pairs = tl.load(sorted_ptr + row0 + offs_m, mask=row_mask, other=0)
    return slot, expert, active, pairs, row_mask, row0


@triton.jit(do_not_specialize=["num_slots", "num_pairs", "k_per_split"])
def _tile_shrink_kernel(
    part_ptr,
    x_ptr,
    topk_ptr,
    slots_ptr,
    enabled_ptr,
    tile_group_ptr,
    tile_row0_ptr,
    tile_cnt_ptr,
    num_tiles_ptr,
    sorted_ptr,
    a0_ptr,
    a1_ptr,
    num_slots,
    num_pairs,
    k_per_split,
    stride_xm,
    sa_s,
    sa_e,
    sa_r,
    sa_k,
    TOPK: tl.constexpr,
    E: tl.constexpr,
    K: tl.constexpr,
    R: tl.constexpr,
    NUM_SLICES: tl.constexpr,
    IS_W2: tl.constexpr,
    HAS_ENABLED: tl.constexpr,
    NAIVE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
    EARLY_TRIGGER: tl.constexpr,
    L2_PREFETCH: tl.constexpr = False,
):
    """part[ks, i, row, :] = A_i[s, e][:, K-split ks] @ x_row[K-split ks] for a tile's rows.

    The activation rows of the tile are gathered once per K step and shared by both slices.
    With L2_PREFETCH (naive tiles; round eight) the program asks L2 for its A lines BEFORE
    waiting for the previous kernel, from a speculative read of its pair's route (a hint: the
    route is read again after the wait): with a previous kernel that lets this one launch early
    (TRIGGER below), the A read overlaps that kernel's tail.
    """
    tile = tl.program_id(0)
    ks = tl.program_id(1)
    if L2_PREFETCH:
        if NAIVE:
            s0, e0 = _guess_route(topk_ptr, slots_ptr, tile, num_slots, TOPK, E)
            k0 = ks * k_per_split
            PF_COLS: tl.constexpr = (BLOCK_K + 63) // 64
            pf_rows = tl.minimum(tl.arange(0, BLOCK_R), R - 1)
            pf_cols = tl.arange(0, PF_COLS) * 64
            pf_off = _block_offset(s0, e0, sa_s, sa_e) + pf_rows[:, None] * sa_r
            for kk in range(k0, tl.minimum(k0 + k_per_split, K), BLOCK_K):
                cols = tl.minimum(kk + pf_cols, K - 1)
                _l2_prefetch(a0_ptr + pf_off + cols[None, :] * sa_k, True)
                if NUM_SLICES == 2:
                    _l2_prefetch(a1_ptr + pf_off + cols[None, :] * sa_k, True)
    pdl_wait(PDL)
    if EARLY_TRIGGER:  # the expand's grid fits beside ours: let it prefetch its B/out tiles
        pdl_trigger(PDL)
    if not NAIVE:
        if tile >= tl.load(num_tiles_ptr):
            return
    slot, expert, active, pairs, row_mask, row0 = _tile_rows(
        tile,
        topk_ptr,
        slots_ptr,
        enabled_ptr,
        tile_group_ptr,
        tile_row0_ptr,
        tile_cnt_ptr,
        sorted_ptr,
        num_slots,
        TOPK,
        E,
        HAS_ENABLED,
        NAIVE,
        BLOCK_M,
    )
    if not active:
        return
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    EVEN_R: tl.constexpr = R == BLOCK_R
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_mask = offs_r < R
    x_rows = _act_row(pairs, TOPK, IS_W2)
    # k_per_split is a multiple of BLOCK_K (host guarantees it); say so, or the loads below
    # lose 16-byte vectorisation and software pipelining.
    k_lo = tl.multiple_of(ks * k_per_split, BLOCK_K)
    k_hi = tl.minimum(k_lo + k_per_split, K)

    x_ptrs = x_ptr + x_rows[:, None] * stride_xm + (k_lo + offs_k)[None, :]
    a_off = _block_offset(slot, expert, sa_s, sa_e)
    # A is [R, K] (K contiguous); load it as a [BLOCK_K, BLOCK_R] operand.
    a_tile = (k_lo + offs_k)[:, None] * sa_k + offs_r[None, :] * sa_r
    a0_ptrs = a0_ptr + a_off + a_tile
    a1_ptrs = a1_ptr + a_off + a_tile
    acc0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
            if EVEN_R:
                a0 = tl.load(a0_ptrs)
            else:
                a0 = tl.load(a0_ptrs, mask=r_mask[None, :], other=0.0)
        else:
            k_mask = (k0 + offs_k) < K
            xt = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            a0 = tl.load(a0_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        a0 = a0.to(xt.dtype)
        if IEEE:
            acc0 = tl.dot(xt, a0, acc0, input_precision="ieee")
        else:
            acc0 = tl.dot(xt, a0, acc0)
        if NUM_SLICES == 2:
            if EVEN_K:
                if EVEN_R:
                    a1 = tl.load(a1_ptrs)
                else:
                    a1 = tl.load(a1_ptrs, mask=r_mask[None, :], other=0.0)
            else:
                a1 = tl.load(a1_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            a1 = a1.to(xt.dtype)
            if IEEE:
                acc1 = tl.dot(xt, a1, acc1, input_precision="ieee")
            else:
                acc1 = tl.dot(xt, a1, acc1)
        x_ptrs += BLOCK_K
        a0_ptrs += BLOCK_K * sa_k
        a1_ptrs += BLOCK_K * sa_k

    # Workspace row = pair (naive) or sorted position (grouped): contiguous per tile.
    rows = (row0 + offs_m).to(tl.int64)
    p_ptrs = part_ptr + ((ks * NUM_SLICES) * num_pairs + rows)[:, None] * BLOCK_R + offs_r[None, :]
    tl.store(p_ptrs, acc0, mask=row_mask[:, None])
    if NUM_SLICES == 2:
        p_ptrs += num_pairs * BLOCK_R
        tl.store(p_ptrs, acc1, mask=row_mask[:, None])


@triton.jit(do_not_specialize=["num_slots", "num_pairs", "ksplit", "tiles_per_prog"])
def _tile_expand_kernel(
    out_ptr,
    part_ptr,
    x_ptr,
    topk_ptr,
    topk_w_ptr,
    slots_ptr,
    enabled_ptr,
    tile_group_ptr,
    tile_row0_ptr,
    tile_cnt_ptr,
    num_tiles_ptr,
    sorted_ptr,
    b0_ptr,
    b1_ptr,
    num_slots,
    num_pairs,
    ksplit,
    tiles_per_prog,
    out_col0,
    stride_om,
    stride_ok,
    stride_on,
    sb_s,
    sb_e,
    sb_n,
    sb_r,
    TOPK: tl.constexpr,
    E: tl.constexpr,
    N: tl.constexpr,
    R: tl.constexpr,
    NUM_SLICES: tl.constexpr,
    IS_W2: tl.constexpr,
    HAS_ENABLED: tl.constexpr,
    NAIVE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
    KSPLIT_UNROLL: tl.constexpr,
    TRIGGER: tl.constexpr = False,
):
    """out[pair, cols] += round(sum_ks part[ks]) @ B_i[s, e]^T over this program's column tiles.

    With PREFETCH the B and out tiles of the next column tile are loaded one iteration ahead
    (the out read-modify-write dominates at large batch and is not a tl.dot operand, so Triton
    would not pipeline it), and the first tile's loads are issued BEFORE waiting for the shrink
    kernel (PDL): they do not depend on it.
    """
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    if not PREFETCH:
        pdl_wait(PDL)
        if TRIGGER:  # round eight: the next projection's first kernel may launch now
            pdl_trigger(PDL)
    if not NAIVE:
        # The tile table was written before the shrink kernel started: safe before the wait.
        if tile >= tl.load(num_tiles_ptr):
            return
    slot, expert, active, pairs, row_mask, row0 = _tile_rows(
        tile,
        topk_ptr,
        slots_ptr,
        enabled_ptr,
        tile_group_ptr,
        tile_row0_ptr,
        tile_cnt_ptr,
        sorted_ptr,
        num_slots,
        TOPK,
        E,
        HAS_ENABLED,
        NAIVE,
        BLOCK_M,
    )
    if not active:
        return
    EVEN_R: tl.constexpr = R == BLOCK_R
    N_TILES: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n0 = tl.arange(0, BLOCK_N)
    r_mask = offs_r < R
    out_rows = _out_row_ptr(out_ptr, pairs, stride_om, stride_ok, TOPK)
    b_off = _block_offset(slot, expert, sb_s, sb_e)
    # Column tiles [t_lo, t_hi) of this program. Bounds, not an `if` in the body: loads under
    # a branch are not software-pipelined.
    t_lo = chunk * tiles_per_prog
    t_hi = tl.minimum(t_lo + tiles_per_prog, N_TILES)
    if PREFETCH:
        b0n, b1n, o0n, o1n = _expand_loads(
            out_rows,
            b0_ptr,
            b1_ptr,
            b_off,
            row_mask,
            r_mask,
            t_lo,
            t_hi,
            out_col0,
            stride_on,
            sb_n,
            sb_r,
            N,
            NUM_SLICES,
            EVEN_R,
            BLOCK_R,
            BLOCK_N,
        )
        pdl_wait(PDL)
        if TRIGGER:
            pdl_trigger(PDL)

    # ---- the rank intermediate: sum of the K-split partials, rounded like the torch backend
    rows = (row0 + offs_m).to(tl.int64)
    p_ptrs = part_ptr + rows[:, None] * BLOCK_R + offs_r[None, :]
    t0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    t1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if KSPLIT_UNROLL > 0:
        # Unrolled to a power of two >= ksplit: every partial's load can be in flight at once
        # (a rolled loop waits one L2 round trip per split, up to 16 at decode sizes).
        for ks in tl.static_range(KSPLIT_UNROLL):
            base = (ks * NUM_SLICES) * num_pairs * BLOCK_R
            # A vector comparison (a scalar one and-ed in comes out int32 in the interpreter).
            p_mask = row_mask[:, None] & ((offs_r * 0 + ks) < ksplit)[None, :]
            t0 += tl.load(p_ptrs + base, mask=p_mask, other=0.0)
            if NUM_SLICES == 2:
                t1 += tl.load(p_ptrs + base + num_pairs * BLOCK_R, mask=p_mask, other=0.0)
    else:
        for ks in range(0, ksplit):
            base = (ks * NUM_SLICES) * num_pairs * BLOCK_R
            t0 += tl.load(p_ptrs + base, mask=row_mask[:, None], other=0.0)
            if NUM_SLICES == 2:
                p1 = p_ptrs + base + num_pairs * BLOCK_R
                t1 += tl.load(p1, mask=row_mask[:, None], other=0.0)
    t0 = t0.to(x_ptr.dtype.element_ty).to(b0_ptr.dtype.element_ty)
    t1 = t1.to(x_ptr.dtype.element_ty).to(b0_ptr.dtype.element_ty)
    if IS_W2:
        w = tl.load(topk_w_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)

    for nt in range(t_lo, t_hi):
        if PREFETCH:
            b0, b1, o0, o1 = b0n, b1n, o0n, o1n
            b0n, b1n, o0n, o1n = _expand_loads(
                out_rows,
                b0_ptr,
                b1_ptr,
                b_off,
                row_mask,
                r_mask,
                nt + 1,
                t_hi,
                out_col0,
                stride_on,
                sb_n,
                sb_r,
                N,
                NUM_SLICES,
                EVEN_R,
                BLOCK_R,
                BLOCK_N,
            )
        else:
            b0, b1, o0, o1 = _expand_loads(
                out_rows,
                b0_ptr,
                b1_ptr,
                b_off,
                row_mask,
                r_mask,
                nt,
                t_hi,
                out_col0,
                stride_on,
                sb_n,
                sb_r,
                N,
                NUM_SLICES,
                EVEN_R,
                BLOCK_R,
                BLOCK_N,
            )
        offs_n = nt * BLOCK_N + offs_n0
        o_mask = row_mask[:, None] & (offs_n < N)[None, :]
        o_ptrs = out_rows[:, None] + ((out_col0 + offs_n) * stride_on)[None, :]
        if IEEE:
            d0 = tl.dot(t0, b0, input_precision="ieee")
        else:
            d0 = tl.dot(t0, b0)
        if IS_W2:
            d0 = d0 * w[:, None]
        tl.store(o_ptrs, (o0.to(tl.float32) + d0).to(out_ptr.dtype.element_ty), mask=o_mask)
        if NUM_SLICES == 2:
            if IEEE:
                d1 = tl.dot(t1, b1, input_precision="ieee")
            else:
                d1 = tl.dot(t1, b1)
            tl.store(
                o_ptrs + N * stride_on,
                (o1.to(tl.float32) + d1).to(out_ptr.dtype.element_ty),
                mask=o_mask,
            )


@triton.jit
def _expand_loads(
    out_rows,
    b0_ptr,
    b1_ptr,
    b_off,
    row_mask,
    r_mask,
    nt,
    t_hi,
    out_col0,
    stride_on,
    sb_n,
    sb_r,
    N: tl.constexpr,
    NUM_SLICES: tl.constexpr,
    EVEN_R: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """B tiles ([BLOCK_R, BLOCK_N] operands of B[N, R]) and out tiles of column tile nt, every
    slice; all-masked (no memory traffic) when nt >= t_hi."""
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    # One vector comparison (a scalar `nt < t_hi` and-ed in comes out int32 in the interpreter).
    n_mask = offs_n < tl.where(nt < t_hi, N, 0)
    offs_r = tl.arange(0, BLOCK_R)
    b_ptrs = b_off + offs_r[:, None] * sb_r + offs_n[None, :] * sb_n
    if EVEN_R:
        b_mask = n_mask[None, :]
    else:
        b_mask = r_mask[:, None] & n_mask[None, :]
    o_mask = row_mask[:, None] & n_mask[None, :]
    o_ptrs = out_rows[:, None] + ((out_col0 + offs_n) * stride_on)[None, :]
    b0 = tl.load(b0_ptr + b_ptrs, mask=b_mask, other=0.0)
    o0 = tl.load(o_ptrs, mask=o_mask, other=0.0)
    if NUM_SLICES == 2:
        b1 = tl.load(b1_ptr + b_ptrs, mask=b_mask, other=0.0)
        o1 = tl.load(o_ptrs + N * stride_on, mask=o_mask, other=0.0)
    else:
        b1 = b0
        o1 = o0
    return b0, b1, o0, o1


# --------------------------------------------------------------------------------------------
# Decode kernel: one launch per projection (round five)
# --------------------------------------------------------------------------------------------


@triton.jit
def _l2_prefetch(ptrs, ON: tl.constexpr):
    """Ask L2 to fetch these addresses (a hint: no registers, no effect on results)."""
    if ON:
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;",
            "=r,l",
            [ptrs.to(tl.int64)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


@triton.jit(do_not_specialize=["num_slots"])
def _decode_kernel(
    out_ptr,
    x_ptr,
    topk_ptr,
    topk_w_ptr,
    slots_ptr,
    enabled_ptr,
    a0_ptr,
    a1_ptr,
    b0_ptr,
    b1_ptr,
    ws_ptr,
    cnt_ptr,
    num_slots,
    out_col0,
    stride_xm,
    stride_om,
    stride_ok,
    stride_on,
    sa_s,
    sa_e,
    sa_r,
    sa_k,
    sb_s,
    sb_e,
    sb_n,
    sb_r,
    TOPK: tl.constexpr,
    E: tl.constexpr,
    K: tl.constexpr,
    N: tl.constexpr,
    R: tl.constexpr,
    NUM_SLICES: tl.constexpr,
    IS_W2: tl.constexpr,
    HAS_ENABLED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
    L2_PREFETCH: tl.constexpr,
    PF_LINES: tl.constexpr,
    EARLY_ROUTE: tl.constexpr,
    K_PAD: tl.constexpr,
    SPEC_TEST: tl.constexpr,
    TRIGGER: tl.constexpr = False,
    KSPLIT: tl.constexpr = 1,
    KSPLIT_P2: tl.constexpr = 1,
    B_LATE: tl.constexpr = False,
    N_KC: tl.constexpr = 1,  # BLOCK_K steps of this program's K (host: _decode_k_steps)
    EVEN_K: tl.constexpr = False,  # every one of them full (no K mask)
    L2_HINTS: tl.constexpr = True,  # B_LATE's L2 prefetch hints (inline asm: not interpreted)
):
    """One (pair, slice, column block) per program, the whole projection in ONE launch:

        t = round(A_i[s, e] @ row)                 (the full K reduction, in this program)
        out[pair, cols] += B_i[s, e][cols] @ t     (x w for w2)

    Every column block of a pair recomputes the pair's shrink (A is re-read from L2, not HBM),
    so no program waits for another: no handoff, no workspace, no second launch. Worth it only
    while A_i[s, e] is small (decode batches, rank 16: the plan's decode_* keys). All loads of
    a program are issued together (the K loop is unrolled), so its latency is about one L2/HBM
    round trip for the route and one for A, x, B and out. With L2_PREFETCH the program asks L2
    for its A and B blocks BEFORE waiting for the previous kernel (from a speculative read of
    the route, clamped to valid addresses: a hint only, the real route is read after the wait).
    With EARLY_ROUTE the program loads its whole A block and its B columns BEFORE the wait,
    from the route as it reads then; after the wait it reads the route again with x and out
    (one round trip), and re-loads A and B only if the route changed (the previous kernel
    wrote it): correct whatever the previous kernel did, fast when the route was written
    earlier (vLLM: the router runs before the base GEMM that precedes this kernel).
    With TRIGGER (round eight) the program lets the next kernel launch right after its own
    wait, so that kernel's pre-wait loads (its weights) overlap this one's work.

    Round nine, KSPLIT > 1 (the split decode kernel): the K reduction of a (pair, slice, column
    block) is split over KSPLIT programs (grid axis 2), each reading K_PAD columns of A (one
    chunk) instead of all of A, so no single program streams a whole A block. Each writes its
    fp32 partial to the workspace and takes a ticket (an acq_rel atomic on the block's counter);
    the LAST one to arrive (no waiting: the others just exit) sums the KSPLIT partials in a
    fixed order, resets the counter to zero for the next launch, and adds B @ t to the columns.
    B_LATE: only that last program loads B (every program asks L2 for B first); else every
    program loads B with its A chunk (small B blocks: the last one then needs no B round trip).
    """
    pid = tl.program_id(0)
    pair = pid // NUM_SLICES
    sl = pid % NUM_SLICES
    nb = tl.program_id(1)
    # K columns [k0, k0 + K_PAD) of A in this program (all of K, padded, when KSPLIT == 1)
    k0 = tl.program_id(2) * K_PAD
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = offs_r < R
    n_mask = offs_n < N
    a_sl = _slice_ptr(a0_ptr, a1_ptr, sl, NUM_SLICES)
    b_sl = _slice_ptr(b0_ptr, b1_ptr, sl, NUM_SLICES)
    if L2_PREFETCH:
        s0, e0 = _guess_route(topk_ptr, slots_ptr, pair, num_slots, TOPK, E)
        # One address per 128-byte line of A's rows (K contiguous), one per row of B.
        lines = tl.minimum(tl.arange(0, PF_LINES) * 64, K - 1)
        rows = tl.minimum(offs_r, R - 1)
        a_pf = a_sl + _block_offset(s0, e0, sa_s, sa_e)
        _l2_prefetch(a_pf + rows[:, None] * sa_r + lines[None, :] * sa_k, True)
        b_pf = b_sl + _block_offset(s0, e0, sb_s, sb_e)
        _l2_prefetch(b_pf + tl.minimum(offs_n, N - 1) * sb_n, True)
    row = _act_row(pair, TOPK, IS_W2)
    if EARLY_ROUTE:
        # Speculative: the route as it reads now (clamped to valid addresses), and this
        # program's whole A block and B columns loaded into registers BEFORE the wait (weights
        # are never written by a kernel). Re-checked after the wait below.
        s_sp, e_sp = _guess_route(topk_ptr, slots_ptr, pair, num_slots, TOPK, E)
        if SPEC_TEST:  # test hook: a wrong guess, so the re-load path runs
            e_sp = (e_sp + 1) % E
        kfull = k0 + tl.arange(0, K_PAD)
        a_mask = r_mask[:, None] & (kfull < K)[None, :]
        b_mask = n_mask[:, None] & r_mask[None, :]
        a_tile = offs_r[:, None] * sa_r + kfull[None, :] * sa_k
        b_tile = offs_n[:, None] * sb_n + offs_r[None, :] * sb_r
        a_full = tl.load(
            a_sl + _block_offset(s_sp, e_sp, sa_s, sa_e) + a_tile, mask=a_mask, other=0.0
        )
        if B_LATE:
            b_pf = b_sl + _block_offset(s_sp, e_sp, sb_s, sb_e)
            _l2_prefetch(b_pf + tl.minimum(offs_n, N - 1) * sb_n, L2_HINTS)
        else:
            b_sp = b_sl + _block_offset(s_sp, e_sp, sb_s, sb_e)
            b = tl.load(b_sp + b_tile, mask=b_mask, other=0.0)
    pdl_wait(PDL)
    if TRIGGER:
        pdl_trigger(PDL)
    o_ptrs = _out_row_ptr(out_ptr, pair, stride_om, stride_ok, TOPK) + (
        (out_col0 + sl * N + offs_n) * stride_on
    )
    x_row = x_ptr + row * stride_xm
    if EARLY_ROUTE:
        # After the wait: x and out (written by earlier kernels; their addresses do not depend
        # on the route, so they are issued together with the route's re-read) ...
        o = tl.load(o_ptrs, mask=n_mask, other=0.0)
        xv = tl.load(x_row + kfull, mask=kfull < K, other=0.0)
    slot, expert, active = pair_route(
        topk_ptr, slots_ptr, enabled_ptr, pair, num_slots, TOPK, E, HAS_ENABLED
    )
    if not active:
        return
    a_base = a_sl + _block_offset(slot, expert, sa_s, sa_e)
    b_base = b_sl + _block_offset(slot, expert, sb_s, sb_e)
    if EARLY_ROUTE:
        # ... and A / B again only where the guess was wrong (masked loads: no memory traffic
        # when it was right).
        wrong = (slot != s_sp) | (expert != e_sp)
        wrong_r = (offs_r * 0 + wrong.to(tl.int32)) != 0
        a_full = tl.load(a_base + a_tile, mask=a_mask & wrong_r[:, None], other=a_full)
        if B_LATE:
            # (the L2 prefetch of the right B, if the guess was wrong: a hint, one per row)
            _l2_prefetch(b_base + tl.where(wrong, tl.minimum(offs_n, N - 1), 0) * sb_n, L2_HINTS)
        else:
            b = tl.load(b_base + b_tile, mask=b_mask & wrong_r[None, :], other=b)
        t = tl.sum(a_full.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)
    else:
        # B and out of this column block first: independent of the shrink.
        if B_LATE:
            _l2_prefetch(b_base + tl.minimum(offs_n, N - 1) * sb_n, L2_HINTS)
        else:
            b = tl.load(
                b_base + offs_n[:, None] * sb_n + offs_r[None, :] * sb_r,
                mask=n_mask[:, None] & r_mask[None, :],
                other=0.0,
            )
        o = tl.load(o_ptrs, mask=n_mask, other=0.0)
        # The shrink: this program's K (all of K when KSPLIT == 1), unrolled (every A and x
        # load can be in flight at once).
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for kc in tl.static_range(N_KC):
            kidx = k0 + kc * BLOCK_K + offs_k
            a_ptrs = a_base + offs_r[:, None] * sa_r + kidx[None, :] * sa_k
            if EVEN_K:
                xv = tl.load(x_row + kidx)
                a = tl.load(a_ptrs, mask=r_mask[:, None], other=0.0)
            else:
                k_mask = kidx < K
                xv = tl.load(x_row + kidx, mask=k_mask, other=0.0)
                a = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            acc += a.to(tl.float32) * xv.to(tl.float32)[None, :]
        t = tl.sum(acc, axis=1)
    if KSPLIT > 1:
        # Round nine: publish this chunk's partial, take a ticket; the last program of the
        # (pair, slice, column block) sums all partials (fixed order) and does the expand.
        blk = pid * tl.num_programs(1) + nb
        ws_blk = ws_ptr + blk.to(tl.int64) * (KSPLIT_P2 * BLOCK_R)
        tl.store(ws_blk + tl.program_id(2) * BLOCK_R + offs_r, t)
        ticket = tl.atomic_add(cnt_ptr + blk, 1, sem="acq_rel", scope="gpu")
        if ticket != KSPLIT - 1:
            return
        tl.atomic_xchg(cnt_ptr + blk, 0, sem="relaxed", scope="gpu")  # clean for the next launch
        offs_s = tl.arange(0, KSPLIT_P2)
        parts = tl.load(
            ws_blk + offs_s[:, None] * BLOCK_R + offs_r[None, :],
            mask=(offs_s < KSPLIT)[:, None],
            other=0.0,
            cache_modifier=".cg",
        )
        t = tl.sum(parts, axis=0)
        if B_LATE:
            b = tl.load(
                b_base + offs_n[:, None] * sb_n + offs_r[None, :] * sb_r,
                mask=n_mask[:, None] & r_mask[None, :],
                other=0.0,
            )
    t = t.to(x_ptr.dtype.element_ty).to(tl.float32)
    d = tl.sum(b.to(tl.float32) * t[None, :], axis=1)
    if IS_W2:
        d = d * tl.load(topk_w_ptr + pair).to(tl.float32)
    tl.store(o_ptrs, (o.to(tl.float32) + d).to(out_ptr.dtype.element_ty), mask=n_mask)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


class _Call:
    """What one projection launch needs to know about the device and the plan."""

    def __init__(self, device: torch.device, num_pairs: int, options: LaunchOptions):
        index = (device.index or 0) if device.type == "cuda" else 0
        self.sms = num_sms(index) if device.type == "cuda" else 4
        self.cfg = plan_config(device_name(index) if device.type == "cuda" else None)
        self.options = options
        pdl = options.pdl
        if pdl is None:
            pdl = device.type == "cuda" and num_pairs <= self.cfg["pdl_max_pairs"]
        self.pdl = dict(PDL=True, launch_pdl=True) if pdl and pdl_supported(index) else {}
        self.pdl.setdefault("PDL", False)
        # Round eight: a projection's last kernel lets the next kernel launch after its own
        # wait (tail_trigger_max_pairs); naive shrinks prefetch their A lines before their wait.
        # (decode_trigger_max_pairs for the decode kernel, tail_trigger_max_pairs for the tile
        # expand).
        trigger = options.trigger
        t_dec, t_tiles = trigger, trigger
        if trigger is None:
            t_dec = num_pairs <= self.cfg["decode_trigger_max_pairs"]
            t_tiles = num_pairs <= self.cfg["tail_trigger_max_pairs"]
        self.trigger = bool(t_tiles) and self.pdl["PDL"]
        self.trigger_decode = bool(t_dec) and self.pdl["PDL"]
        spf = options.shrink_l2_prefetch
        if spf is None:
            spf = num_pairs <= self.cfg["shrink_l2_prefetch_max_pairs"]
        self.shrink_l2_prefetch = bool(spf) and self.pdl["PDL"]
        # Round ten: the call's first kernel launched without the PDL attribute (compiled the
        # same: its wait returns at once), where the kernel before it is not ours.
        first = options.first_pdl
        if first is None:
            first = num_pairs > self.cfg["first_nopdl_max_pairs"]
        self.pdl_first = self.pdl
        if not first and self.pdl["PDL"]:
            self.pdl_first = {**self.pdl, "launch_pdl": False}


def route_pairs(
    topk_ids: torch.Tensor,
    token_slots: torch.Tensor,
    slot_enabled: torch.Tensor | None,
    num_slots: int,
    num_experts: int,
    rank: int,
    options: LaunchOptions = DEFAULT_OPTIONS,
) -> PairRouting:
    """Decide naive vs grouped (kernels/triton_plan.py); for grouped, sort the pairs."""
    m, top_k = topk_ids.shape
    p = m * top_k
    call = _Call(topk_ids.device, p, options)
    groups = num_slots * num_experts
    mode = options.mode or choose_mode(call.cfg, p, groups, rank)
    if mode == "naive":
        return naive_routing(p)
    bm = options.block_m or grouped_block_m(call.cfg, p, groups, rank)
    sorter = options.sorter or choose_sorter(call.cfg, p, groups)
    sort_block = options.sort_block
    if sort_block is None and sorter == "countr":
        sort_block = call.cfg["countr_sort_block"]
    return sort_pairs(
        topk_ids.contiguous(),
        token_slots.contiguous(),
        slot_enabled,
        num_slots,
        num_experts,
        bm,
        sorter,
        call.pdl,
        options.sort_warps,
        sort_block,
        first_pdl=call.pdl_first,
    )


def _launch_tiles(
    call,
    routing,
    out,
    x,
    topk_ids,
    w,
    token_slots,
    enabled,
    has_en,
    a,
    b,
    is_w2,
    out_col0,
    shrink_first=False,
):
    """Shrink then expand for <= 2 slices. a/b: lists of [S, E, R, K] / [S, E, N, R]; out:
    [M, top_k, >= out_col0 + slices * N]; x: [M, K] (w13) or [M * top_k, K] (w2); w: the routing
    weights [M, top_k] for w2 (any tensor otherwise). shrink_first: the shrink is the call's
    first kernel (no pair sort launched before it in this call)."""
    num_slots, num_experts, rank, k_dim = a[0].shape
    n_dim = b[0].shape[2]
    m, top_k = topk_ids.shape
    p = m * top_k
    cfg, opts = call.cfg, call.options
    naive = routing.mode == "naive"
    bm = routing.block_m
    tiles = routing.max_tiles
    # Expected live tiles (for sizing the splits): every pair alone, or ~one per group.
    live_grouped = triton.cdiv(p, bm) + min(p, num_slots * num_experts) // 2
    live = p if naive else max(1, min(tiles, live_grouped))
    waves = cfg["waves"]
    few_long_tiles = rank <= cfg["waves_big_max_rank"] or bm <= 16
    if not naive and p >= cfg["waves_big_min_pairs"] and few_long_tiles:
        waves = cfg["waves_big"]
    target = (opts.waves or waves) * call.sms
    # Round seven: naive tiles of small (decode) batches split the expand's N finer than the
    # shrink's K (fewer column tiles per expand program; more K splits measured slower).
    n_target = target
    small_max = cfg["expand_waves_small_max_pairs"]
    if rank >= 64:
        small_max = max(small_max, cfg["expand_waves_small_r64_max_pairs"])
    if naive and p <= small_max:
        n_target = cfg["expand_waves_small"] * call.sms
    if opts.expand_waves:
        n_target = opts.expand_waves * call.sms
    ksplit_max = opts.ksplit_max or cfg["ksplit_max"]
    sc, ec = tile_config(bm, rank, k_dim)
    if naive:  # round ten: fewer warps for the small batches' shrink (plan rule)
        sc["num_warps"] = naive_shrink_warps(cfg, p, rank) or sc["num_warps"]
    # Round four: 32-row tiles of small batches and rank <= 16 expand in 128 columns when N has
    # no partial column tile (measured better in both methods only there; docs/kernels.md).
    if (
        not naive
        and bm == 32
        and rank <= cfg["bm32_bn128_max_rank"]
        and p <= cfg["bm32_bn128_max_pairs"]
        and n_dim % 128 == 0
    ):
        ec["BLOCK_N"] = 128
    sc.update(opts.shrink or {})
    ec.update(opts.expand or {})
    block_k = sc["BLOCK_K"]
    k_steps = triton.cdiv(k_dim, block_k)
    ksplit = max(1, min(k_steps, triton.cdiv(target, live), ksplit_max))
    k_per = triton.cdiv(k_steps, ksplit) * block_k
    ksplit = triton.cdiv(k_dim, k_per)
    n_tiles = triton.cdiv(n_dim, ec["BLOCK_N"])
    nsplit = max(1, min(n_tiles, triton.cdiv(n_target, live)))
    per = triton.cdiv(n_tiles, nsplit)
    nsplit = triton.cdiv(n_tiles, per)

    pdl = call.pdl
    # Let the expand launch while the shrink runs only if its grid fits on the GPU at once.
    early = pdl["PDL"] and tiles * nsplit <= 4 * call.sms
    prefetch = opts.prefetch
    if prefetch is None:
        prefetch = p >= cfg["prefetch_min_pairs"] and bm < cfg["nopf_min_block_m"]
    unroll = opts.unroll_ksplit
    if unroll is None:
        unroll = p <= cfg["unroll_ksplit_max_pairs"]
    part = torch.empty(ksplit * len(a) * p * sc["BLOCK_R"], dtype=torch.float32, device=x.device)
    dummy = token_slots
    tg = dummy if naive else routing.tile_group
    tr = dummy if naive else routing.tile_row0
    tc = dummy if naive else routing.tile_cnt
    nt = dummy if naive else routing.num_tiles
    sp = dummy if naive else routing.sorted_pairs
    a1 = a[1] if len(a) == 2 else a[0]
    b1 = b[1] if len(b) == 2 else b[0]
    ieee = x.dtype == torch.float32
    _tile_shrink_kernel[(tiles, ksplit)](
        part,
        x,
        topk_ids,
        token_slots,
        enabled,
        tg,
        tr,
        tc,
        nt,
        sp,
        a[0],
        a1,
        num_slots,
        p,
        k_per,
        x.stride(0),
        *a[0].stride(),
        TOPK=top_k,
        E=num_experts,
        K=k_dim,
        R=rank,
        NUM_SLICES=len(a),
        IS_W2=is_w2,
        HAS_ENABLED=has_en,
        NAIVE=naive,
        IEEE=ieee,
        **sc,
        **(call.pdl_first if shrink_first else pdl),
        EARLY_TRIGGER=early,
        L2_PREFETCH=naive and call.shrink_l2_prefetch,
    )
    _tile_expand_kernel[(tiles, nsplit)](
        out,
        part,
        x,
        topk_ids,
        w,
        token_slots,
        enabled,
        tg,
        tr,
        tc,
        nt,
        sp,
        b[0],
        b1,
        num_slots,
        p,
        ksplit,
        per,
        out_col0,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        *b[0].stride(),
        TOPK=top_k,
        E=num_experts,
        N=n_dim,
        R=rank,
        NUM_SLICES=len(a),
        IS_W2=is_w2,
        HAS_ENABLED=has_en,
        NAIVE=naive,
        IEEE=ieee,
        **ec,
        **pdl,
        PREFETCH=prefetch,
        KSPLIT_UNROLL=triton.next_power_of_2(ksplit) if unroll else 0,
        # the next kernel's waiting programs must fit beside ours (as the shrink's trigger)
        TRIGGER=call.trigger and tiles * nsplit <= 4 * call.sms,
    )


def _launch_decode(call, out, x, topk_ids, w, token_slots, enabled, has_en, a, b, is_w2, out_col0):
    """The one-launch decode kernel for <= 2 slices (arguments as _launch_tiles)."""
    num_slots, num_experts, rank, k_dim = a[0].shape
    n_dim = b[0].shape[2]
    m, top_k = topk_ids.shape
    p = m * top_k
    dc = decode_config(call.cfg, rank, k_dim, n_dim, p)
    dc.update(call.options.decode_cfg or {})
    pdl = call.pdl_first
    if call.options.after_foreign and call.cfg["decode_nopdl_after_foreign"]:
        # Round ten: after a kernel that is not ours (vLLM's base GEMM) the decode kernel
        # runs without PDL: no wait, no trigger (measured faster inside the whole MoE layer).
        pdl = {"PDL": False}
    prefetch = bool(dc.pop("L2_PREFETCH")) and pdl["PDL"]
    pf_lines = triton.next_power_of_2(triton.cdiv(k_dim, 64))
    k_pad = triton.next_power_of_2(k_dim)
    block_r = triton.next_power_of_2(max(rank, 16))
    # EARLY_ROUTE holds all of A (or its K chunk) in registers: only while it is small.
    early_req = bool(dc.pop("EARLY_ROUTE"))
    early = early_req and block_r * k_pad <= early_route_max_a_elems(call.cfg)
    spec_test = bool(dc.pop("SPEC_TEST", False))
    trigger = bool(dc.pop("TRIGGER", call.trigger_decode)) and pdl["PDL"]
    # Round nine: the K reduction split over programs where A is larger than SPLIT_A_ELEMS
    # (chunks of a power-of-two K width; the last program of each block does the expand).
    split_elems = int(dc.pop("SPLIT_A_ELEMS", 0))
    b_late = bool(dc.pop("B_LATE", False))
    ksplit = 1
    if split_elems and block_r * k_dim > split_elems:
        k_chunk = max(16, 1 << ((split_elems // block_r).bit_length() - 1))
        ksplit = triton.cdiv(k_dim, k_chunk)
    n_blocks = triton.cdiv(n_dim, dc["BLOCK_N"])
    if ksplit > 1:
        k_pad = k_chunk
        dc["BLOCK_K"] = min(dc["BLOCK_K"], k_chunk)
        n_kc, even_k = k_chunk // dc["BLOCK_K"], k_dim % k_chunk == 0
        prefetch = False  # (the whole-A L2 prefetch: not with a K chunk per program)
        early = early_req and block_r * k_chunk <= early_route_max_a_elems(call.cfg)
        ksplit_p2 = triton.next_power_of_2(ksplit)
        ws = torch.empty(p * len(a) * n_blocks * ksplit_p2 * block_r, dtype=torch.float32,
                         device=x.device)  # fmt: skip
        cnt = self_cleaning_counters(x.device, "decode_split", p * len(a) * n_blocks)
    else:
        b_late = False
        n_kc, even_k = triton.cdiv(k_dim, dc["BLOCK_K"]), k_dim % dc["BLOCK_K"] == 0
        ksplit_p2 = 1
        ws = cnt = token_slots  # dummy pointers when unused
    grid = (p * len(a), n_blocks, ksplit)
    _decode_kernel[grid](
        out,
        x,
        topk_ids,
        w,
        token_slots,
        enabled,
        a[0],
        a[1] if len(a) == 2 else a[0],
        b[0],
        b[1] if len(b) == 2 else b[0],
        ws,
        cnt,
        num_slots,
        out_col0,
        x.stride(0),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        *a[0].stride(),
        *b[0].stride(),
        TOPK=top_k,
        E=num_experts,
        K=k_dim,
        N=n_dim,
        R=rank,
        NUM_SLICES=len(a),
        IS_W2=is_w2,
        HAS_ENABLED=has_en,
        BLOCK_R=block_r,
        L2_PREFETCH=prefetch,
        PF_LINES=pf_lines,
        EARLY_ROUTE=early,
        K_PAD=k_pad,
        SPEC_TEST=spec_test,
        TRIGGER=trigger,
        KSPLIT=ksplit,
        KSPLIT_P2=ksplit_p2,
        B_LATE=b_late,
        N_KC=n_kc,
        EVEN_K=even_k,
        L2_HINTS=not INTERPRET,
        **dc,
        **pdl,
    )


def _project(
    out,
    x,
    topk_ids,
    topk_weights,
    token_slots,
    lora_a,
    lora_b,
    slot_enabled,
    is_w2,
    routing,
    options,
    out_col0=0,
):
    """One launch group of <= 2 slices that share strides. Returns the routing used."""
    num_slots, num_experts, rank, _ = lora_a[0].shape
    p = topk_ids.numel()
    call = _Call(x.device, p, options)
    has_en = slot_enabled is not None
    enabled = slot_enabled if has_en else token_slots  # dummy pointer when unused
    w = topk_weights if is_w2 else x  # dummy pointer when unused
    args = (out, x, topk_ids, w, token_slots, enabled, has_en, lora_a, lora_b, is_w2, out_col0)
    decode = options.decode
    if decode is None:
        decode = use_decode(
            call.cfg,
            p,
            rank,
            lora_a[0].shape[3],
            options.decode_max_pairs,
            num_slots * num_experts,
        )
    if decode:  # one launch, no routing needed (w2 routes itself if it takes the tile path)
        _launch_decode(call, *args)
        return routing
    sorted_here = False
    if routing is None:
        routing = route_pairs(
            topk_ids, token_slots, slot_enabled, num_slots, num_experts, rank, options
        )
        sorted_here = routing.mode != "naive"
    _launch_tiles(call, routing, *args, shrink_first=not sorted_here)
    return routing


def _prep(t: torch.Tensor) -> torch.Tensor:
    # Kernels index the last dim with unit stride.
    return t if t.stride(-1) == 1 else t.contiguous()


def _slice_groups(lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor]):
    """Slices go two per launch when they share strides (gate+up: x read once for both)."""
    i = 0
    while i < len(lora_a):
        pair_ok = i + 1 < len(lora_a) and lora_a[i].stride() == lora_a[i + 1].stride()
        if pair_ok and lora_b[i].stride() == lora_b[i + 1].stride():
            yield i, 2
            i += 2
        else:
            yield i, 1
            i += 1


def add_moe_lora_w13(
    out: torch.Tensor,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    token_slots: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    slot_enabled: torch.Tensor | None = None,
    *,
    routing: PairRouting | None = None,
    options: LaunchOptions = DEFAULT_OPTIONS,
) -> PairRouting | None:
    """See kernels.moe_lora.add_moe_lora_w13. Returns the pair routing (reusable by w2)."""
    if x.shape[0] == 0:
        return routing
    x = _prep(x)
    topk_ids = topk_ids.contiguous()
    token_slots = token_slots.contiguous()
    lora_a = [_prep(a) for a in lora_a]
    lora_b = [_prep(b) for b in lora_b]
    n = lora_b[0].shape[2]
    for i, count in _slice_groups(lora_a, lora_b):
        routing = _project(
            out,
            x,
            topk_ids,
            None,
            token_slots,
            lora_a[i : i + count],
            lora_b[i : i + count],
            slot_enabled,
            False,
            routing,
            options,
            out_col0=i * n,
        )
    return routing


def add_moe_lora_w2(
    out: torch.Tensor,
    h: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    token_slots: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slot_enabled: torch.Tensor | None = None,
    *,
    routing: PairRouting | None = None,
    options: LaunchOptions = DEFAULT_OPTIONS,
) -> PairRouting | None:
    """See kernels.moe_lora.add_moe_lora_w2. Returns the pair routing."""
    if h.shape[0] == 0:
        return routing
    return _project(
        out,
        _prep(h),
        topk_ids.contiguous(),
        topk_weights.contiguous(),
        token_slots.contiguous(),
        [_prep(lora_a)],
        [_prep(lora_b)],
        slot_enabled,
        True,
        routing,
        options,
    )
