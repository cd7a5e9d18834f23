"""The MoE-LoRA op: the LoRA delta of a MoE layer's expert projections, many adapters at once.

The one front door on every device: the vLLM plugin (CPU and CUDA), tests and benchmarks call
these two functions. One batch mixes tokens of many adapters (or none). Adapters live in
*slots* of stacked weight buffers, exactly as vLLM lays them out, so the op plugs into vLLM
without copies:

    lora_a[slot, expert]  [S, E, R, K]   (shrink: K -> R)
    lora_b[slot, expert]  [S, E, N, R]   (expand: R -> N)

R is the slot rank capacity (`max_lora_rank`); an adapter of smaller rank occupies the first
rows/columns and the rest is zero. The LoRA scaling (alpha / r) is folded into lora_b when the
adapter is loaded, as vLLM does, so the op has no scale argument.

Each token's slot comes from `token_slots` ([M], -1 = no adapter). A token without an adapter,
or whose slot is disabled in `slot_enabled`, gets no delta at all: never another tenant's.

Two projections, matching the two places a MoE layer needs a delta:

  * add_moe_lora_w13: gate_up. Input x [M, H] (each token routed to top_k experts), output
    [M, top_k, n_slices * N]: slice i (gate, up) is written at columns [i*N, (i+1)*N).
  * add_moe_lora_w2: down. Input [M * top_k, I] (one row per (token, k) pair), output
    [M, top_k, H]; the delta is scaled by the pair's routing weight, as the base down-projection is.

Both add into `out` in place and return the pair routing the Triton backend built (None for the
torch backend); pass it to w2 of the same layer call as `routing=` so the pairs are sorted once.

Backends: "torch" (kernels/torch_moe_lora.py; any device, what runs on CPU) and "triton"
(kernels/triton_moe_lora.py; CUDA tensors, chosen automatically when Triton is importable).
`backend=` forces one; `options=` (kernels.triton_plan.LaunchOptions) forces a Triton variant.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels import torch_moe_lora

BACKENDS = ("torch", "triton")


def _triton_available(t: torch.Tensor) -> bool:
    if not t.is_cuda:
        return False
    try:
        from kernels import triton_moe_lora  # noqa: F401
    except ImportError:
        return False
    return True


def pick_backend(backend: str | None, t: torch.Tensor) -> str:
    if backend is None:
        return "triton" if _triton_available(t) else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown MoE-LoRA backend {backend!r}; expected one of {BACKENDS}")
    return backend


def _check_common(topk_ids, token_slots, lora_a, lora_b) -> None:
    m, _ = topk_ids.shape
    if token_slots.shape != (m,):
        raise ValueError(f"token_slots must be [{m}], got {tuple(token_slots.shape)}")
    if len(lora_a) != len(lora_b) or not lora_a:
        raise ValueError("lora_a and lora_b must be non-empty and have one entry per slice")
    for a, b in zip(lora_a, lora_b, strict=True):
        if a.dim() != 4 or b.dim() != 4:
            raise ValueError("lora_a is [S, E, R, K] and lora_b is [S, E, N, R]")
        if a.shape[:2] != b.shape[:2] or a.shape[2] != b.shape[3]:
            raise ValueError(f"lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} disagree")


def _triton_kwargs(routing, options) -> dict:
    kwargs = {"routing": routing}
    if options is not None:
        kwargs["options"] = options
    return kwargs


def add_moe_lora_w13(
    out: torch.Tensor,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    token_slots: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    *,
    slot_enabled: torch.Tensor | None = None,
    backend: str | None = None,
    routing=None,
    options=None,
):
    """out[m, k, i*N:(i+1)*N] += lora_b[i][s, e] @ (lora_a[i][s, e] @ x[m]) for s = token_slots[m],
    e = topk_ids[m, k], over slices i; nothing for s < 0 or disabled slots."""
    _check_common(topk_ids, token_slots, lora_a, lora_b)
    m, top_k = topk_ids.shape
    n = lora_b[0].shape[2]
    if x.shape != (m, lora_a[0].shape[3]):
        raise ValueError(f"x must be [{m}, {lora_a[0].shape[3]}], got {tuple(x.shape)}")
    if out.shape != (m, top_k, len(lora_b) * n):
        raise ValueError(f"out must be [{m}, {top_k}, {len(lora_b) * n}], got {tuple(out.shape)}")
    if pick_backend(backend, x) == "triton":
        from kernels import triton_moe_lora

        return triton_moe_lora.add_moe_lora_w13(
            out,
            x,
            topk_ids,
            token_slots,
            lora_a,
            lora_b,
            slot_enabled,
            **_triton_kwargs(routing, options),
        )
    torch_moe_lora.add_moe_lora_w13(out, x, topk_ids, token_slots, lora_a, lora_b, slot_enabled)
    return None


def add_moe_lora_w2(
    out: torch.Tensor,
    h: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    token_slots: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    slot_enabled: torch.Tensor | None = None,
    backend: str | None = None,
    routing=None,
    options=None,
):
    """out[m, k] += topk_weights[m, k] * lora_b[s, e] @ (lora_a[s, e] @ h[m*top_k + k]) for
    s = token_slots[m], e = topk_ids[m, k]; nothing for s < 0 or disabled slots."""
    _check_common(topk_ids, token_slots, (lora_a,), (lora_b,))
    m, top_k = topk_ids.shape
    if h.shape != (m * top_k, lora_a.shape[3]):
        raise ValueError(f"h must be [{m * top_k}, {lora_a.shape[3]}], got {tuple(h.shape)}")
    if out.shape != (m, top_k, lora_b.shape[2]):
        raise ValueError(f"out must be [{m}, {top_k}, {lora_b.shape[2]}], got {tuple(out.shape)}")
    if topk_weights.shape != (m, top_k):
        raise ValueError(f"topk_weights must be [{m}, {top_k}], got {tuple(topk_weights.shape)}")
    if pick_backend(backend, h) == "triton":
        from kernels import triton_moe_lora

        return triton_moe_lora.add_moe_lora_w2(
            out,
            h,
            topk_ids,
            topk_weights,
            token_slots,
            lora_a,
            lora_b,
            slot_enabled,
            **_triton_kwargs(routing, options),
        )
    torch_moe_lora.add_moe_lora_w2(
        out, h, topk_ids, topk_weights, token_slots, lora_a, lora_b, slot_enabled
    )
    return None
