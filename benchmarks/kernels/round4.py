"""Round four of issue 13 on one GPU: the probes behind the round's changes, in one call.

    python -m benchmarks.kernels.round4 --out DIR [--parts sorters,single,fused]

  sorters  the relaxed-atomic one-program counting sort (count1r): GPU stress checks of its
           routing and op checks (benchmarks/kernels/stress_sort.py), then sort-alone times
           beside count1 / count.
  single   the single-call cells still slower than vLLM after round three (Qwen3 r16 a1 M=256
           w2, r16 a8 M=256 w2 skewed, r16 a1 M=512 w13) and their neighbours, with the plan
           and forced variants: pair sorter, BLOCK_M, waves (bench.py's time_single).
  fused    the fused base+LoRA decode prototype (kernels/triton_fused_moe.py): correctness at
           the model shapes, then a whole MoE layer at M <= 16 in the LoRA-tax method
           (benchmarks/kernels/lora_tax.py: 4 layers with their own weights in one CUDA graph):
           vLLM's base alone and + our separate delta; our GEMV base alone, + our separate
           delta, and with the delta fused.
Writes DIR/round4.json; prints a table per part, the last one last.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.kernels import stress_sort, vllm_ops
from benchmarks.kernels.bench import time_single
from benchmarks.kernels.inputs import DEV, MODELS, layer_view, make_weights
from benchmarks.kernels.lora_tax import LAYERS, Layer, silu_and_mul
from benchmarks.kernels.lora_tax import run_layer as tax_layer
from benchmarks.kernels.timing import graph_time, measure_peak_bw
from kernels import triton_fused_moe as tfm
from kernels import triton_moe_lora as ours


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------


def part_sorters(results, cases):
    results.setdefault("stress", {})
    stress_sort.stress(["count1r"], cases, _cpu_gen(2026), results)
    stress_sort.op_checks(["count1r"], 40, _cpu_gen(2027), results)
    stress_sort.time_sorters(["count1", "count1r", "count", "count4"], results)


def _cpu_gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


SINGLE_CELLS = [  # (model, rank, adapters, M, skewed)
    ("qwen3-30b-a3b", 16, 1, 256, False),
    ("qwen3-30b-a3b", 16, 8, 256, True),
    ("qwen3-30b-a3b", 16, 1, 512, False),
    ("qwen3-30b-a3b", 16, 8, 256, False),
    ("qwen3-30b-a3b", 16, 8, 512, False),
    ("qwen3-30b-a3b", 64, 1, 512, False),
    ("gpt-oss-20b", 16, 1, 512, False),
    ("gpt-oss-20b", 16, 1, 1024, False),
]
SINGLE_VARIANTS = {
    "auto": {},
    "count1": dict(mode="grouped", sorter="count1"),
    "count1r": dict(mode="grouped", sorter="count1r"),
    "count": dict(mode="grouped", sorter="count"),
    "count4": dict(mode="grouped", sorter="count4"),
    "r_bm16": dict(mode="grouped", sorter="count1r", block_m=16),
    "r_bm32": dict(mode="grouped", sorter="count1r", block_m=32),
    "r_w2": dict(mode="grouped", sorter="count1r", waves=2),
    "r_w4": dict(mode="grouped", sorter="count1r", waves=4),
    "r_w8": dict(mode="grouped", sorter="count1r", waves=8),
    "r_nopf": dict(mode="grouped", sorter="count1r", prefetch=False),
}


def part_single(results):
    try:
        vllm = vllm_ops.VllmLoRA()
    except Exception as exc:  # noqa: BLE001
        log(f"vLLM op copy unavailable: {exc!r}")
        vllm = None
    gen = torch.Generator(device=DEV).manual_seed(99)
    rows = []
    for model, rank, n_act, m, skew in SINGLE_CELLS:
        for r in time_single(vllm, model, rank, n_act, m, skew, gen, SINGLE_VARIANTS):
            rows.append(r)
            log(
                f"single {model} r{rank} a{n_act} M{m} {r['proj']} {r['routing']}: vllm "
                f"{r.get('vllm_us', float('nan')):.1f} "
                + " ".join(f"{n} {r[f'ours_{n}_us']:.1f}" for n in SINGLE_VARIANTS)
            )
        results["single"] = rows
    head = ["cell", "vLLM"] + list(SINGLE_VARIANTS)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cell = (
            f"{r['model'][:5]} r{r['rank']} a{r['adapters']} M{r['M']} {r['proj']}"
            f"{' skew' if r['routing'] == 'skewed' else ''}"
        )
        vals = [f"{r.get('vllm_us', float('nan')):.1f}"]
        vals += [f"{r[f'ours_{n}_us']:.1f}" for n in SINGLE_VARIANTS]
        out.append("| " + " | ".join([cell] + vals) + " |")
    return "\n".join(out)


FINAL_CELLS = [  # the cells still slower than vLLM after round three, three times each
    ("qwen3-30b-a3b", 16, 1, 512, False),
    ("qwen3-30b-a3b", 16, 1, 256, False),
    ("qwen3-30b-a3b", 16, 8, 256, True),
] * 3
FINAL_VARIANTS = {
    "auto": {},
    "count1r": dict(mode="grouped", sorter="count1r"),
    "countr": dict(mode="grouped", sorter="countr"),
    "count1r_en128": dict(mode="grouped", sorter="count1r", expand={"BLOCK_N": 128}),
}


def part_final(results):
    global SINGLE_CELLS, SINGLE_VARIANTS
    SINGLE_CELLS, SINGLE_VARIANTS = FINAL_CELLS, FINAL_VARIANTS
    table = part_single(results)
    results["final"] = results.pop("single")
    return table


BN_CELLS = [  # grouped BLOCK_M 32 cells: the expand's BLOCK_N 64 (plan) vs 128, both methods
    ("qwen3-30b-a3b", 16, 1, 256),
    ("qwen3-30b-a3b", 64, 1, 256),
    ("gpt-oss-20b", 16, 1, 512),
    ("gpt-oss-20b", 16, 4, 512),
    ("qwen3-30b-a3b", 16, 1, 512),
    ("gpt-oss-20b", 16, 1, 1024),
    ("qwen3-30b-a3b", 16, 1, 1024),
]
BN_VARIANTS = {"auto": {}, "en128": dict(expand={"BLOCK_N": 128})}


def part_bn(results, peak):
    from benchmarks.kernels.bench import Group, time_cell

    vllm = vllm_ops.VllmLoRA()
    gen = torch.Generator(device=DEV).manual_seed(77)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    out = ["| cell | method | vLLM | auto | en128 |", "|---|---|---|---|---|"]
    for model, rank, n_act, m in BN_CELLS:
        for r in time_single(vllm, model, rank, n_act, m, False, gen, BN_VARIANTS):
            rows.append({**r, "method": "single"})
        grp = Group(model, n_act, rank, gen)
        r = time_cell(vllm, grp, m, False, gen, l2, BN_VARIANTS, peak)
        rows.append({**r, "method": "layer", "proj": "w13+w2"})
        del grp
        torch.cuda.empty_cache()
        for r in rows[-3:]:
            line = (
                f"| {model[:5]} r{rank} a{n_act} M{m} {r['proj']} | {r['method']} | "
                f"{r['vllm_us']:.1f} | {r['ours_auto_us']:.1f} | {r['ours_en128_us']:.1f} |"
            )
            out.append(line)
            log(line)
        results["bn"] = rows
    return "\n".join(out)


CONFIRM_CELLS = [  # the plan as shipped after the full run, and variants around the last loser
    ("qwen3-30b-a3b", 16, 1, 512, False),
    ("qwen3-30b-a3b", 16, 1, 256, False),
    ("qwen3-30b-a3b", 16, 8, 256, True),
    ("qwen3-30b-a3b", 16, 1, 1024, False),
    ("gpt-oss-20b", 16, 1, 1024, False),
]
_R = dict(mode="grouped", sorter="countr")
CONFIRM_VARIANTS = {
    "auto": {},
    "countr": _R,
    "r_b512": {**_R, "sort_block": 512},
    "r_b2048": {**_R, "sort_block": 2048},
    "r_nopf": {**_R, "prefetch": False},
    "r_w2": {**_R, "waves": 2},
    "r_w8": {**_R, "waves": 8},
    "r_bm16": {**_R, "block_m": 16},
    "r_bm64": {**_R, "block_m": 64},
    "r_en128": {**_R, "expand": {"BLOCK_N": 128}},
    "r_ew8": {**_R, "expand": {"num_warps": 8}},
    "r_sk64": {**_R, "shrink": {"BLOCK_K": 64}},
}


def part_confirm(results):
    global SINGLE_CELLS, SINGLE_VARIANTS
    SINGLE_CELLS, SINGLE_VARIANTS = CONFIRM_CELLS, CONFIRM_VARIANTS
    table = part_single(results)
    results["confirm"] = results.pop("single")
    return table


# ---------------------------------------------------------------------------------------------

GEMV_CFGS = {
    "c32x256": dict(BLOCK_N=32, BLOCK_K=256, num_warps=4),
    "c64x128": dict(BLOCK_N=64, BLOCK_K=128, num_warps=4),
    "c16x512": dict(BLOCK_N=16, BLOCK_K=512, num_warps=4),
}


def our_layer(w1, w2, lay, adapters, mode, cfg):
    """One MoE layer with our GEMV base: mode "base" (no LoRA), "sep" (+ our production delta,
    two launches per projection, as lora_tax's "ours"), "fused" (delta in the base epilogue)."""
    lora13 = lora2 = None
    if mode == "fused":
        lora13 = dict(token_slots=lay.slots, a=adapters["a13"], b=adapters["b13"])
        lora2 = dict(token_slots=lay.slots, a=[adapters["a2"]], b=[adapters["b2"]])
        lora13["enabled"] = lora2["enabled"] = lay.enabled
    tfm.fused_moe_w13(lay.cache1, lay.x, w1, lay.topk_ids, lora=lora13, cfg=cfg)
    routing = None
    if mode == "sep":
        routing = ours.add_moe_lora_w13(
            lay.cache1, lay.x, lay.topk_ids, lay.slots, adapters["a13"], adapters["b13"],
            lay.enabled,
        )  # fmt: skip
    silu_and_mul(lay.cache2, lay.cache1.view(lay.cache2.shape[0], -1))
    tfm.fused_moe_w2(lay.cache3, lay.cache2, w2, lay.topk_ids, lay.topk_w, lora=lora2, cfg=cfg)
    if mode == "sep":
        ours.add_moe_lora_w2(
            lay.cache3, lay.cache2, lay.topk_ids, lay.topk_w, lay.slots, adapters["a2"],
            adapters["b2"], lay.enabled, routing=routing,
        )  # fmt: skip
    torch.sum(lay.cache3, dim=1, out=lay.out)


FUSED_CELLS = [  # (rank, adapters)
    (16, 8),
    (16, 1),
    (64, 8),
]
FUSED_M = [1, 4, 16]


def fused_correctness(results):
    from kernels.model_shapes import MODEL_SHAPES
    from tests.kernels.cases import make_case
    from tests.kernels.fused_cases import check_fused

    rows = []
    for model in MODELS:
        s = MODEL_SHAPES[model]
        for m, n_act, rank in ((1, 1, 16), (4, 8, 16), (16, 8, 64), (13, 4, 16)):
            c = make_case(
                m + rank, m, s.hidden, s.inter, s.experts, s.top_k, n_act + 1, rank,
                torch.bfloat16, device=DEV, no_adapter=0.25,
            )  # fmt: skip
            enabled = torch.ones(n_act + 2, dtype=torch.int32, device=DEV)
            enabled[n_act] = 0
            for kind in ("w13", "w2"):
                try:
                    err = check_fused(kind, c, torch.bfloat16, enabled, seed=m)
                    rows.append(dict(model=model, M=m, rank=rank, kind=kind, ok=True, err=err))
                except AssertionError as exc:
                    rows.append(
                        dict(model=model, M=m, rank=rank, kind=kind, ok=False, err=str(exc))
                    )
                log(f"fused check {rows[-1]}")
    results["fused_check"] = rows
    return all(r["ok"] for r in rows)


def part_fused(results, peak):
    ok = fused_correctness(results)
    log(f"fused correctness: {'ok' if ok else 'FAILED'}")
    base = vllm_ops.VllmBaseMoE()
    gen = torch.Generator(device=DEV).manual_seed(4321)
    rows = []
    for model in MODELS:
        s = MODELS[model]
        e, h, i = s["experts"], s["hidden"], s["inter"]

        def randn(*shape, scale):
            return torch.empty(*shape, device=DEV, dtype=torch.bfloat16).normal_(
                0, scale, generator=gen
            )

        w1 = [randn(e, 2 * i, h, scale=h**-0.5) for _ in range(LAYERS)]
        w2 = [randn(e, h, i, scale=i**-0.5) for _ in range(LAYERS)]
        for rank, n_act in FUSED_CELLS:
            pool = make_weights(model, n_act, rank, LAYERS, gen)
            views = [layer_view(pool, layer, n_act) for layer in range(LAYERS)]
            for m in FUSED_M:

                def base_meta(topk_ids, model=model, e=e):
                    return base.prepare(model, e, topk_ids)

                lays = [
                    Layer(model, m, n_act, gen, base_meta, lambda *a: None) for _ in range(LAYERS)
                ]
                res = dict(model=model, rank=rank, adapters=n_act, M=m)
                modes = {"vbase": ("v", "none", None), "vbase+ours": ("v", "ours", None)}
                for cn, cfg in GEMV_CFGS.items():
                    modes[f"obase_{cn}"] = ("o", "base", cfg)
                    modes[f"fused_{cn}"] = ("o", "fused", cfg)
                modes["obase+ours"] = ("o", "sep", GEMV_CFGS["c32x256"])
                for name, (who, mode, cfg) in modes.items():

                    def call(
                        layer, who=who, mode=mode, cfg=cfg, lays=lays, views=views, w1=w1, w2=w2
                    ):
                        if who == "v":
                            tax_layer(
                                base, w1[layer], w2[layer], lays[layer], mode, views[layer], None
                            )
                        else:
                            our_layer(w1[layer], w2[layer], lays[layer], views[layer], mode, cfg)

                    try:
                        res[name], _ = graph_time(call, LAYERS)
                    except Exception as exc:  # noqa: BLE001
                        log(f"fused {model} r{rank} a{n_act} M{m} {name} failed: {exc!r}")
                        res[name] = float("nan")
                rows.append(res)
                log(f"fused {json.dumps(res)}")
                results["fused_layer"] = rows
            del pool, views
            torch.cuda.empty_cache()
        w1 = w2 = None
        torch.cuda.empty_cache()
    names = list(rows[0])[4:] if rows else []
    out = [
        "| model | r | a | M | " + " | ".join(names) + " |",
        "|" + "---|" * (4 + len(names)),
    ]
    for r in rows:
        vals = [f"{r[n]:.1f}" for n in names]
        out.append(
            f"| {r['model'][:7]} | {r['rank']} | {r['adapters']} | {r['M']} | "
            + " | ".join(vals)
            + " |"
        )
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="sorters,single,fused")
    ap.add_argument("--cases", type=int, default=200)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    import triton

    results = dict(
        info=dict(
            gpu=torch.cuda.get_device_name(0),
            torch=torch.__version__,
            triton=triton.__version__,
            date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        )
    )
    results["info"]["peak_copy_gbps"] = peak = measure_peak_bw()
    log(json.dumps(results["info"]))
    tables = []
    parts = args.parts.split(",")
    try:
        if "sorters" in parts:
            part_sorters(results, args.cases)
            log(f"[{time.time() - t0:.0f}s] sorters done")
        if "single" in parts:
            tables.append(part_single(results))
            log(f"[{time.time() - t0:.0f}s] single done")
        if "stress2" in parts:
            results.setdefault("stress", {})
            stress_sort.stress(["countr"], args.cases, _cpu_gen(2028), results)
            stress_sort.op_checks(["countr"], 40, _cpu_gen(2029), results)
            log(f"[{time.time() - t0:.0f}s] stress2 done")
        if "confirm" in parts:
            tables.append(part_confirm(results))
            log(f"[{time.time() - t0:.0f}s] confirm done")
        if "stress3" in parts:  # countr with 512 pairs per counting program, as shipped
            orig = stress_sort.tps.sort_pairs

            def sort_pairs_512(*a, **k):
                if a[6] == "countr":
                    k.setdefault("sort_block", 512)
                return orig(*a, **k)

            stress_sort.tps.sort_pairs = sort_pairs_512
            results.setdefault("stress", {})
            stress_sort.stress(["countr"], args.cases, _cpu_gen(2030), results)
            results["stress"]["countr_block512"] = results["stress"].pop("countr")
            stress_sort.tps.sort_pairs = orig
            log(f"[{time.time() - t0:.0f}s] stress3 done")
        if "bn" in parts:
            tables.append(part_bn(results, peak))
            log(f"[{time.time() - t0:.0f}s] bn done")
        if "final" in parts:
            tables.append(part_final(results))
            log(f"[{time.time() - t0:.0f}s] final done")
        if "fused" in parts:
            tables.append(part_fused(results, peak))
            log(f"[{time.time() - t0:.0f}s] fused done")
    finally:
        (out / "round4.json").write_text(json.dumps(results, indent=1))
        log("\n\n".join(tables))
        log(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
