"""Cases of tests/kernels/test_triton_moe_lora.py: the Triton MoE-LoRA kernels against the
oracle (tests/kernels/oracle.py) on CPU tensors under TRITON_INTERPRET=1 (this file is not
collected by itself).

Every execution path is forced in turn (naive routing: a tile is one pair; grouped routing with
each pair sorter) plus the automatic choice. Shapes are tiny so the interpreter stays fast.
Rows without an adapter must be bit-for-bit equal to the input.
"""

from __future__ import annotations

import os

import pytest
import torch

# Needs TRITON_INTERPRET=1 set when the process started: Triton reads it when it is first
# imported, when @triton.jit decorates and while interpreted kernels run.
# tests/kernels/test_triton_moe_lora.py arranges that.
if os.environ.get("TRITON_INTERPRET") != "1":
    raise ImportError("run with TRITON_INTERPRET=1 (see tests/kernels/test_triton_moe_lora.py)")
try:
    import triton
    import triton.language as tl

    from kernels import triton_moe_lora as tml
    from kernels.triton_plan import LaunchOptions

    @triton.jit
    def _dot_probe(a_ptr, b_ptr, c_ptr):
        o = tl.arange(0, 16)
        a = tl.load(a_ptr + o[:, None] * 16 + o[None, :])
        b = tl.load(b_ptr + o[:, None] * 16 + o[None, :])
        tl.store(c_ptr + o[:, None] * 16 + o[None, :], tl.dot(a, b))

except Exception as exc:  # noqa: BLE001 - any import failure means "cannot test here"
    pytest.skip(f"triton kernels not importable: {exc!r}", allow_module_level=True)

from tests.kernels.cases import check_against_oracle, make_case  # noqa: E402


def _interpreter_dot_ok(dtype) -> bool:
    """The Triton CPU interpreter computes bf16 tl.dot wrongly (fp16 is exact); the tile kernels
    (tl.dot) can only be checked in dtypes where the interpreter itself is right."""
    a, b = torch.randn(16, 16).to(dtype), torch.randn(16, 16).to(dtype)
    c = torch.empty(16, 16)
    _dot_probe[(1,)](a, b, c)
    return bool(torch.allclose(c, a.float() @ b.float(), atol=1e-2, rtol=1e-2))


PATHS = [
    pytest.param(LaunchOptions(mode="naive"), id="tile-naive"),
    pytest.param(LaunchOptions(mode="grouped", sorter="onepass"), id="tile-grouped-onepass"),
    pytest.param(LaunchOptions(mode="grouped", sorter="count"), id="tile-grouped-count"),
    pytest.param(LaunchOptions(), id="auto"),
]


def run(kind, c, options, enabled=None):
    def call(out):
        if kind == "w13":
            tml.add_moe_lora_w13(
                out,
                c["x"],
                c["topk_ids"],
                c["token_slots"],
                c["a13"],
                c["b13"],
                enabled,
                options=options,
            )
        else:
            tml.add_moe_lora_w2(
                out,
                c["h"],
                c["topk_ids"],
                c["topk_weights"],
                c["token_slots"],
                c["a2"],
                c["b2"],
                enabled,
                options=options,
            )

    return call


def check(kind, c, options, dtype, enabled=None):
    return check_against_oracle(kind, c, run(kind, c, options, enabled), dtype, enabled)[0]


# m, hidden, inter, experts, top_k, slots, rank
SHAPES = [
    pytest.param((1, 64, 48, 4, 2, 2, 16), id="M1"),
    pytest.param((5, 96, 40, 8, 2, 3, 8), id="M5-r8-oddK"),
    pytest.param((24, 64, 64, 4, 3, 2, 24), id="M24-r24"),
    pytest.param((3, 200, 72, 4, 2, 2, 32), id="M3-r32-K200"),
    pytest.param((1, 600, 520, 4, 2, 2, 16), id="M1-K600"),
]


@pytest.mark.parametrize("options", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["w13", "w2"])
def test_paths_fp32(kind, shape, options):
    check(kind, make_case(0, *shape, torch.float32), options, torch.float32)


