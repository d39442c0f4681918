"""The WorkQueue: durable, leased, fenced. :mod:`.store` holds the logic, :mod:`.actor` the Ray
actor that serves it."""

from inference.queue.store import (
    DEAD,
    DONE,
    LEASED,
    PENDING,
    EnqueueResult,
    JobSpec,
    LeasedItem,
    LeaseToken,
    NewItem,
    QueueStore,
    Refusal,
)

__all__ = [
    "DEAD",
    "DONE",
    "LEASED",
    "PENDING",
    "EnqueueResult",
    "JobSpec",
    "LeaseToken",
    "LeasedItem",
    "NewItem",
    "QueueStore",
    "Refusal",
]
