"""PyTorch implementation of vLLM's `moe_lora_align_block_size` (a CUDA op in vllm._moe_C).

Written from the op's documented semantics (vLLM 0.32.0: `ops.moe_lora_align_block_size` as
called by `PunicaWrapperGPU.moe_lora_align_block_size`), not from its code. Used to feed
vLLM's fused MoE-LoRA Triton op on a GPU machine without vLLM (benchmarks/kernels/bench.py) and
in the CUDA contract test. Not a hot path: a host sync or two is fine here.

Semantics, per LoRA row. The CUDA op launches one block pair per entry of lora_ids[:max_loras]
(its grid is max_loras blocks wide, so only those entries are read). For each entry lora_id
that is not -1 and whose adapter_enabled[lora_id] != 0:
  * the (token, k) pairs i of tokens with token_lora_mapping[token] == lora_id whose expert
    e = topk_ids.flat[i] is < num_experts (and, with an expert_map, maps to a local expert
    e' = expert_map[e] != -1, which replaces e) are bucketed by expert;
  * each expert's bucket is padded up to a multiple of block_size; buckets are laid out in
    expert order. sorted_token_ids[lora_id, :] is first filled with numel (the sentinel for
    "no pair"), then bucket e holds its pair indices from offset cumsum[e];
  * expert_ids[lora_id, b] = e for every block b of bucket e, and -1 for every later block up
    to max_num_m_blocks;
  * num_tokens_post_pad[lora_id] = total padded length.
Rows of other slots are left untouched (vLLM allocates them with torch.empty; its kernels
never read them). Order inside a bucket is unspecified in vLLM (atomics); here it is ascending
pair index. Downstream results do not depend on it.
"""

from __future__ import annotations

import torch


def moe_lora_align_block_size(
    topk_ids: torch.Tensor,
    token_lora_mapping: torch.Tensor,
    num_experts: int,
    block_size: int,
    max_loras: int,
    max_num_tokens_padded: int,
    max_num_m_blocks: int,
    sorted_token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens_post_pad: torch.Tensor,
    adapter_enabled: torch.Tensor,
    lora_ids: torch.Tensor,
    expert_map: torch.Tensor | None = None,
) -> None:
    """Same arguments as vllm._custom_ops.moe_lora_align_block_size; fills the outputs in place."""
    numel = topk_ids.numel()
    top_k = topk_ids.shape[1]
    dev = topk_ids.device
    sorted_rows = sorted_token_ids.view(max_loras, max_num_tokens_padded)
    block_rows = expert_ids.view(max_loras, max_num_m_blocks)

    experts = topk_ids.reshape(-1).long()
    valid = (experts >= 0) & (experts < num_experts)
    if expert_map is not None:
        mapped = expert_map.long()[experts.clamp(0, expert_map.numel() - 1)]
        valid &= mapped != -1
        experts = mapped
    pair_lora = token_lora_mapping.long().repeat_interleave(top_k)
    all_pairs = torch.arange(numel, device=dev)

    for lora_id in lora_ids[:max_loras].tolist():
        if lora_id == -1 or int(adapter_enabled[lora_id]) == 0:
            continue
        mask = valid & (pair_lora == lora_id)
        pairs = all_pairs[mask]
        pair_experts = experts[mask]
        order = torch.argsort(pair_experts, stable=True)
        pairs, pair_experts = pairs[order], pair_experts[order]
        counts = torch.zeros(num_experts, dtype=torch.long, device=dev)
        counts.index_add_(0, pair_experts, torch.ones_like(pair_experts))
        padded = (counts + block_size - 1) // block_size * block_size
        starts = torch.cumsum(padded, 0) - padded
        rank_in_bucket = (
            torch.arange(pairs.numel(), device=dev)
            - (torch.cumsum(counts, 0) - counts)[pair_experts]
        )
        row = torch.full((max_num_tokens_padded,), numel, dtype=torch.int32, device=dev)
        row[starts[pair_experts] + rank_in_bucket] = pairs.to(torch.int32)
        sorted_rows[lora_id] = row
        blocks = torch.full((max_num_m_blocks,), -1, dtype=torch.int32, device=dev)
        owner = torch.repeat_interleave(torch.arange(num_experts, device=dev), padded // block_size)
        blocks[: owner.numel()] = owner.to(torch.int32)
        block_rows[lora_id] = blocks
        num_tokens_post_pad[lora_id] = int(padded.sum())


def punica_align(
    topk_ids: torch.Tensor,
    token_lora_mapping: torch.Tensor,
    block_size: int,
    num_experts: int,
    max_loras: int,
    adapter_enabled: torch.Tensor,
    lora_ids: torch.Tensor,
    naive_block_assignment: bool,
):
    """Buffers sized and filled as PunicaWrapperGPU.moe_lora_align_block_size (vLLM 0.32.0,
    no expert_map, pad_sorted_ids=False) does. Returns (sorted_token_ids, expert_ids,
    num_tokens_post_pad) shaped as add_lora_w13 returns them (flat)."""
    if naive_block_assignment:
        return None, topk_ids.reshape(-1), None
    dev = topk_ids.device
    numel = topk_ids.numel()
    max_num_tokens_padded = numel + num_experts * (block_size - 1)
    if numel < num_experts:
        max_num_tokens_padded = numel * block_size
    max_num_m_blocks = -(-max_num_tokens_padded // block_size)
    sorted_ids = torch.empty(max_loras * max_num_tokens_padded, dtype=torch.int32, device=dev)
    expert_ids = torch.full((max_loras * max_num_m_blocks,), -1, dtype=torch.int32, device=dev)
    num_tokens_post_pad = torch.empty(max_loras, dtype=torch.int32, device=dev)
    moe_lora_align_block_size(
        topk_ids,
        token_lora_mapping,
        num_experts,
        block_size,
        max_loras,
        max_num_tokens_padded,
        max_num_m_blocks,
        sorted_ids,
        expert_ids,
        num_tokens_post_pad,
        adapter_enabled,
        lora_ids,
    )
    return sorted_ids, expert_ids, num_tokens_post_pad


def active_lora_ids(token_lora_mapping: torch.Tensor, max_loras: int) -> torch.Tensor:
    """LoRAKernelMeta.active_lora_ids: sorted unique slot ids of the batch (-1 included when a
    token has no adapter), padded with -1 to max_loras + 1 entries."""
    ids = torch.full((max_loras + 1,), -1, dtype=torch.int32, device=token_lora_mapping.device)
    uniq = torch.unique(token_lora_mapping, sorted=True)
    ids[: uniq.numel()] = uniq.to(torch.int32)
    return ids
