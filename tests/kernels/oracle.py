"""The test oracle of the MoE-LoRA op: the definition, pair by pair, in float64.

Independent of both backends (kernels/torch_moe_lora.py, kernels/triton_moe_lora.py): no
chunking, no grouping, no workspace. `round_to` rounds the rank-R intermediate to the
activation dtype first, as the backends and vLLM do, so 16-bit results can be held to a tight
bound; without it this is the exact math.
"""

from __future__ import annotations

import torch


def active(token_slots, num_slots, slot_enabled=None):
    """[M] bool: tokens that get a delta (slot in range and enabled)."""
    s = token_slots.long()
    ok = (s >= 0) & (s < num_slots)
    if slot_enabled is not None:
        ok &= slot_enabled[s.clamp(min=0, max=num_slots - 1)].bool()
    return ok


def _delta(row, a, b, round_to):
    t = a.double() @ row.double()  # [R]
    if round_to is not None:
        t = t.to(round_to).double()
    return b.double() @ t  # [N]


def w13_delta(x, topk_ids, token_slots, lora_a, lora_b, slot_enabled=None, round_to=None):
    """float64 [M, top_k, n_slices * N]: the delta add_moe_lora_w13 adds."""
    m, top_k = topk_ids.shape
    n = lora_b[0].shape[2]
    out = torch.zeros(m, top_k, len(lora_b) * n, dtype=torch.float64, device=x.device)
    ok = active(token_slots, lora_a[0].shape[0], slot_enabled).tolist()
    for t in range(m):
        if not ok[t]:
            continue
        s = int(token_slots[t])
        for k in range(top_k):
            e = int(topk_ids[t, k])
            for i, (a, b) in enumerate(zip(lora_a, lora_b, strict=True)):
                out[t, k, i * n : (i + 1) * n] = _delta(x[t], a[s, e], b[s, e], round_to)
    return out


def w2_delta(
    h, topk_ids, topk_weights, token_slots, lora_a, lora_b, slot_enabled=None, round_to=None
):
    """float64 [M, top_k, H]: the delta add_moe_lora_w2 adds."""
    m, top_k = topk_ids.shape
    out = torch.zeros(m, top_k, lora_b.shape[2], dtype=torch.float64, device=h.device)
    ok = active(token_slots, lora_a.shape[0], slot_enabled).tolist()
    for t in range(m):
        if not ok[t]:
            continue
        s = int(token_slots[t])
        for k in range(top_k):
            e = int(topk_ids[t, k])
            d = _delta(h[t * top_k + k], lora_a[s, e], lora_b[s, e], round_to)
            out[t, k] = float(topk_weights[t, k]) * d
    return out
