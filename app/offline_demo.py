"""Generate a short completion per demo tenant adapter with vLLM directly (no server).

    python -m app.offline_demo

A smoke test of the engine layer: vLLM on CPU with our plugin serving LoRA on the MoE experts.
The built-in model has random weights, so the text is nonsense by design.
"""

from __future__ import annotations


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from app.builtin_model import DEMO_ADAPTERS, ensure_builtin_model

    paths = ensure_builtin_model()
    llm = LLM(
        model=str(paths.model),
        dtype="bfloat16",
        enable_lora=True,
        max_loras=len(DEMO_ADAPTERS),
        max_lora_rank=16,
        max_model_len=512,
        gpu_memory_utilization=0.3,
        enforce_eager=True,
    )
    messages = [{"role": "user", "content": "Where is my order?"}]
    params = SamplingParams(max_tokens=24, temperature=0.0)
    requests = [None] + [
        LoRARequest(a.name, i + 1, str(paths.adapter(a.name))) for i, a in enumerate(DEMO_ADAPTERS)
    ]
    outputs = llm.chat([messages] * len(requests), params, lora_request=requests, use_tqdm=False)
    for req, out in zip(requests, outputs, strict=True):
        print(f"{req.lora_name if req else 'base':>14}: {out.outputs[0].text!r}")


if __name__ == "__main__":
    main()