@pytest.mark.parametrize("mode", ["naive", "grouped"])
@pytest.mark.parametrize("shape", SHAPES[2:])  # the shapes where K is split several ways
@pytest.mark.parametrize("kind", ["w13", "w2"])
def test_unrolled_ksplit_sum(kind, shape, mode):
    options = LaunchOptions(mode=mode, unroll_ksplit=True)
    check(kind, make_case(0, *shape, torch.float32), options, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", PATHS[:3])
@pytest.mark.parametrize("kind", ["w13", "w2"])
def test_paths_half(kind, options, dtype):
    if not _interpreter_dot_ok(dtype):
        pytest.skip(f"the Triton interpreter's tl.dot is wrong for {dtype}; checked on the GPU")
    check(kind, make_case(1, 6, 64, 48, 4, 2, 3, 16, dtype), options, dtype)


@pytest.mark.parametrize("sorter", ["onepass", "count"])
@pytest.mark.parametrize("kind", ["w13", "w2"])
def test_large_m_grouped_tiles_span_groups(kind, sorter):
    # 1 slot, 2 experts: groups hold more pairs than one tile (BLOCK_M 16), so a group spans
    # several tiles and the last tile of each group is partial.
    c = make_case(2, 40, 32, 32, 2, 2, 1, 16, torch.float32, no_adapter=0.1)
    check(kind, c, LaunchOptions(mode="grouped", sorter=sorter), torch.float32)


@pytest.mark.parametrize("kind", ["w13", "w2"])
def test_rank_128(kind):
    c = make_case(3, 3, 64, 32, 4, 2, 2, 128, torch.float32, mixed_ranks=False)
    for options in [LaunchOptions(mode="naive"), LaunchOptions(mode="grouped")]:
        check(kind, c, options, torch.float32)


@pytest.mark.parametrize("options", PATHS[:3])
@pytest.mark.parametrize("kind", ["w13", "w2"])
def test_disabled_slots(kind, options):
    c = make_case(4, 12, 32, 32, 4, 2, 4, 8, torch.float32, no_adapter=0.2)
    enabled = torch.tensor([1, 0, 1, 0, 1], dtype=torch.int32)  # S + 1 entries, as vLLM
    check(kind, c, options, torch.float32, enabled)


@pytest.mark.parametrize("options", PATHS[:3])
def test_no_adapter_batch_is_untouched(options):
    c = make_case(5, 8, 32, 32, 4, 2, 2, 16, torch.float32, no_adapter=1.0)
    for kind in ["w13", "w2"]:
        check(kind, c, options, torch.float32)


@pytest.mark.parametrize("options", PATHS[:3])
def test_out_of_range_slot_is_ignored(options):
    # A slot id >= S never indexes past the weights (nor aliases a slot).
    c = make_case(6, 4, 32, 32, 4, 2, 2, 16, torch.float32, no_adapter=0.0)
    c["token_slots"][0] = 7
    check("w2", c, options, torch.float32)


def test_routing_is_reused_by_w2():
    c = make_case(7, 20, 32, 32, 4, 2, 2, 16, torch.float32)
    m, top_k = c["topk_ids"].shape
    routing = tml.add_moe_lora_w13(
        torch.zeros(m, top_k, 64),
        c["x"],
        c["topk_ids"],
        c["token_slots"],
        c["a13"],
        c["b13"],
        options=LaunchOptions(mode="grouped"),
    )
    assert routing.mode == "grouped"

    def w2(out):
        tml.add_moe_lora_w2(
            out,
            c["h"],
            c["topk_ids"],
            c["topk_weights"],
            c["token_slots"],
            c["a2"],
            c["b2"],
            routing=routing,
        )

    check_against_oracle("w2", c, w2, torch.float32)


from kernels.triton_util import _SELF_CLEANING  # noqa: E402


def _check_grouping(c, num_slots, num_experts, sorter):
    r = tml.route_pairs(
        c["topk_ids"],
        c["token_slots"],
        None,
        num_slots,
        num_experts,
        16,
        LaunchOptions(mode="grouped", sorter=sorter),
    )
    top_k = c["topk_ids"].shape[1]
    pair_slot = c["token_slots"].long().repeat_interleave(top_k)
    keys = pair_slot * num_experts + c["topk_ids"].reshape(-1).long()
    active = pair_slot >= 0
    seen = []
    for t in range(int(r.num_tiles)):
        g, row0, cnt = int(r.tile_group[t]), int(r.tile_row0[t]), int(r.tile_cnt[t])
        assert 0 < cnt <= r.block_m
        pairs = r.sorted_pairs[row0 : row0 + cnt].long()
        assert torch.all(keys[pairs] == g)
        seen += pairs.tolist()
    assert sorted(seen) == active.nonzero().squeeze(1).tolist()


@pytest.mark.parametrize(
    "sorter",
    [
        "onepass",
        "count1",
        "count1_cg",
        "count1r",
        "count",
        "countr",
        "count_last",
        "count4",
        "count4r",
    ],
)
def test_pair_sorter_groups_pairs(sorter):
    c = make_case(8, 30, 32, 32, 4, 2, 3, 16, torch.float32)
    _check_grouping(c, 3, 4, sorter)


@pytest.mark.parametrize("sorter", ["count", "countr", "count_last", "count4", "count4r"])
def test_count_sorter_over_several_programs(sorter):
    # 2600 pairs: three counting programs; twice, so the self-cleaning counters are reused.
    for seed in (11, 12):
        c = make_case(seed, 1300, 16, 16, 8, 2, 3, 16, torch.float32, no_adapter=0.2)
        _check_grouping(c, 3, 8, sorter)
    assert all(int(b.abs().sum()) == 0 for b in _SELF_CLEANING.values())


@pytest.mark.parametrize("slices", [1, 3])
def test_w13_other_slice_counts(slices):
    # Non-gated MoE (one w13 slice) and > 2 slices (launched two at a time, then one).
    c = make_case(9, 10, 32, 24, 4, 2, 2, 16, torch.float32)
    g = torch.Generator().manual_seed(10)
    c["a13"] = [torch.randn(2, 4, 16, 32, generator=g) / 6 for _ in range(slices)]
    c["b13"] = [torch.randn(2, 4, 24, 16, generator=g) / 4 for _ in range(slices)]
    for options in PATHS[:3]:
        options = options.values[0]

        def w13(out, options=options):
            tml.add_moe_lora_w13(
                out,
                c["x"],
                c["topk_ids"],
                c["token_slots"],
                c["a13"],
                c["b13"],
                options=options,
            )

        m, top_k = c["topk_ids"].shape
        base = torch.randn(m, top_k, 24 * slices)
        out = base.clone()
        w13(out)
        from tests.kernels import oracle

        want = base.double() + oracle.w13_delta(
            c["x"], c["topk_ids"], c["token_slots"], c["a13"], c["b13"]
        )
        assert (out.double() - want).abs().max() <= 1e-4 * (want - base.double()).abs().max()


@pytest.mark.parametrize("kind", ["w13", "w2"])
def test_bm64_without_prefetch_and_more_splits(kind):
    # Plan variants of large batches: BLOCK_M 64 without the expand prefetch, and more K/N
    # splits; both must stay exact.
    c = make_case(5, 80, 64, 48, 2, 2, 1, 16, torch.float32, no_adapter=0.1)
    for options in (
        LaunchOptions(mode="grouped", block_m=64, prefetch=False),
        LaunchOptions(mode="grouped", block_m=16, waves=8),
        LaunchOptions(mode="grouped", block_m=32, expand={"BLOCK_N": 128}),
    ):
        check(kind, c, options, torch.float32)


# The fused base+LoRA decode prototype (kernels/triton_fused_moe.py): base GEMV, plus the LoRA
# delta in its epilogue from our tile shrink's partials.
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((1, 64, 32, 4, 2, 2, 16), id="M1"),
        pytest.param((5, 96, 64, 8, 2, 3, 8), id="M5-r8"),
        pytest.param((3, 600, 64, 4, 2, 2, 32), id="M3-r32-K600"),
    ],
)
@pytest.mark.parametrize("kind", ["w13", "w2"])
def test_fused_base_lora_prototype(kind, shape):
    from tests.kernels.fused_cases import check_fused

    c = make_case(0, *shape, torch.float32)
    enabled = torch.ones(shape[5] + 1, dtype=torch.int32)
    enabled[1] = 0
    check_fused(kind, c, torch.float32, enabled)


