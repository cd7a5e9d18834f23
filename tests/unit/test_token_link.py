"""app.token_link and the ingress relay over it: a real TCP server and real connections on
localhost; the Ray side of a stream (its reply items) is scripted (tests/unit/scripted_replies.py),
the real Ray path is tested end to end in tests/integration and tests/faults."""

from __future__ import annotations

import asyncio
import json
import time

from app import ingress, token_link
from app.contract import ReplyTail, ReplyTo
from app.ingress import relay
from app.request_log import RequestRecord
from app.token_link import DATA, FRAME, Inbox, TokenLinks, TokenSink
from tests.unit.scripted_replies import HANG, ScriptedReplies


def record() -> RequestRecord:
    return RequestRecord(request_id="r1", method="POST", path="/v1/chat/completions")


async def chunks(texts, step_s=0.0):
    for text in texts:
        yield text
        await asyncio.sleep(step_s)


async def drain(inbox: Inbox, timeout_s: float = 2.0) -> str:
    out = []
    deadline = time.monotonic() + timeout_s
    while not inbox.closed and time.monotonic() < deadline:
        out.append(await asyncio.wait_for(inbox.take(), timeout_s))
    out.append(await inbox.take())
    return "".join(out)


def test_streams_sharing_a_link_each_get_their_own_text_in_order():
    async def run():
        sink, links = TokenSink(), TokenLinks()
        await sink.start("127.0.0.1")
        opened = [sink.open() for _ in range(3)]
        senders = []
        for n, (reply_to, _) in enumerate(opened):
            outgoing = await links.open(reply_to)
            assert outgoing.linked
            texts = [f"data: s{n} t{i}\n\n" for i in range(20)]
            senders.append(_consume(outgoing.deliver(chunks(texts, 0.001), str.upper)))
        await asyncio.gather(*senders)
        received = [await drain(inbox) for _, inbox in opened]
        await sink.stop()
        return received, [inbox.ended for _, inbox in opened], sink.open_streams

    received, ended, still_open = asyncio.run(run())
    for n, text in enumerate(received):
        assert text == "".join(f"DATA: S{n} T{i}\n\n" for i in range(20))
    assert ended == [True, True, True]
    assert still_open == 0  # END forgets the stream at the sink


async def _consume(agen):
    return [item async for item in agen]


def test_all_chunks_produced_in_one_loop_turn_leave_in_one_write():
    async def run():
        sink, links = TokenSink(), TokenLinks()
        await sink.start("127.0.0.1")
        opened = [sink.open() for _ in range(10)]
        streams = [await links.open(reply_to) for reply_to, _ in opened]
        link = links._links[("127.0.0.1", sink.port)]
        writes = []
        real_write = link._transport.write
        link._transport.write = lambda data: (writes.append(len(data)), real_write(data))
        for (reply_to, _), _stream in zip(opened, streams, strict=True):
            for i in range(10):  # no await in between: one loop turn
                link.send(reply_to.stream_id, DATA, f"t{i}".encode())
        await asyncio.sleep(0.05)
        texts = [await asyncio.wait_for(inbox.take(), 2) for _, inbox in opened]
        await sink.stop()
        return writes, texts

    writes, texts = asyncio.run(run())
    assert len(writes) == 1
    assert texts == ["".join(f"t{i}" for i in range(10))] * 10


def test_a_connection_without_the_secret_is_dropped_and_delivers_nothing():
    async def run():
        sink = TokenSink()
        await sink.start("127.0.0.1")
        reply_to, inbox = sink.open()
        reader, writer = await asyncio.open_connection("127.0.0.1", sink.port)
        writer.write(b"x" * token_link.SECRET_BYTES)
        writer.write(FRAME.pack(reply_to.stream_id, DATA, 5) + b"forge")
        await writer.drain()
        closed = await asyncio.wait_for(reader.read(), 2) == b""  # the sink hung up
        await asyncio.sleep(0.05)
        taken = inbox._parts[:]
        await sink.stop()
        return closed, taken

    closed, taken = asyncio.run(run())
    assert closed and taken == []


def test_a_malformed_frame_drops_the_connection():
    async def run():
        sink = TokenSink()
        await sink.start("127.0.0.1")
        reply_to, inbox = sink.open()
        reader, writer = await asyncio.open_connection("127.0.0.1", sink.port)
        writer.write(sink.secret + FRAME.pack(reply_to.stream_id, 7, 1) + b"?")
        await writer.drain()
        closed = await asyncio.wait_for(reader.read(), 2) == b""
        await sink.stop()
        return closed, inbox.closed

    assert asyncio.run(run()) == (True, False)


