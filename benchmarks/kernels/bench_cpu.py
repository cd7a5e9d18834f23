"""CPU timing of the PyTorch MoE-LoRA path (kernels/torch_moe_lora.py), per MoE layer forward.

    .venv/bin/python -m benchmarks.kernels.bench_cpu

One "forward" = add_moe_lora_w13 (gate and up slices) + add_moe_lora_w2 for one MoE layer,
every token carrying an adapter (uniform over the slots), bf16 and fp32. Prints a table.
"""

from __future__ import annotations

import statistics
import time

import torch

from kernels.model_shapes import MODEL_SHAPES
from kernels.moe_lora import add_moe_lora_w2, add_moe_lora_w13

# name: hidden, intermediate, experts, top_k, slots, rank
SHAPES = {
    f"{name} ({s.hidden}/{s.inter}, {s.experts}e top-{s.top_k})": (
        s.hidden,
        s.inter,
        s.experts,
        s.top_k,
        4,
        16,
    )
    for name, s in ((n, MODEL_SHAPES[n]) for n in ("builtin-moe", "gpt-oss-20b"))
}


def time_forward(hidden, inter, experts, top_k, slots, rank, m, dtype, reps):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    a13 = [rnd(slots, experts, rank, hidden) for _ in range(2)]
    b13 = [rnd(slots, experts, inter, rank) for _ in range(2)]
    a2, b2 = rnd(slots, experts, rank, inter), rnd(slots, experts, hidden, rank)
    x, h = rnd(m, hidden), rnd(m * top_k, inter)
    topk_ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(m)])
    topk_w = torch.rand(m, top_k, generator=g).to(dtype)
    token_slots = torch.randint(0, slots, (m,), generator=g)
    out13, out2 = (
        torch.zeros(m, top_k, 2 * inter, dtype=dtype),
        torch.zeros(m, top_k, hidden, dtype=dtype),
    )

    def forward():
        add_moe_lora_w13(out13, x, topk_ids, token_slots, a13, b13)
        add_moe_lora_w2(out2, h, topk_ids, topk_w, token_slots, a2, b2)

    forward()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        forward()
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def main() -> None:
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'shape':<42} {'dtype':<9} {'M':>5} {'ms/forward':>11}")
    for name, shape in SHAPES.items():
        big = shape[0] > 1000
        for dtype in (torch.float32, torch.bfloat16):
            for m in (1, 16, 256):
                reps = 5 if big and m == 256 else 20
                ms = time_forward(*shape, m, dtype, reps)
                print(f"{name:<42} {str(dtype).split('.')[1]:<9} {m:>5} {ms:>11.2f}")


if __name__ == "__main__":
    main()
