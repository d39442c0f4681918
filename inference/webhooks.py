"""Signed webhooks, delivered at least once from a durable outbox.

When a job or batch reaches a final status, the Controller writes one outbox row per endpoint
that takes the event, in the same SQLite transaction as the record's move (so no final job is
ever without its due event). :class:`Deliverer` runs one thread per endpoint, apart from the
control loop: it POSTs due rows, signed as Standard Webhooks (the scheme OpenAI's webhooks use,
which ``openai.OpenAI().webhooks.unwrap`` verifies), and marks each delivered on a 2xx answer.
Anything else (another status, a timeout, a refused connection) is retried with exponential
backoff and jitter until ``api.webhook_retry_s`` after the event; then the row is given up, and
kept. A restarted Controller delivers what was due, so a receiver may get an event more than
once: every attempt carries the same ``webhook-id`` (the event's id) to dedupe on.

Events, in OpenAI's payload shape::

    {"id": "evt_...", "object": "event", "created_at": 1733577600, "type": "batch.completed",
     "data": {"id": "batch_..."}}

``batch.{completed,failed,expired,cancelled}`` for OpenAI batches, ``job.*`` for native jobs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from inference.config import ApiConfig, WebhookEndpoint
from inference.errors import ConfigError

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 3600.0
RECENT = 20  # deliveries the dashboard lists
KEEP_S = 30 * 86400.0  # delivered and given-up rows are kept this long after their last attempt
_BATCH = 50  # due rows read at a time per endpoint

OUTBOX_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS webhook_outbox(seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " event_id TEXT NOT NULL, url TEXT NOT NULL, type TEXT NOT NULL, job_id TEXT NOT NULL,"
    " body TEXT NOT NULL, created_at REAL NOT NULL, state TEXT NOT NULL DEFAULT 'due',"
    " attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL, last_attempt_at REAL,"
    " last_status INTEGER, last_error TEXT, UNIQUE(event_id, url));"
    "CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox(url, state, next_at);"
)


# ---------------------------------------------------------------------- secrets and signatures
def parse_secret(text: str) -> bytes:
    """The signing key of a secret: ``whsec_<base64>`` decoded (Standard Webhooks, as OpenAI's
    dashboard gives it), any other string as its UTF-8 bytes (as the openai client verifies)."""
    if text.startswith("whsec_"):
        try:
            key = base64.b64decode(text.removeprefix("whsec_"), validate=True)
        except binascii.Error:
            raise ValueError("a whsec_ secret must be followed by base64") from None
    else:
        key = text.encode()
    if not key:
        raise ValueError("the secret is empty")
    return key


def load_secrets(
    endpoints: Iterable[WebhookEndpoint], environ: Mapping[str, str] = os.environ
) -> dict[str, bytes]:
    """Each endpoint's signing key (by url) from the variable its ``secret_env`` names. Raises
    ConfigError naming the entry and the variable when one is unset or unusable."""
    keys = {}
    for n, endpoint in enumerate(endpoints):
        where = f"api.webhooks.{n} ({endpoint.url})"
        value = environ.get(endpoint.secret_env)
        if not value:
            raise ConfigError(
                f"{where}: secret_env names {endpoint.secret_env}, which is not set in the "
                "Controller's environment (set it where `inference serve` or `ray start --head`"
                " runs)"
            )
        try:
            keys[endpoint.url] = parse_secret(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: the secret in {endpoint.secret_env}: {exc}") from None
    return keys


def signature(key: bytes, event_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks' ``webhook-signature``: ``v1,`` and the base64 HMAC-SHA256 of
    ``{id}.{timestamp}.{body}``."""
    mac = hmac.new(key, f"{event_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def signed_headers(key: bytes, event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "user-agent": "inference-webhooks/1",
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(key, event_id, timestamp, body),
    }


# ---------------------------------------------------------------------- events and backoff
def event_type(kind: str, status: str) -> str:
    """``batch.<status>`` for an OpenAI batch, ``job.<status>`` for a native job."""
    return f"{'batch' if kind == 'batch' else 'job'}.{status}"


def event_payload(kind: str, job_id: str, status: str, created_at: int) -> dict[str, Any]:
    return {
        "id": f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "created_at": created_at,
        "type": event_type(kind, status),
        "data": {"id": job_id},
    }


def next_attempt_at(
    attempts: int,
    created_at: float,
    now: float,
    backoff_s: float,
    retry_s: float,
    rand: Callable[[], float] = random.random,
) -> float | None:
    """When to try again after ``attempts`` failed attempts: ``backoff_s`` doubled per attempt
    (at most an hour), the later half of it jittered; never past ``created_at + retry_s`` (the
    last attempt is at that bound). None once the bound has passed: give up."""
    deadline = created_at + retry_s
    if now >= deadline:
        return None
    delay = min(MAX_BACKOFF_S, backoff_s * 2 ** max(0, attempts - 1))
    return min(deadline, now + delay / 2 + rand() * delay / 2)


