import random
import time

import pytest

from inference.progress import HISTORY_POINTS, History, Sample, Tracker, eta_s, rate
from inference.queue.backoff import backoff_s
from inference.schedule import describe_next_run


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    rng = random.Random(0)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (10, 30.0)]:
        values = [backoff_s(attempt, 1.0, 30.0, rng) for _ in range(500)]
        assert all(0.0 <= v <= ceiling for v in values)
        assert max(values) > ceiling * 0.9  # it does reach up to the ceiling
        assert min(values) < ceiling * 0.1  # and down to zero (full jitter)


def test_backoff_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError):
        backoff_s(0, 1.0, 2.0)


def _stats(done: int, pending: int, dead: int = 0, tokens: int = 0) -> dict:
    return {
        "done": done,
        "dead": dead,
        "pending": pending,
        "leased": 0,
        "total": done + dead + pending,
        "prompt_tokens": tokens,
        "completion_tokens": 0,
        "busy_s": done * 0.5,
    }


def test_steady_progress_gives_a_linear_eta() -> None:
    tracker = Tracker(window_s=30, cost_per_hour=3600.0)
    for t in range(11):
        p = tracker.update(float(t), _stats(done=10 * t, pending=1000 - 10 * t, tokens=100 * t))
    assert p.items_per_s == pytest.approx(10.0)
    assert p.eta_s == pytest.approx(90.0)  # 900 items of 10 tokens at 100 tokens/s
    assert p.cost == pytest.approx(50.0)  # 100 items x 0.5 busy-s at 1 per busy-second
    assert p.cost_to_finish == pytest.approx(450.0)


def test_stalled_job_has_no_eta() -> None:
    tracker = Tracker(window_s=5)
    for t in range(10):
        p = tracker.update(float(t), _stats(done=0, pending=100))
    assert p.eta_s is None


def test_finalizing_is_never_shown_as_done() -> None:
    p = Tracker().update(0.0, _stats(done=100, pending=0), finalizing=True)
    assert p.state == "finalizing"
    assert p.fraction < 1.0


def test_a_job_outside_its_windows_shows_when_it_next_runs() -> None:
    later = time.time() + 3600
    p = Tracker().update(0.0, {**_stats(done=5, pending=10), "next_run_at": later})
    assert (p.state, p.next_run_at) == ("scheduled", later)
    now = Tracker().update(0.0, {**_stats(done=5, pending=10), "next_run_at": time.time()})
    assert (now.state, now.next_run_at) == ("active", None)
    assert describe_next_run(later, later - 1).startswith("at ")
    assert describe_next_run(later, later) == "now"


def test_rate_uses_the_recent_window() -> None:
    samples = [
        Sample(float(t), done=t * (1 if t < 50 else 10), dead=0, tokens=0) for t in range(60)
    ]
    assert rate(samples, "done", 5) > 9  # sped up lately; the old slow part is ignored
    assert eta_s(0, 0, 0, 0) == 0.0


def test_history_sums_the_live_jobs_and_keeps_the_newest_points() -> None:
    history = History()
    for t in range(HISTORY_POINTS + 5):
        history.add(float(t), [{"items_per_s": 1.0, "tokens_per_s": 10.0}, {"items_per_s": None}])
    d = history.as_dict()
    assert len(d["t"]) == HISTORY_POINTS and d["t"][0] == 5.0
    assert set(d["items_per_s"]) == {1.0} and set(d["tokens_per_s"]) == {10.0}
