"""The Triton MoE-LoRA op against vLLM 0.32.0's fused_moe_lora on one GPU, two ways.

Run on the GPU machine from the repository root, after
`python -m benchmarks.kernels.fetch_vllm_ops` here (it copies vLLM's Triton ops into the
ignored .vllm_ref/, carried along):

    python -m benchmarks.kernels.bench --check --single --layer --out DIR
    python -m benchmarks.kernels.lora_tax --out DIR     # the whole MoE layer (base + LoRA)

  --check   correctness at the real model shapes: fresh random inputs (25% tokens without
            adapter, mixed adapter ranks zero-padded in the slots, one disabled slot), our op
            (every path) and vLLM's op against the torch backend (fp32 math on the GPU). Bound
            per projection: max|got - ref| <= 2e-2 * max|ref - base| and
            ||got - ref|| <= 1e-2 * ||ref - base||; rows without an enabled adapter bit-for-bit
            unchanged. (The oracle tests are tests/kernels/test_triton_gpu.py.)
  --layer   the cold-L2 layer-stack method: one "layer call" = w13 delta + w2 delta of one MoE
            layer (our routing built in w13, reused by w2, as the vLLM plugin does); L layer
            calls with their own weights and routing in one CUDA graph, L such that one replay
            touches >= 3x the L2; median replay / L.
  --single  the single-call method: ONE projection call repeated in a CUDA graph, weights hot
            in L2, our routing built in every call, w13 and w2 timed separately.
  vLLM's align metadata (moe_lora_align_block_size, a CUDA op not available there) is built
  OUTSIDE the timed region in both methods: this favours vLLM.
  Bytes (HBM floor, layer method): distinct (slot, expert) A/B blocks touched (bf16) + x and h
  rows read + w13/w2 output rows read and written, for pairs with an adapter.
  % of floor = (bytes / measured device-to-device copy bandwidth) / our time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.kernels import vllm_ops
from benchmarks.kernels.inputs import (
    DEV,
    DTYPE,
    MODELS,
    bytes_moved,
    layer_view,
    make_routing,
    make_weights,
)
from benchmarks.kernels.timing import graph_time, measure_peak_bw
from kernels import torch_moe_lora
from kernels import triton_moe_lora as ours
from kernels.triton_plan import (
    LaunchOptions,
    grouped_block_m,
    naive_shrink_warps,
    plan_config,
    plan_name,
    projection_path,
    use_decode,
)
from kernels.triton_util import device_name

GRID_M = [1, 4, 16, 64, 256, 1024, 4096]
GRID_ADAPTERS = [1, 4, 8, 32]
GRID_RANKS = [16, 64]
WEIGHT_POOL_BYTES = 48e9  # per (model, adapters, rank) group: weights of all rotated layers
MAX_LAYERS = 64


def log(*a):
    print(*a, flush=True)


def rel_errors(got, want, base):
    d_ref = want.float() - base.float()
    d = got.float() - want.float()
    scale = d_ref.abs().max().clamp(min=1e-6)
    return float(d.abs().max() / scale), float(d.norm() / d_ref.norm().clamp(min=1e-6))


def options_of(opts: dict) -> LaunchOptions:
    """LaunchOptions of a variant; its "cfg" (plan keys) overrides the plan for the call."""
    PLAN_OVERRIDE.clear()
    PLAN_OVERRIDE.update(opts.get("cfg", {}))
    return LaunchOptions(**{k: v for k, v in opts.items() if k not in ("path", "cfg")})


def run_ours(opts, o13, o2, x, hh, topk_ids, slots, topk_w, w, enabled, num_slots, experts):
    """One layer call of our op (w13, then w2 reusing w13's routing) under a variant given as
    LaunchOptions fields (mode, sorter, block_m, pdl, prefetch, waves, ...)."""
    options = options_of(opts)
    r = ours.add_moe_lora_w13(o13, x, topk_ids, slots, w["a13"], w["b13"], enabled, options=options)
    ours.add_moe_lora_w2(
        o2, hh, topk_ids, topk_w, slots, w["a2"], w["b2"], enabled, routing=r, options=options
    )


def check_case(vllm, model, rank, m, n_act, gen, variants):
    spec = MODELS[model]
    k, h, i = spec["top_k"], spec["hidden"], spec["inter"]
    max_loras = n_act + 1  # one extra, disabled slot
    topk_ids, slots, topk_w = make_routing(m, model, n_act, False, gen, no_adapter=0.25)
    w = make_weights(model, max_loras, rank, 1, gen, mixed_ranks=True)
    enabled = torch.ones(max_loras + 1, dtype=torch.int32, device=DEV)
    enabled[n_act] = 0
    if m > 2:  # some tokens on the disabled slot
        slots[: m // 8] = n_act
    x = torch.randn(m, h, device=DEV, generator=gen).to(DTYPE)
    hh = torch.randn(m * k, i, device=DEV, generator=gen).to(DTYPE)
    base13 = torch.randn(m, k, 2 * i, device=DEV, generator=gen).to(DTYPE)
    base2 = torch.randn(m, k, h, device=DEV, generator=gen).to(DTYPE)
    ref13, ref2 = base13.clone(), base2.clone()
    torch_moe_lora.add_moe_lora_w13(ref13, x, topk_ids, slots, w["a13"], w["b13"], enabled)
    torch_moe_lora.add_moe_lora_w2(ref2, hh, topk_ids, topk_w, slots, w["a2"], w["b2"], enabled)
    skip = (slots < 0) | (enabled[slots.clamp(min=0).long()] == 0)
    rows = []
    impls = dict(variants)
    if vllm is not None:
        impls["vllm"] = None
    for name, opts in impls.items():
        o13, o2 = base13.clone(), base2.clone()
        if name == "vllm":
            meta = vllm.prepare(model, spec["experts"], rank, topk_ids, slots, enabled, max_loras)
            vllm.w13(o13, x, w["a13"], w["b13"], topk_w, meta)
            vllm.w2(o2, hh, w["a2"], w["b2"], topk_w, meta)
        else:
            run_ours(
                opts,
                o13,
                o2,
                x,
                hh,
                topk_ids,
                slots,
                topk_w,
                w,
                enabled,
                max_loras,
                spec["experts"],
            )
        torch.cuda.synchronize()
        e13 = rel_errors(o13, ref13, base13)
        e2 = rel_errors(o2, ref2, base2)
        untouched = bool(
            torch.equal(o13[skip], base13[skip]) and torch.equal(o2[skip], base2[skip])
        )
        finite = bool(torch.isfinite(o13).all() and torch.isfinite(o2).all())
        ok = untouched and finite and max(e13[0], e2[0]) <= 2e-2 and max(e13[1], e2[1]) <= 1e-2
        rows.append(
            dict(
                model=model,
                rank=rank,
                M=m,
                adapters=n_act,
                impl=name,
                ok=ok,
                w13_max=e13[0],
                w13_fro=e13[1],
                w2_max=e2[0],
                w2_fro=e2[1],
                untouched=untouched,
            )
        )
    return rows


CHECK_VARIANTS = {
    "auto": {},
    "tile-naive": dict(mode="naive"),
    "grouped-onepass": dict(mode="grouped", sorter="onepass"),
    "grouped-count": dict(mode="grouped", sorter="count"),
    "grouped-count1": dict(mode="grouped", sorter="count1"),
    "grouped-count1r": dict(mode="grouped", sorter="count1r"),
    "grouped-countr": dict(mode="grouped", sorter="countr"),
    "grouped-count4": dict(mode="grouped", sorter="count4"),
    "nopf-nopdl": dict(prefetch=False, pdl=False),
    # round five: the one-launch decode kernel wherever A fits its rule, any batch size
    "decode1": dict(decode_max_pairs=1 << 30),
    "decode1-nopf-nopdl": dict(decode_max_pairs=1 << 30, pdl=False),
}


def run_correctness(vllm, gen):
    cases = [(1, 1), (16, 8), (64, 32), (256, 8), (1024, 32)]
    rows = []
    for model in MODELS:
        for rank in GRID_RANKS:
            for m, n_act in cases:
                names = (
                    CHECK_VARIANTS
                    if m <= 64
                    else (
                        "auto",
                        "grouped-onepass",
                        "grouped-count1r",
                        "grouped-countr",
                        "grouped-count4",
                    )
                )
                v = {n: CHECK_VARIANTS[n] for n in names}
                rows += check_case(vllm, model, rank, m, n_act, gen, v)
    bad = [r for r in rows if not r["ok"]]
    worst = max(rows, key=lambda r: max(r["w13_max"], r["w2_max"]))
    log(
        f"correctness: {len(rows) - len(bad)}/{len(rows)} ok; worst max-rel "
        f"{max(worst['w13_max'], worst['w2_max']):.2e} ({worst['impl']} {worst['model']} "
        f"r{worst['rank']} M{worst['M']})"
    )
    for r in bad:
        log("  FAIL", r)
    return rows


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


class Group:
    """Weights of one (model, adapters, rank) group, shared by its M cells."""

    def __init__(self, model, n_act, rank, gen):
        s = MODELS[model]
        per_layer = n_act * s["experts"] * 2 * 3 * rank * (s["hidden"] + s["inter"])
        self.layers = max(1, min(MAX_LAYERS, int(WEIGHT_POOL_BYTES // per_layer)))
        self.model, self.n_act, self.rank = model, n_act, rank
        self.w = make_weights(model, n_act, rank, self.layers, gen)
        self.per_layer = per_layer


def time_cell(vllm, grp, m, skew, gen, l2_bytes, variants, peak):
    model, n_act, rank = grp.model, grp.n_act, grp.rank
    spec = MODELS[model]
    k, h, i = spec["top_k"], spec["hidden"], spec["inter"]
    # Layers so that one replay touches >= 3x L2 (estimate from layer 0's routing).
    r0 = make_routing(m, model, n_act, skew, gen)
    b0, _ = bytes_moved(model, rank, r0[0], r0[1])
    layers = max(1, min(grp.layers, math.ceil(3 * l2_bytes / b0)))
    routes = [r0] + [make_routing(m, model, n_act, skew, gen) for _ in range(layers - 1)]
    xs = torch.randn(layers, m, h, device=DEV, generator=gen).to(DTYPE)
    hs = torch.randn(layers, m * k, i, device=DEV, generator=gen).to(DTYPE)
    o13 = torch.randn(layers, m, k, 2 * i, device=DEV, generator=gen).to(DTYPE)
    o2 = torch.randn(layers, m, k, h, device=DEV, generator=gen).to(DTYPE)
    enabled = torch.ones(n_act + 1, dtype=torch.int32, device=DEV)
    views = [layer_view(grp.w, layer, n_act) for layer in range(layers)]
    total_bytes, distinct = 0, 0
    for t, s, _ in routes:
        b, d = bytes_moved(model, rank, t, s)
        total_bytes += b
        distinct += d
    bytes_per_call = total_bytes / layers
    res = dict(
        model=model,
        rank=rank,
        adapters=n_act,
        M=m,
        routing="skewed" if skew else "uniform",
        layers=layers,
        bytes=bytes_per_call,
        distinct_blocks=distinct / layers,
    )

    for name, opts in variants.items():

        def call(layer, opts=opts):
            t, s, w_ = routes[layer]
            run_ours(
                opts,
                o13[layer],
                o2[layer],
                xs[layer],
                hs[layer],
                t,
                s,
                w_,
                views[layer],
                enabled,
                n_act,
                spec["experts"],
            )

        res[f"ours_{name}_us"], _ = graph_time(call, layers)

    if vllm is not None:
        metas = [
            vllm.prepare(model, spec["experts"], rank, t, s, enabled, n_act) for t, s, _ in routes
        ]
        res["vllm_path"] = metas[0]["path"]

        def vcall(layer):
            t, s, w_ = routes[layer]
            v = views[layer]
            vllm.w13(o13[layer], xs[layer], v["a13"], v["b13"], w_, metas[layer])
            vllm.w2(o2[layer], hs[layer], v["a2"], v["b2"], w_, metas[layer])

        res["vllm_us"], _ = graph_time(vcall, layers)
    best = min((n for n in variants), key=lambda n: res[f"ours_{n}_us"])
    res["ours_us"] = res["ours_auto_us"] if "auto" in variants else res[f"ours_{best}_us"]
    res["best_variant"] = best
    res["gbps"] = bytes_per_call / (res["ours_us"] * 1e-6) / 1e9
    res["floor_pct"] = 100 * res["gbps"] / peak
    if vllm is not None:
        res["speedup"] = res["vllm_us"] / res["ours_us"]
    return res


def forced(r):
    """The forced variants of a row, e.g. "fused 4.1 / split 6.0"."""
    names = [k[5:-3] for k in r if k.startswith("ours_") and k.endswith("_us")]
    return " / ".join(f"{n} {r[f'ours_{n}_us']:.1f}" for n in names if n not in ("auto", ""))


def fmt_table(rows):
    hdr = (
        "| model | r | adapters | M | routing | ours µs | vLLM µs | speedup | GB/s | % floor |"
        " our path | vLLM path | forced variants µs |"
    )
    out = [hdr, "|" + "---|" * 13]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['rank']} | {r['adapters']} | {r['M']} | {r['routing']} | "
            f"{r['ours_us']:.1f} | {r.get('vllm_us', float('nan')):.1f} | "
            f"{r.get('speedup', float('nan')):.2f} | {r['gbps']:.0f} | {r['floor_pct']:.0f} | "
            f"{r.get('our_path', '')} | {r.get('vllm_path', '')} | {forced(r)} |"
        )
    return "\n".join(out)


def summarize(rows):
    uni = [r for r in rows if r["routing"] == "uniform" and "speedup" in r]
    if not uni:
        return {}
    sp = [r["speedup"] for r in uni]
    dec = [r["speedup"] for r in uni if r["M"] <= 16]
    big = [r["floor_pct"] for r in uni if r["M"] >= 256]
    worst = min(uni, key=lambda r: r["speedup"])
    return dict(
        cells=len(uni),
        median_speedup=statistics.median(sp),
        min_speedup=min(sp),
        geomean_speedup=math.exp(statistics.mean(math.log(x) for x in sp)),
        decode_median=statistics.median(dec) if dec else None,
        floor_pct_m256_median=statistics.median(big) if big else None,
        floor_pct_m256_min=min(big) if big else None,
        slower_cells=sum(x < 1 for x in sp),
        m1_layer_us=sorted(round(r["ours_us"], 1) for r in uni if r["M"] == 1),
        worst=f"{worst['model']} r{worst['rank']} a{worst['adapters']} M{worst['M']}: "
        f"{worst['speedup']:.2f}x",
    )


TUNE_VARIANTS = {
    "auto": {},
    "naive": dict(mode="naive"),
    "grouped": dict(mode="grouped"),
    "nopf": dict(prefetch=False),
    "nopdl": dict(pdl=False),
}


def tune_variants(model, rank, n_act, m):
    """Variants timed per cell in --tune: the routing modes where both are plausible (small
    batches), the BLOCK_M neighbours of the default where groups are large, and the two
    switches everywhere."""
    v = {n: TUNE_VARIANTS[n] for n in ("auto", "nopf", "nopdl")}
    spec = MODELS[model]
    p = m * spec["top_k"]
    if m <= 64:
        v["naive"] = TUNE_VARIANTS["naive"]
        v["grouped"] = TUNE_VARIANTS["grouped"]
    else:
        bm = grouped_block_m(_cfg(), p, n_act * spec["experts"], rank)
        for alt in (bm // 2, bm * 2):
            if 16 <= alt <= 64:
                v[f"bm{alt}"] = dict(mode="grouped", block_m=alt)
    return v


# --probe: the cells below 50% of the floor at M >= 256 (first H200 pass), their neighbours,
# the cells of the rank-aware routing rule, and two decode cells as a regression check.
PROBE_CELLS = [
    ("gpt-oss-20b", 16, 1, 1),
    ("gpt-oss-20b", 16, 1, 256),
    ("gpt-oss-20b", 16, 1, 1024),
    ("gpt-oss-20b", 16, 1, 4096),
    ("gpt-oss-20b", 16, 4, 256),
    ("gpt-oss-20b", 16, 4, 1024),
    ("gpt-oss-20b", 16, 8, 256),
    ("gpt-oss-20b", 16, 32, 256),
    ("gpt-oss-20b", 64, 1, 256),
    ("gpt-oss-20b", 64, 1, 1024),
    ("gpt-oss-20b", 64, 1, 4096),
    ("gpt-oss-20b", 64, 4, 16),
    ("gpt-oss-20b", 64, 4, 1024),
    ("gpt-oss-20b", 64, 8, 64),
    ("gpt-oss-20b", 64, 32, 256),
    ("qwen3-30b-a3b", 16, 1, 256),
    ("qwen3-30b-a3b", 16, 1, 1024),
    ("qwen3-30b-a3b", 16, 4, 256),
    ("qwen3-30b-a3b", 16, 8, 1024),
    ("qwen3-30b-a3b", 16, 32, 256),
    ("qwen3-30b-a3b", 64, 1, 256),
    ("qwen3-30b-a3b", 64, 1, 1024),
    ("qwen3-30b-a3b", 64, 1, 4096),
    ("qwen3-30b-a3b", 64, 4, 16),
    ("qwen3-30b-a3b", 64, 4, 64),
    ("qwen3-30b-a3b", 64, 32, 256),
]


def probe_variants(model, rank, n_act, m):
    v = {"auto": {}}
    if m <= 64 or n_act == 32:
        v["naive"] = dict(mode="naive")
        v["grouped"] = dict(mode="grouped")
    if m >= 256:
        for bm in (16, 32, 64):
            v[f"bm{bm}"] = dict(mode="grouped", block_m=bm)
        v["bm32nopf"] = dict(mode="grouped", block_m=32, prefetch=False)
        v["bm64nopf"] = dict(mode="grouped", block_m=64, prefetch=False)
        v["w4"] = dict(mode="grouped", waves=4)
        v["w4bm16"] = dict(mode="grouped", block_m=16, waves=4)
        v["xw"] = dict(mode="grouped", block_m=32, expand=dict(BLOCK_N=128, num_warps=8))
        if m * MODELS[model]["top_k"] <= 2048:
            v["count"] = dict(mode="grouped", sorter="count")
    return v


def _cfg():
    return plan_config(device_name(0))


def our_path_name(model, rank, m, n_act):
    """What the automatic plan picks (for the table): "w13 path / w2 path" where they differ
    (round five: the one-launch decode kernel is chosen per projection, by K)."""
    spec = MODELS[model]
    p = m * spec["top_k"]
    paths = [
        projection_path(_cfg(), p, n_act, spec["experts"], rank, k_dim)
        for k_dim in (spec["hidden"], spec["inter"])
    ]
    if paths[0] == paths[1]:
        return paths[0]
    return f"{paths[0]} / {paths[1]}"


def decode_variants(model, rank, n_act, m):
    """Round five: beside the plan, the other side of the decode rule for small batches: the
    tile path forced where the plan takes the one-launch decode kernel ("tiles"), the decode
    kernel (where A fits) where the plan does not ("decode1")."""
    spec = MODELS[model]
    p = m * spec["top_k"]
    if m > 64:
        return {}
    fits = [
        use_decode(_cfg(), 1, rank, k, max_pairs=1 << 30) for k in (spec["hidden"], spec["inter"])
    ]
    if not any(fits):
        return {}
    groups = n_act * spec["experts"]
    auto = [
        use_decode(_cfg(), p, rank, k, num_groups=groups) for k in (spec["hidden"], spec["inter"])
    ]
    if any(auto):
        return {
            "tiles": dict(decode=False),
            "decode1_l2pf": dict(decode_cfg={"L2_PREFETCH": True}),
        }
    return {"decode1": dict(decode_max_pairs=1 << 30)}


# Round eight: round seven's plan, forced beside the plan by overriding the plan keys this
# round added (host-side decisions happen when a call is captured, so per variant).
R7_PLAN_KEYS = dict(
    decode_trigger_max_pairs=0,
    decode_early_route_max_pairs=0,
    decode_l2_prefetch_max_pairs=0,
    decode_small_max_pairs=0,
    tail_trigger_max_pairs=0,
    shrink_l2_prefetch_max_pairs=0,
)
# Round nine: round eight's plan (the one-program counting sort from 513 pairs off).
R8_PLAN_KEYS = dict(count1_early_min_pairs=1 << 30)
# Round ten: round nine's plan (the naive shrink's 2 warps off; the decode kernel's PDL rule
# after a foreign kernel touches only calls that say so: lora_tax, the vLLM plugin).
R9_PLAN_KEYS = dict(naive_shrink_warps_max_pairs=0, decode_nopdl_after_foreign=0)
PLAN_OVERRIDE: dict = {}
_REAL_PLAN_CONFIG = ours.plan_config


def _plan_config_overridden(name):
    cfg = _REAL_PLAN_CONFIG(name)
    return {**cfg, **PLAN_OVERRIDE} if PLAN_OVERRIDE else cfg


ours.plan_config = _plan_config_overridden


def plan_variants(model, rank, n_act, m):
    """The plan ("auto") and, where the plan has close alternatives, those forced: the pair
    sorter of grouped batches from 257 to 8192 pairs (round four: the one-program tl.sort vs
    the relaxed one-program counting sort up to 1024 pairs; above, the relaxed one-program
    counting sort, also with other warp counts, vs the four-launch and the relaxed two-launch
    counting sorts)."""
    spec = MODELS[model]
    p = m * spec["top_k"]
    path = plan_name(_cfg(), p, n_act, spec["experts"], rank)
    v = {"auto": {}, **decode_variants(model, rank, n_act, m)}
    # round nine: round eight's plan beside the plan where they differ (the pair sorter)
    if path != plan_name({**_cfg(), **R8_PLAN_KEYS}, p, n_act, spec["experts"], rank):
        v["r8plan"] = dict(cfg=R8_PLAN_KEYS)
    # round ten: round nine's plan beside where the naive shrink's warps differ
    if path == "tile-naive" and naive_shrink_warps(_cfg(), p, rank):
        v["r9plan"] = dict(cfg=R9_PLAN_KEYS)
    if not path.startswith("tile-grouped"):
        return v
    forced_sorters = []
    if 256 < p <= 1024:
        forced_sorters = ["onepass", "count1r"]
    elif 1024 < p <= 8192:
        forced_sorters = ["count1r", "count4", "countr"]
    for sorter in forced_sorters:
        if not path.endswith(f"-{sorter}"):
            v[sorter] = dict(mode="grouped", sorter=sorter)
    if 1024 < p <= 2048:
        v["count1r_w4"] = dict(mode="grouped", sorter="count1r", sort_warps=4)
    elif 2048 < p <= 8192:
        v["count1r_w8"] = dict(mode="grouped", sorter="count1r", sort_warps=8)
    return v


def time_single(vllm, model, rank, n_act, m, skew, gen, variants, reps=20):
    """The single-call method: ONE projection call (w13, or w2) repeated `reps` times in a CUDA
    graph on one layer's weights (hot in L2), our routing built inside every call (no sharing
    between w13 and w2); vLLM's op on the same inputs, its align metadata precomputed."""
    spec = MODELS[model]
    k, h, i = spec["top_k"], spec["hidden"], spec["inter"]
    w = layer_view(make_weights(model, n_act, rank, 1, gen), 0, n_act)
    topk_ids, slots, topk_w = make_routing(m, model, n_act, skew, gen)
    x = torch.randn(m, h, device=DEV, generator=gen).to(DTYPE)
    hh = torch.randn(m * k, i, device=DEV, generator=gen).to(DTYPE)
    o13 = torch.randn(m, k, 2 * i, device=DEV, generator=gen).to(DTYPE)
    o2 = torch.randn(m, k, h, device=DEV, generator=gen).to(DTYPE)
    enabled = torch.ones(n_act + 1, dtype=torch.int32, device=DEV)
    rows = []
    meta = None
    if vllm is not None:
        meta = vllm.prepare(model, spec["experts"], rank, topk_ids, slots, enabled, n_act)
    for proj in ("w13", "w2"):
        res = dict(
            model=model,
            rank=rank,
            adapters=n_act,
            M=m,
            proj=proj,
            routing="skewed" if skew else "uniform",
        )
        for name, opts in variants.items():
            options = options_of(opts)
            if proj == "w13":

                def call(_, options=options):
                    ours.add_moe_lora_w13(
                        o13, x, topk_ids, slots, w["a13"], w["b13"], enabled, options=options
                    )
            else:

                def call(_, options=options):
                    ours.add_moe_lora_w2(
                        o2, hh, topk_ids, topk_w, slots, w["a2"], w["b2"], enabled, options=options
                    )

            res[f"ours_{name}_us"], _ = graph_time(call, reps)
        if meta is not None:
            if proj == "w13":

                def vcall(_):
                    vllm.w13(o13, x, w["a13"], w["b13"], topk_w, meta)
            else:

                def vcall(_):
                    vllm.w2(o2, hh, w["a2"], w["b2"], topk_w, meta)

            res["vllm_us"], _ = graph_time(vcall, reps)
            res["vllm_path"] = meta["path"]
        res["ours_us"] = res["ours_auto_us"]
        res["our_path"] = our_path_name(model, rank, m, n_act)
        if meta is not None:
            res["speedup"] = res["vllm_us"] / res["ours_us"]
        rows.append(res)
    return rows


