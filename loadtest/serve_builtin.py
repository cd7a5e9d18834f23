"""The app of serve_config.yaml (built-in model, demo tenants, admin key sk-admin-demo) in a Ray of
its own on a port of your choice, with a fresh registry in a temp dir: a server for a load test
that leaves any other Ray on the machine, and the registry in ~/.cache, alone.

    .venv/bin/python -m loadtest.serve_builtin [--port 8801] [--config serve_config.yaml]

Prints `ready on http://127.0.0.1:PORT` once it can serve; Ctrl-C (or SIGTERM) stops it.
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def app_args(config: Path, registry_path: str) -> dict:
    (app,) = yaml.safe_load(config.read_text())["applications"]
    args = dict(app["args"])
    if "tenants_file" in args:  # relative to the config, as `serve run` from the root reads it
        args["tenants_file"] = str((config.parent / args["tenants_file"]).resolve())
    args["registry"] = {**args.get("registry", {}), "path": registry_path}
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8801)
    parser.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml")
    parser.add_argument("--num-cpus", type=int, default=8, help="Ray's logical CPUs")
    args = parser.parse_args()

    import ray
    from ray import serve

    from app.main import build_app

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loadtest-registry-") as tmp:
        cfg = app_args(args.config, str(Path(tmp) / "registry.sqlite"))
        # "local": a Ray of its own, never a cluster found on this machine (`ray start`).
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
                 log_to_driver=False)  # fmt: skip
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": args.port})
            serve.run(build_app(cfg), name="moelora", route_prefix="/")
            print(f"ready on http://127.0.0.1:{args.port} after "
                  f"{time.monotonic() - started:.0f} s", flush=True)  # fmt: skip
            while not stop.wait(1):
                pass
        finally:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
