"""Timing helpers: CUDA-graph replay timed with CUDA events, and the copy-bandwidth ceiling."""

from __future__ import annotations

import statistics
import time

import torch

DEV = "cuda"
DTYPE = torch.bfloat16


def graph_time(call, layers, max_s=0.15):
    """Median time of one layer call: capture `layers` calls in a CUDA graph, replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for layer in range(layers):  # warm-up: compiles, pointer tables
            call(layer)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for layer in range(layers):
            call(layer)
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    g.replay()
    torch.cuda.synchronize()
    one = time.perf_counter() - t0
    reps = int(min(40, max(5, max_s / max(one, 1e-6))))
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for a, b in events:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    times = [a.elapsed_time(b) * 1e3 / layers for a, b in events]
    del g
    return statistics.median(times), reps


def measure_peak_bw():
    n = 1 << 30  # 2 GiB bf16 source, 4 GiB moved per copy
    a = torch.empty(n, dtype=DTYPE, device=DEV).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e-3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * 2 / statistics.median(ts) / 1e9
