"""The README's first command, as a user runs it: `scripts/serve.sh` starts a Ray node and
`serve run` of the config; `/ready` turns 200; a demo tenant streams with the official openai
client, a client that goes away mid-stream gets its engine request cancelled, and a bad key
gets its OpenAI-style 401 through the HTTP front; Ctrl-C (SIGINT to the
script's process group) stops the app, the front and the Ray node. Twice: with the script's
default front (HAProxy in front of the ingress replicas' own HTTP servers) and with Ray's Python
proxy (RAY_SERVE_ENABLE_HA_PROXY=0).

Its own package: no other Ray may run beside it (the script's `ray stop` stops every Ray process
on the machine, as Ray's CLI does), and pytest runs packages one after the other."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml

from app.builtin_model import DEMO_TENANTS
from app.node_env import NODE_ENV_DEFAULTS
from tests.net import free_port

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 300
RAY_ADDRESS_FILE = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"


def as_from_a_terminal() -> None:
    """Ctrl-C delivered with its default action, as a terminal gives it: a process started in
    the background by a script inherits SIGINT ignored, and one forked by Ray's process
    launcher has it blocked; either would make the script deaf to the Ctrl-C below."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def haproxy_in_session(session: int) -> bool:
    """Whether an HAProxy process runs in the script's session (the Ray node's processes are)."""
    for p in psutil.process_iter(["name"]):
        try:
            if p.info["name"] == "haproxy" and os.getsid(p.pid) == session:
                return True
        except (ProcessLookupError, PermissionError):
            pass
    return False


def controller_environment(session: int) -> dict[str, str]:
    """The environment of the Serve controller among the script's session's processes."""
    for p in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(p.pid) == session and "ray::ServeController" in " ".join(
                p.info["cmdline"] or ()
            ):
                return p.environ()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    raise AssertionError("no Serve controller in the script's session")


def engine_call_line(log: Path, request_id: str, timeout_s: float = 60) -> str:
    """The engine replica's access-log line for the request (Ray Serve writes one per call when
    it ends: "CALL chat OK|ERROR|CANCELLED <ms>"; `serve run` forwards replica logs)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if "Engine" in line and request_id in line and "CALL chat" in line:
                return line
        time.sleep(0.5)
    raise AssertionError(f"no engine call logged for {request_id}")


def leave_mid_stream(port: int, api_key: str, model: str, request_id: str) -> None:
    """A stream asked for 800 tokens, read for three chunks, then the connection closed."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me everything."}],
        "max_tokens": 800,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {api_key}", "x-request-id": request_id}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        for _ in range(3):
            next(events)


@pytest.mark.parametrize("haproxy", [True, False], ids=["haproxy", "python-proxy"])
def test_serve_script_starts_the_app_serves_a_stream_and_stops_on_ctrl_c(
    builtin, tmp_path, haproxy
):
    port, metrics_port = free_port(), free_port()
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "serve.log"
    env = {**os.environ, "METRICS_PORT": str(metrics_port)}
    env.pop("RAY_SERVE_ENABLE_HA_PROXY", None)
    if not haproxy:  # the README's opt-out
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
    proc = subprocess.Popen(
        ["bash", "scripts/serve.sh", str(path)],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, as a terminal gives it
        preexec_fn=as_from_a_terminal,
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert ready is not None and ready.status_code == 200, log.read_text()[-3000:]
        assert ready.headers.get("x-request-id")
        assert haproxy_in_session(proc.pid) == haproxy, log.read_text()[-3000:]
        # The node settings the script exports reach Ray's own processes (app/node_env.py).
        controller_env = controller_environment(proc.pid)
        for name, value in NODE_ENV_DEFAULTS.items():
            assert controller_env.get(name) == value, name

        tenant = DEMO_TENANTS[0]
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=tenant.api_key, max_retries=0
        )
        served = f"served-{uuid.uuid4().hex[:12]}"
        chunks = list(
            client.chat.completions.create(
                model=tenant.adapter,
                messages=[{"role": "user", "content": "Where is my order?"}],
                max_tokens=8,
                stream=True,
                extra_headers={"x-request-id": served},
            )
        )
        assert chunks and chunks[-1].choices[0].finish_reason == "length"
        assert all(c.model == tenant.adapter for c in chunks)
        assert "".join(c.choices[0].delta.content or "" for c in chunks)
        # Through the front, a client gone mid-stream ends the engine's work on it: its call
        # is cancelled, not run on to the 800 tokens (seconds here) and logged OK.
        gone = f"gone-{uuid.uuid4().hex[:12]}"
        leave_mid_stream(port, tenant.api_key, tenant.adapter, gone)
        assert " CANCELLED " in engine_call_line(log, gone)
        assert " OK " in engine_call_line(log, served)  # a stream read to its end
        with pytest.raises(openai.AuthenticationError) as denied:
            openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-wrong", max_retries=0
            ).models.list()
        assert denied.value.body["type"] == "AuthenticationError", denied.value.body
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert metrics.status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the Ray node's processes are in this group
            # The script's `ray stop` did not run: without this, later tests' ray.init() would
            # take the dead node's address file for a running cluster.
            RAY_ADDRESS_FILE.unlink(missing_ok=True)
            raise
    assert not listening(port), log.read_text()[-3000:]
    assert not haproxy_in_session(proc.pid), "HAProxy outlived the app"
    assert not listening(metrics_port), "the Ray node is still up"
