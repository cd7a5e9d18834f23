"""Per-token LoRA for dense projections in PyTorch, safe for tokens without an adapter.

vLLM 0.32's CPU ops select each token's weights with `weights[token_slots]`; a token without an
adapter has slot -1, which Python-style indexing turns into the *last* slot. With every slot
occupied, base-model requests silently run with another tenant's adapter. These ops compute only
the rows that have an adapter and leave the others untouched (shrink: zero, expand: unchanged).
"""

from __future__ import annotations

import torch


def _rows_with_adapter(token_slots: torch.Tensor) -> torch.Tensor:
    return (token_slots >= 0).nonzero().squeeze(1)


def lora_shrink(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    token_slots: torch.Tensor,
    scale: float,
) -> None:
    """out[t, :R] = scale * lora_a[s] @ x[t] for s = token_slots[t] >= 0; 0 where s < 0.

    lora_a: [S, R, K] or [S, 1, R, K] (vLLM's stacked layout); out: [T, >=R]."""
    a = lora_a.squeeze(1) if lora_a.dim() == 4 else lora_a
    rank = a.shape[1]
    out[:, :rank] = 0
    rows = _rows_with_adapter(token_slots)
    if rows.numel() == 0:
        return
    blocks = a[token_slots[rows].long()].to(out.dtype)  # [T', R, K]
    shrunk = torch.bmm(blocks, x[rows].to(out.dtype).unsqueeze(-1)).squeeze(-1)
    out[rows, :rank] = scale * shrunk


def lora_expand(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: torch.Tensor,
    offset: int,
    size: int,
    add_inputs: bool = True,
) -> None:
    """out[t, offset:offset+size] (+)= lora_b[s] @ x[t] for s = token_slots[t] >= 0.

    Rows without an adapter keep their value when adding and become 0 otherwise.
    lora_b: [S, N, R] or [S, 1, N, R]; x: [T, >=R]."""
    b = lora_b.squeeze(1) if lora_b.dim() == 4 else lora_b
    n, rank = b.shape[1], b.shape[2]
    size = min(size, n)  # adapter and model may pad the output differently
    cols = slice(offset, offset + size)
    if not add_inputs:
        out[:, cols] = 0
    rows = _rows_with_adapter(token_slots)
    if rows.numel() == 0:
        return
    blocks = b[token_slots[rows].long(), :size].to(out.dtype)  # [T', size, R]
    delta = torch.bmm(blocks, x[rows, :rank].to(out.dtype).unsqueeze(-1)).squeeze(-1)
    out[rows, cols] += delta
