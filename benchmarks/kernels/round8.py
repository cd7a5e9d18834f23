"""Round eight of issue 13 on one GPU: the decode batches' launch chain (M = 1 first), in one
call.

    python -m benchmarks.kernels.round8 --out DIR [--parts check,probe]

  check   correctness of the round-eight variants against the torch backend on the GPU
          (bench.py's check_case: both models, ranks 16/64, M 1/4/16/64, mixed ranks, a
          disabled slot, 25% tokens without adapter): the tail trigger (a projection's last
          kernel lets the next kernel launch right after its own wait), the naive shrink's L2
          prefetch of its A lines before its wait, the decode kernel's pre-wait loads (early
          route, also with a wrong guess forced) and L2 prefetch with the trigger, and the
          decode kernel forced at GPT-OSS rank 16 (K = 2880) with the trigger.
  probe   both timing methods, M = 1 (1 and 8 adapters), M = 2, 4 and 16 (8 adapters), both
          models, ranks 16 / 64: the plan (timed first and last, for the noise) against the
          trigger alone, the pre-wait loads alone, and both; the layer method also with w13
          alone (half of the chain), the plan and the best candidate.
  probe2  (second call) the candidate plan (kernels/configs/NVIDIA_H200.json as committed:
          "auto") against round seven's plan (its keys forced: "r7"), both methods, the decode
          cells of M <= 64 and controls; around the candidate's limits: the trigger up to 1024
          pairs (Qwen3 r16 M = 32 / 64), the early route at 64 pairs (M = 8), and for GPT-OSS
          rank 16 the decode kernel at 16 pairs (M = 4) with the trigger, with the L2
          prefetch, and with the early route in 16 warps (A 16 x 4096 padded in registers).
Writes DIR/round8_probe.json; prints a table per method and a geomean per variant.
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


def log(*a):
    print(*a, flush=True)


TRIG = dict(trigger=True)
ER = dict(decode_cfg={"EARLY_ROUTE": True})
PF = dict(decode_cfg={"L2_PREFETCH": True})


def variants(model, rank, n_act, m, layer=True):
    """The plan and this round's candidates for one cell (see the module docstring)."""
    v = {"auto": {}}
    if round7.plan_kind(model, rank, m) == "decode":
        v["trig"] = dict(TRIG)
        v["er"] = dict(ER)
        v["pf"] = dict(PF)
        v["trig_er"] = {**TRIG, **ER}
        v["trig_pf"] = {**TRIG, **PF}
        v["trig_er_pf"] = {**TRIG, "decode_cfg": {"EARLY_ROUTE": True, "L2_PREFETCH": True}}
        if layer:
            v["w13_auto"] = dict(part="w13")
            v["w13_trig_er"] = {**TRIG, **ER, "part": "w13"}
    else:
        v["trig"] = dict(TRIG)
        v["spf"] = dict(shrink_l2_prefetch=True)
        v["trig_spf"] = dict(trigger=True, shrink_l2_prefetch=True)
        if rank <= 16 and m <= 4:  # the decode kernel where A is 16 x 2880 (GPT-OSS)
            v["dec"] = dict(decode=True)
            v["dec_trig"] = dict(decode=True, **TRIG)
            v["dec_trig_pf"] = dict(decode=True, **TRIG, **PF)
            v["dec_trig_pf_spf"] = dict(decode=True, **TRIG, **PF, shrink_l2_prefetch=True)
        if layer:
            v["w13_auto"] = dict(part="w13")
            v["w13_trig_spf"] = dict(trigger=True, shrink_l2_prefetch=True, part="w13")
    v["auto2"] = {}
    return v


def cells():
    out = []
    for model in MODELS:
        for rank in (16, 64):
            for m, n_act in ((1, 1), (1, 8), (2, 8), (4, 8), (16, 8)):
                out.append((model, rank, n_act, m))
    return out


