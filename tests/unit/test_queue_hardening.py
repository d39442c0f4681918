"""The queue's guards against misuse, on the real SQLite store (no Ray): a resume that would
change a job's pool or output, operator commands beside a live owner, a read-only look that
never writes, and a commit whose database disagrees with the store's mirror."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import pytest

from inference.admin import QueueAccess
from inference.config import load_config
from inference.errors import JobConflict, QueueError, StorageError
from inference.queue.db import DatabaseOwned, hold_owner_lock
from inference.queue.records import JobSpec, NewItem, resume_conflicts
from inference.queue.store import QueueStore
from tests.conftest import REPO


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _spec(**changes: object) -> JobSpec:
    base: dict[str, object] = {
        "job_id": "j",
        "pool": "tiny-llama",
        "max_attempts": 3,
        "settings": {"output_path": "/out", "output_format": "parquet", "model": "tiny-llama"},
    }
    base.update(changes)
    return JobSpec(**base)  # type: ignore[arg-type]


def _items(*ids: str) -> list[NewItem]:
    return [NewItem(i, json.dumps({"v": i}), 4) for i in ids]


# ------------------------------------------------------------------ resume
def test_a_resume_that_moves_the_job_to_another_pool_is_refused_naming_the_fields(
    tmp_path: Path,
    queue_target: str,
) -> None:
    """``engine.model: tiny-llama`` then ``models/tiny-llama``: the resumed items would wait in
    a pool no worker serves, forever. Refused, naming each field with both values."""
    store = QueueStore(queue_target)
    assert store.create_job(_spec())
    store.enqueue("j", _items("a"))
    other = _spec(
        pool="models/tiny-llama",
        settings={"output_path": "/else", "output_format": "parquet", "model": "tiny-llama"},
    )
    with pytest.raises(JobConflict) as caught:
        store.create_job(other)
    message = str(caught.value)
    assert "pool: 'tiny-llama' != 'models/tiny-llama'" in message
    assert "settings.output_path: '/out' != '/else'" in message
    assert caught.value.fields == [
        "pool: 'tiny-llama' != 'models/tiny-llama'",
        "settings.output_path: '/out' != '/else'",
    ]
    assert store.job_spec("j").pool == "tiny-llama"  # nothing changed


def test_a_resume_may_change_attempts_backoff_and_shard_sizes(
    tmp_path: Path, queue_target: str
) -> None:
    store = QueueStore(queue_target)
    store.create_job(_spec())
    settings = {**_spec().settings, "rows_per_shard": 10, "cost_per_gpu_hour": 2.5}
    assert not store.create_job(_spec(max_attempts=7, backoff_max_s=5.0, settings=settings))
    assert store.job_spec("j").max_attempts == 7
    store.close()
    again = QueueStore(queue_target)  # the new values are durable
    assert again.job_spec("j").max_attempts == 7
    assert again.job_spec("j").settings["rows_per_shard"] == 10


def test_models_may_change_prices_not_pools() -> None:
    old = _spec(settings={**_spec().settings, "models": {"p1": ("m1", 1.0)}})
    pricier = _spec(settings={**_spec().settings, "models": {"p1": ("m1", 3.0)}})
    renamed = _spec(settings={**_spec().settings, "models": {"p2": ("m1", 1.0)}})
    assert resume_conflicts(old, pricier) == []
    assert resume_conflicts(old, renamed) == ["settings.models: {'p1': 'm1'} != {'p2': 'm1'}"]


def test_job_ids_dot_and_dotdot_are_refused(tmp_path: Path, queue_target: str) -> None:
    store = QueueStore(queue_target)
    for job_id in (".", ".."):
        with pytest.raises(QueueError, match="must match"):
            store.create_job(_spec(job_id=job_id))
    assert store.job_ids() == []


# ------------------------------------------------------------------ one writer
def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for suffix in ("", "-wal"):
        f = Path(f"{path}{suffix}")
        if f.exists():
            h.update(f.read_bytes())
    return h.hexdigest()


def test_a_read_only_look_never_writes_not_even_an_expiry(tmp_path: Path) -> None:
    db = tmp_path / "q.sqlite"
    clock = Clock(1000.0)
    store = QueueStore(db, clock=clock)
    store.create_job(_spec())
    store.enqueue("j", _items("a", "b"))
    store.lease("w", 1, lease_s=1.0)
    store.close()
    before = _digest(db)
    look = QueueStore(db, read_only=True, clock=Clock(10**9))  # every lease long expired
    stats = look.stats("j")
    assert (stats["pending"], stats["leased"]) == (1, 1)
    with pytest.raises(StorageError):
        look.lease("w2", 5)
    with pytest.raises(StorageError):
        look.set_job_state("j", "cancelled")
    look.close()
    assert _digest(db) == before


def test_a_read_only_look_refuses_a_schema_it_does_not_know(tmp_path: Path) -> None:
    db = tmp_path / "q.sqlite"
    QueueStore(db).close()
    raw = sqlite3.connect(db)
    raw.execute("PRAGMA user_version=99")
    raw.close()
    with pytest.raises(StorageError, match="schema 99"):
        QueueStore(db, read_only=True)


def test_operator_writes_are_refused_while_a_live_owner_holds_the_database(
    tmp_path: Path,
) -> None:
    """What `inference cancel` / `dlq redrive` do without RAY_ADDRESS: while the WorkQueue (here:
    this test) holds the owner lock, they refuse and say to set RAY_ADDRESS; `status` reads."""
    out = tmp_path / "out"
    config = load_config(REPO / "configs/tiny-cpu.yaml").with_updates(output={"path": str(out)})
    db = out / "_queue" / "queue.sqlite"
    db.parent.mkdir(parents=True)
    store = QueueStore(db)
    store.create_job(_spec())
    owner = hold_owner_lock(db)
    try:
        with pytest.raises(DatabaseOwned, match="RAY_ADDRESS"):
            QueueAccess(config, write=True)
        with pytest.raises(DatabaseOwned):
            hold_owner_lock(db, wait_s=0.3)
        assert QueueAccess(config).call("stats", "j")["total"] == 0  # a look is fine
    finally:
        os.close(owner)
    access = QueueAccess(config, write=True)  # the owner is gone: the command may write
    access.call("set_job_state", "j", "cancelled")
    assert QueueStore(db, read_only=True).stats("j")["state"] == "cancelled"


# ------------------------------------------------------------------ a diverged mirror
def test_a_commit_whose_database_disagrees_resyncs_and_completes_nothing(tmp_path: Path) -> None:
    """Another writer changed the file behind the store: an item the mirror holds as leased is
    pending in the database. The commit must not complete the shard (its file would hold a row
    whose item is done again later): it reloads the mirror and refuses, and the store then
    agrees with the file."""
    db = tmp_path / "q.sqlite"
    store = QueueStore(db)
    store.create_job(_spec())
    store.enqueue("j", _items("a", "b"))
    leased = store.lease("w", 2, lease_s=60.0)
    n, refused = store.declare_shard("j", [x.token for x in leased], "w", "/o/{n}", "/t/{n}")
    assert refused == []
    behind = sqlite3.connect(db, isolation_level=None)
    behind.execute("UPDATE items SET state = 0, worker = NULL WHERE item_id = 'b'")
    behind.close()
    with pytest.raises(QueueError, match="no longer held"):
        store.commit_shard("j", n, rows=2, nbytes=10, check_leases=False)
    stats = store.stats("j")
    assert (stats["done"], stats["leased"], stats["pending"]) == (0, 1, 1)
    assert store.shard("j", n)["state"] == "declared"


# ------------------------------------------------------------------ recovery
def test_recovery_of_a_published_shard_keeps_its_rows_bytes_and_tokens(
    tmp_path: Path, queue_target: str
) -> None:
    """A crash between the publish and the items' transaction: the restarted WorkQueue
    completes the shard from the file itself (it recorded -1 rows and no tokens before)."""
    from datetime import UTC, datetime

    from inference.queue.actor import WorkQueue
    from inference.shards import JobOutput, results_table

    db = queue_target
    settings = {"output_path": str(tmp_path / "out"), "output_format": "parquet"}
    first = WorkQueue(str(db))
    first.create_job(JobSpec("j", settings=settings))
    first.enqueue("j", _items("a", "b", "c"))
    leased = first.lease("w", 3)
    declared = first.declare_shard("j", [x.token for x in leased], "w")
    now = datetime.now(UTC)
    rows = [
        {
            "job_id": "j",
            "custom_id": x.item_id,
            "output_text": "t",
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "attempts": 1,
            "completed_at": now,
        }
        for x in leased
    ]
    output = JobOutput(settings["output_path"], "j")
    nbytes = output.write_table(results_table(rows), declared.tmp_path)
    output.publish(declared.tmp_path, declared.path)  # ... and the crash comes here
    first._store.close()
    first._store.close()
    again = WorkQueue(str(db))
    [shard] = again.committed_shards("j")
    assert (shard["rows"], shard["bytes"]) == (3, nbytes)
    stats = again.stats("j")
    assert (stats["done"], stats["prompt_tokens"], stats["completion_tokens"]) == (3, 15, 6)
    again._store.close()


def test_a_second_work_queue_on_the_same_database_waits_for_the_first(
    tmp_path: Path, queue_target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inference.queue import actor

    monkeypatch.setattr(actor, "OWNER_WAIT_S", 0.3)
    db = queue_target
    first = actor.WorkQueue(str(db))
    with pytest.raises(DatabaseOwned):
        actor.WorkQueue(str(db))
    first._store.close()


# ------------------------------------------------------------------ suspects
def test_items_held_by_a_lost_worker_or_an_expired_lease_come_back_as_suspects(
    tmp_path: Path,
    queue_target: str,
) -> None:
    """A worker that dies takes no item's name with it: every item it held may be the poison
    one, so each comes back marked ``suspect`` and leased alone. Items that were only given
    back (a drain) or failed by the engine are not suspects."""
    clock, wall = Clock(1000.0), Clock(1.7e9)
    store = QueueStore(queue_target, clock=clock, wall=wall)
    store.create_job(_spec())
    store.enqueue("j", _items("lost1", "lost2", "slow", "drained", "failed"))
    first = {i.item_id: i for i in store.lease("w1", 5, lease_s=30)}
    assert not any(i.suspect for i in first.values())
    store.release([first["drained"].token], "drained")
    store.fail([first["failed"].token], "transient", "engine_error", "boom")
    store.extend([first["lost1"].token, first["lost2"].token], 300)
    clock.t += 60  # the lease of "slow" expires; the others were extended
    store.lease("w2", 0)  # a call that sweeps
    assert store.release_worker("w1") == 2
    clock.t += 3600  # past any backoff
    wall.t += 3600
    leases = []
    while leased := store.lease("w3", 5, lease_s=30):
        leases.append([(i.item_id, i.suspect) for i in leased])
    # A suspect is leased alone (so its worker can run it beside nothing), and a lease stops
    # before one: FIFO order holds.
    assert leases == [
        [("lost1", True)],
        [("lost2", True)],
        [("slow", True)],
        [("drained", False), ("failed", False)],
    ]


def test_an_expired_job_dead_letters_its_items_as_expired_not_cancelled(
    tmp_path: Path, queue_target: str
) -> None:
    """A job whose completion window passed ends like a cancelled one, but its dead letters say
    it expired: those waiting at once, a leased one when its lease comes back."""
    clock = Clock(1000.0)
    store = QueueStore(queue_target, clock=clock)
    store.create_job(_spec())
    store.enqueue("j", _items("running", "waiting"))
    (leased,) = store.lease("w1", 1, lease_s=30)
    assert leased.item_id == "running"
    store.set_job_state("j", "cancelled", "expired")
    clock.t += 60
    store.release_worker("w1")
    dead = {d["custom_id"]: d for d in store.dead_letters("j")}
    assert {c: (d["error_code"], d["reason"]) for c, d in dead.items()} == {
        "running": ("expired", "expired"),
        "waiting": ("expired", "expired"),
    }
    assert "completion window" in dead["waiting"]["message"]
    with pytest.raises(QueueError, match="cancelled or expired"):
        store.set_job_state("j", "cancelled", "bored")


def test_a_rerun_against_a_fresh_database_never_overwrites_the_first_runs_shards(
    tmp_path: Path,
) -> None:
    """The same job id and output, two queue databases (the first one deleted, say): both
    number their first shard 0, as the queue actor declares them (paths with ``{n}``), and
    both shards stay, each with its own rows."""
    from inference.shards import JobOutput, read_results, results_table
    from tests.unit.test_shards import rows

    out = JobOutput(str(tmp_path / "out"), "j")
    out.makedirs()
    published = []
    for run, item in (("first", "a"), ("second", "b")):
        store = QueueStore(tmp_path / f"{run}.sqlite")
        store.create_job(_spec(settings={"output_path": str(tmp_path / "out")}))
        store.enqueue("j", [NewItem(item, json.dumps({"v": item}), 4)])
        (leased,) = store.lease("w", 1)
        n, _ = store.declare_shard(
            "j", [leased.token], "w", out.data_path("{n}"), out.tmp_path("{n}")
        )
        shard = store.shard("j", n)
        assert n == 0
        out.write_table(results_table(rows(item)), shard["tmp_path"])
        out.publish(shard["tmp_path"], shard["path"])
        store.commit_shard("j", n, rows=1, nbytes=1)
        published.append(shard["path"])
        store.close()
    assert published[0] != published[1]
    assert sorted(read_results(out.base).column("custom_id").to_pylist()) == ["a", "b"]
