"""One engine replica: vLLM's continuous batching and its two LoRA caches, as the simulator
runs them.

- Scheduler (vLLM V1, no preemption: the KV cache is not the bound in these runs): every step
  runs all admitted requests; waiting requests are admitted first come first served while
  there are fewer than `max_num_seqs`, token budget left (chunked prefill) and, for a request
  with an adapter that is not in the batch yet, fewer than `max_loras` distinct adapters
  (otherwise it is skipped and stays at the front, as vLLM does).
- LoRA caches (vllm/lora/worker_manager.py LRUCacheWorkerLoRAManager): each step touches the
  batch's adapters in both LRUs; an adapter missing from host memory is read from disk
  ("Adding lora", evicting the least recently used of `max_cpu_loras`), one missing from the
  slots is copied in ("Activating LoRA", evicting the oldest of `max_loras`). Both happen
  inside the step and stall it. The app registers an adapter with a replica's vLLM once
  (load_lora_adapter, app/engine.py), which loads and activates it at once.
- Time advances by segments: a run of identical decode steps up to the next completion (one
  event, not one per token); an arrival that could join the batch cuts the segment at the next
  step boundary, as vLLM would admit it there.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, OrderedDict, deque

from loadtest.simulator.params import EngineParams
from loadtest.simulator.traffic import Request

# A long blocked queue (every waiting adapter kept out by max_loras) is scanned this far per
# step; vLLM scans it all, but in such runs the answer does not change past this depth.
ADMISSION_SCAN_DEPTH = 256


class Replica:
    def __init__(self, idx: int, engine: EngineParams, ready_at: float = 0.0):
        self.idx = idx
        self.engine = engine
        self.ready_at = ready_at
        self.state = "serving" if ready_at <= 0 else "starting"
        self.stopped_at = math.inf
        # the router's view: requests sent here and not finished (Ray's queue-length cache)
        self.ongoing = 0
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.decoders: list[tuple[int, int, Request]] = []  # heap of (finish_step, rid, request)
        self.adapters_in_batch: Counter[int] = Counter()
        self.steps = 0  # steps run so far; a decoder is done when this reaches its finish_step
        self._ctx_base = 0  # sum over decoders of (prompt + output - finish_step)
        self.cpu_lru: OrderedDict[int, None] = OrderedDict()
        self.slot_lru: OrderedDict[int, None] = OrderedDict()
        self.registered: set[int] = set()
        self._pending_registrations: list[int] = []
        self.recent_adapters: OrderedDict[int, None] = OrderedDict()  # app/engine.py's list
        # what our router reads: (accelerator_adapters, cpu_adapters) as last published
        self.published: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset())
        # Ray multiplexing: ids this replica reports, as the routers see them after the push
        self._mux_lru: OrderedDict[int, None] = OrderedDict()
        self._mux_visible: frozenset[int] = frozenset()
        self._mux_pending: deque[tuple[float, frozenset[int]]] = deque()
        self.disk_loads = 0
        self.slot_loads = 0
        self.served = 0
        self.adapters_seen: set[int] = set()
        # the segment in progress
        self.busy = False
        self.version = 0  # bumps when a segment is cut, so its old end event is ignored
        self.seg_start = self.seg_end = self.seg_dt = self.seg_stall = 0.0
        self.seg_steps = 0
        self.seg_chunks: list[tuple[Request, int]] = []

    # ---- what routers and the autoscaler read -------------------------------------------------

    @property
    def running(self) -> int:
        return len(self.decoders) + len(self.prefilling)

    def kv_cache_usage(self) -> float:
        ctx = self._ctx_base + len(self.decoders) * self.steps
        ctx += sum(r.prompt - r.prefill_left for r in self.prefilling)
        return min(1.0, ctx / self.engine.kv_capacity_tokens)

    def publish_stats(self) -> None:
        """app/engine.py routing_stats(): the last max_loras adapters scheduled, the CPU cache."""
        self.published = (frozenset(self.recent_adapters), frozenset(self.cpu_lru))

    def note_multiplexed(self, adapter: int, now: float, capacity: int, lag_s: float) -> None:
        """A request's multiplexed id "loaded" on this replica (Serve's LRU of model ids);
        the new set reaches the routers `lag_s` later."""
        if adapter in self._mux_lru:
            self._mux_lru.move_to_end(adapter)
            return
        self._mux_lru[adapter] = None
        while len(self._mux_lru) > capacity:
            self._mux_lru.popitem(last=False)
        self._mux_pending.append((now + lag_s, frozenset(self._mux_lru)))

    def multiplexed_ids(self, now: float) -> frozenset[int]:
        while self._mux_pending and self._mux_pending[0][0] <= now:
            self._mux_visible = self._mux_pending.popleft()[1]
        return self._mux_visible

    # ---- requests in ------------------------------------------------------------------------

    def enqueue(self, req: Request, now: float) -> float | None:
        """Queue a request; returns the time of this replica's next segment end if that moved
        (a new segment started, or the current one was cut), else None."""
        req.replica = self.idx
        self.adapters_seen.add(req.adapter)
        if req.adapter not in self.registered:
            self.registered.add(req.adapter)
            self._pending_registrations.append(req.adapter)
        self.waiting.append(req)
        if not self.busy:
            return self.start_segment(now)
        if self.seg_steps > 1 and (self._pending_registrations or self._admissible(req)):
            return self._cut_segment(now)
        return None

    def _admissible(self, req: Request) -> bool:
        return self.running < self.engine.max_num_seqs and (
            req.adapter in self.adapters_in_batch
            or len(self.adapters_in_batch) < self.engine.max_loras
        )

    def _cut_segment(self, now: float) -> float | None:
        """End the running decode segment at the first step boundary after `now`."""
        first_step_end = self.seg_start + self.seg_stall + self.seg_dt
        done = 1 if now < first_step_end else 1 + math.ceil((now - first_step_end) / self.seg_dt)
        if done >= self.seg_steps:
            return None
        self.seg_steps = done
        self.seg_end = first_step_end + (done - 1) * self.seg_dt
        self.version += 1
        return self.seg_end

    # ---- steps --------------------------------------------------------------------------------

    def start_segment(self, now: float) -> float | None:
        """Plan the next segment from `now`; None if there is nothing to run."""
        eng = self.engine
        stall = self._register_pending()
        budget = eng.max_num_batched_tokens - len(self.decoders)
        chunks: list[tuple[Request, int]] = []
        for req in self.prefilling:  # partial prefills run before new requests (vLLM V1)
            if budget <= 0:
                break
            n = min(req.prefill_left, budget)
            chunks.append((req, n))
            budget -= n
        self._admit(budget, chunks)
        stall += self._apply_adapters()

        n_dec = len(self.decoders)
        if not chunks and n_dec == 0:
            self.busy = stall > 0
            if not self.busy:
                return None
        steps = 1 if chunks or stall > 0 else self.decoders[0][0] - self.steps
        tokens = n_dec + sum(n for _, n in chunks)
        ctx = self._ctx_base + n_dec * (self.steps + steps / 2)
        dt = eng.step(n_dec, tokens, ctx) if tokens else 0.0
        self.busy = True
        self.seg_start, self.seg_dt, self.seg_stall, self.seg_steps = now, dt, stall, steps
        self.seg_chunks = chunks
        self.seg_end = now + stall + steps * dt
        self.version += 1
        return self.seg_end

    def _admit(self, budget: int, chunks: list[tuple[Request, int]]) -> None:
        eng = self.engine
        skipped: list[Request] = []
        scanned = 0
        while self.waiting and budget > 0 and self.running < eng.max_num_seqs:
            req = self.waiting.popleft()
            scanned += 1
            if (
                req.adapter not in self.adapters_in_batch
                and len(self.adapters_in_batch) >= eng.max_loras
            ):
                skipped.append(req)
                if scanned >= ADMISSION_SCAN_DEPTH:
                    break
                continue
            self.adapters_in_batch[req.adapter] += 1
            self.prefilling.append(req)
            n = min(req.prefill_left, budget)
            chunks.append((req, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _register_pending(self) -> float:
        stall = 0.0
        for adapter in self._pending_registrations:
            stall += self._load(adapter)
        self._pending_registrations.clear()
        return stall

    def _apply_adapters(self) -> float:
        """The batch's adapters into host memory and slots (LRU), as vLLM does each step."""
        stall = 0.0
        for adapter in list(self.adapters_in_batch):
            stall += self._load(adapter)
            self.recent_adapters.pop(adapter, None)
            self.recent_adapters[adapter] = None
        while len(self.recent_adapters) > self.engine.max_loras:
            self.recent_adapters.popitem(last=False)
        return stall

    def _load(self, adapter: int) -> float:
        eng, stall = self.engine, 0.0
        if adapter in self.cpu_lru:
            self.cpu_lru.move_to_end(adapter)
        else:
            if len(self.cpu_lru) >= eng.max_cpu_loras:
                evicted, _ = self.cpu_lru.popitem(last=False)
                self.slot_lru.pop(evicted, None)  # vLLM's remove_adapter deactivates it
            self.cpu_lru[adapter] = None
            self.disk_loads += 1
            stall += eng.disk_load_s
        if adapter in self.slot_lru:
            self.slot_lru.move_to_end(adapter)
        else:
            if len(self.slot_lru) >= eng.max_loras:
                self.slot_lru.popitem(last=False)
            self.slot_lru[adapter] = None
            self.slot_loads += 1
            stall += eng.slot_load_s
        return stall

    def end_segment(self, itl: list[tuple[float, int]]) -> list[Request]:
        """Apply the finished segment; returns the requests that completed. Appends (inter-token
        time, tokens) pairs of the segment's decode steps to `itl`."""
        end, steps = self.seg_end, self.seg_steps
        n_dec = len(self.decoders)
        if n_dec:
            itl.append((self.seg_dt + self.seg_stall, n_dec))
            if steps > 1:
                itl.append((self.seg_dt, n_dec * (steps - 1)))
        self.steps += steps
        finished: list[Request] = []
        for req, n in self.seg_chunks:
            req.prefill_left -= n
            if req.prefill_left == 0:
                self.prefilling.remove(req)
                req.first_token = end
                req.finish_step = self.steps + req.output - 1
                self._ctx_base += req.prompt + req.output - req.finish_step
                heapq.heappush(self.decoders, (req.finish_step, req.rid, req))
        self.seg_chunks = []
        while self.decoders and self.decoders[0][0] <= self.steps:
            _, _, req = heapq.heappop(self.decoders)
            self._ctx_base -= req.prompt + req.output - req.finish_step
            req.done = end
            finished.append(req)
            self.ongoing -= 1
            self.served += 1
            self.adapters_in_batch[req.adapter] -= 1
            if not self.adapters_in_batch[req.adapter]:
                del self.adapters_in_batch[req.adapter]
        self.busy = False
        return finished
