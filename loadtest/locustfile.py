"""Locust load test: Zipf-popular tenants, each with its own key and adapter made for the run,
streaming chat completions; TTFT, ITL and tokens/s per tenant (docs/loadtest.md).

    .venv/bin/locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8000 \
        --tenants 16 --zipf-s 1.1 --shape poisson:rate=2,users=32,duration=300 \
        --run-dir loadtest/runs/r1 --csv loadtest/runs/r1/locust --html loadtest/runs/r1/locust.html
    .venv/bin/python -m loadtest.report loadtest/runs/r1       # CSV, HTML and PNG plots

At test start it creates `--tenants` tenants (`lt-<run id>-t01` ... by popularity rank), a key and
an adapter (`chat`, the files of a built-in demo adapter) for each, through the admin API
(`--admin-key`, default the demo config's `sk-admin-demo`), and deletes them at test end
(`--keep-tenants` keeps them). Each request picks its tenant with Zipf probabilities (rank i:
proportional to 1 / i**s), sends a prompt of `--prompt-words` words and asks for
`--output-tokens` tokens (distributions: fixed:N, uniform:LO:HI, lognormal:MEDIAN:SIGMA[:MAX],
exponential:MEAN[:MAX]; `ignore_eos` on by default, so the output length is the one drawn).
The load follows `--shape` (a LoadTestShape; constant, step, poisson: loadtest/workload.py), which
replaces -u/-r/-t. Every flag also reads an environment variable (MOELORA_LT_<FLAG>, e.g.
MOELORA_LT_TENANTS=32).

Every request is one row of `<run dir>/requests.csv` (tenant, status, tokens, TTFT, every content
event's time and token count: the report computes ITL and tokens/s from them); `run.json` holds
the parameters and tenants (never their keys). Locust's own stats get, per tenant, the request
(`chat <tenant>`, its time the whole stream) and `TTFT <tenant>`, `TPOT <tenant>` (ms) entries.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import gevent
import locust
from gevent import GreenletExit
from locust import HttpUser, LoadTestShape, events, task
from locust.exception import StopUser

from loadtest.provision import ADAPTER_NAME, Admin, RunTenant, adapter_uri, provision, remove
from loadtest.workload import (
    FIELDS,
    LengthDist,
    PoissonClock,
    RequestRecord,
    Shape,
    ZipfSampler,
    prompt_text,
    tenant_names,
    zipf_weights,
)

FLAGS = {  # flag: (default, help)
    "tenants": (16, "tenants created for the run"),
    "zipf-s": (1.1, "Zipf exponent of tenant popularity (0: uniform)"),
    "shape": ("constant:users=8,duration=300", "constant|step|poisson:key=value,..."),
    "prompt-words": (
        "lognormal:24:0.5:200",
        "prompt length distribution, in words (1-4 tokens each)",
    ),
    "output-tokens": ("uniform:16:128", "max_tokens distribution"),
    "think-s": (0.0, "closed-loop shapes: mean think time between requests (exponential)"),
    "base-fraction": (0.0, "share of requests to the base model instead of the adapter"),
    "temperature": (0.7, "sampling temperature"),
    "ignore-eos": (1, "1: generate exactly max_tokens tokens"),
    "seed": (0, "seed of every random choice"),
    "admin-key": ("sk-admin-demo", "admin API key"),
    "adapters": ("path", "path | builtin | a URI template with {adapter}"),
    "base-model": ("builtin-moe", "the served base model's name"),
    "run-dir": ("", "where requests.csv and run.json go (default loadtest/runs/<UTC time>)"),
    "keep-tenants": (0, "1: leave the run's tenants in the registry"),
}


@events.init_command_line_parser.add_listener
def _flags(parser) -> None:
    group = parser.add_argument_group("moelora load test (loadtest/locustfile.py)")
    for flag, (default, help_) in FLAGS.items():
        env = "MOELORA_LT_" + flag.upper().replace("-", "_")
        group.add_argument(
            f"--{flag}", type=type(default), default=default, env_var=env, help=f"{help_} [{env}]"
        )


@events.init.add_listener
def _check_flags(environment, **_) -> None:
    """Bad shape or distribution specs stop Locust before anything starts."""
    o = environment.parsed_options
    if o is None:
        return
    try:
        Shape.parse(o.shape)
        LengthDist.parse(o.prompt_words)
        LengthDist.parse(o.output_tokens)
        zipf_weights(o.tenants, o.zipf_s)
    except ValueError as exc:
        logging.error("load test: %s", exc)
        sys.exit(2)


class Run:
    """The run's state, shared by every user of this process."""

    def __init__(self, environment) -> None:
        o = environment.parsed_options
        self.environment = environment
        self.shape = Shape.parse(o.shape)
        self.prompt = LengthDist.parse(o.prompt_words)
        self.output = LengthDist.parse(o.output_tokens)
        self.options = o
        self.rng = random.Random(o.seed)
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        self.run_id = f"{stamp[2:8]}{stamp[9:]}{random.Random().randrange(100):02d}"
        self.dir = Path(o.run_dir or Path(__file__).parent / "runs" / stamp)
        self.dir.mkdir(parents=True, exist_ok=True)
        sampler = ZipfSampler(o.tenants, o.zipf_s, self.rng)
        self.sampler = sampler
        self.tenants = [
            RunTenant(name, rank, p, adapter_uri(o.adapters, rank))
            for rank, (name, p) in enumerate(
                zip(tenant_names(self.run_id, o.tenants), sampler.weights, strict=True), 1
            )
        ]
        self.admin = Admin(environment.host, o.admin_key)
        self.removed = False
        self.meta: dict = {}
        self._file = open(self.dir / "requests.csv", "w", newline="")  # noqa: SIM115
        self.writer = csv.DictWriter(self._file, fieldnames=FIELDS)
        self.writer.writeheader()

    def start(self) -> None:
        seconds = provision(self.admin, self.tenants)
        self.meta = {
            "run_id": self.run_id,
            "host": self.environment.host,
            "started_unix": time.time(),
            "provision_s": round(seconds, 2),
            "locust": locust.__version__,
            "parameters": {
                k.replace("-", "_"): getattr(self.options, k.replace("-", "_"))
                for k in FLAGS
                if k != "admin-key"
            },
            "shape_stages": [
                {"t": t, "users": s.users, "rate": s.rate} for t, s in self.shape.stages()
            ],
            "tenants": [t.public() for t in self.tenants],
        }
        self.write_meta()

    def write_meta(self) -> None:
        (self.dir / "run.json").write_text(json.dumps(self.meta, indent=1) + "\n")

    def record(self, rec: RequestRecord) -> None:
        if self._file.closed:
            return
        self.writer.writerow(rec.row())
        self._file.flush()

    def stage(self):
        shape = self.environment.shape_class
        return self.shape.plan(shape.get_run_time()) if shape else None

    def stop(self) -> None:
        if self.removed:
            return
        self.removed = True
        self.meta["ended_unix"] = time.time()
        if not self.options.keep_tenants:
            failed = remove(self.admin, [t.name for t in self.tenants])
            self.meta["tenants_removed"] = not failed
            if failed:
                self.meta["tenants_not_removed"] = failed
        self.write_meta()
        self._file.close()


