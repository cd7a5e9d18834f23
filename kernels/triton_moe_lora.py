"""Triton kernels for the fused MoE-LoRA op (CUDA backend of kernels/moe_lora.py).

Semantics are those of kernels/reference.py (read it first): for every (token m, expert slot k)
pair whose token has an enabled adapter slot s and expert e = topk_ids[m, k],

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

* Tile path (what runs): two launches per projection, shrink then expand, with the fp32 rank
  intermediate in a small workspace [KSPLIT, slices, pairs, R]:
    - shrink grid (tile, K-split): tl.dot of the tile's gathered activation rows with the
      (slot, expert) A block, K split across programs so even one tile fills the GPU; each
      split writes its own partial (no atomics, no zero-fill). For w13 one program does both
      slices (gate, up): the activation tile is loaded once for both.
    - expand grid (tile, N-split): sums the K partials, rounds to the activation dtype, and
      multiplies by the B block in BLOCK_N column tiles, read-modify-writing out in place. The
      next column tile's B and out tiles are prefetched one iteration ahead (the out RMW is
      not a tl.dot operand, so Triton would not pipeline it; it dominates at large batch).
  Every A and B byte of a tile is read exactly once from HBM; nothing is recomputed.
  A tile is either one pair ("naive": no routing metadata at all, for batches whose pairs
  rarely share a (slot, expert) block), or up to BLOCK_M pairs of one (slot, expert) group
  ("grouped": each distinct block is read once for all its tokens).

* Grouping runs on the GPU, without host sync, by one of two routers:
    sort  (<= 1024 pairs): ONE program packs (key = slot*E + expert, pair) into an int32,
          tl.sort's it, finds each pair's rank inside its key run with a segmented scan and
          writes the tile table directly. At decode sizes a launch costs more than this work.
    count (larger): count (rank = atomic_add on the group counter) -> one-program exclusive
          scan that also writes the tile table -> scatter; plus the counters' zero-fill.
  (A 2048-pair sort measured slower than the counting sort's four launches on the H200.)
  The tile table has a host-known upper bound (P/BLOCK_M + min(P, S*E)), so grids are fixed;
  programs past the device-side tile count exit at once. Order inside a group may vary, but
  each pair's result does not depend on its position: output is deterministic.
  The routing is returned so w2 reuses w13's (the vLLM plugin does).

* Programmatic dependent launch (sm_90) on every kernel: a kernel may be scheduled while its
  predecessor runs and waits (griddepcontrol.wait) before touching memory the predecessor
  writes. The expand issues its first B/out loads before that wait (they do not depend on the
  shrink); the router and small shrink grids let their successor launch early.

* A one-launch decode kernel (_pair_fused_kernel: grid (pair, N-chunk), GEMV shrink in
  registers, both w13 slices in one program) is kept as path="fused" but never chosen: on the
  H200 it was 2.6-7x slower than the tile path at M=1 (each N-chunk program re-reads the whole
  A block from L2, in a loop Triton does not software-pipeline since it has no tl.dot).

* CUDA-graph safe: no .item(), no host reads of device data, workspaces come from the caching
  allocator (graph pools during capture). No recompilation across batch sizes: every M-like
  argument is in do_not_specialize; shapes fixed per model (K, N, R, E, top_k) are constexpr,
  so EVEN_K/EVEN_R unmasked loads are chosen at compile time. The sort router compiles once per
  power-of-two size class of the pair count (<= 8 classes).

* No autotuning at run time: block sizes are rules of the shapes (tile_config, chosen from
  sm_90 compiles: no register spills, pipelined loads), and the plan thresholds (naive vs
  grouped, BLOCK_M, prefetch, PDL) come from kernels/configs/h200.json, written by
  kernels/tune_moe_lora.py from a `python -m kernels.bench --tune` run on an H200.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    """Programmatic dependent launch (sm_90). Every kernel here is launched with it, so it may
    be scheduled while the previous kernel on the stream still runs; this waits until that
    kernel has finished and its writes are visible. Memory written by kernels BEFORE the
    previous one is already safe to read earlier: a kernel lets its successor launch
    (_pdl_trigger) only after its own wait. At decode sizes the launch gaps between our
    back-to-back small kernels cost more than their work; this hides part of them."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def _pdl_trigger(PDL: tl.constexpr):
    """Let the next kernel launch now (it will wait in _pdl_wait). Only where that kernel's
    grid is small: waiting programs hold SM slots that this kernel's later programs need."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _pair_route(topk_ptr, slots_ptr, enabled_ptr, pair, num_slots,
                TOPK: tl.constexpr, E: tl.constexpr, HAS_ENABLED: tl.constexpr):  # fmt: skip
    """(slot, expert, active) of one (token, k) pair. Slot -1, out-of-range slots and experts,
    and disabled slots are inactive (never alias another slot)."""
    m = pair // TOPK
    slot = tl.load(slots_ptr + m).to(tl.int32)
    expert = tl.load(topk_ptr + pair).to(tl.int32)
    active = (slot >= 0) & (slot < num_slots) & (expert >= 0) & (expert < E)
    if HAS_ENABLED:
        en = tl.load(enabled_ptr + tl.where(active, slot, 0))
        active = active & (en != 0)
    return slot, expert, active


@triton.jit(do_not_specialize=["num_slots", "tiles_per_prog"])
def _pair_fused_kernel(
    out_ptr, x_ptr, topk_ptr, topk_w_ptr, slots_ptr, enabled_ptr,
    a0_ptr, a1_ptr, b0_ptr, b1_ptr,
    num_slots, tiles_per_prog, out_col0,
    stride_xm, stride_om, stride_ok, stride_on,
    sa_s, sa_e, sa_r, sa_k, sb_s, sb_e, sb_n, sb_r,
    TOPK: tl.constexpr, E: tl.constexpr, K: tl.constexpr, N: tl.constexpr, R: tl.constexpr,
    NUM_SLICES: tl.constexpr, IS_W2: tl.constexpr, HAS_ENABLED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """Decode path: one program = one (token, k) pair x one chunk of output columns, all slices.

    Shrink is a GEMV kept in registers (fp32); the expand reuses the rank vector for every
    column tile of the chunk.
    """
    _pdl_wait(PDL)
    pair = tl.program_id(0)
    chunk = tl.program_id(1)
    slot, expert, active = _pair_route(topk_ptr, slots_ptr, enabled_ptr, pair, num_slots,
                                       TOPK, E, HAS_ENABLED)  # fmt: skip
    if not active:
        return
    m = pair // TOPK
    kk = pair % TOPK
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    EVEN_R: tl.constexpr = R == BLOCK_R
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_mask = offs_r < R

    if IS_W2:
        x_row = x_ptr + pair.to(tl.int64) * stride_xm
    else:
        x_row = x_ptr + m.to(tl.int64) * stride_xm
    a_off = slot.to(tl.int64) * sa_s + expert.to(tl.int64) * sa_e
    a0_ptrs = a0_ptr + a_off + offs_r[:, None] * sa_r + offs_k[None, :] * sa_k
    a1_ptrs = a1_ptr + a_off + offs_r[:, None] * sa_r + offs_k[None, :] * sa_k

    # ---- shrink: t_i = A_i @ x, fp32 ----
    # This loop has no tl.dot, so Triton does not software-pipeline it: bytes in flight come
    # from wide tiles instead (BLOCK_K up to 1024), reduced every step to bound registers.
    acc0 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xv = tl.load(x_row + k0 + offs_k).to(tl.float32)
            if EVEN_R:
                a0 = tl.load(a0_ptrs)
            else:
                a0 = tl.load(a0_ptrs, mask=r_mask[:, None], other=0.0)
        else:
            k_mask = (k0 + offs_k) < K
            xv = tl.load(x_row + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            a0 = tl.load(a0_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc0 += tl.sum(a0.to(tl.float32) * xv[None, :], axis=1)
        if NUM_SLICES == 2:
            if EVEN_K:
                if EVEN_R:
                    a1 = tl.load(a1_ptrs)
                else:
                    a1 = tl.load(a1_ptrs, mask=r_mask[:, None], other=0.0)
            else:
                a1 = tl.load(a1_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            acc1 += tl.sum(a1.to(tl.float32) * xv[None, :], axis=1)
        a0_ptrs += BLOCK_K * sa_k
        a1_ptrs += BLOCK_K * sa_k
    # Round the rank intermediate to the activation dtype, as the reference (and vLLM) do.
    t0 = acc0.to(x_ptr.dtype.element_ty).to(tl.float32)
    t1 = acc1.to(x_ptr.dtype.element_ty).to(tl.float32)

    # ---- expand: this program's column tiles, every slice ----
    if IS_W2:
        w = tl.load(topk_w_ptr + pair).to(tl.float32)
    b_off = slot.to(tl.int64) * sb_s + expert.to(tl.int64) * sb_e
    out_row = out_ptr + m.to(tl.int64) * stride_om + kk.to(tl.int64) * stride_ok
    offs_n0 = tl.arange(0, BLOCK_N)
    N_TILES: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    t_lo = chunk * tiles_per_prog
    t_hi = tl.minimum(t_lo + tiles_per_prog, N_TILES)
    for nt in range(t_lo, t_hi):
        offs_n = nt * BLOCK_N + offs_n0
        n_mask = offs_n < N
        b_ptrs = offs_n[:, None] * sb_n + offs_r[None, :] * sb_r
        b_mask = n_mask[:, None] & r_mask[None, :]
        b0 = tl.load(b0_ptr + b_off + b_ptrs, mask=b_mask, other=0.0)
        d0 = tl.sum(b0.to(tl.float32) * t0[None, :], axis=1)
        if IS_W2:
            d0 = d0 * w
        o_ptrs = out_row + (out_col0 + offs_n) * stride_on
        o = tl.load(o_ptrs, mask=n_mask, other=0.0)
        tl.store(o_ptrs, (o.to(tl.float32) + d0).to(out_ptr.dtype.element_ty), mask=n_mask)
        if NUM_SLICES == 2:
            b1 = tl.load(b1_ptr + b_off + b_ptrs, mask=b_mask, other=0.0)
            d1 = tl.sum(b1.to(tl.float32) * t1[None, :], axis=1)
            o_ptrs = out_row + (out_col0 + N + offs_n) * stride_on
            o = tl.load(o_ptrs, mask=n_mask, other=0.0)
            tl.store(o_ptrs, (o.to(tl.float32) + d1).to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _tile_rows(tile, topk_ptr, slots_ptr, enabled_ptr, tile_group_ptr, tile_row0_ptr,
               tile_cnt_ptr, sorted_ptr, num_slots,
               TOPK: tl.constexpr, E: tl.constexpr, HAS_ENABLED: tl.constexpr,
               NAIVE: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """Resolve a tile: (slot, expert, active, pairs[BLOCK_M], row_mask, first workspace row).

    Naive: tile t is the single pair t (row 0 only). Grouped: tile t comes from the tile table
    written by _route_scan_kernel; the caller has already checked t < num_tiles.
    """
    offs_m = tl.arange(0, BLOCK_M)
    if NAIVE:
        slot, expert, active = _pair_route(topk_ptr, slots_ptr, enabled_ptr, tile, num_slots,
                                           TOPK, E, HAS_ENABLED)  # fmt: skip
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
    part_ptr, x_ptr, topk_ptr, slots_ptr, enabled_ptr,
    tile_group_ptr, tile_row0_ptr, tile_cnt_ptr, num_tiles_ptr, sorted_ptr,
    a0_ptr, a1_ptr,
    num_slots, num_pairs, k_per_split,
    stride_xm, sa_s, sa_e, sa_r, sa_k,
    TOPK: tl.constexpr, E: tl.constexpr, K: tl.constexpr, R: tl.constexpr,
    NUM_SLICES: tl.constexpr, IS_W2: tl.constexpr, HAS_ENABLED: tl.constexpr,
    NAIVE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr, EARLY_TRIGGER: tl.constexpr,
):  # fmt: skip
    """part[ks, i, row, :] = A_i[s, e][:, K-split ks] @ x_row[K-split ks] for a tile's rows.

    The activation rows of the tile are gathered once per K step and shared by both slices.
    """
    _pdl_wait(PDL)
    if EARLY_TRIGGER:  # the expand's grid fits beside ours: let it prefetch its B/out tiles
        _pdl_trigger(PDL)
    tile = tl.program_id(0)
    ks = tl.program_id(1)
    if not NAIVE:
        if tile >= tl.load(num_tiles_ptr):
            return
    slot, expert, active, pairs, row_mask, row0 = _tile_rows(
        tile, topk_ptr, slots_ptr, enabled_ptr, tile_group_ptr, tile_row0_ptr, tile_cnt_ptr,
        sorted_ptr, num_slots, TOPK, E, HAS_ENABLED, NAIVE, BLOCK_M)  # fmt: skip
    if not active:
        return
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    EVEN_R: tl.constexpr = R == BLOCK_R
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_mask = offs_r < R
    if IS_W2:
        x_rows = pairs.to(tl.int64)
    else:
        x_rows = (pairs // TOPK).to(tl.int64)
    # k_per_split is a multiple of BLOCK_K (host guarantees it); say so, or the loads below
    # lose 16-byte vectorisation and software pipelining.
    k_lo = tl.multiple_of(ks * k_per_split, BLOCK_K)
    k_hi = tl.minimum(k_lo + k_per_split, K)

    x_ptrs = x_ptr + x_rows[:, None] * stride_xm + (k_lo + offs_k)[None, :]
    a_off = slot.to(tl.int64) * sa_s + expert.to(tl.int64) * sa_e
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
    out_ptr, part_ptr, x_ptr, topk_ptr, topk_w_ptr, slots_ptr, enabled_ptr,
    tile_group_ptr, tile_row0_ptr, tile_cnt_ptr, num_tiles_ptr, sorted_ptr,
    b0_ptr, b1_ptr,
    num_slots, num_pairs, ksplit, tiles_per_prog, out_col0,
    stride_om, stride_ok, stride_on, sb_s, sb_e, sb_n, sb_r,
    TOPK: tl.constexpr, E: tl.constexpr, N: tl.constexpr, R: tl.constexpr,
    NUM_SLICES: tl.constexpr, IS_W2: tl.constexpr, HAS_ENABLED: tl.constexpr,
    NAIVE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    PDL: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    """out[pair, cols] += round(sum_ks part[ks]) @ B_i[s, e]^T over this program's column tiles.

    With PREFETCH the B and out tiles of the next column tile are loaded one iteration ahead
    (the out read-modify-write dominates at large batch and is not a tl.dot operand, so Triton
    would not pipeline it), and the first tile's loads are issued BEFORE waiting for the shrink
    kernel (PDL): they do not depend on it.
    """
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    if not PREFETCH:
        _pdl_wait(PDL)
    if not NAIVE:
        # The tile table was written before the shrink kernel started: safe before the wait.
        if tile >= tl.load(num_tiles_ptr):
            return
    slot, expert, active, pairs, row_mask, row0 = _tile_rows(
        tile, topk_ptr, slots_ptr, enabled_ptr, tile_group_ptr, tile_row0_ptr, tile_cnt_ptr,
        sorted_ptr, num_slots, TOPK, E, HAS_ENABLED, NAIVE, BLOCK_M)  # fmt: skip
    if not active:
        return
    EVEN_R: tl.constexpr = R == BLOCK_R
    N_TILES: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n0 = tl.arange(0, BLOCK_N)
    r_mask = offs_r < R
    m = pairs // TOPK
    kk = pairs % TOPK
    out_rows = out_ptr + m.to(tl.int64) * stride_om + kk.to(tl.int64) * stride_ok
    b_off = slot.to(tl.int64) * sb_s + expert.to(tl.int64) * sb_e
    # Column tiles [t_lo, t_hi) of this program. Bounds, not an `if` in the body: loads under
    # a branch are not software-pipelined.
    t_lo = chunk * tiles_per_prog
    t_hi = tl.minimum(t_lo + tiles_per_prog, N_TILES)
    if PREFETCH:
        b0n, b1n, o0n, o1n = _expand_loads(out_rows, b0_ptr, b1_ptr, b_off, row_mask, r_mask,
                                           t_lo, t_hi, out_col0, stride_on, sb_n, sb_r, N,
                                           NUM_SLICES, EVEN_R, BLOCK_R, BLOCK_N)  # fmt: skip
        _pdl_wait(PDL)

    # ---- the rank intermediate: sum of the K-split partials, rounded like the reference ----
    rows = (row0 + offs_m).to(tl.int64)
    p_ptrs = part_ptr + rows[:, None] * BLOCK_R + offs_r[None, :]
    t0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    t1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for ks in range(0, ksplit):
        base = (ks * NUM_SLICES) * num_pairs * BLOCK_R
        t0 += tl.load(p_ptrs + base, mask=row_mask[:, None], other=0.0)
        if NUM_SLICES == 2:
            t1 += tl.load(p_ptrs + base + num_pairs * BLOCK_R, mask=row_mask[:, None], other=0.0)
    t0 = t0.to(x_ptr.dtype.element_ty).to(b0_ptr.dtype.element_ty)
    t1 = t1.to(x_ptr.dtype.element_ty).to(b0_ptr.dtype.element_ty)
    if IS_W2:
        w = tl.load(topk_w_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)

    for nt in range(t_lo, t_hi):
        if PREFETCH:
            b0, b1, o0, o1 = b0n, b1n, o0n, o1n
            b0n, b1n, o0n, o1n = _expand_loads(out_rows, b0_ptr, b1_ptr, b_off, row_mask,
                                               r_mask, nt + 1, t_hi, out_col0, stride_on, sb_n,
                                               sb_r, N, NUM_SLICES, EVEN_R, BLOCK_R, BLOCK_N)  # fmt: skip
        else:
            b0, b1, o0, o1 = _expand_loads(out_rows, b0_ptr, b1_ptr, b_off, row_mask, r_mask,
                                           nt, t_hi, out_col0, stride_on, sb_n, sb_r, N,
                                           NUM_SLICES, EVEN_R, BLOCK_R, BLOCK_N)  # fmt: skip
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
            tl.store(o_ptrs + N * stride_on, (o1.to(tl.float32) + d1).to(out_ptr.dtype.element_ty),
                     mask=o_mask)  # fmt: skip


@triton.jit
def _expand_loads(out_rows, b0_ptr, b1_ptr, b_off, row_mask, r_mask, nt, t_hi, out_col0,
                  stride_on, sb_n, sb_r, N: tl.constexpr, NUM_SLICES: tl.constexpr,
                  EVEN_R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
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


# ---- routing: counting sort of active pairs by (slot, expert) ----


@triton.jit
def _seg_count(k1, c1, k2, c2):
    # Segmented running count over a sorted key sequence: counts restart where the key changes.
    return k2, c2 + tl.where(k1 == k2, c1, 0)


@triton.jit(do_not_specialize=["num_pairs", "num_slots"])
def _route_small_kernel(topk_ptr, slots_ptr, enabled_ptr, sorted_ptr, tile_group_ptr,
                        tile_row0_ptr, tile_cnt_ptr, num_tiles_ptr, num_pairs, num_slots,
                        TOPK: tl.constexpr, E: tl.constexpr, HAS_ENABLED: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, SENTINEL: tl.constexpr,
                        PDL: tl.constexpr):  # fmt: skip
    """The whole grouping in ONE program (batches of <= BLOCK_P pairs): sort (key, pair) packed
    in one int32, find each pair's rank inside its (slot, expert) run with a segmented scan, and
    emit one tile per BLOCK_M rows of a run. Replaces count + scan + scatter (+ the zero-fill of
    the counters): at decode sizes each launch costs more than the work."""
    _pdl_wait(PDL)
    _pdl_trigger(PDL)  # one program: the shrink's programs may take their SM slots now
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
def _route_count_kernel(topk_ptr, slots_ptr, enabled_ptr, counts_ptr, key_ptr, rank_ptr,
                        num_pairs, num_slots,
                        TOPK: tl.constexpr, E: tl.constexpr, HAS_ENABLED: tl.constexpr,
                        BLOCK: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    _pdl_wait(PDL)
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
def _route_scan_kernel(counts_ptr, group_off_ptr, tile_group_ptr, tile_row0_ptr, tile_cnt_ptr,
                       num_tiles_ptr, num_groups,
                       BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """One program: exclusive scan of the group counts and the tile table, in BLOCK_G chunks."""
    _pdl_wait(PDL)
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
            tl.store(tile_cnt_ptr + tile_off + j, tl.minimum(cnt - j * BLOCK_M, BLOCK_M), mask=sel)
        row_carry += tl.sum(cnt, axis=0)
        tile_carry += tl.sum(ntile, axis=0)
    tl.store(num_tiles_ptr, tile_carry)


@triton.jit(do_not_specialize=["num_pairs"])
def _route_scatter_kernel(key_ptr, rank_ptr, group_off_ptr, sorted_ptr, num_pairs,
                          BLOCK: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    _pdl_wait(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < num_pairs
    key = tl.load(key_ptr + offs, mask=in_range, other=-1)
    active = key >= 0
    start = tl.load(group_off_ptr + tl.where(active, key, 0), mask=active, other=0)
    rank = tl.load(rank_ptr + offs, mask=active, other=0)
    tl.store(sorted_ptr + start + rank, offs, mask=active)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

_CONFIG_FILE = Path(__file__).with_name("configs") / "h200.json"


@functools.lru_cache(maxsize=None)
def _tuned() -> dict:
    """Plan thresholds. The defaults below are the values tuned on an H200 (so the measured
    plan holds even if the JSON is not shipped); kernels/configs/h200.json, written by
    kernels/tune_moe_lora.py, overrides them when present."""
    defaults = {
        # The one-launch GEMV kernel (path="fused") is never chosen automatically: on the H200
        # it measured 2.6-7x slower than the two-launch tile path at M=1 (every N-chunk program
        # re-reads the whole A block from L2, in loads Triton does not pipeline).
        "fused_max_pr": 0,
        "fused_max_pairs": 0,
        # naive (one pair per tile, no routing launch) iff P <= naive_max_pairs or
        # P * naive_sparsity <= S * E (pairs rarely share a (slot, expert) block), unless
        # P * rank >= grouped_min_pair_rank: big rank blocks make the naive re-reads cost more
        # than the routing launch (second H200 pass: grouped 6-18% faster there).
        "naive_sparsity": 1,
        "naive_max_pairs": 0,
        "grouped_min_pair_rank": 16384,
        # one-launch sorting router up to this many pairs; counting sort beyond (at 2048
        # pairs the counting sort measured 8-12% faster per layer call, at 1024 6-13% slower).
        "small_route_max_pairs": 1024,
        # programs each launch aims for, in multiples of the SM count ...
        "waves": 2,
        # ... and for grouped batches of >= waves_big_min_pairs pairs with rank <= 32 or
        # BLOCK_M 16: few, long tiles there; more K/N splits shorten each program's chain.
        "waves_big": 4,
        "waves_big_min_pairs": 1024,
        "waves_big_max_rank": 32,
        # expand-loop prefetch of the next B/out tiles from this many pairs up.
        "prefetch_min_pairs": 0,
        # programmatic dependent launch up to this many pairs.
        "pdl_max_pairs": 2048,
        # grouped tiles: BLOCK_M 32 / 64 once a (slot, expert) group averages this many pairs
        # (64 measured slower nearly everywhere: 8 warps at ~180 registers, 1 CTA per SM).
        "bm32_per_group": 12,
        "bm64_per_group": 1 << 30,
        # ... BLOCK_M 32 only from this many pairs (fewer: BM16 gives more programs) ...
        "bm32_min_pairs": 2048,
        # ... and for rank >= 64, BLOCK_M 64 WITHOUT the expand prefetch from this many pairs
        # per group (the prefetch's registers cost more than it hides at BM64).
        "bm64_r64_per_group": 64,
        "nopf_min_block_m": 64,
    }
    try:
        with open(_CONFIG_FILE) as f:
            defaults.update(json.load(f).get("plan", {}))
    except (OSError, ValueError):
        pass
    return defaults


# Programmatic dependent launch for every kernel here: None = on where supported (sm_90+),
# True/False forces it (the benchmark compares both). MOELORA_PDL=0 turns it off.
PDL: bool | None = None if os.environ.get("MOELORA_PDL", "1") == "1" else False
# Expand-loop prefetch of the next B/out tiles: None = the tuned default (_tuned()["prefetch"]).
PREFETCH: bool | None = None
# Benchmark-only overrides of the tile launch ("waves": programs per launch in SMs; "shrink" /
# "expand": dicts merged into tile_config's). Empty in normal use.
TILE_OVERRIDE: dict = {}


@functools.lru_cache(maxsize=None)
def _pdl_supported(device_index: int) -> bool:
    if _INTERPRET or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _pdl_kw(device: torch.device, num_pairs: int) -> dict:
    if PDL is not None:
        on = PDL
    else:
        on = (device.type == "cuda" and _pdl_supported(device.index or 0)
              and num_pairs <= _tuned()["pdl_max_pairs"])  # fmt: skip
    return dict(PDL=True, launch_pdl=True) if on else dict(PDL=False)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    if _INTERPRET or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(n))


# Sort key of inactive pairs in the one-launch router; keys are slot * E + expert < this, and
# SENTINEL * BLOCK_P + pair must fit in int32 (BLOCK_P <= 4096).
_SENTINEL = 1 << 18


@dataclass
class Routing:
    """Routing metadata of one batch (reusable by w13 and w2 of the same layer call)."""

    mode: str  # "naive" | "grouped"
    block_m: int
    num_pairs: int
    max_tiles: int
    tile_group: torch.Tensor | None = None
    tile_row0: torch.Tensor | None = None
    tile_cnt: torch.Tensor | None = None
    num_tiles: torch.Tensor | None = None
    sorted_pairs: torch.Tensor | None = None


def _grouped_block_m(num_pairs: int, num_groups: int, rank: int | None = None) -> int:
    # Rows per tile ~ the expected pairs per (slot, expert) group: bigger tiles re-read each
    # block less often; 16 is the tensor-core minimum.
    cfg = _tuned()
    per_group = num_pairs / max(1, min(num_pairs, num_groups))
    if per_group >= cfg["bm64_per_group"]:
        return 64
    if rank is not None and rank >= 64 and per_group >= cfg["bm64_r64_per_group"]:
        return 64
    if per_group >= cfg["bm32_per_group"] and num_pairs >= cfg["bm32_min_pairs"]:
        return 32
    return 16


def choose_mode(num_pairs: int, num_groups: int, rank: int | None = None) -> str:
    """naive (one pair per tile, no routing launch) while pairs rarely share a (slot, expert)
    block or the batch is tiny; grouped (each distinct block read once) otherwise. With the
    rank known, large pairs x rank go grouped even when sparse."""
    cfg = _tuned()
    sparse = num_pairs * cfg["naive_sparsity"] <= num_groups
    if rank is not None and num_pairs * rank >= cfg["grouped_min_pair_rank"]:
        sparse = False
    return "naive" if (num_pairs <= cfg["naive_max_pairs"] or sparse) else "grouped"


def plan_name(num_pairs: int, num_slots: int, num_experts: int, rank: int) -> str:
    """Human-readable name of what the automatic plan runs (benchmark tables)."""
    cfg = _tuned()
    mode = choose_mode(num_pairs, num_slots * num_experts, rank)
    if mode == "naive" and num_pairs <= cfg["fused_max_pairs"] and num_pairs * rank <= cfg["fused_max_pr"]:
        return "fused"
    if mode == "naive":
        return "tile-naive"
    bm = _grouped_block_m(num_pairs, num_slots * num_experts, rank)
    router = "sort" if num_pairs <= cfg["small_route_max_pairs"] else "count"
    return f"tile-grouped-BM{bm}-{router}"


def build_routing(topk_ids, token_slots, slot_enabled, num_slots: int, num_experts: int,
                  mode: str | None = None, block_m: int | None = None,
                  router: str | None = None, rank: int | None = None) -> Routing:  # fmt: skip
    """Decide naive vs grouped; for grouped, group the pairs on the GPU, no host sync: the
    one-launch sorting router for small batches ("small"), else the counting sort ("count",
    three launches + a zero-fill)."""
    m, top_k = topk_ids.shape
    p = m * top_k
    cfg = _tuned()
    num_groups = num_slots * num_experts
    if mode is None:
        mode = choose_mode(p, num_groups, rank)
    if mode == "naive":
        return Routing("naive", 16, p, p)
    bm = block_m or _grouped_block_m(p, num_groups, rank)
    dev = topk_ids.device
    max_tiles = triton.cdiv(p, bm) + min(p, num_groups)
    pdl = _pdl_kw(dev, p)
    enabled = slot_enabled if slot_enabled is not None else token_slots
    if router is None:
        router = "small" if p <= cfg["small_route_max_pairs"] else "count"
    if router == "small" and p <= 4096 and num_groups < _SENTINEL:
        # One launch. BLOCK_P is a power of two >= P: one compile per size class, not per M.
        block_p = max(16, triton.next_power_of_2(p))
        tiles = torch.empty(3 * max_tiles + 1, dtype=torch.int32, device=dev)
        sorted_pairs = torch.empty(p, dtype=torch.int32, device=dev)
        _route_small_kernel[(1,)](
            topk_ids, token_slots, enabled, sorted_pairs, tiles[:max_tiles],
            tiles[max_tiles:2 * max_tiles], tiles[2 * max_tiles:3 * max_tiles],
            tiles[3 * max_tiles:], p, num_slots,
            TOPK=top_k, E=num_experts, HAS_ENABLED=slot_enabled is not None, BLOCK_M=bm,
            BLOCK_P=block_p, SENTINEL=_SENTINEL, num_warps=4 if block_p <= 512 else 8, **pdl,
        )  # fmt: skip
        return Routing("grouped", bm, p, max_tiles, tiles[:max_tiles],
                       tiles[max_tiles:2 * max_tiles], tiles[2 * max_tiles:3 * max_tiles],
                       tiles[3 * max_tiles:], sorted_pairs)  # fmt: skip
    counts = torch.zeros(num_groups, dtype=torch.int32, device=dev)
    key = torch.empty(p, dtype=torch.int32, device=dev)
    rank = torch.empty(p, dtype=torch.int32, device=dev)
    group_off = torch.empty(num_groups, dtype=torch.int32, device=dev)
    tiles = torch.empty(3 * max_tiles + 1, dtype=torch.int32, device=dev)
    tile_group, tile_row0, tile_cnt = tiles[:max_tiles], tiles[max_tiles:2 * max_tiles], \
        tiles[2 * max_tiles:3 * max_tiles]  # fmt: skip
    num_tiles = tiles[3 * max_tiles:]
    sorted_pairs = torch.empty(p, dtype=torch.int32, device=dev)
    block = 1024
    grid = (triton.cdiv(p, block),)
    _route_count_kernel[grid](
        topk_ids, token_slots, enabled, counts, key, rank, p, num_slots,
        TOPK=top_k, E=num_experts, HAS_ENABLED=slot_enabled is not None, BLOCK=block, **pdl,
    )  # fmt: skip
    _route_scan_kernel[(1,)](
        counts, group_off, tile_group, tile_row0, tile_cnt, num_tiles, num_groups,
        BLOCK_M=bm, BLOCK_G=1024, num_warps=8, **pdl,
    )  # fmt: skip
    _route_scatter_kernel[grid](key, rank, group_off, sorted_pairs, p, BLOCK=block, **pdl)
    return Routing("grouped", bm, p, max_tiles, tile_group, tile_row0, tile_cnt, num_tiles,
                   sorted_pairs)  # fmt: skip


def _even_block_k(k: int, cap: int) -> int:
    """Largest power-of-two block <= cap that divides K (unmasked loads), else cap."""
    b = cap
    while b >= 32:
        if k % b == 0:
            return b
        b //= 2
    return cap


def fused_config(rank: int, k_dim: int, num_slices: int) -> dict:
    """Block sizes of the one-launch decode kernel (pure function of the shapes)."""
    block_r = _pow2_at_least(rank, 16)
    # ~16K weight elements per K step over all slices: wide loads stand in for pipelining.
    block_k = max(64, min(1024, 16384 // (block_r * num_slices)))
    return dict(BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_N=64, num_warps=8, num_stages=1)


def tile_config(block_m: int, rank: int, k_dim: int) -> tuple[dict, dict]:
    """(shrink, expand) block sizes of the tile kernels. Chosen from sm_90 compiles of every
    combination (registers <= 255 without spills, loads pipelined with cp.async)."""
    block_r = _pow2_at_least(rank, 16)
    shrink = dict(BLOCK_M=block_m, BLOCK_R=block_r,
                  BLOCK_K=_even_block_k(k_dim, 128 if block_r <= 64 else 64),
                  num_warps=4, num_stages=3)  # fmt: skip
    # The expand holds B and out tiles of two column tiles (prefetch) for both slices: wide
    # BLOCK_N only while that fits in registers.
    if block_m >= 64:
        expand = dict(BLOCK_N=64, num_warps=8)
    elif block_m >= 32:
        expand = dict(BLOCK_N=64, num_warps=8 if block_r >= 128 else 4)
    else:
        expand = dict(BLOCK_N=128 if block_r <= 32 else 64, num_warps=4)
    expand.update(BLOCK_M=block_m, BLOCK_R=block_r, num_stages=3)
    return shrink, expand


def _launch(out, x, topk_ids, topk_weights, token_slots, lora_a, lora_b, slot_enabled,
            is_w2: bool, routing: Routing | None, path: str | None, out_col0: int = 0):  # fmt: skip
    """Run one group of <= 2 slices that share strides. Returns the routing used."""
    num_slots, num_experts, rank, k_dim = lora_a[0].shape
    n_dim = lora_b[0].shape[2]
    num_slices = len(lora_a)
    m, top_k = topk_ids.shape
    p = m * top_k
    dev = x.device
    sms = _num_sms(dev.index or 0) if dev.type == "cuda" else 4
    cfg = _tuned()
    target = TILE_OVERRIDE.get("waves", cfg["waves"]) * sms
    block_r = _pow2_at_least(rank, 16)
    has_en = slot_enabled is not None
    enabled = slot_enabled if has_en else token_slots
    a0, b0 = lora_a[0], lora_b[0]
    a1 = lora_a[1] if num_slices == 2 else a0
    b1 = lora_b[1] if num_slices == 2 else b0
    w = topk_weights if is_w2 else x  # dummy pointer when unused
    ieee = x.dtype == torch.float32

    if path is None:
        small = p <= cfg["fused_max_pairs"] and p * rank <= cfg["fused_max_pr"]
        path = "fused" if (routing is None or routing.mode == "naive") and small else "tile"

    if path == "fused":
        fc = fused_config(rank, k_dim, num_slices)
        block_n = fc["BLOCK_N"]
        n_tiles = triton.cdiv(n_dim, block_n)
        chunks = max(1, min(n_tiles, triton.cdiv(target, max(p, 1))))
        per = triton.cdiv(n_tiles, chunks)
        chunks = triton.cdiv(n_tiles, per)
        _pair_fused_kernel[(p, chunks)](
            out, x, topk_ids, w, token_slots, enabled, a0, a1, b0, b1,
            num_slots, per, out_col0,
            x.stride(0), out.stride(0), out.stride(1), out.stride(2),
            *a0.stride(), *b0.stride(),
            TOPK=top_k, E=num_experts, K=k_dim, N=n_dim, R=rank, NUM_SLICES=num_slices,
            IS_W2=is_w2, HAS_ENABLED=has_en, **fc, **_pdl_kw(dev, p),
        )  # fmt: skip
        return routing if routing is not None else Routing("naive", 16, p, p)

    if routing is None:
        routing = build_routing(topk_ids, token_slots, slot_enabled, num_slots, num_experts,
                                rank=rank)  # fmt: skip
    naive = routing.mode == "naive"
    bm = routing.block_m
    tiles = routing.max_tiles
    # Expected live tiles (for sizing the splits): every pair alone, or ~one per group.
    live = p if naive else max(1, min(tiles, triton.cdiv(p, bm) + min(p, num_slots * num_experts) // 2))

    waves = cfg["waves"]
    if not naive and p >= cfg["waves_big_min_pairs"] and (rank <= cfg["waves_big_max_rank"]
                                                          or bm <= 16):  # fmt: skip
        waves = cfg["waves_big"]
    target = TILE_OVERRIDE.get("waves", waves) * sms
    sc, ec = tile_config(bm, rank, k_dim)
    sc.update(TILE_OVERRIDE.get("shrink", {}))
    ec.update(TILE_OVERRIDE.get("expand", {}))
    block_k = sc["BLOCK_K"]
    k_steps = triton.cdiv(k_dim, block_k)
    ksplit = max(1, min(k_steps, triton.cdiv(target, live), 16))
    k_per = triton.cdiv(k_steps, ksplit) * block_k
    ksplit = triton.cdiv(k_dim, k_per)

    block_n = ec["BLOCK_N"]
    n_tiles = triton.cdiv(n_dim, block_n)
    nsplit = max(1, min(n_tiles, triton.cdiv(target, live)))
    per = triton.cdiv(n_tiles, nsplit)
    nsplit = triton.cdiv(n_tiles, per)

    pdl = _pdl_kw(dev, p)
    # Let the expand launch while the shrink runs only if its grid fits on the GPU at once.
    early = pdl["PDL"] and tiles * nsplit <= 4 * sms
    if PREFETCH is None:
        prefetch = p >= cfg["prefetch_min_pairs"] and bm < cfg["nopf_min_block_m"]
    else:
        prefetch = PREFETCH
    part = torch.empty(ksplit * num_slices * p * block_r, dtype=torch.float32, device=dev)
    dummy = token_slots
    tg = routing.tile_group if not naive else dummy
    tr = routing.tile_row0 if not naive else dummy
    tc = routing.tile_cnt if not naive else dummy
    nt = routing.num_tiles if not naive else dummy
    sp = routing.sorted_pairs if not naive else dummy
    _tile_shrink_kernel[(tiles, ksplit)](
        part, x, topk_ids, token_slots, enabled, tg, tr, tc, nt, sp, a0, a1,
        num_slots, p, k_per, x.stride(0), *a0.stride(),
        TOPK=top_k, E=num_experts, K=k_dim, R=rank, NUM_SLICES=num_slices, IS_W2=is_w2,
        HAS_ENABLED=has_en, NAIVE=naive, IEEE=ieee, **sc, **pdl, EARLY_TRIGGER=early,
    )  # fmt: skip
    _tile_expand_kernel[(tiles, nsplit)](
        out, part, x, topk_ids, w, token_slots, enabled, tg, tr, tc, nt, sp, b0, b1,
        num_slots, p, ksplit, per, out_col0,
        out.stride(0), out.stride(1), out.stride(2), *b0.stride(),
        TOPK=top_k, E=num_experts, N=n_dim, R=rank, NUM_SLICES=num_slices, IS_W2=is_w2,
        HAS_ENABLED=has_en, NAIVE=naive, IEEE=ieee, **ec, **pdl, PREFETCH=prefetch,
    )  # fmt: skip
    return routing


def _prep(t: torch.Tensor) -> torch.Tensor:
    # Kernels index the last dim with unit stride; routing tensors as flat [M * top_k].
    return t if t.stride(-1) == 1 else t.contiguous()


def _slice_groups(lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor]):
    """Slices go two per launch when they share strides (gate+up: x read once for both)."""
    i = 0
    while i < len(lora_a):
        if (i + 1 < len(lora_a) and lora_a[i].stride() == lora_a[i + 1].stride()
                and lora_b[i].stride() == lora_b[i + 1].stride()):  # fmt: skip
            yield i, 2
            i += 2
        else:
            yield i, 1
            i += 1


def add_moe_lora_w13(out, x, topk_ids, token_slots, lora_a, lora_b, slot_enabled=None, *,
                     routing: Routing | None = None, path: str | None = None) -> Routing:  # fmt: skip
    """See kernels.moe_lora.add_moe_lora_w13. Returns the routing metadata (reusable by w2)."""
    if x.shape[0] == 0:
        return routing
    x = _prep(x)
    topk_ids = topk_ids.contiguous()
    token_slots = token_slots.contiguous()
    lora_a = [_prep(a) for a in lora_a]
    lora_b = [_prep(b) for b in lora_b]
    n = lora_b[0].shape[2]
    for i, count in _slice_groups(lora_a, lora_b):
        routing = _launch(out, x, topk_ids, None, token_slots, lora_a[i:i + count],
                          lora_b[i:i + count], slot_enabled, False, routing, path,
                          out_col0=i * n)  # fmt: skip
    return routing


def add_moe_lora_w2(out, h, topk_ids, topk_weights, token_slots, lora_a, lora_b,
                    slot_enabled=None, *, routing: Routing | None = None,
                    path: str | None = None) -> Routing:  # fmt: skip
    """See kernels.moe_lora.add_moe_lora_w2. Returns the routing metadata."""
    if h.shape[0] == 0:
        return routing
    return _launch(out, _prep(h), topk_ids.contiguous(), topk_weights.contiguous(),
                   token_slots.contiguous(), [_prep(lora_a)], [_prep(lora_b)], slot_enabled,
                   True, routing, path)  # fmt: skip
