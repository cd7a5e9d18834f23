"""Round ten of issue 13 on one GPU, in one call: our first kernel without the PDL launch
attribute inside the whole MoE layer (LoRA-tax method, interleaved), and tile-path settings of
GPT-OSS-20B rank 16 at M = 4 (the decode median's cells), both timing methods.

    python -m benchmarks.kernels.round10 --out DIR [--parts check,tax,tiles]

  check   correctness on the GPU of the new launch option (first_pdl=False: the call's first
          kernel, decode kernel, tile shrink or pair sorter, launched without the PDL
          attribute) and of the tile variants below, against the torch backend (bench.py's
          check_case: both models, ranks 16/64, M 1-256, mixed ranks, a disabled slot).
  tax     the LoRA-tax layer (lora_tax.py: vLLM's base fused-MoE kernel + our delta, 4 layers
          in one CUDA graph), TAX_ROUNDS rounds, each timing the base alone and every variant
          once on the same layers (interleaved, so a drift of the machine hits all alike):
          the plan, PDL off entirely (round nine's probe), the first kernel without the PDL
          attribute in both projections / only w13 / only w2, and for the decode kernel the
          early route off and 16 warps. Medians per variant; "delta" = variant - base.
  tiles   bench.py's layer and single-call methods: GPT-OSS rank 16 at M = 4 (1 / 8 / 32
          adapters) with M = 1 / 16 (8 adapters) and rank 64 M = 4 as controls: the plan
          (first and last) against fewer K splits of the shrink, other block sizes / warps /
          stages of the shrink and expand, and first_pdl=False (what the rule would cost in
          a chain of our own kernels).
  tax2, final2 (second call, the shipped rules) the LoRA-tax layer of rank 16 at M = 1 / 4 / 16
          (1 and 8 adapters), interleaved: the plan as the vLLM plugin calls it (after_foreign)
          against round nine's plan as it was called; then GPT-OSS rank 16 at M <= 16 (every
          adapter count, the skewed cell) in both of bench.py's methods with vLLM's op in the
          same run, the plan against round nine's plan (r9plan: the naive shrink in 4 warps).
Writes DIR/round10_probe.json; prints tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.kernels import bench, lora_tax, round7, vllm_ops
from benchmarks.kernels.inputs import DEV, MODELS, layer_view, make_weights
from benchmarks.kernels.timing import graph_time, measure_peak_bw
from kernels.triton_plan import LaunchOptions

TAX_ROUNDS = 3
GPT, QWEN = "gpt-oss-20b", "qwen3-30b-a3b"


def log(*a):
    print(*a, flush=True)


def tax_cells():
    cells = [(QWEN, 16, n, m) for n in (1, 8) for m in (1, 4, 16)]
    cells += [(GPT, 16, n, m) for n in (1, 8) for m in (1, 4)]
    cells += [(mod, 64, 8, m) for mod in (QWEN, GPT) for m in (1, 4)]
    cells += [(GPT, 16, 8, 64), (QWEN, 16, 8, 256)]  # grouped: the pair sort first
    return cells


def tax2_cells():
    return [(mod, 16, n, m) for mod in (QWEN, GPT) for n in (1, 8) for m in (1, 4, 16)]


def tax2_variants(decode: bool):
    """The plan as the plugin calls it, round nine's plan as it was called (no after_foreign)."""
    return {
        "plan": (LaunchOptions(after_foreign=True),) * 2,
        "r9plan": (None, None, bench.R9_PLAN_KEYS),
    }


def tax_variants(decode: bool):
    """name -> (w13 options, w2 options[, plan keys]); None = the plan."""
    nf = LaunchOptions(first_pdl=False)
    v = {
        "plan": (None, None),
        "nopdl": (LaunchOptions(pdl=False), LaunchOptions(pdl=False)),
        "first": (nf, nf),
        "first13": (nf, None),
        "first2": (None, nf),
    }
    if decode:
        noer = LaunchOptions(decode_cfg={"EARLY_ROUTE": False})
        v["noer"] = (noer, noer)
        w16 = LaunchOptions(decode_cfg={"num_warps": 16})
        v["w16"] = (w16, w16)
        fw16 = LaunchOptions(first_pdl=False, decode_cfg={"num_warps": 16})
        v["first_w16"] = (fw16, fw16)
    return v


