"""``inference serve`` in a subprocess with its own embedded Ray, killed (SIGKILL) mid-batch and
started again on the same state: nothing it acknowledged is lost, nothing is done twice. And
``--workers 2``: two server processes on one port, one queue, one set of counters."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.support.vllm_server import session_pids as _session_pids

INFERENCE = str(Path(sys.executable).with_name("inference"))
TOKEN = "serve-token-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(
    config: Path,
    port: int,
    log: Path,
    workers: int = 1,
    token: str = TOKEN,
    ray_tmp: str | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """``inference serve`` in a session of its own, with ``token`` in its environment and its
    embedded Ray in ``ray_tmp`` (a new folder unless given); every process of it is ended and
    the folder removed at the end."""
    ray_tmp = ray_tmp or tempfile.mkdtemp(prefix="ir-", dir="/tmp")  # socket paths stay short
    env = {**os.environ, "INFERENCE_RAY_TEMP_DIR": ray_tmp, "INFERENCE_API_TOKENS": token}
    env.pop("RAY_ADDRESS", None)
    command = [INFERENCE, "serve", "--config", str(config), "--port", str(port)]
    command += ["--workers", str(workers)]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in _session_pids(proc.pid):  # what a killed driver left behind
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _line(cid: str) -> str:
    return json.dumps(
        {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "tiny-llama",
                "messages": [{"role": "user", "content": f"say {cid}"}],
                "max_tokens": 32,
            },
        }
    )


@pytest.mark.timeout(420)
def test_serve_killed_mid_batch_loses_nothing_it_acknowledged(tmp_path: Path) -> None:
    from openai import OpenAI

    config = tmp_path / "serve.yaml"
    config.write_text(
        "engine: {kind: transformers, model: tiny-llama, device: cpu}\n"
        "batching: {max_batch_size: 16}\n"
        "queue: {lease_s: 30, backoff_base_s: 0.1}\n"
        f"output: {{path: {tmp_path / 'out'}, rows_per_shard: 20, max_shard_age_s: 0.5}}\n"
        "scaling: {max_workers: 1}\n"
    )
    port, log = _free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    ids = [f"r-{i}" for i in range(120)]
    (tmp_path / "in.jsonl").write_text("".join(_line(cid) + "\n" for cid in ids))
    native = [
        {"custom_id": f"n-{i}", "url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": 4}}
        for i in range(30)
    ]
    headers = {"Authorization": f"Bearer {TOKEN}"}

    with serve(config, port, log) as proc:
        client = OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0)
        uploaded = client.files.create(file=(tmp_path / "in.jsonl").open("rb"), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert httpx.post(f"{url}/v1/jobs", json={"job_id": "keep"}, headers=headers).is_success
        reply = httpx.post(f"{url}/v1/jobs/keep/items", json={"items": native}, headers=headers)
        assert reply.json()["accepted"] == 30
        deadline = time.monotonic() + 120
        while client.batches.retrieve(batch.id).request_counts.completed == 0:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # mid-batch: leases out, shards being written
        proc.wait()

    with serve(config, port, log):
        client = OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0)
        deadline = time.monotonic() + 240
        while (now := client.batches.retrieve(batch.id)).status != "completed":
            assert now.status in ("in_progress", "finalizing"), now
            assert time.monotonic() < deadline, (now, log.read_text()[-3000:])
            time.sleep(0.5)
        assert now.request_counts.completed == len(ids) and now.request_counts.failed == 0
        lines = [json.loads(x) for x in client.files.content(now.output_file_id).text.splitlines()]
        assert sorted(line["custom_id"] for line in lines) == sorted(ids)  # each exactly once
        assert client.files.retrieve(uploaded.id).filename == "in.jsonl"
        job = httpx.get(f"{url}/v1/jobs/keep", headers=headers).json()
        while job["status"] != "completed":
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
            job = httpx.get(f"{url}/v1/jobs/keep", headers=headers).json()
        assert job["request_counts"]["completed"] == 30


def _server_processes(parent: int) -> list[int]:
    """The processes uvicorn's supervisor started to serve (multiprocessing spawns them)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                argv = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if ppid == parent and b"spawn_main" in argv:
                pids.append(int(entry.name))
    return pids


@pytest.mark.timeout(300)
def test_serve_with_two_processes_shares_one_queue_and_one_set_of_counters(
    tmp_path: Path,
) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        "engine: {kind: transformers, model: tiny-llama, device: cpu}\n"
        f"output: {{path: {tmp_path / 'out'}}}\n"
    )
    port, log = _free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    later = {"config": {"schedule": {"not_before": "2100-01-01T00:00:00Z"}}}  # nothing runs

    def item(i: int) -> dict[str, object]:
        return {"custom_id": f"i-{i}", "url": "/v1/embeddings", "body": {"input": f"text {i}"}}

    with serve(config, port, log, workers=2) as proc:
        assert len(_server_processes(proc.pid)) == 2, log.read_text()[-3000:]
        reply = httpx.post(f"{url}/v1/jobs", json={"job_id": "two", **later}, headers=headers)
        assert reply.is_success, reply.text
        statuses = []
        for n in range(40):  # a new connection each: the kernel spreads them over both
            items = [item(i) for i in range(n * 5, n * 5 + 5)] + [item(0)]  # item 0 again
            reply = httpx.post(f"{url}/v1/jobs/two/items", json={"items": items}, headers=headers)
            assert reply.status_code == 200, reply.text
            statuses += [d["status"] for d in reply.json()["data"]]
        answered_by = set()  # both processes answer (a new connection each time)
        for _ in range(200):
            answered_by.add(httpx.get(f"{url}/healthz").json()["server"])
            if len(answered_by) == 2:
                break
        assert len(answered_by) == 2, answered_by
        assert statuses.count("accepted") == 200  # every item once, whichever process took it
        assert statuses.count("duplicate") == 40
        job = httpx.get(f"{url}/v1/jobs/two", headers=headers).json()
        assert job["request_counts"]["total"] == 200

        def enqueue_requests() -> float:
            text = httpx.get(f"{url}/metrics", headers=headers).text
            line = next(x for x in text.splitlines() if x.startswith("inference_enqueue_req"))
            return float(line.split()[-1])

        # Each process reports its counters within seconds; a scrape reaching either one then
        # counts the requests of both.
        deadline = time.monotonic() + 30
        while (seen := [enqueue_requests() for _ in range(6)]) != [40.0] * 6:
            assert time.monotonic() < deadline, seen
            time.sleep(0.5)
        children = _server_processes(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    for pid in children:  # the supervisor took its processes down with it
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
