"""Webhooks without Ray: Standard Webhooks signatures checked by the official openai client,
OpenAI's event shapes, config errors, the backoff bound, and the deliverer against a real
loopback receiver over a real SQLite outbox."""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from openai import InvalidWebhookSignatureError, OpenAI
from openai.types.webhooks import (
    BatchCancelledWebhookEvent,
    BatchCompletedWebhookEvent,
    BatchExpiredWebhookEvent,
    BatchFailedWebhookEvent,
)

from inference.config import WEBHOOK_EVENTS, ApiConfig, WebhookEndpoint, parse_config
from inference.errors import ConfigError
from inference.webhooks import (
    MAX_BACKOFF_S,
    Deliverer,
    Outbox,
    WebhookSettings,
    event_payload,
    insert_rows,
    load_secrets,
    next_attempt_at,
    parse_secret,
    signed_headers,
)
from tests.support.webhook_receiver import Receiver

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
client = OpenAI(api_key="x")


def _signed(secret: str, payload: dict, timestamp: int | None = None) -> tuple[bytes, dict]:
    body = json.dumps(payload).encode()
    ts = int(time.time()) if timestamp is None else timestamp
    return body, signed_headers(parse_secret(secret), payload["id"], ts, body)


@pytest.mark.parametrize("secret", [SECRET, "a-raw-secret-string"])
def test_signature_is_accepted_by_the_openai_client(secret: str) -> None:
    payload = event_payload("batch", "batch_abc", "completed", int(time.time()))
    body, headers = _signed(secret, payload)
    event = client.webhooks.unwrap(body, headers, secret=secret)
    assert isinstance(event, BatchCompletedWebhookEvent)
    assert event.id == headers["webhook-id"] == payload["id"]
    assert event.data.id == "batch_abc"
    assert event.object == "event"


def test_tampered_body_wrong_secret_and_stale_timestamp_are_refused() -> None:
    payload = event_payload("batch", "batch_abc", "completed", int(time.time()))
    body, headers = _signed(SECRET, payload)
    with pytest.raises(InvalidWebhookSignatureError):
        client.webhooks.unwrap(body.replace(b"batch_abc", b"batch_xyz"), headers, secret=SECRET)
    with pytest.raises(InvalidWebhookSignatureError):
        client.webhooks.unwrap(body, headers, secret="whsec_" + base64.b64encode(b"other").decode())
    stale_body, stale = _signed(SECRET, payload, int(time.time()) - 600)
    with pytest.raises(InvalidWebhookSignatureError, match="too old"):
        client.webhooks.unwrap(stale_body, stale, secret=SECRET)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        ("completed", BatchCompletedWebhookEvent),
        ("failed", BatchFailedWebhookEvent),
        ("expired", BatchExpiredWebhookEvent),
        ("cancelled", BatchCancelledWebhookEvent),
    ],
)
def test_payloads_parse_as_openai_event_types(status: str, cls: type) -> None:
    batch = cls.model_validate(event_payload("batch", "batch_1", status, 1_700_000_000))
    assert (batch.type, batch.data.id, batch.created_at) == (f"batch.{status}", "batch_1", 1.7e9)
    native = event_payload("native", "job_1", status, 1_700_000_000)
    assert native["type"] == f"job.{status}" and native["type"] in WEBHOOK_EVENTS
    # The same shape: only the type differs from the batch event's.
    cls.model_validate({**native, "type": f"batch.{status}"}, strict=True)
    assert native["id"].startswith("evt_") and native["id"] != batch.id


