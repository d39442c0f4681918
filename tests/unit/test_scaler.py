"""The scaling policy on tables of cases, the throughput meter, and the backlog built from
queue stats. Throughput is 100 tokens/s per worker throughout, so a worker drains 10,000 tokens
in the default 100 s target."""

from __future__ import annotations

import dataclasses
import math

import pytest

from inference.config import parse_config
from inference.errors import ConfigError
from inference.scaler import (
    Backlog,
    Policy,
    ScalerInput,
    ThroughputMeter,
    backlog_entries,
    decide,
)

RATE = 100.0
POLICY = Policy(
    min_workers=0,
    max_workers=4,
    target_drain_s=100.0,
    cooldown_s=60.0,
    hysteresis=0.2,
    idle_timeout_s=300.0,
)


def job(
    tokens: float,
    job_id: str = "a",
    *,
    priority: int = 0,
    age_s: float = 0.0,
    deadline_in_s: float | None = None,
    leased: int = 0,
) -> Backlog:
    items = max(1, int(tokens // 100)) if tokens else 0
    return Backlog(
        job_id=job_id,
        priority=priority,
        pending_items=items,
        pending_tokens=tokens,
        leased_items=leased,
        leased_tokens=leased * 100.0,
        oldest_pending_s=age_s if items else None,
        deadline_in_s=deadline_in_s,
    )


def run(
    backlog: list[Backlog],
    workers: int,
    *,
    rate: float | None = RATE,
    idle_s: float = 0.0,
    since_change_s: float = math.inf,
    **policy: object,
):
    p = dataclasses.replace(POLICY, **policy) if policy else POLICY
    return decide(ScalerInput(tuple(backlog), workers, rate, idle_s, since_change_s), p)


# (name, backlog, workers, keyword arguments, desired, reason)
CASES = [
    # scale up on backlog
    ("scales up from zero on any backlog", [job(500)], 0, {}, 1, "backlog"),
    ("scales up to drain within the target", [job(25_000)], 1, {}, 3, "backlog"),
    ("adds up the jobs' needs", [job(15_000), job(15_000, "b")], 1, {}, 3, "backlog"),
    ("an aged backlog has less time left", [job(10_000, age_s=50)], 1, {}, 2, "backlog"),
    ("a backlog past its target catches up", [job(10_000, age_s=500)], 1, {}, 4, "backlog"),
    ("stops at max_workers", [job(100_000)], 1, {}, 4, "max_workers"),
    # hold within the band
    ("holds when the need is just above", [job(22_000)], 2, {}, 2, "band"),
    ("holds when the need is just below", [job(40_000)], 5, {"max_workers": 8}, 5, "band"),
    ("holds when the need matches", [job(20_000)], 2, {}, 2, "steady"),
    # drain down, cooldown
    ("drains when the need fell", [job(15_000)], 4, {}, 2, "backlog"),
    ("waits for the cooldown to drain", [job(15_000)], 4, {"since_change_s": 10.0}, 4, "cooldown"),
    ("adds workers even in cooldown", [job(40_000)], 1, {"since_change_s": 1.0}, 4, "backlog"),
    ("keeps one worker for leased items", [job(0, leased=3)], 2, {}, 1, "backlog"),
    # idle: drain to min, scale to zero
    ("waits out the idle timeout", [], 2, {"idle_s": 100.0}, 2, "idle_wait"),
    ("scales to zero when idle", [], 2, {"idle_s": 400.0}, 0, "idle"),
    ("drains to min_workers when idle", [], 3, {"idle_s": 400.0, "min_workers": 1}, 1, "idle"),
    ("idle and in cooldown holds", [], 2, {"idle_s": 400.0, "since_change_s": 5.0}, 2, "idle_wait"),
    ("stays at zero when idle", [], 0, {}, 0, "idle"),
    ("keeps min_workers with nothing to do", [], 0, {"min_workers": 2}, 2, "min_workers"),
    ("min_workers is a floor under load", [job(100)], 0, {"min_workers": 2}, 2, "min_workers"),
    # cold start
    ("starts one worker before measuring", [job(1e9)], 0, {"rate": None}, 1, "unmeasured"),
    ("keeps its workers before measuring", [job(1e9)], 3, {"rate": None}, 3, "unmeasured"),
    (
        "uses the assumed throughput before measuring",
        [job(30_000)],
        0,
        {"rate": None, "assumed_tokens_per_s": 100.0},
        3,
        "backlog",
    ),
    # deadlines
    (
        "a deadline asks for more than the drain target",
        [job(10_000, deadline_in_s=25)],
        1,
        {"target_drain_s": 1000.0},
        4,
        "deadline",
    ),
    (
        "a deadline counts the higher priorities ahead of it",
        [job(20_000, "urgent", priority=5), job(5_000, "b", deadline_in_s=100)],
        1,
        {"target_drain_s": 1000.0},
        3,
        "deadline",
    ),
    (
        "a deadline counts a fair share of equal priorities",
        [job(50_000, "big"), job(5_000, "b", deadline_in_s=100)],
        1,
        {"target_drain_s": 10_000.0},
        1,
        "steady",
    ),
    # cost ceiling
    (
        "the cost ceiling caps the pool",
        [job(100_000)],
        1,
        {"worker_cost_per_hour": 2.0, "cost_ceiling_per_hour": 5.0},
        2,
        "cost_ceiling",
    ),
    (
        "over the cap drains at once, cooldown or not",
        [job(100_000)],
        4,
        {"worker_cost_per_hour": 2.0, "cost_ceiling_per_hour": 5.0, "since_change_s": 0.0},
        2,
        "cost_ceiling",
    ),
    ("a lowered max_workers drains at once", [job(1e6)], 4, {"max_workers": 1}, 1, "max_workers"),
]


@pytest.mark.parametrize(
    ("backlog", "workers", "kwargs", "desired", "reason"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_policy(backlog, workers, kwargs, desired, reason) -> None:
    decision = run(backlog, workers, **kwargs)
    assert (decision.desired, decision.reason) == (desired, reason), decision


def test_a_deadline_the_pool_cannot_meet_is_reported_at_risk() -> None:
    decision = run([job(100_000, "late", deadline_in_s=50), job(1_000, "fine")], 1)
    assert decision.desired == 4  # it still does what it can
    assert decision.at_risk == ("late",)
    assert decision.needed > 4


def test_a_passed_deadline_is_at_risk() -> None:
    assert run([job(100, "late", deadline_in_s=-1)], 1).at_risk == ("late",)


def test_a_deadline_within_reach_is_not_at_risk() -> None:
    decision = run([job(10_000, "a", deadline_in_s=50)], 1)
    assert (decision.desired, decision.at_risk) == (2, ())


def test_cost_ceiling_also_bounds_the_deadline_assessment() -> None:
    decision = run(
        [job(30_000, deadline_in_s=100)], 1, worker_cost_per_hour=2.0, cost_ceiling_per_hour=5.0
    )
    assert decision.desired == 2
    assert decision.at_risk == ("a",)
    assert decision.cost_per_hour == 4.0


def test_eta_and_cost_are_given_for_the_desired_count() -> None:
    decision = run([job(30_000)], 0, worker_cost_per_hour=1.5)
    assert decision.desired == 3
    assert decision.eta_s == pytest.approx(100.0)
    assert decision.cost_per_hour == pytest.approx(4.5)


def test_hysteresis_zero_follows_the_need_exactly() -> None:
    assert run([job(21_000)], 2, hysteresis=0.0).desired == 3


def test_the_policy_does_not_flap_on_a_noisy_rate() -> None:
    """Throughput measured +-10% around the truth: a pool at the right size holds."""
    for rate in (90.0, 95.0, 100.0, 105.0, 110.0):
        assert run([job(30_000)], 3, rate=rate).desired == 3


def test_policy_reads_the_scaling_config() -> None:
    scaling = parse_config(
        {
            "scaling": {
                "mode": "autoscale",
                "min_workers": 1,
                "max_workers": 8,
                "gpus_per_worker": 2,
                "cost_per_gpu_hour": 1.5,
                "cost_ceiling_per_hour": 10,
                "cooldown_s": 5,
            }
        }
    ).scaling
    policy = Policy.from_config(scaling)
    assert scaling.worker_cost_per_hour == 3.0
    assert policy.cap == 3  # 10 / 3 per hour
    assert policy.cooldown_s == 5
    assert Policy.from_config(scaling, max_workers=2).cap == 2


@pytest.mark.parametrize(
    ("scaling", "message"),
    [
        ({"min_workers": 3, "max_workers": 2}, "exceeds max_workers"),
        ({"mode": "autoscale"}, "max_workers must be set"),
        (
            {"min_workers": 2, "cost_per_gpu_hour": 4, "cost_ceiling_per_hour": 5},
            "over cost_ceiling_per_hour",
        ),
        ({"hysteresis": 1.0}, "scaling.hysteresis"),
    ],
)
def test_impossible_scaling_configs_are_refused(scaling: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"scaling": scaling})


# ---------------------------------------------------------------------- throughput meter
def test_meter_waits_for_enough_busy_time() -> None:
    meter = ThroughputMeter(halflife_s=10.0, min_busy_s=1.0)
    assert meter.update(0.0, 0, 0.0) is None
    assert meter.update(1.0, 50, 0.5) is None  # half a busy second: not yet
    assert meter.update(2.0, 200, 2.0) == pytest.approx(100.0)


def test_meter_smooths_with_its_half_life() -> None:
    meter = ThroughputMeter(halflife_s=10.0, min_busy_s=1.0)
    meter.update(0.0, 0, 0.0)
    meter.update(10.0, 1000, 10.0)  # 100/s
    assert meter.update(20.0, 1000 + 3000, 20.0) == pytest.approx(200.0)  # half way to 300
    assert meter.update(20.0 + 1e-6, 4000 + 5000, 30.0) == pytest.approx(200.0, abs=0.01)


def test_meter_rebases_when_counters_go_back() -> None:
    meter = ThroughputMeter(halflife_s=10.0)
    meter.update(0.0, 0, 0.0)
    meter.update(10.0, 1000, 10.0)
    assert meter.update(11.0, 10, 0.1) == pytest.approx(100.0)  # a job left: no negative rate
    assert meter.update(21.0, 1010, 10.1) == pytest.approx(100.0)


# ---------------------------------------------------------------------- backlog from stats
def stats(**fields: object) -> dict:
    base = {
        "job_id": "j",
        "state": "active",
        "priority": 0,
        "pending": 0,
        "leased": 0,
        "done": 0,
        "pending_tokens": 0,
        "pending_by_priority": {},
        "oldest_pending_s": None,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "not_before": 0.0,
    }
    return {**base, **fields}


def test_backlog_splits_a_job_by_priority_and_calibrates_tokens() -> None:
    entries = backlog_entries(
        stats(
            pending=100,
            pending_tokens=10_000,  # 100 estimated per item
            pending_by_priority={0: 75, 5: 25},
            leased=4,
            done=10,
            prompt_tokens=300,
            completion_tokens=200,  # 50 really per item: estimates are halved
            oldest_pending_s=12.0,
        ),
        wall=1000.0,
        deadline=1060.0,
    )
    assert [(e.priority, e.pending_items) for e in entries] == [(5, 25), (0, 75)]
    assert sum(e.pending_tokens for e in entries) == pytest.approx(5_000)
    assert [e.leased_items for e in entries] == [0, 4]
    assert entries[1].leased_tokens == pytest.approx(200)
    assert {e.deadline_in_s for e in entries} == {60.0}
    assert {e.oldest_pending_s for e in entries} == {12.0}


def test_backlog_ignores_items_that_cannot_be_leased() -> None:
    assert backlog_entries(stats(state="paused", pending=5, pending_tokens=50), 0.0) == []
    later = stats(pending=5, pending_tokens=50, not_before=100.0)
    assert backlog_entries(later, wall=50.0) == []
    assert backlog_entries(later, wall=150.0)[0].pending_items == 5
    open_now = stats(pending=5, pending_tokens=50, next_run_at=0.0)  # the queue's "now"
    assert backlog_entries(open_now, wall=50.0)[0].pending_items == 5
    closed = stats(pending=5, pending_tokens=50, leased=1, next_run_at=100.0)  # out of window
    assert [(e.pending_items, e.leased_items) for e in backlog_entries(closed, 50.0)] == [(0, 1)]
    cancelled = backlog_entries(stats(state="cancelled", pending=5, leased=2), 0.0)
    assert [(e.pending_items, e.leased_items) for e in cancelled] == [(0, 2)]


def test_an_empty_job_has_no_backlog() -> None:
    assert backlog_entries(stats(done=10, prompt_tokens=5), 0.0) == []


# ---------------------------------------------------------------------- demand and bundles
def test_resource_demand_sums_pools_and_sends_only_changes() -> None:
    from inference.autoscale import ResourceDemand

    sent: list[list[dict[str, float]]] = []
    demand = ResourceDemand(sent.append)
    demand.set("llm", {"GPU": 1.0}, 2)
    demand.set("emb", {"CPU": 2.0}, 1)
    demand.set("llm", {"GPU": 1.0}, 2)  # unchanged: not sent again
    demand.clear("emb")
    demand.set("llm", {"GPU": 1.0}, 0)
    gpu, cpu = {"GPU": 1.0}, {"CPU": 2.0}
    assert sent == [[gpu, gpu], [gpu, gpu, cpu], [gpu, gpu], []]


def test_worker_bundle_and_deadline_follow_the_config() -> None:
    from inference.autoscale import deadline_ts, worker_bundle

    gpu = parse_config({"scaling": {"gpus_per_worker": 1, "cpus_per_worker": 4}}).scaling
    assert worker_bundle(gpu) == {"GPU": 1.0, "CPU": 4.0}
    cpu = parse_config({"scaling": {"cpus_per_worker": 2}}).scaling
    assert worker_bundle(cpu) == {"CPU": 2.0}
    assert deadline_ts(cpu) is None
    naive = parse_config({"scaling": {"deadline": "2030-01-01T00:00:00"}}).scaling
    aware = parse_config({"scaling": {"deadline": "2030-01-01T01:00:00+01:00"}}).scaling
    assert deadline_ts(naive) == deadline_ts(aware) == 1893456000.0


def test_a_pool_sees_only_its_share_of_a_job_of_several_models() -> None:
    from inference.scaler import jobs_of_pool

    job = {
        "job_id": "mix",
        "pool": "small",
        "state": "active",
        "pending": 7,
        "leased": 3,
        "pools": {
            "small": {"pending": 5, "leased": 1, "pending_tokens": 50, "busy_s": 2.0},
            "big": {"pending": 2, "leased": 2, "pending_tokens": 900, "busy_s": 9.0},
        },
    }
    other = {"job_id": "solo", "pool": "big", "pending": 4, "leased": 0, "pools": {}}
    stats = {"mix": job, "solo": other}
    [small] = jobs_of_pool(stats, "small")
    assert (small["pending"], small["leased"], small["pending_tokens"]) == (5, 1, 50)
    assert small["job_id"] == "mix" and small["state"] == "active"
    [big] = jobs_of_pool(stats, "big")  # "solo" has no items (empty pools)
    assert (big["pool"], big["pending"], big["busy_s"]) == ("big", 2, 9.0)
    assert jobs_of_pool(stats, "none") == []


def test_overflow_takes_what_the_cap_cannot_do_in_time_and_gives_it_back_when_it_can() -> None:
    from inference.scaler import OverflowShare, overflow_moves

    def share(pending: int, over: int, need: float, with_over: float) -> OverflowShare:
        return OverflowShare(pending, over, need, with_over)

    moves = overflow_moves(
        {
            "late": share(100, 0, 4.0, 4.0),  # needs 4 workers, may have 2: half goes
            "past": share(30, 5, math.inf, math.inf),  # deadline passed: all go
            "fine": share(50, 0, 1.0, 1.0),  # in time: stays
            "room": share(10, 40, 0.5, 2.5),  # room for (1.6 - 0.5) / 2 of its 40
            "band": share(10, 40, 1.7, 3.0),  # within the hysteresis band: holds
            "empty": share(0, 12, 0.0, 0.0),  # back, all of it
        },
        cap=2,
        hysteresis=0.2,
    )
    assert moves == {"late": 50, "past": 30, "room": -22, "empty": -12}
    # Moving back what was moved out must not move it out again at once: the need with the
    # overflow back stays within the cap.
    assert overflow_moves({"j": share(40, 60, 0.8, 1.6)}, cap=2, hysteresis=0.2) == {"j": -60}
