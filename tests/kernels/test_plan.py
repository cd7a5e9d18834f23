"""Plan thresholds: one source (kernels/configs/), tuned files applied on their GPU only."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")
from kernels.triton_plan import (  # noqa: E402
    CONFIG_DIR,
    LaunchOptions,
    choose_mode,
    choose_sorter,
    config_file_name,
    decode_config,
    grouped_block_m,
    naive_shrink_warps,
    plan_config,
    use_decode,
)


def test_tuned_file_applies_to_its_gpu_only():
    defaults = plan_config(None)
    h200 = json.loads((CONFIG_DIR / "NVIDIA_H200.json").read_text())["plan"]
    assert config_file_name("NVIDIA H200") == "NVIDIA_H200.json"
    assert plan_config("NVIDIA H200") == {**defaults, **h200}
    # Another Hopper part, and unknown GPUs, get the defaults, never the H200 values.
    assert plan_config("NVIDIA H100 80GB HBM3") == defaults
    assert plan_config("NVIDIA H200 NVL") == defaults
    assert any(defaults[k] != v for k, v in h200.items()), "test needs a tuned difference"


def test_every_tuned_key_has_a_default():
    defaults = plan_config(None)
    for path in CONFIG_DIR.glob("*.json"):
        plan = json.loads(path.read_text())["plan"]
        assert set(plan) <= set(defaults), f"{path.name}: keys without a default"


def test_plan_rules_are_rank_aware():
    cfg = plan_config("NVIDIA H200")
    t = cfg["grouped_min_pair_rank"]
    # sparse batches stay naive at small pairs x rank, go grouped once pairs x rank is large
    assert choose_mode(cfg, 64, 1024, rank=16) == "naive"
    assert choose_mode(cfg, t // 64, 1 << 20, rank=64) == "grouped"
    # rank >= 64 with big groups: BLOCK_M 64; few pairs: BLOCK_M 16 even with big groups
    assert grouped_block_m(cfg, 4096, 32, rank=64) == 64
    assert grouped_block_m(cfg, 4096, 32, rank=16) == 32
    assert grouped_block_m(cfg, 1024, 32, rank=16) == 16


def test_decode_rule_and_column_blocks_round_seven():
    cfg = plan_config("NVIDIA H200")
    # Qwen3 rank 16 (w13 K = 2048): the decode kernel up to 512 pairs while pairs rarely share
    # a (slot, expert) group; a forced pair limit skips the group check
    assert use_decode(cfg, 512, 16, 2048, num_groups=512)
    assert use_decode(cfg, 256, 16, 2048, num_groups=128)
    assert not use_decode(cfg, 512, 16, 2048, num_groups=128)
    assert not use_decode(cfg, 1024, 16, 2048, num_groups=1 << 20)
    assert use_decode(cfg, 512, 16, 2048, max_pairs=1 << 30, num_groups=128)
    assert not use_decode(cfg, 8, 64, 2048)  # rank 64: A too big
    # wide column blocks from decode_wide_n_min_pairs on: w13's N = 768 in one block
    assert decode_config(cfg, 16, 2048, 768, 32)["BLOCK_N"] == 512
    assert decode_config(cfg, 16, 2048, 768, 128)["BLOCK_N"] == 1024
    assert decode_config(cfg, 16, 768, 2048, 128)["BLOCK_N"] == 1024
    # other GPUs: no decode kernel, the round-six split rule
    defaults = plan_config(None)
    assert not use_decode(defaults, 8, 16, 2048)
    assert defaults["expand_waves_small_max_pairs"] == 0


def test_decode_launch_chain_rules_round_eight():
    cfg = plan_config("NVIDIA H200")
    # the early route (weights loaded before the wait) up to 64 pairs (Qwen3 rank 16, M = 8),
    # not at 128; the trigger wherever the decode kernel runs
    assert decode_config(cfg, 16, 2048, 768, 64)["EARLY_ROUTE"]
    assert not decode_config(cfg, 16, 2048, 768, 128)["EARLY_ROUTE"]
    assert cfg["decode_trigger_max_pairs"] >= cfg["decode_max_pairs"]
    # GPT-OSS rank 16 (A 16 x 2880) keeps the tile path (measured and left off: slower inside
    # the whole MoE layer); forced on at <= 8 pairs it would take the early route in 16 warps
    assert not use_decode(cfg, 4, 16, 2880, num_groups=9 * 32)
    on = {**cfg, "decode_small_max_pairs": 8}
    assert use_decode(on, 4, 16, 2880, num_groups=9 * 32)
    assert not use_decode(on, 16, 16, 2880, num_groups=9 * 32)
    assert not use_decode(on, 4, 64, 768, num_groups=9 * 128)  # rank 64: never
    dc = decode_config(on, 16, 2880, 2880, 4)
    assert dc["EARLY_ROUTE"] and not dc["L2_PREFETCH"] and dc["num_warps"] == 16
    # other GPUs: none of it
    defaults = plan_config(None)
    assert not use_decode(defaults, 4, 16, 2880)
    assert not decode_config(defaults, 16, 2048, 768, 8)["EARLY_ROUTE"]
    assert defaults["decode_trigger_max_pairs"] == 0 and defaults["tail_trigger_max_pairs"] == 0


def test_sorter_rule_round_nine():
    cfg = plan_config("NVIDIA H200")
    # the one-program relaxed counting sort from 513 pairs while the groups are few ...
    assert choose_sorter(cfg, 1024, 32) == "count1r"  # GPT-OSS, one adapter, M = 256
    assert choose_sorter(cfg, 1024, 33 * 32) == "count1r"
    assert choose_sorter(cfg, 513, 128) == "count1r"
    # ... the one-program tl.sort below, and with many groups up to 1024 pairs
    assert choose_sorter(cfg, 512, 33 * 128) == "onepass"
    assert choose_sorter(cfg, 512, 128) == "onepass"
    assert choose_sorter(cfg, 1024, 33 * 128) == "onepass"
    assert choose_sorter(cfg, 2048, 128) == "count1r"
    # other GPUs: unchanged (tl.sort up to onepass_sort_max_pairs)
    assert choose_sorter(plan_config(None), 1024, 32) == "onepass"


def test_round_ten_rules():
    cfg = plan_config("NVIDIA H200")
    # the naive shrink in 2 warps up to 64 pairs at rank <= 16 (GPT-OSS rank 16, M <= 16)
    assert naive_shrink_warps(cfg, 4, 16) == 2
    assert naive_shrink_warps(cfg, 64, 16) == 2
    assert naive_shrink_warps(cfg, 65, 16) is None
    assert naive_shrink_warps(cfg, 4, 64) is None
    # the decode kernel without PDL only where the call says the kernel before it is not ours
    assert cfg["decode_nopdl_after_foreign"]
    assert not LaunchOptions().after_foreign
    # the first kernel without the PDL attribute: measured, off
    assert cfg["first_nopdl_max_pairs"] == 0
    defaults = plan_config(None)
    assert naive_shrink_warps(defaults, 4, 16) is None
    assert not defaults["decode_nopdl_after_foreign"]
