"""Round six of issue 13 on one GPU: the helper refactor of kernels/triton_moe_lora.py checked
against the code before it, and the pair-sorter probe, in one call.

    python -m benchmarks.kernels.round6 --out DIR --old PATH/triton_moe_lora.py [--parts ...]

  bitwise   the module before the refactor (--old, a copy of kernels/triton_moe_lora.py at the
            previous commit, loaded under another name) against the current one: the plan and
            forced paths (tile naive/grouped, the decode kernel with and without PDL, its L2
            prefetch and early route, a wrong early guess) on the same inputs, outputs
            compared bit for bit; then the PTX of every kernel both compiled (same cache
            keys), line info and debug sections stripped, compared text for text.
  timing    old and new at M = 1, 4, 16, both models, ranks 16/64, 1 and 8 adapters, both
            timing methods (bench.py's time_cell / time_single), interleaved twice on the
            same inputs (new, old, new, old); then the PTX comparison of what they compiled.
  sorter    the pair sorter at 1024 pairs (GPT-OSS M = 256; the plan: the one-program
            tl.sort "onepass") against the relaxed one-program counting sort ("count1r"),
            uniform and skewed routing, layer method, each twice; and Qwen3 M = 64 32 adapters
            (512 pairs, 4096 groups).
Writes DIR/round6_probe.json; prints a table per part.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import time
from pathlib import Path

import torch

from benchmarks.kernels import bench
from benchmarks.kernels.inputs import MODELS
from benchmarks.kernels.timing import measure_peak_bw
from kernels import triton_moe_lora as new_mod
from kernels.triton_plan import LaunchOptions


def log(*a):
    print(*a, flush=True)


MODS = {"new": new_mod}
CURRENT = ["new"]


class _Proxy:
    """bench.py's `ours`, dispatching to the module the last options_of() call selected."""

    def __getattr__(self, name):
        return getattr(MODS[CURRENT[0]], name)


def _options_of(opts: dict) -> LaunchOptions:
    CURRENT[0] = opts.get("mod", "new")
    return LaunchOptions(**{k: v for k, v in opts.items() if k not in ("path", "mod")})


