"""Engine and fleet parameters, and where each number comes from.

Two engines are modelled:

- `cpu_builtin()`: the built-in tiny Qwen3-MoE on this 2-core box (vLLM CPU, fp32, eager),
  fitted from single-replica measurements on a quiet machine (never from the routing
  experiment, which validates): docs/tenancy.md's flood benchmark and docs/serving.md.
- `h200_qwen3_30b()`: Qwen3-30B-A3B bf16 on one H200 per replica, from the kernel benchmark's
  whole-MoE-layer times (docs/kernels.md "LoRA tax", our kernels, rank 16, 8 adapters) plus
  assumed non-MoE costs; nothing here was measured end to end on a GPU.

A step's time is `fixed + per_seq * decoding_seqs + moe(tokens) + per_token * tokens +
per_ctx_token * context_tokens`, where `tokens` counts every token the step computes (one per
decoding sequence plus the prefill chunk), times `slowdown` (CPU sharing, see below).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class StepTime:
    """Time of one engine step (seconds), from the batch's shape."""

    fixed_s: float
    per_seq_s: float = 0.0  # per decoding sequence (CPU: the per-row work of a tiny model)
    per_token_s: float = 0.0  # per token computed (prefill dominates)
    per_ctx_token_s: float = 0.0  # per token of KV cache read by decode attention
    # (tokens, seconds) points of the MoE layers' time, interpolated on a log-log scale
    moe_points: tuple[tuple[int, float], ...] = ()
    slowdown: float = 1.0

    def __call__(self, decoding: int, tokens: int, context_tokens: float = 0.0) -> float:
        t = (
            self.fixed_s
            + self.per_seq_s * decoding
            + self.per_token_s * tokens
            + self.per_ctx_token_s * context_tokens
        )
        if self.moe_points and tokens > 0:
            t += self._moe(tokens)
        return t * self.slowdown

    def _moe(self, tokens: int) -> float:
        t = _MOE_CACHE.get((self.moe_points, tokens))
        if t is None:
            m = np.log([p[0] for p in self.moe_points])
            s = np.log([p[1] for p in self.moe_points])
            if tokens >= self.moe_points[-1][0]:  # beyond the grid: linear (compute-bound)
                t = self.moe_points[-1][1] * tokens / self.moe_points[-1][0]
            else:
                t = float(np.exp(np.interp(np.log(tokens), m, s)))
            _MOE_CACHE[(self.moe_points, tokens)] = t
        return t


_MOE_CACHE: dict[tuple, float] = {}  # step times are asked for the same few thousand sizes


@dataclass(frozen=True)
class EngineParams:
    """One engine replica (vLLM settings and costs)."""

    step: StepTime
    max_num_seqs: int
    max_loras: int  # accelerator slots: distinct adapters in one batch
    max_cpu_loras: int  # vLLM's host-memory LRU of adapters
    max_num_batched_tokens: int  # a step's token budget (chunked prefill)
    disk_load_s: float  # adapter read from disk into host memory (a CPU-cache miss)
    slot_load_s: float  # adapter copied from host memory into a slot
    kv_capacity_tokens: int  # for kv_cache_usage (autoscaling input)
    overhead_s: float  # request path outside the engine (HTTP, proxy, ingress, first chunk)


@dataclass(frozen=True)
class FleetParams:
    """Serve settings around the engines."""

    max_ongoing_requests: int = 64
    imbalance_threshold: int = 8
    stats_period_s: float = 1.0  # our routing stats (app/config.py RoutingConfig)
    recent_route_ttl_s: float = 30.0  # app/request_router.py RECENT_ROUTE_TTL_S
    multiplex_models_per_replica: int = 8  # Ray multiplexing: ids a replica reports
    multiplex_report_lag_s: float = 0.1  # PUSH_MULTIPLEXED_MODEL_IDS_INTERVAL_S
    replica_start_s: float = 27.0  # docs/serving.md: 26.3 s to a ready CPU engine replica


# Prompt tokens of the load tests' prompts (loadtest/workload.py prompt_text, the built-in
# tokenizer, the chat template): a least-squares fit over 2,000 sampled prompts with the
# built-in tokenizer gave 2.74 tokens per word + 0.3, and the template adds 8.
TOKENS_PER_WORD = 2.74
PROMPT_TOKENS_FIXED = 8


def prompt_tokens(words: int) -> int:
    return round(TOKENS_PER_WORD * words + 0.3) + PROMPT_TOKENS_FIXED