def test_config_refuses_bad_urls_events_and_duplicates() -> None:
    def api(*hooks: dict) -> None:
        parse_config({"api": {"webhooks": list(hooks)}}, "server.yaml")

    with pytest.raises(ConfigError, match=r"api\.webhooks\.0.*'ftp://h/x'.*http"):
        api({"url": "ftp://h/x", "secret_env": "S"})
    with pytest.raises(ConfigError, match=r"api\.webhooks\.1.*name a host"):
        api({"url": "https://ok/x", "secret_env": "S"}, {"url": "http:///x", "secret_env": "S"})
    with pytest.raises(ConfigError, match=r"events \['batch.done'\]"):
        api({"url": "https://ok/x", "secret_env": "S", "events": ["batch.done"]})
    with pytest.raises(ConfigError, match="secret_env 'not-a-name'"):
        api({"url": "https://ok/x", "secret_env": "not-a-name"})
    with pytest.raises(ConfigError, match="each url may be listed once"):
        api({"url": "https://ok/x", "secret_env": "S"}, {"url": "https://ok/x", "secret_env": "T"})
    with pytest.raises(ConfigError, match=r"api\.webhooks\.0\.extra"):
        api({"url": "https://ok/x", "secret_env": "S", "extra": 1})
    config = parse_config({"api": {"webhooks": [{"url": "https://ok/x", "secret_env": "S"}]}})
    assert config.api.webhooks[0].events == list(WEBHOOK_EVENTS)


def test_a_missing_or_bad_secret_names_the_variable() -> None:
    hooks = [WebhookEndpoint(url="https://ok/x", secret_env="HOOK_SECRET")]
    with pytest.raises(
        ConfigError, match=r"api\.webhooks\.0 \(https://ok/x\).*HOOK_SECRET.*not set"
    ):
        load_secrets(hooks, {})
    with pytest.raises(
        ConfigError, match="HOOK_SECRET: a whsec_ secret must be followed by base64"
    ):
        load_secrets(hooks, {"HOOK_SECRET": "whsec_not*base64"})
    with pytest.raises(ConfigError, match="empty"):
        load_secrets(hooks, {"HOOK_SECRET": "whsec_"})
    assert load_secrets(hooks, {"HOOK_SECRET": SECRET}) == {"https://ok/x": b"0123456789abcdef" * 2}


def test_backoff_doubles_with_jitter_and_never_passes_the_retry_bound() -> None:
    lo = [next_attempt_at(n, 0.0, 0.0, 5.0, 1e9, lambda: 0.0) for n in range(1, 5)]
    hi = [next_attempt_at(n, 0.0, 0.0, 5.0, 1e9, lambda: 1.0) for n in range(1, 5)]
    assert lo == [2.5, 5.0, 10.0, 20.0] and hi == [5.0, 10.0, 20.0, 40.0]
    assert next_attempt_at(40, 0.0, 0.0, 5.0, 1e9, lambda: 1.0) == MAX_BACKOFF_S
    # The last attempt falls on the bound; after it, give up.
    assert next_attempt_at(3, 100.0, 195.0, 5.0, 100.0, lambda: 1.0) == 200.0
    assert next_attempt_at(4, 100.0, 200.0, 5.0, 100.0) is None
    # With 72 h (as OpenAI) and the defaults, attempts are bounded (about 100: 45 min apart).
    now, attempts = 0.0, 1
    while (at := next_attempt_at(attempts, 0.0, now, 5.0, 72 * 3600.0, lambda: 0.5)) is not None:
        now, attempts = at, attempts + 1
    assert 90 < attempts < 120 and now == 72 * 3600.0


def _outbox(path: Path) -> Outbox:
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    return Outbox(db, threading.Lock())


def _deliverer(outbox: Outbox, urls: list[str], **settings: float) -> Deliverer:
    hooks = tuple(WebhookEndpoint(url=u, secret_env="S") for u in urls)
    return Deliverer(
        outbox, WebhookSettings(hooks, **settings), {u: parse_secret(SECRET) for u in urls}
    )


def _stage(outbox: Outbox, deliverer: Deliverer, kind: str, job_id: str, status: str) -> list:
    rows = deliverer.rows(kind, job_id, status)
    with outbox._lock:
        insert_rows(outbox._db, rows)
    deliverer.wake()
    return rows


