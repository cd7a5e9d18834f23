"""A two-node Ray cluster on one machine, started as an operator would: `ray start --head` and
`ray start --address` for a worker with its own temp dir, ports, custom resource and node-local
cache directory; the app deployed with `serve deploy`. Engine replicas may only run where the
`engine_node` resource is (the worker), the Registry where `head` is. Tenants' adapters exist
only in an S3-compatible object store (moto's server): the worker's engine fetches them into its
own cache. Each tenant's reply, through the head's HTTP proxy with the `openai` client, must
come from an engine replica on the worker and be token-exact with the same adapter's output
loaded from its original files (builtin:, which tests/engine checks against HF transformers).
"""

from __future__ import annotations

import json
import time

import boto3
import httpx
import openai
import pytest
import yaml

from app.builtin_model import BUILTIN_MODEL_NAME, DEMO_TENANTS
from tests.cluster.ray_nodes import SERVE, Cluster
from tests.integration.app_under_test import app_args
from tests.net import free_port
from tests.object_store import DUMMY_AWS_ENV, s3_server, upload_directory

pytestmark = pytest.mark.engine

BUCKET = "adapters"
ENGINE_RESOURCE = "engine_node"
HEAD_RESOURCE = "head"
MESSAGES = [{"role": "user", "content": "Where is my order?"}]
READY_TIMEOUT_S = 600
LOGPROB_TOL = 1e-4  # same engine, same weights (tests/engine: observed <= 6e-6 across engines)


def serve_config(s3_endpoint: str, http_port: int, state) -> dict:
    """What an operator writes for a cluster: tenants' adapters on S3, engines on engine
    nodes, the Registry's SQLite file on the head. (Reference copies of the same adapters
    from their original files, `builtin:`, are shared: the test compares against them.)"""
    args = app_args()
    args["engine"] |= {"max_loras": 4, "max_cpu_loras": 8}
    args["deployment"] |= {
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 1, "resources": {ENGINE_RESOURCE: 1}},
        "env_vars": DUMMY_AWS_ENV,  # a real deployment: the node's role or its own secrets
    }
    args["adapters"] = [
        {"name": t.adapter, "path": f"s3://{BUCKET}/{t.name}/{t.adapter}", "owner": t.name}
        for t in DEMO_TENANTS
    ] + [
        {"name": f"ref-{t.adapter}", "path": f"builtin:{t.adapter}", "shared": True}
        for t in DEMO_TENANTS
    ]
    args["registry"] = {"path": str(state / "registry.sqlite")}
    args["adapter_storage"] = {"object_store": {"endpoint_url": s3_endpoint}}
    return {
        # One machine: one proxy (two on one port would clash); a real cluster uses EveryNode.
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [
            {
                "name": "moelora",
                "route_prefix": "/",
                "import_path": "app.main:build_app",
                "args": args,
                "deployments": [
                    {
                        "name": "Registry",
                        "ray_actor_options": {
                            "num_cpus": 0,
                            "resources": {HEAD_RESOURCE: 0.01},
                        },
                    }
                ],
            }
        ],
    }


@pytest.fixture(scope="module")
def cluster(builtin, tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    worker_cache = tmp_path_factory.mktemp("worker-cache")
    with s3_server() as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket=BUCKET)
        for t in DEMO_TENANTS:
            upload_directory(s3, BUCKET, f"{t.name}/{t.adapter}", builtin.adapter(t.adapter))
        c = Cluster()
        try:
            head = c.start_node("head", head=True, num_cpus=1, resources={HEAD_RESOURCE: 1})
            worker = c.start_node(
                "worker",
                head=False,
                num_cpus=2,
                resources={ENGINE_RESOURCE: 1},
                env={"MOELORA_CACHE": str(worker_cache)},  # the worker's own disk
            )
            http_port = free_port()
            config = state / "serve_config.yaml"
            config.write_text(yaml.safe_dump(serve_config(endpoint, http_port, state)))
            t0 = time.monotonic()
            c.cli(SERVE, "deploy", str(config), "--address", c.dashboard)
            base_url = f"http://127.0.0.1:{http_port}"
            wait_ready(base_url, c)
            print(f"serve deploy to ready: {time.monotonic() - t0:.0f} s")
            yield c, head, worker, base_url, worker_cache
            c.cli(SERVE, "shutdown", "--yes", "--address", c.dashboard)
        finally:
            c.stop()