def install(old_path: str):
    spec = importlib.util.spec_from_file_location("kernels._triton_moe_lora_before", old_path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    MODS["old"] = old
    bench.ours = _Proxy()
    bench.options_of = _options_of


def _strip_ptx(ptx: str) -> list[str]:
    cut = ptx.find(".section\t.debug")
    if cut < 0:
        cut = ptx.find(".section .debug")
    if cut >= 0:
        ptx = ptx[:cut]
    keep = []
    for line in ptx.splitlines():
        s = line.strip()
        if not s or s.startswith((".loc", ".file", "//")):
            continue
        keep.append(re.sub(r"\s+", " ", s))
    return keep


def _opcodes(lines: list[str]) -> dict:
    """Instruction count per PTX opcode (register numbering and order ignored)."""
    h = {}
    for s in lines:
        if s.startswith((".", "$", "{", "}", ")", "(")) or s.endswith(":"):
            continue
        op = s.split(" ", 1)[0].rstrip(";")
        if op.startswith("@"):
            op = s.split(" ", 2)[1] if " " in s else op
        h[op] = h.get(op, 0) + 1
    return h


def _compiled(mod):
    out = {}
    for fname in ("_tile_shrink_kernel", "_tile_expand_kernel", "_decode_kernel"):
        fn = getattr(mod, fname)
        for _dev, entry in fn.device_caches.items():
            cache = entry[0]
            for key, k in cache.items():
                if not hasattr(k, "asm"):
                    continue
                out[(fname, str(key))] = k
    return out


def compare_ptx():
    old, new = _compiled(MODS["old"]), _compiled(MODS["new"])
    rows = []
    for key in sorted(set(old) | set(new)):
        if key not in old or key not in new:
            rows.append(dict(kernel=key[0], matched=False))
            continue
        po, pn = _strip_ptx(old[key].asm["ptx"]), _strip_ptx(new[key].asm["ptx"])
        diff = sum(a != b for a, b in zip(po, pn, strict=False)) + abs(len(po) - len(pn))
        ho, hn = _opcodes(po), _opcodes(pn)
        op_diff = sum(abs(ho.get(o, 0) - hn.get(o, 0)) for o in set(ho) | set(hn))
        ro, rn = getattr(old[key], "n_regs", None), getattr(new[key], "n_regs", None)
        so, sn = getattr(old[key], "n_spills", None), getattr(new[key], "n_spills", None)
        rows.append(
            dict(
                kernel=key[0],
                matched=True,
                ptx_lines=len(pn),
                ptx_lines_differing=diff,
                identical=diff == 0,
                instr_old=sum(ho.values()),
                instr_new=sum(hn.values()),
                opcode_count_diff=op_diff,
                regs_old=ro,
                regs_new=rn,
                spills_old=so,
                spills_new=sn,
            )
        )
    return rows


def bitwise(gen):
    """Every --check variant, old and new module, same inputs: outputs equal bit for bit."""
    cases = [(1, 1), (4, 8), (16, 8), (64, 32), (256, 8), (1024, 32)]
    base = ("auto", "tile-naive", "grouped-count1r", "decode1", "decode1-nopf-nopdl")
    extra = {
        "decode1-l2pf": dict(decode_max_pairs=1 << 30, decode_cfg={"L2_PREFETCH": True}),
        "decode1-early": dict(decode_max_pairs=1 << 30, decode_cfg={"EARLY_ROUTE": True}),
        "decode1-early-wrong": dict(
            decode_max_pairs=1 << 30, decode_cfg={"EARLY_ROUTE": True, "SPEC_TEST": True}
        ),
    }
    variants = {**{n: bench.CHECK_VARIANTS[n] for n in base}, **extra}
    rows = []
    for model, spec in MODELS.items():
        k, h, i = spec["top_k"], spec["hidden"], spec["inter"]
        for rank in (16, 64):
            for m, n_act in cases:
                topk_ids, slots, topk_w = bench.make_routing(
                    m, model, n_act, False, gen, no_adapter=0.25
                )
                w = bench.make_weights(model, n_act + 1, rank, 1, gen, mixed_ranks=True)
                w = bench.layer_view(w, 0, n_act + 1)
                enabled = torch.ones(n_act + 2, dtype=torch.int32, device="cuda")
                enabled[n_act] = 0
                if m > 2:  # some tokens on the disabled slot
                    slots[: m // 8] = n_act
                x = torch.randn(m, h, device="cuda", generator=gen).to(torch.bfloat16)
                hh = torch.randn(m * k, i, device="cuda", generator=gen).to(torch.bfloat16)
                b13 = torch.randn(m, k, 2 * i, device="cuda", generator=gen).to(torch.bfloat16)
                b2 = torch.randn(m, k, h, device="cuda", generator=gen).to(torch.bfloat16)
                names = variants if m <= 16 else ("auto", "tile-naive", "grouped-count1r")
                for name in names:
                    outs = {}
                    for mod in ("old", "new"):
                        o13, o2 = b13.clone(), b2.clone()
                        opts = {**variants[name], "mod": mod}
                        bench.run_ours(
                            opts, o13, o2, x, hh, topk_ids, slots, topk_w, w, enabled,
                            n_act + 1, spec["experts"],
                        )  # fmt: skip
                        torch.cuda.synchronize()
                        outs[mod] = (o13, o2)
                    same = all(
                        torch.equal(a, b) for a, b in zip(outs["old"], outs["new"], strict=True)
                    )
                    rows.append(dict(model=model, rank=rank, M=m, adapters=n_act, variant=name,
                                     identical=same))  # fmt: skip
    return rows


def timings(gen, l2, peak):
    # "auto" = the new module (bench.py's time_single reports the "auto" variant as ours_us)
    v = {"auto": {}, "old": {"mod": "old"}, "new2": {}, "old2": {"mod": "old"}}
    layer, single = [], []
    for model in MODELS:
        for rank in (16, 64):
            for n_act in (1, 8):
                grp = bench.Group(model, n_act, rank, gen)
                for m in (1, 4, 16):
                    r = bench.time_cell(None, grp, m, False, gen, l2, v, peak)
                    r["our_path"] = bench.our_path_name(model, rank, m, n_act)
                    layer.append(r)
                    log(
                        f"layer {model} r{rank} a{n_act} M{m}: "
                        + " ".join(f"{n} {r[f'ours_{n}_us']:.2f}" for n in v)
                    )
                del grp
                torch.cuda.empty_cache()
                for m in (1, 4, 16):
                    for r in bench.time_single(None, model, rank, n_act, m, False, gen, v):
                        r["our_path"] = bench.our_path_name(model, rank, m, n_act)
                        single.append(r)
    return layer, single


def sorter_probe(gen, l2, peak):
    v = {
        "onepass": dict(mode="grouped", sorter="onepass"),
        "count1r": dict(mode="grouped", sorter="count1r"),
        "onepass2": dict(mode="grouped", sorter="onepass"),
        "count1r2": dict(mode="grouped", sorter="count1r"),
    }
    cells = [
        ("gpt-oss-20b", 16, 1, 256, False),
        ("gpt-oss-20b", 16, 4, 256, False),
        ("gpt-oss-20b", 16, 8, 256, False),
        ("gpt-oss-20b", 16, 8, 256, True),
        ("gpt-oss-20b", 64, 1, 256, False),
        ("gpt-oss-20b", 64, 8, 256, True),
        ("qwen3-30b-a3b", 64, 32, 64, False),
    ]
    rows = []
    for model, rank, n_act, m, skew in cells:
        grp = bench.Group(model, n_act, rank, gen)
        r = bench.time_cell(None, grp, m, skew, gen, l2, v, peak)
        rows.append(r)
        log(
            f"sorter {model} r{rank} a{n_act} M{m} {'skew' if skew else 'unif'}: "
            + " ".join(f"{n} {r[f'ours_{n}_us']:.1f}" for n in v)
        )
        del grp
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--old", required=True)
    ap.add_argument("--parts", default="bitwise,timing,sorter")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    install(args.old)
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 60 << 20)
    peak = measure_peak_bw()
    gen = torch.Generator(device="cuda").manual_seed(6)
    res = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), peak_copy_gbps=peak)

    def save():
        (out / "round6_probe.json").write_text(json.dumps(res, indent=1, default=str))

    def ptx():
        res["ptx"] = rows = compare_ptx()
        same = sum(1 for r in rows if r.get("identical"))
        ops = sum(1 for r in rows if r.get("opcode_count_diff") == 0)
        regs = sum(1 for r in rows if r.get("regs_old") == r.get("regs_new"))
        log(
            f"PTX (line info stripped) old vs new: {same}/{len(rows)} kernels identical text, "
            f"{ops}/{len(rows)} same count per opcode, {regs}/{len(rows)} same registers"
        )
        for r in rows:
            if r.get("opcode_count_diff") or r.get("regs_old") != r.get("regs_new"):
                log("  ", r)
        save()

    if "bitwise" in parts:
        res["bitwise"] = bw = bitwise(gen)
        bad = [r for r in bw if not r["identical"]]
        log(f"[{time.time() - t0:.0f}s] bitwise old vs new: {len(bw) - len(bad)}/{len(bw)} equal")
        for r in bad:
            log("  DIFFERS", r)
        ptx()
    if "timing" in parts:
        res["layer"], res["single"] = timings(gen, l2, peak)
        save()
        ptx()
        for name, rows in (("layer", res["layer"]), ("single", res["single"])):
            ratios = []
            log(f"\n{name} (µs): cell | new | old | new2 | old2 | new/old (min of two each)")
            for r in rows:
                nw = min(r["ours_auto_us"], r["ours_new2_us"])
                od = min(r["ours_old_us"], r["ours_old2_us"])
                ratios.append(nw / od)
                log(
                    f"{r['model'][:6]} r{r['rank']} a{r['adapters']} M{r['M']} {r.get('proj', '')}"
                    f" | {r['ours_auto_us']:.2f} | {r['ours_old_us']:.2f} | {r['ours_new2_us']:.2f}"
                    f" | {r['ours_old2_us']:.2f} | {nw / od:.3f} | {r['our_path']}"
                )
            res[f"{name}_ratio"] = dict(
                median=statistics.median(ratios), min=min(ratios), max=max(ratios)
            )
            log(f"{name}: new/old median {statistics.median(ratios):.3f} "
                f"[{min(ratios):.3f}, {max(ratios):.3f}]")  # fmt: skip
        save()
    if "sorter" in parts:
        res["sorter"] = sorter_probe(gen, l2, peak)
        save()
    log(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
