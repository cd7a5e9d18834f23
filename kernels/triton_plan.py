"""The plan of one MoE-LoRA call on CUDA: which kernels run, with which block sizes.

Rules of the batch shape only (pairs P = M * top_k, groups S * E, rank), never per-cell
lookups, so batch sizes between measured points get sensible plans. Their thresholds come from
ONE place, kernels/configs/: `defaults.json` holds every key (safe, untuned values for any GPU)
and `<GPU name>.json` (torch.cuda.get_device_name with spaces as underscores, e.g.
`NVIDIA_H200.json`, written by benchmarks/kernels/tune_moe_lora.py) overrides them on that GPU
only. No threshold is written in code.

`LaunchOptions` lets tests and benchmarks force one variant of the plan per call; production
calls pass none, except the vLLM plugin's `after_foreign` (a fact of its call site, round ten).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from kernels.triton_util import pow2_at_least

CONFIG_DIR = Path(__file__).with_name("configs")


@dataclass(frozen=True)
class LaunchOptions:
    """Overrides of the automatic plan (None = let the plan decide). For tests and benchmarks."""

    mode: str | None = None  # "naive" (a tile is one pair) | "grouped" (pairs of one block)
    # grouped only, the pair sorter: "onepass" | "count1" | "count1r" | "count4"
    # (kernels/triton_pair_sort.py; also "count", "countr", "count4r", "count_last", "count1_cg":
    # measured ones)
    sorter: str | None = None
    sort_warps: int | None = None  # count1/count1r only: warps of the one sorting program
    sort_block: int | None = None  # count/countr/count4: pairs per counting program (1024)
    block_m: int | None = None  # grouped only: pairs per tile
    pdl: bool | None = None  # programmatic dependent launch
    prefetch: bool | None = None  # tile expand: load the next B/out tiles one step ahead
    waves: int | None = None  # programs per launch, in multiples of the SM count
    ksplit_max: int | None = None  # tile shrink: at most this many K splits (plan: ksplit_max)
    expand_waves: int | None = None  # tile expand: N-split target in SM multiples (else waves)
    unroll_ksplit: bool | None = None  # tile expand: sum the K-split partials unrolled
    shrink: dict | None = None  # merged into tile_config's shrink block sizes
    expand: dict | None = None  # merged into tile_config's expand block sizes
    # Round five: the one-launch decode kernel (True/False forces it on/off for a projection;
    # None = the plan's decode_* rule) and overrides of its block sizes / warps / L2 prefetch.
    decode: bool | None = None
    decode_max_pairs: int | None = None  # the rule with this pair limit instead of the plan's
    decode_cfg: dict | None = None
    # Round eight: a projection's last kernel (decode kernel, tile expand) lets the next kernel
    # launch right after its own wait; naive tile shrinks prefetch their A lines into L2 before
    # their wait (None = the plan's tail_trigger_max_pairs / shrink_l2_prefetch_max_pairs).
    trigger: bool | None = None
    shrink_l2_prefetch: bool | None = None
    # Round ten: False launches a call's FIRST kernel without the PDL launch attribute (same
    # code: its wait then returns at once), for calls that follow a kernel that is not ours
    # (vLLM's base GEMM); its later kernels keep PDL. None = the plan (first_nopdl_max_pairs).
    first_pdl: bool | None = None
    # Round ten: the kernel before this call on the stream is not one of ours (the vLLM
    # plugin: vLLM's base GEMM, which never triggers early). Where the plan says
    # (decode_nopdl_after_foreign), the decode kernel then runs without PDL: its wait and
    # trigger have nothing to overlap there and cost time. A fact of the call site, set by
    # kernels/vllm_plugin/moe_hooks.py; tile paths are unchanged by it.
    after_foreign: bool = False


DEFAULT_OPTIONS = LaunchOptions()


def config_file_name(device_name: str) -> str:
    return device_name.strip().replace(" ", "_").replace("/", "_") + ".json"


@functools.cache
def plan_config(device_name: str | None) -> dict:
    """Plan thresholds for a GPU: defaults.json, overridden by that GPU's tuned file if any."""
    cfg = json.loads((CONFIG_DIR / "defaults.json").read_text())["plan"]
    if device_name:
        tuned = CONFIG_DIR / config_file_name(device_name)
        if tuned.is_file():
            cfg = {**cfg, **json.loads(tuned.read_text())["plan"]}
    return cfg


def choose_mode(cfg: dict, num_pairs: int, num_groups: int, rank: int) -> str:
    """naive (a tile is one pair, no sorting launch) while pairs rarely share a (slot, expert)
    block and pairs x rank is small; grouped (each distinct block read once) otherwise."""
    sparse = num_pairs * cfg["naive_sparsity"] <= num_groups
    if num_pairs * rank >= cfg["grouped_min_pair_rank"]:
        sparse = False
    return "naive" if (num_pairs <= cfg["naive_max_pairs"] or sparse) else "grouped"