def wait_ready(base_url: str, c: Cluster) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{base_url}/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            status = c.cli(SERVE, "status", "--address", c.dashboard)
            raise AssertionError(f"not ready in {READY_TIMEOUT_S} s:\n{status}")
        time.sleep(2)


def replicas_by_id(c: Cluster) -> dict[str, dict]:
    """Every replica of the app, from Serve's REST API (what `serve status` reads)."""
    app = c.dashboard_get("/api/serve/applications/")["applications"]["moelora"]
    return {
        r["replica_id"]: {**r, "deployment": name}
        for name, d in app["deployments"].items()
        for r in d["replicas"]
    }


def greedy(base_url: str, key: str, model: str) -> tuple[str, list[float], str]:
    """(text, log-probability of each token, x-served-by) of a greedy chat reply."""
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=300)
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    reply = raw.parse()
    assert reply.model == model and reply.usage.completion_tokens == 12
    choice = reply.choices[0]
    logprobs = [t.logprob for t in choice.logprobs.content]
    return choice.message.content, logprobs, raw.headers["x-served-by"]


def test_nodes_have_their_own_resources(cluster):
    c, head, worker, _, _ = cluster
    nodes = c.alive_nodes()
    assert len(nodes) == 2
    heads = [n for n in nodes if n["is_head_node"]]
    workers = [n for n in nodes if not n["is_head_node"]]
    assert len(heads) == 1 and len(workers) == 1, nodes
    assert ENGINE_RESOURCE in workers[0]["resources_total"], workers
    assert ENGINE_RESOURCE not in heads[0]["resources_total"], heads


def test_tenants_are_served_by_engines_on_the_worker_with_adapters_from_s3(cluster):
    c, _, _, base_url, worker_cache = cluster
    nodes = c.alive_nodes()
    worker_id = next(n["node_id"] for n in nodes if not n["is_head_node"])
    head_id = next(n["node_id"] for n in nodes if n["is_head_node"])
    replicas = replicas_by_id(c)
    engines = [r for r in replicas.values() if r["deployment"] == "Engine"]
    assert engines and all(r["node_id"] == worker_id for r in engines), engines
    (registry,) = [r for r in replicas.values() if r["deployment"] == "Registry"]
    assert registry["node_id"] == head_id, registry

    base = greedy(base_url, DEMO_TENANTS[0].api_key, BUILTIN_MODEL_NAME)
    replies = {"base": base[:2]}
    for t in DEMO_TENANTS:
        text, logprobs, served_by = greedy(base_url, t.api_key, t.adapter)
        assert replicas[served_by]["node_id"] == worker_id, (t.name, replicas[served_by])
        ref_text, ref_logprobs, _ = greedy(base_url, t.api_key, f"ref-{t.adapter}")
        assert text == ref_text, (t.name, text, ref_text)
        diff = max(abs(a - b) for a, b in zip(logprobs, ref_logprobs, strict=True))
        assert diff < LOGPROB_TOL, (t.name, logprobs, ref_logprobs)
        replies[t.name] = (text, logprobs)
    # Each tenant got its own adapter, none the base model: every pair differs in a token or
    # by far more than LOGPROB_TOL in a token's log-probability (greedy texts alone can agree).
    names = list(replies)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            (text_a, lp_a), (text_b, lp_b) = replies[a], replies[b]
            gap = max(abs(x - y) for x, y in zip(lp_a, lp_b, strict=True))
            assert text_a != text_b or gap > 100 * LOGPROB_TOL, (a, b, replies[a], replies[b])
    # The worker fetched them from S3 into its own node-local cache.
    cached = {json.loads(m.read_text())["uri"] for m in worker_cache.rglob("meta.json")}
    from_s3 = {f"s3://{BUCKET}/{t.name}/{t.adapter}" for t in DEMO_TENANTS}
    assert from_s3 <= cached, cached
    # Another tenant's adapter stays invisible on the cluster too.
    other = openai.OpenAI(base_url=f"{base_url}/v1", api_key=DEMO_TENANTS[1].api_key)
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=DEMO_TENANTS[0].adapter, messages=MESSAGES)
