"""Triton MoE-LoRA kernels vs the oracle on CPU, in Triton's interpreter.

The cases live in tests/kernels/interp_moe_lora_cases.py. Triton must be imported with
TRITON_INTERPRET=1 already set (it reads the variable at import, at @triton.jit decoration and
while interpreted kernels run), so:
  * run with the variable set, e.g.
        TRITON_INTERPRET=1 python -m pytest -q tests/kernels/test_triton_moe_lora.py
    and every case is collected here and reported individually;
  * run without it and without a GPU (CI's plain `pytest`), and the cases run in one fresh
    interpreter-mode pytest process; other tests of the session never see the variable;
  * with a GPU and without the variable, this is skipped: the real kernels are checked there by
    tests/kernels/test_triton_gpu.py and tests/kernels/test_cuda_contract.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("interp_moe_lora_cases.py")

if os.environ.get("TRITON_INTERPRET") == "1":
    from tests.kernels.interp_moe_lora_cases import *  # noqa: F401,F403
else:
    import torch

    if torch.cuda.is_available():
        pytest.skip(
            "CUDA present: interpreter tests need TRITON_INTERPRET=1 set at start",
            allow_module_level=True,
        )

    def test_kernels_in_triton_interpreter():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        root = Path(__file__).resolve().parents[2]
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=600,
        )
        summary = r.stdout.strip().splitlines()[-1:] or [""]
        assert r.returncode == 0, f"{summary[0]}\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}"
