"""The plugin is registered as a vLLM general plugin and refuses vLLM versions not built for."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

pytest.importorskip("vllm")
from kernels import vllm_plugin  # noqa: E402


def test_registered_as_vllm_general_plugin():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("moe_lora") == "kernels.vllm_plugin:register"


def test_refuses_other_vllm_versions(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(vllm_plugin.UnsupportedVLLMVersion, match="supports vLLM 0.32.0 only"):
        vllm_plugin.check_vllm_version()


def test_accepts_the_pinned_version_with_local_suffix(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.32.0+cpu")
    vllm_plugin.check_vllm_version()


def test_cpu_install_selects_our_experts_and_punica_wrapper():
    from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method as umm
    from vllm.platforms import current_platform

    vllm_plugin.register()
    assert current_platform.get_punica_wrapper().endswith("MoELoRAPunicaWrapperCPU")

    class LoRAConfig:  # the one field the backend choice reads
        is_lora_enabled = True

    _, experts_cls = umm.select_unquantized_moe_backend(LoRAConfig())
    assert experts_cls.__name__ == "TorchLoRAExperts"


def test_pin_lora_pins_host_memory_only():
    """vLLM 0.32's pin also holds an accelerator slot its scheduler does not count (the engine
    died on a full batch of other adapters): the plugin pins in the host cache only."""
    from vllm.lora.model_manager import LRUCacheLoRAModelManager

    vllm_plugin.register()
    calls = []

    class Manager:
        def _pin_lora_in_cpu_cache(self, lora_id):
            calls.append(("cpu", lora_id))

        def _pin_lora_in_gpu_cache(self, lora_id):
            calls.append(("gpu", lora_id))

    assert LRUCacheLoRAModelManager.pin_adapter(Manager(), 7) is True
    assert calls == [("cpu", 7)]