def grouped_block_m(cfg: dict, num_pairs: int, num_groups: int, rank: int) -> int:
    """Rows per grouped tile ~ the expected pairs per (slot, expert) group: bigger tiles re-read
    each block less often; 16 is the tensor-core minimum."""
    per_group = num_pairs / max(1, min(num_pairs, num_groups))
    if per_group >= cfg["bm64_per_group"]:
        return 64
    if rank >= 64 and per_group >= cfg["bm64_r64_per_group"]:
        return 64
    if per_group >= cfg["bm32_per_group"] and num_pairs >= cfg["bm32_min_pairs"]:
        return 32
    return 16


def choose_sorter(cfg: dict, num_pairs: int, num_groups: int) -> str:
    """The one-program tl.sort up to onepass_sort_max_pairs, then the one-program counting sort
    up to count1_max_pairs (and count1_max_groups: its scan reads every group's counter), then
    the two-launch counting sort with relaxed counting atomics up to countr_max_pairs (round
    four), then the four-launch counting sort (many programs).

    Round nine: the one-program counting sort already from count1_early_min_pairs pairs while
    the groups are few (count1_early_max_groups: its scan reads every group's counter)."""
    if cfg["count1_early_min_pairs"] <= num_pairs <= cfg["count1_max_pairs"]:
        if num_groups <= min(cfg["count1_early_max_groups"], cfg["count1_max_groups"]):
            return cfg["count1_sorter"]
    if num_pairs <= cfg["onepass_sort_max_pairs"]:
        return "onepass"
    if num_pairs <= cfg["count1_max_pairs"] and num_groups <= cfg["count1_max_groups"]:
        return cfg["count1_sorter"]  # "count1" or "count1r" (relaxed atomics, round four)
    if num_pairs <= cfg["countr_max_pairs"]:
        return "countr"
    return "count4"


def use_decode(
    cfg: dict, num_pairs: int, rank: int, k_dim: int, max_pairs=None, num_groups=None
) -> bool:
    """Round five: the one-launch decode kernel (kernels/triton_moe_lora.py, _decode_kernel:
    every column block recomputes its pair's shrink) while the batch is small and a pair's
    A_i[s, e] block (rank x K, re-read from L2 by each column block) is small.

    Round seven: also only while pairs rarely share a (slot, expert) block (expected pairs
    per group <= decode_max_per_group; num_groups = slots x experts): the decode kernel reads
    a pair's A block once per pair, grouped tiles once per group. A forced max_pairs (tests,
    benchmarks: "wherever A fits") skips that check."""
    block_r = pow2_at_least(rank, 16)
    if max_pairs is None:
        # Round eight: at the smallest batches also a larger A (decode_small_*: GPT-OSS rank
        # 16's 16 x 2880), which the L2 prefetch before the wait reads early (decode_config).
        if num_pairs <= cfg["decode_small_max_pairs"]:
            if block_r * k_dim <= cfg["decode_small_max_a_elems"]:
                return True
        max_pairs = cfg["decode_max_pairs"]
        if num_groups is not None:
            if num_pairs > cfg["decode_max_per_group"] * min(num_pairs, max(1, num_groups)):
                return False
        # Round nine: the split decode kernel (decode_split_*: the K reduction over several
        # programs, the last one doing the expand) also where A is larger.
        if num_pairs <= cfg["decode_split_max_pairs"]:
            if block_r * k_dim <= cfg["decode_split_max_a_elems"]:
                return True
    return num_pairs <= max_pairs and block_r * k_dim <= cfg["decode_max_a_elems"]


def early_route_max_a_elems(cfg: dict) -> int:
    """Largest A block (rank block x K padded to a power of two) that the decode kernel's early
    route holds in registers (round eight: decode_early_max_a_elems, 16 warps above
    decode_wide_a_elems; before, decode_max_a_elems)."""
    return max(cfg["decode_max_a_elems"], cfg["decode_early_max_a_elems"])


