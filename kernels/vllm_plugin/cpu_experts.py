"""A LoRA-capable MoE experts implementation for vLLM on CPU.

vLLM's CPU experts run gate_up, activation and down in one fused C++ call, which leaves no place
to add a LoRA delta, so with LoRA enabled vLLM falls back to its Triton experts and fails on CPU.
This class computes the experts in PyTorch with the two hook points vLLM's LoRA layer expects:
the w13 delta is added to the gate_up output before the activation, and the w2 delta (scaled by
the routing weight) to each (token, k) down output before the top-k sum. Both deltas come from
the punica wrapper (kernels/vllm_plugin/cpu_punica.py), i.e. from our MoE-LoRA op.

The base expert GEMMs loop over the experts that received tokens (at most E iterations, each a
dense matmul over that expert's tokens): the usual PyTorch-native MoE formulation.
"""

from __future__ import annotations

import torch
import vllm.model_executor.layers.fused_moe.modular_kernel as mk
from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
from vllm.model_executor.layers.fused_moe.experts.lora_experts_mixin import LoRAExpertsMixin
from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import TopKWeightAndReduceNoOP


def _grouped_linear(
    out: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, expert_of_row: torch.Tensor
) -> None:
    """out[i] = weights[expert_of_row[i]] @ x[i], grouped by expert. weights: [E, N, K]."""
    order = torch.argsort(expert_of_row, stable=True)
    counts = torch.bincount(expert_of_row, minlength=weights.shape[0]).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count:
            rows = order[start : start + count]
            out[rows] = x[rows] @ weights[expert].t()
            start += count


class TorchLoRAExperts(LoRAExpertsMixin, CPUUnquantizedExperts):
    """Unquantized experts in PyTorch, with vLLM's MoE-LoRA hooks."""

    @staticmethod
    def is_supported_config(cls, moe_config, weight_key, activation_key, activation_format):
        # No grouped-GEMM alignment constraints: plain matmuls take any shape.
        return mk.FusedMoEExperts.is_supported_config(
            cls, moe_config, weight_key, activation_key, activation_format
        )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # Keep the checkpoint layout ([E, 2I, H] and [E, H, I]); no CPU prepacking.
        self._use_zentorch = False

    def workspace_shapes(
        self, M, N, K, topk, global_num_experts, local_num_experts, expert_tokens_meta, activation
    ):
        return (0,), (0,), (M, K)

    def finalize_weight_and_reduce_impl(self) -> mk.TopKWeightAndReduce:
        return TopKWeightAndReduceNoOP()  # apply() reduces over top-k itself

    def apply(
        self,
        output,
        hidden_states,
        w1,
        w2,
        topk_weights,
        topk_ids,
        activation,
        global_num_experts,
        expert_map,
        a1q_scale,
        a2_scale,
        workspace13,
        workspace2,
        expert_tokens_meta,
        apply_router_weight_on_input,
    ):
        if expert_map is not None:
            raise NotImplementedError("expert parallelism is not supported on CPU")
        num_tokens, top_k = topk_ids.shape
        hidden = hidden_states.shape[1]
        expert_of_pair = topk_ids.reshape(-1).long()
        token_of_pair = torch.arange(num_tokens, device=topk_ids.device).repeat_interleave(top_k)
        ctx = self._lora_context

        gate_up = hidden_states.new_empty(num_tokens * top_k, w1.shape[1])
        _grouped_linear(gate_up, hidden_states[token_of_pair], w1, expert_of_pair)
        if self.w1_bias is not None:
            gate_up += self.w1_bias[expert_of_pair]
        lora_meta = (None, None, None, None)
        if ctx is not None:
            lora_meta = self.apply_w13_lora(
                ctx,
                y=gate_up,
                x=hidden_states,
                topk_ids=topk_ids,
                topk_weights=topk_weights,
                expert_map=None,
                w1=w1,
                w2=w2,
                num_tokens=num_tokens,
                top_k_num=top_k,
            )

        act = hidden_states.new_empty(
            num_tokens * top_k, self.adjust_N_for_activation(w1.shape[1], activation)
        )
        self.activation(activation, act, gate_up)

        down = hidden_states.new_empty(num_tokens * top_k, hidden)
        _grouped_linear(down, act, w2, expert_of_pair)
        if self.w2_bias is not None:
            down += self.w2_bias[expert_of_pair]
        down = down.view(num_tokens, top_k, hidden)
        if not apply_router_weight_on_input:  # otherwise prepare() already scaled the input
            down *= topk_weights.unsqueeze(-1).to(down.dtype)
        if ctx is not None:
            sorted_ids, expert_ids, padded, token_map = lora_meta
            self.apply_w2_lora(
                ctx,
                y=down,
                x=act,
                topk_weights=topk_weights,
                sorted_token_ids_lora=sorted_ids,
                expert_ids_lora=expert_ids,
                num_tokens_post_padded_lora=padded,
                token_lora_mapping=token_map,
                num_tokens=num_tokens,
                w1=w1,
                w2=w2,
                top_k_num=top_k,
            )
        torch.sum(down, dim=1, out=output)