RUN: Run | None = None
_user_ids = itertools.count()


@events.test_start.add_listener
def _start(environment, **_) -> None:
    global RUN
    if RUN is not None and not RUN.removed:
        return
    RUN = None
    try:
        run = Run(environment)
    except Exception as exc:  # noqa: BLE001 - a bad flag: say which, and stop
        return _abort(environment, f"load test: bad parameters: {exc}")
    try:
        run.start()
    except Exception as exc:  # noqa: BLE001 - provision() removed what it had created
        run.removed = True
        run._file.close()
        return _abort(environment, f"load test: could not create the run's tenants: {exc}")
    RUN = run
    print(f"load test: {len(run.tenants)} tenants ready, run directory {run.dir}", flush=True)
    if environment.shape_class is not None:  # the shape's clock starts once tenants exist
        environment.shape_class.reset_time()


def _abort(environment, message: str) -> None:
    logging.error(message)
    environment.process_exit_code = 1
    gevent.spawn_later(0, environment.runner.quit)


@events.test_stop.add_listener
def _stop(environment, **_) -> None:
    if RUN is not None:
        RUN.stop()


@events.quitting.add_listener
def _quitting(environment, **_) -> None:
    _stop(environment)


def _metric(kind: str, tenant: str, ms: float, length: int = 0) -> None:
    events.request.fire(
        request_type=kind,
        name=tenant,
        response_time=ms,
        response_length=length,
        exception=None,
        context={},
    )


