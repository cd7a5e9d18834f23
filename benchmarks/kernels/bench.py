"""Benchmark of the Triton MoE-LoRA op against vLLM 0.32.0's fused_moe_lora on one GPU.

Run on the GPU machine from the repository root, after
`python -m benchmarks.kernels.fetch_vllm_reference` here (it copies vLLM's Triton op into the
ignored .vllm_ref/, carried along):

    python -m benchmarks.kernels.bench --quick --out DIR  # correctness + a timing subset
    python -m benchmarks.kernels.bench --full --out DIR   # the whole grid (+ skewed routing)

What it does
  (a) correctness: at the real model shapes, fresh random inputs (25% tokens without adapter,
      mixed adapter ranks zero-padded in the slots, one disabled slot), our op (every path) and
      vLLM's op against kernels.torch_moe_lora (fp32 math on the GPU). Bound, per projection:
      max|got - ref| <= 2e-2 * max|ref - base| and ||got - ref|| <= 1e-2 * ||ref - base||
      (bf16 outputs: one rounding of out+delta and of the rank intermediate), and rows without
      an (enabled) adapter bit-for-bit unchanged.
  (b) timing: one "layer call" = w13 delta + w2 delta of one MoE layer, for our op (routing
      built inside w13 and reused by w2, as the vLLM plugin does) and for vLLM's op (its
      align metadata precomputed OUTSIDE the timed region: vLLM's moe_lora_align_block_size
      is a CUDA op not available here, so vLLM's numbers exclude it - this favours vLLM).
      Each cell captures L layer calls in one CUDA graph, each layer with its own adapter
      weights and routing, L large enough that the bytes touched per replay are >= 3x the L2
      (so weights come from HBM, as in a real forward pass); median over replays / L.
  Bytes (HBM floor): distinct (slot, expert) A/B blocks touched (bf16, all projections)
  + x and h rows read + w13/w2 output rows read and written, for pairs with an adapter.
  % of floor = (bytes / measured device-to-device copy bandwidth) / our time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / ".vllm_ref"))

from benchmarks.kernels.vllm_align_reference import active_lora_ids, punica_align  # noqa: E402
from kernels import torch_moe_lora  # noqa: E402
from kernels import triton_moe_lora as ours  # noqa: E402
from kernels.model_shapes import BENCHMARK_MODELS, MODEL_SHAPES  # noqa: E402
from kernels.triton_plan import LaunchOptions, grouped_block_m, plan_config, plan_name  # noqa: E402
from kernels.triton_util import device_name, num_sms  # noqa: E402

MODELS = {
    name: dict(hidden=s.hidden, inter=s.inter, experts=s.experts, top_k=s.top_k)
    for name, s in MODEL_SHAPES.items()
    if name in BENCHMARK_MODELS
}
GRID_M = [1, 4, 16, 64, 256, 1024, 4096]
GRID_ADAPTERS = [1, 4, 8, 32]
GRID_RANKS = [16, 64]
DEV = "cuda"
DTYPE = torch.bfloat16
WEIGHT_POOL_BYTES = 48e9  # per (model, adapters, rank) group: weights of all rotated layers
MAX_LAYERS = 64


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# vLLM side
# ---------------------------------------------------------------------------------------------


class Vllm:
    """vLLM's fused_moe_lora, called exactly as PunicaWrapperGPU.add_lora_w13/w2 (0.32.0) do."""

    def __init__(self):
        from vllm_ref import fused_moe_lora_op

        self.op = fused_moe_lora_op._fused_moe_lora
        self.configs = json.loads((ROOT / ".vllm_ref" / "vllm_configs.json").read_text())
        self.source = (ROOT / ".vllm_ref" / "SOURCE.txt").read_text().strip()

    def config(self, model, rank, m, op):
        # Recorded by fetch_vllm_reference for every benchmarked M (vLLM's lookup run there).
        return self.configs[f"{model}|{rank}|{m}|{op}"]

    @staticmethod
    def _args(cfg):
        return (
            cfg.get("BLOCK_SIZE_M", 64),
            cfg.get("BLOCK_SIZE_N", 64),
            cfg.get("BLOCK_SIZE_K", 32),
            cfg.get("GROUP_SIZE_M", 8),
            cfg.get("NUM_WARPS", cfg.get("num_warps", 4)),
            cfg.get("NUM_STAGES", cfg.get("num_stages", 3)),
            cfg.get("SPLIT_K", 1),
        )

    def prepare(self, model, rank, topk_ids, mapping, enabled, max_loras):
        """Everything add_lora_w13 computes before the kernel (not timed)."""
        m, top_k = topk_ids.shape
        experts = MODELS[model]["experts"]
        cfg = {
            op: self.config(model, rank, m, op)
            for op in ("w13_shrink", "w13_expand", "w2_shrink", "w2_expand")
        }
        naive = m * top_k * 8 <= experts * max_loras
        bm = int(cfg["w13_shrink"].get("BLOCK_SIZE_M") or 64)
        lora_ids = active_lora_ids(mapping, max_loras)
        sorted_ids, expert_ids, ntpp = punica_align(
            topk_ids, mapping, bm, experts, max_loras, enabled, lora_ids, naive
        )
        if sorted_ids is not None:
            sorted_ids = sorted_ids.view(max_loras, -1)
            expert_ids = expert_ids.view(max_loras, -1)
        num_active = torch.tensor(
            [max_loras + 1], dtype=torch.int32
        )  # specialize_active_lora=False
        small = naive and rank <= 64 and m * top_k * rank <= 1024
        path = "small-batch" if small else ("one-shot-naive" if naive else f"one-shot-BM{bm}")
        return dict(
            cfg=cfg,
            sorted=sorted_ids,
            eids=expert_ids,
            ntpp=ntpp,
            lora_ids=lora_ids,
            num_active=num_active,
            mapping=mapping,
            enabled=enabled,
            path=path,
        )

    def w13(self, out, x, a13, b13, topk_weights, meta, rank, top_k):
        self.op(
            out,
            x,
            list(a13),
            list(b13),
            topk_weights,
            meta["sorted"],
            meta["eids"],
            meta["ntpp"],
            meta["mapping"],
            rank,
            top_k,
            meta["lora_ids"],
            meta["num_active"],
            meta["enabled"],
            *self._args(meta["cfg"]["w13_shrink"]),
            *self._args(meta["cfg"]["w13_expand"]),
            False,
            False,
            0,
            True,
        )

    def w2(self, out, h, a2, b2, topk_weights, meta, rank, top_k):
        self.op(
            out,
            h,
            [a2],
            [b2],
            topk_weights,
            meta["sorted"],
            meta["eids"],
            meta["ntpp"],
            meta["mapping"],
            rank,
            top_k,
            meta["lora_ids"],
            meta["num_active"],
            meta["enabled"],
            *self._args(meta["cfg"]["w2_shrink"]),
            *self._args(meta["cfg"]["w2_expand"]),
            True,
            False,
            0,
            True,
        )


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def make_routing(m, model, n_act, skew, gen, no_adapter=0.0):
    spec = MODELS[model]
    e, k = spec["experts"], spec["top_k"]
    if skew:  # Zipf-like popularity of experts (a1.2) and adapters (a1.5)
        pe = (1.0 / torch.arange(1, e + 1, device=DEV).float() ** 1.2)[
            torch.randperm(e, device=DEV, generator=gen)
        ]
        topk_ids = torch.multinomial(pe.expand(m, e), k, replacement=False, generator=gen)
        ps = 1.0 / torch.arange(1, n_act + 1, device=DEV).float() ** 1.5
        slots = torch.multinomial(ps, m, replacement=True, generator=gen)
    else:
        topk_ids = torch.rand(m, e, device=DEV, generator=gen).argsort(dim=1)[:, :k]
        slots = torch.empty(m, dtype=torch.long, device=DEV)
        slots[torch.randperm(m, device=DEV, generator=gen)] = torch.arange(m, device=DEV) % n_act
    if no_adapter:
        slots[torch.rand(m, device=DEV, generator=gen) < no_adapter] = -1
    w = torch.softmax(torch.randn(m, k, device=DEV, generator=gen), dim=-1)
    return topk_ids.to(torch.int32).contiguous(), slots.to(torch.int32), w.float()


