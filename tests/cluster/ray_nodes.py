"""Ray nodes started with the `ray start` CLI, as an operator would, several on one machine:
each with its own temp dir and ports (free ones, so other Ray clusters on the machine are left
alone), token authentication with this cluster's own token, and `--block`, so that stopping
the `ray start` process stops that node and nothing else."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.net import free_port

RAY = str(Path(sys.executable).parent / "ray")
SERVE = str(Path(sys.executable).parent / "serve")


@dataclass
class RayNode:
    name: str
    temp_dir: Path
    metrics_port: int
    process: subprocess.Popen
    log: Path

    def logs(self) -> str:
        """The ends of `ray start`'s output and of the node's raylet and agent logs."""
        logs = self.temp_dir / "session_latest/logs"
        files = [self.log, logs / "raylet.out", logs / "dashboard_agent.log"]
        return "\n".join(f"--- {f}\n{f.read_text()[-2000:]}" for f in files if f.is_file())

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM to `ray start --block`: it stops its node's processes; then the process
        group it leads (everything it started) is killed in case some were left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass
class Cluster:
    """A head and workers on this machine; `env` is what the CLI needs to reach it."""

    token: str = field(default_factory=lambda: secrets.token_hex(32))
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: list[RayNode] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            # A busy machine can take longer than the defaults to start a node's agents.
            "RAY_agent_register_timeout_ms": "180000",
            "RAY_raylet_start_wait_time_s": "180",
        }

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def dashboard_get(self, path: str) -> dict:
        resp = httpx.get(
            f"{self.dashboard}{path}",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )
        resp.raise_for_status()
        return resp.json()

    def start_node(
        self, name: str, *, head: bool, num_cpus: int, resources: dict, env: dict | None = None
    ) -> RayNode:
        """Starts a node and waits until the cluster has it; `env`: this node's own settings.
        A node whose start fails (on a loaded machine its raylet can give up waiting for its
        agents) is started once more, on fresh ports."""
        for attempt in range(2):
            try:
                return self._start_node(name, head, num_cpus, resources, env)
            except AssertionError as failure:
                node = self.nodes.pop()
                node.stop()
                if attempt == 1:
                    raise
                print(f"ray start of {name} failed; once more. {str(failure)[-600:]}")
                if head:
                    self.gcs_port, self.dashboard_port = free_port(), free_port()
        raise AssertionError("not reached")

    def _start_node(
        self, name: str, head: bool, num_cpus: int, resources: dict, env: dict | None
    ) -> RayNode:
        temp_dir = Path(tempfile.mkdtemp(prefix=f"ray-{name}-", dir="/tmp"))  # short: sockets
        metrics_port = free_port()
        args = [
            RAY,
            "start",
            "--block",
            "--disable-usage-stats",
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources)}",
            f"--temp-dir={temp_dir}",
            f"--metrics-export-port={metrics_port}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            "--object-store-memory=200000000",
        ]
        if head:
            args += [
                "--head",
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
            ]
        else:
            args += [f"--address={self.head_ip}:{self.gcs_port}"]
        log = temp_dir / "ray-start.log"
        with open(log, "w") as out:
            process = subprocess.Popen(
                args,
                env={**self.env, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd="/",  # nothing found through the checkout's directory
            )
        node = RayNode(name, temp_dir, metrics_port, process, log)
        self.nodes.append(node)
        self._wait_for_nodes(len(self.nodes), node)
        return node

    @property
    def head_ip(self) -> str:
        import ray.util

        return ray.util.get_node_ip_address()

    def _wait_for_nodes(self, count: int, node: RayNode, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert node.process.poll() is None, node.logs()
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, node.logs()
            time.sleep(1)

    def alive_nodes(self) -> list[dict]:
        """Ray's state API (the dashboard's REST form of `ray list nodes`)."""
        data = self.dashboard_get("/api/v0/nodes?limit=100&detail=1")["data"]["result"]
        return [n for n in data["result"] if n["state"] == "ALIVE"]

    def cli(self, *args: str, timeout_s: float = 300) -> str:
        out = subprocess.run(
            args, env=self.env, capture_output=True, text=True, timeout=timeout_s, cwd="/"
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def stop(self) -> None:
        for node in reversed(self.nodes):  # workers first, then the head
            node.stop()