class ZipfTenants(HttpUser):
    """A connection that sends requests for tenants drawn per request (Zipf)."""

    def on_start(self) -> None:
        if RUN is None:  # the run could not start (_abort): send nothing
            raise StopUser()
        self.run = RUN
        self.rng = random.Random(f"{RUN.options.seed}-user-{next(_user_ids)}")
        self.clock = PoissonClock(self.rng)

    def wait_time(self) -> float:
        """Closed loop: the think time. Poisson: 0, the task waits for its arrival itself."""
        stage = self.run.stage()
        if stage is not None and stage.rate:
            return 0.0
        think = self.run.options.think_s
        return self.rng.expovariate(1 / think) if think > 0 else 0.0

    def _await_arrival(self) -> float:
        """Poisson shape: sleeps until this user's next arrival, re-reading the rate at least
        every 0.5 s; returns how late the arrival is sent (0 for closed-loop shapes)."""
        while True:
            stage = self.run.stage()
            if stage is None or not stage.rate:
                return 0.0
            now = time.monotonic()
            delay = self.clock.wait(now, stage.rate, stage.users)
            if delay <= 0:
                late = now - self.clock.next_at
                self.clock.sent()
                return late
            gevent.sleep(min(delay, 0.5))

    @task
    def chat(self) -> None:
        run, o = self.run, self.run.options
        late = self._await_arrival()
        tenant = run.tenants[run.sampler()]
        base = self.rng.random() < o.base_fraction
        rec = RequestRecord(
            start=time.time(),
            tenant=tenant.name,
            rank=tenant.rank,
            model=o.base_model if base else ADAPTER_NAME,
            max_tokens=run.output.sample(self.rng),
            late_s=late,
        )
        body = {
            "model": rec.model,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_tokens": rec.max_tokens,
            "temperature": o.temperature,
            "ignore_eos": bool(o.ignore_eos),
            "messages": [
                {"role": "user", "content": prompt_text(self.rng, run.prompt.sample(self.rng))}
            ],
        }
        t0 = time.monotonic()
        try:
            with self.client.post(
                "/v1/chat/completions",
                json=body,
                stream=True,
                catch_response=True,
                headers={"Authorization": f"Bearer {tenant.key}"},
                name=f"chat {tenant.name}",
            ) as resp:
                try:
                    self._read(resp, rec, t0)
                except Exception as exc:  # noqa: BLE001 - a broken stream is a recorded outcome
                    rec.status = type(exc).__name__
                rec.e2e_s = time.monotonic() - t0
                resp.request_meta["response_time"] = rec.e2e_s * 1000
                resp.request_meta["response_length"] = rec.completion_tokens
                if rec.status == "ok":
                    resp.success()
                else:
                    detail = resp.text[:200] if rec.status.startswith("http_") else ""
                    resp.failure(f"{rec.status} {detail}".strip())
        except GreenletExit:  # Locust stops users at the end of the test, mid-stream
            rec.status, rec.e2e_s = "cancelled", time.monotonic() - t0
            run.record(rec)  # the tokens it got count; it is no error
            raise
        run.record(rec)
        if rec.ttft_s is not None:
            _metric("TTFT", tenant.name, rec.ttft_s * 1000, rec.completion_tokens)
        tpot = rec.tpot_s()
        if tpot is not None:
            _metric("TPOT", tenant.name, tpot * 1000, rec.completion_tokens)

    @staticmethod
    def _read(resp, rec: RequestRecord, t0: float) -> None:
        if resp.status_code != 200:
            rec.status = f"http_{resp.status_code}"
            return
        seen = 0
        last = None
        for line in resp.iter_lines():
            if not line or not line.startswith(b"data: "):
                continue
            last = line
            if line == b"data: [DONE]":
                continue
            now = time.monotonic() - t0
            chunk = json.loads(line[6:])
            if "error" in chunk:
                rec.status = "error_event"
                return
            usage = chunk.get("usage") or {}
            rec.prompt_tokens = usage.get("prompt_tokens", rec.prompt_tokens)
            total = usage.get("completion_tokens", seen)
            choices = chunk.get("choices") or []
            content = any((c.get("delta") or {}).get("content") for c in choices)
            new = total - seen if usage else int(content)
            if new > 0 and choices:
                rec.events.append((now, new))
                if rec.ttft_s is None:
                    rec.ttft_s = now
            seen = max(seen, total)
        rec.completion_tokens = seen
        rec.status = "ok" if last == b"data: [DONE]" else "bad_stream"


class ZipfShape(LoadTestShape):
    """`--shape`: users (and, for poisson, the arrival rate) over time (loadtest/workload.py)."""

    def tick(self):
        run_shape = Shape.parse(self.runner.environment.parsed_options.shape)
        stage = run_shape.plan(self.get_run_time())
        return None if stage is None else (stage.users, stage.spawn_rate)
