"""How a stream's text travels from the engine replica to the ingress replica.

Ray Serve streams a generator's items as Ray objects. Each one costs an object, a reporting
thread hop in the engine replica and a generator wake-up in the ingress: 0.2-1 ms of CPU per
token chunk on the project's 2-core machine (docs/serving.md), most of the serving layer's cost
at GPU token rates. So only the stream's control goes through Ray — routing by the request
router, the replica's ongoing-request count, cancellation when the client leaves, the error when
the replica dies, and the Accepted / ReplyHead / ReplyTail contract (app/contract.py) — and the
SSE text in between goes over a *token link*: one TCP connection per (engine replica, ingress
replica) pair, on which every chunk that any stream produced in one event-loop turn is written
with one send.

Wire format: the engine connects to the address the ingress put in the request's context
(`ReplyTo`), sends the ingress's secret first (it travelled inside the Ray call, so a process
that never got a request from this ingress does not have it; a connection without it is
dropped), then frames of stream id (8 bytes), kind (1), payload length (4), payload: DATA
carries SSE text (UTF-8), END says the stream's last text has been sent.

An engine that cannot reach the ingress (a firewall between nodes) sends the text through Ray
instead, coalesced; the ingress reads both ways alike. The link saves CPU; nothing depends on
it.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import secrets
import struct
import time
from collections.abc import AsyncIterator, Callable

from app.contract import ReplyTo
from app.logs import get_logger

logger = get_logger("token_link")

FRAME = struct.Struct("!QBI")  # stream id, kind, payload length
DATA, END = 0, 1
SECRET_BYTES = 32
MAX_FRAME_BYTES = 64 * 2**20  # a larger length is a broken or hostile peer, not SSE text
AUTH_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0
# After a failed connection, streams to that ingress go through Ray this long before retrying.
UNREACHABLE_RETRY_S = 30.0


class LinkLost(ConnectionError):
    """The token link closed while a stream was using it."""


async def coalesce(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """SSE chunks, joined into one item whenever several are ready by the time the consumer asks
    for the next one; never waits for more (no timer: a lone stream still gets each token at
    once). For text that crosses the Ray hop: every item costs the same however long it is, so
    a busy replica, whose consumer lags, sends few large items instead of many small ones."""
    ready: list[str] = []
    done = False
    failure: BaseException | None = None
    wake = asyncio.Event()

    async def pump() -> None:
        nonlocal done, failure
        try:
            async for chunk in chunks:
                ready.append(chunk)
                wake.set()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer below
            failure = exc
        finally:
            done = True
            wake.set()

    pumping = asyncio.create_task(pump())
    try:
        while True:
            await wake.wait()
            wake.clear()
            if ready:
                batch = "".join(ready)
                ready.clear()
                yield batch
            if done and not ready:
                if failure is not None:
                    raise failure
                return
    finally:
        pumping.cancel()


# --- ingress end -------------------------------------------------------------------------------


class Inbox:
    """One stream's text as it arrives (over the link or through Ray), taken in batches: all
    that arrived since the last take, so a client that reads slower than tokens come gets them
    in fewer, larger writes."""

    __slots__ = ("_parts", "_wake", "ended", "failure")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._wake = asyncio.Event()
        self.ended = False
        self.failure: BaseException | None = None

    def put(self, text: str) -> None:
        self._parts.append(text)
        self._wake.set()

    def end(self) -> None:
        if self.failure is None:
            self.ended = True
            self._wake.set()

    def fail(self, failure: BaseException) -> None:
        if not self.ended and self.failure is None:
            self.failure = failure
            self._wake.set()

    @property
    def closed(self) -> bool:
        return self.ended or self.failure is not None

    async def take(self) -> str:
        """The text that arrived since the last take (waiting for some), or "" once closed."""
        while not (self._parts or self.closed):
            self._wake.clear()
            await self._wake.wait()
        text = "".join(self._parts)
        self._parts.clear()
        return text

    async def wait_closed(self, timeout_s: float) -> bool:
        """Whether the stream ended or failed within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return self.closed
        return True


