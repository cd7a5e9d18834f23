"""Shared builders and checks of the MoE-LoRA kernel tests (not collected by itself)."""

from __future__ import annotations

import torch

from tests.kernels import oracle

# Bound on max |got - want| / max |delta|: fp32 runs IEEE fp32 dots; 16-bit outputs are rounded
# once (out + delta) and the rank intermediate once, in sums of a different order.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def make_case(
    seed,
    m,
    hidden,
    inter,
    experts,
    top_k,
    slots,
    rank,
    dtype,
    device="cpu",
    no_adapter=0.3,
    mixed_ranks=True,
):
    """Random inputs of one layer call: weights N(0, 1/fan-in) in vLLM's slot layout (each slot
    an adapter of its own rank <= R, zero-padded), a share of tokens without adapter."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    a13 = [randn(slots, experts, rank, hidden, scale=hidden**-0.5) for _ in range(2)]
    b13 = [randn(slots, experts, inter, rank, scale=rank**-0.5) for _ in range(2)]
    a2 = randn(slots, experts, rank, inter, scale=inter**-0.5)
    b2 = randn(slots, experts, hidden, rank, scale=rank**-0.5)
    if mixed_ranks:
        ranks = torch.randint(1, rank + 1, (slots,), generator=g, device=device).tolist()
        for s, r in enumerate(ranks):
            for a, b in [*zip(a13, b13, strict=True), (a2, b2)]:
                a[s, :, r:] = 0
                b[s, :, :, r:] = 0
    token_slots = torch.randint(0, slots, (m,), generator=g, device=device)
    token_slots[torch.rand(m, generator=g, device=device) < no_adapter] = -1
    if no_adapter < 1.0:
        token_slots[0] = slots - 1  # never an all-empty batch by chance (M = 1 would test nothing)
    topk_ids = torch.rand(m, experts, generator=g, device=device).argsort(dim=1)[:, :top_k]
    return dict(
        x=randn(m, hidden),
        h=randn(m * top_k, inter),
        a13=a13,
        b13=b13,
        a2=a2,
        b2=b2,
        token_slots=token_slots.to(torch.int32),
        topk_ids=topk_ids.to(torch.int32),
        topk_weights=torch.rand(m, top_k, generator=g, device=device).to(dtype),
    )


def want_delta(kind, c, enabled=None, round_to=None):
    if kind == "w13":
        return oracle.w13_delta(
            c["x"], c["topk_ids"], c["token_slots"], c["a13"], c["b13"], enabled, round_to
        )
    return oracle.w2_delta(
        c["h"],
        c["topk_ids"],
        c["topk_weights"],
        c["token_slots"],
        c["a2"],
        c["b2"],
        enabled,
        round_to,
    )


def check_against_oracle(kind, c, run, dtype, enabled=None, seed=0):
    """Run `run(out)` on a random `out` (the poison: any stray write changes it) and compare
    with the oracle. Returns (out, max relative error)."""
    m, top_k = c["topk_ids"].shape
    cols = 2 * c["b13"][0].shape[2] if kind == "w13" else c["b2"].shape[2]
    dev = c["x"].device
    g = torch.Generator(device=dev).manual_seed(seed + 99)
    base = torch.randn(m, top_k, cols, generator=g, device=dev).to(dtype)
    out = base.clone()
    run(out)
    delta = want_delta(kind, c, enabled, round_to=None if dtype == torch.float32 else dtype)
    want = base.double() + delta
    scale = delta.abs().max().clamp(min=1e-6)
    err = float((out.double() - want).abs().max() / scale)
    assert err <= TOLERANCE[dtype], f"{kind}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"
    skipped = ~oracle.active(c["token_slots"], c["a2"].shape[0], enabled)
    assert torch.equal(out[skipped], base[skipped]), "a token without adapter was written"
    assert torch.isfinite(out).all()
    return out, err
