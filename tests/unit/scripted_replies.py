"""A scripted engine reply stream for the unit tests of the ingress and of dispatch: the faults
they inject (a replica that never answers, an engine failing at an exact point of a request)
cannot be caused on demand in the real app; tests/faults/ kills real replicas instead."""

from __future__ import annotations

import asyncio

HANG = object()  # a replica that never answers


class ScriptedReplies:
    """Plays a list of reply items; an exception in the list is raised at that point, HANG
    waits forever."""

    def __init__(self, items):
        self.items = list(items)
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if item is HANG:
            await asyncio.sleep(3600)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.cancelled = True
