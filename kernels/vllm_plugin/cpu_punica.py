"""Punica wrapper for vLLM on CPU: adapter-safe dense LoRA and the MoE-LoRA methods.

vLLM's CPU wrapper (PunicaWrapperCPU) has two gaps this class closes:
  * dense projections select weights with slot -1 for base tokens, which indexes the last slot
    (a cross-tenant leak, see kernels/dense_lora.py); every path here goes through ops that
    skip tokens without an adapter. Prefill and decode use the same per-token slot vector, so
    the per-sequence (sgmv) metadata is not needed.
  * it has no `add_lora_w13` / `add_lora_w2` (vLLM raises NotImplementedError), which the MoE
    experts call to add the expert LoRA delta; here they run our MoE-LoRA op through the same
    hooks as on CUDA (kernels/vllm_plugin/moe_hooks.py).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from kernels import dense_lora
from kernels.vllm_plugin import moe_hooks


class MoELoRAPunicaWrapperCPU(PunicaWrapperCPU):
    # ---- dense projections -------------------------------------------------------------------
    def _apply_shrink(self, y, x, w_t_all, scale):
        y = y.view(-1, y.shape[-1])
        dense_lora.lora_shrink(y, x, w_t_all, self.token_lora_indices, scale)

    def _apply_expand(self, y, x, w_t_all, y_offset, y_slice_size, add_inputs=True):
        dense_lora.lora_expand(
            y, x, w_t_all, self.token_lora_indices, y_offset, y_slice_size, add_inputs
        )

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs: Any):
        dense_lora.lora_expand(
            y, x, lora_b_stacked, self.token_lora_indices, 0, y.shape[-1], add_inputs
        )

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kw):
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        if buffer is None:
            buffer = torch.zeros(
                (x2.size(0), lora_b_stacked.size(-1)), dtype=torch.float32, device=x.device
            )
        dense_lora.lora_shrink(buffer, x2, lora_a_stacked, self.sampler_indices, scale)
        dense_lora.lora_expand(y2, buffer, lora_b_stacked, self.sampler_indices, 0, y2.shape[-1])

    # ---- MoE experts -------------------------------------------------------------------------
    def _token_slots(self, num_tokens: int, token_lora_mapping: torch.Tensor | None):
        if token_lora_mapping is not None:
            return token_lora_mapping
        return self.token_lora_indices[:num_tokens]

    @staticmethod
    def _check_supported(expert_map, fully_sharded) -> None:
        # CPU serving runs one engine process per replica: no expert or tensor parallelism.
        if expert_map is not None or fully_sharded:
            raise NotImplementedError(
                "MoE-LoRA on CPU supports neither expert parallelism nor fully sharded LoRA"
            )

    def add_lora_w13(
        self,
        y,
        x,
        lora_a_stacked,
        lora_b_stacked,
        topk_ids,
        topk_weights,
        expert_map,
        w1,
        w2,
        num_tokens,
        top_k_num,
        max_loras,
        adapter_enabled,
        local_num_experts,
        top_k,
        num_slices,
        fully_sharded,
        use_tuned_config,
        add_inputs=True,
        token_lora_mapping=None,
    ):
        self._check_supported(expert_map, fully_sharded)
        slots = self._token_slots(num_tokens, token_lora_mapping)
        return moe_hooks.add_lora_w13(
            y,
            x,
            lora_a_stacked,
            lora_b_stacked,
            topk_ids,
            slots,
            adapter_enabled,
            top_k_num,
            add_inputs=add_inputs,
        )

    def add_lora_w2(
        self,
        y,
        x,
        lora_a_stacked,
        lora_b_stacked,
        topk_weights,
        sorted_token_ids_lora,
        expert_ids_lora,
        num_tokens_post_padded_lora,
        token_lora_mapping,
        num_tokens,
        w1,
        w2,
        top_k_num,
        max_loras,
        adapter_enabled,
        top_k,
        fully_sharded,
        tp_rank,
        use_tuned_config,
        add_inputs=True,
    ):
        self._check_supported(None, fully_sharded)
        slots = self._token_slots(num_tokens, token_lora_mapping)
        w13_result = (sorted_token_ids_lora, expert_ids_lora, num_tokens_post_padded_lora, slots)
        moe_hooks.add_lora_w2(
            y,
            x,
            lora_a_stacked,
            lora_b_stacked,
            topk_weights,
            w13_result,
            adapter_enabled,
            num_tokens,
            top_k_num,
            add_inputs=add_inputs,
        )