def summarize_single(rows):
    uni = [r for r in rows if r["routing"] == "uniform" and "speedup" in r]
    if not uni:
        return {}
    sp = [r["speedup"] for r in uni]
    dec = [r["speedup"] for r in uni if r["M"] <= 16]
    slower = [
        f"{r['model']} r{r['rank']} a{r['adapters']} M{r['M']} {r['proj']} {r['routing']}: "
        f"{r['speedup']:.2f}x"
        for r in rows
        if r.get("speedup", 2) < 1
    ]
    m1 = [r["ours_us"] for r in uni if r["M"] == 1]
    return dict(
        cells=len(uni),
        median_speedup=statistics.median(sp),
        min_speedup=min(sp),
        decode_median=statistics.median(dec) if dec else None,
        slower_cells=slower,
        m1_call_us_range=[min(m1), max(m1)] if m1 else None,
    )


def fmt_single(rows):
    out = [
        "| model | r | adapters | M | proj | routing | ours µs | vLLM µs | speedup | our path |"
        " vLLM path | forced variants µs |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        fs = forced(r)
        out.append(
            f"| {r['model']} | {r['rank']} | {r['adapters']} | {r['M']} | {r['proj']} | "
            f"{r['routing']} | {r['ours_us']:.1f} | {r.get('vllm_us', float('nan')):.1f} | "
            f"{r.get('speedup', float('nan')):.2f} | {r['our_path']} | "
            f"{r.get('vllm_path', '')} | {fs} |"
        )
    return "\n".join(out)


def full_plan():
    plan = [
        (model, rank, n_act, m)
        for model in MODELS
        for rank in GRID_RANKS
        for n_act in GRID_ADAPTERS
        for m in GRID_M
    ]
    skew = [(model, 16, 8, m) for model in MODELS for m in (16, 256, 4096) if m in GRID_M]
    return plan, skew


def run_single(vllm, gen, out, results, deadline):
    plan, skew_plan = full_plan()
    rows = []
    for skew, cells in ((False, plan), (True, skew_plan)):
        for model, rank, n_act, m in cells:
            if time.time() > deadline:
                log(f"single: time budget reached after {len(rows)} rows")
                break
            v = plan_variants(model, rank, n_act, m)
            try:
                new = time_single(vllm, model, rank, n_act, m, skew, gen, v)
            except Exception as exc:  # noqa: BLE001
                log(f"single {model} r{rank} a{n_act} M{m} failed: {exc!r}")
                continue
            for r in new:
                log(
                    f"single {model} r{rank} a{n_act} M{m} {r['proj']} {r['routing']}: ours "
                    f"{r['ours_us']:.1f} vllm {r.get('vllm_us', 0):.1f} "
                    f"x{r.get('speedup', 0):.2f} {r['our_path']}"
                )
            rows += new
            results["single"] = rows
            (out / "bench.json").write_text(json.dumps(results, indent=1))
        torch.cuda.empty_cache()
    results["single_summary"] = summarize_single(rows)
    return rows


def run_layer(vllm, gen, out, results, deadline, l2, peak, mode):
    if mode == "probe":
        plan, skew_plan = sorted(PROBE_CELLS, key=lambda c: (c[0], c[2], c[1], c[3])), []
    else:
        plan, skew_plan = full_plan()
    rows = []
    groups = {}
    for skew, cells in ((False, plan), (True, skew_plan)):
        for model, rank, n_act, m in cells:
            if time.time() > deadline:
                log(f"layer: time budget reached; {len(rows)} cells timed")
                break
            key = (model, n_act, rank)
            if key not in groups:
                groups.clear()
                torch.cuda.empty_cache()
                groups[key] = Group(model, n_act, rank, gen)
            if mode == "tune":
                v = tune_variants(model, rank, n_act, m)
            elif mode == "probe":
                v = probe_variants(model, rank, n_act, m)
            else:
                v = plan_variants(model, rank, n_act, m)
            try:
                r = time_cell(
                    None if mode == "probe" else vllm, groups[key], m, skew, gen, l2, v, peak
                )
            except Exception as exc:  # noqa: BLE001
                log(f"cell {model} r{rank} a{n_act} M{m} failed: {exc!r}")
                continue
            r["our_path"] = our_path_name(model, rank, m, n_act)
            p_ = m * MODELS[model]["top_k"]
            r["block_m"] = grouped_block_m(_cfg(), p_, n_act * MODELS[model]["experts"], rank)
            rows.append(r)
            extra = " ".join(f"{n}={r[f'ours_{n}_us']:.1f}" for n in v)
            log(
                f"layer {model} r{rank} a{n_act} M{m} {'skew' if skew else 'unif'} "
                f"L{r['layers']}: ours {r['ours_us']:.1f}us vllm {r.get('vllm_us', 0):.1f}us "
                f"x{r.get('speedup', 0):.2f} floor {r['floor_pct']:.0f}% [{extra}]"
            )
            results["layer"] = rows
            (out / "bench.json").write_text(json.dumps(results, indent=1))
    groups.clear()
    torch.cuda.empty_cache()
    results["layer_summary"] = summarize(rows)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="correctness at the real shapes")
    ap.add_argument("--single", action="store_true", help="single-call method, whole grid")
    ap.add_argument("--layer", action="store_true", help="cold-L2 layer-stack method, grid")
    ap.add_argument("--tune", action="store_true", help="layer method, tuner variants")
    ap.add_argument("--probe", action="store_true", help="layer method, probe cells/variants")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--grid-m", default=None, help="only these M (comma-separated), e.g. 1,4")
    args = ap.parse_args()
    if args.grid_m:
        GRID_M[:] = [int(v) for v in args.grid_m.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    deadline = start + args.budget_s
    import triton

    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 60 << 20)
    info = dict(
        gpu=torch.cuda.get_device_name(0),
        sms=props.multi_processor_count,
        l2_bytes=l2,
        torch=torch.__version__,
        triton=triton.__version__,
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        plan=_cfg(),  # the plan thresholds this run's "auto" used
        grid_m=GRID_M,
    )
    try:
        vllm = vllm_ops.VllmLoRA()
        info["vllm_ref"] = vllm_ops.source()
    except Exception as exc:  # noqa: BLE001
        log(f"vLLM op copy unavailable: {exc!r}")
        vllm = None
    info["peak_copy_gbps"] = measure_peak_bw()
    log(json.dumps(info))
    gen = torch.Generator(device=DEV).manual_seed(1234)
    results = dict(info=info)
    if args.check:
        results["correctness"] = run_correctness(vllm, gen)
        log(f"[{time.time() - start:.0f}s] correctness done")
    tables = []
    if args.single:
        rows = run_single(vllm, gen, out, results, deadline)
        tables.append(fmt_single(rows))
        log(f"[{time.time() - start:.0f}s] single-call method done")
    for flag, mode in ((args.layer, "layer"), (args.tune, "tune"), (args.probe, "probe")):
        if flag:
            rows = run_layer(vllm, gen, out, results, deadline, l2, info["peak_copy_gbps"], mode)
            tables.append(fmt_table(rows))
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    summaries = {k: v for k, v in results.items() if k.endswith("summary")}
    (out / "table.md").write_text("\n\n".join(tables) + "\n\n" + json.dumps(summaries, indent=1))
    log(json.dumps(summaries, indent=1))
    log(f"total {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
