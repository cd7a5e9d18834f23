"""CPU seconds per process of a system under test, by process title: what the serving layer
costs where tokens/s alone cannot show it. Used by compare.py / ab_env.py (per run) and
stress.py (per level)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import psutil

# pid -> (title, user + system CPU seconds so far, creation time)
Snapshot = dict[int, tuple[str, float, float]]


def process_title(p: psutil.Process) -> str:
    """What a process is: Ray's title (`ray::ServeReplica:app:Ingress`, `ray::IDLE`) or vLLM's
    (`VLLM::EngineCore`), else its program and first argument (`gcs_server`, `python -m ...`)."""
    cmdline = p.cmdline()
    if not cmdline:
        return p.name()
    head = cmdline[0].split()[0] if len(cmdline) == 1 else cmdline[0]
    if head.startswith(("ray::", "VLLM::")) or len(cmdline) == 1:
        return head.removesuffix(".listen_for_change")
    program = Path(head).name
    if program.startswith("python") and len(cmdline) > 2 and cmdline[1] == "-m":
        return f"{program} -m {cmdline[2]}"
    return program if len(cmdline) < 2 else f"{program} {Path(cmdline[1]).name}"


def snapshot(processes: Iterable[psutil.Process]) -> Snapshot:
    seen: Snapshot = {}
    for p in processes:
        try:
            times = p.cpu_times()
            seen[p.pid] = (process_title(p), times.user + times.system, p.create_time())
        except (psutil.Error, IndexError):
            pass
    return seen


def cpu_used(before: Snapshot, after: Snapshot, since: float) -> dict[str, float]:
    """CPU seconds per title between two snapshots, the first taken at `since` (wall clock):
    a process started in between counts whole, largest first."""
    used: dict[str, float] = {}
    for pid, (title, cpu, created) in after.items():
        if pid in before:
            used[title] = used.get(title, 0.0) + cpu - before[pid][1]
        elif created >= since:
            used[title] = used.get(title, 0.0) + cpu
    return dict(
        sorted(((t, round(c, 3)) for t, c in used.items() if c >= 0.0005), key=lambda x: -x[1])
    )