def tax(gen, res, save, second=False):
    base = vllm_ops.VllmBaseMoE()
    vllm = vllm_ops.VllmLoRA()
    rows = res["tax2" if second else "tax"] = []
    weights = {}
    for model, rank, n_act, m in tax2_cells() if second else tax_cells():
        if model not in weights:
            weights.clear()
            torch.cuda.empty_cache()
            weights[model] = lora_tax.base_weights(model, gen)
        w1, w2 = weights[model]
        pool = make_weights(model, n_act, rank, lora_tax.LAYERS, gen)
        views = [layer_view(pool, layer, n_act) for layer in range(lora_tax.LAYERS)]
        lays = lora_tax.cell_layers(base, vllm, model, rank, n_act, m, gen)
        path = bench.our_path_name(model, rank, m, n_act)
        variants = tax2_variants if second else tax_variants
        v = {"none": (None, None), **variants("decode1" in path)}
        times = {n: [] for n in v}
        for _ in range(TAX_ROUNDS):
            for name, (*opts, cfg) in ((n, (*o, None)[:3]) for n, o in v.items()):
                bench.PLAN_OVERRIDE.clear()
                bench.PLAN_OVERRIDE.update(cfg or {})

                def call(layer, name=name, opts=opts, lays=lays, views=views, w1=w1, w2=w2):
                    lora_tax.run_layer(
                        base, w1[layer], w2[layer], lays[layer],
                        "none" if name == "none" else "ours", views[layer], vllm, opts,
                    )  # fmt: skip

                times[name].append(graph_time(call, lora_tax.LAYERS)[0])
        bench.PLAN_OVERRIDE.clear()
        r = dict(model=model, rank=rank, adapters=n_act, M=m, path=path, times=times)
        med = {n: statistics.median(t) for n, t in times.items()}
        r["median_us"] = med
        r["delta_us"] = {n: med[n] - med["none"] for n in v if n != "none"}
        rows.append(r)
        log(f"tax {model} r{rank} a{n_act} M{m} ({path}): base {med['none']:.2f} | "
            + " ".join(f"{n} {d:+.2f}" for n, d in r["delta_us"].items()))  # fmt: skip
        save()
    log("\ntax: delta over base, µs (median of rounds; spread = max - min of the plan's rounds)")
    for r in rows:
        t = r["times"]["plan"]
        plan = r["delta_us"]["plan"]
        log(f"{r['model'][:6]} r{r['rank']} a{r['adapters']} M{r['M']} {r['path']}: base "
            f"{r['median_us']['none']:.2f}, plan {plan:.2f} (spread {max(t) - min(t):.2f}) | "
            + " ".join(f"{n} {d:.2f} ({d - plan:+.2f})" for n, d in r["delta_us"].items()
                       if n != "plan"))  # fmt: skip


def tile_variants(model, rank, n_act, m):
    v = {"auto": {}}
    if "decode1" not in bench.our_path_name(model, rank, m, n_act):
        v["ks8"] = dict(ksplit_max=8)
        v["ks4"] = dict(ksplit_max=4)
        v["sbk64"] = dict(shrink=dict(BLOCK_K=64))
        v["sw8"] = dict(shrink=dict(num_warps=8))
        v["sw2"] = dict(shrink=dict(num_warps=2))
        v["ss2"] = dict(shrink=dict(num_stages=2))
        v["ew8"] = dict(expand=dict(num_warps=8))
        v["ew2"] = dict(expand=dict(num_warps=2))
        v["ebn64"] = dict(expand=dict(BLOCK_N=64))
    v["first"] = dict(first_pdl=False)
    v["auto2"] = {}
    return v


def final2(gen, l2, peak, res, save):
    """GPT-OSS rank 16 at M <= 16, both methods, vLLM's op in the same run: plan vs r9plan."""
    vllm = vllm_ops.VllmLoRA()
    layer, single = res["final_layer"], res["final_single"] = [], []
    v = {"auto": {}, "r9plan": dict(cfg=bench.R9_PLAN_KEYS)}
    cells = [(n, m, False) for n in (1, 4, 8, 32) for m in (1, 4, 16)] + [(8, 16, True)]
    grp = None
    for n_act, m, skew in cells:
        if grp is None or grp.n_act != n_act:
            grp = None
            torch.cuda.empty_cache()
            grp = bench.Group(GPT, n_act, 16, gen)
        r = bench.time_cell(vllm, grp, m, skew, gen, l2, v, peak)
        r["our_path"] = bench.our_path_name(GPT, 16, m, n_act)
        layer.append(r)
        s = bench.time_single(vllm, GPT, 16, n_act, m, skew, gen, v)
        single += s
        log(f"final a{n_act} M{m}{' skewed' if skew else ''}: layer plan {r['ours_auto_us']:.2f} "
            f"r9plan {r['ours_r9plan_us']:.2f} vllm {r['vllm_us']:.2f} "
            f"(x {r['vllm_us'] / r['ours_auto_us']:.3f} / {r['vllm_us'] / r['ours_r9plan_us']:.3f})"
            + "".join(f" | {x['proj']} {x['ours_auto_us']:.2f} / {x['ours_r9plan_us']:.2f} "
                      f"vllm {x['vllm_us']:.2f}" for x in s))  # fmt: skip
        save()


