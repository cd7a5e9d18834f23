"""The LoRA tax of a whole MoE layer on one GPU: what LoRA on the experts adds to the layer.

    python -m benchmarks.kernels.lora_tax --out DIR     # GPU machine, .vllm_ref carried

One layer call = vLLM 0.32.0's base fused-MoE Triton kernel for gate_up (w13) into
cache1 [M, top_k, 2I], SiLU-and-mul into cache2 [M * top_k, I], the base kernel for down (w2,
scaled by the routing weight) into cache3 [M, top_k, H], and the sum over top_k; the LoRA
deltas go where vLLM's FusedMoEWithLoRA puts them: w13's into cache1 before the activation,
w2's into cache3 before the sum. Timed three ways on the same inputs: base alone, base + vLLM's
fused_moe_lora, base + ours (our routing built in w13, reused by w2, and timed; called as the
vLLM plugin calls it: LaunchOptions(after_foreign=True), round ten). vLLM's align
metadata (base and LoRA) is built outside the timed region. bf16, every token has an adapter.

Cold L2: LAYERS layer calls, each with its own base and adapter weights and routing, in one CUDA
graph (a GPT-OSS-20B layer's base weights are 1.6 GB, Qwen3-30B-A3B's 1.2 GB: the L2 holds
none of them between layers). Median replay / LAYERS = one layer; x the model's layer count =
the expert work of one decode step (attention and the rest of the model not included).

LoRA tax = (base + LoRA) / base - 1. The base is shown against its HBM floor: the distinct
experts' w13 and w2 weights it must read (bf16) over the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from benchmarks.kernels import vllm_ops
from benchmarks.kernels.inputs import DEV, DTYPE, MODELS, layer_view, make_routing, make_weights
from benchmarks.kernels.timing import graph_time, measure_peak_bw
from kernels import triton_moe_lora as ours
from kernels.model_shapes import MODEL_SHAPES
from kernels.triton_plan import LaunchOptions

LAYERS = 4
GRID_M = [1, 4, 16, 64, 256, 1024, 4096]
GRID_ADAPTERS = [1, 8, 32]
GRID_RANKS = [16, 64]


def log(*a):
    print(*a, flush=True)


@triton.jit
def _silu_and_mul_kernel(out_ptr, in_ptr, n_cols, BLOCK: tl.constexpr):
    """out[row] = silu(in[row, :n]) * in[row, n:]: one launch, as vLLM's silu_and_mul."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(in_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(in_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(out: torch.Tensor, gate_up: torch.Tensor) -> None:
    rows, n = out.shape
    _silu_and_mul_kernel[(rows, triton.cdiv(n, 1024))](out, gate_up, n, BLOCK=1024)


class Layer:
    """Buffers and metadata of one layer call (the weights are views into the model's pools)."""

    def __init__(self, model, m, n_act, gen, base_meta, lora_meta):
        spec = MODELS[model]
        k, h, i = spec["top_k"], spec["hidden"], spec["inter"]
        self.topk_ids, self.slots, self.topk_w = make_routing(m, model, n_act, False, gen)
        self.x = torch.randn(m, h, device=DEV, generator=gen).to(DTYPE)
        self.cache1 = torch.empty(m, k, 2 * i, device=DEV, dtype=DTYPE)
        self.cache2 = torch.empty(m * k, i, device=DEV, dtype=DTYPE)
        self.cache3 = torch.empty(m, k, h, device=DEV, dtype=DTYPE)
        self.out = torch.empty(m, h, device=DEV, dtype=DTYPE)
        self.enabled = torch.ones(n_act + 1, dtype=torch.int32, device=DEV)
        self.base = base_meta(self.topk_ids)
        self.lora = lora_meta(self.topk_ids, self.slots, self.enabled)


# LaunchOptions of our op: the plan, called as the vLLM plugin calls it (round ten: after_foreign,
# the kernel before each delta is vLLM's base GEMM); --ours-options adds fields.
OURS_OPTIONS = LaunchOptions(after_foreign=True)


