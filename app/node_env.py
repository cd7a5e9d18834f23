"""Ray settings of the node that serves the app: environment variables Ray's own processes (the
Serve controller above all) read when they start, so they must be in the environment of
`ray start` (scripts/serve.sh exports them) or of the process whose `ray.init` starts the node
(the benchmarks). Replica settings travel with the deployments instead (app/replica_env.py).

Why each (measured on the project's 2-core CPU machine, docs/serving.md):
  * RAY_SERVE_CONTROL_LOOP_INTERVAL_S 0.5 (Ray's default 0.1): every loop of Serve's controller
    asks the GCS for every node's state and resources and re-reconciles every application,
    whether anything changed or not. At 10 loops/s that took 15-19% of a core for the
    controller and 7-9% for the GCS during a flood, from the core the serving path runs on; at
    0.5 s, 4 requests in flight got 11-15% more tokens/s and 22-25% lower TTFT p50. Replica
    health checks, autoscaling and replica start-up keep their own periods; they are only
    noticed up to 0.4 s later.

An operator's own value wins: only unset variables get these defaults.

    eval "$(python -m app.node_env)"     # export the defaults that are not set yet
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping

NODE_ENV_DEFAULTS = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}


def node_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`environ` with the defaults added where it does not set them."""
    return {**NODE_ENV_DEFAULTS, **environ}


def export_lines(environ: Mapping[str, str] = os.environ) -> str:
    """Shell `export` lines for the defaults `environ` does not set."""
    return "".join(
        f"export {name}={shlex.quote(value)}\n"
        for name, value in NODE_ENV_DEFAULTS.items()
        if name not in environ
    )


if __name__ == "__main__":
    print(export_lines(), end="")
