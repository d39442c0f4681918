"""Python's cyclic garbage collector in the project's long-lived processes.

A server, the queue actor or a worker holds a large heap built once at start (Ray's driver,
FastAPI's routes and models, pydantic schemas, torch and the model): hundreds of thousands of
objects that live as long as the process. The collector's full (oldest-generation) passes
scanned all of them again and again while requests allocated their short-lived dicts and
tuples: tens of milliseconds each, a tax on every item and the source of latency spikes.
Freezing the start-up heap moves it out of the collector's sight; what requests allocate is
still collected as before.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then move every object alive now to the collector's permanent
    generation; returns how many were frozen. Call it when start-up is over."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