def run_layer(base, w1, w2, lay: Layer, lora: str, adapters, vllm, options=None):
    """One layer call; options: (w13, w2) LaunchOptions of our op (None: OURS_OPTIONS)."""
    k = lay.topk_ids.shape[1]
    o13, o2 = options if options is not None else (OURS_OPTIONS, OURS_OPTIONS)
    base.gemm(lay.x, w1, lay.cache1, lay.topk_w, lay.base, False, k)
    routing = None
    if lora == "ours":
        routing = ours.add_moe_lora_w13(
            lay.cache1,
            lay.x,
            lay.topk_ids,
            lay.slots,
            adapters["a13"],
            adapters["b13"],
            lay.enabled,
            **({"options": o13} if o13 is not None else {}),
        )
    elif lora == "vllm":
        vllm.w13(lay.cache1, lay.x, adapters["a13"], adapters["b13"], lay.topk_w, lay.lora)
    silu_and_mul(lay.cache2, lay.cache1.view(lay.cache2.shape[0], -1))
    base.gemm(lay.cache2, w2, lay.cache3, lay.topk_w, lay.base, True, 1)
    if lora == "ours":
        ours.add_moe_lora_w2(
            lay.cache3,
            lay.cache2,
            lay.topk_ids,
            lay.topk_w,
            lay.slots,
            adapters["a2"],
            adapters["b2"],
            lay.enabled,
            routing=routing,
            **({"options": o2} if o2 is not None else {}),
        )
    elif lora == "vllm":
        vllm.w2(lay.cache3, lay.cache2, adapters["a2"], adapters["b2"], lay.topk_w, lay.lora)
    torch.sum(lay.cache3, dim=1, out=lay.out)


def base_weights(model, gen):
    """LAYERS layers' base expert weights (w13 [E, 2I, H], w2 [E, H, I]), N(0, 1/fan-in)."""
    s = MODELS[model]
    e, h, i = s["experts"], s["hidden"], s["inter"]

    def randn(*shape, scale):
        return torch.empty(*shape, device=DEV, dtype=DTYPE).normal_(0, scale, generator=gen)

    w1 = [randn(e, 2 * i, h, scale=h**-0.5) for _ in range(LAYERS)]
    w2 = [randn(e, h, i, scale=i**-0.5) for _ in range(LAYERS)]
    return w1, w2


def cell_layers(base, vllm, model, rank, n_act, m, gen):
    """LAYERS layer calls' buffers, routing and both align metadata of one cell."""
    e = MODELS[model]["experts"]

    def base_meta(topk_ids):
        return base.prepare(model, e, topk_ids)

    def lora_meta(topk_ids, slots, enabled):
        return vllm.prepare(model, e, rank, topk_ids, slots, enabled, n_act)

    return [Layer(model, m, n_act, gen, base_meta, lora_meta) for _ in range(LAYERS)]


