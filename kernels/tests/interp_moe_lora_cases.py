"""Cases of kernels/tests/test_triton_moe_lora.py: Triton MoE-LoRA kernels vs kernels.reference
on CPU tensors under TRITON_INTERPRET=1 (this file is not collected by itself).

Every execution path is forced in turn (one-launch fused decode kernel; two-launch tile path
with naive routing; tile path with the grouped counting sort) plus the automatic choice.
Shapes are tiny so the interpreter stays fast (the whole file runs in well under 2 minutes on
2 cores). Tolerance: max |got - want| / max |want - base| <= 1e-4 for fp32 (the kernels use
IEEE fp32 dots there), 2e-2 for bf16/fp16 (the rank intermediate and the output are rounded to
16 bits at the same points as the reference, but summation order differs).
Rows without an adapter must be bit-for-bit equal to the input (out is added into, so the
input itself is the poison: random values that any stray write would change).
"""

from __future__ import annotations

import os

import pytest
import torch

# Needs TRITON_INTERPRET=1 set when the process started: Triton reads it when it is first
# imported (its own tl.sort / tl.cumsum helpers are decorated then), when @triton.jit decorates
# and while interpreted kernels run. kernels/tests/test_triton_moe_lora.py arranges that.
if os.environ.get("TRITON_INTERPRET") != "1":
    raise ImportError("run with TRITON_INTERPRET=1 (see kernels/tests/test_triton_moe_lora.py)")
try:
    import triton
    import triton.language as tl

    from kernels import triton_moe_lora as tml

    @triton.jit
    def _dot_probe(a_ptr, b_ptr, c_ptr):
        o = tl.arange(0, 16)
        acc = tl.dot(tl.load(a_ptr + o[:, None] * 16 + o[None, :]),
                     tl.load(b_ptr + o[:, None] * 16 + o[None, :]))  # fmt: skip
        tl.store(c_ptr + o[:, None] * 16 + o[None, :], acc)

except Exception as exc:  # noqa: BLE001 - any import failure means "cannot test here"
    pytest.skip(f"triton kernels not importable: {exc!r}", allow_module_level=True)

from kernels import reference



def _interpreter_dot_ok(dtype) -> bool:
    """The Triton 3.9 CPU interpreter computes bf16 tl.dot wrongly (fp16 is exact); the tile
    kernels (tl.dot) can only be checked in dtypes where the interpreter itself is right."""
    a, b = torch.randn(16, 16).to(dtype), torch.randn(16, 16).to(dtype)
    c = torch.empty(16, 16)
    _dot_probe[(1,)](a, b, c)
    return bool(torch.allclose(c, a.float() @ b.float(), atol=1e-2, rtol=1e-2))

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
PATHS = [
    pytest.param(dict(path="fused"), id="fused"),
    pytest.param(dict(path="tile", mode="naive"), id="tile-naive"),
    pytest.param(dict(path="tile", mode="grouped", router="small"), id="tile-grouped-sort"),
    pytest.param(dict(path="tile", mode="grouped", router="count"), id="tile-grouped-count"),
    pytest.param(dict(), id="auto"),
]


def make_case(seed, m, hidden, inter, experts, top_k, slots, rank, dtype, no_adapter=0.3,
              mixed_ranks=True):  # fmt: skip
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    a13 = [randn(slots, experts, rank, hidden, scale=hidden**-0.5) for _ in range(2)]
    b13 = [randn(slots, experts, inter, rank, scale=rank**-0.5) for _ in range(2)]
    a2 = randn(slots, experts, rank, inter, scale=inter**-0.5)
    b2 = randn(slots, experts, hidden, rank, scale=rank**-0.5)
    if mixed_ranks:  # each slot holds an adapter of its own rank; the tail is zero padding
        ranks = torch.randint(1, rank + 1, (slots,), generator=g).tolist()
        for s, r in enumerate(ranks):
            for a, b in [*zip(a13, b13), (a2, b2)]:
                a[s, :, r:] = 0
                b[s, :, :, r:] = 0
    token_slots = torch.randint(0, slots, (m,), generator=g)
    token_slots[torch.rand(m, generator=g) < no_adapter] = -1
    topk_ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(m)])
    return dict(
        x=randn(m, hidden), h=randn(m * top_k, inter), a13=a13, b13=b13, a2=a2, b2=b2,
        token_slots=token_slots.to(torch.int32), topk_ids=topk_ids.to(torch.int32),
        topk_weights=torch.rand(m, top_k, generator=g).to(dtype),
    )  # fmt: skip


def run(kind, c, out, opts, enabled=None):
    opts = dict(opts)
    mode = opts.pop("mode", None)
    router = opts.pop("router", None)
    if mode is not None:
        a = c["a2"] if kind == "w2" else c["a13"][0]
        opts["routing"] = tml.build_routing(c["topk_ids"], c["token_slots"], enabled,
                                            a.shape[0], a.shape[1], mode=mode,
                                            router=router)  # fmt: skip
    if kind == "w13":
        tml.add_moe_lora_w13(out, c["x"], c["topk_ids"], c["token_slots"], c["a13"], c["b13"],
                             enabled, **opts)  # fmt: skip
    else:
        tml.add_moe_lora_w2(out, c["h"], c["topk_ids"], c["topk_weights"], c["token_slots"],
                            c["a2"], c["b2"], enabled, **opts)  # fmt: skip


