"""Fused MoE-LoRA operations and the vLLM plugin that installs them."""

from kernels.moe_lora import add_moe_lora_w2, add_moe_lora_w13

__all__ = ["add_moe_lora_w13", "add_moe_lora_w2"]