def test_an_unreachable_ingress_gets_the_text_through_ray_coalesced():
    async def run():
        links = TokenLinks()
        unused = ReplyTo("127.0.0.1", 1, b"s" * 32, 1)  # nothing listens on port 1
        outgoing = await links.open(unused)
        items = await _consume(outgoing.deliver(chunks(["a", "b", "c"]), str.upper))
        again = await links.open(unused)  # remembered: no new connection attempt for a while
        return outgoing.linked, items, again.linked

    linked, items, again = asyncio.run(run())
    assert not linked and not again
    assert "".join(items) == "ABC"


def test_relay_waits_for_the_links_end_when_the_ray_tail_comes_first():
    """The tail crosses Ray, the text the link: the tail may arrive first."""

    async def run():
        sink = TokenSink()
        await sink.start("127.0.0.1")
        reply_to, inbox = sink.open()
        rec = record()
        replies = ScriptedReplies([ReplyTail(3, 2, linked=True)])
        relayed = asyncio.create_task(_consume(relay(replies, rec, inbox)))
        await asyncio.sleep(0.1)  # the tail is in; the text is not
        outgoing = await TokenLinks().open(reply_to)
        await _consume(outgoing.deliver(chunks(["data: 1\n\n", "data: 2\n\n"]), str))
        out = await asyncio.wait_for(relayed, 2)
        await sink.stop()
        return out, rec

    out, rec = asyncio.run(run())
    assert "".join(out) == "data: 1\n\ndata: 2\n\n"
    assert (rec.prompt_tokens, rec.completion_tokens) == (3, 2)
    assert rec.ttft_ms is not None


def test_relay_reports_a_link_that_lost_the_end_of_a_stream(monkeypatch):
    monkeypatch.setattr(ingress, "LINK_END_GRACE_S", 0.2)

    async def run():
        inbox = Inbox()
        inbox.put("data: 1\n\n")
        return await _consume(
            relay(ScriptedReplies([ReplyTail(1, 1, linked=True)]), record(), inbox)
        )

    out = asyncio.run(run())
    assert out[0] == "data: 1\n\n"
    error = json.loads(out[1].split("data: ", 2)[1])
    assert error["error"]["code"] == 503
    assert out[1].endswith("data: [DONE]\n\n")


def test_relay_ends_with_an_error_event_when_the_engine_fails_mid_stream():
    async def run():
        inbox = Inbox()
        inbox.put("data: 1\n\n")
        replies = ScriptedReplies([RuntimeError("replica died")])
        return await _consume(relay(replies, record(), inbox))

    out = asyncio.run(run())
    assert out[0] == "data: 1\n\n"
    assert '"error"' in out[1] and out[1].endswith("data: [DONE]\n\n")


def test_a_client_that_leaves_cancels_the_engine_request_and_forgets_the_stream():
    async def run():
        sink = TokenSink()
        await sink.start("127.0.0.1")
        reply_to, inbox = sink.open()
        replies = ScriptedReplies([HANG])
        stream = relay(replies, record(), inbox, lambda: sink.close(reply_to.stream_id))
        outgoing = await TokenLinks().open(reply_to)
        sending = asyncio.create_task(_consume(outgoing.deliver(chunks(["data: 1\n\n"]), str)))
        first = await asyncio.wait_for(stream.__anext__(), 2)
        await stream.aclose()  # what Starlette does when the client disconnects
        await sending
        open_streams = sink.open_streams
        await sink.stop()
        return first, replies.cancelled, open_streams

    first, cancelled, open_streams = asyncio.run(run())
    assert first == "data: 1\n\n"
    assert cancelled
    assert open_streams == 0


def test_text_through_ray_is_relayed_when_there_is_no_link():
    async def run():
        rec = record()
        replies = ScriptedReplies(["data: a\n\n", "data: b\n\n", ReplyTail(4, 2)])
        return "".join(await _consume(relay(replies, rec, Inbox()))), rec

    text, rec = asyncio.run(run())
    assert text == "data: a\n\ndata: b\n\n"
    assert rec.completion_tokens == 2


def test_the_secret_never_appears_in_a_reply_tos_repr():
    secret = b"k" * 32
    assert "kkkk" not in repr(ReplyTo("10.0.0.1", 9, secret, 3))