def tile_cells():
    cells = [(GPT, 16, n, 4) for n in (1, 8, 32)]
    cells += [(GPT, 16, 8, 1), (GPT, 16, 8, 16), (GPT, 64, 1, 4), (QWEN, 16, 1, 4)]
    return cells


def tiles(gen, l2, peak, res, save):
    layer, single = res["layer"], res["single"] = [], []
    groups = {}
    for model, rank, n_act, m in tile_cells():
        key = (model, n_act, rank)
        if key not in groups:
            groups.clear()
            torch.cuda.empty_cache()
            groups[key] = bench.Group(model, n_act, rank, gen)
        v = tile_variants(model, rank, n_act, m)
        r = bench.time_cell(None, groups[key], m, False, gen, l2, v, peak)
        r["our_path"] = bench.our_path_name(model, rank, m, n_act)
        layer.append(r)
        log(f"layer {model} r{rank} a{n_act} M{m} ({r['our_path']}): "
            + " ".join(f"{n} {r[f'ours_{n}_us']:.2f}" for n in v))  # fmt: skip
        for s in bench.time_single(None, model, rank, n_act, m, False, gen, v):
            s["our_path"] = r["our_path"]
            single.append(s)
        save()
    groups.clear()
    torch.cuda.empty_cache()
    res["layer_rules"] = round7.rule_summary(layer, "layer")
    res["single_rules"] = round7.rule_summary(single, "single")
    round7.table(layer, "layer method")
    round7.table(single, "single-call method")


def check(gen):
    v = {
        "auto": {},
        "first": dict(first_pdl=False),
        "first_tiles": dict(first_pdl=False, decode=False),
        "first_grouped": dict(first_pdl=False, decode=False, mode="grouped"),
        "first_count4": dict(first_pdl=False, decode=False, mode="grouped", sorter="count4"),
        "first_countr": dict(first_pdl=False, decode=False, mode="grouped", sorter="countr"),
        "ks4_sw2": dict(decode=False, ksplit_max=4, shrink=dict(num_warps=2)),
        "sbk64_ew2": dict(decode=False, shrink=dict(BLOCK_K=64), expand=dict(num_warps=2)),
        "ebn64_ss2": dict(decode=False, expand=dict(BLOCK_N=64), shrink=dict(num_stages=2)),
    }
    rows = []
    for model in MODELS:
        for rank in (16, 64):
            for m, n_act in ((1, 1), (4, 8), (16, 8), (64, 4), (256, 8)):
                rows += bench.check_case(None, model, rank, m, n_act, gen, v)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="check,tax,tiles")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    which = args.parts.split(",")
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 60 << 20)
    peak = measure_peak_bw()
    gen = torch.Generator(device=DEV).manual_seed(10)
    res = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), peak_copy_gbps=peak, plan=round7._cfg())
    log(f"copy bandwidth {peak:.0f} GB/s")

    def save():
        (out / "round10_probe.json").write_text(json.dumps(res, indent=1, default=str))

    if "check" in which:
        res["check"] = rows = check(gen)
        bad = [r for r in rows if not r["ok"]]
        worst = max(rows, key=lambda r: max(r["w13_max"], r["w2_max"]))
        log(f"[{time.time() - t0:.0f}s] check: {len(rows) - len(bad)}/{len(rows)} ok, worst "
            f"max-rel {max(worst['w13_max'], worst['w2_max']):.2e}")  # fmt: skip
        for r in bad:
            log("  FAIL", r)
        save()
        if bad:
            log("check failed: no timing")
            return
    if "tax" in which:
        tax(gen, res, save)
        log(f"[{time.time() - t0:.0f}s] tax done")
        save()
    if "tax2" in which:
        tax(gen, res, save, second=True)
        log(f"[{time.time() - t0:.0f}s] tax2 done")
        save()
    if "final2" in which:
        final2(gen, l2, peak, res, save)
        log(f"[{time.time() - t0:.0f}s] final2 done")
        save()
    if "tiles" in which:
        tiles(gen, l2, peak, res, save)
        log(f"[{time.time() - t0:.0f}s] tiles done")
        save()
    log(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