# Round five: the one-launch decode kernel (every column block recomputes its pair's shrink;
# tl.sum, no tl.dot, so bf16 is checked here too), forced on, with the plan's block sizes and
# with small ones (several column blocks and K chunks, a partial last K chunk).
DECODE_CFGS = [
    None,
    dict(BLOCK_N=16, BLOCK_K=64, num_warps=4),
    # A / B loaded before the PDL wait from a speculative route; with SPEC_TEST the guess is
    # always wrong, so the re-load after the wait is what runs
    dict(EARLY_ROUTE=True, BLOCK_N=16),
    dict(EARLY_ROUTE=True, SPEC_TEST=True, BLOCK_N=16),
    # round nine: the split decode kernel (K chunks of 256 A elements over several programs,
    # the last one sums the partials and does the expand), B loaded by all or by the last
    dict(SPLIT_A_ELEMS=256, BLOCK_N=16, BLOCK_K=16),
    dict(SPLIT_A_ELEMS=256, BLOCK_N=16, BLOCK_K=16, B_LATE=True, EARLY_ROUTE=True),
    dict(SPLIT_A_ELEMS=512, BLOCK_N=32, EARLY_ROUTE=True, SPEC_TEST=True),
]
DECODE_IDS = [
    "plan",
    "small-blocks",
    "early-route",
    "early-route-wrong-guess",
    "split",
    "split-b-late-early-route",
    "split-early-route-wrong-guess",
]


@pytest.mark.parametrize("cfg", DECODE_CFGS, ids=DECODE_IDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["w13", "w2"])
def test_decode_one_launch(kind, shape, cfg):
    options = LaunchOptions(decode=True, decode_cfg=cfg)
    check(kind, make_case(0, *shape, torch.float32), options, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["w13", "w2"])
def test_decode_one_launch_half_and_disabled(kind, dtype):
    options = LaunchOptions(decode=True, decode_cfg=DECODE_CFGS[1])
    check(kind, make_case(1, 6, 64, 48, 4, 2, 3, 16, dtype), options, dtype)
    c = make_case(4, 12, 32, 32, 4, 2, 4, 8, torch.float32, no_adapter=0.2)
    c["token_slots"][1] = 9  # out of range: ignored
    enabled = torch.tensor([1, 0, 1, 0, 1], dtype=torch.int32)
    check(kind, c, LaunchOptions(decode=True), torch.float32, enabled)
    for cfg in DECODE_CFGS[2:]:
        check(kind, c, LaunchOptions(decode=True, decode_cfg=cfg), torch.float32, enabled)
