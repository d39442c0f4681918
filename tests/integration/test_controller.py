"""The Controller actor on the shared local Ray cluster, driven directly (no HTTP): a crash and
restart mid-batch, a native job that takes items again after it completed, pool sizing."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from inference.config import ScalingConfig
from inference.fleet import IDLE_GRACE_S, desired_workers
from tests.support.api_server import api_config, cluster_services


@pytest.fixture(scope="module")
def services(ray_cluster: Path, queue_db: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("controller")
    config = api_config(base, queue_db).with_updates(queue={"lease_s": 120})
    with cluster_services(config) as (queue, _):
        yield config, queue


def _controller() -> Any:
    from inference.controller import get_controller

    return get_controller()


def _call(method: str, *args: Any, timeout_s: float = 120) -> Any:
    """Call the Controller, riding out its restart."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(getattr(_controller(), method).remote(*args), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            assert time.monotonic() < deadline, f"Controller.{method} unavailable"
            time.sleep(0.5)


def _wait(kind: str, job_id: str, statuses: tuple[str, ...], timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while (rec := _call(kind, job_id))["status"] not in statuses:
        assert time.monotonic() < deadline, rec["status"]
        time.sleep(0.3)
    return dict(rec)


def _chat(cid: str, max_tokens: int = 24) -> dict[str, Any]:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": f"say {cid}"}], "max_tokens": max_tokens},
    }


def test_a_controller_restarted_mid_batch_finishes_it_without_waiting_for_leases(
    services: Any,
) -> None:
    import ray

    config, _ = services
    ids = [f"k-{i}" for i in range(120)]
    data = "".join(json.dumps(_chat(cid)) + "\n" for cid in ids).encode()
    doc = _call("put_file", data, "restart.jsonl", "batch")
    rec = _call(
        "create_batch",
        doc["id"],
        "/v1/chat/completions",
        "24h",
        None,
        config.model_dump(mode="json"),
        config.output.path,
    )
    deadline = time.monotonic() + 90
    while not (_call("batch", rec["id"]).get("stats") or {}).get("done"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    ray.kill(_controller(), no_restart=False)  # a crash: Ray restarts it; its workers die
    # Within the 120 s lease: the dead workers' leases were handed back at restart.
    done = _wait("batch", rec["id"], ("completed",), timeout_s=100)
    assert done["stats"]["done"] == len(ids) and done["stats"]["dead"] == 0
    assert done["stats"]["lease_expiries"] == 0
    text = _call("read_file", done["output_file_id"], 0, 1 << 24).decode()
    assert sorted(json.loads(x)["custom_id"] for x in text.splitlines()) == sorted(ids)


def test_a_native_job_runs_again_when_items_arrive_after_it_completed(services: Any) -> None:
    import ray

    from inference.queue import NewItem
    from inference.schema import encode_payload
    from inference.shards import read_results

    config, queue = services
    rec = _call("create_job", "again-1", config.model_dump(mode="json"), config.output.path)
    assert rec["status"] == "queued"

    def enqueue(ids: list[str]) -> None:
        items = [NewItem(c, encode_payload(_chat(c)["url"], _chat(c, 4)["body"]), 8) for c in ids]
        ray.get(queue.enqueue.remote("again-1", items))
        _call("wake")

    enqueue(["a", "b", "c"])
    first = _wait("job", "again-1", ("completed",))
    assert first["stats"]["done"] == 3
    enqueue(["d", "e"])
    _wait("job", "again-1", ("running", "finalizing", "completed"))
    second = _wait("job", "again-1", ("completed",))
    assert second["stats"]["done"] == 5 and second["finalized_total"] == 5
    job_dir = Path(config.output.path).absolute() / "again-1"
    ids = read_results(str(job_dir)).column("custom_id").to_pylist()  # through the manifest
    assert sorted(ids) == ["a", "b", "c", "d", "e"]
    assert json.loads((job_dir / "job.json").read_text())["done"] == 5


@pytest.mark.parametrize(
    ("scaling", "backlog", "slots", "have", "idle_s", "want"),
    [
        ({}, 100, 2, 0, 0.0, 2),  # work: one per slot
        ({"max_workers": 1}, 100, 2, 0, 0.0, 1),
        ({"min_workers": 3}, 100, 2, 0, 0.0, 3),
        ({}, 0, 2, 2, 1.0, 2),  # idle, within the grace period: keep
        ({}, 0, 2, 2, IDLE_GRACE_S + 1, 0),  # idle for long: drain
        ({"min_workers": 1}, 0, 2, 2, IDLE_GRACE_S + 1, 1),
    ],
)
def test_pool_size_follows_the_backlog(
    scaling: dict, backlog: int, slots: int, have: int, idle_s: float, want: int
) -> None:
    assert desired_workers(ScalingConfig(**scaling), backlog, slots, have, idle_s) == want
