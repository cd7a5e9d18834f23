"""Derive the plan thresholds of kernels/triton_plan.py from measurements on a GPU.

Two steps:
  1. on the GPU machine:  python -m benchmarks.kernels.bench --tune --out DIR
     times every grid cell (GPT-OSS-20B and Qwen3-30B-A3B shapes, M in 1..4096, 1..32
     adapters, rank 16/64) under variants: the automatic plan, routing forced naive / grouped,
     expand prefetch off, PDL off, and the BLOCK_M neighbours of the default.
  2. here:  python -m benchmarks.kernels.tune_moe_lora DIR/bench.json
     picks each threshold by minimising the geometric mean, over the cells where it matters,
     of (time of the variant the rule would run) / (fastest measured variant), and writes
     kernels/configs/<GPU name>.json (the bench records torch.cuda.get_device_name), which the
     op reads on that GPU only (kernels/triton_plan.py); other keys keep the file's values.

Thresholds are independent rules of the batch shape (pairs P = M * top_k, groups S * E),
never per-cell lookups, so batch sizes between grid points get sensible plans.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from kernels.model_shapes import MODEL_SHAPES
from kernels.triton_plan import CONFIG_DIR, config_file_name

TOPK = {name: s.top_k for name, s in MODEL_SHAPES.items()}
EXPERTS = {name: s.experts for name, s in MODEL_SHAPES.items()}
INF = 1 << 30


def geomean(xs):
    xs = list(xs)
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else 1.0


def pairs(c):
    return c["M"] * TOPK[c["model"]]


def groups(c):
    return c["adapters"] * EXPERTS[c["model"]]


def t(c, v):
    return c.get(f"ours_{v}_us")


def derive_mode(cells):
    """naive iff P <= T or P * f <= S * E."""
    both = [c for c in cells if t(c, "naive") and t(c, "grouped")]
    best = None
    for T in (0, 4, 8, 16, 32, 64, 128, 256):
        for f in (0, 1, 2, 4, 8, 16):

            def pick(c, T=T, f=f):
                naive = pairs(c) <= T or (f and pairs(c) * f <= groups(c))
                return t(c, "naive" if naive else "grouped")

            cost = geomean(pick(c) / min(t(c, "naive"), t(c, "grouped")) for c in both)
            if best is None or cost < best[0] - 1e-9:
                best = (cost, T, f)
    return dict(naive_max_pairs=best[1], naive_sparsity=best[2]), best[0], len(both)


def derive_switch(cells, off_variant, key, on_below: bool):
    """Switch on for P <= T (on_below) or P >= T, T from the measured pair counts."""
    rows = [c for c in cells if t(c, off_variant) and t(c, "auto")]
    cands = sorted({0, INF} | {pairs(c) for c in rows})
    best = None
    for T in cands:

        def pick(c, T=T):
            on = pairs(c) <= T if on_below else pairs(c) >= T
            return t(c, "auto" if on else off_variant)

        cost = geomean(pick(c) / min(t(c, "auto"), t(c, off_variant)) for c in rows)
        if best is None or cost < best[0] - 1e-9:
            best = (cost, T)
    return {key: best[1]}, best[0], len(rows)


def derive_block_m(cells, current):
    """BLOCK_M 32/64 from these mean pairs per group; only rules whose choice was measured."""
    rows = [c for c in cells if c["M"] > 64]
    best = None
    for t32 in (8, 12, 16, 24, 32, 48, 64, INF):
        for t64 in (16, 24, 32, 48, 64, 96, 128, INF):
            if t64 < t32:
                continue
            ratios = []
            for c in rows:
                per = pairs(c) / max(1, min(pairs(c), groups(c)))
                bm = 64 if per >= t64 else 32 if per >= t32 else 16
                default = c.get("block_m")
                v = "auto" if bm == default else f"bm{bm}"
                if t(c, v) is None:
                    break
                measured = [t(c, n) for n in ("auto", "bm16", "bm32", "bm64") if t(c, n)]
                ratios.append(t(c, v) / min(measured))
            else:
                cost = geomean(ratios)
                if best is None or cost < best[0] - 1e-9:
                    best = (cost, t32, t64)
    if best is None:
        return {}, None, 0
    return dict(bm32_per_group=best[1], bm64_per_group=best[2]), best[0], len(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bench_json")
    args = ap.parse_args()
    data = json.loads(Path(args.bench_json).read_text())
    rows = data.get("layer") or data["timing"]  # round one wrote "timing"
    cells = [c for c in rows if c["routing"] == "uniform"]
    plan, evidence = {}, {}
    for name, (rule, cost, n) in {
        "mode": derive_mode(cells),
        "prefetch": derive_switch(cells, "nopf", "prefetch_min_pairs", on_below=False),
        "pdl": derive_switch(cells, "nopdl", "pdl_max_pairs", on_below=True),
        "block_m": derive_block_m(cells, None),
    }.items():
        plan.update(rule)
        evidence[name] = dict(rule=rule, geomean_time_over_best=cost, cells=n)
    path = CONFIG_DIR / config_file_name(data["info"]["gpu"])
    old = json.loads(path.read_text()) if path.is_file() else {"plan": {}}
    out = dict(
        device=data["info"]["gpu"],
        torch=data["info"]["torch"],
        triton=data["info"]["triton"],
        date=data["info"]["date"],
        source="python -m benchmarks.kernels.bench --tune; "
        "python -m benchmarks.kernels.tune_moe_lora",
        plan={**old["plan"], **plan},
        evidence=evidence,
    )
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
