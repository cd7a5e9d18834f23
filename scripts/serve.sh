#!/usr/bin/env bash
# Starts the app: a local Ray node bound to 127.0.0.1 (so its dashboard and its metrics
# export port, which names tenants and adapters, are not reachable from other machines), then
# `serve run` of the config (default serve_config.yaml) in the foreground. Ctrl-C stops the
# app (in-flight requests drain, see graceful_shutdown_timeout_s) and then the Ray node.
#
#   bash scripts/serve.sh [CONFIG]       METRICS_PORT (default 8080): Prometheus metrics
#
# Ray 2.60 clusters use token authentication; the CLI finds the token with RAY_AUTH_MODE=token:
#   RAY_AUTH_MODE=token .venv/bin/serve status      RAY_AUTH_MODE=token .venv/bin/serve shutdown
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-serve_config.yaml}
export RAY_AUTH_MODE=token
.venv/bin/ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
  --metrics-export-port="${METRICS_PORT:-8080}" --disable-usage-stats >/dev/null
trap '.venv/bin/ray stop >/dev/null 2>&1 || true' EXIT
echo "Ray node up on 127.0.0.1 (metrics: http://127.0.0.1:${METRICS_PORT:-8080}/metrics)."
echo "Serving $CONFIG on the address in its http_options; GET /ready says 200 once it can serve."
RAY_ADDRESS=auto .venv/bin/serve run "$CONFIG"
