"""Checks of the fused base+LoRA decode prototype (kernels/triton_fused_moe.py) against a float64
reference (not collected by itself; used by the interpreter cases and the GPU test)."""

from __future__ import annotations

import torch

from tests.kernels import oracle

# max |got - want| / max |want|: half outputs carry two roundings (base, then base + delta).
FUSED_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def base_weights(c, seed):
    """Base expert weights of the case's shapes: W13 [E, 2I, H], W2 [E, H, I], N(0, 1/fan-in)."""
    e = c["a2"].shape[1]
    h, i = c["x"].shape[1], c["h"].shape[1]
    dev, dtype = c["x"].device, c["x"].dtype
    g = torch.Generator(device=dev).manual_seed(seed)
    w13 = (torch.randn(e, 2 * i, h, generator=g, device=dev) * h**-0.5).to(dtype)
    w2 = (torch.randn(e, h, i, generator=g, device=dev) * i**-0.5).to(dtype)
    return w13, w2


def want(kind, c, w, dtype, enabled):
    """float64: the base GEMM (rounded to dtype as the unfused base writes it) + the LoRA delta."""
    topk = c["topk_ids"].long()
    m, top_k = topk.shape
    if kind == "w13":
        rows = c["x"].double().repeat_interleave(top_k, dim=0)
    else:
        rows = c["h"].double()
    base = torch.einsum("pk,pnk->pn", rows, w[topk.reshape(-1)].double())
    if kind == "w2":
        base = base * c["topk_weights"].double().reshape(-1, 1)
    base = base.reshape(m, top_k, -1).to(dtype)
    delta = (
        oracle.w13_delta(
            c["x"], c["topk_ids"], c["token_slots"], c["a13"], c["b13"], enabled, dtype
        )
        if kind == "w13"
        else oracle.w2_delta(
            c["h"],
            c["topk_ids"],
            c["topk_weights"],
            c["token_slots"],
            c["a2"],
            c["b2"],
            enabled,
            dtype,
        )
    )
    return base, base.double() + delta


def check_fused(kind, c, dtype, enabled=None, seed=0):
    from kernels import triton_fused_moe as tfm

    w13, w2 = base_weights(c, seed)
    w = w13 if kind == "w13" else w2
    m, top_k = c["topk_ids"].shape
    cols = w.shape[1]
    lora = dict(
        token_slots=c["token_slots"],
        a=c["a13"] if kind == "w13" else [c["a2"]],
        b=c["b13"] if kind == "w13" else [c["b2"]],
        enabled=enabled,
    )
    outs = {}
    for name, lo in (("base", None), ("fused", lora)):
        out = torch.full((m, top_k, cols), float("nan"), dtype=dtype, device=c["x"].device)
        if kind == "w13":
            tfm.fused_moe_w13(out, c["x"], w13, c["topk_ids"], lora=lo)
        else:
            tfm.fused_moe_w2(out, c["h"], w2, c["topk_ids"], c["topk_weights"], lora=lo)
        outs[name] = out
    base_ref, ref = want(kind, c, w, dtype, enabled)
    assert torch.isfinite(outs["fused"]).all() and torch.isfinite(outs["base"]).all()
    tol = FUSED_TOLERANCE[dtype]
    err_base = float((outs["base"].double() - base_ref.double()).abs().max())
    assert err_base <= tol * float(base_ref.double().abs().max()), f"base {kind}: {err_base:.2e}"
    err = float((outs["fused"].double() - ref).abs().max() / ref.abs().max())
    assert err <= tol, f"fused {kind}: relative error {err:.2e} > {tol:.0e}"
    skipped = ~oracle.active(c["token_slots"], c["a2"].shape[0], enabled)
    assert torch.equal(outs["fused"][skipped], outs["base"][skipped]), "a pair without adapter"
    return err
