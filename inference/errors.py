"""The error tree of the service.

::

    InferenceError                  base of everything raised on purpose here
    ├── ConfigError                 a config file or value is wrong (names the field path)
    ├── InputError                  an input line is malformed (names the line and the reason)
    ├── QueueError                  the WorkQueue refused a call (bad ids, conflicts, storage)
    │   ├── StorageError            the database could not make an item durable (disk full, RO)
    │   └── JobConflict             a job id exists with a config a resume may not change
    ├── ItemError                   one item failed; carries ``kind`` and ``code``
    │   ├── TransientError          retry with backoff (timeout, OOM, rate limit, engine restart)
    │   └── PermanentError          dead-letter at once (malformed, too long, unsupported)
    ├── EngineFatalError            the engine is gone: replace the worker, release its leases,
    │                               do not blame the items
    ├── WorkerError                 a worker thread (lease, writer) failed: replace the worker,
    │                               charge its items an attempt with the reason
    └── OutputError                 a shard could not be written or committed

Exceptions cross Ray process boundaries, so every class pickles with its arguments
(``tests/unit/test_errors.py`` checks it).
"""

from __future__ import annotations

from typing import Literal

ErrorKind = Literal["transient", "permanent"]


class InferenceError(Exception):
    """Base class of the errors this package raises on purpose."""


class ConfigError(InferenceError):
    """A config file or value is invalid."""


class InputError(InferenceError):
    """An input record is malformed; ``line`` is 1-based (0 when unknown)."""

    def __init__(self, message: str, line: int = 0, source: str = "") -> None:
        super().__init__(message, line, source)
        self.message = message
        self.line = line
        self.source = source

    def __str__(self) -> str:
        where = f"{self.source}:" if self.source else ""
        return f"{where}line {self.line}: {self.message}" if self.line else self.message


class QueueError(InferenceError):
    """The WorkQueue refused a call."""


class StorageError(QueueError):
    """The queue's database could not make a change durable."""


class JobConflict(QueueError):
    """A job id exists with a spec that this request may not change (a resume with another
    model, output or schedule); names the fields that differ."""

    def __init__(self, job_id: str, fields: list[str]) -> None:
        super().__init__(job_id, fields)
        self.job_id = job_id
        self.fields = fields

    def __str__(self) -> str:
        return (
            f"job {self.job_id!r} exists with another config; a resume may not change: "
            + "; ".join(self.fields)
        )


class ItemError(InferenceError):
    """One item failed. ``kind`` decides retry (transient) or dead letter (permanent)."""

    kind: ErrorKind = "transient"

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message, code)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class TransientError(ItemError):
    """Worth retrying after a backoff."""

    kind: ErrorKind = "transient"


class PermanentError(ItemError):
    """Retrying cannot help; the item goes to the dead letters at once."""

    kind: ErrorKind = "permanent"


class EngineFatalError(InferenceError):
    """The engine cannot go on; the worker must be replaced. Not the items' fault."""


class WorkerError(InferenceError):
    """A worker's own machinery (its lease or writer thread) failed: nothing it holds can be
    committed, so it stops, its items are charged an attempt and the pool replaces it."""


class OutputError(InferenceError):
    """A shard could not be written or committed."""


__all__ = [
    "ConfigError",
    "EngineFatalError",
    "ErrorKind",
    "InferenceError",
    "InputError",
    "ItemError",
    "JobConflict",
    "OutputError",
    "PermanentError",
    "QueueError",
    "StorageError",
    "TransientError",
    "WorkerError",
]
