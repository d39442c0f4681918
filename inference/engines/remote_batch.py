"""The provider batch engine (``engine.kind: openai_batch``): a job's items through a Batch API.

Items leased by this worker are written as JSONL request lines, uploaded (``POST /files``,
purpose ``batch``) and submitted as provider batches (``POST /batches``) of at most
``engine.batch.max_lines`` lines and ``max_bytes`` bytes, or whatever has gathered after
``window_s``. Each provider batch is recorded in the queue's ledger
(:mod:`inference.queue.remote`) before it is created and again with the provider's id, then
polled every ``poll_s``; when it ends, its output and error files are read back and each item
the worker holds comes back from ``step`` with its result or error. The worker commits the
results into the job's shards and the errors into its dead letters, as for any engine.

The worker keeps heartbeating its leases while a provider batch runs. When the worker dies its
items are leased again, by it or another; :meth:`OpenAIBatchEngine.submit` finds them in the
ledger and waits for their batch instead of submitting them again. That is what makes a crash
or a restart cost no second submission (see the ledger's module for the crash points).

A line the provider failed (its error file, or a non-200 status in the output) is classified
as the online engine classifies a response; an item a batch ended without (expired, cancelled)
goes back to the queue as transient, its ledger mapping dropped so that its next lease submits
it afresh.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import ray

from inference.config import EngineConfig
from inference.engines.base import Prepared
from inference.engines.remote import (
    RemoteEngine,
    auth_headers,
    parse_response,
    provider_message,
    request_body,
    take_finished,
)
from inference.errors import EngineFatalError, ItemError, PermanentError, TransientError
from inference.faults import fault
from inference.schema import Request, Result

logger = logging.getLogger(__name__)

_URLS = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    "embedding": "/v1/embeddings",
}
_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_TICK_S = 0.2  # how often the batch thread looks at what gathered
_STEP_WAIT_S = 0.2
_UNRAN = frozenset({"batch_expired", "batch_cancelled", "batch_failed"})
_LIST_PAGES = 20  # pages of 100 batches searched for one recorded before its provider id


@dataclass
class _Forming:
    """Items of one job and endpoint waiting to be sent in a provider batch."""

    items: list[Prepared] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    nbytes: int = 0
    since: float = 0.0


@dataclass
class _Open:
    """A provider batch this worker holds items of."""

    key: str
    job_id: str
    provider_id: str | None
    status: str
    items: dict[str, Prepared] = field(default_factory=dict)  # item id -> held item
    next_poll: float = 0.0


class _Fatal(Exception):
    pass


def _item_id(item: Prepared) -> str:
    return str(item.extra["item_id"])


class OpenAIBatchEngine(RemoteEngine):
    """Items through a provider's Batch API, recorded in the queue's ledger."""

    def __init__(self, config: EngineConfig, pool: str = "", queue_handle: Any = None) -> None:
        assert config.base_url is not None  # the config checks it
        self.config = config
        self.batch = config.batch
        self.pool = pool or config.model
        self.model_name = config.model
        self.max_batch_size = self.batch.max_lines * self.batch.max_open
        self.context_len = config.max_model_len or 1 << 30
        headers = auth_headers(config)
        if queue_handle is None:
            from inference.queue.actor import get_queue

            queue_handle = get_queue()
        self._queue = queue_handle
        self._http = httpx.Client(
            base_url=config.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(config.request_timeout_s, connect=30.0),
        )
        self._lock = threading.Lock()
        self._forming: dict[tuple[str, str], _Forming] = {}
        self._open: dict[str, _Open] = {}
        self._done: queue.SimpleQueue[tuple[Prepared, Result | ItemError]] = queue.SimpleQueue()
        self._fatal: str | None = None
        self._unreported: list[Prepared] = []  # finished when the engine died: not handed out
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="provider-batches", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the contract
    def in_flight(self) -> int:
        with self._lock:
            forming = sum(len(f.items) for f in self._forming.values())
            return forming + sum(len(o.items) for o in self._open.values())

    def submit(self, items: list[Prepared]) -> list[tuple[Prepared, ItemError]]:
        by_job: dict[str, list[Prepared]] = {}
        for item in items:
            by_job.setdefault(str(item.extra["job"]), []).append(item)
        for job_id, group in by_job.items():
            live = ray.get(self._queue.remote_lookup.remote(job_id, [_item_id(p) for p in group]))
            now = time.monotonic()
            with self._lock:
                for item in group:
                    record = live.get(_item_id(item))
                    if record is not None:  # already in a provider batch: wait for it
                        self._attach(record, item)
                    else:
                        self._add(job_id, item, now)
        return []

    def step(self) -> list[tuple[Prepared, Result | ItemError]]:
        finished = take_finished(self._done, _STEP_WAIT_S)
        if self._fatal is not None:
            self._unreported.extend(item for item, _ in finished)  # abort hands them back
            raise EngineFatalError(self._fatal)
        return finished

    def abort(self) -> list[Prepared]:
        with self._lock:
            held = [p for f in self._forming.values() for p in f.items]
            held += [p for o in self._open.values() for p in o.items.values()]
            self._forming.clear()
            self._open.clear()
        held += [item for item, _ in take_finished(self._done, 0.0)]
        held += self._unreported
        self._unreported = []
        return held

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._http.close()

    # ------------------------------------------------------------------ holding items
    def _attach(self, record: dict[str, Any], item: Prepared) -> None:
        key = record["key"]
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Open(
                key, record["job_id"], record["provider_id"], record["state"]
            )
        batch.items[_item_id(item)] = item

    def _add(self, job_id: str, item: Prepared, now: float) -> None:
        url = _URLS[item.request.task]
        line = json.dumps(
            {
                "custom_id": _item_id(item),
                "method": "POST",
                "url": url,
                "body": request_body(item.request, self.config.model),
            },
            separators=(",", ":"),
        ).encode()
        forming = self._forming.get((job_id, url))
        if forming is None:
            forming = self._forming[(job_id, url)] = _Forming(since=now)
        forming.items.append(item)
        forming.lines.append(line)
        forming.nbytes += len(line) + 1

    # ------------------------------------------------------------------ the batch thread
    def _run(self) -> None:
        while not self._stop.wait(_TICK_S):
            try:
                self._submit_due()
                self._poll_due()
            except _Fatal as exc:
                self._fatal = str(exc)
                return
            except Exception:  # never let the thread die: the worker would wait forever
                logger.exception("provider batch thread: a round failed; retrying")
                time.sleep(1.0)

    def _submit_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = []
            for (job_id, url), forming in list(self._forming.items()):
                full = (
                    len(forming.items) >= self.batch.max_lines
                    or forming.nbytes >= self.batch.max_bytes
                )
                if forming.items and (full or now - forming.since >= self.batch.window_s):
                    due.append((job_id, url, self._cut(job_id, url, forming)))
        for job_id, url, (items, lines) in due:
            try:
                self._send(job_id, url, items, lines)
            except Exception:
                self._regather(job_id, items)  # never lose them: they go again
                raise

    def _regather(self, job_id: str, items: list[Prepared]) -> None:
        now = time.monotonic()
        with self._lock:
            for item in items:
                self._add(job_id, item, now)

    def _cut(self, job_id: str, url: str, forming: _Forming) -> tuple[list[Prepared], list[bytes]]:
        """The first batch's worth of the gathered items (within max_lines and max_bytes);
        the rest keep gathering."""
        n, size = 0, 0
        for line in forming.lines:
            if n >= self.batch.max_lines or (n and size + len(line) + 1 > self.batch.max_bytes):
                break
            n, size = n + 1, size + len(line) + 1
        items, lines = forming.items[:n], forming.lines[:n]
        del forming.items[:n], forming.lines[:n]
        forming.nbytes -= size
        forming.since = time.monotonic()
        if not forming.items:
            del self._forming[(job_id, url)]
        return items, lines

    def _send(self, job_id: str, url: str, items: list[Prepared], lines: list[bytes]) -> None:
        """Upload, record, create, record the provider's id: in that order (the ledger's
        module says why)."""
        key = uuid.uuid4().hex
        body = b"\n".join(lines) + b"\n"
        try:
            file_id = self._upload(key, body)
        except TransientError as exc:
            logger.warning("provider batch upload failed, retrying: %s", exc)
            self._regather(job_id, items)
            time.sleep(1.0)
            return
        ids = [_item_id(p) for p in items]
        ray.get(
            self._queue.remote_record.remote(
                key, job_id, self.pool, self.config.base_url, url, file_id, ids, len(body)
            )
        )
        fault("batch_recorded")  # crash tests: recorded, not created
        batch = _Open(key, job_id, None, "created", {_item_id(p): p for p in items})
        with self._lock:
            self._open[key] = batch
        self._create(batch, file_id, url)

    def _create(self, batch: _Open, file_id: str, url: str) -> None:
        try:
            data = self._request(
                "POST",
                "batches",
                json={
                    "input_file_id": file_id,
                    "endpoint": url,
                    "completion_window": self.batch.completion_window,
                    "metadata": {"inference_batch": batch.key, "inference_job": batch.job_id},
                },
            )
        except TransientError as exc:
            logger.warning("provider batch %s: create failed, retrying: %s", batch.key, exc)
            return  # still 'created': the next poll looks it up and creates it
        except PermanentError as exc:
            self._end(batch, "failed", {}, f"the provider refused the batch: {exc.message}")
            return
        fault("batch_created")  # crash tests: created, its id not recorded
        self._submitted(batch, data)

    def _submitted(self, batch: _Open, data: dict[str, Any]) -> None:
        batch.provider_id = str(data["id"])
        batch.status = str(data.get("status", "validating"))
        batch.next_poll = time.monotonic() + self.batch.poll_s
        ray.get(
            self._queue.remote_update.remote(
                batch.key,
                provider_id=batch.provider_id,
                state="submitted",
                status=batch.status,
                counts=data.get("request_counts"),
            )
        )
        logger.info(
            "provider batch %s submitted: %s (%d items)",
            batch.key,
            batch.provider_id,
            len(batch.items),
        )

    def _poll_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [b for b in self._open.values() if b.next_poll <= now]
        for batch in due:
            batch.next_poll = now + self.batch.poll_s
            if batch.provider_id is None:
                self._adopt_or_create(batch)
                continue
            try:
                data = self._request("GET", f"batches/{batch.provider_id}")
            except (TransientError, PermanentError) as exc:
                logger.warning("provider batch %s: poll failed: %s", batch.provider_id, exc)
                continue
            status = str(data.get("status"))
            if status != batch.status:
                batch.status = status
                ray.get(
                    self._queue.remote_update.remote(
                        batch.key, status=status, counts=data.get("request_counts")
                    )
                )
            if status in _TERMINAL:
                self._finish(batch, data)

    def _adopt_or_create(self, batch: _Open) -> None:
        """A batch recorded before its provider id: find it by its metadata (created before a
        crash), else create it now."""
        record = ray.get(self._queue.remote_batches.remote(batch.job_id))
        mine = next((r for r in record if r["key"] == batch.key), None)
        if mine is None:
            return
        if mine["provider_id"]:
            batch.provider_id = mine["provider_id"]
            return
        after: str | None = None
        for _ in range(_LIST_PAGES):
            params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
            try:
                page = self._request("GET", "batches", params=params)
            except (TransientError, PermanentError) as exc:
                logger.warning("provider batch %s: listing failed: %s", batch.key, exc)
                return
            for data in page.get("data", []):
                if (data.get("metadata") or {}).get("inference_batch") == batch.key:
                    self._submitted(batch, data)
                    return
            if not page.get("has_more") or not page.get("data"):
                break
            after = page["data"][-1]["id"]
        self._create(batch, mine["input_file_id"], mine["url"])

    # ------------------------------------------------------------------ results
    def _finish(self, batch: _Open, data: dict[str, Any]) -> None:
        lines: dict[str, dict[str, Any]] = {}
        for name in ("output_file_id", "error_file_id"):
            file_id = data.get(name)
            if not file_id:
                continue
            try:
                text = self._content(str(file_id))
            except TransientError as exc:
                logger.warning("provider batch %s: cannot read %s: %s", batch.key, name, exc)
                batch.next_poll = time.monotonic() + self.batch.poll_s
                return  # read it at the next poll
            except PermanentError as exc:  # gone (expired, deleted): its items go again
                logger.warning("provider batch %s: %s is gone: %s", batch.key, name, exc)
                continue
            for raw in text.splitlines():
                if raw.strip():
                    line = json.loads(raw)
                    lines[str(line.get("custom_id"))] = line
        status = str(data["status"])
        state = "failed" if status == "failed" and not lines else "completed"
        files = {k: data.get(k) for k in ("output_file_id", "error_file_id")}
        reason = _batch_errors(data) or f"the provider batch ended {status}"
        self._end(batch, state, lines, reason, files)

    def _end(
        self,
        batch: _Open,
        state: str,
        lines: dict[str, dict[str, Any]],
        reason: str,
        files: dict[str, Any] | None = None,
    ) -> None:
        """Hand each held item its line's outcome; drop the mappings of those that must be
        submitted again."""
        ray.get(self._queue.remote_update.remote(batch.key, state=state, **(files or {})))
        with self._lock:
            self._open.pop(batch.key, None)
        again: list[str] = []
        for item_id, item in batch.items.items():
            line = lines.get(item_id)
            outcome = (
                _line_outcome(item.request, line)
                if line is not None
                else TransientError(f"{reason} before this item ran", "batch_incomplete")
            )
            if isinstance(outcome, ItemError):
                again.append(item_id)
            self._done.put((item, outcome))
        if again:
            ray.get(self._queue.remote_forget.remote(batch.job_id, again, batch.key))
        logger.info(
            "provider batch %s %s: %d results, %d errors",
            batch.provider_id or batch.key,
            state,
            len(batch.items) - len(again),
            len(again),
        )

    # ------------------------------------------------------------------ HTTP
    def _upload(self, key: str, body: bytes) -> str:
        data = self._request(
            "POST",
            "files",
            files={"file": (f"batch-{key}.jsonl", body, "application/jsonl")},
            data={"purpose": "batch"},
        )
        return str(data["id"])

    def _content(self, file_id: str) -> str:
        response = self._send_http("GET", f"files/{file_id}/content")
        return response.text

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._send_http(method, path, **kwargs)
        try:
            data = response.json()
        except ValueError as exc:
            raise TransientError(f"unreadable answer to {method} {path}", "bad_response") from exc
        if not isinstance(data, dict):
            raise TransientError(f"unreadable answer to {method} {path}", "bad_response")
        return data

    def _send_http(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise TransientError(f"{method} {path}: {exc!r}", "connection_error") from exc
        status = response.status_code
        if status < 300:
            return response
        message = provider_message(response)
        if status in (401, 403):
            raise _Fatal(f"HTTP {status} from {self.config.base_url}: {message}")
        if status in (408, 409, 429) or status >= 500:
            raise TransientError(f"{method} {path}: HTTP {status}: {message}", f"http_{status}")
        raise PermanentError(f"{method} {path}: HTTP {status}: {message}", f"http_{status}")


def _batch_errors(data: dict[str, Any]) -> str:
    errors = (data.get("errors") or {}).get("data") or []
    return "; ".join(str(e.get("message", e)) for e in errors[:3])


def _line_outcome(request: Request, line: dict[str, Any]) -> Result | ItemError:
    """One line of a provider batch's output or error file as the item's outcome."""
    response = line.get("response") or {}
    status = int(response.get("status_code") or 0)
    body = response.get("body") or {}
    if status == 200 and not line.get("error"):
        try:
            return parse_response(request, body)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            return TransientError(f"unreadable result line: {exc!r}", "bad_response")
    error = line.get("error") or (body.get("error") if isinstance(body, dict) else None) or {}
    if not isinstance(error, dict):
        error = {"message": str(error)}
    message = str(error.get("message") or "failed")
    if status:
        code = f"http_{status}"
        if status in (408, 409, 429) or status >= 500:
            return TransientError(f"provider batch line: HTTP {status}: {message}", code)
        return PermanentError(f"provider batch line: HTTP {status}: {message}", code)
    code = str(error.get("code") or "batch_error")
    if code in _UNRAN:  # the line never ran: submit it again
        return TransientError(f"provider batch line: {message}", code)
    return PermanentError(f"provider batch line: {message}", code)
