"""The WorkQueue: durable, leased, fenced. :mod:`.store` holds the transitions and :mod:`.actor`
the Ray actor that serves it; :mod:`.records` is what crosses its boundary, :mod:`.admission`
what it accepts, :mod:`.fairness` how a lease is shared, :mod:`.mirror` what it keeps in memory,
:mod:`.reports` what it tells, :mod:`.db` the SQLite schema and settings."""

from inference.queue.db import DEAD, DONE, LEASED, PENDING, WAITING
from inference.queue.records import (
    EnqueueResult,
    JobSpec,
    LeasedItem,
    LeaseToken,
    NewItem,
    Packed,
    Refusal,
)
from inference.queue.store import QueueStore

__all__ = [
    "DEAD",
    "DONE",
    "LEASED",
    "PENDING",
    "WAITING",
    "EnqueueResult",
    "JobSpec",
    "LeaseToken",
    "LeasedItem",
    "NewItem",
    "Packed",
    "QueueStore",
    "Refusal",
]
