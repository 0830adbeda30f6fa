"""How torch's CPU threads wait for each other: OpenMP's wait policy, chosen from how busy the machine is.

OpenMP threads spin while they wait for each other by default. On a quiet machine that is the fastest way
to wait; when another process holds a core, a tiny model's many short operations each wait for a thread
that is not running, and training was 26 times slower (two such processes on 2 cores). Waiting passively
survives a busy machine but costs a quiet one about 30% (docs/PERFORMANCE.md, "Threads"). So carlos looks
at the machine as a command starts and chooses; OpenMP reads the policy once, when torch loads, and the
user's own OMP_WAIT_POLICY always wins. No library chooses this: OpenMP leaves it to whoever starts it."""

from __future__ import annotations

import os
import time

BUSY_CORES = 0.5  # other processes using this much CPU (in cores) make the machine busy


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; user .. steal


def others_cores(window: float = 0.05) -> float | None:
    """How many cores other processes keep busy: measured over `window` seconds while this one sleeps
    (Linux), else the 1-minute load average (macOS), else None (Windows)."""
    before = _cpu_times()
    if before is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    time.sleep(window)
    after = _cpu_times()
    idle, total = after[0] - before[0], after[1] - before[1]
    return (os.cpu_count() or 1) * (1 - idle / total) if total > 0 else 0.0


def choose_wait_policy() -> str | None:
    """Sets OMP_WAIT_POLICY=PASSIVE when the machine is busy (unless the user set it); returns what it chose."""
    if "OMP_WAIT_POLICY" in os.environ:
        return None
    busy = others_cores()
    if busy is not None and busy >= BUSY_CORES:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return "PASSIVE"
    return None
