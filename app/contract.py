"""The contract between the ingress and the engine deployment: what crosses the Ray handle hop.

One engine method per OpenAI endpoint (`chat`, `completion`), each an async generator:

    Accepted                       always first, as soon as a replica takes the request: which
                                   replica (the ingress bounds the wait for it)
    ReplyHead                      then: how it answers
    str, str, ...                  only when head.kind is STREAM and the text does not go over
                                   the token link (app/token_link.py): vLLM's SSE text, one or
                                   more whole `data: ...\\n\\n` events per item (coalesced when
                                   the consumer is behind, never split)
    ReplyTail                      only when head.kind is STREAM, always last: token counts, and
                                   whether the text went over the token link

The adapter travels in a `RequestContext` argument beside the request, its `engine_name` also
being the handle's multiplexed model id (the request router places the request by it). The request's
`model` stays the name the client sent; the engine swaps in the engine name for vLLM's serving
layer (which looks the LoRA up by it) and swaps the client's name back into the reply.

JSON bodies cross the hop already serialised (bytes), so the ingress sends them without
re-encoding vLLM's objects.

Stats the engines publish, for the request router (`record_routing_stats`) and the autoscaling
policy (`record_autoscaling_stats`), are defined here too, so both sides use the same keys.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


class ReplyKind(enum.Enum):
    STREAM = "stream"  # SSE text items follow, then a ReplyTail
    JSON = "json"  # body is the whole response
    ERROR = "error"  # body is an OpenAI-style error; status is its HTTP status


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """The adapter version a request runs with, as the registry knows it: `engine_name` is
    unique per version (vLLM's LoRA name, and the handle's multiplexed model id, so routing
    follows versions too); `uri` is where its files are; `sha256` the digest validated at
    registration (empty: not pinned). Sent with every request, so a replica needs no registry
    lookup to load an adapter it has not seen."""

    engine_name: str
    uri: str
    sha256: str = ""
    # The same adapter across versions: a new version retires the older ones on each replica.
    lineage: str = ""


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """Where an engine sends a stream's text (app/token_link.py): the ingress replica's token
    link address, its secret and the stream's id there."""

    host: str
    port: int
    secret: bytes
    stream_id: int

    def __repr__(self) -> str:  # never the secret in a log line or traceback
        return f"ReplyTo({self.host}:{self.port}, stream {self.stream_id})"


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What an engine needs to know of a request besides the request itself: the adapter
    version, whose request it is (for fair sharing of the replica among tenants), and for a
    stream where its text goes."""

    adapter: AdapterRef | None
    tenant: str
    weight: float = 1.0
    priority: int = 0  # 0 interactive, 1 batch
    pinned: bool = False  # the tenant's adapters stay in host memory and on disk once loaded
    reply_to: ReplyTo | None = None  # None: a stream's text comes back through Ray


@dataclass(frozen=True, slots=True)
class Accepted:
    """A replica took the request (sent before any work, so the wait for it measures queueing
    and routing only, never generation)."""

    replica_id: str


@dataclass(frozen=True, slots=True)
class ReplyHead:
    kind: ReplyKind
    status: int = 200
    body: bytes = b""  # JSON, for kind JSON and ERROR
    # Token counts of a JSON reply (for the access log and accounting); a stream's come in its tail.
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ReplyTail:
    """End of a stream. Counts are None when the stream ended before vLLM reported usage.
    `linked`: the text went over the token link, whose END frame precedes this tail there."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    linked: bool = False


ReplyItem = Accepted | ReplyHead | str | ReplyTail


class EngineUnavailable(RuntimeError):
    """Raised by an engine replica, before `Accepted`, when its engine cannot serve (e.g. its
    EngineCore process died): nothing was started, so the ingress sends the request elsewhere."""

    def __init__(self, replica_id: str):
        super().__init__(f"the engine of replica {replica_id} has failed")
        self.replica_id = replica_id

    def __reduce__(self):  # crosses the Ray hop pickled: keep the replica id, not the message
        return (EngineUnavailable, (self.replica_id,))


@dataclass(frozen=True)
class RoutingStats:
    """What an engine replica holds and how busy it is: input of the adapter-aware router."""

    accelerator_adapters: list[str] = field(default_factory=list)  # in LoRA slots, oldest first
    cpu_adapters: list[str] = field(default_factory=list)  # in vLLM's CPU LoRA cache
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    # False once the replica's engine has failed: routers skip it until Ray replaces it.
    serving: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, stats: Mapping[str, Any] | None) -> RoutingStats:
        """From a replica's published dict; an empty or unknown dict reads as an idle replica."""
        stats = stats or {}
        return cls(
            accelerator_adapters=list(stats.get("accelerator_adapters", ())),
            cpu_adapters=list(stats.get("cpu_adapters", ())),
            running=int(stats.get("running", 0)),
            waiting=int(stats.get("waiting", 0)),
            kv_cache_usage=float(stats.get("kv_cache_usage", 0.0)),
            serving=bool(stats.get("serving", True)),
        )


class AutoscalingStat(str, enum.Enum):
    """Keys of `record_autoscaling_stats` (per replica, floats), read by app.autoscaling."""

    # Prefixed: Ray Serve's replica reports use "running_requests" for its own ongoing count.
    RUNNING_REQUESTS = "engine_running_requests"
    WAITING_REQUESTS = "engine_waiting_requests"
    KV_CACHE_USAGE = "engine_kv_cache_usage"