def base_bytes(model, topk_ids):
    """Distinct experts' w13 + w2 weights (bf16) + x in, out written: the base's HBM floor."""
    s = MODELS[model]
    distinct = int(torch.unique(topk_ids).numel())
    m = topk_ids.shape[0]
    return distinct * 3 * s["hidden"] * s["inter"] * 2 + 2 * 2 * m * s["hidden"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "tax_out"))
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--adapters", default=",".join(map(str, GRID_ADAPTERS)))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ranks", default=",".join(map(str, GRID_RANKS)))
    ap.add_argument("--grid-m", default=",".join(map(str, GRID_M)))
    ap.add_argument(
        "--ours-options", default=None, help='LaunchOptions fields as JSON, e.g. {"decode": false}'
    )
    ap.add_argument(
        "--ours-cfg",
        default=None,
        help="plan keys overriding the GPU's plan for our op, as JSON; r7plan / r8plan / r9plan = "
        "round seven's / eight's / nine's",
    )
    args = ap.parse_args()
    global OURS_OPTIONS
    if args.ours_cfg:
        from benchmarks.kernels import bench  # installs the plan override (bench.PLAN_OVERRIDE)

        named = {
            "r7plan": bench.R7_PLAN_KEYS,
            "r8plan": bench.R8_PLAN_KEYS,
            "r9plan": bench.R9_PLAN_KEYS,
        }
        cfg = named[args.ours_cfg] if args.ours_cfg in named else json.loads(args.ours_cfg)
        bench.PLAN_OVERRIDE.update(cfg)
    if args.ours_options:
        OURS_OPTIONS = LaunchOptions(**{"after_foreign": True, **json.loads(args.ours_options)})
    GRID_RANKS[:] = [int(v) for v in args.ranks.split(",")]
    GRID_M[:] = [int(v) for v in args.grid_m.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    info = dict(
        gpu=torch.cuda.get_device_name(0),
        torch=torch.__version__,
        triton=triton.__version__,
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        vllm_ref=vllm_ops.source(),
        layers_in_graph=LAYERS,
        ours_options=args.ours_options,
        ours_cfg=args.ours_cfg,
    )
    info["peak_copy_gbps"] = peak = measure_peak_bw()
    log(json.dumps(info))
    base = vllm_ops.VllmBaseMoE()
    vllm = vllm_ops.VllmLoRA()
    gen = torch.Generator(device=DEV).manual_seed(4321)
    rows = []
    adapters_grid = [int(a) for a in args.adapters.split(",")]
    for model in args.models.split(","):
        w1, w2 = base_weights(model, gen)
        for rank in GRID_RANKS:
            for n_act in adapters_grid:
                pool = make_weights(model, n_act, rank, LAYERS, gen)
                views = [layer_view(pool, layer, n_act) for layer in range(LAYERS)]
                for m in GRID_M:
                    if time.time() - start > args.budget_s:
                        break

                    lays = cell_layers(base, vllm, model, rank, n_act, m, gen)
                    res = dict(model=model, rank=rank, adapters=n_act, M=m)
                    try:
                        for lora in ("none", "vllm", "ours"):

                            def call(layer, lora=lora, lays=lays, views=views, w1=w1, w2=w2):
                                run_layer(
                                    base,
                                    w1[layer],
                                    w2[layer],
                                    lays[layer],
                                    lora,
                                    views[layer],
                                    vllm,
                                )

                            res[f"{lora}_us"], _ = graph_time(call, LAYERS)
                    except Exception as exc:  # noqa: BLE001
                        log(f"tax {model} r{rank} a{n_act} M{m} failed: {exc!r}")
                        continue
                    floor_us = statistics.mean(base_bytes(model, lay.topk_ids) for lay in lays) / (
                        peak * 1e3
                    )
                    res["base_floor_pct"] = 100 * floor_us / res["none_us"]
                    res["tax_vllm_pct"] = 100 * (res["vllm_us"] / res["none_us"] - 1)
                    res["tax_ours_pct"] = 100 * (res["ours_us"] / res["none_us"] - 1)
                    n_layers = MODEL_SHAPES[model].layers
                    for lora in ("none", "vllm", "ours"):
                        res[f"step_{lora}_ms"] = res[f"{lora}_us"] * n_layers / 1e3
                    rows.append(res)
                    log(
                        f"tax {model} r{rank} a{n_act} M{m}: base {res['none_us']:.1f}us "
                        f"({res['base_floor_pct']:.0f}% floor) +vllm {res['vllm_us']:.1f} "
                        f"(+{res['tax_vllm_pct']:.0f}%) +ours {res['ours_us']:.1f} "
                        f"(+{res['tax_ours_pct']:.0f}%)"
                    )
                    (out / "lora_tax.json").write_text(json.dumps(dict(info=info, rows=rows)))
                del pool, views
                torch.cuda.empty_cache()
    table = [
        "| model | r | adapters | M | base µs | % floor | +vLLM µs | +ours µs | tax vLLM | "
        "tax ours | ours/vLLM tax | step base / +vLLM / +ours ms |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        ratio = r["tax_ours_pct"] / r["tax_vllm_pct"] if r["tax_vllm_pct"] > 0 else float("nan")
        table.append(
            f"| {r['model']} | {r['rank']} | {r['adapters']} | {r['M']} | {r['none_us']:.1f} | "
            f"{r['base_floor_pct']:.0f} | {r['vllm_us']:.1f} | {r['ours_us']:.1f} | "
            f"{r['tax_vllm_pct']:.0f}% | {r['tax_ours_pct']:.0f}% | {ratio:.2f} | "
            f"{r['step_none_ms']:.2f} / {r['step_vllm_ms']:.2f} / {r['step_ours_ms']:.2f} |"
        )
    (out / "lora_tax.json").write_text(json.dumps(dict(info=info, rows=rows), indent=1))
    (out / "lora_tax.md").write_text("\n".join(table) + "\n")
    log("\n".join(table))
    log(f"total {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
