"""When a job may run: ``schedule.not_before`` and ``schedule.windows`` (daily ``HH:MM-HH:MM``
ranges in an IANA time zone, such as ``22:00-06:00`` in ``Europe/Paris`` for off-peak GPUs).

One answer serves everyone: :meth:`Schedule.next_run_at` is the first instant at or after ``now``
when the job may lease; the queue leases a job only when that instant is ``now`` itself, the
scaler counts only such jobs, and the dashboard shows the instant when it lies ahead.

A window whose end is before its start crosses midnight; one whose start equals its end is open
all day. Times are wall-clock times in the zone, so a window keeps its local hours across
daylight-saving changes (a wall time that a change skips or repeats is read with the offset in
force before the change, as :mod:`zoneinfo` does by default).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

DAY_MIN = 24 * 60
_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


def parse_window(text: str) -> tuple[int, int]:
    """``"22:00-06:00"`` -> minutes after midnight of its start and end."""
    match = _WINDOW.match(text)
    if match is None:
        raise ValueError(f"window {text!r} is not HH:MM-HH:MM")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    return h1 * 60 + m1, h2 * 60 + m2


def _local(day: datetime, minute: int, zone: ZoneInfo) -> float:
    """Unix time of ``minute`` after the local midnight of ``day`` (a day of the zone)."""
    naive = datetime(day.year, day.month, day.day) + timedelta(minutes=minute)
    return naive.replace(tzinfo=zone).timestamp()


def open_intervals(
    windows: Sequence[str], timezone: str, now: float, days: int = 8
) -> list[tuple[float, float]]:
    """The windows' open intervals (Unix seconds, start inclusive, end exclusive) from the day
    before ``now`` for ``days`` days, sorted and merged."""
    zone = ZoneInfo(timezone)
    today = datetime.fromtimestamp(now, zone)
    spans: list[tuple[float, float]] = []
    for offset in range(-1, days):
        day = today + timedelta(days=offset)
        for text in windows:
            start, end = parse_window(text)
            length = (end - start) % DAY_MIN or DAY_MIN
            spans.append((_local(day, start, zone), _local(day, start + length, zone)))
    spans.sort()
    merged: list[tuple[float, float]] = []
    for opens, closes in spans:
        if merged and opens <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], closes))
        else:
            merged.append((opens, closes))
    return merged


@dataclass
class Schedule:
    """A job's schedule; ``next_run_at`` is cached until its answer can change."""

    not_before: float = 0.0
    windows: tuple[str, ...] = ()
    timezone: str = "UTC"
    _valid: tuple[float, float, float] = field(default=(math.inf, -math.inf, 0.0), repr=False)

    def __post_init__(self) -> None:
        ZoneInfo(self.timezone)  # an unknown zone fails here, not at the first lease
        for text in self.windows:
            parse_window(text)

    def next_run_at(self, now: float) -> float:
        """``now`` when the job may lease now, else the Unix time it next may."""
        lo, hi, answer = self._valid
        if lo <= now < hi:
            return now if answer <= lo else answer
        at = max(now, self.not_before)
        if not self.windows:
            self._valid = (now, at, at) if at > now else (now, math.inf, now)
            return at
        for start, end in open_intervals(self.windows, self.timezone, at):
            if at < end:
                if at >= start:  # open: the answer is "now" until the window closes
                    self._valid = (at, end, at)
                    return at
                self._valid = (now, start, start)
                return start
        return math.inf  # no window in the next week (cannot happen for a valid window)

    def runnable(self, now: float) -> bool:
        return self.next_run_at(now) <= now


def describe_next_run(at: float, now: float) -> str:
    """``now`` or when (UTC) a job next leases, for tables and progress lines."""
    if at <= now:
        return "now"
    return "at " + datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%MZ")
