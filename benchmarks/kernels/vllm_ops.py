"""vLLM 0.32.0's Triton ops, run unmodified from .vllm_ref/ (benchmarks/kernels/
fetch_vllm_ops.py copies them there; never committed), called the way vLLM calls them.

  VllmLoRA     fused_moe_lora, as PunicaWrapperGPU.add_lora_w13 / add_lora_w2 call it.
  VllmBaseMoE  the base fused-MoE kernel (fused_moe_kernel), launched as vLLM's
               invoke_fused_moe_triton_kernel does for unquantized bf16 weights, with the
               config vLLM picks on an H200 (try_get_optimal_moe_config).
Both need routing metadata from vLLM's CUDA op moe_(lora_)align_block_size, which the GPU
machine lacks: benchmarks/kernels/vllm_align.py builds it in PyTorch, outside the
timed region (this favours vLLM: its routing is not timed, ours is).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from benchmarks.kernels.vllm_align import active_lora_ids, punica_align

ROOT = Path(__file__).resolve().parents[2]
REF = ROOT / ".vllm_ref"
sys.path.insert(0, str(REF))


def _configs() -> dict:
    return json.loads((REF / "vllm_configs.json").read_text())


def source() -> str:
    return (REF / "SOURCE.txt").read_text().strip()


class VllmLoRA:
    """vLLM's fused_moe_lora, called exactly as PunicaWrapperGPU.add_lora_w13/w2 (0.32.0) do."""

    OPS = ("w13_shrink", "w13_expand", "w2_shrink", "w2_expand")

    def __init__(self):
        from vllm_ref import fused_moe_lora_op

        self.op = fused_moe_lora_op._fused_moe_lora
        self.configs = _configs()

    @staticmethod
    def _args(cfg):
        return (
            cfg.get("BLOCK_SIZE_M", 64),
            cfg.get("BLOCK_SIZE_N", 64),
            cfg.get("BLOCK_SIZE_K", 32),
            cfg.get("GROUP_SIZE_M", 8),
            cfg.get("NUM_WARPS", cfg.get("num_warps", 4)),
            cfg.get("NUM_STAGES", cfg.get("num_stages", 3)),
            cfg.get("SPLIT_K", 1),
        )

    def prepare(self, model, experts, rank, topk_ids, mapping, enabled, max_loras):
        """Everything add_lora_w13 computes before the kernel (not timed)."""
        m, top_k = topk_ids.shape
        cfg = {op: self.configs[f"{model}|{rank}|{m}|{op}"] for op in self.OPS}
        naive = m * top_k * 8 <= experts * max_loras
        bm = int(cfg["w13_shrink"].get("BLOCK_SIZE_M") or 64)
        lora_ids = active_lora_ids(mapping, max_loras)
        sorted_ids, expert_ids, ntpp = punica_align(
            topk_ids, mapping, bm, experts, max_loras, enabled, lora_ids, naive
        )
        if sorted_ids is not None:
            sorted_ids = sorted_ids.view(max_loras, -1)
            expert_ids = expert_ids.view(max_loras, -1)
        # specialize_active_lora=False: vLLM's default grid covers max_loras + 1 slots
        num_active = torch.tensor([max_loras + 1], dtype=torch.int32)
        small = naive and rank <= 64 and m * top_k * rank <= 1024
        path = "small-batch" if small else ("one-shot-naive" if naive else f"one-shot-BM{bm}")
        return dict(
            cfg=cfg,
            sorted=sorted_ids,
            eids=expert_ids,
            ntpp=ntpp,
            lora_ids=lora_ids,
            num_active=num_active,
            mapping=mapping,
            enabled=enabled,
            path=path,
            rank=rank,
            top_k=top_k,
        )

    def _call(self, out, x, a, b, topk_weights, meta, shrink, expand, mul_routed_weight):
        self.op(
            out, x, list(a), list(b), topk_weights, meta["sorted"], meta["eids"], meta["ntpp"],
            meta["mapping"], meta["rank"], meta["top_k"], meta["lora_ids"], meta["num_active"],
            meta["enabled"], *self._args(meta["cfg"][shrink]), *self._args(meta["cfg"][expand]),
            mul_routed_weight, False, 0, True,
        )  # fmt: skip

    def w13(self, out, x, a13, b13, topk_weights, meta):
        self._call(out, x, a13, b13, topk_weights, meta, "w13_shrink", "w13_expand", False)

    def w2(self, out, h, a2, b2, topk_weights, meta):
        self._call(out, h, [a2], [b2], topk_weights, meta, "w2_shrink", "w2_expand", True)