def make_weights(model, slots, rank, layers, gen, mixed_ranks=False):
    s = MODELS[model]
    h, i, e = s["hidden"], s["inter"], s["experts"]
    n = layers * slots

    def randn(*shape, scale):
        t = torch.empty(*shape, device=DEV, dtype=DTYPE)
        return t.normal_(0.0, scale, generator=gen)

    w = dict(
        a13=[randn(n, e, rank, h, scale=h**-0.5) for _ in range(2)],
        b13=[randn(n, e, i, rank, scale=rank**-0.5) for _ in range(2)],
        a2=randn(n, e, rank, i, scale=i**-0.5),
        b2=randn(n, e, h, rank, scale=rank**-0.5),
    )
    if mixed_ranks:  # slot s of each layer holds an adapter of rank max(1, rank >> (s % 4))
        for slot in range(n):
            r = max(1, rank >> (slot % 4))
            for a in [*w["a13"], w["a2"]]:
                a[slot, :, r:] = 0
            for b in [*w["b13"], w["b2"]]:
                b[slot, :, :, r:] = 0
    return w


def layer_view(w, layer, slots):
    sl = slice(layer * slots, (layer + 1) * slots)
    return dict(
        a13=[a[sl] for a in w["a13"]], b13=[b[sl] for b in w["b13"]], a2=w["a2"][sl], b2=w["b2"][sl]
    )


