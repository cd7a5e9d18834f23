"""PROTOTYPE (issue 13, round four): the LoRA delta fused into a base fused-MoE kernel, decode only.

Not on the production path (kernels/moe_lora.py never calls it): it exists to measure what
fusing would save (docs/kernels.md, "Round four"). vLLM's base fused-MoE kernel cannot be
changed here (its code is never committed), so this module has a base kernel of its own, a
bandwidth-bound GEMV for decode batches (one program per (token, expert) pair and column block,
no tensor cores), and the same kernel with the LoRA expand in its epilogue:

    w13:  out[m, k, :]  = round(x[m] @ W13[e]^T)                       (base, [M, top_k, 2I])
          out[m, k, c] += B_i[s, e] @ round(A_i[s, e] @ x[m])          (LoRA, slice i of c)
    w2:   out[m, k, :]  = round(w[m, k] * (h[m*top_k + k] @ W2[e]^T))  (base, [M, top_k, H])
          out[m, k, :] += w[m, k] * (B[s, e] @ round(A[s, e] @ h[...]))

with the roundings of the unfused sequence (base rounded to the activation dtype and written,
then (out + delta) rounded again), so the fused result equals base-then-LoRA.

How the delta is fused: the LoRA shrink (K -> rank, a full reduction over K) stays a separate
launch, our tile shrink (kernels/triton_moe_lora.py, naive tiles), launched FIRST with
programmatic dependent launch and an early trigger; the base kernel launches while it runs,
streams its expert weights, and only then waits for the shrink (griddepcontrol.wait) to add
round(sum of the shrink's K-split partials) @ B[s, e]^T for its own column block before its one
store. What this removes against base + our separate delta: the expand launch, its read and
write of the output rows (w2: the output is written once), and the shrink's launch latency,
hidden under the base kernel's weight stream. What it keeps: x (w13) / h (w2) is read twice,
by the shrink and by the base (a few KB at decode); the shrink's partials go through L2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.triton_moe_lora import _tile_shrink_kernel
from kernels.triton_plan import tile_config
from kernels.triton_util import num_sms, pair_route, pdl_supported, pdl_wait

MAX_PAIRS = 256  # decode prototype: one program per pair and column block


@triton.jit(do_not_specialize=["num_slots", "num_pairs", "ksplit"])
def _fused_gemv_kernel(
    out_ptr,
    x_ptr,
    w_ptr,
    topk_ptr,
    topk_w_ptr,
    slots_ptr,
    enabled_ptr,
    part_ptr,
    b0_ptr,
    b1_ptr,
    num_slots,
    num_pairs,
    ksplit,
    stride_xm,
    stride_we,
    stride_wn,
    stride_wk,
    stride_om,
    stride_ok,
    sb_s,
    sb_e,
    sb_n,
    sb_r,
    TOPK: tl.constexpr,
    E: tl.constexpr,
    K: tl.constexpr,
    N: tl.constexpr,
    N_SLICE: tl.constexpr,
    R: tl.constexpr,
    NUM_SLICES: tl.constexpr,
    IS_W2: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_ENABLED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    KSPLIT_UNROLL: tl.constexpr,
    PDL: tl.constexpr,
):
    pair = tl.program_id(0)
    nb = tl.program_id(1)
    expert = tl.load(topk_ptr + pair).to(tl.int64)
    if IS_W2:
        row = pair.to(tl.int64)
    else:
        row = (pair // TOPK).to(tl.int64)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    x_ptrs = x_ptr + row * stride_xm + offs_k
    w_ptrs = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xk = tl.load(x_ptrs)
            wt = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
        else:
            k_mask = (k0 + offs_k) < K
            xk = tl.load(x_ptrs, mask=k_mask, other=0.0)
            wt = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += wt.to(tl.float32) * xk.to(tl.float32)[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    y = tl.sum(acc, axis=1)
    if IS_W2:
        wgt = tl.load(topk_w_ptr + pair).to(tl.float32)
        y = y * wgt
    o = y.to(out_ptr.dtype.element_ty)
    m = pair // TOPK
    kk = pair % TOPK
    o_ptrs = out_ptr + m.to(tl.int64) * stride_om + kk.to(tl.int64) * stride_ok + offs_n
    if HAS_LORA:
        slot, _, active = pair_route(
            topk_ptr, slots_ptr, enabled_ptr, pair, num_slots, TOPK, E, HAS_ENABLED
        )
        if active:
            # B is independent of the shrink: load it before waiting for the shrink's grid.
            sl = (nb * BLOCK_N) // N_SLICE  # a column block lies in one slice (host checks)
            cols = offs_n - sl * N_SLICE
            offs_r = tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            b_off = (
                slot.to(tl.int64) * sb_s
                + expert * sb_e
                + cols[:, None] * sb_n
                + offs_r[None, :] * sb_r
            )
            b_mask = n_mask[:, None] & r_mask[None, :]
            if NUM_SLICES == 2:
                # Vector comparisons (a scalar and-ed in comes out int32 in the interpreter).
                in0 = ((offs_n * 0 + sl) == 0)[:, None]
                b = tl.load(b0_ptr + b_off, mask=b_mask & in0, other=0.0)
                b += tl.load(b1_ptr + b_off, mask=b_mask & (~in0), other=0.0)
            else:
                b = tl.load(b0_ptr + b_off, mask=b_mask, other=0.0)
            pdl_wait(PDL)
            p_ptrs = part_ptr + (sl * num_pairs + pair).to(tl.int64) * BLOCK_R + offs_r
            t = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for ks in tl.static_range(KSPLIT_UNROLL):
                base = (ks * NUM_SLICES) * num_pairs * BLOCK_R
                t += tl.load(p_ptrs + base, mask=(offs_r * 0 + ks) < ksplit, other=0.0)
            t = t.to(x_ptr.dtype.element_ty).to(tl.float32)
            d = tl.sum(b.to(tl.float32) * t[None, :], axis=1)
            if IS_W2:
                d = d * wgt
            o = (o.to(tl.float32) + d).to(out_ptr.dtype.element_ty)
    tl.store(o_ptrs, o, mask=n_mask)


def _gemv_config(k_dim: int) -> dict:
    return dict(BLOCK_N=32, BLOCK_K=256 if k_dim >= 256 else triton.next_power_of_2(k_dim))


def _launch(
    out,
    x,
    w,
    topk_ids,
    topk_weights,
    is_w2,
    lora,
    cfg=None,
):
    m, top_k = topk_ids.shape
    p = m * top_k
    if p > MAX_PAIRS:
        raise ValueError(f"decode prototype: at most {MAX_PAIRS} pairs, got {p}")
    num_experts, n_dim, k_dim = w.shape
    cfg = {**_gemv_config(k_dim), "num_warps": 4, **(cfg or {})}
    dev = x.device
    index = (dev.index or 0) if dev.type == "cuda" else 0
    use_pdl = dev.type == "cuda" and pdl_supported(index)
    topk_ids = topk_ids.contiguous()
    dummy = topk_ids
    lora_args = dict(
        slots=dummy, enabled=dummy, part=x, b0=x, b1=x, num_slots=1, ksplit=1, unroll=1
    )
    block_r, rank, n_slices, n_slice, sb = 16, 1, 1, n_dim, (0, 0, 0, 0)
    has_en = False
    if lora is not None:
        a: Sequence[torch.Tensor] = lora["a"]
        b: Sequence[torch.Tensor] = lora["b"]
        slots = lora["token_slots"].contiguous()
        enabled = lora.get("enabled")
        has_en = enabled is not None
        num_slots, _, rank, _ = a[0].shape
        n_slices = len(a)
        n_slice = b[0].shape[2]
        bad_split = n_slices == 2 and n_slice % cfg["BLOCK_N"] != 0
        if n_slices > 2 or bad_split or n_slice * n_slices != n_dim:
            raise ValueError("LoRA slices must tile the output in whole column blocks")
        sc, _ = tile_config(16, rank, k_dim)
        block_r = sc["BLOCK_R"]
        sms = num_sms(index) if dev.type == "cuda" else 4
        k_steps = triton.cdiv(k_dim, sc["BLOCK_K"])
        ksplit = max(1, min(k_steps, triton.cdiv(2 * sms, p), 16))
        k_per = triton.cdiv(k_steps, ksplit) * sc["BLOCK_K"]
        ksplit = triton.cdiv(k_dim, k_per)
        part = torch.empty(ksplit * n_slices * p * block_r, dtype=torch.float32, device=dev)
        en = enabled if has_en else slots
        a1 = a[1] if n_slices == 2 else a[0]
        pdl = dict(PDL=True, launch_pdl=True) if use_pdl else dict(PDL=False)
        _tile_shrink_kernel[(p, ksplit)](
            part, x, topk_ids, slots, en, dummy, dummy, dummy, dummy, dummy, a[0], a1,
            num_slots, p, k_per, x.stride(0), *a[0].stride(),
            TOPK=top_k, E=num_experts, K=k_dim, R=rank, NUM_SLICES=n_slices, IS_W2=is_w2,
            HAS_ENABLED=has_en, NAIVE=True, IEEE=x.dtype == torch.float32, **sc, **pdl,
            EARLY_TRIGGER=use_pdl,
        )  # fmt: skip
        lora_args = dict(
            slots=slots,
            enabled=en,
            part=part,
            b0=b[0],
            b1=b[1] if n_slices == 2 else b[0],
            num_slots=num_slots,
            ksplit=ksplit,
            unroll=triton.next_power_of_2(ksplit),
        )
        sb = b[0].stride()
    pdl = dict(PDL=True, launch_pdl=True) if (use_pdl and lora is not None) else dict(PDL=False)
    la = lora_args
    grid = (p, triton.cdiv(n_dim, cfg["BLOCK_N"]))
    _fused_gemv_kernel[grid](
        out, x, w, topk_ids, topk_weights if is_w2 else x, la["slots"], la["enabled"], la["part"],
        la["b0"], la["b1"], la["num_slots"], p, la["ksplit"],
        x.stride(0), *w.stride(), out.stride(0), out.stride(1), *sb,
        TOPK=top_k, E=num_experts, K=k_dim, N=n_dim, N_SLICE=n_slice, R=rank,
        NUM_SLICES=n_slices, IS_W2=is_w2, HAS_LORA=lora is not None, HAS_ENABLED=has_en,
        BLOCK_R=block_r, KSPLIT_UNROLL=la["unroll"], **pdl, **cfg,
    )  # fmt: skip


def fused_moe_w13(out, x, w13, topk_ids, lora=None, cfg=None):
    """out [M, top_k, 2I] (written, not added to) = the base gate_up GEMM of every (token,
    expert) pair, plus the w13 LoRA delta if `lora` = dict(token_slots, a=[A_gate, A_up],
    b=[B_gate, B_up], enabled=None|slot_enabled) (vLLM's slot layout, as kernels/moe_lora.py)."""
    _launch(out, x, w13, topk_ids, None, False, lora, cfg)


def fused_moe_w2(out, h, w2, topk_ids, topk_weights, lora=None, cfg=None):
    """out [M, top_k, H] (written) = routing weight x (h[pair] @ W2[e]^T), plus the w2 LoRA
    delta (also scaled by the routing weight) if `lora` = dict(token_slots, a=[A], b=[B],
    enabled=...)."""
    _launch(out, h, w2, topk_ids, topk_weights, True, lora, cfg)