class TokenSink:
    """The ingress end: a TCP server that engine replicas connect to, and the inbox of each
    stream this ingress replica has open."""

    def __init__(self) -> None:
        self.secret = secrets.token_bytes(SECRET_BYTES)
        self.host = ""
        self.port = 0
        self._inboxes: dict[int, Inbox] = {}
        self._stream_ids = itertools.count(1)
        self._server: asyncio.Server | None = None

    async def start(self, host: str) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _SinkConnection(self), host, 0)
        self.host, self.port = host, self._server.sockets[0].getsockname()[1]
        logger.info("token link listening on %s:%d", self.host, self.port)

    def open(self) -> tuple[ReplyTo, Inbox]:
        """A new stream: the address an engine sends its text to, and where it arrives."""
        stream_id = next(self._stream_ids)
        inbox = self._inboxes[stream_id] = Inbox()
        return ReplyTo(self.host, self.port, self.secret, stream_id), inbox

    def close(self, stream_id: int) -> None:
        """The stream is over for the ingress (done, failed or its client left): late frames
        for it are dropped."""
        self._inboxes.pop(stream_id, None)

    @property
    def open_streams(self) -> int:
        return len(self._inboxes)

    def deliver(self, stream_id: int, kind: int, payload: bytes) -> None:
        if kind == DATA:
            inbox = self._inboxes.get(stream_id)
            if inbox is not None:
                inbox.put(payload.decode())
        else:  # END: forgotten here even if the relay never started (a client gone at once)
            inbox = self._inboxes.pop(stream_id, None)
            if inbox is not None:
                inbox.end()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class _SinkConnection(asyncio.Protocol):
    """One engine replica's connection: the secret, then frames, parsed as bytes arrive."""

    def __init__(self, sink: TokenSink):
        self._sink = sink
        self._buffer = bytearray()
        self._authenticated = False
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        asyncio.get_running_loop().call_later(AUTH_TIMEOUT_S, self._drop_if_unauthenticated)

    def _drop_if_unauthenticated(self) -> None:
        if not self._authenticated and self._transport is not None:
            self._drop("no secret in time")

    def _drop(self, why: str) -> None:
        peer = self._transport.get_extra_info("peername")
        logger.warning("token link from %s dropped: %s", peer, why)
        self._transport.close()
        self._buffer.clear()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if not self._authenticated:
            if len(buffer) < SECRET_BYTES:
                return
            if not hmac.compare_digest(bytes(buffer[:SECRET_BYTES]), self._sink.secret):
                self._drop("wrong secret")
                return
            del buffer[:SECRET_BYTES]
            self._authenticated = True
        offset, size = 0, len(buffer)
        while size - offset >= FRAME.size:
            stream_id, kind, length = FRAME.unpack_from(buffer, offset)
            if length > MAX_FRAME_BYTES or kind not in (DATA, END):
                self._drop(f"malformed frame (kind {kind}, {length} bytes)")
                return
            start = offset + FRAME.size
            if start + length > size:
                break  # the rest of this frame is still on its way
            self._sink.deliver(stream_id, kind, bytes(buffer[start : start + length]))
            offset = start + length
        del buffer[:offset]

    def connection_lost(self, exc) -> None:
        # Streams that were using it notice through Ray: the engine's reply either fails (the
        # replica died) or ends without their END frame (app/ingress.py waits briefly, then
        # reports the stream as failed).
        self._transport = None


# --- engine end --------------------------------------------------------------------------------


class _Link(asyncio.Protocol):
    """An engine replica's connection to one ingress replica, shared by all streams to it.
    Frames queue until the end of the event-loop turn and go out in one write."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._pending: list[bytes] = []
        self._flush_scheduled = False

    @property
    def open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def connection_made(self, transport) -> None:
        self._transport = transport

    def connection_lost(self, exc) -> None:
        self._transport = None

    def authenticate(self, secret: bytes) -> None:
        self._transport.write(secret)

    def send(self, stream_id: int, kind: int, payload: bytes = b"") -> None:
        if not self.open:
            raise LinkLost("the token link to the ingress closed")
        self._pending.append(FRAME.pack(stream_id, kind, len(payload)))
        if payload:
            self._pending.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.open and self._pending:
            self._transport.write(b"".join(self._pending))
        self._pending.clear()


class OutgoingStream:
    """One stream's text leaving the engine: over the link when there is one, else through
    Ray (yielded, coalesced)."""

    def __init__(self, link: _Link | None, reply_to: ReplyTo | None):
        self._link = link
        self._reply_to = reply_to

    @property
    def linked(self) -> bool:
        return self._link is not None

    async def deliver(
        self, chunks: AsyncIterator[str], to_client: Callable[[str], str]
    ) -> AsyncIterator[str]:
        """Sends every chunk (as `to_client` rewrites it) over the link and yields nothing, or,
        with no link, yields the chunks for the Ray hop. Raises LinkLost if the ingress goes
        away mid-stream, which ends the generation."""
        if self._link is None:
            async for text in coalesce(chunks):
                yield to_client(text)
            return
        link, stream_id = self._link, self._reply_to.stream_id
        async for chunk in chunks:
            link.send(stream_id, DATA, to_client(chunk).encode())
        link.send(stream_id, END)


class TokenLinks:
    """The engine end: one link per ingress replica, opened on first use."""

    def __init__(self) -> None:
        self._links: dict[tuple[str, int], _Link] = {}
        self._connecting: dict[tuple[str, int], asyncio.Lock] = {}
        self._unreachable_until: dict[tuple[str, int], float] = {}

    async def open(self, reply_to: ReplyTo | None) -> OutgoingStream:
        if reply_to is None:
            return OutgoingStream(None, None)
        return OutgoingStream(await self._link(reply_to), reply_to)

    async def _link(self, reply_to: ReplyTo) -> _Link | None:
        key = (reply_to.host, reply_to.port)
        link = self._links.get(key)
        if link is not None and link.open:
            return link
        if self._unreachable_until.get(key, 0.0) > time.monotonic():
            return None
        async with self._connecting.setdefault(key, asyncio.Lock()):
            link = self._links.get(key)
            if link is not None and link.open:  # connected meanwhile
                return link
            loop = asyncio.get_running_loop()
            try:
                _, link = await asyncio.wait_for(
                    loop.create_connection(_Link, *key), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError) as exc:
                logger.warning(
                    "token link to %s:%d unavailable (%s); its streams go through Ray",
                    *key,
                    exc,
                )
                self._unreachable_until[key] = time.monotonic() + UNREACHABLE_RETRY_S
                self._links.pop(key, None)
                return None
            link.authenticate(reply_to.secret)
            self._links[key] = link
            return link