class VllmBaseMoE:
    """vLLM's base fused-MoE kernel for one unquantized bf16 MoE layer's gate_up and down GEMMs
    (fused_experts_impl: w13 into cache1 [M, top_k, 2I], activation, w2 into cache3
    [M, top_k, H] scaled by the routing weight)."""

    def __init__(self):
        from vllm_ref import fused_moe_base

        self.kernel = fused_moe_base.fused_moe_kernel
        self.configs = _configs()

    def prepare(self, model, experts, topk_ids):
        """_prepare_expert_assignment (not timed): naive when M * top_k * 4 <= E, else the
        block-aligned sort (vLLM's moe_align_block_size, here in PyTorch as one LoRA slot)."""
        m, top_k = topk_ids.shape
        cfg = self.configs[f"base|{model}|{m}"]
        bm = cfg["BLOCK_SIZE_M"]
        if m * top_k * 4 <= experts:
            ntpp = torch.full(
                (1,), topk_ids.numel() * bm, dtype=torch.int32, device=topk_ids.device
            )
            return dict(cfg=cfg, sorted=None, eids=topk_ids.reshape(-1), ntpp=ntpp, naive=True)
        mapping = torch.zeros(m, dtype=torch.int32, device=topk_ids.device)
        enabled = torch.ones(2, dtype=torch.int32, device=topk_ids.device)
        lora_ids = torch.tensor([0, -1], dtype=torch.int32, device=topk_ids.device)
        sorted_ids, expert_ids, ntpp = punica_align(
            topk_ids, mapping, bm, experts, 1, enabled, lora_ids, False
        )
        return dict(cfg=cfg, sorted=sorted_ids, eids=expert_ids, ntpp=ntpp, naive=False)

    def gemm(self, a, w, c, topk_weights, meta, mul_routed_weight, top_k):
        """c[M, top_k, N] = a[rows] @ w[e]^T (x routing weight), as vLLM's launcher does."""
        compute_type = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[a.dtype]
        cfg = dict(meta["cfg"])
        cfg["SPLIT_K"] = 1
        block_k = cfg.pop("BLOCK_SIZE_K")
        m = a.shape[0]
        num_tokens = m * top_k
        if meta["sorted"] is not None:
            em = meta["sorted"].shape[0]
            if m < cfg["BLOCK_SIZE_M"]:
                em = min(em, m * top_k * cfg["BLOCK_SIZE_M"])
        else:
            em = num_tokens * cfg["BLOCK_SIZE_M"]
        grid = (
            triton.cdiv(em, cfg["BLOCK_SIZE_M"]) * triton.cdiv(w.shape[1], cfg["BLOCK_SIZE_N"]),
        )
        self.kernel[grid](
            a, w, c, None, None, None, topk_weights, meta["sorted"], meta["eids"], meta["ntpp"],
            w.shape[1], w.shape[2], em, num_tokens,
            a.stride(0), a.stride(1), w.stride(0), w.stride(2), w.stride(1),
            c.stride(1), c.stride(2), 0, 0, 0, 0, 0, 0, 0, 0, 0,
            MUL_ROUTED_WEIGHT=mul_routed_weight, top_k=top_k, compute_type=compute_type,
            use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=False,
            per_channel_quant=False, naive_block_assignment=meta["sorted"] is None,
            HAS_BIAS=False, BLOCK_SIZE_K=block_k, SWAP_AB=False, USE_TD=False, **cfg,
        )  # fmt: skip