def want(kind, c, base, enabled=None):
    ref = base.clone()
    if kind == "w13":
        reference.add_moe_lora_w13(ref, c["x"], c["topk_ids"], c["token_slots"], c["a13"],
                                   c["b13"], enabled)  # fmt: skip
    else:
        reference.add_moe_lora_w2(ref, c["h"], c["topk_ids"], c["topk_weights"],
                                  c["token_slots"], c["a2"], c["b2"], enabled)  # fmt: skip
    return ref


def check(kind, c, opts, dtype, enabled=None):
    m, top_k = c["topk_ids"].shape
    cols = 2 * c["b13"][0].shape[2] if kind == "w13" else c["b2"].shape[2]
    base = torch.randn(m, top_k, cols).to(dtype)
    out = base.clone()
    run(kind, c, out, opts, enabled)
    # The reference cannot index a slot >= S; such a token must get nothing, like slot -1.
    num_slots = c["a2"].shape[0]
    ref_case = dict(c, token_slots=torch.where(c["token_slots"] < num_slots, c["token_slots"], -1))
    ref = want(kind, ref_case, base, enabled)
    delta = (ref.double() - base.double()).abs().max().clamp(min=1e-6)
    err = (out.double() - ref.double()).abs().max() / delta
    assert err <= TOL[dtype], f"{kind}: relative error {err:.2e} > {TOL[dtype]:.0e}"
    skipped = ref_case["token_slots"] < 0
    if enabled is not None:
        skipped |= enabled[ref_case["token_slots"].clamp(min=0).long()] == 0
    assert torch.equal(out[skipped], base[skipped]), "a token without adapter was written"
    return out


# m, hidden, inter, experts, top_k, slots, rank
SHAPES = [
    pytest.param((1, 64, 48, 4, 2, 2, 16), id="M1"),
    pytest.param((5, 96, 40, 8, 2, 3, 8), id="M5-r8-oddK"),
    pytest.param((24, 64, 64, 4, 3, 2, 24), id="M24-r24"),
]