def cpu_builtin(slowdown: float = 1.0) -> EngineParams:
    """The built-in model on vLLM CPU, one replica alone on the 2-core box (quiet machine).

    Fitting data (docs/tenancy.md flood benchmark, 2026-11-30, nothing else running;
    benchmarks/tenancy/results/flood_{fcfs,fair}_20261130.json):
    - unloaded phase, 3 tenants sending 8-token streams one at a time: 98 requests per tenant
      in 20.1 s, TTFT p50 0.097-0.105 s, so 7 decode steps at batch ~2-3 take ~0.105 s:
      ~14.5 ms per step;
    - backlogged phases at max_num_seqs 16: 476-644 output tokens/s, ~27 ms per step at 16.
    Two points: 12.2 ms + 0.93 ms per decoding sequence (and docs/serving.md's locust run,
    ITL p50 19 ms at ~7 streams, lies on the line: 18.7 ms).
    - Prefill: docs/serving.md, plain vLLM at 4 req/s with 64-token prompts, TTFT p50 52.6 ms:
      after ~5 ms of HTTP, ~7 ms waiting on a running step and the 12 ms fixed cost, ~0.4 ms
      per prompt token.
    - Request path outside the engine: the flood's unloaded TTFT (0.099 s) minus a prefill step
      (~24 ms) and the wait for the running one (~7 ms): ~68 ms; docs/serving.md's app vs plain
      vLLM at 4 req/s adds 84 ms: 70 ms taken.
    - Adapter loads: not measured (vLLM logs them without times). Assumed 20 ms from disk (a
      few MB of safetensors) and 2 ms into a slot; they matter little at this scale.

    `slowdown` multiplies step times and the request path: the routing experiment runs two
    busy-polling vLLM workers and the whole Ray path on 2 cores (validate.py fits it on one run).
    """
    return EngineParams(
        step=StepTime(fixed_s=0.0122, per_seq_s=0.00093, per_token_s=0.0004, slowdown=slowdown),
        max_num_seqs=16,
        max_loras=4,
        max_cpu_loras=8,
        max_num_batched_tokens=2048,
        disk_load_s=0.020 * slowdown,
        slot_load_s=0.002 * slowdown,
        kv_capacity_tokens=16 * 1024,
        overhead_s=0.070 * slowdown,
    )


# Qwen3-30B-A3B, one MoE layer set (48 layers) per decode step with our MoE-LoRA kernels, rank
# 16, 8 adapters: docs/kernels.md "LoRA tax of a whole MoE layer", column "+ ours", per step.
H200_MOE_STEP_POINTS = (
    (1, 2.00e-3),
    (4, 4.40e-3),
    (16, 10.25e-3),
    (64, 16.86e-3),
    (256, 20.95e-3),
    (1024, 25.39e-3),
    (4096, 54.88e-3),
)


def h200_qwen3_30b() -> EngineParams:
    """Qwen3-30B-A3B bf16, one H200 per replica, rank-16 adapters covering all experts.
    Assumptions (none measured end to end here):
    - MoE layers: the kernel benchmark's whole-layer times (above), our kernels.
    - Other weights (attention projections, lm_head, ~1.2 B parameters): read once per step,
      0.6 ms at 4.3 TB/s, folded into the fixed cost; their FLOPs, 2.4 GFLOP per token at an
      assumed 500 TFLOP/s: 4.8 us per token.
    - Decode attention reads 96 KiB of KV cache per context token (48 layers x K,V x 4 KV heads
      x 128 x bf16) at 4.3 TB/s: 22.9 ns per context token. Prefill attention's quadratic part
      is left out (prompts here are ~10^3 tokens).
    - Fixed per step 4 ms: scheduler, sampling, CUDA graph launch, the other weights' read.
    - Adapters: full-expert rank-16 LoRA of Qwen3-30B-A3B is 1.66 GB (../shared/context notes);
      from local NVMe at 2 GB/s 0.83 s, into a slot over PCIe at ~20 GB/s 83 ms; both stall
      the replica's step loop (vLLM loads inside the step).
    - serve_config.gpu.yaml's engine: max_loras 8, max_cpu_loras 64, max_num_seqs 128;
      max_num_batched_tokens 8192; KV cache ~55 GB of the 141 GB after weights and slots:
      ~560k tokens.
    - Request path outside the engine: 20 ms (a GPU host has spare cores; docs/serving.md's
      quiet-machine direct-ingress path adds +18-23 ms).
    """
    return EngineParams(
        step=StepTime(
            fixed_s=0.004,
            per_token_s=4.8e-6,
            per_ctx_token_s=22.9e-9,
            moe_points=H200_MOE_STEP_POINTS,
        ),
        max_num_seqs=128,
        max_loras=8,
        max_cpu_loras=64,
        max_num_batched_tokens=8192,
        disk_load_s=0.83,
        slot_load_s=0.083,
        kv_capacity_tokens=560_000,
        overhead_s=0.020,
    )


@dataclass(frozen=True)
class Scenario:
    engine: EngineParams
    fleet: FleetParams = field(default_factory=FleetParams)

    def with_fleet(self, **kw) -> Scenario:
        return replace(self, fleet=replace(self.fleet, **kw))
