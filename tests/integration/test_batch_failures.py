"""An OpenAI batch that the queue refuses half-way through its enqueue fails as OpenAI's does
(status ``failed``, ``errors`` naming the lines) before any of its lines runs, and never stays in
``validating``. A real uvicorn server, Controller and WorkQueue on the shared Ray cluster; the
official ``openai`` client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.api_server import (
    TOKEN,
    _jsonl,
    _line,
    api_config,
    cluster_services,
    live_server,
    wait_batch,
)


@pytest.fixture(scope="module")
def client(ray_cluster: Path, queue_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A server whose batch checks allow items of 3 MB, over a queue that takes 1 MB (the
    cluster's WorkQueue keeps the limit it was started with): the check passes, the queue
    refuses a chunk once earlier chunks are in."""
    from openai import OpenAI

    from inference.api.app import create_app

    config = api_config(tmp_path_factory.mktemp("batchfail"), queue_db, tokens=[TOKEN])
    config = config.with_updates(queue={"max_item_bytes": 3_000_000})
    with (
        cluster_services(config) as (queue, controller),
        live_server(create_app(config, queue, controller)) as url,
    ):
        yield OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=60), queue, url


def test_a_batch_the_queue_refuses_half_way_fails_naming_the_line_and_runs_nothing(
    client: Any, tmp_path: Path
) -> None:
    import ray

    openai, queue, _ = client
    lines = [_line(f"ok-{i}") for i in range(1500)]
    lines[1199] = _line("huge", messages=[{"role": "user", "content": "a" * 2_000_000}])
    path = _jsonl(tmp_path / "half.jsonl", lines)
    f = openai.files.create(file=path.open("rb"), purpose="batch")
    created = openai.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait_batch(openai, created.id, timeout_s=90)  # before: validating, forever
    assert batch.status == "failed" and batch.failed_at
    [error] = batch.errors.data
    assert error.line == 1200 and "huge" in error.message and "1000000" in error.message
    stats = ray.get(queue.stats.remote(batch.id))
    # The first chunk (1,000 lines) was in; not one of them ran: the job was paused until
    # every line was in, and then cancelled.
    assert stats["done"] == 0 and stats["leased"] == 0 and stats["pending"] == 0
    assert stats["attempts_by_cause"].get("error", 0) == 0


def test_a_batchs_dead_letters_are_redriven_only_through_the_server(
    client: Any, tmp_path: Path
) -> None:
    """A redrive behind the Controller's back (`inference dlq redrive`, straight to the queue)
    would run an item after the batch's files were written, or while they are: in neither. The
    queue refuses it for a batch; the server refuses it once the batch is past running."""
    import httpx
    import ray

    from inference.errors import QueueError

    openai, queue, url = client
    path = _jsonl(tmp_path / "dead.jsonl", [_line("ok"), _line("too-long", max_tokens=4000)])
    f = openai.files.create(file=path.open("rb"), purpose="batch")
    created = openai.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait_batch(openai, created.id)
    assert batch.status == "completed" and batch.request_counts.failed == 1
    with pytest.raises(QueueError, match="OpenAI batch"):
        ray.get(queue.redrive.remote(batch.id))  # before: 1, and the item ran unseen
    answer = httpx.post(
        f"{url}/v1/jobs/{batch.id}/redrive", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert answer.status_code == 409 and answer.json()["error"]["code"] == "batch_final"
    assert ray.get(queue.stats.remote(batch.id))["dead"] == 1
