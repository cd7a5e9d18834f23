"""Round seven of issue 13 on one GPU: where the time of a decode batch (M = 4 and 16) goes,
and the split factors of the tile path at M <= 16, in one call.

    python -m benchmarks.kernels.round7 --out DIR [--parts check,parts,splits]

  check   correctness of the forced variants below against the torch backend on the GPU
          (bench.py's check_case: both models, ranks 16/64, M 1/4/16, mixed ranks, a disabled
          slot, 25% tokens without adapter).
  parts   layer method (cold L2), 8 cells at M = 4 / 16, the plan and waves 8: the whole layer,
          w13 alone, the layer without its expand launches, without its shrink launches, and
          the pair sort alone (grouped cells); every launch's grid, warps, registers and shared
          memory, so programs per SM and waves can be read off; bytes per kernel.
  splits  both timing methods, every tile-path cell at M = 4 and 16 (1/4/8/32 adapters) and at
          M = 1 (1 and 8 adapters), both models, ranks 16/64: the plan against more programs
          per launch (waves 4 / 8 / 16: finer K and N splits), a higher K-split cap
          (ksplit_max 64), shrink BLOCK_K 64 / two stages for rank 64, the naive tiles where
          the plan groups, and the tile path with more waves where the plan takes the decode kernel.
          The plan is timed twice (first and last), for the noise.
  splits2 (second call) the expand's N split on its own (expand_waves 4 / 8 / 64, the K
          split as planned; 64 = one column tile per program), expand BLOCK_N 64 for rank 16,
          and the tile path with those splits where the plan takes the decode kernel; M = 4
          and 16, all 32 cells.
  splits3 (third call) the candidate plan (NEW_PLAN: the expand in 4 waves for naive tiles
          up to 128 pairs; the decode kernel in column blocks of up to 1024 (or 2048) from 64
          pairs) against the shipped plan, plan keys overridden per variant; the decode kernel
          with those blocks at M = 32 / 64 too; skewed routing at M = 16.
Writes DIR/round7_probe.json; prints a table per part.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.kernels import bench
from benchmarks.kernels.inputs import MODELS
from benchmarks.kernels.timing import measure_peak_bw
from kernels import triton_moe_lora as ours
from kernels.triton_plan import LaunchOptions, plan_config, projection_path
from kernels.triton_util import device_name


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# Launch recording and leaving kernels out (module attributes patched while a call runs; the
# CUDA graph captures what ran)
# ---------------------------------------------------------------------------------------------

KERNELS = ("_tile_shrink_kernel", "_tile_expand_kernel", "_decode_kernel")
REAL = {k: getattr(ours, k) for k in KERNELS}
RECORD: list = []


class _Skip:
    def __getitem__(self, grid):
        return lambda *a, **k: None


class _Rec:
    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        def launch(*a, **k):
            kern = REAL[self.name][grid](*a, **k)
            meta = getattr(kern, "metadata", None)
            RECORD.append(
                dict(
                    kernel=self.name,
                    grid=list(grid),
                    programs=int(grid[0]) * int(grid[1]),
                    warps=k.get("num_warps", getattr(meta, "num_warps", None)),
                    stages=k.get("num_stages"),
                    regs=getattr(kern, "n_regs", None),
                    spills=getattr(kern, "n_spills", None),
                    shared=getattr(meta, "shared", None),
                    block=dict(
                        (n, k[n]) for n in ("BLOCK_M", "BLOCK_K", "BLOCK_N", "BLOCK_R") if n in k
                    ),
                )
            )
            return kern

        return launch


@contextlib.contextmanager
def patched(part):
    """part: all | noexp (expand launches left out) | noshr (shrink launches left out) | rec."""
    try:
        if part == "noexp":
            ours._tile_expand_kernel = _Skip()
        elif part == "noshr":
            ours._tile_shrink_kernel = _Skip()
        elif part == "rec":
            for k in KERNELS:
                setattr(ours, k, _Rec(k))
        yield
    finally:
        for k in KERNELS:
            setattr(ours, k, REAL[k])


# Plan keys overridden for one variant ("cfg" in its options): the plan of a candidate rule
# timed beside the shipped one on the same inputs (host-side decisions happen at capture).
CFG_OVERRIDE: dict = {}
_REAL_PLAN_CONFIG = ours.plan_config


def _plan_config(name):
    cfg = _REAL_PLAN_CONFIG(name)
    return {**cfg, **CFG_OVERRIDE} if CFG_OVERRIDE else cfg


ours.plan_config = _plan_config


def _opts(opts):
    CFG_OVERRIDE.clear()
    CFG_OVERRIDE.update(opts.get("cfg", {}))
    return LaunchOptions(**{k: v for k, v in opts.items() if k not in ("path", "part", "cfg")})


def run_parts(opts, o13, o2, x, hh, topk_ids, slots, topk_w, w, enabled, num_slots, experts):
    """bench.run_ours with a `part`: all, w13 (w13 alone), noexp, noshr, sort (routing only)."""
    part = opts.get("part", "all")
    options = _opts(opts)
    if part == "sort":
        ours.route_pairs(topk_ids, slots, enabled, num_slots, experts, w["a2"].shape[2], options)
        return
    with patched(part if part in ("noexp", "noshr", "rec") else "all"):
        r = ours.add_moe_lora_w13(
            o13, x, topk_ids, slots, w["a13"], w["b13"], enabled, options=options
        )
        if part != "w13":
            ours.add_moe_lora_w2(
                o2, hh, topk_ids, topk_w, slots, w["a2"], w["b2"], enabled, routing=r,
                options=options,
            )  # fmt: skip


bench.run_ours = run_parts
bench.options_of = _opts


def _cfg():
    return plan_config(device_name(0))


def plan_kind(model, rank, m):
    spec = MODELS[model]
    p = m * spec["top_k"]
    paths = {projection_path(_cfg(), p, 4, spec["experts"], rank, k) for k in
             (spec["hidden"], spec["inter"])}  # fmt: skip
    return "decode" if "decode1" in paths else "tiles"


def split_variants(model, rank, n_act, m):
    """The plan ("auto", timed again last as "auto2") and the split variants of this round."""
    spec = MODELS[model]
    v = {"auto": {}}
    if plan_kind(model, rank, m) == "decode":
        v["tiles"] = dict(decode=False)
        v["tiles_w8"] = dict(decode=False, waves=8)
        v["tiles_w16"] = dict(decode=False, waves=16)
        v["tiles_w8k64"] = dict(decode=False, waves=8, ksplit_max=64)
    else:
        v["w4"] = dict(waves=4)
        v["w8"] = dict(waves=8)
        v["w16"] = dict(waves=16)
        v["w8k64"] = dict(waves=8, ksplit_max=64)
        v["w16k64"] = dict(waves=16, ksplit_max=64)
        if rank >= 64 and spec["hidden"] % 128 == 0:  # plan: shrink BLOCK_K 128 (Qwen3 r64)
            v["w8bk64"] = dict(waves=8, shrink=dict(BLOCK_K=64))
        if rank >= 64:  # shrink with two stages: more programs per SM (shared memory)
            v["w8s2"] = dict(waves=8, shrink=dict(num_stages=2))
        path = bench.our_path_name(model, rank, m, n_act)
        if "grouped" in path:
            v["naive"] = dict(mode="naive")
            v["naive_w8"] = dict(mode="naive", waves=8)
    v["auto2"] = {}
    return v


def split2_variants(model, rank, n_act, m):
    """Second call: the expand's N split on its own (expand_waves), the shrink's K split as
    planned; waves 4 (both) again for the same-run comparison."""
    v = {"auto": {}}
    if plan_kind(model, rank, m) == "decode":
        v["tiles"] = dict(decode=False)
        v["tiles_e8"] = dict(decode=False, expand_waves=8)
        v["tiles_e64"] = dict(decode=False, expand_waves=64)
        # the decode kernel's column block: one block per pair and slice (w13 N = 768 in 1024,
        # w2 2048 in two: A read half as often), or 256 (w13: no masked half block)
        v["dec_bn1024"] = dict(decode_cfg=dict(BLOCK_N=1024))
        v["dec_bn1024_w16"] = dict(decode_cfg=dict(BLOCK_N=1024, num_warps=16))
        v["dec_bn256"] = dict(decode_cfg=dict(BLOCK_N=256))
    else:
        v["e4"] = dict(expand_waves=4)
        v["e8"] = dict(expand_waves=8)
        v["e64"] = dict(expand_waves=64)
        v["w4"] = dict(waves=4)
        if rank <= 16:
            v["e8bn64"] = dict(expand_waves=8, expand=dict(BLOCK_N=64))
    v["auto2"] = {}
    return v


NEW_PLAN = dict(
    expand_waves_small=4,
    expand_waves_small_max_pairs=128,
    decode_wide_n_min_pairs=64,
    decode_block_n_wide=1024,
)


def split3_variants(model, rank, n_act, m):
    """Third call: the candidate plan (NEW_PLAN) against the shipped one, same inputs."""
    v = {"auto": {}, "new": dict(cfg=NEW_PLAN)}
    if plan_kind(model, rank, 1) == "decode":  # Qwen3 rank 16: the decode kernel's rule
        v["new2048"] = dict(cfg={**NEW_PLAN, "decode_block_n_wide": 2048})
        v["new2048w8"] = dict(
            cfg={**NEW_PLAN, "decode_block_n_wide": 2048, "decode_wide_b_elems": 1 << 30}
        )
        if m >= 32:  # the decode kernel beyond its 128 pairs, with wide column blocks
            v["new_dec"] = dict(cfg={**NEW_PLAN, "decode_max_pairs": 1024})
            v["new2048_dec"] = dict(
                cfg={**NEW_PLAN, "decode_block_n_wide": 2048, "decode_max_pairs": 1024}
            )
    v["auto2"] = {}
    return v


def split3_cells():
    cells = []
    for model in MODELS:
        for rank in (16, 64):
            dec = plan_kind(model, rank, 1) == "decode"
            for n_act in (1, 4, 8, 32):
                for m in (4, 8, 16, 32, 64) if dec else (4, 16):
                    cells.append((model, rank, n_act, m, False))
            if not dec:
                cells.append((model, rank, 8, 32, False))
    cells += [(model, 16, 8, 16, True) for model in MODELS]
    return cells


def split2_cells():
    return [c for c in split_cells() if c[3] in (4, 16) or plan_kind(c[0], c[1], c[3]) == "decode"]


def split_cells():
    cells = []
    for model in MODELS:
        for rank in (16, 64):
            for n_act in (1, 4, 8, 32):
                for m in (1, 4, 16):
                    if m == 1 and n_act not in (1, 8):
                        continue
                    cells.append((model, rank, n_act, m))
    return cells


def check(gen, third=False):
    variants = {
        "w4": dict(waves=4),
        "w8": dict(waves=8),
        "w16": dict(waves=16),
        "w8k64": dict(waves=8, ksplit_max=64),
        "w16k64": dict(waves=16, ksplit_max=64),
        "w8bk64": dict(waves=8, shrink=dict(BLOCK_K=64)),
        "tiles_w16": dict(decode=False, waves=16),
        "naive_w8": dict(mode="naive", waves=8),
        "naive_w16k64_nopdl": dict(mode="naive", waves=16, ksplit_max=64, pdl=False),
        "e8": dict(expand_waves=8),
        "e64": dict(expand_waves=64),
        "e8bn64": dict(expand_waves=8, expand=dict(BLOCK_N=64)),
        "tiles_e64": dict(decode=False, expand_waves=64),
        "dec_bn1024": dict(decode_max_pairs=1 << 30, decode_cfg=dict(BLOCK_N=1024)),
        "dec_bn1024_w16": dict(
            decode_max_pairs=1 << 30, decode_cfg=dict(BLOCK_N=1024, num_warps=16)
        ),
        "new": dict(cfg=NEW_PLAN),
        "new2048": dict(cfg={**NEW_PLAN, "decode_block_n_wide": 2048}),
        "new2048_dec": dict(
            cfg={**NEW_PLAN, "decode_block_n_wide": 2048, "decode_max_pairs": 1024}
        ),
        "auto": {},
    }
    if third:
        variants = {k: variants[k] for k in ("new", "new2048", "new2048_dec", "auto")}
    rows = []
    for model in MODELS:
        for rank in (16, 64):
            for m, n_act in ((1, 1), (4, 8), (16, 8), (16, 32), (64, 8)):
                rows += bench.check_case(None, model, rank, m, n_act, gen, variants)
    return rows


PART_CELLS = [
    ("gpt-oss-20b", 16, 8, 4),
    ("gpt-oss-20b", 16, 8, 16),
    ("gpt-oss-20b", 16, 1, 16),
    ("gpt-oss-20b", 64, 8, 16),
    ("qwen3-30b-a3b", 16, 8, 16),
    ("qwen3-30b-a3b", 64, 8, 4),
    ("qwen3-30b-a3b", 64, 8, 16),
    ("qwen3-30b-a3b", 64, 1, 16),
]


def parts(gen, l2, peak):
    rows = []
    for model, rank, n_act, m in PART_CELLS:
        grp = bench.Group(model, n_act, rank, gen)
        base = {"tiles": dict(decode=False)} if plan_kind(model, rank, m) == "decode" else {}
        variants = {}
        for vname, vo in (("plan", {}), ("w8", dict(waves=8))):
            vo = {**vo, **base.get("tiles", {})} if vname == "w8" else vo
            for part in ("all", "w13", "noexp", "noshr", "sort"):
                decode = plan_kind(model, rank, m) == "decode" and vname == "plan"
                if part in ("noexp", "noshr") and decode:
                    continue
                if part == "sort" and "grouped" not in bench.our_path_name(model, rank, m, n_act):
                    continue
                variants[f"{vname}_{part}"] = {**vo, "part": part}
        variants["plan_all2"] = {}
        r = bench.time_cell(None, grp, m, False, gen, l2, variants, peak)
        # one recorded layer call of each of the two (grids, registers, shared memory)
        spec = MODELS[model]
        topk_ids, slots, topk_w = bench.make_routing(m, model, n_act, False, gen)
        v0 = bench.layer_view(grp.w, 0, n_act)
        x = torch.randn(m, spec["hidden"], device="cuda", generator=gen).to(torch.bfloat16)
        hh = torch.randn(m * spec["top_k"], spec["inter"], device="cuda", generator=gen).to(
            torch.bfloat16
        )
        o13 = torch.zeros(m, spec["top_k"], 2 * spec["inter"], device="cuda", dtype=torch.bfloat16)
        o2 = torch.zeros(m, spec["top_k"], spec["hidden"], device="cuda", dtype=torch.bfloat16)
        en = torch.ones(n_act + 1, dtype=torch.int32, device="cuda")
        launches = {}
        for vname, vo in (("plan", {}), ("w8", dict(waves=8, **base.get("tiles", {})))):
            RECORD.clear()
            run_parts({**vo, "part": "rec"}, o13, o2, x, hh, topk_ids, slots, topk_w, v0, en,
                      n_act, spec["experts"])  # fmt: skip
            torch.cuda.synchronize()
            launches[vname] = list(RECORD)
        r["launches"] = launches
        r["our_path"] = bench.our_path_name(model, rank, m, n_act)
        rows.append(r)
        log(
            f"parts {model} r{rank} a{n_act} M{m} ({r['our_path']}): "
            + " ".join(f"{n} {r[f'ours_{n}_us']:.1f}" for n in variants)
        )
        for vname, recs in launches.items():
            for rec in recs:
                log(f"    {vname}: {rec}")
        del grp
        torch.cuda.empty_cache()
    return rows


def splits(gen, l2, peak, res, save, which="splits"):
    layer, single = res["layer"], res["single"]
    groups = {}
    cells = dict(
        splits=[(*c, False) for c in split_cells()],
        splits2=[(*c, False) for c in split2_cells()],
        splits3=split3_cells(),
    )[which]
    variants_of = dict(splits=split_variants, splits2=split2_variants, splits3=split3_variants)
    for model, rank, n_act, m, skew in cells:
        key = (model, n_act, rank)
        if key not in groups:
            groups.clear()
            torch.cuda.empty_cache()
            groups[key] = bench.Group(model, n_act, rank, gen)
        v = variants_of[which](model, rank, n_act, m)
        r = bench.time_cell(None, groups[key], m, skew, gen, l2, v, peak)
        r["our_path"] = bench.our_path_name(model, rank, m, n_act)
        layer.append(r)
        log(f"layer {model} r{rank} a{n_act} M{m} ({r['our_path']}): "
            + " ".join(f"{n} {r[f'ours_{n}_us']:.2f}" for n in v))  # fmt: skip
        for s in bench.time_single(None, model, rank, n_act, m, skew, gen, v):
            s["our_path"] = r["our_path"]
            single.append(s)
            log(f"single {model} r{rank} a{n_act} M{m} {s['proj']}: "
                + " ".join(f"{n} {s[f'ours_{n}_us']:.2f}" for n in v))  # fmt: skip
        save()
    groups.clear()
    torch.cuda.empty_cache()
    return layer, single


def table(rows, title):
    """Per row: plan (min of the two), each variant over the plan."""
    log(f"\n{title}: cell | plan µs (auto / auto2) | variant: µs (x of plan)")
    for r in rows:
        plan = min(r["ours_auto_us"], r["ours_auto2_us"])
        names = [k[5:-3] for k in r if k.startswith("ours_") and k.endswith("_us")]
        alts = [n for n in names if n not in ("auto", "auto2", "")]
        best = min(alts, key=lambda n: r[f"ours_{n}_us"]) if alts else None
        log(
            f"{r['model'][:6]} r{r['rank']} a{r['adapters']} M{r['M']} {r.get('proj', '')} "
            f"{'skewed ' if r.get('routing') == 'skewed' else ''}"
            f"{r['our_path']} | {r['ours_auto_us']:.2f} / {r['ours_auto2_us']:.2f} | "
            + " ".join(f"{n} {r[f'ours_{n}_us']:.2f} ({r[f'ours_{n}_us'] / plan:.3f})"
                       for n in alts)
            + (f" | best {best}" if best else "")
        )  # fmt: skip


def rule_summary(rows, title):
    """Per variant name: geomean and worst of variant / plan over the rows that have it."""
    names = sorted({k[5:-3] for r in rows for k in r if k.startswith("ours_") and
                    k.endswith("_us")} - {"auto", "auto2", ""})  # fmt: skip
    out = {}
    for n in names:
        ratios = [
            r[f"ours_{n}_us"] / min(r["ours_auto_us"], r["ours_auto2_us"])
            for r in rows
            if f"ours_{n}_us" in r
        ]
        if ratios:
            g = statistics.geometric_mean(ratios)
            out[n] = dict(cells=len(ratios), geomean=g, min=min(ratios), max=max(ratios))
            log(f"{title} {n}: {len(ratios)} cells, geomean {g:.3f} "
                f"[{min(ratios):.3f}, {max(ratios):.3f}]")  # fmt: skip
    noise = [
        max(r["ours_auto_us"], r["ours_auto2_us"]) / min(r["ours_auto_us"], r["ours_auto2_us"])
        for r in rows
    ]
    log(f"{title} plan twice: median spread {statistics.median(noise):.3f}, max {max(noise):.3f}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="check,splits,parts")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    which = args.parts.split(",")
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 60 << 20)
    peak = measure_peak_bw()
    gen = torch.Generator(device="cuda").manual_seed(7)
    res = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), peak_copy_gbps=peak, plan=_cfg())
    log(f"copy bandwidth {peak:.0f} GB/s")

    def save():
        (out / "round7_probe.json").write_text(json.dumps(res, indent=1, default=str))

    if "check" in which or "check3" in which:
        res["check"] = rows = check(gen, third="check3" in which)
        bad = [r for r in rows if not r["ok"]]
        worst = max(rows, key=lambda r: max(r["w13_max"], r["w2_max"]))
        log(f"[{time.time() - t0:.0f}s] check: {len(rows) - len(bad)}/{len(rows)} ok, worst "
            f"max-rel {max(worst['w13_max'], worst['w2_max']):.2e}")  # fmt: skip
        for r in bad:
            log("  FAIL", r)
        save()
    for part in ("splits", "splits2", "splits3"):
        if part not in which:
            continue
        res["layer"], res["single"] = [], []
        splits(gen, l2, peak, res, save, part)
        log(f"[{time.time() - t0:.0f}s] splits done")
        save()
        res["layer_rules"] = rule_summary(res["layer"], "layer")
        res["single_rules"] = rule_summary(res["single"], "single")
        table(res["layer"], "layer method")
        table(res["single"], "single-call method")
        save()
    if "parts" in which:
        res["parts"] = parts(gen, l2, peak)
        log(f"[{time.time() - t0:.0f}s] parts done")
        save()
    log(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
