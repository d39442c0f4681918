"""Items that hurt their worker, through the engine hook of ``inference/faults.py``
(``INFERENCE_FAULT_ITEMS``): an item slower than three leases (case 7), a poison item that
kills its worker's process (case 9), and transient, permanent and unknown errors (case 10).

Each job is an ``inference run`` with its own embedded Ray cluster, so that its workers inherit
the hook's variable (the session's cluster was started without it).
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from tests.faults.harness import SEEDS, config_file, items_of, run_env, run_to_end, write_lines


def _run(
    tmp: Path, ray_tmp: str, job_id: str, ids: list[str], faults: dict[str, str], **queue: object
) -> tuple[dict, Path, Path]:
    path = write_lines(tmp / "in.jsonl", ids)
    config = config_file(tmp, **queue)
    env = run_env(ray_tmp, INFERENCE_FAULT_ITEMS=json.dumps(faults))
    summary = run_to_end([str(path), "--config", str(config), "--job-id", job_id], env)
    return summary, tmp / "out" / job_id, tmp / "queue.sqlite"


@pytest.mark.parametrize("seed", SEEDS)
def test_an_item_slower_than_three_leases_is_not_redelivered(
    tmp_path: Path, ray_tmp: str, seed: int, fault_run
) -> None:
    run = fault_run(7, "an item 3.5x slower than its lease", seed)
    rng = random.Random(seed)
    ids = [f"item-{i:03d}" for i in range(40)]
    slow = rng.sample(ids, 2)
    lease_s = 2.0
    summary, job_dir, db = _run(
        tmp_path, ray_tmp, "slow", ids, dict.fromkeys(slow, f"sleep:{3.5 * lease_s}"),
        lease_s=lease_s,
    )  # fmt: skip
    run.check(job_dir, db, "slow", len(ids))
    items = items_of(db, "slow")
    assert {i["state"] for i in items.values()} == {"done"}
    # Heartbeats kept every lease, the slow items' and their batch neighbours': no expiry, no
    # second attempt.
    assert {cid: i["attempts"] for cid, i in items.items() if i["attempts"] != 1} == {}
    assert {cid: i["history"] for cid, i in items.items() if i["history"]} == {}
    assert json.loads((job_dir / "job.json").read_text())["lease_expiries"] == 0
    assert summary["wall_s"] > 3 * lease_s  # the sleep did happen


@pytest.mark.parametrize("seed", SEEDS)
def test_a_poison_item_that_kills_its_worker_ends_in_the_dead_letters(
    tmp_path: Path, ray_tmp: str, seed: int, fault_run
) -> None:
    run = fault_run(9, "a poison item os._exit's its worker", seed)
    rng = random.Random(seed)
    ids = [f"item-{i:03d}" for i in range(40)]
    poison = rng.choice(ids)
    max_attempts = 3
    _summary, job_dir, db = _run(
        tmp_path, ray_tmp, "poison", ids, {poison: "exit"}, max_attempts=max_attempts
    )
    run.check(job_dir, db, "poison", len(ids))
    items = items_of(db, "poison")
    dead = items[poison]
    assert dead["state"] == "dead"
    assert dead["attempts"] == max_attempts == dead["n_lost"]  # each crash counted
    assert [h["cause"] for h in dead["history"]] == ["worker_lost"] * max_attempts
    assert dead["error_code"] and dead["error_message"]  # the dead letter says why
    # Split and retry: the items that shared the poison's first batch were charged that one
    # crash, then came back as suspects and ran alone; none died with it.
    collateral = sorted(c for c, i in items.items() if c != poison and i["state"] != "done")
    assert collateral == []
    charged = {c: i["n_lost"] for c, i in items.items() if c != poison and i["n_lost"]}
    assert charged and max(charged.values()) == 1, charged


@pytest.mark.parametrize("seed", SEEDS)
def test_transient_permanent_and_unknown_errors_are_retried_or_dead_lettered(
    tmp_path: Path, ray_tmp: str, seed: int, fault_run
) -> None:
    run = fault_run(10, "transient / permanent / unknown errors", seed)
    rng = random.Random(seed)
    ids = [f"item-{i:03d}" for i in range(60)]
    rng.shuffle(ids)
    permanent, recovers, always, unknown = ids[:3], ids[3:7], ids[7:13], ids[13:16]
    faults = {
        **dict.fromkeys(permanent, "raise:permanent"),
        **dict.fromkeys(recovers, "raise:transient@2"),
        **dict.fromkeys(always, "raise:transient"),
        **dict.fromkeys(unknown, "raise:unknown"),
    }
    max_attempts, base_s, max_s = 4, 0.5, 1.0
    _summary, job_dir, db = _run(
        tmp_path, ray_tmp, "errors", ids, faults,
        max_attempts=max_attempts, backoff_base_s=base_s, backoff_max_s=max_s,
    )  # fmt: skip
    run.check(job_dir, db, "errors", len(ids))
    items = items_of(db, "errors")
    for cid in permanent:  # dead on its first attempt
        item = items[cid]
        assert (item["state"], item["attempts"], item["error_kind"]) == ("dead", 1, "permanent")
        assert item["error_code"] == "injected"
    for cid in recovers:  # two failures, then done
        item = items[cid]
        assert (item["state"], item["attempts"], item["n_error"]) == ("done", 3, 2), item
    for cid in always + unknown:  # retried up to max_attempts, then dead
        item = items[cid]
        assert (item["state"], item["attempts"]) == ("dead", max_attempts), item
        assert item["error_kind"] == "transient"
        assert item["error_code"] == ("injected" if cid in always else "engine_error")
    # Everything else ran once: one item's error never fails its batch neighbours.
    faulty = set(faults)
    others = {c: i["attempts"] for c, i in items.items() if c not in faulty}
    assert set(others.values()) == {1}, others
    # Backoff from the attempt timestamps: full jitter, so each gap between two failures of an
    # item is at most the cap of its attempt (min(max_s, base_s * 2**(k-1))) plus the time to
    # lease and run it again, and all gaps together are well above no backoff at all.
    slack_s = 1.5
    gaps, ceilings = [], []
    for cid in always + unknown:
        times = [h["at"] for h in items[cid]["history"] if h["cause"] == "error"]
        assert len(times) == max_attempts
        for k, (a, b) in enumerate(itertools.pairwise(times), start=1):
            ceiling = min(max_s, base_s * 2 ** (k - 1))
            assert 0 <= b - a <= ceiling + slack_s, (cid, k, b - a)
            gaps.append(b - a)
            ceilings.append(ceiling)
    assert sum(gaps) >= 0.25 * sum(ceilings), (gaps, ceilings)
