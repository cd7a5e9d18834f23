"""Markdown tables and target checks for docs/kernels.md from one results file of a run.

    python -m benchmarks.kernels.report benchmarks/kernels/results/h200_2026-11-29_round2_final.json

"ours" is the plan as shipped in kernels/configs/<GPU>.json: where the run timed a variant that
the shipped plan now picks (a threshold set from this same run, e.g. the unrolled K-split sum),
that variant's time from the same run is used, and the table says so. With --as-run, "ours" is
the plan exactly as it ran ("auto"), whatever the config says now.

--add-m 4096 --add-from OTHER.json appends the layer and single-call rows of those M from
another run (e.g. cells a partial run did not time), read as run; the summary says how many.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from kernels.model_shapes import MODEL_SHAPES
from kernels.triton_plan import choose_sorter, plan_config, use_decode


def shipped_us(r: dict, cfg: dict | None, ran: dict | None) -> tuple[float, str]:
    """Our time under the plan `cfg` (None: as run), from a row timed under the plan `ran`
    (the run's recorded thresholds; None: unknown, taken as round two's)."""
    shape = MODEL_SHAPES[r["model"]]
    p = r["M"] * shape.top_k
    if cfg is None:
        return r["ours_us"], ""
    ran_unroll = (ran or {}).get("unroll_ksplit_max_pairs", 0)
    if ran_unroll < p <= cfg["unroll_ksplit_max_pairs"] and "ours_unrolled_us" in r:
        return r["ours_unrolled_us"], "unrolled"
    # Round five: the decode rule now on the other side than as run, and the run timed that
    # side forced ("tiles": decode kernel off; "decode1": on wherever A fits).
    if ran is not None and "decode_max_pairs" in ran:
        ks = {"w13": (shape.hidden,), "w2": (shape.inter,)}.get(
            r.get("proj"), (shape.hidden, shape.inter)
        )

        def dec(c):
            groups = r["adapters"] * shape.experts
            return tuple(use_decode(c, p, r["rank"], k, num_groups=groups) for k in ks)

        was, now = dec({**cfg, **ran}), dec(cfg)
        if was != now:
            if not any(now) and "ours_tiles_us" in r:
                return r["ours_tiles_us"], "tiles"
            if any(now) and "ours_decode1_us" in r:
                return r["ours_decode1_us"], "decode1"
            # Round eight: round seven's plan forced beside ("r7plan"); where the shipped rule
            # now takes the tile path, that variant is the shipped plan (the round-eight keys
            # that are on touch only the decode kernel).
            if not any(now) and "ours_r7plan_us" in r:
                return r["ours_r7plan_us"], "r7plan"
    # The pair sorter the plan picks now, if the run timed it forced beside its own choice.
    path = r.get("our_path", "")
    if path.startswith("tile-grouped"):
        now = choose_sorter(cfg, p, r["adapters"] * shape.experts)
        if not path.endswith(f"-{now}") and f"ours_{now}_us" in r:
            return r[f"ours_{now}_us"], now
    return r["ours_us"], ""


def geomean(xs):
    xs = list(xs)
    return math.exp(statistics.mean(math.log(x) for x in xs))


def cell(r):
    return f"{r['model']} r{r['rank']} a{r['adapters']} M{r['M']}"


def layer_rows(bench, cfg):
    rows = []
    for r in bench.get("layer", []):
        us, how = shipped_us(r, cfg, bench["info"].get("plan"))
        speed = r["vllm_us"] / us
        floor = r["floor_pct"] * r["ours_us"] / us
        rows.append({**r, "ship_us": us, "ship_how": how, "ship_x": speed, "ship_floor": floor})
    return rows


def single_rows(bench, cfg):
    rows = []
    for r in bench.get("single", []):
        us, how = shipped_us(r, cfg, bench["info"].get("plan"))
        rows.append({**r, "ship_us": us, "ship_how": how, "ship_x": r["vllm_us"] / us})
    return rows


def summary(layer, single, tax):
    out = []
    uni = [r for r in layer if r["routing"] == "uniform"]
    sx = [r["ship_x"] for r in uni]
    dec = [r["ship_x"] for r in uni if r["M"] <= 16]
    big = [r["ship_floor"] for r in uni if r["M"] >= 256]
    skew = [r["ship_x"] for r in layer if r["routing"] == "skewed"]
    out.append(
        f"* layer method: {len(uni)} uniform cells, median {statistics.median(sx):.2f}x "
        f"(geomean {geomean(sx):.2f}x), min {min(sx):.2f}x "
        f"({cell(min(uni, key=lambda r: r['ship_x']))}), slower than vLLM: "
        f"{sum(x < 1 for x in sx)}; skewed {min(skew):.2f}-{max(skew):.2f}x"
    )
    out.append(
        f"* layer method, decode (M <= 16, {len(dec)} cells): median "
        f"{statistics.median(dec):.2f}x, min {min(dec):.2f}x"
    )
    below = [r for r in uni if r["M"] >= 256 and r["ship_floor"] < 50]
    out.append(
        f"* layer method, M >= 256 ({len(big)} cells): median {statistics.median(big):.1f}% "
        f"of the HBM floor, min {min(big):.1f}%, {len(below)} below 50%: "
        + ", ".join(f"{cell(r)} {r['ship_floor']:.0f}%" for r in below)
    )
    m1 = [r for r in uni if r["M"] == 1]
    out.append(
        "* layer method, M = 1 (w13 + w2 delta of one layer, cold L2): "
        + ", ".join(f"{r['model']} r{r['rank']} a{r['adapters']} {r['ship_us']:.1f} µs" for r in m1)
    )
    su = [r for r in single if r["routing"] == "uniform"]
    ss = [r["ship_x"] for r in su]
    sdec = [r["ship_x"] for r in su if r["M"] <= 16]
    slow = [r for r in single if r["ship_x"] < 1]
    out.append(
        f"* single-call method: {len(su)} uniform projection cells, median "
        f"{statistics.median(ss):.2f}x, min {min(ss):.2f}x; decode (M <= 16) median "
        f"{statistics.median(sdec):.2f}x; slower than vLLM: "
        + (
            ", ".join(
                f"{cell(r)} {r['proj']} {r['routing']} {r['ship_x']:.2f}x "
                f"({r['ship_us']:.1f} vs {r['vllm_us']:.1f} µs)"
                for r in slow
            )
            or "none"
        )
    )
    m1s = [r["ship_us"] for r in su if r["M"] == 1]
    out.append(f"* single-call method, M = 1: {min(m1s):.1f}-{max(m1s):.1f} µs per projection call")
    if tax:
        d = [r for r in tax if r["M"] <= 16 and r["adapters"] == 8 and r["rank"] == 16]
        out.append(
            "* LoRA tax at decode (8 adapters, rank 16): "
            + ", ".join(
                f"{r['model']} M{r['M']} ours {r['tax_ours_pct']:.0f}% / vLLM "
                f"{r['tax_vllm_pct']:.0f}%"
                for r in d
            )
        )
        third = [r for r in tax if r["tax_ours_pct"] <= r["tax_vllm_pct"] / 3]
        out.append(
            f"* LoRA tax, ours <= 1/3 of vLLM's: {len(third)} of {len(tax)} cells; "
            f"ours below vLLM's: {sum(r['tax_ours_pct'] < r['tax_vllm_pct'] for r in tax)}"
        )
    return "\n".join(out)


def side_by_side(layer, single):
    key = {(r["model"], r["rank"], r["adapters"], r["M"], r["routing"]): r for r in layer}
    sing = {}
    for r in single:
        sing[(r["model"], r["rank"], r["adapters"], r["M"], r["routing"], r["proj"])] = r
    out = [
        "| model | r | adapters | M | routing | layer: ours µs | vLLM µs | x | % floor | "
        "w13 call: ours µs | vLLM µs | x | w2 call: ours µs | vLLM µs | x | our plan |",
        "|" + "---|" * 16,
    ]
    for k, r in key.items():
        w13 = sing.get((*k, "w13"), {})
        w2 = sing.get((*k, "w2"), {})
        how = r["ship_how"]
        how = " (unrolled sum)" if how == "unrolled" else (f" -> {how} (now)" if how else "")
        plan = r.get("our_path", "") + how

        def f(d, name, fmt):
            return format(d[name], fmt) if name in d else "-"

        out.append(
            f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | {r['ship_us']:.1f} | "
            f"{r['vllm_us']:.1f} | {r['ship_x']:.2f} | {r['ship_floor']:.0f} | "
            f"{f(w13, 'ship_us', '.1f')} | {f(w13, 'vllm_us', '.1f')} | "
            f"{f(w13, 'ship_x', '.2f')} | "
            f"{f(w2, 'ship_us', '.1f')} | {f(w2, 'vllm_us', '.1f')} | {f(w2, 'ship_x', '.2f')} | "
            f"{plan} |"
        )
    return "\n".join(out)


def tax_table(tax):
    out = [
        "| model | r | adapters | M | base µs | base % HBM floor | + vLLM LoRA µs | + ours µs | "
        "tax vLLM | tax ours | per decode step: base / + vLLM / + ours ms |",
        "|" + "---|" * 11,
    ]
    for r in tax:
        out.append(
            f"| {r['model']} | {r['rank']} | {r['adapters']} | {r['M']} | {r['none_us']:.1f} | "
            f"{r['base_floor_pct']:.0f} | {r['vllm_us']:.1f} | {r['ours_us']:.1f} | "
            f"{r['tax_vllm_pct']:.0f}% | {r['tax_ours_pct']:.0f}% | "
            f"{r['step_none_ms']:.2f} / {r['step_vllm_ms']:.2f} / {r['step_ours_ms']:.2f} |"
        )
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--as-run", action="store_true", help="ours = the plan as it ran")
    ap.add_argument(
        "--add-m", default="", help="M values (comma-separated) to take from --add-from"
    )
    ap.add_argument("--add-from", default=None, help="another results file")
    args = ap.parse_args()
    data = json.loads(Path(args.results).read_text())
    bench = data["bench"]
    cfg = None if args.as_run else plan_config(bench["info"]["gpu"])
    layer, single = layer_rows(bench, cfg), single_rows(bench, cfg)
    if args.add_from:
        ms = {int(v) for v in args.add_m.split(",") if v}
        other = json.loads(Path(args.add_from).read_text())["bench"]
        other = {k: [r for r in other.get(k, []) if r["M"] in ms] for k in ("layer", "single")}
        other["info"] = {}
        layer += layer_rows(other, None)
        single += single_rows(other, None)
        print(
            f"(+ {len(other['layer'])} layer and {len(other['single'])} single-call rows of M in "
            f"{sorted(ms)} from {args.add_from}, as run there)"
        )
    tax = data.get("lora_tax", {}).get("rows", [])
    # Rows of the LoRA tax from another call of the same session that replace the run's rows
    # of the same cells (e.g. where the shipped plan differs from the plan that run used).
    subst = data.get("lora_tax_substitute", {})
    if subst.get("rows"):

        def key(r):
            return (r["model"], r["rank"], r["adapters"], r["M"])

        new = {key(r): r for r in subst["rows"]}
        tax = [new.get(key(r), r) for r in tax]
        print(
            f"(LoRA tax of {', '.join(cell(r) for r in subst['rows'])} from "
            f"{subst.get('from', 'another call')})"
        )
    print(summary(layer, single, tax))
    print()
    print(side_by_side(layer, single))
    if tax:
        print()
        print(tax_table(tax))


if __name__ == "__main__":
    main()
