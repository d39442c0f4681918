"""The HTTP API on a real uvicorn server (in a thread of this process) over the shared local Ray
cluster: the real WorkQueue and store, a real Controller, the tiny model. The official ``openai``
client drives the OpenAI-compatible endpoints; httpx drives the native ones."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.api_server import (
    SLOW,
    TOKEN,
    _jsonl,
    _line,
    api_config,
    cluster_services,
    live_server,
    read_lines,
    wait_batch,
)


@pytest.fixture(scope="module")
def services(ray_cluster: Path, queue_db: Path, tmp_path_factory: pytest.TempPathFactory):
    config = api_config(tmp_path_factory.mktemp("api"), queue_db, tokens=[TOKEN])
    with cluster_services(config) as (queue, controller):
        yield config, queue, controller


# ------------------------------------------------------------------------------ OpenAI batches
def test_openai_client_runs_a_batch_to_completed_with_every_line_answered_once(
    client: Any, tmp_path: Path
) -> None:
    import openai

    ids = [f"req-{i}" for i in range(40)]
    lines = [_line(cid) for cid in ids[:30]] + [_line(cid, "/v1/completions") for cid in ids[30:]]
    chat = _jsonl(tmp_path / "chat.jsonl", [ln for ln in lines if "messages" in ln["body"]])
    uploaded = client.files.create(file=chat.open("rb"), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == chat.stat().st_size
    assert client.files.retrieve(uploaded.id).filename == "chat.jsonl"
    assert client.files.content(uploaded.id).content == chat.read_bytes()

    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"team": "search"},
    )
    assert batch.status == "validating" and batch.metadata == {"team": "search"}
    batch = wait_batch(client, batch.id)
    assert batch.status == "completed", batch.errors
    assert (batch.request_counts.total, batch.request_counts.completed) == (30, 30)
    assert batch.request_counts.failed == 0 and batch.error_file_id is None
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert batch.expires_at == batch.created_at + 24 * 3600
    output = read_lines(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in output) == sorted(ids[:30])  # each exactly once
    for line in output:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == "tiny-llama"
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["usage"]["completion_tokens"] >= 1
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"

    assert uploaded.id in [f.id for f in client.files.list(purpose="batch")]
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)

    completions = _jsonl(tmp_path / "cmpl.jsonl", lines[30:])
    f = client.files.create(file=completions.open("rb"), purpose="batch")
    done = wait_batch(
        client,
        client.batches.create(
            input_file_id=f.id, endpoint="/v1/completions", completion_window="24h"
        ).id,
    )
    output = read_lines(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in output) == sorted(ids[30:])
    assert {o["response"]["body"]["object"] for o in output} == {"text_completion"}


def test_requests_the_model_refuses_get_error_lines_and_the_rest_complete(
    client: Any, tmp_path: Path
) -> None:
    path = _jsonl(
        tmp_path / "mixed.jsonl",
        [
            _line("ok-1"),
            _line("tools", tools=[{"type": "function", "function": {"name": "f"}}]),
            _line("too-long", max_tokens=4000),  # over the tiny model's 2048-token context
            _line("ok-2"),
        ],
    )
    f = client.files.create(file=path.open("rb"), purpose="batch")
    batch = wait_batch(
        client,
        client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id,
    )
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 2)
    assert sorted(o["custom_id"] for o in read_lines(client, batch.output_file_id)) == [
        "ok-1",
        "ok-2",
    ]
    errors = {e["custom_id"]: e for e in read_lines(client, batch.error_file_id)}
    assert set(errors) == {"tools", "too-long"}
    for line in errors.values():
        assert line["response"]["status_code"] == 400 and line["error"] is None
        assert line["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert errors["tools"]["response"]["body"]["error"]["code"] == "unsupported"
    assert errors["too-long"]["response"]["body"]["error"]["code"] == "context_length_exceeded"


def test_a_file_with_bad_lines_fails_validation_naming_each_line_and_enqueues_nothing(
    client: Any, services: Any, tmp_path: Path
) -> None:
    import ray

    _, queue, _ = services
    path = _jsonl(
        tmp_path / "bad.jsonl",
        [
            _line("fine"),
            '{"custom_id": "broken", "body": ',
            {"method": "POST", "url": "/v1/chat/completions", "body": {}},
            _line("other-endpoint", "/v1/embeddings"),
            _line("fine"),
            {**_line("bad-role"), "body": {"messages": [{"role": "robot", "content": "x"}]}},
            _line("greedy", max_tokens=10**6),
        ],
    )
    f = client.files.create(file=path.open("rb"), purpose="batch")
    batch = wait_batch(
        client,
        client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id,
    )
    assert batch.status == "failed" and batch.failed_at
    found = {(e.line, e.code, e.param) for e in batch.errors.data}
    assert found == {
        (2, "invalid_json_line", None),
        (3, "missing_required_parameter", "custom_id"),
        (4, "mismatched_endpoint", "url"),
        (5, "duplicate_custom_id", "custom_id"),
        (6, "invalid_request", "body.messages[0].role"),
        (7, "invalid_request", "body.max_tokens"),
    }
    assert all(e.message for e in batch.errors.data)
    assert batch.output_file_id is None and batch.request_counts.total == 0
    assert batch.id not in ray.get(queue.stats.remote())["jobs"]


def test_upload_refuses_what_the_batch_api_refuses(client: Any, tmp_path: Path) -> None:
    import openai

    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=text.open("rb"), purpose="batch")
    assert "jsonl" in info.value.message
    jsonl = _jsonl(tmp_path / "in.jsonl", [_line("a")])
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=jsonl.open("rb"), purpose="assistants")
    assert info.value.body["param"] == "purpose"
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(
            input_file_id="file-x",
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_body={"priority": "high"},
        )
    assert info.value.body["param"] == "priority"


def test_batches_list_newest_first_in_pages(client: Any, tmp_path: Path) -> None:
    f = client.files.create(file=_jsonl(tmp_path / "x.jsonl", ["{"]).open("rb"), purpose="batch")
    made = [
        client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for _ in range(3)
    ]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    second = client.batches.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == made[0]
    every = [b.id for b in client.batches.list(limit=1)]  # auto-pagination follows `after`
    assert every[:3] == made[::-1] and len(every) == len(set(every))


def test_cancel_keeps_results_and_gives_every_other_line_a_cancelled_error(
    client: Any, tmp_path: Path
) -> None:
    ids = [f"c-{i}" for i in range(200)]
    path = _jsonl(tmp_path / "big.jsonl", [_line(cid, max_tokens=SLOW) for cid in ids])
    f = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).request_counts.completed == 0:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    batch = wait_batch(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    done = [o["custom_id"] for o in read_lines(client, batch.output_file_id)]
    errors = read_lines(client, batch.error_file_id)
    assert done, "results produced before the cancel are kept"
    assert sorted(done + [e["custom_id"] for e in errors]) == sorted(ids)
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert batch.request_counts.completed == len(done)


def test_a_batch_past_its_completion_window_expires_with_batch_expired_lines(
    client: Any, tmp_path: Path
) -> None:
    ids = [f"e-{i}" for i in range(200)]
    path = _jsonl(tmp_path / "slow.jsonl", [_line(cid, max_tokens=SLOW) for cid in ids])
    f = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="3s",  # type: ignore[arg-type]  # OpenAI accepts only 24h
    )
    assert batch.expires_at == batch.created_at + 3
    batch = wait_batch(client, batch.id)
    assert batch.status == "expired" and batch.expired_at
    done = [o["custom_id"] for o in read_lines(client, batch.output_file_id)]
    errors = read_lines(client, batch.error_file_id)
    assert sorted(done + [e["custom_id"] for e in errors]) == sorted(ids)
    assert errors and {e["error"]["code"] for e in errors} == {"batch_expired"}


# ------------------------------------------------------------------------------ native
def test_native_enqueue_is_idempotent_and_says_per_item_what_happened(
    http: httpx.Client, services: Any
) -> None:
    job = http.post("/v1/jobs", json={"job_id": "native-1"}).json()
    assert job["status"] == "queued" and job["object"] == "job"
    assert http.post("/v1/jobs", json={"job_id": "native-1"}).status_code == 409
    items = [
        {"custom_id": f"n-{i}", "url": "/v1/chat/completions", "body": _line("x")["body"]}
        for i in range(3)
    ]
    reply = http.post("/v1/jobs/native-1/items", json={"items": items + items[:1]})
    assert reply.status_code == 200, reply.text
    assert [d["status"] for d in reply.json()["data"]] == [
        "accepted",
        "accepted",
        "accepted",
        "duplicate",
    ]
    again = http.post("/v1/jobs/native-1/items", json={"items": items[1:]}).json()
    assert (again["accepted"], again["duplicates"]) == (0, 2)
    changed = [{**items[0], "body": {**items[0]["body"], "max_tokens": 5}}]
    conflict = http.post("/v1/jobs/native-1/items", json={"items": changed})
    assert conflict.status_code == 409 and "n-0" in conflict.json()["error"]["message"]
    waited = http.get("/v1/jobs/native-1/items/n-2", params={"wait_s": 60}).json()
    assert waited["status"] == "completed"
    assert waited["response"]["body"]["object"] == "chat.completion"
    deadline = time.monotonic() + 60
    while (job := http.get("/v1/jobs/native-1").json())["status"] != "completed":
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    assert job["request_counts"]["completed"] == 3 and job["completed_at"]
    summary = json.loads((Path(services[0].output.path) / "native-1" / "job.json").read_text())
    assert (summary["state"], summary["done"]) == ("completed", 3)


def test_a_job_outside_its_run_window_waits_while_others_run(http: httpx.Client) -> None:
    # A one-minute window twelve hours from now (UTC): closed for the whole test.
    opens = (int(time.time()) // 60 + 12 * 60) * 60
    window = time.strftime("%H:%M", time.gmtime(opens))
    window += "-" + time.strftime("%H:%M", time.gmtime(opens + 60))
    schedule = {"windows": [window], "timezone": "UTC"}
    created = http.post("/v1/jobs", json={"job_id": "nightly", "config": {"schedule": schedule}})
    assert created.status_code == 200, created.text
    body = _line("x")["body"]
    for job in ("nightly", "daytime"):
        if job == "daytime":
            assert http.post("/v1/jobs", json={"job_id": job}).status_code == 200
        items = [{"custom_id": f"{job}-0", "url": "/v1/chat/completions", "body": body}]
        assert http.post(f"/v1/jobs/{job}/items", json={"items": items}).status_code == 200
    waited = http.get("/v1/jobs/daytime/items/daytime-0", params={"wait_s": 90}).json()
    assert waited["status"] == "completed"  # workers were up and leasing all along
    rows = {j["id"]: j for j in http.get("/v1/dashboard/state").json()["jobs"]}
    nightly = rows["nightly"]
    assert (nightly["pending"], nightly["leased"], nightly["done"]) == (1, 0, 0)
    assert nightly["starts_at"] == opens and nightly["windows"] == [window]
    bad = http.post("/v1/jobs", json={"config": {"schedule": {"windows": ["25:00-01:00"]}}})
    assert bad.status_code == 400 and "25:00-01:00" in bad.text
    assert http.post("/v1/jobs/nightly/cancel").status_code == 200


def test_an_item_is_answered_in_the_shape_of_its_endpoint(http: httpx.Client) -> None:
    assert http.post("/v1/jobs", json={"job_id": "shapes"}).status_code == 200
    items = [
        {"custom_id": cid, "url": line["url"], "body": line["body"], "urgent": True}
        for cid, line in (("c", _line("c", "/v1/completions")), ("m", _line("m")))
    ]
    assert http.post("/v1/jobs/shapes/items", json={"items": items}).status_code == 200
    shapes = {}
    for cid in ("c", "m"):
        got = http.get(f"/v1/jobs/shapes/items/{cid}", params={"wait_s": 90}).json()
        assert got["status"] == "completed", got
        shapes[cid] = got["response"]["body"]["object"]
    assert shapes == {"c": "text_completion", "m": "chat.completion"}


def test_an_urgent_item_is_answered_while_a_batch_backlog_waits(
    http: httpx.Client, client: Any, tmp_path: Path
) -> None:
    path = _jsonl(
        tmp_path / "backlog.jsonl", [_line(f"b-{i}", max_tokens=SLOW) for i in range(200)]
    )
    f = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    http.post("/v1/jobs", json={"job_id": "urgent-1"})
    deadline = time.monotonic() + 60
    while client.batches.retrieve(batch.id).request_counts.completed == 0:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    item = {
        "custom_id": "now",
        "url": "/v1/completions",
        "body": _line("u", "/v1/completions")["body"],
    }
    http.post("/v1/jobs/urgent-1/items", json={"items": [{**item, "urgent": True}]})
    started = time.monotonic()
    answer = http.get("/v1/jobs/urgent-1/items/now", params={"wait_s": 60}).json()
    assert answer["status"] == "completed"
    still = client.batches.retrieve(batch.id).request_counts
    assert still.completed < still.total, "the urgent item jumped the batch's queue"
    assert time.monotonic() - started < 30
    client.batches.cancel(batch.id)


def test_concurrent_enqueues_share_calls_but_are_judged_each_alone(
    server: str, http: httpx.Client
) -> None:
    import asyncio

    http.post("/v1/jobs", json={"job_id": "together", "config": {"queue": {"priority": 1}}})
    body = {"input": "x"}
    http.post(
        "/v1/jobs/together/items",
        json={"items": [{"custom_id": "taken", "url": "/v1/embeddings", "body": body}]},
    )

    def request(n: int) -> dict[str, Any]:
        cid = "taken" if n == 7 else f"t-{n}"
        other = {"input": "another payload"} if n == 7 else body
        return {"items": [{"custom_id": cid, "url": "/v1/embeddings", "body": other}]}

    async def send_all() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=server, headers=headers, timeout=60) as c:
            return await asyncio.gather(
                *(c.post("/v1/jobs/together/items", json=request(n)) for n in range(40))
            )

    replies = asyncio.run(send_all())
    codes = [r.status_code for r in replies]
    assert codes[7] == 409 and codes.count(200) == 39, codes
    assert all(r.json()["accepted"] == 1 for n, r in enumerate(replies) if n != 7)
    stats = http.get("/v1/jobs/together").json()["request_counts"]
    assert stats["total"] == 40  # "taken" once, and every t-n


def test_bad_items_are_refused_naming_the_field_and_nothing_is_enqueued(
    http: httpx.Client,
) -> None:
    http.post("/v1/jobs", json={"job_id": "native-bad"})
    good = {"custom_id": "g", "url": "/v1/chat/completions", "body": _line("g")["body"]}
    cases = [
        ({"items": [good, {**good, "custom_id": "b", "url": "/v1/images"}]}, "items[1].url"),
        ({"items": [good, {**good, "custom_id": "b", "body": {}}]}, "items[1].body.messages"),
        ({"items": [{**good, "colour": "red"}]}, "items[0].colour"),
        ({"items": [{**good, "custom_id": "has space"}]}, "items[0].custom_id"),
        ({"items": [{**good, "body": {**good["body"], "n": 99}}]}, "items[0].body.n"),
        ({"items": []}, "items"),
    ]
    for payload, param in cases:
        reply = http.post("/v1/jobs/native-bad/items", json=payload)
        assert reply.status_code == 400, (param, reply.text)
        error = reply.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert http.get("/v1/jobs/native-bad").json()["request_counts"]["total"] == 0
    assert http.post("/v1/jobs/nope/items", json={"items": [good]}).status_code == 404
    assert http.get("/v1/jobs/native-bad/items/missing").status_code == 404
    garbage = http.post(
        "/v1/jobs/native-bad/items",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert garbage.status_code == 400


def test_metrics_parse_as_prometheus_text(http: httpx.Client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    reply = http.get("/metrics")
    assert reply.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(reply.text)}
    assert {"inference_queue_depth", "inference_jobs", "inference_backlog_items"} <= set(families)
    states = {s.labels["state"] for s in families["inference_queue_depth"].samples}
    assert states == {"pending", "leased", "done", "dead"}
    assert http.get("/healthz").json()["status"] == "ok"


def test_enqueue_requests_are_counted_by_route_and_status(http: httpx.Client) -> None:
    """/metrics counts requests by route template (not by path: one series per route)."""
    from prometheus_client.parser import text_string_to_metric_families

    def enqueue_404s() -> float:
        text = http.get("/metrics").text
        family = next(
            f for f in text_string_to_metric_families(text) if f.name == "inference_http_requests"
        )
        return sum(
            s.value
            for s in family.samples
            if s.labels == {"method": "POST", "route": "/v1/jobs/{job_id}/items", "status": "404"}
        )

    before = enqueue_404s()
    item = {"custom_id": "a", "url": "/v1/embeddings", "body": {"input": "x"}}
    reply = http.post("/v1/jobs/no-such-job/items", json={"items": [item]})
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "not_found"
    assert enqueue_404s() == before + 1


def test_the_controller_exports_the_figures_through_ray_metrics(http: httpx.Client) -> None:
    """The same figures go to Ray's own metrics endpoint (what its Prometheus scrapes and its
    Grafana charts), from the Controller's loop: read them there, as Prometheus would."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    assert http.post("/v1/jobs", json={"job_id": "ray-metrics"}).status_code == 200
    item = {"custom_id": "r-0", "url": "/v1/chat/completions", "body": _line("r")["body"]}
    assert http.post("/v1/jobs/ray-metrics/items", json={"items": [item]}).status_code == 200
    assert http.get("/v1/jobs/ray-metrics/items/r-0", params={"wait_s": 90}).json()["status"] == (
        "completed"
    )
    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = {"ray_inference_queue_items", "ray_inference_gpu_seconds", "ray_inference_cost"}
    deadline = time.monotonic() + 60  # Ray exports every few seconds
    while True:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        samples = {
            (sample.name, sample.labels.get("state")): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.labels.get("job") == "ray-metrics"
        }
        if {name for name, _ in samples} >= wanted and samples.get(
            ("ray_inference_queue_items", "done")
        ):
            break
        assert time.monotonic() < deadline, sorted(samples)
        time.sleep(1)
    assert samples[("ray_inference_queue_items", "done")] == 1.0
    assert samples[("ray_inference_queue_items", "pending")] == 0.0
    assert samples[("ray_inference_gpu_seconds", None)] > 0


