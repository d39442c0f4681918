"""Several clusters, one queue (``queue.shared: true`` with ``queue.url``): a WorkQueue in each
cluster, all writing one PostgreSQL database, draining the same jobs together exactly once.

:class:`~inference.queue.store.QueueStore` keeps an exact mirror because it is the one writer.
Here every WorkQueue is one of several, so the database, not the mirror, decides:

- **Leases** pick with ``FOR UPDATE SKIP LOCKED`` and take exactly the rows picked: two
  WorkQueues never take the same item and never wait for each other; a lane found shorter than
  the mirror thought is just a shorter lease.
- **Every change is fenced in the database** by ``(id, epoch)`` and state (completions, returns,
  failures), so a WorkQueue whose mirror is behind can refuse a stale token late, never honour it.
- **Deadlines are on the wall clock** (shared by the clusters, kept in step by NTP), and leases
  expire from the database: a WorkQueue returns any writer's passed leases, its own or those of
  a cluster that died.
- **The mirror is refreshed** from the database every :data:`REFRESH_S`, so counts, progress
  and the decision that a job is finished follow what the other clusters did. Between refreshes
  a mirror can only under-count others' progress (it never sees an item finished that is not),
  so no cluster finishes a job early.
- **Workers are told apart**: the database names a worker ``<name>@<tag>``, the tag being its
  WorkQueue's, so a cluster that loses ``pool-0`` releases its own ``pool-0``'s leases only.
- **Shards of a dead writer are settled by a live one.** Each WorkQueue holds an advisory lock
  of its tag for its life; a WorkQueue that can take another tag's lock knows that writer is gone
  and settles its declared shards (a publish that happened is completed with the leases it held,
  one that did not is aborted) before those leases may expire.
- A shared lock on the queue keeps out a one-owner WorkQueue (and it keeps out these).
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inference.errors import QueueError
from inference.queue import pg
from inference.queue.db import DatabaseOwned
from inference.queue.mirror import Lease
from inference.queue.store import _PICK_SQL, QueueStore

__all__ = ["REFRESH_S", "SharedQueueStore", "open_store"]

logger = logging.getLogger(__name__)

REFRESH_S = 1.0  # how stale a shared mirror may grow before it is reloaded
EXPIRE_CHUNK = 10_000  # passed leases returned per sweep
_INSTANCE_LOCK = "hashtextextended('inference.queue.instance:' || ?, 0)"
_LEASED = (
    "SELECT id, epoch, deadline, lease_s, job_id, priority, tokens, attempts, worker, pool"
    " FROM items WHERE state = 1 AND deadline < ? ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED"
)


def open_store(target: str | Path, *, shared: bool = False, **kwargs: Any) -> QueueStore:
    """The store of a queue: one writer (:class:`QueueStore`), or one of several."""
    if shared:
        return SharedQueueStore(str(target), **kwargs)
    return QueueStore(target, **kwargs)


class SharedQueueStore(QueueStore):
    """A :class:`QueueStore` that shares its PostgreSQL database with other WorkQueues."""

    shared = True

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] | None = None,
        wall: Callable[[], float] = time.time,
        owner_wait_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        if not pg.is_postgres_url(url):
            raise QueueError("queue.shared needs the queue on PostgreSQL (queue.url)")
        # Deadlines every writer reads alike: the wall clock.
        super().__init__(url, clock=clock or wall, wall=wall, **kwargs)
        self.tag = uuid.uuid4().hex[:12]
        self._lock_wait_s = owner_wait_s
        self._orphans: list[str] = []
        self._next_orphans = -math.inf
        if owner_wait_s is not None and not self.read_only:
            self._take_locks(owner_wait_s)
        if not self.read_only:
            # What the sweep of every writer's passed leases reads (a one-writer database
            # keeps its leases in memory and needs no such index).
            self._db.execute(
                "CREATE INDEX IF NOT EXISTS items_leased_deadline ON items(deadline)"
                " WHERE state = 1"
            )
        loaded = self._m.job

        def job(job_id: str) -> Any:  # one another cluster created since the last reload
            if job_id not in self._m.jobs:
                self._refresh()
            return loaded(job_id)

        self._m.job = job  # type: ignore[method-assign]

    # --------------------------------------------------------------- locks
    def _take_locks(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            (ok,) = self._db.execute(
                f"SELECT pg_try_advisory_lock_shared({pg.OWNER_LOCK})"
            ).fetchone()
            if ok:
                break
            if time.monotonic() >= deadline:
                raise DatabaseOwned(
                    f"the queue database {self.path} is owned by a WorkQueue that does not"
                    " share it (queue.shared is off there)"
                )
            time.sleep(0.2)
        while not self._try_instance_lock(self.tag):
            if time.monotonic() >= deadline:
                raise DatabaseOwned(f"this WorkQueue's tag {self.tag} is held by another")
            time.sleep(0.2)  # another writer is settling this tag's shards after a lost session

    def _try_instance_lock(self, tag: str) -> bool:
        (ok,) = self._db.execute(
            f"SELECT pg_try_advisory_lock({_INSTANCE_LOCK})", (tag,)
        ).fetchone()
        return bool(ok)

    def _reconnect(self) -> bool:
        if not super()._reconnect():
            return False
        if self._lock_wait_s is not None and not self.read_only:
            self._take_locks(max(self._lock_wait_s, 30.0))
        return True

    # --------------------------------------------------------------- what differs
    def worker_key(self, worker: str) -> str:
        return f"{worker}@{self.tag}"

    def rearm_leases(self, default_lease_s: float = 60.0) -> int:
        """Nothing to rearm: deadlines are on the wall clock, which a restart does not reset."""
        return 0

    def _refresh(self) -> None:
        self._m.load(self._db)
        self._next_wake = -math.inf

    def _expire(self, now: float) -> int:
        """Every writer's passed leases, from the database (a dead cluster's too); then the
        mirror reloaded. Runs every :data:`REFRESH_S`."""
        wall = self._wall()
        with self._tx():
            rows = self._db.execute(_LEASED, (now, EXPIRE_CHUNK)).fetchall()
            if rows and any(r[4] not in self._m.jobs for r in rows):
                self._refresh()  # a job another cluster created since the last reload
            held = [(r[0], Lease(r[1], r[2], *r[3:])) for r in rows]
            moves = self._return(held, "lease_expired", wall)
        if moves:
            logger.info("leases expired items=%d (any writer's)", len(moves))
        self._refresh()
        self._next_expiry = now + REFRESH_S
        return len(moves)

    def _wake(self, wall: float) -> None:
        try:
            super()._wake(wall)
        except KeyError:  # woke items of a job this mirror has not loaded yet
            self._refresh()

    def _pick(self, plan: list[tuple[str, str, int, int]]) -> list[list[Any]]:
        """Rows no other writer holds; fewer than planned is no divergence here."""
        sql = _PICK_SQL + " FOR UPDATE SKIP LOCKED"
        return [self._db.execute(sql, self._pick_params(entry)).fetchall() for entry in plan]

    def _take(
        self,
        plan: list[tuple[str, str, int, int]],
        picks: list[list[Any]],
        deadline: float,
        lease_s: float,
        worker: str,
    ) -> None:
        ids = [row[0] for rows in picks for row in rows]
        if not ids:
            return
        taken = self._db.execute(
            "UPDATE items SET state = 1, epoch = epoch + 1, deadline = ?, lease_s = ?,"
            f" worker = ? WHERE id IN {self._d.ids} AND state = 0",
            (deadline, lease_s, worker, json.dumps(ids)),
        ).rowcount
        if taken != len(ids):  # the picked rows are locked: this cannot be
            raise QueueError(f"a lease took {taken} of the {len(ids)} rows it locked")

    # --------------------------------------------------------------- dead writers' shards
    def orphans_due(self) -> bool:
        return time.monotonic() >= self._next_orphans

    def orphaned_shards(self) -> list[dict[str, Any]]:
        """Declared shards of writers that are gone: a tag whose lock this WorkQueue could take
        (held until :meth:`release_orphans`, so no other writer settles them too), or no tag
        (written by a one-owner WorkQueue before the database was shared)."""
        self._next_orphans = time.monotonic() + REFRESH_S
        out = []
        by_tag: dict[str, list[dict[str, Any]]] = {}
        for shard in self.declared_shards():
            name, _, tag = shard["worker"].rpartition("@")
            if not name:
                out.append(shard)
            elif tag != self.tag:
                by_tag.setdefault(tag, []).append(shard)
        for tag, shards in by_tag.items():
            if self._try_instance_lock(tag):
                self._orphans.append(tag)
                out.extend(shards)
        if out:
            self._refresh()  # settle them against the database's leases
        return out

    def release_orphans(self) -> None:
        for tag in self._orphans:
            self._db.execute(f"SELECT pg_advisory_unlock({_INSTANCE_LOCK})", (tag,))
        self._orphans.clear()
