"""Round five of issue 13 on one GPU: the probes behind the round's plan, in one call.

    python -m benchmarks.kernels.round5 --out DIR [--parts decode,big]

  decode  the one-launch decode kernel (kernels/triton_moe_lora.py, _decode_kernel) against the
          tile path (two launches per projection) at M = 1-64, both models, ranks 16/64,
          8 adapters (and 1 at M = 1), in both timing methods (bench.py's time_cell: cold-L2
          layer stack; time_single: one projection repeated, hot L2), with variants of its
          block sizes, warps and the L2 prefetch before the PDL wait. vLLM is not timed here
          (the grid run times it).
  big     the M >= 256 cells below 50% of the HBM floor in round four, layer method, with the
          plan and forced variants (waves, BLOCK_M, expand BLOCK_N, no prefetch).
Writes DIR/round5_probe.json; prints a table per part, the last one last.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from benchmarks.kernels.bench import Group, our_path_name, time_cell, time_single
from benchmarks.kernels.inputs import DEV
from benchmarks.kernels.timing import measure_peak_bw
from kernels.triton_util import pdl_wait


def log(*a):
    print(*a, flush=True)


_D = dict(decode_max_pairs=1 << 30)
DECODE_VARIANTS = {
    "auto": {},
    "tiles": dict(decode=False),
    "dec": _D,
    "dec_nopf": {**_D, "decode_cfg": {"L2_PREFETCH": False}},
    "dec_bn128": {**_D, "decode_cfg": {"BLOCK_N": 128}},
    "dec_bn512": {**_D, "decode_cfg": {"BLOCK_N": 512}},
    "dec_w16": {**_D, "decode_cfg": {"num_warps": 16}},
    "dec_w4": {**_D, "decode_cfg": {"num_warps": 4}},
}
# second call: the plan as set from the first (BLOCK_N 512, no L2 prefetch) and the early route
DECODE2_VARIANTS = {
    "auto": {},
    "tiles": dict(decode=False),
    "dec": _D,
    "dec_early": {**_D, "decode_cfg": {"EARLY_ROUTE": True}},
    "dec_early_w16": {**_D, "decode_cfg": {"EARLY_ROUTE": True, "num_warps": 16}},
    "dec_early_pf": {**_D, "decode_cfg": {"EARLY_ROUTE": True, "L2_PREFETCH": True}},
}
DECODE2_CELLS = [
    ("qwen3-30b-a3b", 16, 8, 1),
    ("qwen3-30b-a3b", 16, 1, 1),
    ("qwen3-30b-a3b", 16, 8, 4),
    ("qwen3-30b-a3b", 16, 8, 16),
    ("gpt-oss-20b", 16, 8, 1),
    ("qwen3-30b-a3b", 64, 8, 1),
]
DECODE_CELLS = [  # (model, rank, adapters, M)
    (model, rank, n_act, m)
    for model in ("gpt-oss-20b", "qwen3-30b-a3b")
    for rank in (16, 64)
    for n_act, m in ((1, 1), (8, 1), (8, 4), (8, 16), (8, 64))
]

BIG_VARIANTS = {
    "auto": {},
    "w4": dict(waves=4),
    "w8": dict(waves=8),
    "bm32": dict(mode="grouped", block_m=32),
    "bm64": dict(mode="grouped", block_m=64),
    "en64": dict(expand={"BLOCK_N": 64}),
    "en256": dict(expand={"BLOCK_N": 256, "num_warps": 8}),
    "nopf": dict(prefetch=False),
}
BIG_CELLS = [
    ("gpt-oss-20b", 16, 1, 256),
    ("gpt-oss-20b", 16, 4, 256),
    ("gpt-oss-20b", 64, 1, 256),
    ("gpt-oss-20b", 64, 1, 1024),
    ("qwen3-30b-a3b", 16, 1, 256),
    ("qwen3-30b-a3b", 64, 1, 1024),
]


def _table(rows, names, method_key="method"):
    head = ["cell", "method", "path"] + names
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = f"{r['model'][:5]} r{r['rank']} a{r['adapters']} M{r['M']}"
        vals = [f"{r.get(f'ours_{n}_us', float('nan')):.1f}" for n in names]
        out.append("| " + " | ".join([c, r[method_key], r.get("our_path", "")] + vals) + " |")
    return "\n".join(out)


@triton.jit
def _chain(src, dst, w, w_stride, READS: tl.constexpr, WEIGHTS: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    v = tl.zeros((256,), dtype=tl.float32)
    if READS:
        v += tl.load(src + tl.arange(0, 256))
    if WEIGHTS:
        base = w + tl.program_id(0).to(tl.int64) * w_stride
        a = tl.load(base + tl.arange(0, 16)[:, None] * 2048 + tl.arange(0, 2048)[None, :])
        v += tl.sum(tl.reshape(tl.sum(a.to(tl.float32), axis=0), (8, 256)), axis=0)
    tl.store(dst + tl.arange(0, 256), v)


def part_floor(results):
    """What one dependent launch costs on its own: chains of 400 tiny kernels in a CUDA graph
    (each waits for the previous one, as our launches do), per kernel: an empty one, one that
    reads one value written by the previous kernel (one L2 round trip after the wait), and one
    that also reads 64 KB of cold weights (a fresh block each kernel) after the wait."""
    from benchmarks.kernels.timing import graph_time

    bufs = [torch.zeros(256, device=DEV) for _ in range(2)]
    nw = 4096
    w = torch.randn(nw, 16 * 2048, device=DEV).to(torch.bfloat16)  # 256 MB: cold per kernel
    rows = []
    for name, reads, weights in (
        ("empty", False, False),
        ("1 L2 read", True, False),
        ("+64KB cold", True, True),
    ):
        for pdl in (False, True):
            kw = dict(PDL=True, launch_pdl=True) if pdl else dict(PDL=False)

            def call(i, reads=reads, weights=weights, kw=kw, w=w):
                _chain[(8,)](
                    bufs[i % 2],
                    bufs[(i + 1) % 2],
                    w[i * 8 :],
                    w.stride(0),
                    READS=reads,
                    WEIGHTS=weights,
                    **kw,
                )

            us, _ = graph_time(call, 400)  # 400 x 8 x 64 KB = 210 MB of weights
            rows.append(dict(kernel=name, pdl=pdl, us_per_kernel=us))
            log(f"floor {name} pdl={pdl}: {us:.2f} us per dependent kernel")
    results["launch_floor"] = rows
    del w
    torch.cuda.empty_cache()
    out = ["| kernel (8 programs) | no PDL µs | PDL µs |", "|---|---|---|"]
    for i in range(0, len(rows), 2):
        out.append(
            f"| {rows[i]['kernel']} | {rows[i]['us_per_kernel']:.2f} | "
            f"{rows[i + 1]['us_per_kernel']:.2f} |"
        )
    return "\n".join(out)


def part_decode2(results, peak):
    global DECODE_VARIANTS, DECODE_CELLS
    DECODE_VARIANTS, DECODE_CELLS = DECODE2_VARIANTS, DECODE2_CELLS
    table = part_decode(results, peak)
    results["decode2"] = results.pop("decode")
    return table


def part_decode(results, peak):
    gen = torch.Generator(device=DEV).manual_seed(555)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    groups = {}
    for model, rank, n_act, m in DECODE_CELLS:
        key = (model, rank, n_act)
        if key not in groups:
            groups.clear()
            torch.cuda.empty_cache()
            groups[key] = Group(model, n_act, rank, gen)
        try:
            r = time_cell(None, groups[key], m, False, gen, l2, DECODE_VARIANTS, peak)
            r["method"] = "layer"
            r["our_path"] = our_path_name(model, rank, m, n_act)
            rows.append(r)
            for s in time_single(None, model, rank, n_act, m, False, gen, DECODE_VARIANTS):
                s["method"] = f"single {s['proj']}"
                rows.append(s)
        except Exception as exc:  # noqa: BLE001
            log(f"decode {model} r{rank} a{n_act} M{m} failed: {exc!r}")
            continue
        for r in rows[-3:]:
            log(
                f"decode {model} r{rank} a{n_act} M{m} {r['method']}: "
                + " ".join(f"{n} {r[f'ours_{n}_us']:.1f}" for n in DECODE_VARIANTS)
            )
        results["decode"] = rows
    groups.clear()
    torch.cuda.empty_cache()
    return _table(rows, list(DECODE_VARIANTS))


def part_big(results, peak):
    gen = torch.Generator(device=DEV).manual_seed(556)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for model, rank, n_act, m in BIG_CELLS:
        grp = Group(model, n_act, rank, gen)
        try:
            r = time_cell(None, grp, m, False, gen, l2, BIG_VARIANTS, peak)
        except Exception as exc:  # noqa: BLE001
            log(f"big {model} r{rank} a{n_act} M{m} failed: {exc!r}")
            continue
        finally:
            del grp
            torch.cuda.empty_cache()
        r["method"] = "layer"
        r["our_path"] = our_path_name(model, rank, m, n_act)
        for n in BIG_VARIANTS:
            r[f"floor_{n}_pct"] = r["floor_pct"] * r["ours_auto_us"] / r[f"ours_{n}_us"]
        rows.append(r)
        log(
            f"big {model} r{rank} a{n_act} M{m} (floor {r['floor_pct']:.0f}%): "
            + " ".join(f"{n} {r[f'ours_{n}_us']:.1f}" for n in BIG_VARIANTS)
        )
        results["big"] = rows
    return _table(rows, list(BIG_VARIANTS))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="decode,big")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    import triton

    from kernels.triton_plan import plan_config
    from kernels.triton_util import device_name

    results = dict(
        info=dict(
            gpu=torch.cuda.get_device_name(0),
            torch=torch.__version__,
            triton=triton.__version__,
            date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            plan=plan_config(device_name(0)),
        )
    )
    results["info"]["peak_copy_gbps"] = peak = measure_peak_bw()
    log(json.dumps(results["info"]))
    tables = []
    parts = args.parts.split(",")
    try:
        if "big" in parts:
            tables.append(part_big(results, peak))
            log(f"[{time.time() - t0:.0f}s] big done")
        if "decode" in parts:
            tables.append(part_decode(results, peak))
            log(f"[{time.time() - t0:.0f}s] decode done")
        if "floor" in parts:
            tables.append(part_floor(results))
            log(f"[{time.time() - t0:.0f}s] floor done")
        if "decode2" in parts:
            tables.append(part_decode2(results, peak))
            log(f"[{time.time() - t0:.0f}s] decode2 done")
    finally:
        (out / "round5_probe.json").write_text(json.dumps(results, indent=1))
        log("\n\n".join(tables))
        log(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