# ------------------------------------------------------------------------------ protection
def test_tokens_are_required_and_checked(server: str) -> None:
    assert httpx.get(f"{server}/healthz").status_code == 200
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": TOKEN},
    ):
        reply = httpx.get(f"{server}/v1/batches", headers=headers)
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
        assert reply.json()["error"]["type"] == "authentication_error"


def test_limits_give_413_and_429(services: Any) -> None:
    from inference.api.app import create_app

    config, queue, controller = services
    tight = config.with_updates(
        api={"max_body_bytes": 2048, "max_backlog_items": 1, "max_items_per_request": 2}
    )
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    with (
        live_server(create_app(tight, queue, controller)) as url,
        httpx.Client(base_url=url, headers=headers) as http,
    ):
        http.post("/v1/jobs", json={"job_id": "limits-1"})
        big = b'{"items": [' + b" " * 4096 + b"]}"
        reply = http.post("/v1/jobs/limits-1/items", content=big)
        assert reply.status_code == 413 and reply.json()["error"]["code"] == "body_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            for _ in range(8):
                yield b" " * 1024

        assert http.post("/v1/jobs/limits-1/items", content=chunks()).status_code == 413
        item = {"custom_id": "a", "url": "/v1/embeddings", "body": {"input": "x"}}
        three = [{**item, "custom_id": c} for c in "abc"]
        reply = http.post("/v1/jobs/limits-1/items", json={"items": three})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "items"
        reply = http.post("/v1/jobs/limits-1/items", json={"items": three[:2]})
        assert reply.status_code == 429 and int(reply.headers["retry-after"]) >= 1
        assert reply.json()["error"]["type"] == "rate_limit_error"


