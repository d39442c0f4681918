"""What the API's integration tests share: request lines, a uvicorn server in a thread, the
config of a served cluster and its services, and waiting on a batch."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from inference.config import Config, load_config
from tests.conftest import REPO

TOKEN = "test-token-0123456789abcdef"
SLOW = 120  # max_tokens that keeps the one CPU worker busy for seconds per batch


def _line(cid: str, url: str = "/v1/chat/completions", **body: Any) -> dict[str, Any]:
    if url == "/v1/completions":
        base: dict[str, Any] = {"model": "tiny-llama", "prompt": f"say {cid}", "max_tokens": 4}
    else:
        base = {
            "model": "tiny-llama",
            "messages": [{"role": "user", "content": f"say {cid}"}],
            "max_tokens": 4,
        }
    return {"custom_id": cid, "method": "POST", "url": url, "body": {**base, **body}}


def _jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """uvicorn on a free loopback port, in a thread; stopped on exit."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def api_config(base: Path, queue_db: Path, **api: Any) -> Config:
    config = load_config(REPO / "configs" / "tiny-cpu.yaml")
    return config.with_updates(
        output={"path": str(base / "out"), "rows_per_shard": 50, "max_shard_age_s": 0.5},
        queue={"db_path": str(queue_db), "lease_s": 20, "backoff_base_s": 0.1},
        batching={"max_batch_size": 16},
        scaling={"max_workers": 1},
        api={"state_dir": str(base / "state"), **api},
    )


@contextmanager
def cluster_services(config: Config) -> Iterator[tuple[Any, Any]]:
    """The cluster's WorkQueue and a fresh Controller (stopped and killed on exit, so the next
    module gets its own and the cluster's CPUs are free again)."""
    import ray

    from inference.api.server import state_dir
    from inference.controller import get_or_create_controller
    from inference.queue.actor import get_or_create_queue
    from inference.runner import queue_db_path

    queue = get_or_create_queue(queue_db_path(config, config.output.path))
    controller = get_or_create_controller(state_dir(config))
    try:
        yield queue, controller
    finally:
        ray.get(controller.shutdown.remote(), timeout=120)
        ray.kill(controller, no_restart=True)


def wait_batch(client: Any, batch_id: str, timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.3)


def read_lines(client: Any, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]