def bytes_moved(model, rank, topk_ids, slots):
    s = MODELS[model]
    h, i, e, k = s["hidden"], s["inter"], s["experts"], s["top_k"]
    pair_slot = slots.long().repeat_interleave(k)
    active = pair_slot >= 0
    keys = (pair_slot * e + topk_ids.reshape(-1).long())[active]
    distinct = int(torch.unique(keys).numel())
    pairs = int(active.sum())
    tokens = int((slots >= 0).sum())
    weights = distinct * 2 * 3 * rank * (h + i)  # w13 A,B (2 slices) + w2 A,B, bf16
    acts = 2 * (tokens * h + pairs * i) + 2 * 2 * pairs * (2 * i + h)  # x, h in; outs RMW
    return weights + acts, distinct


# ---------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------


def rel_errors(got, want, base):
    d_ref = want.float() - base.float()
    d = got.float() - want.float()
    scale = d_ref.abs().max().clamp(min=1e-6)
    return float(d.abs().max() / scale), float(d.norm() / d_ref.norm().clamp(min=1e-6))


def options_of(opts: dict) -> LaunchOptions:
    return LaunchOptions(**{k: v for k, v in opts.items() if k != "path"})


def run_ours(opts, o13, o2, x, hh, topk_ids, slots, topk_w, w, enabled, num_slots, experts):
    """One layer call of our op (w13, then w2 reusing w13's routing) under a variant given as
    LaunchOptions fields (mode, sorter, block_m, decode, handoff, pdl, prefetch, waves, ...)."""
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
            meta = vllm.prepare(model, rank, topk_ids, slots, enabled, max_loras)
            vllm.w13(o13, x, w["a13"], w["b13"], topk_w, meta, rank, k)
            vllm.w2(o2, hh, w["a2"], w["b2"], topk_w, meta, rank, k)
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
    "decode-fused": dict(mode="naive", decode="fused"),
    "tile-naive": dict(mode="naive", decode="split"),
    "grouped-onepass": dict(mode="grouped", sorter="onepass"),
    "grouped-count": dict(mode="grouped", sorter="count"),
    "nopf-nopdl": dict(prefetch=False, pdl=False),
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
                    else ("auto", "grouped-onepass", "grouped-count", "nopf-nopdl")
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


