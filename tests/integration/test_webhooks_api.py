"""Signed webhooks end to end: a real server (uvicorn in a thread) over the shared local Ray
cluster with a real Controller delivering to real HTTP receivers on loopback. The official
``openai`` client runs the batches and verifies what the receivers got (``webhooks.unwrap``).

Two endpoints for the whole module: ``receiver`` (answers 500 to as many requests as a test
asks, then 200; stopped and started again to play a receiver that is down) and ``hanging``
(never answers within the attempt timeout), so every test also shows that a hanging receiver
holds back neither the jobs nor the other endpoint."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai.types.webhooks import BatchCancelledWebhookEvent, BatchCompletedWebhookEvent

from inference.config import Config
from tests.support.api_server import SLOW, TOKEN, _jsonl, _line, api_config, live_server
from tests.support.api_server import wait_batch as _wait_batch
from tests.support.webhook_receiver import Receiver

SECRET_ENV = "INFERENCE_TEST_WEBHOOK_SECRET"
SECRET = "whsec_" + base64.b64encode(b"integration-webhook-secret-0123").decode()
# The Controller reads secrets from its own environment: the Ray processes inherit this one's,
# as the shared cluster starts after the modules are imported.
os.environ.setdefault(SECRET_ENV, SECRET)
HANG_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture(scope="module")
def hanging() -> Iterator[Receiver]:
    with Receiver(hang=True) as r:
        yield r


@pytest.fixture(scope="module")
def services(
    ray_cluster: Path,
    queue_db: Path,
    tmp_path_factory: pytest.TempPathFactory,
    receiver: Receiver,
    hanging: Receiver,
) -> Iterator[tuple[Config, Any]]:
    import ray

    from inference.api.server import state_dir
    from inference.controller import get_controller, get_or_create_controller
    from inference.queue.actor import get_or_create_queue
    from inference.runner import queue_db_path
    from inference.webhooks import WebhookSettings

    assert os.environ[SECRET_ENV] == SECRET
    hooks = [{"url": r.url, "secret_env": SECRET_ENV} for r in (receiver, hanging)]
    config = api_config(
        tmp_path_factory.mktemp("hooks"),
        queue_db,
        tokens=[TOKEN],
        webhooks=hooks,
        webhook_backoff_s=0.2,
        webhook_timeout_s=HANG_TIMEOUT_S,
    )
    queue = get_or_create_queue(queue_db_path(config, config.output.path))
    get_or_create_controller(state_dir(config), WebhookSettings.from_api(config.api))
    try:
        yield config, queue
    finally:
        controller = get_controller()  # a test may have replaced it
        hanging.stop()
        ray.get(controller.shutdown.remote(), timeout=120)
        ray.kill(controller, no_restart=True)


@pytest.fixture(scope="module")
def server(services: tuple[Config, Any]) -> Iterator[str]:
    from inference.api.app import create_app
    from inference.controller import get_controller

    config, queue = services
    with live_server(create_app(config, queue, get_controller())) as url:
        yield url


def _batch(client: Any, tmp_path: Path, n: int, **body: Any) -> Any:
    path = _jsonl(tmp_path / "in.jsonl", [_line(f"w-{i}", **body) for i in range(n)])
    f = client.files.create(file=path.open("rb"), purpose="batch")
    return client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


def wait_batch(client: Any, batch_id: str, timeout_s: float = 120) -> Any:
    return _wait_batch(client, batch_id, timeout_s)


def test_a_completed_batch_is_delivered_signed_after_two_failed_attempts(
    client: Any, http: httpx.Client, receiver: Receiver, hanging: Receiver, tmp_path: Path
) -> None:
    receiver.fail_next = 2
    batch = wait_batch(client, _batch(client, tmp_path, 3).id)
    assert batch.status == "completed"
    got = receiver.wait_for(1, job=batch.id)[0]
    tries = receiver.of(batch.id)
    assert [t.status for t in tries] == [500, 500, 200]
    assert {t.headers["webhook-id"] for t in tries} == {got.headers["webhook-id"]}
    assert len({t.headers["webhook-timestamp"] for t in tries}) >= 1
    event = client.webhooks.unwrap(got.body, got.headers, secret=SECRET)
    assert isinstance(event, BatchCompletedWebhookEvent)
    assert event.id == got.headers["webhook-id"] and event.data.id == batch.id
    assert event.created_at >= batch.completed_at - 1
    # Seen in /metrics (the server's view of the Controller is at most a second old) and on
    # the dashboard's state.
    deadline = time.monotonic() + 10
    while _deliveries(metrics := http.get("/metrics").text, "delivered") < 1:
        assert time.monotonic() < deadline, "no delivery in /metrics"
        time.sleep(0.3)
    assert _deliveries(metrics, "failed") >= 2
    assert "inference_webhook_undelivered " in metrics
    hooks = http.get("/v1/dashboard/state").json()["webhooks"]
    mine = [d for d in hooks["recent"] if d["job_id"] == batch.id and d["url"] == receiver.url]
    assert mine and mine[0]["state"] == "delivered" and mine[0]["attempts"] == 3
    assert hooks["endpoints"] == 2


def test_a_hanging_receiver_does_not_delay_a_batch_reaching_completed(
    client: Any, receiver: Receiver, hanging: Receiver, tmp_path: Path
) -> None:
    # The hanging endpoint holds an attempt open (an earlier test's event, or this one's) ...
    first = wait_batch(client, _batch(client, tmp_path, 1).id)
    deadline = time.monotonic() + 30
    while not hanging.arrivals:
        assert time.monotonic() < deadline, "the hanging receiver got nothing"
        time.sleep(0.05)
    held_since = hanging.arrivals[-1]
    # ... for HANG_TIMEOUT_S: a whole batch runs, completes and is delivered meanwhile.
    second = wait_batch(client, _batch(client, tmp_path, 2).id)
    assert (first.status, second.status) == ("completed", "completed")
    receiver.wait_for(1, job=second.id)
    assert time.monotonic() < held_since + HANG_TIMEOUT_S, "the hung attempt had ended"
    assert hanging.received == []  # it answered nothing


def test_a_cancelled_batch_gives_batch_cancelled(
    client: Any, receiver: Receiver, tmp_path: Path
) -> None:
    batch = _batch(client, tmp_path, 100, max_tokens=SLOW)
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).status != "in_progress":  # its lines are queued
        assert time.monotonic() < deadline
        time.sleep(0.1)
    client.batches.cancel(batch.id)
    batch = wait_batch(client, batch.id)
    assert batch.status == "cancelled"
    got = receiver.wait_for(1, job=batch.id)
    event = client.webhooks.unwrap(got[0].body, got[0].headers, secret=SECRET)
    assert isinstance(event, BatchCancelledWebhookEvent) and event.data.id == batch.id
    assert len(got) == 1


def test_a_native_job_completion_gives_job_completed(
    client: Any, http: httpx.Client, receiver: Receiver
) -> None:
    job = f"hook-{int(time.time() * 1000) % 10**8}"
    assert http.post("/v1/jobs", json={"job_id": job}).status_code == 200
    items = [
        {"custom_id": f"n-{i}", "url": "/v1/chat/completions", "body": _line("x")["body"]}
        for i in range(2)
    ]
    assert http.post(f"/v1/jobs/{job}/items", json={"items": items}).status_code == 200
    got = receiver.wait_for(1, timeout_s=90, job=job)[0]
    client.webhooks.verify_signature(got.body, got.headers, secret=SECRET)
    payload = json.loads(got.body)
    assert payload["type"] == "job.completed" and payload["object"] == "event"
    assert payload["id"] == got.headers["webhook-id"] and payload["data"] == {"id": job}
    assert http.get(f"/v1/jobs/{job}").json()["status"] == "completed"


def test_a_controller_restart_between_the_event_and_its_delivery_still_delivers(
    client: Any, services: tuple[Config, Any], receiver: Receiver, tmp_path: Path
) -> None:
    import ray

    from inference.api.server import state_dir
    from inference.controller import get_controller, get_or_create_controller
    from inference.webhooks import WebhookSettings

    config = services[0]
    receiver.stop()  # down: the event stays due
    batch = wait_batch(client, _batch(client, tmp_path, 1).id)
    assert batch.status == "completed"
    old = get_controller()
    deadline = time.monotonic() + 30
    while not (due := _due(ray.get(old.snapshot.remote()), batch.id, receiver.url)):
        assert time.monotonic() < deadline, "no failed attempt recorded"
        time.sleep(0.1)
    ray.kill(old, no_restart=True)
    new = get_or_create_controller(state_dir(config), WebhookSettings.from_api(config.api))
    assert _due(ray.get(new.snapshot.remote()), batch.id, receiver.url)
    receiver.start()
    got = receiver.wait_for(1, job=batch.id)
    assert got[0].headers["webhook-id"] == due["event_id"]
    event = client.webhooks.unwrap(got[0].body, got[0].headers, secret=SECRET)
    assert isinstance(event, BatchCompletedWebhookEvent) and event.data.id == batch.id


def _due(snapshot: dict[str, Any], job: str, url: str) -> dict[str, Any] | None:
    for d in snapshot["webhooks"]["recent"]:
        if d["job_id"] == job and d["url"] == url and d["state"] == "due":
            return dict(d)
    return None


def _deliveries(metrics: str, outcome: str, kind: str = "batch.completed") -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "inference_webhook_deliveries_total" and sample.labels == {
                "type": kind,
                "outcome": outcome,
            }:
                return float(sample.value)
    return 0.0
