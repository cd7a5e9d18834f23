"""The independent reference for multi-LoRA correctness: HF transformers on the base model with one
adapter's LoRA merged into the weights (W' = W + alpha/r * B @ A), in fp32.

Nothing here touches vLLM or our kernels, so agreement with the served model is real evidence.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PEFT_PREFIX = "base_model.model."


def merged_state_dict(model_dir: Path, adapter_dir: Path | None, *, skip: tuple[str, ...] = ()):
    """Base weights with the adapter merged. `skip` drops adapter modules whose name contains any
    of the given substrings (e.g. ".experts." to merge only the attention part)."""
    sd = load_file(str(Path(model_dir) / "model.safetensors"))
    if adapter_dir is None:
        return sd
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    lora = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    for key, a in lora.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
        if any(s in module for s in skip):
            continue
        b = lora[key.replace("lora_A", "lora_B")]
        w = sd[module + ".weight"]
        sd[module + ".weight"] = (w.double() + scale * (b.double() @ a.double())).to(w.dtype)
    return sd


def load_merged_model(model_dir: Path, adapter_dir: Path | None, workdir: Path, **kw):
    """An HF model (fp32, eval) with the adapter merged, loaded from a merged checkpoint copy."""
    from transformers import AutoModelForCausalLM

    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        (out / name).write_bytes((Path(model_dir) / name).read_bytes())
    save_file(merged_state_dict(model_dir, adapter_dir, **kw), str(out / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def token_logprobs(model, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
    """Teacher-forced log-probability of each completion token given everything before it."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(ids).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids)
    return [logprobs[start + i - 1, t].item() for i, t in enumerate(completion_ids)]
