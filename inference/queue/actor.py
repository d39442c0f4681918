"""The ``WorkQueue`` Ray actor: one per cluster, detached, restartable. On SQLite it is pinned to
the head node (where its file lives); on PostgreSQL (``queue.url``) it may run, and be restarted,
on any node, and its mirror is rebuilt from the database. It serves
:class:`~inference.queue.store.QueueStore` and coordinates shard commits (see
:mod:`inference.shards`).

The actor runs one call at a time, so a check of lease tokens, the rename that publishes a shard
and the transaction that completes its items cannot interleave with a lease of the same items.

Batches cross the process boundary as :class:`~inference.queue.records.Packed` lists (one blob
instead of one pickle per element); callers may pass plain lists too.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from inference.errors import OutputError, QueueError
from inference.faults import fault
from inference.heap import freeze_startup_heap
from inference.queue.pg import is_postgres_url
from inference.queue.remote import RemoteLedger
from inference.queue.shared import open_store
from inference.queue.store import (
    EnqueueResult,
    JobSpec,
    LeasedItem,
    LeaseToken,
    NewItem,
    Refusal,
)
from inference.shards import JobOutput

logger = logging.getLogger(__name__)

NAMESPACE = "inference"
QUEUE_NAME = "WorkQueue"
OWNER_WAIT_S = 30.0  # how long a (re)started WorkQueue waits for its database's owner lock


@dataclass(frozen=True, slots=True)
class DeclaredShard:
    n: int
    path: str
    tmp_path: str
    refused: list[Refusal]


@dataclass(frozen=True, slots=True)
class CommitResult:
    committed: bool
    refused: list[Refusal]
    reason: str = ""


def _fault(step: str) -> None:
    """A crash-test injection point of the commit protocol (see :mod:`inference.faults`)."""
    fault(step)


class WorkQueue:
    """Durable work queue with leases, fencing, retries and dead letters.

    A plain (single-threaded) actor: one call at a time, so a check of lease tokens and the change
    that relies on it can never interleave with another call.
    """

    def __init__(self, db_path: str, max_item_bytes: int = 1_000_000, shared: bool = False) -> None:
        """``db_path``: the SQLite file, or a ``postgresql://`` URL; ``shared``: this
        cluster's WorkQueue is one of several on that database (``queue.shared``)."""
        logging.basicConfig(level=logging.INFO)
        # The one writer of this database for as long as the actor lives (operator commands
        # without a cluster address refuse to write it meanwhile). A restarted actor may wait
        # for its predecessor's process (or, on PostgreSQL, session) to be gone.
        self._store = open_store(db_path, shared=shared, owner_wait_s=OWNER_WAIT_S)
        self._remote = RemoteLedger(self._store.db)
        self._max_item_bytes = max_item_bytes
        self._outputs: dict[str, JobOutput] = {}
        self._recover()
        freeze_startup_heap()

    # --------------------------------------------------------------- recovery
    def _recover(self) -> None:
        rearmed = self._store.rearm_leases()
        self._settle_orphans()
        if self._store.shared:
            # Temporary files may be other clusters' shards in the making: a dead writer's
            # are removed with its declared shards, by the writer that settles them.
            logger.info("WorkQueue ready db=%s (shared, tag %s)", self._store.path, self._tag())
            return
        for job_id in self._store.job_ids():
            if "output_path" not in self._store.job_spec(job_id).settings:
                continue  # its consumers keep results elsewhere (complete() without shards)
            try:
                self._output(job_id).remove_temporaries()
            except (OSError, OutputError) as exc:
                logger.warning("recovery: cannot clean temporaries of %s: %s", job_id, exc)
        logger.info("WorkQueue ready db=%s leases_rearmed=%d", self._store.path, rearmed)

    def _tag(self) -> str:
        return str(getattr(self._store, "tag", ""))

    def _settle_orphans(self) -> None:
        """Declared shards whose writer is gone (this queue's previous life, or, on a shared
        database, another cluster's WorkQueue): a publish that happened is completed, with the
        rows, bytes and tokens the file itself holds (its leases were valid at the publish,
        checked in the same turn); one that did not is aborted and its temporary removed."""
        try:
            for shard in self._store.orphaned_shards():
                self._settle(shard)
        finally:
            self._store.release_orphans()

    def _settle(self, shard: dict[str, Any]) -> None:
        job_id, n = shard["job_id"], shard["n"]
        output = self._output(job_id)
        if not output.exists(shard["path"]):
            self._drop_declared(shard)
            return
        rows, nbytes, usage = output.shard_facts(shard["path"])
        try:
            self._store.commit_shard(
                job_id, n, rows=rows, nbytes=nbytes, usage=usage, check_leases=False
            )
        except QueueError as exc:
            # Its leases came back before it could be settled: its items run again, so the
            # file must not count (nor be seen).
            logger.warning("recovery: shard %s/%d not completed (%s): removed", job_id, n, exc)
            output.remove(shard["path"])
            self._store.abort_shard(job_id, n)
            return
        logger.info("recovery: shard %s/%d was published; items completed", job_id, n)

    def _output(self, job_id: str) -> JobOutput:
        if job_id not in self._outputs:
            settings = self._store.job_spec(job_id).settings
            self._outputs[job_id] = JobOutput(
                settings["output_path"], job_id, settings.get("output_format", "parquet")
            )
        return self._outputs[job_id]

    # --------------------------------------------------------------- jobs
    def ping(self) -> str:
        return str(self._store.path)

    def create_job(self, spec: JobSpec) -> bool:
        created = self._store.create_job(spec)
        if "output_path" in spec.settings:
            self._output(spec.job_id).makedirs()
        return created

    def job_spec(self, job_id: str) -> JobSpec:
        return self._store.job_spec(job_id)

    def set_job_state(self, job_id: str, state: str, reason: str = "cancelled") -> None:
        self._store.set_job_state(job_id, state, reason)

    def enqueue(self, job_id: str, items: Sequence[NewItem]) -> EnqueueResult:
        return self._store.enqueue(job_id, items, max_item_bytes=self._max_item_bytes)

    # --------------------------------------------------------------- leases
    def lease(
        self,
        worker: str,
        max_items: int,
        max_tokens: int | None = None,
        lease_s: float = 60.0,
        pool: str | None = None,
    ) -> list[LeasedItem]:
        self._orphans_now()
        return self._store.lease(worker, max_items, max_tokens, lease_s, pool)

    def extend(self, tokens: Sequence[LeaseToken], lease_s: float) -> list[Refusal]:
        self._orphans_now()
        return self._store.extend(tokens, lease_s)

    def _orphans_now(self) -> None:
        """On a shared database: settle a dead writer's shards before its leases may expire
        (the calls that come often look, at most once per refresh)."""
        if self._store.orphans_due():
            self._settle_orphans()

    def release(self, tokens: Sequence[LeaseToken], cause: str = "drained") -> list[Refusal]:
        return self._store.release(tokens, cause)

    def release_worker(self, worker: str, cause: str = "worker_lost") -> int:
        """Return every item a worker holds; the worker is gone (its run ended, or it was
        killed), so the shards it declared and never committed are aborted and their
        temporary files removed now, not at the queue's next start."""
        released = self._store.release_worker(worker, cause)
        key = self._store.worker_key(worker)
        for shard in self._store.declared_shards():
            if shard["worker"] == key:
                self._drop_declared(shard)
        return released

    def _drop_declared(self, shard: dict[str, Any]) -> None:
        try:
            self._output(shard["job_id"]).remove(shard["tmp_path"])
        except (OSError, OutputError) as exc:
            logger.warning(
                "shard %s/%d: cannot remove %s: %s",
                shard["job_id"],
                shard["n"],
                shard["tmp_path"],
                exc,
            )
        self._store.abort_shard(shard["job_id"], shard["n"])

    def complete(self, tokens: Sequence[LeaseToken], shard: int | None = None) -> list[Refusal]:
        """Mark leased items done, fenced (for consumers that keep results elsewhere; shard
        writers use :meth:`declare_shard` / :meth:`commit_shard`)."""
        return self._store.complete(tokens, shard)

    def fail(
        self, tokens: Sequence[LeaseToken], kind: str, code: str, message: str
    ) -> list[Refusal]:
        return self._store.fail(tokens, kind, code, message)

    # --------------------------------------------------------------- shard commits
    def declare_shard(
        self, job_id: str, tokens: Sequence[LeaseToken], worker: str
    ) -> DeclaredShard:
        output = self._output(job_id)
        n, refused = self._store.declare_shard(
            job_id, tokens, worker, output.data_path("{n}"), output.tmp_path("{n}")
        )
        shard = self._store.shard(job_id, n)
        return DeclaredShard(n, shard["path"], shard["tmp_path"], refused)

    def commit_shard(
        self, job_id: str, n: int, rows: int, nbytes: int, usage: dict[str, float] | None = None
    ) -> CommitResult:
        """Publish a written shard and complete its items, or refuse if any lease is gone
        (then the temporary file is deleted and nothing becomes visible). The check, the rename
        and the items' transaction follow each other in this one actor turn."""
        shard = self._store.shard(job_id, n)
        if shard["state"] == "committed":  # a retried call after the actor restarted
            return CommitResult(True, [], "already committed")
        if shard["state"] != "declared":
            # Aborted (its worker was released, say): a late writer's file is never shown.
            with contextlib.suppress(OSError, OutputError):
                self._output(job_id).remove(shard["tmp_path"])
            return CommitResult(False, [], f"shard is {shard['state']}")
        output = self._output(job_id)
        self._store.expire_leases()
        refused = self._store.check_tokens(shard["tokens"]).refused
        if refused or not shard["tokens"]:
            output.remove(shard["tmp_path"])
            self._store.abort_shard(job_id, n)
            return CommitResult(False, refused, "leases no longer held")
        _fault("before_publish")
        try:
            output.publish(shard["tmp_path"], shard["path"])
        except (OSError, OutputError) as exc:
            with contextlib.suppress(OSError, OutputError):
                output.remove(shard["tmp_path"])  # a failed publish leaves no temporary
            self._store.abort_shard(job_id, n)
            return CommitResult(False, [], f"publish failed: {exc}")
        _fault("after_publish")
        try:
            self._store.commit_shard(
                job_id, n, rows=rows, nbytes=nbytes, usage=usage, check_leases=False
            )
        except QueueError as exc:  # storage failed, or the items were not as the mirror said
            return self._unpublish(output, shard, exc)
        _fault("after_complete")
        return CommitResult(True, [])

    def _unpublish(self, output: JobOutput, shard: dict[str, Any], exc: QueueError) -> CommitResult:
        """The items' transaction failed after the publish (disk full, I/O error, or the
        database did not hold the leases the mirror promised: the store has resynced). Unless
        the database shows it committed after all, the items are not done and will be done
        again: take the shard back, or its rows would be in the output twice. (A crash at this
        point instead is settled by :meth:`_recover`.)"""
        job_id, n = shard["job_id"], shard["n"]
        if self._store.shard(job_id, n)["state"] == "committed":
            return CommitResult(True, [], f"committed despite: {exc}")
        logger.error("shard %s/%d: items not completed (%s); unpublishing it", job_id, n, exc)
        try:
            output.remove(shard["path"])
        except (OSError, OutputError) as remove_exc:
            logger.error("shard %s/%d: cannot unpublish: %s", job_id, n, remove_exc)
        return CommitResult(False, [], f"queue database failed: {exc}")

    def abort_shard(self, job_id: str, n: int) -> None:
        shard = self._store.shard(job_id, n)
        if shard["state"] == "declared":
            self._output(job_id).remove(shard["tmp_path"])
            self._store.abort_shard(job_id, n)

    def committed_shards(self, job_id: str) -> list[dict[str, Any]]:
        return self._store.committed_shards(job_id)

    def shards_from(self, job_id: str, low: int = 0) -> list[dict[str, Any]]:
        """Committed and in-flight shards numbered ``low`` and up (a results reader's view)."""
        return self._store.shards_from(job_id, low)

    # --------------------------------------------------------------- dead letters, reads
    def dead_letters(self, job_id: str, limit: int = 1000, after: int = 0) -> list[dict[str, Any]]:
        return self._store.dead_letters(job_id, limit, after)

    def redrive(
        self, job_id: str, item_ids: Sequence[str] | None = None, batch_ok: bool = False
    ) -> int:
        return self._store.redrive(job_id, item_ids, batch_ok)

    def stats(self, job_id: str | None = None) -> dict[str, Any]:
        self._orphans_now()
        stats = self._store.stats(job_id)
        for jid, st in [(job_id, stats)] if job_id is not None else stats["jobs"].items():
            remote = self._remote.summary(jid)
            if remote is not None:
                st["remote_batches"] = remote
        return stats

    def move_pending(self, job_id: str, source: str, target: str, n: int) -> int:
        return self._store.move_pending(job_id, source, target, n)

    # --------------------------------------------------------------- provider batches
    def remote_record(
        self,
        key: str,
        job_id: str,
        pool: str,
        endpoint: str,
        url: str,
        input_file_id: str,
        item_ids: Sequence[str],
        nbytes: int,
    ) -> None:
        self._remote.record(key, job_id, pool, endpoint, url, input_file_id, item_ids, nbytes)

    def remote_update(self, key: str, **fields: Any) -> None:
        self._remote.update(key, **fields)

    def remote_lookup(self, job_id: str, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        return self._remote.lookup(job_id, item_ids)

    def remote_forget(self, job_id: str, item_ids: Sequence[str], key: str | None = None) -> int:
        return self._remote.forget(job_id, item_ids, key)

    def remote_batches(self, job_id: str) -> list[dict[str, Any]]:
        return self._remote.batches(job_id)

    def item(self, job_id: str, item_id: str) -> dict[str, Any] | None:
        return self._store.item(job_id, item_id)

    def job_urls(self, job_id: str) -> list[str]:
        return self._store.job_urls(job_id)

    def item_states(
        self, job_id: str, limit: int = 10_000, after: int = 0
    ) -> list[tuple[int, str, str]]:
        return self._store.item_states(job_id, limit, after)

    def pid(self) -> int:
        return os.getpid()


def get_or_create_queue(
    db_path: str | Path, max_item_bytes: int = 1_000_000, shared: bool = False
) -> Any:
    """The cluster's WorkQueue actor, created when it does not exist yet: on the head node for a
    SQLite file (its disk is the head's), anywhere for PostgreSQL (a restart may land on another
    node: the database is the state)."""
    options: dict[str, Any] = {}
    if not is_postgres_url(str(db_path)):
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
            node_id=head_node_id(), soft=False
        )
    actor_cls = ray.remote(WorkQueue)
    handle: Any = actor_cls.options(
        name=QUEUE_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        num_cpus=0,
        **options,
    ).remote(str(db_path), max_item_bytes, shared)
    ray.get(handle.ping.remote())
    return handle


def get_queue() -> Any:
    try:
        return ray.get_actor(QUEUE_NAME, namespace=NAMESPACE)
    except ValueError:
        raise QueueError("no WorkQueue runs on this Ray cluster") from None


def head_node_id() -> str:
    """The head node's id: where the cluster's singletons and their databases live."""
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return str(node["NodeID"])
    return ray.get_runtime_context().get_node_id()
