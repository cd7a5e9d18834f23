"""GPU stress test and timing of the pair sorters (kernels/triton_pair_sort.py).

Races between programs do not show in Triton's CPU interpreter, so the counting sorters are
checked here on the GPU, many times, in three ways:

  sync   one sort, then a full check (tile table, sorted pairs, counters left zero);
  burst  many sorts back to back with different inputs and sizes, onepass sorts and other
         kernels in between, PDL on, checked only at the end;
  graph  a CUDA graph of many different sorts, replayed several times, checked after each
         replay;

plus the whole op (w13 then w2 on w13's routing) against the torch backend at the real model
shapes, and the sorters' time in CUDA graphs. The check of a routing is exact: the tile table
must equal the one computed in torch (groups ascending, BLOCK_M rows per tile), every row of
a tile must hold a pair of the tile's group, the rows must be a permutation of the active pairs,
and the self-cleaning counters must be zero again.

    python -m benchmarks.kernels.stress_sort --out DIR [--cases N] [--old PATH] [--parts ...]

--old PATH loads another module with the same sort_pairs() (e.g. an earlier sorter) and
checks it as sorter "old".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time

import torch

from benchmarks.kernels.bench import check_case
from benchmarks.kernels.inputs import MODELS
from kernels import triton_pair_sort as tps
from kernels import triton_util

DEV = "cuda"
PDL = dict(PDL=True, launch_pdl=True)


def log(*a):
    print(*a, flush=True)


def random_case(gen, m=None, experts=None, top_k=None, slots=None):
    experts = experts or [32, 128][int(torch.randint(2, (1,), generator=gen))]
    top_k = top_k or [4, 8][int(torch.randint(2, (1,), generator=gen))]
    slots = slots or int(torch.randint(1, 34, (1,), generator=gen))
    if m is None:
        m = int(math.exp(torch.rand(1, generator=gen).item() * math.log(4096)))
    topk = torch.rand(m, experts, generator=gen).argsort(dim=1)[:, :top_k].to(torch.int32)
    tok_slots = torch.randint(0, slots, (m,), generator=gen, dtype=torch.int32)
    no_adapter = torch.rand(1, generator=gen).item() * 0.5
    tok_slots[torch.rand(m, generator=gen) < no_adapter] = -1
    enabled = None
    if torch.rand(1, generator=gen).item() < 0.5:
        enabled = torch.ones(slots, dtype=torch.int32)
        enabled[int(torch.randint(slots, (1,), generator=gen))] = 0
    bm = [16, 32, 64][int(torch.randint(3, (1,), generator=gen))]
    return dict(
        topk=topk.to(DEV),
        slots=tok_slots.to(DEV),
        enabled=None if enabled is None else enabled.to(DEV),
        num_slots=slots,
        experts=experts,
        block_m=bm,
    )


def expected(c):
    """Tile table and group offsets the sorters must produce, in torch."""
    topk, slots, e, s = c["topk"], c["slots"], c["experts"], c["num_slots"]
    k = topk.shape[1]
    ps = slots.long().repeat_interleave(k)
    active = ps >= 0
    if c["enabled"] is not None:
        active &= c["enabled"][ps.clamp(min=0)] != 0
    keys = torch.where(active, ps * e + topk.reshape(-1).long(), -1)
    counts = torch.bincount(keys[active], minlength=s * e)
    bm = c["block_m"]
    ntile = (counts + bm - 1) // bm
    groups = torch.arange(s * e, device=DEV)
    tile_group = groups.repeat_interleave(ntile)
    row_off = torch.cumsum(counts, 0) - counts
    tile_j = (
        torch.arange(tile_group.numel(), device=DEV) - (torch.cumsum(ntile, 0) - ntile)[tile_group]
    )
    tile_row0 = row_off[tile_group] + tile_j * bm
    tile_cnt = torch.minimum(counts[tile_group] - tile_j * bm, torch.tensor(bm, device=DEV))
    row_group = groups.repeat_interleave(counts)
    return dict(
        keys=keys,
        active_idx=active.nonzero().squeeze(1),
        tile_group=tile_group,
        tile_row0=tile_row0,
        tile_cnt=tile_cnt,
        row_group=row_group,
    )


def check_routing(r, want) -> str:
    """'' if the routing is exactly right, else what is wrong."""
    nt = want["tile_group"].numel()
    if int(r.num_tiles.item()) != nt:
        return f"num_tiles {int(r.num_tiles.item())} != {nt}"
    for name in ("tile_group", "tile_row0", "tile_cnt"):
        got = getattr(r, name)[:nt].long()
        if not torch.equal(got, want[name]):
            bad = int((got != want[name]).sum())
            return f"{name}: {bad} of {nt} tiles differ"
    n = want["active_idx"].numel()
    rows = r.sorted_pairs[:n].long()
    if n and (rows.min() < 0 or rows.max() >= want["keys"].numel()):
        return "sorted_pairs out of range"
    if not torch.equal(torch.sort(rows).values, want["active_idx"]):
        return "sorted_pairs is not a permutation of the active pairs"
    if not torch.equal(want["keys"][rows], want["row_group"]):
        return "a row holds a pair of another group"
    return ""


def counters_clean() -> bool:
    return all(int(b.abs().sum()) == 0 for b in triton_util._SELF_CLEANING.values()) and all(
        int(b.abs().sum()) == 0 for b in getattr(OLD, "_BUF", {}).values()
    )


OLD = None


def sort(c, sorter, pdl=True):
    mod = tps
    if sorter == "old":
        mod, sorter = OLD, "count"
    return mod.sort_pairs(
        c["topk"],
        c["slots"],
        c["enabled"],
        c["num_slots"],
        c["experts"],
        c["block_m"],
        sorter,
        PDL if pdl else dict(PDL=False),
    )


def stress(sorters, n_cases, gen, results):
    noise_a = torch.randn(2048, 2048, device=DEV, dtype=torch.bfloat16)
    for sorter in sorters:
        fails = dict(sync=0, burst=0, graph=0, dirty=0)
        examples = []
        runs = dict(sync=0, burst=0, graph=0)
        t0 = time.time()
        # sync: one sort, full check
        for i in range(n_cases):
            c = random_case(gen)
            pdl = bool(i % 4)
            r = sort(c, sorter, pdl)
            torch.cuda.synchronize()
            err = check_routing(r, expected(c))
            runs["sync"] += 1
            if err:
                fails["sync"] += 1
                examples.append(("sync", c["topk"].shape, c["num_slots"], c["experts"], err))
            if not counters_clean():
                fails["dirty"] += 1
                examples.append(("dirty after sync", c["topk"].shape))
                for b in triton_util._SELF_CLEANING.values():
                    b.zero_()
                for b in getattr(OLD, "_BUF", {}).values():
                    b.zero_()
        # burst: back to back, other work between, checked at the end
        for _ in range(max(1, n_cases // 40)):
            batch = []
            for j in range(40):
                c = random_case(gen)
                if j % 3 == 0:
                    noise_a @ noise_a  # a kernel of another size between sorts
                if j % 5 == 0 and c["topk"].numel() <= 4096:
                    sort(c, "onepass")
                batch.append((c, sort(c, sorter)))
            torch.cuda.synchronize()
            for c, r in batch:
                runs["burst"] += 1
                err = check_routing(r, expected(c))
                if err:
                    fails["burst"] += 1
                    examples.append(("burst", c["topk"].shape, c["num_slots"], c["experts"], err))
            if not counters_clean():
                fails["dirty"] += 1
        # graph: 24 different sorts captured once, replayed
        for _ in range(max(1, n_cases // 100)):
            cases = [random_case(gen) for _ in range(24)]
            for c in cases:  # warm-up (compiles) outside the capture
                sort(c, sorter)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                routes = [sort(c, sorter) for c in cases]
            wants = [expected(c) for c in cases]
            for _rep in range(5):
                for r in routes:  # poison the outputs between replays
                    r.sorted_pairs.fill_(-7)
                    r.num_tiles.fill_(-7)
                g.replay()
                torch.cuda.synchronize()
                for c, r, w in zip(cases, routes, wants, strict=True):
                    runs["graph"] += 1
                    err = check_routing(r, w)
                    if err:
                        fails["graph"] += 1
                        examples.append(("graph", c["topk"].shape, c["num_slots"], err))
            del g
            if not counters_clean():
                fails["dirty"] += 1
        res = dict(runs=runs, fails=fails, examples=[str(e) for e in examples[:20]])
        res["seconds"] = round(time.time() - t0, 1)
        results["stress"][sorter] = res
        log(f"stress {sorter}: runs {runs} fails {fails} ({res['seconds']} s)")
        for e in examples[:5]:
            log("   ", e)


def op_checks(sorters, n_per_sorter, gen, results):
    """The whole op, routing from each sorter, against the torch backend (bench --check rows)."""
    cases = []
    for i in range(n_per_sorter):
        model = list(MODELS)[i % 2]
        rank = [16, 64][(i // 2) % 2]
        m = [256, 300, 512, 1024, 2048][int(torch.randint(5, (1,), generator=gen))]
        n_act = [1, 4, 8, 32][int(torch.randint(4, (1,), generator=gen))]
        cases.append((model, rank, m, n_act))
    out = {}
    for sorter in sorters:
        opts = {"grouped": dict(mode="grouped", sorter=sorter)}
        if sorter == "old":
            continue
        bad, worst = 0, 0.0
        t0 = time.time()
        g2 = torch.Generator(device=DEV)
        g2.manual_seed(1234)
        for model, rank, m, n_act in cases:
            for row in check_case(None, model, rank, m, n_act, g2, opts):
                worst = max(worst, row["w13_max"], row["w2_max"])
                if not row["ok"]:
                    bad += 1
                    log("  op FAIL", sorter, row)
        out[sorter] = dict(cases=len(cases), failed=bad, worst_max_rel=worst)
        log(
            f"op check {sorter}: {len(cases) - bad}/{len(cases)} ok, worst max-rel {worst:.2e} "
            f"({time.time() - t0:.0f} s)"
        )
    results["op_checks"] = out


def time_sorters(sorters, results):
    """Median time of one sort in a CUDA graph of 20 sorts (inputs differ per sort)."""
    gen = torch.Generator()
    gen.manual_seed(7)
    rows = []
    for experts, top_k, slots in ((128, 8, 2), (128, 8, 33), (32, 4, 2), (32, 4, 9)):
        for m in (64, 128, 256, 512, 1024, 2048):
            p = m * top_k
            cases = [
                random_case(gen, m=m, experts=experts, top_k=top_k, slots=slots) for _ in range(20)
            ]
            for c in cases:
                c["block_m"] = 16
                c["enabled"] = None
            row = dict(experts=experts, top_k=top_k, slots=slots, M=m, pairs=p)
            for sorter in sorters:
                if sorter == "onepass" and p > 4096:
                    continue
                for c in cases:
                    sort(c, sorter)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for c in cases:
                        sort(c, sorter)
                g.replay()
                torch.cuda.synchronize()
                ts = []
                for _ in range(30):
                    a, b = (
                        torch.cuda.Event(enable_timing=True),
                        torch.cuda.Event(enable_timing=True),
                    )
                    a.record()
                    g.replay()
                    b.record()
                    torch.cuda.synchronize()
                    ts.append(a.elapsed_time(b) * 1e3 / len(cases))
                row[sorter] = round(statistics.median(ts), 2)
                del g
            rows.append(row)
    results["sort_times_us"] = rows
    head = ["E", "k", "S", "M", "P"] + sorters
    log("sort time, µs per sort (CUDA graph of 20, hot):")
    log(" ".join(f"{h:>10}" for h in head))
    for r in rows:
        vals = [r["experts"], r["top_k"], r["slots"], r["M"], r["pairs"]]
        vals += [r.get(s, "-") for s in sorters]
        log(" ".join(f"{v:>10}" for v in vals))


OP_CELLS = [  # (model, rank, adapters, M, skewed): the single-call cells the sorter decides
    ("qwen3-30b-a3b", 16, 1, 256, False),
    ("qwen3-30b-a3b", 16, 1, 512, False),
    ("qwen3-30b-a3b", 16, 1, 1024, False),
    ("qwen3-30b-a3b", 16, 8, 256, True),
    ("qwen3-30b-a3b", 16, 32, 512, False),
    ("gpt-oss-20b", 16, 1, 512, False),
    ("gpt-oss-20b", 16, 1, 2048, False),
]


def op_timing(sorters, results):
    """bench.py's single-call method (one projection call x20 in a CUDA graph, routing built per
    call) with each sorter forced, beside vLLM's op on the same inputs."""
    from benchmarks.kernels import vllm_ops
    from benchmarks.kernels.bench import time_single

    try:
        vllm = vllm_ops.VllmLoRA()
    except Exception as exc:  # noqa: BLE001
        log(f"vLLM op copy unavailable: {exc!r}")
        vllm = None
    gen = torch.Generator(device=DEV).manual_seed(99)
    variants = {"auto": {}}
    variants.update({s: dict(mode="grouped", sorter=s) for s in sorters})
    rows = []
    for model, rank, n_act, m, skew in OP_CELLS:
        for r in time_single(vllm, model, rank, n_act, m, skew, gen, variants):
            rows.append(r)
            parts = " ".join(f"{s} {r[f'ours_{s}_us']:.1f}" for s in sorters)
            log(
                f"{model} r{rank} a{n_act} M{m} {r['proj']} {r['routing']}: vllm "
                f"{r.get('vllm_us', float('nan')):.1f} auto {r['ours_auto_us']:.1f} {parts}"
            )
    results["op_timing"] = rows


