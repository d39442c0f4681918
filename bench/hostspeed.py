"""How fast this host runs Python right now, for the benchmarks' JSON lines.

The development machine is a VM whose speed varies with its neighbours: the same benchmark run
minutes apart has given results up to twice as far apart, CPU time per item included. A
benchmark records this figure when it starts, between its phases and when it ends, so a reader
can tell a slow result from a slow host: ``sum(range(1000))`` in microseconds, the median of a
few timings (about 14 on the development machine at full speed, 28 at half).
"""

from __future__ import annotations

import statistics
import time


def python_loop_us(timings: int = 9, loops: int = 200) -> float:
    """Microseconds per ``sum(range(1000))``: the median of ``timings`` timings."""
    per_loop = []
    for _ in range(timings):
        started = time.perf_counter()
        for _ in range(loops):
            sum(range(1000))
        per_loop.append((time.perf_counter() - started) / loops * 1e6)
    return round(statistics.median(per_loop), 2)
