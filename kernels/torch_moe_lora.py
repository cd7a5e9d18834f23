"""PyTorch backend of the MoE-LoRA op (kernels/moe_lora.py): what runs on CPU.

Vectorised over (token, expert) pairs: the pairs that have an adapter are gathered once, their
(slot, expert) A/B blocks are gathered and applied with batched matmuls. Work is done in chunks
of pairs only to bound the memory of the gathered weight blocks, never per token.

Numerics follow vLLM's kernels: fp32 accumulation, the rank-R intermediate rounded to the
activation dtype, the delta added to the output in fp32 and rounded once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Upper bound on the bytes of A/B blocks gathered at once (per slice, fp32).
_GATHER_BUDGET_BYTES = 64 << 20


def active_pairs(
    topk_ids: torch.Tensor, token_slots: torch.Tensor, slot_enabled: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pair index into the flattened [M * top_k], slot, expert) of every pair that gets a delta."""
    top_k = topk_ids.shape[1]
    pair_slot = token_slots.long().repeat_interleave(top_k)
    active = pair_slot >= 0
    if slot_enabled is not None:
        active &= slot_enabled[pair_slot.clamp(min=0)].bool()
    pairs = active.nonzero().squeeze(1)
    return pairs, pair_slot[pairs], topk_ids.reshape(-1)[pairs].long()


def _chunks(n_pairs: int, a: torch.Tensor, b: torch.Tensor):
    per_pair = (a.shape[2] * a.shape[3] + b.shape[2] * b.shape[3]) * 4
    step = max(1, _GATHER_BUDGET_BYTES // per_pair)
    for start in range(0, n_pairs, step):
        yield slice(start, min(start + step, n_pairs))


def _lora_delta(
    rows: torch.Tensor, slots: torch.Tensor, experts: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """[P, N] fp32 delta B[s,e] @ round(A[s,e] @ row) for each pair."""
    a_blocks = a[slots, experts].float()  # [P, R, K]
    b_blocks = b[slots, experts].float()  # [P, N, R]
    shrunk = torch.bmm(a_blocks, rows.float().unsqueeze(-1))  # [P, R, 1]
    shrunk = shrunk.to(rows.dtype).float()
    return torch.bmm(b_blocks, shrunk).squeeze(-1)


def add_moe_lora_w13(
    out: torch.Tensor,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    token_slots: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    slot_enabled: torch.Tensor | None = None,
) -> None:
    pairs, slots, experts = active_pairs(topk_ids, token_slots, slot_enabled)
    if pairs.numel() == 0:
        return
    top_k = topk_ids.shape[1]
    n = lora_b[0].shape[2]
    out_pairs = out.view(-1, out.shape[-1])
    for i, (a, b) in enumerate(zip(lora_a, lora_b, strict=True)):
        cols = slice(i * n, (i + 1) * n)
        for c in _chunks(pairs.numel(), a, b):
            p = pairs[c]
            delta = _lora_delta(x[p // top_k], slots[c], experts[c], a, b)
            out_pairs[p, cols] = (out_pairs[p, cols].float() + delta).to(out.dtype)


def add_moe_lora_w2(
    out: torch.Tensor,
    h: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    token_slots: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slot_enabled: torch.Tensor | None = None,
) -> None:
    pairs, slots, experts = active_pairs(topk_ids, token_slots, slot_enabled)
    if pairs.numel() == 0:
        return
    out_pairs = out.view(-1, out.shape[-1])
    weights = topk_weights.reshape(-1)
    for c in _chunks(pairs.numel(), lora_a, lora_b):
        p = pairs[c]
        delta = _lora_delta(h[p], slots[c], experts[c], lora_a, lora_b)
        delta *= weights[p].float().unsqueeze(-1)
        out_pairs[p] = (out_pairs[p].float() + delta).to(out.dtype)