@pytest.mark.parametrize("opts", PATHS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["w13", "w2"])
def test_paths_fp32(kind, shape, opts):
    check(kind, make_case(0, *shape, torch.float32), opts, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", PATHS[:4])
@pytest.mark.parametrize("kind", ["w13", "w2"])
def test_paths_half(kind, opts, dtype):
    if opts.get("path") == "tile" and not _interpreter_dot_ok(dtype):
        pytest.skip(f"the Triton interpreter's tl.dot is wrong for {dtype}; checked on GPU "
                    "by kernels/bench.py")  # fmt: skip
    check(kind, make_case(1, 6, 64, 48, 4, 2, 3, 16, dtype), opts, dtype)


@pytest.mark.parametrize("router", ["small", "count"])
@pytest.mark.parametrize("kind", ["w13", "w2"])
def test_large_m_grouped_tiles_span_groups(kind, router):
    # 1 slot, 2 experts: groups hold more pairs than one tile (BLOCK_M 16), so a group spans
    # several tiles and the last tile of each group is partial.
    c = make_case(2, 40, 32, 32, 2, 2, 1, 16, torch.float32, no_adapter=0.1)
    check(kind, c, dict(path="tile", mode="grouped", router=router), torch.float32)


@pytest.mark.parametrize("kind", ["w13", "w2"])
def test_rank_128(kind):
    c = make_case(3, 3, 64, 32, 4, 2, 2, 128, torch.float32, mixed_ranks=False)
    for opts in [dict(path="fused"), dict(path="tile", mode="grouped")]:
        check(kind, c, opts, torch.float32)


@pytest.mark.parametrize("opts", PATHS[:4])
@pytest.mark.parametrize("kind", ["w13", "w2"])
def test_disabled_slots(kind, opts):
    c = make_case(4, 12, 32, 32, 4, 2, 4, 8, torch.float32, no_adapter=0.2)
    enabled = torch.tensor([1, 0, 1, 0, 1], dtype=torch.int32)  # S + 1 entries, as vLLM
    check(kind, c, opts, torch.float32, enabled)


@pytest.mark.parametrize("opts", PATHS[:4])
def test_no_adapter_batch_is_untouched(opts):
    c = make_case(5, 8, 32, 32, 4, 2, 2, 16, torch.float32, no_adapter=1.0)
    for kind in ["w13", "w2"]:
        check(kind, c, opts, torch.float32)


def test_out_of_range_slot_is_ignored():
    # A slot id >= S never indexes past the weights (nor aliases a slot).
    c = make_case(6, 4, 32, 32, 4, 2, 2, 16, torch.float32, no_adapter=0.0)
    c["token_slots"][0] = 7
    for opts in [dict(path="fused"), dict(path="tile", mode="grouped")]:
        out = check("w2", c, opts, torch.float32)
        assert torch.isfinite(out).all()


def test_routing_is_reused_by_w2():
    c = make_case(7, 20, 32, 32, 4, 2, 2, 16, torch.float32)
    m, top_k = c["topk_ids"].shape
    out13 = torch.zeros(m, top_k, 64)
    routing = tml.add_moe_lora_w13(out13, c["x"], c["topk_ids"], c["token_slots"], c["a13"],
                                   c["b13"], path="tile")  # fmt: skip
    base = torch.randn(m, top_k, 32)
    out2 = base.clone()
    tml.add_moe_lora_w2(out2, c["h"], c["topk_ids"], c["topk_weights"], c["token_slots"],
                        c["a2"], c["b2"], routing=routing, path="tile")  # fmt: skip
    ref = want("w2", c, base)
    assert (out2 - ref).abs().max() <= 1e-4 * (ref - base).abs().max()


@pytest.mark.parametrize("router", ["small", "count"])
def test_routing_groups_pairs(router):
    c = make_case(8, 30, 32, 32, 4, 2, 3, 16, torch.float32)
    r = tml.build_routing(c["topk_ids"], c["token_slots"], None, 3, 4, mode="grouped",
                          router=router)  # fmt: skip
    n = int(r.num_tiles)
    keys = (c["token_slots"].long().repeat_interleave(2) * 4 + c["topk_ids"].reshape(-1).long())
    active = c["token_slots"].repeat_interleave(2) >= 0
    seen = []
    for t in range(n):
        g, row0, cnt = int(r.tile_group[t]), int(r.tile_row0[t]), int(r.tile_cnt[t])
        assert 0 < cnt <= r.block_m
        pairs = r.sorted_pairs[row0:row0 + cnt].long()
        assert torch.all(keys[pairs] == g)
        seen += pairs.tolist()
    assert sorted(seen) == active.nonzero().squeeze(1).tolist()


@pytest.mark.parametrize("slices", [1, 3])
def test_w13_other_slice_counts(slices):
    # Non-gated MoE (one w13 slice) and > 2 slices (launched two at a time, then one).
    c = make_case(9, 10, 32, 24, 4, 2, 2, 16, torch.float32)
    g = torch.Generator().manual_seed(10)
    c["a13"] = [torch.randn(2, 4, 16, 32, generator=g) / 6 for _ in range(slices)]
    c["b13"] = [torch.randn(2, 4, 24, 16, generator=g) / 4 for _ in range(slices)]
    for opts in [dict(path="tile", mode="naive"), dict(path="tile", mode="grouped")]:
        base = torch.randn(10, 2, 24 * slices)
        out = base.clone()
        run("w13", c, out, opts)
        ref = base.clone()
        reference.add_moe_lora_w13(ref, c["x"], c["topk_ids"], c["token_slots"], c["a13"],
                                   c["b13"])  # fmt: skip
        assert (out - ref).abs().max() <= 1e-4 * (ref - base).abs().max()


@pytest.mark.parametrize("kind", ["w13", "w2"])
def test_bm64_without_prefetch_and_more_splits(kind):
    # Second-pass plan: BLOCK_M 64 runs the expand without prefetch (rank >= 64, big groups),
    # and grouped batches may use more K/N splits (waves_big); both must stay exact.
    c = make_case(5, 80, 64, 48, 2, 2, 1, 16, torch.float32, no_adapter=0.1)
    a = c["a2"] if kind == "w2" else c["a13"][0]
    saved = tml.TILE_OVERRIDE
    try:
        for bm, ov in ((64, {}), (16, {"waves": 8})):
            tml.TILE_OVERRIDE = ov
            r = tml.build_routing(c["topk_ids"], c["token_slots"], None, a.shape[0], a.shape[1],
                                  mode="grouped", block_m=bm)  # fmt: skip
            check(kind, c, dict(routing=r), torch.float32)
    finally:
        tml.TILE_OVERRIDE = saved


def test_plan_rules_rank_aware():
    cfg = tml._tuned()
    t = cfg["grouped_min_pair_rank"]
    # sparse batches stay naive at small pairs x rank, go grouped once pairs x rank is large
    assert tml.choose_mode(64, 1024, rank=16) == "naive"
    assert tml.choose_mode(t // 64, 1 << 20, rank=64) == "grouped"
    assert tml.choose_mode(t // 64, 1 << 20) == "naive"  # rank unknown: the old rule
    # rank >= 64 with big groups: BLOCK_M 64; few pairs: BLOCK_M 16 even with big groups
    assert tml._grouped_block_m(4096, 32, rank=64) == 64
    assert tml._grouped_block_m(4096, 32, rank=16) == 32
    assert tml._grouped_block_m(1024, 32, rank=16) == 16
