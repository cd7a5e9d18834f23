"""Dense per-token LoRA ops: correct per token, and no delta for tokens without an adapter."""

from __future__ import annotations

import pytest
import torch

from kernels import dense_lora


def _case(seed=0, tokens=10, slots=3, rank=8, k=32, n=24):
    g = torch.Generator().manual_seed(seed)
    lora_a = torch.randn(slots, 1, rank, k, generator=g)  # vLLM's stacked [S, 1, R, K]
    lora_b = torch.randn(slots, 1, n, rank, generator=g)
    x = torch.randn(tokens, k, generator=g)
    token_slots = torch.tensor([0, -1, 2, 1, -1, 2, 2, 0, -1, 1][:tokens])
    return x, lora_a, lora_b, token_slots


def test_shrink_and_expand_match_a_loop():
    x, lora_a, lora_b, token_slots = _case()
    shrunk = torch.full((x.shape[0], 8), 7.0)  # garbage that must be overwritten
    dense_lora.lora_shrink(shrunk, x, lora_a, token_slots, scale=0.5)
    y = torch.randn(x.shape[0], 30)
    y0 = y.clone()
    dense_lora.lora_expand(y, shrunk, lora_b, token_slots, offset=4, size=24)
    for t, s in enumerate(token_slots.tolist()):
        if s < 0:
            assert torch.equal(shrunk[t], torch.zeros(8))
            assert torch.equal(y[t], y0[t])
            continue
        want_shrunk = 0.5 * lora_a[s, 0] @ x[t]
        torch.testing.assert_close(shrunk[t], want_shrunk)
        want = y0[t].clone()
        want[4:28] += lora_b[s, 0] @ want_shrunk
        torch.testing.assert_close(y[t], want)


def test_expand_without_add_inputs_zeroes_rows_without_adapter():
    x, _, lora_b, token_slots = _case()
    y = torch.randn(x.shape[0], 24)
    dense_lora.lora_expand(y, torch.randn(x.shape[0], 8), lora_b, token_slots, 0, 24, False)
    assert y[token_slots < 0].abs().max() == 0


def test_vllm_cpu_op_gives_base_tokens_the_last_slot_and_ours_does_not():
    """Documents the leak our plugin fixes: vLLM 0.32 torch op takes slot -1 as the last slot."""
    bgmv_shrink = pytest.importorskip("vllm.lora.ops.torch_ops").bgmv_shrink

    x, lora_a, _, token_slots = _case()
    theirs = torch.zeros(x.shape[0], 8)
    bgmv_shrink(x, lora_a, theirs, token_slots, 1.0)
    base_rows = token_slots < 0
    leaked = x[base_rows] @ lora_a[-1, 0].t()  # what the last slot's adapter produces
    torch.testing.assert_close(theirs[base_rows], leaked)

    ours = torch.zeros(x.shape[0], 8)
    dense_lora.lora_shrink(ours, x, lora_a, token_slots, 1.0)
    assert ours[base_rows].abs().max() == 0
    torch.testing.assert_close(ours[~base_rows], theirs[~base_rows])
