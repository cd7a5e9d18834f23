"""Round nine of issue 13 on one GPU: the split decode kernel (the K reduction of a pair's
projection over several programs, the last one to finish doing the expand), in one call.

    python -m benchmarks.kernels.round9 --out DIR [--parts check,probe]

  check   correctness of the split decode kernel against the torch backend on the GPU
          (bench.py's check_case: both models, ranks 16/64, M 1/2/4/16/64, mixed ranks, a
          disabled slot, 25% tokens without adapter): K chunks of 4096 / 8192 / 16384 A
          elements, with and without the pre-wait loads (early route, also with a wrong guess
          forced), B loaded by every program or only by the last one.
  probe   both timing methods, M = 1 and 4 (1 and 8 adapters) and M = 16 (8 adapters), both
          models, ranks 16 / 64: the plan (timed first and last, for the noise) against the
          split decode kernel with the trigger, K chunks of 8192 A elements (16 KB), early
          route on / off, chunks of 4096 / 16384, and for rank 64 256-column blocks.
  check2, probe2 (second call) candidate plan rules (CANDIDATES: GPT-OSS rank 16 at <= 8
          pairs on the split decode kernel, chunks of 16384 / 32768 A elements, B loaded by
          all or by the last program, 4 / 8 warps; round eight's plain decode rule) against
          the plan, GPT-OSS rank 16 at M = 1 / 2 / 4; checks of their paths first.
Writes DIR/round9_probe.json; prints a table per method and a geomean per variant.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.kernels import bench, round7
from benchmarks.kernels.inputs import MODELS
from benchmarks.kernels.timing import measure_peak_bw

BIG = 1 << 30


def log(*a):
    print(*a, flush=True)


def split_cfg(elems=8192, early=True, b_late=8192, **more):
    """Plan keys that put a projection on the split decode kernel (with decode=True)."""
    return dict(
        decode_split_max_pairs=BIG,
        decode_split_a_elems=elems,
        decode_split_early_max_pairs=BIG if early else 0,
        decode_split_b_late_elems=b_late,
        **more,
    )


def variants(model, rank, n_act, m):
    v = {"auto": {}}
    v["ds"] = dict(decode=True, cfg=split_cfg())
    v["ds_noer"] = dict(decode=True, cfg=split_cfg(early=False))
    v["ds4k"] = dict(decode=True, cfg=split_cfg(4096))
    v["ds16k"] = dict(decode=True, cfg=split_cfg(16384))
    if rank >= 64:
        v["ds_bn256"] = dict(decode=True, cfg=split_cfg(decode_block_n=256))
        v["ds_bn256_b"] = dict(decode=True, cfg=split_cfg(b_late=BIG, decode_block_n=256))
    else:
        v["ds_blate"] = dict(decode=True, cfg=split_cfg(b_late=0))
    v["auto2"] = {}
    return v


def candidate(elems, b_late=BIG, warps=4, max_pairs=8):
    """Plan keys of a candidate rule: GPT-OSS rank 16 (A 16 x 2880) at <= max_pairs pairs on
    the split decode kernel, chunks of `elems` A elements, early route, `warps` warps."""
    return dict(
        decode_split_max_pairs=max_pairs,
        decode_split_max_a_elems=46080,
        decode_split_a_elems=elems,
        decode_split_early_max_pairs=max_pairs,
        decode_split_b_late_elems=b_late,
        decode_split_warps=warps,
    )


CANDIDATES = {
    "c16": candidate(16384),
    "c16bl": candidate(16384, b_late=0),
    "c16w8": candidate(16384, warps=8),
    "c32w8": candidate(32768, warps=8),
    "c32blw8": candidate(32768, b_late=0, warps=8),
    # round eight's rule (the plain decode kernel, early route in 16 warps, <= 8 pairs)
    "r8dec": dict(decode_small_max_pairs=8),
}


def variants2(model, rank, n_act, m):
    v = {"auto": {}}
    v.update({n: dict(cfg=c) for n, c in CANDIDATES.items()})
    v["auto2"] = {}
    return v


def cells2():
    g = "gpt-oss-20b"
    return [(g, 16, 1, 1), (g, 16, 8, 1), (g, 16, 8, 2), (g, 16, 32, 1), (g, 16, 8, 4)]


def cells():
    out = []
    for model in MODELS:
        for rank in (16, 64):
            for m, n_act in ((1, 1), (1, 8), (4, 1), (4, 8), (16, 8)):
                out.append((model, rank, n_act, m))
    return out


def check(gen):
    rows = []
    v = {
        "auto": {},
        "ds": dict(decode=True, cfg=split_cfg()),
        "ds_noer": dict(decode=True, cfg=split_cfg(early=False)),
        "ds4k_blate": dict(decode=True, cfg=split_cfg(4096, b_late=0)),
        "ds16k": dict(decode=True, cfg=split_cfg(16384, b_late=BIG)),
        "ds_wrong": dict(decode=True, cfg=split_cfg(), decode_cfg={"SPEC_TEST": True}),
        "ds_wrong_blate": dict(
            decode=True, cfg=split_cfg(b_late=0), decode_cfg={"SPEC_TEST": True}
        ),
    }
    for model in MODELS:
        for rank in (16, 64):
            for m, n_act in ((1, 1), (2, 8), (4, 8), (16, 8), (64, 8)):
                rows += bench.check_case(None, model, rank, m, n_act, gen, v)
    return rows


def probe(gen, l2, peak, res, save, second=False):
    layer, single = res["layer"], res["single"]
    groups = {}
    for model, rank, n_act, m in cells2() if second else cells():
        key = (model, n_act, rank)
        if key not in groups:
            groups.clear()
            torch.cuda.empty_cache()
            groups[key] = bench.Group(model, n_act, rank, gen)
        v = variants2(model, rank, n_act, m) if second else variants(model, rank, n_act, m)
        r = bench.time_cell(None, groups[key], m, False, gen, l2, v, peak)
        r["our_path"] = bench.our_path_name(model, rank, m, n_act)
        layer.append(r)
        log(f"layer {model} r{rank} a{n_act} M{m} ({r['our_path']}): "
            + " ".join(f"{n} {r[f'ours_{n}_us']:.2f}" for n in v))  # fmt: skip
        for s in bench.time_single(None, model, rank, n_act, m, False, gen, v):
            s["our_path"] = r["our_path"]
            single.append(s)
            log(f"single {model} r{rank} a{n_act} M{m} {s['proj']}: "
                + " ".join(f"{n} {s[f'ours_{n}_us']:.2f}" for n in v))  # fmt: skip
        save()
    groups.clear()
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="check,probe")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    which = args.parts.split(",")
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 60 << 20)
    peak = measure_peak_bw()
    gen = torch.Generator(device="cuda").manual_seed(9)
    res = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), peak_copy_gbps=peak, plan=round7._cfg())
    log(f"copy bandwidth {peak:.0f} GB/s")

    def save():
        (out / "round9_probe.json").write_text(json.dumps(res, indent=1, default=str))

    if "check" in which:
        res["check"] = rows = check(gen)
        bad = [r for r in rows if not r["ok"]]
        worst = max(rows, key=lambda r: max(r["w13_max"], r["w2_max"]))
        log(f"[{time.time() - t0:.0f}s] check: {len(rows) - len(bad)}/{len(rows)} ok, worst "
            f"max-rel {max(worst['w13_max'], worst['w2_max']):.2e}")  # fmt: skip
        for r in bad:
            log("  FAIL", {k: r[k] for k in r if k not in ("w13", "w2")})
        save()
        if bad:
            log("check failed: no timing")
            return
    if "check2" in which:  # the candidates' own paths (plan keys), GPT-OSS rank 16
        v = {"auto": {}, **{n: dict(cfg=c) for n, c in CANDIDATES.items()}}
        v.update({f"{n}_wrong": dict(cfg=c, decode_cfg={"SPEC_TEST": True})
                  for n, c in CANDIDATES.items() if n.startswith("c")})  # fmt: skip
        rows = []
        for m, n_act in ((1, 1), (1, 8), (2, 8), (3, 4), (4, 8)):
            rows += bench.check_case(None, "gpt-oss-20b", 16, m, n_act, gen, v)
        res["check2"] = rows
        bad = [r for r in rows if not r["ok"]]
        log(f"[{time.time() - t0:.0f}s] check2: {len(rows) - len(bad)}/{len(rows)} ok")
        for r in bad:
            log("  FAIL", r)
        save()
        if bad:
            return
    for part in [p for p in ("probe", "probe2") if p in which]:
        res["layer"], res["single"] = [], []
        probe(gen, l2, peak, res, save, second=part == "probe2")
        log(f"[{time.time() - t0:.0f}s] probe done")
        res["layer_rules"] = round7.rule_summary(res["layer"], "layer")
        res["single_rules"] = round7.rule_summary(res["single"], "single")
        round7.table(res["layer"], "layer method")
        round7.table(res["single"], "single-call method")
        save()
    log(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
