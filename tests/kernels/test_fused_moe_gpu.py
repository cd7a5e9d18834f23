"""The fused base+LoRA decode prototype (kernels/triton_fused_moe.py) on a CUDA GPU against the
float64 reference, at the real model shapes (bf16, a disabled slot, tokens without adapter).
Skipped without CUDA; its interpreter cases are in tests/kernels/interp_moe_lora_cases.py."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from kernels.model_shapes import MODEL_SHAPES  # noqa: E402
from tests.kernels.cases import make_case  # noqa: E402
from tests.kernels.fused_cases import check_fused  # noqa: E402


@pytest.mark.parametrize("rank", [16, 64])
@pytest.mark.parametrize("m, adapters", [(1, 1), (4, 8), (16, 8)])
@pytest.mark.parametrize("model", ["gpt-oss-20b", "qwen3-30b-a3b"])
@pytest.mark.parametrize("kind", ["w13", "w2"])
def test_fused_matches_reference_at_model_shapes(kind, model, m, adapters, rank):
    s = MODEL_SHAPES[model]
    c = make_case(
        m * 31 + rank,
        m,
        s.hidden,
        s.inter,
        s.experts,
        s.top_k,
        adapters + 1,
        rank,
        torch.bfloat16,
        device="cuda",
        no_adapter=0.25,
    )
    enabled = torch.ones(adapters + 2, dtype=torch.int32, device="cuda")
    enabled[adapters] = 0  # the extra slot is loaded but disabled
    check_fused(kind, c, torch.bfloat16, enabled, seed=m)
