"""benchmarks.kernels.vllm_align against a brute-force, loop-by-loop definition (CPU)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.kernels.vllm_align import (
    active_lora_ids,
    moe_lora_align_block_size,
    punica_align,
)


def brute_force(
    topk_ids,
    mapping,
    num_experts,
    bs,
    max_loras,
    padded_len,
    m_blocks,
    enabled,
    lora_ids,
    expert_map=None,
):
    """Per LoRA row: buckets of pair indices per expert in expert order, each padded to a
    multiple of bs with the sentinel numel; the block -> expert table; the padded total."""
    numel, top_k = topk_ids.numel(), topk_ids.shape[1]
    rows = {}
    for lora_id in lora_ids[:max_loras].tolist():
        if lora_id == -1 or enabled[lora_id] == 0:
            continue
        buckets = [[] for _ in range(num_experts)]
        for i in range(numel):
            e = int(topk_ids.view(-1)[i])
            if not 0 <= e < num_experts or int(mapping[i // top_k]) != lora_id:
                continue
            if expert_map is not None:
                e = int(expert_map[e])
                if e == -1:
                    continue
            buckets[e].append(i)
        sorted_row, blocks = [], []
        for e, bucket in enumerate(buckets):
            n_blocks = -(-len(bucket) // bs)
            sorted_row += bucket + [numel] * (n_blocks * bs - len(bucket))
            blocks += [e] * n_blocks
        total = len(sorted_row)
        rows[lora_id] = (
            sorted_row + [numel] * (padded_len - total),
            blocks + [-1] * (m_blocks - len(blocks)),
            total,
        )
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_align_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    m = int(torch.randint(1, 40, (1,), generator=g))
    num_experts = [4, 8, 16][seed % 3]
    top_k = [1, 2, 4][seed % 3]
    max_loras = 3 + seed % 2
    bs = [16, 32][seed % 2]
    topk_ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(m)])
    topk_ids = topk_ids.to(torch.int32)
    mapping = torch.randint(-1, max_loras, (m,), generator=g).to(torch.int32)
    enabled = torch.ones(max_loras + 1, dtype=torch.int32)
    enabled[seed % max_loras] = seed % 2  # sometimes a disabled slot
    expert_map = None
    if seed == 5:  # expert parallel: half the experts are remote (-1), the rest renumbered
        expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
        expert_map[::2] = torch.arange(num_experts // 2, dtype=torch.int32)
    ids = active_lora_ids(mapping, max_loras)
    numel = topk_ids.numel()
    padded_len = numel + num_experts * (bs - 1)
    m_blocks = -(-padded_len // bs)
    sorted_ids = torch.full((max_loras * padded_len,), -7, dtype=torch.int32)
    expert_ids = torch.full((max_loras * m_blocks,), -1, dtype=torch.int32)
    ntpp = torch.full((max_loras,), -7, dtype=torch.int32)
    moe_lora_align_block_size(
        topk_ids,
        mapping,
        num_experts,
        bs,
        max_loras,
        padded_len,
        m_blocks,
        sorted_ids,
        expert_ids,
        ntpp,
        enabled,
        ids,
        expert_map,
    )
    # With an expert_map, vLLM passes the GLOBAL expert count (ids are filtered against it,
    # then mapped to local ids); buckets of unmapped ids just stay empty.
    want = brute_force(
        topk_ids,
        mapping,
        num_experts,
        bs,
        max_loras,
        padded_len,
        m_blocks,
        enabled,
        ids,
        expert_map,
    )
    sorted_rows = sorted_ids.view(max_loras, padded_len)
    block_rows = expert_ids.view(max_loras, m_blocks)
    for lora_id in range(max_loras):
        if lora_id not in want:  # untouched
            assert torch.all(sorted_rows[lora_id] == -7) and int(ntpp[lora_id]) == -7
            assert torch.all(block_rows[lora_id] == -1)
            continue
        row, blocks, total = want[lora_id]
        assert int(ntpp[lora_id]) == total
        assert block_rows[lora_id].tolist() == blocks
        # Order inside a bucket is unspecified in vLLM: compare each block as a set.
        got = sorted_rows[lora_id].tolist()
        for b in range(m_blocks):
            assert sorted(got[b * bs : (b + 1) * bs]) == sorted(row[b * bs : (b + 1) * bs])


def test_punica_naive_and_sizes():
    topk_ids = torch.tensor([[0, 3], [2, 1]], dtype=torch.int32)
    mapping = torch.tensor([0, 1], dtype=torch.int32)
    enabled = torch.ones(3, dtype=torch.int32)
    ids = active_lora_ids(mapping, 2)
    assert ids.tolist() == [0, 1, -1]
    s, e, n = punica_align(topk_ids, mapping, 16, 8, 2, enabled, ids, naive_block_assignment=True)
    assert s is None and n is None and e.tolist() == [0, 3, 2, 1]
    s, e, n = punica_align(topk_ids, mapping, 16, 8, 2, enabled, ids, naive_block_assignment=False)
    # numel (4) < num_experts (8): vLLM sizes the padded list numel * block_size.
    assert s.numel() == 2 * 4 * 16 and e.numel() == 2 * 4 and n.tolist() == [32, 32]
    assert s.view(2, -1)[0, :16].tolist() == [0] + [4] * 15
    assert e.view(2, -1)[0].tolist() == [0, 3, -1, -1]