def test_cors_answers_only_the_listed_origins(services: Any) -> None:
    from inference.api.app import create_app

    config, queue, controller = services
    listed = config.with_updates(api={"cors_origins": ["https://ops.example.com"]})
    preflight = {"Access-Control-Request-Method": "POST"}
    with live_server(create_app(listed, queue, controller)) as url:
        ok = httpx.options(
            f"{url}/v1/batches", headers={**preflight, "Origin": "https://ops.example.com"}
        )
        assert ok.headers["access-control-allow-origin"] == "https://ops.example.com"
        other = httpx.options(
            f"{url}/v1/batches", headers={**preflight, "Origin": "https://evil.example.com"}
        )
        assert "access-control-allow-origin" not in other.headers
    with live_server(create_app(config, queue, controller)) as url:  # none listed: no CORS
        reply = httpx.get(f"{url}/healthz", headers={"Origin": "https://ops.example.com"})
        assert "access-control-allow-origin" not in reply.headers


def test_unsafe_settings_are_refused(tmp_path: Path) -> None:
    from inference.api.server import server_config
    from inference.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("api: {host: 0.0.0.0}\n")
    with pytest.raises(ConfigError, match=r"refusing to bind 0\.0\.0\.0 without tokens"):
        server_config(path, None, None)
    assert server_config(path, "127.0.0.1", 9000).api.port == 9000
    path.write_text(f"api: {{host: 0.0.0.0, tokens: [{TOKEN}]}}\n")
    assert server_config(path, None, None).api.host == "0.0.0.0"
    path.write_text("api: {cors_origins: ['*']}\n")
    with pytest.raises(ConfigError, match="wildcard"):
        server_config(path, None, None)
