"""vLLM's MoE-LoRA hooks (add_lora_w13 / add_lora_w2 of its punica wrappers) -> our op.

The same two functions serve the CPU wrapper (kernels/vllm_plugin/cpu_punica.py) and the CUDA
patch of PunicaWrapperGPU (kernels/vllm_plugin/__init__.py); both go through the op's front
door, kernels.moe_lora, which picks the torch or the Triton backend from the tensors' device.
Pure functions of tensors, no vLLM import: the argument mapping is tested without vLLM, and
against vLLM's own op on a GPU (tests/kernels/test_cuda_contract.py).

vLLM 0.32.0's contract at the two hooks:
  * w13: y [num_tokens * top_k_num, n_slices * N] (viewed [num_tokens, top_k_num, -1]),
    x [num_tokens, H], lora_a/b_stacked tuples of [max_loras, E, R, H] / [max_loras, E, N, R],
    topk_ids [num_tokens, top_k_num], token_lora_mapping [num_tokens] (-1 = no adapter),
    adapter_enabled [max_loras + 1]. Slice i is added at columns [i*N, (i+1)*N).
    add_inputs=False (dual-stream) means "write the delta only"; y is a zeroed buffer then.
    Returns a 4-tuple that vLLM passes, untouched, to add_lora_w2.
  * w2: y [num_tokens, top_k_num, H], x [num_tokens * top_k_num, I], lora tuples of one
    tensor, topk_weights [num_tokens, top_k_num]; the delta is scaled by the routing weight.

Our 4-tuple: (pair routing or None, topk_ids.flatten(), None, token_lora_mapping). The routing
rides in vLLM's `sorted_token_ids_lora` position so w2 reuses w13's grouping; vLLM never looks
inside it; the flat expert ids ride in `expert_ids_lora`, as vLLM's own naive block assignment
does. Expert parallelism (expert_map) and fully sharded LoRA are not supported by our op
(supported() says when): on CUDA the caller falls back to vLLM's own implementation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.moe_lora import add_moe_lora_w2, add_moe_lora_w13


def supported(expert_map, fully_sharded: bool) -> bool:
    return expert_map is None and not fully_sharded


def _after_vllm(t: torch.Tensor):
    """Launch options of our op at these hooks on CUDA: the kernel before each call is vLLM's
    base GEMM, not ours (round ten: LaunchOptions.after_foreign; the plan decides what it
    changes). None on CPU (the torch backend takes no options; triton is not imported)."""
    if t.device.type != "cuda":
        return None
    from kernels.triton_plan import LaunchOptions

    return LaunchOptions(after_foreign=True)


def add_lora_w13(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: Sequence[torch.Tensor],
    lora_b_stacked: Sequence[torch.Tensor],
    topk_ids: torch.Tensor,
    token_lora_mapping: torch.Tensor,
    adapter_enabled: torch.Tensor,
    top_k_num: int,
    add_inputs: bool = True,
    no_lora: bool = False,
) -> tuple:
    num_tokens = x.shape[0]
    out = y.view(num_tokens, top_k_num, -1)
    mapping = token_lora_mapping[:num_tokens]
    routing = None
    if not add_inputs:
        out.zero_()
    if not no_lora:
        routing = add_moe_lora_w13(
            out,
            x,
            topk_ids,
            mapping,
            lora_a_stacked,
            lora_b_stacked,
            slot_enabled=adapter_enabled,
            options=_after_vllm(x),
        )
    return routing, topk_ids.reshape(-1), None, mapping


def add_lora_w2(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: Sequence[torch.Tensor],
    lora_b_stacked: Sequence[torch.Tensor],
    topk_weights: torch.Tensor,
    w13_result: tuple,
    adapter_enabled: torch.Tensor,
    num_tokens: int,
    top_k_num: int,
    add_inputs: bool = True,
    no_lora: bool = False,
) -> None:
    routing, flat_topk_ids, _, mapping = w13_result
    out = y.view(num_tokens, top_k_num, -1)
    if not add_inputs:
        out.zero_()
    if no_lora:
        return
    add_moe_lora_w2(
        out,
        x,
        flat_topk_ids.view(num_tokens, top_k_num),
        topk_weights,
        mapping[:num_tokens],
        lora_a_stacked[0],
        lora_b_stacked[0],
        slot_enabled=adapter_enabled,
        routing=routing,
        options=_after_vllm(x),
    )
