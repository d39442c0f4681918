"""What crosses the WorkQueue's boundary: jobs, items, leases, refusals, and the packed list
they travel in.

Items and leases are ``NamedTuple`` records so that a batch of them can cross a Ray process
boundary as one blob (see :class:`Packed`); everything here pickles with its fields.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

LeaseToken = tuple[int, int]
"""``(item rowid, epoch)``: the epoch grows with every lease of the item (fencing)."""

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What the queue keeps of a job: where it goes and how its items are retried."""

    job_id: str
    pool: str = "default"
    priority: int = 0
    max_attempts: int = 3
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    not_before: float = 0.0
    windows: tuple[str, ...] = ()  # daily run windows, "HH:MM-HH:MM" (inference.schedule)
    timezone: str = "UTC"
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """The part of the spec the ``jobs`` table keeps as JSON (the rest has columns)."""
        return json.dumps(
            {
                "max_attempts": self.max_attempts,
                "backoff_base_s": self.backoff_base_s,
                "backoff_max_s": self.backoff_max_s,
                "settings": self.settings,
                "windows": list(self.windows),
                "timezone": self.timezone,
            }
        )


# What a resumed job must keep: where its items are leased from (the pool: a model named
# differently would wait forever for a worker that serves it), their order, their schedule, and
# where and how the output lands. Everything else (attempts, backoff, shard sizes, prices) may
# change on resume, and the resumed run uses the new values.
RESUME_FIXED = ("pool", "priority", "not_before", "windows", "timezone")
RESUME_FIXED_SETTINGS = ("output_path", "output_format", "model", "models")


def _plain(value: Any) -> Any:
    """As stored (JSON): tuples become lists."""
    return json.loads(json.dumps(value))


def resume_conflicts(old: JobSpec, new: JobSpec) -> list[str]:
    """The fields in which ``new`` differs from the stored ``old`` and that a resume may not
    change, as dotted names with both values (``pool: 'tiny-llama' != 'models/tiny-llama'``)."""
    diffs = []
    for name in RESUME_FIXED:
        was, now = _plain(getattr(old, name)), _plain(getattr(new, name))
        if was != now:
            diffs.append(f"{name}: {was!r} != {now!r}")
    for name in RESUME_FIXED_SETTINGS:
        was, now = _plain(old.settings.get(name)), _plain(new.settings.get(name))
        if name == "models":  # the pools and their served names; prices may change
            was = {p: v[0] for p, v in (was or {}).items()}
            now = {p: v[0] for p, v in (now or {}).items()}
        if was != now:
            diffs.append(f"settings.{name}: {was!r} != {now!r}")
    return diffs


# The dead letters' code of items a job's end stopped: its cancel, or its completion window.
JOB_END_CODES = ("cancelled", "expired")


class NewItem(NamedTuple):
    """An item to enqueue. ``payload`` is a JSON object as text; ``priority`` None: the job's;
    ``pool`` None: the job's (the engine pool whose workers lease it)."""

    item_id: str
    payload: str
    tokens: int = 1
    priority: int | None = None
    pool: str | None = None


class LeasedItem(NamedTuple):
    """An item handed to a worker, with the token that every later call about it must carry."""

    token: LeaseToken
    job_id: str
    item_id: str
    payload: str
    attempts: int
    tokens: int
    # A worker was lost, or a lease expired, while it held the item: it may be what killed
    # its worker (a poison item), so the worker runs it alone, never beside other items.
    suspect: bool = False


class Refusal(NamedTuple):
    """A token the queue refused, and why (stale epoch, expired, unknown, not leased)."""

    token: LeaseToken
    reason: str


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    accepted: int
    duplicates: list[str]


@dataclass(frozen=True, slots=True)
class TokenCheck:
    valid: list[LeaseToken]
    refused: list[Refusal]


class Packed(list[_T]):
    """A list of records (tuples or the ``NamedTuple`` records above) that crosses a Ray
    process boundary as one blob.

    Ray serialises a plain list element by element through cloudpickle's Python hooks, which
    costs several microseconds an element (a 256-item lease took longer to ship than to
    compute). This list pickles its elements as plain tuples with the C pickler and names
    their type by a number, so Ray's pickler sees one function and one ``bytes``; the records
    are rebuilt on the other side. It is a ``list`` in every other respect.
    """

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        kind = _KINDS.index(type(self[0])) if self else 0
        rows: list[tuple[Any, ...]] = [tuple(x) for x in self]  # type: ignore[arg-type]
        return (_unpack, (pickle.dumps((kind, rows), protocol=pickle.HIGHEST_PROTOCOL),))


_KINDS: list[type] = [tuple, NewItem, LeasedItem, Refusal]


def _unpack(blob: bytes) -> Packed[Any]:
    kind, rows = pickle.loads(blob)
    if kind == 0:
        return Packed(rows)
    return Packed(map(_KINDS[kind]._make, rows))