def decode_config(cfg: dict, rank: int, k_dim: int, n_dim: int = 0, num_pairs: int = 0) -> dict:
    """Block sizes of the decode kernel: BLOCK_N output columns per program, the K reduction
    in BLOCK_K chunks (unrolled), warps, whether to prefetch A/B into L2 before the wait, and
    whether to load A/B into registers before the wait from a speculative read of the route.

    Round seven: from decode_wide_n_min_pairs pairs on, a program takes up to
    decode_block_n_wide columns (all of N rounded up to a power of two, at most that): each
    column block re-reads its pair's A block, so fewer, wider blocks read A fewer times once
    the batch fills the GPU (at few pairs the narrower blocks keep more programs in flight)."""
    block_r = pow2_at_least(rank, 16)
    a_elems = block_r * k_dim
    block_n = cfg["decode_block_n"]
    if num_pairs >= cfg["decode_wide_n_min_pairs"] and n_dim:
        block_n = max(block_n, min(cfg["decode_block_n_wide"], pow2_at_least(n_dim, 16)))
    wide = a_elems > cfg["decode_wide_a_elems"] or block_n * block_r > cfg["decode_wide_b_elems"]
    early_ok = block_r * pow2_at_least(k_dim, 16) <= early_route_max_a_elems(cfg)
    # Round nine: up to decode_split_max_pairs, an A larger than the plain decode kernel takes
    # (decode_max_a_elems) is split along K over programs of about decode_split_a_elems A
    # elements (the last one does the expand; B_LATE: only it loads B, where B's block is
    # large); warps for the B block then.
    split = cfg["decode_split_a_elems"] if 0 < num_pairs <= cfg["decode_split_max_pairs"] else 0
    if split and a_elems > cfg["decode_max_a_elems"]:
        b_elems = block_n * block_r
        wide_b = b_elems > cfg["decode_wide_b_elems"]
        return dict(
            BLOCK_N=block_n,
            BLOCK_K=min(cfg["decode_block_k"], pow2_at_least(k_dim, 16)),
            num_warps=cfg["decode_split_warps"] * (2 if wide_b else 1),
            L2_PREFETCH=False,
            EARLY_ROUTE=0 < num_pairs <= cfg["decode_split_early_max_pairs"],
            SPLIT_A_ELEMS=split,
            B_LATE=b_elems > cfg["decode_split_b_late_elems"],
        )
    return dict(
        BLOCK_N=block_n,
        BLOCK_K=min(cfg["decode_block_k"], pow2_at_least(k_dim, 16)),
        # about 128 A elements per thread at most (registers: all of A's loads in flight), and
        # twice the warps for a wide B block
        num_warps=cfg["decode_warps"] * (2 if wide else 1),
        # Round eight: up to decode_early_route_max_pairs the pair's A block and B columns are
        # loaded into registers before the wait where A fits there (decode_max_a_elems, K
        # padded to a power of two), else, up to decode_l2_prefetch_max_pairs, asked of L2.
        L2_PREFETCH=bool(cfg["decode_l2_prefetch"])
        or (0 < num_pairs <= cfg["decode_l2_prefetch_max_pairs"] and not early_ok),
        EARLY_ROUTE=bool(cfg["decode_early_route"])
        or (0 < num_pairs <= cfg["decode_early_route_max_pairs"] and early_ok),
    )


def projection_path(
    cfg: dict, num_pairs: int, num_slots: int, num_experts: int, rank: int, k_dim: int
) -> str:
    """What the automatic plan runs for one projection with reduction dimension K."""
    if use_decode(cfg, num_pairs, rank, k_dim, num_groups=num_slots * num_experts):
        return "decode1"
    return plan_name(cfg, num_pairs, num_slots, num_experts, rank)


def plan_name(cfg: dict, num_pairs: int, num_slots: int, num_experts: int, rank: int):
    """Human-readable name of what the automatic plan runs (benchmark tables)."""
    groups = num_slots * num_experts
    if choose_mode(cfg, num_pairs, groups, rank) == "naive":
        return "tile-naive"
    bm = grouped_block_m(cfg, num_pairs, groups, rank)
    return f"tile-grouped-BM{bm}-{choose_sorter(cfg, num_pairs, groups)}"


def even_block_k(k: int, cap: int) -> int:
    """Largest power-of-two block <= cap that divides K (unmasked loads), else cap."""
    b = cap
    while b >= 32:
        if k % b == 0:
            return b
        b //= 2
    return cap


def tile_config(block_m: int, rank: int, k_dim: int) -> tuple[dict, dict]:
    """(shrink, expand) block sizes of the tile kernels. Chosen from sm_90 compiles of every
    combination (registers <= 255 without spills, loads pipelined with cp.async)."""
    block_r = pow2_at_least(rank, 16)
    shrink = dict(
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_K=even_block_k(k_dim, 128 if block_r <= 64 else 64),
        num_warps=4,
        num_stages=3,
    )
    # The expand holds B and out tiles of two column tiles (prefetch) for both slices: wide
    # BLOCK_N only while that fits in registers.
    if block_m >= 64:
        expand = dict(BLOCK_N=64, num_warps=8)
    elif block_m >= 32:
        expand = dict(BLOCK_N=64, num_warps=8 if block_r >= 128 else 4)
    else:
        expand = dict(BLOCK_N=128 if block_r <= 32 else 64, num_warps=4)
    expand.update(BLOCK_M=block_m, BLOCK_R=block_r, num_stages=3)
    return shrink, expand


def naive_shrink_warps(cfg: dict, num_pairs: int, rank: int) -> int | None:
    """Round ten: warps of the naive tile shrink for small batches of small rank (None = the
    tile_config default): 2 warps on the H200 up to 64 pairs at rank <= 16 (GPT-OSS-20B rank 16
    at M <= 16: each program's 16 x 256 A slice needs no more threads, and more programs fit)."""
    small = num_pairs <= cfg["naive_shrink_warps_max_pairs"]
    if small and rank <= cfg["naive_shrink_warps_max_rank"]:
        return cfg["naive_shrink_warps"]
    return None