def _wait(predicate, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_failed_deliveries_are_retried_with_the_same_id_until_delivered(tmp_path: Path) -> None:
    outbox = _outbox(tmp_path / "c.sqlite")
    with Receiver(fail_next=2) as receiver:
        deliverer = _deliverer(outbox, [receiver.url], backoff_s=0.05, retry_s=60)
        deliverer.start()
        try:
            rows = _stage(outbox, deliverer, "batch", "batch_1", "completed")
            got = receiver.wait_for(1)
        finally:
            deliverer.stop()
    assert [r.status for r in receiver.received] == [500, 500, 200]
    assert {r.headers["webhook-id"] for r in receiver.received} == {rows[0][0]}
    event = client.webhooks.unwrap(got[0].body, got[0].headers, secret=SECRET)
    assert isinstance(event, BatchCompletedWebhookEvent) and event.data.id == "batch_1"
    snap = deliverer.snapshot()
    counts = {(c["type"], c["outcome"]): c["n"] for c in snap["deliveries"]}
    assert counts == {("batch.completed", "failed"): 2, ("batch.completed", "delivered"): 1}
    assert snap["undelivered"] == 0
    assert snap["recent"][0]["state"] == "delivered" and snap["recent"][0]["attempts"] == 3


def test_an_endpoint_only_gets_the_events_it_names(tmp_path: Path) -> None:
    outbox = _outbox(tmp_path / "c.sqlite")
    hooks = (
        WebhookEndpoint(url="http://127.0.0.1:9/a", secret_env="S", events=["job.failed"]),
        WebhookEndpoint(url="http://127.0.0.1:9/b", secret_env="S"),
    )
    keys = {h.url: b"k" for h in hooks}
    deliverer = Deliverer(outbox, WebhookSettings(hooks), keys)
    assert [r[1] for r in deliverer.rows("native", "j", "failed")] == [h.url for h in hooks]
    assert [r[1] for r in deliverer.rows("native", "j", "completed")] == [hooks[1].url]
    assert Deliverer(outbox, WebhookSettings(), {}).rows("batch", "b", "completed") == []


def test_a_delivery_is_given_up_after_the_retry_time_and_kept(tmp_path: Path) -> None:
    outbox = _outbox(tmp_path / "c.sqlite")
    with Receiver(fail_next=1000) as receiver:
        deliverer = _deliverer(outbox, [receiver.url], backoff_s=0.05, retry_s=0.6)
        deliverer.start()
        try:
            _stage(outbox, deliverer, "native", "job_1", "failed")
            _wait(
                lambda: (
                    deliverer.snapshot()["recent"][:1]
                    and deliverer.snapshot()["recent"][0]["state"] == "given_up"
                )
            )
        finally:
            deliverer.stop()
    snap = deliverer.snapshot()
    counts = {(c["type"], c["outcome"]): c["n"] for c in snap["deliveries"]}
    assert counts[("job.failed", "given_up")] == 1
    assert counts[("job.failed", "failed")] == len(receiver.received) >= 2
    assert snap["recent"][0]["error"] == "HTTP 500" and snap["undelivered"] == 0


def test_the_janitor_prunes_old_settled_rows_and_never_a_due_one(tmp_path: Path) -> None:
    outbox = _outbox(tmp_path / "c.sqlite")
    hooks = (WebhookEndpoint(url="http://127.0.0.1:9/a", secret_env="S"),)
    deliverer = Deliverer(outbox, WebhookSettings(hooks), {hooks[0].url: b"k"})
    for job in ("old-done", "old-given-up", "new-done", "old-due"):
        _stage(outbox, deliverer, "native", job, "completed")
    seq = {d.job_id: d.seq for d in outbox.due(hooks[0].url, now=time.time() + 10)}
    outbox.record(seq["old-done"], "delivered", 1, 0, 100.0, 200, None)
    outbox.record(seq["old-given-up"], "given_up", 9, 0, 100.0, 500, "HTTP 500")
    outbox.record(seq["new-done"], "delivered", 1, 0, 5000.0, 200, None)
    outbox.record(seq["old-due"], "due", 3, 6000.0, 100.0, 500, "HTTP 500")  # still retrying
    assert outbox.prune(before=1000.0) == 2
    left = {row["job_id"]: row["state"] for row in outbox.recent()}
    assert left == {"new-done": "delivered", "old-due": "due"}
    assert outbox.undelivered() == 1 and outbox.prune(before=1000.0) == 0


def test_due_deliveries_survive_a_restart_and_are_delivered(tmp_path: Path) -> None:
    """A deliverer that stopped while its receiver was down: a new one on the same database
    delivers what was due (at least once, with the event's id)."""
    receiver = Receiver()
    first = _deliverer(_outbox(tmp_path / "c.sqlite"), [receiver.url], backoff_s=0.05, retry_s=60)
    first.start()
    rows = _stage(first._outbox, first, "batch", "batch_2", "cancelled")
    _wait(lambda: first.snapshot()["recent"] != [])  # one attempt failed: nobody listens
    first.stop()
    assert first.snapshot()["undelivered"] == 1
    second = _deliverer(_outbox(tmp_path / "c.sqlite"), [receiver.url], backoff_s=0.05, retry_s=60)
    with receiver:
        second.start()
        try:
            got = receiver.wait_for(1)
        finally:
            second.stop()
    assert got[0].headers["webhook-id"] == rows[0][0]
    event = client.webhooks.unwrap(got[0].body, got[0].headers, secret=SECRET)
    assert isinstance(event, BatchCancelledWebhookEvent)
    assert second.snapshot()["undelivered"] == 0


def test_a_hanging_receiver_times_out_and_does_not_hold_other_endpoints(tmp_path: Path) -> None:
    outbox = _outbox(tmp_path / "c.sqlite")
    with Receiver(hang=True) as hanging, Receiver() as fine:
        deliverer = _deliverer(
            outbox, [hanging.url, fine.url], backoff_s=0.05, retry_s=60, timeout_s=0.5
        )
        deliverer.start()
        try:
            started = time.monotonic()
            _stage(outbox, deliverer, "native", "job_3", "completed")
            fine.wait_for(1, timeout_s=5)
            assert time.monotonic() - started < 2
            _wait(
                lambda: any(
                    r["error"] and "Timeout" in r["error"] for r in deliverer.snapshot()["recent"]
                )
            )
        finally:
            deliverer.stop(timeout_s=1)


def test_endpoints_dropped_from_the_config_are_given_up_at_start(tmp_path: Path) -> None:
    outbox = _outbox(tmp_path / "c.sqlite")
    old = _deliverer(outbox, ["http://127.0.0.1:9/old"])
    _stage(outbox, old, "batch", "batch_3", "failed")
    new = _deliverer(outbox, ["http://127.0.0.1:9/new"])
    new.start()
    new.stop()
    recent = new.snapshot()["recent"]
    assert recent[0]["state"] == "given_up" and "no longer in api.webhooks" in recent[0]["error"]


def test_api_config_defaults_bound_the_retries() -> None:
    api = ApiConfig()
    settings = WebhookSettings.from_api(api)
    assert settings.endpoints == () and settings.retry_s == 72 * 3600 and settings.timeout_s == 10


def test_the_controller_refuses_to_start_without_its_secret(tmp_path: Path) -> None:
    from inference.controller import Controller

    hooks = (WebhookEndpoint(url="https://ok/x", secret_env="INFERENCE_UNSET_HOOK_SECRET"),)
    with pytest.raises(ConfigError, match="INFERENCE_UNSET_HOOK_SECRET, which is not set"):
        Controller(str(tmp_path), WebhookSettings(hooks))
    assert not (tmp_path / "controller.sqlite").exists()  # refused before taking the state
