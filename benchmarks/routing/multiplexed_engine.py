"""Case (c) of the routing experiment: the engine replica reporting the adapters it holds as
multiplexed model ids, the way `@serve.multiplexed` does, so that Ray Serve's default router
(power of two choices) prefers replicas that report the request's adapter.

Our engine does not use `@serve.multiplexed`: vLLM owns the adapter cache (an LRU of
`max_cpu_loras` in host memory, `max_loras` slots), so there is no model object for Serve to
load or evict. This subclass adds the bookkeeping only: before each request, a
`@serve.multiplexed` method with `max_num_models_per_replica = max_cpu_loras` is called with the
request's adapter; it returns a token (the adapter itself is still loaded by the engine, by vLLM,
exactly as in the other cases), and Serve keeps its own LRU of those ids and pushes it to the
controller (every 0.1 s after a change), which hands it to every router. What the replica
reports is then the last `max_cpu_loras` distinct adapters requested there: vLLM's CPU cache up
to ordering details (vLLM touches its LRU when it schedules, Serve when the request arrives).

Used only by benchmarks/routing/experiment.py (router `ray_multiplex`); putting it in the app
would be this same hook in app/engine.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray import serve

from app.contract import ReplyItem, RequestContext
from app.engine import EngineDeployment

# The experiment's max_cpu_loras; the decorator needs it when the class is defined.
MAX_CPU_LORAS = 8


class AdapterToken:
    """What `@serve.multiplexed` caches: the adapter's name (vLLM holds the weights)."""

    def __init__(self, adapter: str):
        self.adapter = adapter


class MultiplexReportingEngine(EngineDeployment.func_or_class):
    @serve.multiplexed(max_num_models_per_replica=MAX_CPU_LORAS)
    async def adapter_token(self, adapter: str) -> AdapterToken:
        return AdapterToken(adapter)

    async def _note(self, context: RequestContext) -> None:
        if context.adapter is not None:
            await self.adapter_token(context.adapter.engine_name)

    async def chat(self, request, context: RequestContext) -> AsyncIterator[ReplyItem]:
        await self._note(context)
        async for item in self.llm.chat(request, context):
            yield item

    async def completion(self, request, context: RequestContext) -> AsyncIterator[ReplyItem]:
        await self._note(context)
        async for item in self.llm.completion(request, context):
            yield item


MultiplexReportingEngineDeployment = serve.deployment(name="Engine")(MultiplexReportingEngine)