def graph_time(call, layers, max_s=0.15):
    """Median time of one layer call: capture `layers` calls in a CUDA graph, replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for layer in range(layers):  # warm-up: compiles, pointer tables
            call(layer)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for layer in range(layers):
            call(layer)
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    g.replay()
    torch.cuda.synchronize()
    one = time.perf_counter() - t0
    reps = int(min(40, max(5, max_s / max(one, 1e-6))))
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for a, b in events:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    times = [a.elapsed_time(b) * 1e3 / layers for a, b in events]
    del g
    return statistics.median(times), reps


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
        metas = [vllm.prepare(model, rank, t, s, enabled, n_act) for t, s, _ in routes]
        res["vllm_path"] = metas[0]["path"]

        def vcall(layer):
            t, s, w_ = routes[layer]
            v = views[layer]
            vllm.w13(o13[layer], xs[layer], v["a13"], v["b13"], w_, metas[layer], rank, k)
            vllm.w2(o2[layer], hs[layer], v["a2"], v["b2"], w_, metas[layer], rank, k)

        res["vllm_us"], _ = graph_time(vcall, layers)
    best = min((n for n in variants), key=lambda n: res[f"ours_{n}_us"])
    res["ours_us"] = res["ours_auto_us"] if "auto" in variants else res[f"ours_{best}_us"]
    res["best_variant"] = best
    res["gbps"] = bytes_per_call / (res["ours_us"] * 1e-6) / 1e9
    res["floor_pct"] = 100 * res["gbps"] / peak
    if vllm is not None:
        res["speedup"] = res["vllm_us"] / res["ours_us"]
    return res


def measure_peak_bw():
    n = 1 << 30  # 2 GiB bf16 source, 4 GiB moved per copy
    a = torch.empty(n, dtype=DTYPE, device=DEV).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e-3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * 2 / statistics.median(ts) / 1e9


def fmt_table(rows):
    hdr = (
        "| model | r | adapters | M | routing | ours µs | vLLM µs | speedup | GB/s | % floor |"
        " our path (best forced) | vLLM path |"
    )
    out = [hdr, "|" + "---|" * 12]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['rank']} | {r['adapters']} | {r['M']} | {r['routing']} | "
            f"{r['ours_us']:.1f} | {r.get('vllm_us', float('nan')):.1f} | "
            f"{r.get('speedup', float('nan')):.2f} | {r['gbps']:.0f} | {r['floor_pct']:.0f} | "
            f"{r.get('our_path', '')} ({r['best_variant']}) | {r.get('vllm_path', '')} |"
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
        worst=f"{worst['model']} r{worst['rank']} a{worst['adapters']} M{worst['M']}: "
        f"{worst['speedup']:.2f}x",
    )


TUNE_VARIANTS = {
    "auto": {},
    "naive": dict(mode="naive", decode="split"),
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
        v["naive"] = dict(mode="naive", decode="split")
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
    """What the automatic plan picks (for the table)."""
    spec = MODELS[model]
    return plan_name(_cfg(), m * spec["top_k"], n_act, spec["experts"], rank, num_sms(0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--budget-s", type=float, default=480.0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
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
    )
    try:
        vllm = Vllm()
        info["vllm_ref"] = vllm.source
    except Exception as exc:  # noqa: BLE001
        log(f"vLLM reference unavailable: {exc!r}")
        vllm = None
    info["peak_copy_gbps"] = measure_peak_bw()
    log(json.dumps(info))
    gen = torch.Generator(device=DEV).manual_seed(1234)

    results = dict(info=info)
    if not args.no_check:
        results["correctness"] = run_correctness(vllm, gen)
        log(f"[{time.time() - start:.0f}s] correctness done")

    if args.quick:
        variants = {
            "auto": {},
            "nopdl": dict(pdl=False),
            "decode-fused": dict(mode="naive", decode="fused"),
            "tile-naive": dict(mode="naive", decode="split"),
            "tile-grouped": dict(mode="grouped"),
        }
        plan = [
            (model, rank, n_act, m)
            for model in MODELS
            for rank in GRID_RANKS
            for n_act in (1, 8)
            for m in (1, 16, 64)
        ]
        plan += [
            (model, rank, 8, m) for model in MODELS for rank in GRID_RANKS for m in (256, 4096)
        ]
        skew_plan = []
    elif args.probe:
        variants = {}
        plan = sorted(PROBE_CELLS, key=lambda c: (c[0], c[2], c[1], c[3]))  # one group at a time
        skew_plan = []
    elif args.tune:  # every grid cell, with the variants kernels/tune_moe_lora.py compares
        variants = TUNE_VARIANTS
        plan = [
            (model, rank, n_act, m)
            for model in MODELS
            for rank in GRID_RANKS
            for n_act in GRID_ADAPTERS
            for m in GRID_M
        ]
        skew_plan = []
    else:
        variants = {"auto": {}}
        plan = [
            (model, rank, n_act, m)
            for model in MODELS
            for rank in GRID_RANKS
            for n_act in GRID_ADAPTERS
            for m in GRID_M
        ]
        skew_plan = [(model, 16, 8, m) for model in MODELS for m in (16, 256, 4096)]

    rows = []
    groups = {}
    for skew, cells in ((False, plan), (True, skew_plan)):
        for model, rank, n_act, m in cells:
            if time.time() - start > args.budget_s:
                log(f"time budget reached; {len(rows)} cells timed")
                break
            key = (model, n_act, rank)
            if key not in groups:
                groups.clear()
                torch.cuda.empty_cache()
                groups[key] = Group(model, n_act, rank, gen)
            if args.quick and m > 64:
                v = {n: variants[n] for n in ("auto", "nopdl", "tile-grouped")}
            elif args.tune:
                v = tune_variants(model, rank, n_act, m)
            elif args.probe:
                v = probe_variants(model, rank, n_act, m)
            else:
                v = variants
            try:
                r = time_cell(
                    None if args.probe else vllm,
                    groups[key],
                    m,
                    skew,
                    gen,
                    l2,
                    v,
                    info["peak_copy_gbps"],
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
                f"[{time.time() - start:4.0f}s] {model} r{rank} a{n_act} M{m} "
                f"{'skew' if skew else 'unif'} L{r['layers']}: ours {r['ours_us']:.1f}us "
                f"vllm {r.get('vllm_us', float('nan')):.1f}us "
                f"x{r.get('speedup', float('nan')):.2f} "
                f"floor {r['floor_pct']:.0f}% [{extra}] vllm:{r.get('vllm_path')}"
            )
            results["timing"] = rows
            (out / "bench.json").write_text(json.dumps(results, indent=1))
    results["summary"] = summarize(rows)
    results["timing"] = rows
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    table = fmt_table(rows)
    (out / "table.md").write_text(table + "\n\n" + json.dumps(results["summary"], indent=1) + "\n")
    log(table)
    log(json.dumps(results["summary"], indent=1))
    log(f"total {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