@dataclass(frozen=True)
class WebhookSettings:
    """What the Controller delivers by: the endpoints (no secrets: those are read from its own
    environment), the retry bound, the per-attempt timeout and the first backoff."""

    endpoints: tuple[WebhookEndpoint, ...] = ()
    retry_s: float = 72 * 3600.0
    timeout_s: float = 10.0
    backoff_s: float = 5.0

    @classmethod
    def from_api(cls, api: ApiConfig) -> WebhookSettings:
        return cls(
            tuple(api.webhooks), api.webhook_retry_s, api.webhook_timeout_s, api.webhook_backoff_s
        )


# ---------------------------------------------------------------------- the outbox
@dataclass(frozen=True)
class Delivery:
    """One due outbox row: an event for one endpoint."""

    seq: int
    event_id: str
    url: str
    type: str
    job_id: str
    body: str
    created_at: float
    attempts: int


def insert_rows(db: sqlite3.Connection, rows: Iterable[tuple[Any, ...]]) -> None:
    """Add outbox rows (from :meth:`Deliverer.rows`) inside the caller's transaction."""
    db.executemany(
        "INSERT OR IGNORE INTO webhook_outbox(event_id, url, type, job_id, body, created_at,"
        " next_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        rows,
    )


class Outbox:
    """The outbox table, in the Controller's database (its connection and lock)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self._db = db
        self._lock = lock
        with self._lock:
            self._db.executescript(OUTBOX_SCHEMA)

    def due(self, url: str, now: float, limit: int = _BATCH) -> list[Delivery]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, event_id, url, type, job_id, body, created_at, attempts"
                " FROM webhook_outbox WHERE url = ? AND state = 'due' AND next_at <= ?"
                " ORDER BY next_at, seq LIMIT ?",
                (url, now, limit),
            ).fetchall()
        return [Delivery(*row) for row in rows]

    def next_due_at(self, url: str) -> float | None:
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(next_at) FROM webhook_outbox WHERE url = ? AND state = 'due'", (url,)
            ).fetchone()
        return None if row[0] is None else float(row[0])

    def record(
        self,
        seq: int,
        state: str,
        attempts: int,
        next_at: float,
        at: float,
        status: int | None,
        error: str | None,
    ) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE webhook_outbox SET state = ?, attempts = ?, next_at = ?,"
                " last_attempt_at = ?, last_status = ?, last_error = ? WHERE seq = ?",
                (state, attempts, next_at, at, status, error, seq),
            )

    def give_up_unknown(self, urls: Iterable[str], now: float) -> int:
        """Due rows of endpoints no longer configured: given up (no secret to sign them)."""
        known = list(urls)
        marks = ",".join("?" * len(known))
        where = f"state = 'due' AND url NOT IN ({marks})" if known else "state = 'due'"
        with self._lock:
            cur = self._db.execute(
                "UPDATE webhook_outbox SET state = 'given_up', last_attempt_at = ?,"
                f" last_error = 'endpoint no longer in api.webhooks' WHERE {where}",
                (now, *known),
            )
        return cur.rowcount

    def prune(self, before: float) -> int:
        """Delete the delivered and given-up rows last attempted before ``before`` (the
        janitor's call, ``KEEP_S`` back); a due row is never deleted. Returns how many went."""
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM webhook_outbox WHERE state != 'due' AND last_attempt_at < ?",
                (before,),
            )
        return cur.rowcount

    def undelivered(self) -> int:
        with self._lock:
            return int(
                self._db.execute(
                    "SELECT COUNT(*) FROM webhook_outbox WHERE state = 'due'"
                ).fetchone()[0]
            )

    def recent(self, limit: int = RECENT) -> list[dict[str, Any]]:
        """The last attempted (or given up) deliveries, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT event_id, type, job_id, url, state, attempts, last_attempt_at,"
                " last_status, last_error, next_at FROM webhook_outbox"
                " WHERE last_attempt_at IS NOT NULL ORDER BY last_attempt_at DESC, seq DESC"
                " LIMIT ?",
                (limit,),
            ).fetchall()
        keys = ("event_id", "type", "job_id", "url", "state", "attempts", "at", "status", "error")
        out = []
        for row in rows:
            doc = dict(zip(keys, row[:9], strict=True))
            doc["next_at"] = row[9] if row[4] == "due" else None
            out.append(doc)
        return out


# ---------------------------------------------------------------------- the deliverer
@dataclass
class _Endpoint:
    config: WebhookEndpoint
    key: bytes
    wake: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class Deliverer:
    """One thread per endpoint POSTing its due outbox rows; nothing here blocks the caller."""

    def __init__(
        self,
        outbox: Outbox,
        settings: WebhookSettings,
        keys: Mapping[str, bytes],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._outbox = outbox
        self._settings = settings
        self._clock = clock
        self._endpoints = [_Endpoint(e, keys[e.url]) for e in settings.endpoints]
        self._stop = threading.Event()
        self._counts: dict[tuple[str, str], int] = {}
        self._counts_lock = threading.Lock()

    def start(self) -> None:
        given_up = self._outbox.give_up_unknown(
            [e.config.url for e in self._endpoints], self._clock()
        )
        if given_up:
            logger.warning(
                "webhooks: %d due deliveries to endpoints no longer configured: given up", given_up
            )
        for n, endpoint in enumerate(self._endpoints):
            endpoint.thread = threading.Thread(
                target=self._run, args=(endpoint,), name=f"webhooks-{n}", daemon=True
            )
            endpoint.thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        for endpoint in self._endpoints:
            endpoint.wake.set()
        for endpoint in self._endpoints:
            if endpoint.thread is not None:
                endpoint.thread.join(timeout_s)

    def urls(self) -> list[str]:
        return [e.config.url for e in self._endpoints]

    def wake(self) -> None:
        for endpoint in self._endpoints:
            endpoint.wake.set()

    def rows(self, kind: str, job_id: str, status: str) -> list[tuple[Any, ...]]:
        """The outbox rows of a job's move to final ``status``: one per endpoint taking its event
        type (none without endpoints), for :func:`insert_rows` in the move's transaction."""
        kind_type = event_type(kind, status)
        targets = [e.config.url for e in self._endpoints if kind_type in e.config.events]
        if not targets:
            return []
        now = self._clock()
        payload = event_payload(kind, job_id, status, int(now))
        body = json.dumps(payload, separators=(",", ":"))
        return [(payload["id"], url, kind_type, job_id, body, now, now) for url in targets]

    def snapshot(self) -> dict[str, Any]:
        """Deliveries by type and outcome since start, undelivered rows, the recent ones."""
        with self._counts_lock:
            counts = [{"type": t, "outcome": o, "n": n} for (t, o), n in self._counts.items()]
        return {
            "endpoints": len(self._endpoints),
            "deliveries": counts,
            "undelivered": self._outbox.undelivered(),
            "recent": self._outbox.recent(),
        }

    def _count(self, kind_type: str, outcome: str) -> None:
        with self._counts_lock:
            self._counts[(kind_type, outcome)] = self._counts.get((kind_type, outcome), 0) + 1

    def _run(self, endpoint: _Endpoint) -> None:
        timeout = httpx.Timeout(self._settings.timeout_s)
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            while not self._stop.is_set():
                try:
                    due = self._outbox.due(endpoint.config.url, self._clock())
                    for delivery in due:
                        if self._stop.is_set():
                            return
                        self._attempt(client, endpoint, delivery)
                    if due:
                        continue
                    next_at = self._outbox.next_due_at(endpoint.config.url)
                except Exception:  # the database, say: try again shortly
                    logger.exception("webhooks: delivery to %s failed", endpoint.config.url)
                    next_at = self._clock() + 1.0
                wait_s = 60.0 if next_at is None else next_at - self._clock()
                endpoint.wake.wait(min(60.0, max(0.01, wait_s)))
                endpoint.wake.clear()

    def _attempt(self, client: httpx.Client, endpoint: _Endpoint, delivery: Delivery) -> None:
        body = delivery.body.encode()
        timestamp = int(self._clock())
        headers = signed_headers(endpoint.key, delivery.event_id, timestamp, body)
        status: int | None = None
        try:
            # Streamed and closed unread: only the status counts, a slow body cannot hold us.
            with client.stream("POST", delivery.url, content=body, headers=headers) as response:
                status = response.status_code
            error = None if 200 <= status < 300 else f"HTTP {status}"
        except Exception as exc:  # timeouts, refused connections, bad answers: retried
            error = f"{type(exc).__name__}: {exc}"[:500]
        now = self._clock()
        attempts = delivery.attempts + 1
        if error is None:
            self._outbox.record(delivery.seq, "delivered", attempts, now, now, status, None)
            self._count(delivery.type, "delivered")
            logger.info(
                "webhook delivered event=%s type=%s job=%s url=%s attempt=%d",
                delivery.event_id,
                delivery.type,
                delivery.job_id,
                delivery.url,
                attempts,
            )
            return
        self._count(delivery.type, "failed")
        s = self._settings
        next_at = next_attempt_at(attempts, delivery.created_at, now, s.backoff_s, s.retry_s)
        if next_at is None:
            self._outbox.record(delivery.seq, "given_up", attempts, now, now, status, error)
            self._count(delivery.type, "given_up")
            logger.warning(
                "webhook given up event=%s type=%s job=%s url=%s attempts=%d: %s",
                delivery.event_id,
                delivery.type,
                delivery.job_id,
                delivery.url,
                attempts,
                error,
            )
            return
        self._outbox.record(delivery.seq, "due", attempts, next_at, now, status, error)
        logger.info(
            "webhook attempt failed event=%s url=%s attempt=%d retry_in_s=%.1f: %s",
            delivery.event_id,
            delivery.url,
            attempts,
            next_at - now,
            error,
        )
