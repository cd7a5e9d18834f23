"""A discrete-event simulator of the serving fleet, for questions the 2-core box cannot measure
(issue 12, item 4): N engine replicas with adapter slots and a CPU adapter cache, continuous
batching, three request routers (ours, Ray Serve's power of two choices, Ray's multiplexing
affinity) and two autoscaling policies, at 1,000 tenants and up to 64 replicas.

    python -m loadtest.simulator validate     # against the 2-replica routing experiment
    python -m loadtest.simulator study        # the 64-replica study (a few minutes)

Modules: `params` (engine and fleet parameters, with where each number comes from),
`traffic` (arrivals), `replica` (one engine: scheduler, LRU caches, step times), `routers`,
`autoscale`, `fleet` (the event loop), `summary` (percentiles), `validate` and `study` (the
two experiments). docs/benchmarks.md "Simulator for scale" has the results and assumptions.
"""
