"""Run windows and not_before: when a job may lease, on tables of cases in real time zones."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from inference.config import ScheduleConfig
from inference.schedule import Schedule, open_intervals, parse_window


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M")


# (windows, zone, now (ISO, with offset), expected: "open" or the UTC time it opens)
CASES = [
    (["09:00-17:00"], "UTC", "2026-11-29T12:00+00:00", "open"),
    (["09:00-17:00"], "UTC", "2026-11-29T08:59+00:00", "2026-11-29 09:00"),
    (["09:00-17:00"], "UTC", "2026-11-29T17:00+00:00", "2026-11-30 09:00"),  # end exclusive
    (["09:00-17:00"], "UTC", "2026-11-29T09:00+00:00", "open"),  # start inclusive
    # Crossing midnight, in Paris (UTC+1 in winter): open 21:00-05:00 UTC.
    (["22:00-06:00"], "Europe/Paris", "2026-11-29T21:30+00:00", "open"),
    (["22:00-06:00"], "Europe/Paris", "2026-11-30T04:59+00:00", "open"),
    (["22:00-06:00"], "Europe/Paris", "2026-11-30T05:00+00:00", "2026-11-30 21:00"),
    (["22:00-06:00"], "Europe/Paris", "2026-11-29T12:00+00:00", "2026-11-29 21:00"),
    # Summer time moves the same local window an hour in UTC.
    (["22:00-06:00"], "Europe/Paris", "2026-07-01T12:00+00:00", "2026-07-01 20:00"),
    # Two windows: the nearer one counts.
    (["01:00-02:00", "13:00-14:00"], "UTC", "2026-11-29T03:00+00:00", "2026-11-29 13:00"),
    (["01:00-02:00", "13:00-14:00"], "UTC", "2026-11-29T15:00+00:00", "2026-11-30 01:00"),
    # A window whose start equals its end is open all day.
    (["00:00-00:00"], "Asia/Tokyo", "2026-11-29T15:00+00:00", "open"),
    # Back-to-back windows merge: no gap at 12:00.
    (["08:00-12:00", "12:00-16:00"], "UTC", "2026-11-29T12:00+00:00", "open"),
]


@pytest.mark.parametrize(("windows", "zone", "now", "expected"), CASES)
def test_next_run_at_on_a_table_of_windows(
    windows: list[str], zone: str, now: str, expected: str
) -> None:
    at = ts(now)
    answer = Schedule(windows=tuple(windows), timezone=zone).next_run_at(at)
    assert (answer == at and "open") or utc(answer) == expected, utc(answer)
    if expected != "open":
        assert answer > at


def test_not_before_and_windows_together() -> None:
    night = ("22:00-06:00",)
    # not_before falls in the day: the job waits for the next window after it.
    s = Schedule(ts("2026-11-30T10:00+00:00"), night, "UTC")
    assert utc(s.next_run_at(ts("2026-11-29T23:00+00:00"))) == "2026-11-30 22:00"
    # not_before falls inside a window: it starts at not_before itself.
    s = Schedule(ts("2026-11-30T01:00+00:00"), night, "UTC")
    assert utc(s.next_run_at(ts("2026-11-29T12:00+00:00"))) == "2026-11-30 01:00"
    # No windows: only not_before.
    s = Schedule(ts("2026-11-30T01:00+00:00"))
    assert utc(s.next_run_at(ts("2026-11-29T12:00+00:00"))) == "2026-11-30 01:00"
    assert s.runnable(ts("2026-11-30T01:00+00:00"))


def test_the_cached_answer_matches_a_fresh_one_minute_by_minute() -> None:
    cached = Schedule(ts("2026-11-29T03:00+00:00"), ("22:00-06:00", "12:00-12:30"), "Europe/Paris")
    start = ts("2026-11-29T00:00+00:00")
    for minute in range(0, 3 * 24 * 60, 7):
        now = start + minute * 60
        fresh = Schedule(cached.not_before, cached.windows, cached.timezone)
        assert cached.next_run_at(now) == fresh.next_run_at(now), utc(now)


def test_a_dst_day_keeps_local_hours() -> None:
    # Paris leaves summer time on 2026-10-25: 22:00-06:00 local lasts 9 hours that night.
    spans = open_intervals(["22:00-06:00"], "Europe/Paris", ts("2026-10-24T12:00+00:00"), days=2)
    lengths = {utc(a): (b - a) / 3600 for a, b in spans}
    assert lengths["2026-10-24 20:00"] == 9.0
    assert lengths["2026-10-25 21:00"] == 8.0


@pytest.mark.parametrize("text", ["25:00-01:00", "9-17", "09:00", "09:60-10:00", "a-b"])
def test_bad_windows_are_refused_naming_the_window(text: str) -> None:
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        parse_window(text)
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        ScheduleConfig(windows=[text])


def test_an_unknown_time_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="Mars/Olympus"):
        ScheduleConfig(windows=["22:00-06:00"], timezone="Mars/Olympus")
