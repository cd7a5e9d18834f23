"""Helpers shared by the Triton kernels of the MoE-LoRA op: launch overlap (PDL), the
(token, expert) pair lookup, and facts about the device."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Programmatic dependent launch (sm_90). Every kernel here is launched with it, so it may
    be scheduled while the previous kernel on the stream still runs; this waits until that
    kernel has finished and its writes are visible. A kernel lets its successor launch early
    (pdl_trigger) only after its own wait, so memory written two kernels back is already safe."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    """Let the next kernel launch now (it waits in pdl_wait). Only where that kernel's grid is
    small: its waiting programs hold SM slots that this kernel's later programs need."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pair_route(
    topk_ptr,
    slots_ptr,
    enabled_ptr,
    pair,
    num_slots,
    TOPK: tl.constexpr,
    E: tl.constexpr,
    HAS_ENABLED: tl.constexpr,
):
    """(slot, expert, active) of one (token, k) pair. Slot -1, out-of-range slots and experts,
    and disabled slots are inactive (never alias another slot)."""
    m = pair // TOPK
    slot = tl.load(slots_ptr + m).to(tl.int32)
    expert = tl.load(topk_ptr + pair).to(tl.int32)
    active = (slot >= 0) & (slot < num_slots) & (expert >= 0) & (expert < E)
    if HAS_ENABLED:
        en = tl.load(enabled_ptr + tl.where(active, slot, 0))
        active = active & (en != 0)
    return slot, expert, active


@functools.cache
def num_sms(device_index: int) -> int:
    if INTERPRET or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def pdl_supported(device_index: int) -> bool:
    if INTERPRET or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


@functools.cache
def device_name(device_index: int) -> str | None:
    """torch.cuda.get_device_name ("NVIDIA H200"), or None in the interpreter / without CUDA."""
    if INTERPRET or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device_index)


def pow2_at_least(n: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(n))


# Zeroed int32 buffers that kernels use as counters and leave zeroed when they finish (so no
# zero-fill launch per call), one per (device, purpose). Calls on one device must not overlap
# (one stream, as a model's forward is). Made on first use outside a CUDA-graph capture (a
# warm-up always runs first); during a capture, a call that finds none big enough gets a fresh
# zero-filled buffer of its own (the zero-fill is then part of that graph), since a buffer made
# there would hold its zeros only once the graph is replayed.
_SELF_CLEANING: dict[tuple[torch.device, str], torch.Tensor] = {}


def self_cleaning_counters(device: torch.device, purpose: str, numel: int) -> torch.Tensor:
    buf = _SELF_CLEANING.get((device, purpose))
    if buf is not None and buf.numel() >= numel:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(numel, dtype=torch.int32, device=device)
    buf = torch.zeros(max(4096, numel), dtype=torch.int32, device=device)
    _SELF_CLEANING[(device, purpose)] = buf
    return buf
