"""Benchmark inputs: routing, adapter weights in vLLM's slot layout, and the bytes a layer call
must move at least (the HBM floor)."""

from __future__ import annotations

import torch

from kernels.model_shapes import BENCHMARK_MODELS, MODEL_SHAPES

MODELS = {
    name: dict(hidden=s.hidden, inter=s.inter, experts=s.experts, top_k=s.top_k)
    for name, s in MODEL_SHAPES.items()
    if name in BENCHMARK_MODELS
}
DEV = "cuda"
DTYPE = torch.bfloat16


def make_routing(m, model, n_act, skew, gen, no_adapter=0.0):
    spec = MODELS[model]
    e, k = spec["experts"], spec["top_k"]
    if skew:  # Zipf-like popularity of experts (a1.2) and adapters (a1.5)
        pe = (1.0 / torch.arange(1, e + 1, device=DEV).float() ** 1.2)[
            torch.randperm(e, device=DEV, generator=gen)
        ]
        topk_ids = torch.multinomial(pe.expand(m, e), k, replacement=False, generator=gen)
        ps = 1.0 / torch.arange(1, n_act + 1, device=DEV).float() ** 1.5
        slots = torch.multinomial(ps, m, replacement=True, generator=gen)
    else:
        topk_ids = torch.rand(m, e, device=DEV, generator=gen).argsort(dim=1)[:, :k]
        slots = torch.empty(m, dtype=torch.long, device=DEV)
        slots[torch.randperm(m, device=DEV, generator=gen)] = torch.arange(m, device=DEV) % n_act
    if no_adapter:
        slots[torch.rand(m, device=DEV, generator=gen) < no_adapter] = -1
    w = torch.softmax(torch.randn(m, k, device=DEV, generator=gen), dim=-1)
    return topk_ids.to(torch.int32).contiguous(), slots.to(torch.int32), w.float()


def make_weights(model, slots, rank, layers, gen, mixed_ranks=False):
    s = MODELS[model]
    h, i, e = s["hidden"], s["inter"], s["experts"]
    n = layers * slots

    def randn(*shape, scale):
        t = torch.empty(*shape, device=DEV, dtype=DTYPE)
        return t.normal_(0.0, scale, generator=gen)

    w = dict(
        a13=[randn(n, e, rank, h, scale=h**-0.5) for _ in range(2)],
        b13=[randn(n, e, i, rank, scale=rank**-0.5) for _ in range(2)],
        a2=randn(n, e, rank, i, scale=i**-0.5),
        b2=randn(n, e, h, rank, scale=rank**-0.5),
    )
    if mixed_ranks:  # slot s of each layer holds an adapter of rank max(1, rank >> (s % 4))
        for slot in range(n):
            r = max(1, rank >> (slot % 4))
            for a in [*w["a13"], w["a2"]]:
                a[slot, :, r:] = 0
            for b in [*w["b13"], w["b2"]]:
                b[slot, :, :, r:] = 0
    return w


def layer_view(w, layer, slots):
    sl = slice(layer * slots, (layer + 1) * slots)
    return dict(
        a13=[a[sl] for a in w["a13"]], b13=[b[sl] for b in w["b13"]], a2=w["a2"][sl], b2=w["b2"][sl]
    )


def bytes_moved(model, rank, topk_ids, slots):
    s = MODELS[model]
    h, i, e, k = s["hidden"], s["inter"], s["experts"], s["top_k"]
    pair_slot = slots.long().repeat_interleave(k)
    active = pair_slot >= 0
    keys = (pair_slot * e + topk_ids.reshape(-1).long())[active]
    distinct = int(torch.unique(keys).numel())
    pairs = int(active.sum())
    tokens = int((slots >= 0).sum())
    weights = distinct * 2 * 3 * rank * (h + i)  # w13 A,B (2 slices) + w2 A,B, bf16
    acts = 2 * (tokens * h + pairs * i) + 2 * 2 * pairs * (2 * i + h)  # x, h in; outs RMW
    return weights + acts, distinct


# ---------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------
