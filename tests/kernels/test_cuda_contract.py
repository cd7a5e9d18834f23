"""Contract of the CUDA plugin hook: our entry points, given exactly the arguments vLLM 0.32.0
passes at PunicaWrapperGPU.add_lora_w13 / add_lora_w2, produce what vLLM's own op produces.

Needs a CUDA GPU and vLLM's Triton op copied into .vllm_ref/ (python -m
benchmarks.kernels.fetch_vllm_ops); skipped otherwise. vLLM's routing metadata comes from
benchmarks.kernels.vllm_align (its moe_lora_align_block_size semantics), built the way
PunicaWrapperGPU.add_lora_w13 does: naive block assignment when
num_tokens * top_k * 8 <= E * max_loras, else block-aligned sorting with the shrink
BLOCK_SIZE_M; lora_ids = active LoRA ids; num_active_loras = max_loras + 1 (vLLM's default,
specialize_active_lora=False).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / ".vllm_ref"))
try:
    from vllm_ref import fused_moe_lora_op as vllm_op
except Exception as exc:  # noqa: BLE001
    pytest.skip(
        f"vLLM op copy not available ({exc!r}); run python -m benchmarks.kernels.fetch_vllm_ops",
        allow_module_level=True,
    )

from benchmarks.kernels.vllm_align import active_lora_ids, punica_align
from kernels.vllm_plugin import moe_hooks

DEV = "cuda"


def make(seed, m, hidden, inter, experts, top_k, max_loras, rank, dtype):
    g = torch.Generator(device=DEV).manual_seed(seed)

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)

    a13 = tuple(randn(max_loras, experts, rank, hidden, scale=hidden**-0.5) for _ in range(2))
    b13 = tuple(randn(max_loras, experts, inter, rank, scale=rank**-0.5) for _ in range(2))
    a2 = (randn(max_loras, experts, rank, inter, scale=inter**-0.5),)
    b2 = (randn(max_loras, experts, hidden, rank, scale=rank**-0.5),)
    # Mixed ranks: slot s holds an adapter of rank rank >> s, zero-padded (vLLM's layout).
    for s in range(max_loras):
        r = max(1, rank >> s)
        for a in (*a13, *a2):
            a[s, :, r:] = 0
        for b in (*b13, *b2):
            b[s, :, :, r:] = 0
    mapping = torch.randint(-1, max_loras, (m,), generator=g, device=DEV).to(torch.int32)
    mapping[0] = 0  # at least one token with an adapter
    scores = torch.rand(m, experts, generator=g, device=DEV)
    topk_weights, topk_ids = torch.topk(torch.softmax(scores, -1), top_k, dim=-1)
    enabled = torch.ones(max_loras + 1, dtype=torch.int32, device=DEV)
    enabled[max_loras - 1] = 0  # a loaded slot whose adapter has no MoE weights
    return dict(
        x=randn(m, hidden, scale=1.0),
        h=randn(m * top_k, inter, scale=1.0),
        a13=a13,
        b13=b13,
        a2=a2,
        b2=b2,
        mapping=mapping,
        topk_ids=topk_ids.to(torch.int32),
        topk_weights=topk_weights.to(torch.float32),
        enabled=enabled,
    )


def run_vllm_op(c, y13, y2, max_loras, block_m, add_inputs):
    m, top_k = c["topk_ids"].shape
    experts = c["a13"][0].shape[1]
    rank = c["a13"][0].shape[2]
    lora_ids = active_lora_ids(c["mapping"], max_loras)
    naive = m * top_k * 8 <= experts * max_loras
    sorted_ids, expert_ids, ntpp = punica_align(
        c["topk_ids"], c["mapping"], block_m, experts, max_loras, c["enabled"], lora_ids, naive
    )
    if sorted_ids is not None:
        sorted_ids = sorted_ids.view(max_loras, -1)
        expert_ids = expert_ids.view(max_loras, -1)
    num_active = torch.tensor([max_loras + 1], dtype=torch.int32)
    cfg = (block_m, 64, 32, 8, 4, 3, 1)  # shrink = expand config; the fast paths use BLOCK_M
    for y, x, a, b, mul in [
        (y13, c["x"], c["a13"], c["b13"], False),
        (y2, c["h"], c["a2"], c["b2"], True),
    ]:
        vllm_op._fused_moe_lora(
            y,
            x,
            list(a),
            list(b),
            c["topk_weights"],
            sorted_ids,
            expert_ids,
            ntpp,
            c["mapping"],
            rank,
            top_k,
            lora_ids,
            num_active,
            c["enabled"],
            *cfg,
            *cfg,
            mul,
            False,
            0,
            add_inputs,
        )


def ours(c, y13, y2, add_inputs):
    m, top_k = c["topk_ids"].shape
    result = moe_hooks.add_lora_w13(
        y13.view(m * top_k, -1),
        c["x"],
        c["a13"],
        c["b13"],
        c["topk_ids"],
        c["mapping"],
        c["enabled"],
        top_k,
        add_inputs=add_inputs,
    )
    assert len(result) == 4  # what vLLM passes on to add_lora_w2
    moe_hooks.add_lora_w2(
        y2,
        c["h"],
        c["a2"],
        c["b2"],
        c["topk_weights"],
        result,
        c["enabled"],
        m,
        top_k,
        add_inputs=add_inputs,
    )


CASES = [
    # m, hidden, inter, experts, top_k, max_loras, rank, block_m
    (1, 2880, 2880, 32, 4, 4, 16, 16),  # naive, vLLM's small-batch kernel
    (3, 2880, 2880, 32, 4, 4, 64, 16),
    (64, 2048, 768, 128, 8, 4, 16, 16),  # block-aligned sorting, vLLM's one-shot kernel
    (300, 2880, 2880, 32, 4, 3, 64, 64),
    (257, 2048, 768, 128, 8, 8, 128, 32),
]


@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"m{c[0]}-E{c[3]}-r{c[6]}")
def test_hook_matches_vllm_op(case, add_inputs):
    m, hidden, inter, experts, top_k, max_loras, rank, block_m = case
    c = make(sum(case), m, hidden, inter, experts, top_k, max_loras, rank, torch.bfloat16)
    base13 = torch.randn(m, top_k, 2 * inter, device=DEV).to(torch.bfloat16)
    base2 = torch.randn(m, top_k, hidden, device=DEV).to(torch.bfloat16)
    if not add_inputs:  # dual-stream mode: vLLM hands zeroed delta buffers
        base13.zero_()
        base2.zero_()
    want13, want2 = base13.clone(), base2.clone()
    run_vllm_op(c, want13, want2, max_loras, block_m, add_inputs)
    got13, got2 = base13.clone(), base2.clone()
    ours(c, got13, got2, add_inputs)
    torch.cuda.synchronize()
    for got, want, base in [(got13, want13, base13), (got2, want2, base2)]:
        # Both round (out + delta) to bf16 once, from fp32 sums taken in different orders, so
        # an element may land on the neighbouring bf16 value: allow that one rounding (2^-8 of
        # |out|, half a bf16 ulp, x2) on top of 2% of the largest delta. vLLM's w2 routing
        # weights are small (softmax over all experts), so without the ulp term a single
        # rounding flip of a large |out| would read as a large error relative to the delta.
        scale = (want.float() - base.float()).abs().max().clamp(min=1e-3)
        excess = ((got.float() - want.float()).abs() - 2**-7 * want.float().abs()).clamp(min=0)
        err = excess.max() / scale
        assert err < 2e-2, f"max error {err:.2e} of the largest delta (beyond one bf16 rounding)"
        exact = (got == want).float().mean()
        assert exact > 0.5, f"only {exact:.1%} of elements bit-identical to vLLM's"
        # Tokens without an (enabled) adapter: bit-for-bit untouched by both.
        skip = (c["mapping"] < 0) | (c["enabled"][c["mapping"].clamp(min=0).long()] == 0)
        assert torch.equal(got[skip], base[skip])
        assert torch.equal(want[skip], base[skip])
