"""Getting a request taken by an engine replica: the ingress side of the Ray handle hop.

A request is dispatched through the engine deployment's handle (the adapter as multiplexed
model id, so the adapter-aware request router places it) and counts as taken when the replica
sends `Accepted` (app/contract.py). Until then nothing has run, so a failure is retried on
another replica: the replica's actor died (Ray's router drops it at once) or its engine failed
(`EngineUnavailable`; such a replica exits at once, and the request router skips it from its
next stats on). After `Accepted`
nothing is retried: a request that kills its engine must not get to kill a second one.

The wait for `Accepted` is bounded by `accept_timeout_s`, and cut short when Ray Serve runs no
engine replica at all (`FleetWatch`, asked once a request has waited `FLEET_CHECK_S`): then the
client gets a 503 + Retry-After within about a second instead of waiting for a replica that is
still starting or being replaced.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, Protocol

from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from app.contract import Accepted, EngineUnavailable, ReplyHead, ReplyItem, RequestContext
from app.logs import get_logger

logger = get_logger("dispatch")

Endpoint = Literal["chat", "completion"]
Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]

# Failures before Accepted that say "this replica cannot serve", not "this request is bad".
RETRYABLE = (EngineUnavailable, ActorDiedError, ActorUnavailableError)
# How often a waiting request looks at the fleet state (the state itself refreshes each period).
FLEET_CHECK_S = 0.25
# Pause before retry n is n times this (a refusing replica takes up to ~0.5 s to exit).
RETRY_BACKOFF_S = 0.25


class Replies(Protocol):
    """A reply stream from an engine (Ray's DeploymentResponseGenerator, or a test double)."""

    def __aiter__(self) -> AsyncIterator[ReplyItem]: ...
    async def __anext__(self) -> ReplyItem: ...
    def cancel(self) -> None: ...


class EngineClient:
    """Calls the engine deployment, over Ray Serve's inter-deployment gRPC (`over_grpc`) or as
    Ray actor calls. Configured handles are cached per adapter: `.options()` builds a new handle
    (and its router state) on every call."""

    MAX_CACHED_HANDLES = 4096

    def __init__(self, handle, over_grpc: bool = False):
        self._handle = handle
        self._over_grpc = over_grpc
        self._by_adapter: OrderedDict[str, Any] = OrderedDict()

    def _configured(self, adapter: str):
        handle = self._by_adapter.get(adapter)
        if handle is not None:
            self._by_adapter.move_to_end(adapter)
        else:
            handle = self._handle.options(
                stream=True,
                multiplexed_model_id=adapter,
                # Ray Serve's handle option for its gRPC transport (no public name in 2.60).
                _by_reference=not self._over_grpc,
            )
            self._by_adapter[adapter] = handle
            if len(self._by_adapter) > self.MAX_CACHED_HANDLES:
                self._by_adapter.popitem(last=False)
        return handle

    async def validate_adapter(self, uri: str) -> dict:
        """Fetch and validate an adapter on one engine replica (app/admin_api.py)."""
        return await self._handle.options(stream=False).validate_adapter.remote(uri)

    def call(self, endpoint: Endpoint, request, context: RequestContext) -> Replies:
        adapter = context.adapter.engine_name if context.adapter else ""
        return getattr(self._configured(adapter), endpoint).remote(request, context)


# Deployment name -> replicas the request routers of this process can send to, as the
# controller last pushed them (app/request_router.py publishes). Kept here, not in the router's
# module: Ray Serve ships a custom router class pickled by value, so that module's globals are a
# private copy in every process that loads the class.
_routable: dict[str, int] = {}


def publish_routable(deployment: str, replicas: int) -> None:
    _routable[deployment] = replicas


def routable_replicas(deployment: str) -> int | None:
    """Replicas of `deployment` this process's adapter-affinity routers can send to; None until
    one of them has heard from the controller (no request sent yet, or Ray's own router)."""
    return _routable.get(deployment)


class FleetWatch:
    """Whether Ray Serve runs any engine replica. `routable` (the request router's own replica
    set, pushed to it by the controller: free to read) answers when it knows. Otherwise (no
    request routed yet, or Ray's default router) the controller is asked, off the request's
    path: only when a request has waited for a replica longer than usual, and, while the last
    look found none, at most once a period until one runs again. Each ask unpickles every
    router class of the app in this process (polling every second cost 4-6% of an idle ingress
    replica's CPU; asking once a second under a flood, ~20% and event-loop stalls,
    docs/serving.md)."""

    def __init__(
        self,
        readiness: Readiness,
        period_s: float = 1.0,
        routable: Callable[[], int | None] | None = None,
    ):
        self._readiness = readiness
        self._period_s = period_s
        self._routable = routable
        self._has_engine: bool | None = None  # None: not known yet
        self._looked_at = float("-inf")
        self._looking: asyncio.Task | None = None

    def has_engine(self) -> bool:
        """False only when no engine replica runs, as far as is known."""
        known = self._routable() if self._routable is not None else None
        if known is not None:
            return known > 0
        if self._has_engine is False:
            self._look_again()  # to notice that one runs again
        return self._has_engine is not False

    def suspect(self) -> None:
        """A request has waited for a replica longer than usual: look (at most once a period)."""
        if self._routable is not None and self._routable() is not None:
            return  # the router's view is current: nothing to ask
        self._look_again()

    def _look_again(self) -> None:
        if self._looking is not None and not self._looking.done():
            return
        if time.monotonic() - self._looked_at < self._period_s:
            return
        self._looking = asyncio.get_running_loop().create_task(self._look())

    async def _look(self) -> None:
        try:
            self._has_engine, _ = await self._readiness()
        except Exception:  # noqa: BLE001 - keep the last known state; the controller may be busy
            logger.warning("fleet state unavailable", exc_info=True)
        finally:
            self._looked_at = time.monotonic()


class NoEngine(Exception):
    """No engine replica took the request (none runs, all busy, or the wait ran out): a 503."""


async def dispatch(
    engine: EngineClient,
    endpoint: Endpoint,
    request,
    context: RequestContext,
    *,
    accept_timeout_s: float,
    attempts: int,
    fleet: FleetWatch | None = None,
    request_id: str = "",
) -> tuple[Accepted, ReplyHead, Replies]:
    """The request taken by a replica: its Accepted, its ReplyHead and the rest of its replies.
    Raises NoEngine (answer 503 + Retry-After); cancels what it started when it gives up."""
    deadline = time.monotonic() + accept_timeout_s
    for attempt in range(1, attempts + 1):
        if fleet is not None and not fleet.has_engine():
            raise NoEngine("no engine replica is running")
        replies = engine.call(endpoint, request, context)
        try:
            accepted = await _first_reply(replies, deadline, fleet)
        except (BackPressureError, DeploymentUnavailableError) as exc:
            # Refused before reaching a replica: nothing to cancel.
            raise NoEngine(type(exc).__name__) from None
        except RETRYABLE as exc:
            replies.cancel()
            logger.warning(
                "request %s: replica cannot serve (%s), attempt %d of %d",
                request_id,
                type(exc).__name__,
                attempt,
                attempts,
            )
            # A replica whose engine died refuses everything at once, so it looks like the
            # least loaded one; it exits within ENGINE_EXIT_DELAY_S (app/engine.py), after which
            # Ray's router drops it. Retries are spaced to outlast that.
            await asyncio.sleep(
                min(RETRY_BACKOFF_S * attempt, max(0.0, deadline - time.monotonic()))
            )
            continue
        except asyncio.CancelledError:  # the client went away while waiting
            replies.cancel()
            raise
        except NoEngine:
            replies.cancel()
            raise
        except Exception as exc:
            replies.cancel()
            logger.exception("request %s: engine failed before accepting it", request_id)
            raise NoEngine(type(exc).__name__) from None
        try:
            head: ReplyHead = await replies.__anext__()
        except asyncio.CancelledError:
            replies.cancel()
            raise
        except Exception as exc:
            replies.cancel()
            logger.exception("request %s: engine failed after accepting it", request_id)
            raise NoEngine(type(exc).__name__) from None
        return accepted, head, replies
    raise NoEngine(f"{attempts} replicas could not serve")


async def _first_reply(replies: Replies, deadline: float, fleet: FleetWatch | None) -> Accepted:
    """The replica's Accepted, waiting at most until `deadline` and no longer than it takes to
    see that no engine replica runs."""
    first = asyncio.ensure_future(replies.__anext__())
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoEngine("no engine replica took the request in time")
            done, _ = await asyncio.wait({first}, timeout=min(remaining, FLEET_CHECK_S))
            if done:
                return first.result()
            if fleet is not None:
                if not fleet.has_engine():
                    raise NoEngine("no engine replica is running")
                fleet.suspect()
    finally:
        if not first.done():
            first.cancel()
