"""The MoE-LoRA op's front door (kernels.moe_lora; the torch backend on CPU tensors) against
the oracle (tests/kernels/oracle.py, float64 pair by pair).

Tolerances: fp32 inputs must match to 1e-4 relative to the largest delta; bf16 inputs to 2e-2,
since the op rounds the rank-R intermediate and the output to bf16.
"""

from __future__ import annotations

import pytest
import torch

from kernels.moe_lora import add_moe_lora_w2, add_moe_lora_w13
from tests.kernels import cases, oracle

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def loop_w13(x, topk_ids, token_slots, a13, b13, enabled=None):
    return oracle.w13_delta(x, topk_ids, token_slots, a13, b13, enabled)


def loop_w2(h, topk_ids, topk_weights, token_slots, a2, b2, enabled=None):
    return oracle.w2_delta(h, topk_ids, topk_weights, token_slots, a2, b2, enabled)


def make_case(seed, m, hidden, inter, experts, top_k, slots, rank, dtype, no_adapter_frac=0.3):
    return cases.make_case(
        seed, m, hidden, inter, experts, top_k, slots, rank, dtype, no_adapter=no_adapter_frac
    )


def assert_close(got, want, dtype):
    scale = want.abs().max().clamp(min=1e-6)
    err = (got.double() - want).abs().max() / scale
    assert err <= TOLERANCE[dtype], f"relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


SHAPES = [
    # m, hidden, inter, experts, top_k, slots, rank
    (1, 32, 16, 4, 2, 1, 8),
    (7, 64, 48, 8, 2, 4, 16),
    (33, 48, 32, 16, 4, 8, 8),
    (64, 128, 64, 8, 2, 3, 16),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_w13_matches_loop(shape, dtype, seed):
    m, hidden, inter, experts, top_k, slots, rank = shape
    c = make_case(seed, *shape, dtype)
    base = torch.randn(m, top_k, 2 * inter).to(dtype)
    out = base.clone()
    add_moe_lora_w13(out, c["x"], c["topk_ids"], c["token_slots"], c["a13"], c["b13"])
    want = base.double() + loop_w13(c["x"], c["topk_ids"], c["token_slots"], c["a13"], c["b13"])
    assert_close(out, want, dtype)
    # Tokens without an adapter are bit-for-bit untouched.
    none = c["token_slots"] < 0
    assert torch.equal(out[none], base[none])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_w2_matches_loop(shape, dtype, seed):
    m, hidden, inter, experts, top_k, slots, rank = shape
    c = make_case(seed, *shape, dtype)
    base = torch.randn(m, top_k, hidden).to(dtype)
    out = base.clone()
    args = (c["topk_ids"], c["topk_weights"], c["token_slots"], c["a2"], c["b2"])
    add_moe_lora_w2(out, c["h"], *args)
    assert_close(out, base.double() + loop_w2(c["h"], *args), dtype)
    none = c["token_slots"] < 0
    assert torch.equal(out[none], base[none])


def test_disabled_slots_get_no_delta():
    c = make_case(5, 16, 32, 16, 4, 2, 4, 8, torch.float32, no_adapter_frac=0.0)
    enabled = torch.tensor([1, 0, 1, 0], dtype=torch.int32)
    out = torch.zeros(16, 2, 32)
    add_moe_lora_w13(
        out, c["x"], c["topk_ids"], c["token_slots"], c["a13"], c["b13"], slot_enabled=enabled
    )
    want = loop_w13(c["x"], c["topk_ids"], c["token_slots"], c["a13"], c["b13"], enabled)
    assert_close(out, want, torch.float32)
    assert out[enabled[c["token_slots"]] == 0].abs().max() == 0


def test_all_tokens_without_adapter_is_a_no_op():
    c = make_case(6, 8, 32, 16, 4, 2, 2, 8, torch.float32, no_adapter_frac=1.0)
    out = torch.randn(8, 2, 32)
    before = out.clone()
    add_moe_lora_w13(out, c["x"], c["topk_ids"], c["token_slots"], c["a13"], c["b13"])
    assert torch.equal(out, before)


def test_last_slot_is_not_used_for_tokens_without_adapter():
    """Slot -1 must never alias the last slot (the bug of vLLM's CPU dense ops)."""
    c = make_case(7, 4, 32, 16, 4, 2, 3, 8, torch.float32, no_adapter_frac=0.0)
    c["token_slots"][:] = -1
    out = torch.zeros(4, 2, 32)
    add_moe_lora_w2(
        out, c["h"], c["topk_ids"], c["topk_weights"], c["token_slots"], c["a2"], c["b2"]
    )
    assert out.abs().max() == 0


def test_shape_errors_are_reported():
    c = make_case(8, 4, 32, 16, 4, 2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="out must be"):
        add_moe_lora_w13(
            torch.zeros(4, 2, 31), c["x"], c["topk_ids"], c["token_slots"], c["a13"], c["b13"]
        )
    with pytest.raises(ValueError, match="token_slots"):
        add_moe_lora_w13(
            torch.zeros(4, 2, 32), c["x"], c["topk_ids"], c["token_slots"][:3], c["a13"], c["b13"]
        )
