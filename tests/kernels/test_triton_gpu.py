"""The Triton backend on a CUDA GPU against the oracle, at the real model shapes, every path
forced in turn (naive routing; grouped routing with each pair sorter; the expand's K-split sum
unrolled) plus the automatic plan;
and the op replayed in a CUDA graph. Skipped without CUDA.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from kernels import moe_lora  # noqa: E402
from kernels.model_shapes import MODEL_SHAPES  # noqa: E402
from kernels.triton_plan import LaunchOptions  # noqa: E402
from tests.kernels.cases import check_against_oracle, make_case  # noqa: E402

PATHS = {
    "tile-naive": LaunchOptions(mode="naive"),
    "tile-naive-unrolled-sum": LaunchOptions(mode="naive", unroll_ksplit=True),
    "grouped-unrolled-sum": LaunchOptions(mode="grouped", unroll_ksplit=True),
    "grouped-onepass": LaunchOptions(mode="grouped", sorter="onepass"),
    "grouped-count": LaunchOptions(mode="grouped", sorter="count"),
    "grouped-count1": LaunchOptions(mode="grouped", sorter="count1"),
    "grouped-count1r": LaunchOptions(mode="grouped", sorter="count1r"),
    "grouped-countr": LaunchOptions(mode="grouped", sorter="countr"),
    "grouped-bm32-bn128": LaunchOptions(mode="grouped", block_m=32, expand={"BLOCK_N": 128}),
    "grouped-count4": LaunchOptions(mode="grouped", sorter="count4"),
    # round five: the one-launch decode kernel wherever A fits its rule (any M), with and
    # without the L2 prefetch before the PDL wait
    "decode1": LaunchOptions(decode_max_pairs=1 << 30),
    "decode1-no-l2-prefetch": LaunchOptions(
        decode_max_pairs=1 << 30, decode_cfg={"L2_PREFETCH": False}
    ),
    "decode1-early-route": LaunchOptions(
        decode_max_pairs=1 << 30, decode_cfg={"EARLY_ROUTE": True}
    ),
    # the speculative route always wrong: the re-load after the wait must fix it
    "decode1-early-route-wrong-guess": LaunchOptions(
        decode_max_pairs=1 << 30, decode_cfg={"EARLY_ROUTE": True, "SPEC_TEST": True}
    ),
    # round seven: the expand's N split for 4 waves (naive tiles of decode batches), and the
    # decode kernel in 1024-column blocks (w13's N = 768 in one masked block)
    "tile-naive-expand-4-waves": LaunchOptions(mode="naive", expand_waves=4),
    "decode1-block-n-1024": LaunchOptions(decode_max_pairs=1 << 30, decode_cfg={"BLOCK_N": 1024}),
    # round eight: the last kernel of a projection lets the next launch after its wait; naive
    # shrinks prefetch A into L2 before their wait; the decode kernel's pre-wait loads
    "tile-naive-trigger-shrink-l2-prefetch": LaunchOptions(
        mode="naive", trigger=True, shrink_l2_prefetch=True
    ),
    "decode1-trigger-early-route": LaunchOptions(
        decode_max_pairs=1 << 30, trigger=True, decode_cfg={"EARLY_ROUTE": True}
    ),
    "decode1-trigger-early-route-wrong-guess": LaunchOptions(
        decode_max_pairs=1 << 30,
        trigger=True,
        decode_cfg={"EARLY_ROUTE": True, "SPEC_TEST": True},
    ),
    "decode1-trigger-l2-prefetch": LaunchOptions(
        decode_max_pairs=1 << 30, trigger=True, decode_cfg={"L2_PREFETCH": True}
    ),
    # round nine: the split decode kernel (K chunks of A over several programs, the last one
    # sums the partials and does the expand), every shape and M (the plan's rule is narrower)
    "decode-split": LaunchOptions(decode=True, decode_cfg={"SPLIT_A_ELEMS": 8192}),
    "decode-split-trigger-early-route": LaunchOptions(
        decode=True, trigger=True, decode_cfg={"SPLIT_A_ELEMS": 8192, "EARLY_ROUTE": True}
    ),
    "decode-split-trigger-early-route-wrong-guess": LaunchOptions(
        decode=True,
        trigger=True,
        decode_cfg={"SPLIT_A_ELEMS": 8192, "EARLY_ROUTE": True, "SPEC_TEST": True},
    ),
    "decode-split-b-late": LaunchOptions(
        decode=True, decode_cfg={"SPLIT_A_ELEMS": 4096, "B_LATE": True, "EARLY_ROUTE": True}
    ),
    # round ten: the naive shrink in 2 warps; the decode kernel after a foreign kernel (no PDL
    # on the H200); a call's first kernel launched without the PDL attribute
    "tile-naive-shrink-2-warps": LaunchOptions(mode="naive", shrink={"num_warps": 2}),
    "decode1-after-foreign": LaunchOptions(decode_max_pairs=1 << 30, after_foreign=True),
    "first-nopdl-decode1": LaunchOptions(decode_max_pairs=1 << 30, first_pdl=False),
    "first-nopdl-tile-naive": LaunchOptions(mode="naive", first_pdl=False),
    "first-nopdl-grouped-count1r": LaunchOptions(mode="grouped", sorter="count1r", first_pdl=False),
    "first-nopdl-grouped-countr": LaunchOptions(mode="grouped", sorter="countr", first_pdl=False),
    "auto-after-foreign": LaunchOptions(after_foreign=True),
    "auto": LaunchOptions(),
}
# model, M, adapters, rank: decode sizes, a grouped size, an odd M
CELLS = [
    (model, m, adapters, rank)
    for model in ("gpt-oss-20b", "qwen3-30b-a3b")
    for m, adapters in ((1, 1), (3, 4), (16, 8), (64, 32), (300, 4))
    for rank in (16, 64)
]


def _case(model, m, adapters, rank, seed):
    s = MODEL_SHAPES[model]
    return make_case(
        seed,
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


def _runner(kind, c, options, enabled):
    def run(out):
        if kind == "w13":
            moe_lora.add_moe_lora_w13(
                out,
                c["x"],
                c["topk_ids"],
                c["token_slots"],
                c["a13"],
                c["b13"],
                slot_enabled=enabled,
                backend="triton",
                options=options,
            )
        else:
            moe_lora.add_moe_lora_w2(
                out,
                c["h"],
                c["topk_ids"],
                c["topk_weights"],
                c["token_slots"],
                c["a2"],
                c["b2"],
                slot_enabled=enabled,
                backend="triton",
                options=options,
            )
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"{c[0]}-M{c[1]}-a{c[2]}-r{c[3]}")
@pytest.mark.parametrize("path", list(PATHS))
def test_paths_match_oracle_at_model_shapes(cell, path):
    model, m, adapters, rank = cell
    c = _case(model, m, adapters, rank, seed=hash(cell) % 1000)
    enabled = torch.ones(adapters + 2, dtype=torch.int32, device="cuda")
    enabled[adapters] = 0  # the extra slot is loaded but disabled
    for kind in ("w13", "w2"):
        check_against_oracle(
            kind, c, _runner(kind, c, PATHS[path], enabled), torch.bfloat16, enabled
        )


@pytest.mark.parametrize(
    "mode", ["naive", "grouped", "decode", "decode-early-route", "decode-split", "decode-split-b"]
)
def test_replays_in_a_cuda_graph(mode):
    c = _case("gpt-oss-20b", 4, 2, 16, seed=5)
    options = LaunchOptions(mode=mode)
    if mode.startswith("decode"):
        options = LaunchOptions(decode=True, decode_cfg={"EARLY_ROUTE": mode != "decode"})
    if mode.startswith("decode-split"):  # round nine: the counters must come back to zero
        cfg = {"SPLIT_A_ELEMS": 4096, "EARLY_ROUTE": True, "B_LATE": mode == "decode-split-b"}
        options = LaunchOptions(decode=True, trigger=True, decode_cfg=cfg)
    m, top_k = c["topk_ids"].shape
    base = torch.randn(m, top_k, 2 * c["b13"][0].shape[2], device="cuda").to(torch.bfloat16)
    out = base.clone()
    run = _runner("w13", c, options, None)
    run(out)  # warm-up: compiles
    want = out.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        moe_lora.add_moe_lora_w13(
            out, c["x"], c["topk_ids"], c["token_slots"], c["a13"], c["b13"], options=options
        )
    for _ in range(5):
        out.copy_(base)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)


def test_decode_kernel_compiles_once_across_batch_sizes():
    # No recompilation across M (CUDA graphs are captured per batch size; a compile per M
    # would stall the first step of each): M is never specialised, so a new binary appears
    # only where the plan's rule changes a block size (round seven: the column block widens
    # from decode_wide_n_min_pairs pairs on), at most one per projection shape and width.
    from kernels import triton_moe_lora as tml
    from kernels.triton_plan import decode_config, plan_config
    from kernels.triton_util import device_name

    caches = getattr(tml._decode_kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton has no JITFunction.device_caches")
    options = LaunchOptions(decode=True)
    cfg = plan_config(device_name(0))

    def n_compiled():
        return sum(len(v[0]) for v in caches.values())

    def blocks(m):  # the decode kernel's block sizes at M (w13: K 2048, N 768; w2: 768, 2048)
        return tuple(
            tuple(sorted(decode_config(cfg, 16, k, n, m * 8).items()))
            for k, n in ((2048, 768), (768, 2048))
        )

    counts = []
    for m in range(1, 13):
        c = _case("qwen3-30b-a3b", m, 2, 16, seed=m)
        for kind in ("w13", "w2"):
            out = torch.zeros(m, 8, 2 * 768 if kind == "w13" else 2048, device="cuda").to(
                torch.bfloat16
            )
            _runner(kind, c, options, None)(out)
        counts.append(n_compiled())
    for m in range(2, 13):
        if blocks(m) == blocks(m - 1):
            assert counts[m - 1] == counts[m - 2], (m, counts)
    assert counts[-1] - counts[0] <= 2 * (len(set(map(blocks, range(1, 13)))) - 1), counts


CHAIN_OPTIONS = {
    "trigger-naive": LaunchOptions(mode="naive", trigger=True, shrink_l2_prefetch=True),
    "trigger-decode-early-route": LaunchOptions(
        decode=True, trigger=True, decode_cfg={"EARLY_ROUTE": True}
    ),
    "trigger-decode-l2-prefetch": LaunchOptions(
        decode=True, trigger=True, decode_cfg={"L2_PREFETCH": True}
    ),
    "trigger-split-decode-early-route": LaunchOptions(
        decode=True, trigger=True, decode_cfg={"SPLIT_A_ELEMS": 8192, "EARLY_ROUTE": True}
    ),
    # round ten: the plugin's calls (after_foreign) and first kernels without the PDL attribute
    "after-foreign-decode-early-route": LaunchOptions(
        decode=True, after_foreign=True, decode_cfg={"EARLY_ROUTE": True}
    ),
    "first-nopdl-naive": LaunchOptions(mode="naive", first_pdl=False),
    "auto-after-foreign": LaunchOptions(after_foreign=True),
    "auto": LaunchOptions(),
}


def test_plugin_calls_say_after_foreign_on_cuda():
    from kernels.vllm_plugin import moe_hooks

    assert moe_hooks._after_vllm(torch.zeros(1, device="cuda")).after_foreign
    assert moe_hooks._after_vllm(torch.zeros(1)) is None


@pytest.mark.parametrize("model", ["gpt-oss-20b", "qwen3-30b-a3b"])
@pytest.mark.parametrize("name", list(CHAIN_OPTIONS))
def test_chained_layers_in_a_cuda_graph(model, name):
    # Round eight: with the trigger, a kernel starts (and loads its weights and route) while
    # the previous one still runs. Several layers' w13 then w2 in one graph, each w2 reading
    # the h that the previous layer's w13 output feeds (a copy in between, like the base's
    # activation), every output checked bit for bit against the same chain run eagerly
    # without PDL (the trigger and the prefetches need PDL; the arithmetic is the same).
    options = CHAIN_OPTIONS[name]
    layers = [_case(model, m, 3, 16, seed=40 + i) for i, m in enumerate((1, 2, 4))]
    m_all = [c["topk_ids"].shape[0] for c in layers]

    def chain(opts, outs):
        for c, (o13, o2) in zip(layers, outs, strict=True):
            moe_lora.add_moe_lora_w13(
                o13, c["x"], c["topk_ids"], c["token_slots"], c["a13"], c["b13"],
                backend="triton", options=opts,
            )  # fmt: skip
            inter = c["h"].shape[1]
            c["h"].copy_(o13.reshape(-1, o13.shape[-1])[:, :inter])
            moe_lora.add_moe_lora_w2(
                o2, c["h"], c["topk_ids"], c["topk_weights"], c["token_slots"], c["a2"],
                c["b2"], backend="triton", options=opts,
            )  # fmt: skip

    def fresh():
        g = torch.Generator(device="cuda").manual_seed(9)
        outs = []
        for c, m in zip(layers, m_all, strict=True):
            k = c["topk_ids"].shape[1]
            n13 = 2 * c["b13"][0].shape[2]
            n2 = c["b2"].shape[2]
            outs.append(
                (
                    torch.randn(m, k, n13, device="cuda", generator=g).to(torch.bfloat16),
                    torch.randn(m, k, n2, device="cuda", generator=g).to(torch.bfloat16),
                )
            )
        return outs

    h0 = [c["h"].clone() for c in layers]
    want = fresh()
    chain(dataclasses.replace(options, pdl=False), want)  # same arithmetic, no PDL
    torch.cuda.synchronize()
    for c, h in zip(layers, h0, strict=True):
        c["h"].copy_(h)
    outs = fresh()
    chain(options, outs)  # warm-up: compiles
    torch.cuda.synchronize()
    init = fresh()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        chain(options, outs)
    for _ in range(3):
        for c, h in zip(layers, h0, strict=True):
            c["h"].copy_(h)
        for (o13, o2), (i13, i2) in zip(outs, init, strict=True):
            o13.copy_(i13)
            o2.copy_(i2)
        g.replay()
        torch.cuda.synchronize()
        for (o13, o2), (w13, w2) in zip(outs, want, strict=True):
            assert torch.equal(o13, w13)
            assert torch.equal(o2, w2)