def main():
    global OLD
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", type=int, default=400)
    ap.add_argument("--op-cases", type=int, default=40)
    ap.add_argument("--old", default=None)
    ap.add_argument("--sorters", default="count1,count1_cg,count,count4")
    ap.add_argument("--parts", default="stress,op,timing")
    args = ap.parse_args()
    sorters = args.sorters.split(",")
    if args.old:
        spec = importlib.util.spec_from_file_location("old_sorter", args.old)
        OLD = importlib.util.module_from_spec(spec)
        sys.modules["old_sorter"] = OLD
        spec.loader.exec_module(OLD)
        sorters.append("old")
    results = dict(
        info=dict(
            gpu=torch.cuda.get_device_name(),
            torch=torch.__version__,
            triton=__import__("triton").__version__,
            date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        ),
        stress={},
    )
    gen = torch.Generator()
    gen.manual_seed(2026)
    try:
        parts = args.parts.split(",")
        if "stress" in parts:
            stress(sorters, args.cases, gen, results)
        if "op" in parts:
            op_checks([s for s in sorters if s != "old"], args.op_cases, gen, results)
        if "timing" in parts:
            time_sorters(["onepass"] + [s for s in sorters if s != "old"], results)
        if "op_timing" in parts:
            op_timing([s for s in sorters if s != "old"], results)
    finally:
        with open(f"{args.out}/stress_sort_{'_'.join(args.parts.split(','))}.json", "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
