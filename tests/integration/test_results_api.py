"""Results while a job runs, and retention, on a real uvicorn server over the shared local Ray
cluster (real WorkQueue, Controller and worker, the tiny model): a reader that follows a running
native job to its end sees every item exactly once; a running batch's output file holds what
has committed, and its final file is the same bytes plus the rest; files expire and the
janitor deletes them."""

from __future__ import annotations

import json
import time
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
    wait_batch,
)


@pytest.fixture(scope="module")
def services(ray_cluster: Path, queue_db: Path, tmp_path_factory: pytest.TempPathFactory):
    config = api_config(tmp_path_factory.mktemp("results"), queue_db, tokens=[TOKEN])
    # Small shards that commit often, so a running job has results to read.
    config = config.with_updates(output={"rows_per_shard": 8, "max_shard_age_s": 0.3})
    with cluster_services(config) as (queue, controller):
        yield config, queue, controller


def _items(ids: list[str], max_tokens: int) -> dict[str, Any]:
    return {
        "items": [
            {
                "custom_id": cid,
                "url": "/v1/chat/completions",
                "body": {
                    "model": "tiny-llama",
                    "messages": [{"role": "user", "content": f"say {cid}"}],
                    "max_tokens": max_tokens,
                },
            }
            for cid in ids
        ]
    }


def test_a_reader_following_a_running_job_sees_every_item_exactly_once(
    http: httpx.Client,
) -> None:
    job = "follow-1"
    assert http.post("/v1/jobs", json={"job_id": job}).status_code == 200
    first = [f"f-{i}" for i in range(48)]
    later = [f"g-{i}" for i in range(16)]
    assert http.post(f"/v1/jobs/{job}/items", json=_items(first, 24)).json()["accepted"] == 48

    seen: list[str] = []
    calls: list[tuple[str, int]] = []  # (job status at the call, lines it gave)
    cursor = None
    deadline = time.monotonic() + 240
    added = False
    while True:
        assert time.monotonic() < deadline, f"follower stuck at {cursor}, {len(seen)} seen"
        params: dict[str, Any] = {"wait_s": 2, "limit": 16}
        if cursor is not None:
            params["after"] = cursor
        asked_after_adding = added
        reply = http.get(f"/v1/jobs/{job}/results", params=params)
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"].startswith("application/jsonl")
        lines = [json.loads(x) for x in reply.text.splitlines()]
        for line in lines:
            assert line["response"]["status_code"] == 200
            assert line["response"]["body"]["object"] == "chat.completion"
        seen += [line["custom_id"] for line in lines]
        calls.append((reply.headers["inference-job-status"], len(lines)))
        cursor = reply.headers["inference-cursor"]
        if reply.headers["inference-complete"] == "true" and asked_after_adding:
            break
        if not added and len(seen) >= 16:  # more items while the reader follows
            added = True
            more = http.post(f"/v1/jobs/{job}/items", json=_items(later, 4))
            assert more.json()["accepted"] == 16
    assert len(seen) == len(set(seen)), "an item was delivered twice"
    assert sorted(seen) == sorted(first + later)
    assert any(status == "running" and n for status, n in calls), "nothing read while it ran"
    # The end cursor gives nothing more, at once, and says so.
    reply = http.get(f"/v1/jobs/{job}/results", params={"after": cursor})
    assert reply.text == "" and reply.headers["inference-complete"] == "true"
    assert reply.headers["inference-cursor"] == cursor


def test_results_of_an_unknown_job_or_a_forged_cursor_are_refused(http: httpx.Client) -> None:
    reply = http.get("/v1/jobs/no-such-job/results")
    assert reply.status_code == 404
    assert http.post("/v1/jobs", json={"job_id": "cursor-1"}).status_code == 200
    reply = http.get("/v1/jobs/cursor-1/results", params={"after": "5.3"})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "after" and error["code"] == "invalid_cursor"


def test_a_running_batch_has_an_output_file_that_grows_to_the_final_one(
    client: Any, tmp_path: Path
) -> None:
    # Long enough answers that the batch runs for several ticks of the Controller (48 short
    # ones can finish within one, and the file would first be seen while finalizing).
    ids = [f"live-{i}" for i in range(96)]
    path = _jsonl(tmp_path / "live.jsonl", [_line(cid, max_tokens=SLOW) for cid in ids])
    f = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        output_expires_after={"anchor": "created_at", "seconds": 7200},
    )
    deadline = time.monotonic() + 120
    while True:
        running = client.batches.retrieve(batch.id)
        assert running.status not in ("completed", "failed"), "finished before it was read"
        if running.output_file_id is not None:
            break
        assert time.monotonic() < deadline, "no output file while the batch ran"
        time.sleep(0.1)
    assert running.status == "in_progress"
    partial = client.files.content(running.output_file_id).content
    meta = client.files.retrieve(running.output_file_id)
    assert meta.purpose == "batch_output" and meta.bytes >= len(partial) > 0
    early = [json.loads(x) for x in partial.splitlines()]
    assert early and len({e["custom_id"] for e in early}) == len(early)
    assert len(early) < len(ids)

    done = wait_batch(client, batch.id, 240)
    assert done.status == "completed" and done.output_file_id == running.output_file_id
    final = client.files.content(done.output_file_id).content
    assert final.startswith(partial), "the lines read while it ran moved"
    lines = [json.loads(x) for x in final.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(ids)  # each exactly once
    stored = client.files.retrieve(done.output_file_id)
    assert stored.bytes == len(final)
    assert stored.expires_at == done.created_at + 7200


def test_expired_files_are_listed_as_expired_then_deleted_by_the_janitor(
    services: Any, client: Any, http: httpx.Client, tmp_path: Path
) -> None:
    import openai
    import ray

    _, _, controller = services
    path = _jsonl(tmp_path / "keep.jsonl", [_line("k-1")])
    kept = client.files.create(
        file=path.open("rb"),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert kept.expires_at is not None
    assert abs(kept.expires_at - (kept.created_at + 3600)) <= 2
    reply = http.post(
        "/v1/files",
        files={"file": ("bad.jsonl", b"{}\n")},
        data={
            "purpose": "batch",
            "expires_after[anchor]": "created_at",
            "expires_after[seconds]": "60",
        },
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "expires_after[seconds]"

    soon = int(time.time()) + 1
    doc = ray.get(controller.put_file.remote(b'{"a": 1}\n', "soon.jsonl", "batch", soon))
    time.sleep(max(0.0, soon - time.time()) + 0.2)
    assert client.files.retrieve(doc["id"]).status == "expired"
    listed = {f.id: f.status for f in client.files.list(purpose="batch")}
    assert listed[doc["id"]] == "expired" and listed[kept.id] == "processed"
    with pytest.raises(openai.NotFoundError, match="expired"):
        client.files.content(doc["id"])
    deleted = ray.get(controller.sweep_files.remote())
    assert deleted == [doc["id"]]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(doc["id"])
    assert client.files.retrieve(kept.id).status == "processed"
