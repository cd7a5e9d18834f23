"""app.token_link.coalesce: SSE chunks joined only when several are ready, never delayed."""

from __future__ import annotations

import asyncio

import pytest

from app.token_link import coalesce


async def produce(chunks, gate=None, fail=None, step_s=0.0):
    """Like vLLM's stream: awaits between chunks (one engine step each)."""
    for chunk in chunks:
        if gate is not None:
            await gate.wait()
        yield chunk
        await asyncio.sleep(step_s)
    if fail is not None:
        raise fail


def test_a_consumer_that_keeps_up_gets_every_chunk_alone():
    async def run():
        out = []
        async for item in coalesce(produce(["a", "b", "c"], step_s=0.01)):
            out.append(item)
        return out

    assert asyncio.run(run()) == ["a", "b", "c"]


def test_a_lagging_consumer_gets_what_is_ready_in_one_item():
    async def run():
        stream = coalesce(produce([f"data: {i}\n\n" for i in range(50)]))
        first = await stream.__anext__()
        await asyncio.sleep(0.05)  # the consumer is busy; the producer runs ahead
        rest = [item async for item in stream]
        return first, rest

    first, rest = asyncio.run(run())
    assert len(rest) == 1  # everything produced meanwhile crosses as one item
    assert first + rest[0] == "".join(f"data: {i}\n\n" for i in range(50))


def test_a_lone_chunk_is_not_held_back():
    async def run():
        gate = asyncio.Event()
        stream = coalesce(produce(["x", "y"], gate))
        gate.set()
        return await asyncio.wait_for(stream.__anext__(), timeout=1.0)

    assert asyncio.run(run()) in ("x", "xy")


def test_a_failure_reaches_the_consumer_after_what_came_before():
    async def run():
        got = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for item in coalesce(produce(["a"], fail=RuntimeError("engine died"))):
                got.append(item)
        return got

    assert asyncio.run(run()) == ["a"]