def variants2(model, rank, n_act, m):
    v = {"auto": {}, "r7": dict(cfg=bench.R7_PLAN_KEYS)}
    if model == "qwen3-30b-a3b" and rank == 16:
        if m >= 32:
            v["trig1024"] = dict(cfg=dict(decode_trigger_max_pairs=1024))
        if m == 8:
            v["er64"] = dict(cfg=dict(decode_early_route_max_pairs=64))
    if model == "gpt-oss-20b" and rank == 16 and m == 4:
        v["dec16"] = dict(cfg=dict(decode_small_max_pairs=16))
        v["dec16pf"] = dict(cfg=dict(decode_small_max_pairs=16, decode_l2_prefetch_max_pairs=16))
        v["dec16er"] = dict(
            cfg=dict(decode_small_max_pairs=16, decode_max_a_elems=65536),
            decode_cfg={"EARLY_ROUTE": True},
        )
    if model == "gpt-oss-20b" and rank == 16 and m <= 2:
        v["dec_er"] = dict(cfg=dict(decode_max_a_elems=65536), decode_cfg={"EARLY_ROUTE": True})
    v["auto2"] = {}
    return v


def cells2():
    q, g = "qwen3-30b-a3b", "gpt-oss-20b"
    out = [(q, 16, 8, m) for m in (1, 2, 4, 8, 16, 32, 64)]
    out += [(q, 16, 1, 1), (q, 16, 1, 4), (q, 16, 4, 64), (q, 16, 32, 64), (q, 64, 8, 1)]
    out += [(g, 16, 8, m) for m in (1, 2, 4, 16)]
    out += [(g, 16, 1, 1), (g, 16, 1, 4), (g, 16, 4, 4), (g, 16, 32, 4), (g, 64, 8, 1)]
    return out


def check(gen):
    rows = []
    common = {
        "trig": dict(TRIG),
        "trig_spf": dict(trigger=True, shrink_l2_prefetch=True),
        "naive_trig_spf": dict(mode="naive", trigger=True, shrink_l2_prefetch=True),
        "auto": {},
    }
    dec16 = {
        "dec_trig_er": dict(decode=True, **TRIG, **ER),
        "dec_trig_er_wrong": dict(
            decode=True, **TRIG, decode_cfg={"EARLY_ROUTE": True, "SPEC_TEST": True}
        ),
        "dec_trig_pf": dict(decode=True, **TRIG, **PF),
        "dec_trig_er_pf": dict(
            decode=True, **TRIG, decode_cfg={"EARLY_ROUTE": True, "L2_PREFETCH": True}
        ),
    }
    for model in MODELS:
        for rank in (16, 64):
            v = {**common, **(dec16 if rank == 16 else {})}
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
        vs = v if second else variants(model, rank, n_act, m, layer=False)
        for s in bench.time_single(None, model, rank, n_act, m, False, gen, vs):
            s["our_path"] = r["our_path"]
            single.append(s)
            log(f"single {model} r{rank} a{n_act} M{m} {s['proj']}: "
                + " ".join(f"{n} {s[f'ours_{n}_us']:.2f}" for n in vs))  # fmt: skip
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
    gen = torch.Generator(device="cuda").manual_seed(8)
    res = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), peak_copy_gbps=peak, plan=round7._cfg())
    log(f"copy bandwidth {peak:.0f} GB/s")

    def save():
        (out / "round8_probe.json").write_text(json.dumps(res, indent=1, default=str))

    if "check" in which:
        res["check"] = rows = check(gen)
        bad = [r for r in rows if not r["ok"]]
        worst = max(rows, key=lambda r: max(r["w13_max"], r["w2_max"]))
        log(f"[{time.time() - t0:.0f}s] check: {len(rows) - len(bad)}/{len(rows)} ok, worst "
            f"max-rel {max(worst['w13_max'], worst['w2_max']):.2e}")  # fmt: skip
        for r in bad:
            log("  FAIL", r)
        save()
    if "check2" in which:  # the candidate plan's new paths (GPT-OSS r16 decode, 16 warps)
        v = {"auto": {}, "dec_er": dict(decode=True, decode_cfg={"EARLY_ROUTE": True},
                                        cfg=dict(decode_max_a_elems=65536))}  # fmt: skip
        rows = []
        for model in MODELS:
            for m, n_act in ((1, 1), (2, 8), (4, 8), (16, 8), (64, 8)):
                rows += bench.check_case(None, model, 16, m, n_act, gen, v)
        res["check"] = rows
        bad = [r for r in rows if not r["ok"]]
        log(f"[{time.time() - t0:.0f}s] check2: {len(rows) - len(bad)}/{len(rows)} ok")
        for r in bad:
            log("  FAIL", r)
    for part in ("probe", "probe2"):
        if part not in which:
            continue
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
