"""Nothing in from outside the machine, and HTTP that holds its limits while it reads.

On a real uvicorn server over the shared local Ray cluster (as ``test_api.py``): which ``Host``
names are answered, which cross-site requests are refused, which bodies are taken, the caps
that apply while a body is read (items, item size, streamed uploads, quotas), job ids the
output layout refuses, and the backlog cap on batch creation. And on ``inference serve`` in a
subprocess with its own embedded Ray (as ``test_api_serve.py``): every listener of its Ray
processes is on loopback, and no token it was given is written anywhere."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_api import (
    _jsonl,
    _line,
    api_config,
    cluster_services,
    live_server,
    wait_batch,
)
from tests.integration.test_api_serve import _free_port, _session_pids, serve

TOKEN = "security-token-0123456789abcdef"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def services(ray_cluster: Path, queue_db: Path, tmp_path_factory: pytest.TempPathFactory):
    config = api_config(tmp_path_factory.mktemp("security"), queue_db)  # no tokens
    with cluster_services(config) as (queue, controller):
        yield config, queue, controller


@contextmanager
def app_server(services: Any, **api: Any) -> Iterator[str]:
    from inference.api.app import create_app

    config, queue, controller = services
    with live_server(
        create_app(config.with_updates(api=api) if api else config, queue, controller)
    ) as url:
        yield url


@pytest.fixture(scope="module")
def server(services: Any) -> Iterator[str]:
    with app_server(services) as url:
        yield url


def _item(cid: str, **body: Any) -> dict[str, Any]:
    line = _line(cid)
    return {"custom_id": cid, "url": line["url"], "body": {**line["body"], **body}}


def _upload(
    url: str, name: str, data: bytes, headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/files",
        files={"file": (name, data, "application/jsonl")},
        data={"purpose": "batch"},
        headers=headers,
        timeout=120,
    )


# ------------------------------------------------------------------------------ Host, Origin
def test_without_tokens_only_loopback_host_names_are_answered(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    for host in (
        "localhost",
        f"localhost:{port}",
        f"app.localhost:{port}",
        f"127.0.0.1:{port}",
        "127.9.9.9",
        f"[::1]:{port}",
    ):
        reply = httpx.get(f"{server}/v1/jobs", headers={"Host": host})
        assert reply.status_code == 200, (host, reply.text)
    for host in (
        "evil.example.com",
        f"evil.example.com:{port}",
        f"localhost.evil.example.com:{port}",
        f"192.0.2.1:{port}",
        f"0.0.0.0:{port}",
    ):
        reply = httpx.get(f"{server}/v1/jobs", headers={"Host": host})
        assert reply.status_code == 400, (host, reply.text)
        error = reply.json()["error"]
        assert error["code"] == "invalid_host" and "Host" in error["message"], error
        assert httpx.get(f"{server}/healthz", headers={"Host": host}).status_code == 400


def test_state_changes_from_another_origin_are_refused(services: Any, server: str) -> None:
    import ray

    _, queue, _ = services
    same = {**JSON, "Origin": server, "Sec-Fetch-Site": "same-origin"}
    assert httpx.post(f"{server}/v1/jobs", json={"job_id": "origin-ok"}, headers=same).is_success
    for extra in (
        {"Origin": "https://evil.example.com"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": server.replace("127.0.0.1", "localhost")},
    ):
        job = f"origin-{len(extra['Origin']) if 'Origin' in extra else 'site'}"
        reply = httpx.post(f"{server}/v1/jobs", json={"job_id": job}, headers={**JSON, **extra})
        assert reply.status_code == 403, (extra, reply.text)
        assert reply.json()["error"]["code"] == "cross_origin"
        assert httpx.get(f"{server}/v1/jobs/{job}").status_code == 404
        items = {"items": [_item("x")]}
        assert (
            httpx.post(f"{server}/v1/jobs/origin-ok/items", json=items, headers=extra).status_code
            == 403
        )
        assert httpx.post(f"{server}/v1/jobs/origin-ok/cancel", headers=extra).status_code == 403
    assert ray.get(queue.stats.remote("origin-ok"))["total"] == 0
    # Reading from another origin is CORS's business (no header: the browser hides the answer).
    assert (
        httpx.get(f"{server}/v1/jobs", headers={"Origin": "https://evil.example.com"}).status_code
        == 200
    )


def test_with_tokens_on_a_public_bind_any_host_is_answered_but_origins_still_hold(
    services: Any,
) -> None:
    with app_server(services, tokens=[TOKEN], host="0.0.0.0") as url:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        reply = httpx.get(f"{url}/v1/jobs", headers={**auth, "Host": "inference.example.com"})
        assert reply.status_code == 200, reply.text
        assert (
            httpx.get(f"{url}/v1/jobs", headers={"Host": "inference.example.com"}).status_code
            == 401
        )
        cross = {
            **auth,
            **JSON,
            "Host": "inference.example.com",
            "Origin": "https://evil.example.com",
        }
        reply = httpx.post(f"{url}/v1/jobs", json={"job_id": "tokens-cross"}, headers=cross)
        assert reply.status_code == 403 and reply.json()["error"]["code"] == "cross_origin"
        listed = {**auth, "Origin": "https://ops.example.com", "Sec-Fetch-Site": "cross-site"}
    with app_server(services, tokens=[TOKEN], cors_origins=["https://ops.example.com"]) as url:
        reply = httpx.post(f"{url}/v1/jobs", json={"job_id": "tokens-listed"}, headers=listed)
        assert reply.status_code == 200, reply.text


def test_json_endpoints_take_only_json_bodies(server: str, tmp_path: Path) -> None:
    body = json.dumps({"job_id": "typed"}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        reply = httpx.post(f"{server}/v1/jobs", content=body, headers=headers)
        assert reply.status_code == 415, (content_type, reply.text)
        assert reply.json()["error"]["code"] == "unsupported_media_type"
    assert httpx.get(f"{server}/v1/jobs/typed").status_code == 404
    assert httpx.post(f"{server}/v1/jobs", content=body, headers=JSON).is_success
    items = json.dumps({"items": [_item("t")]}).encode()
    plain = {"Content-Type": "text/plain"}
    assert (
        httpx.post(f"{server}/v1/jobs/typed/items", content=items, headers=plain).status_code == 415
    )
    batch = {
        "input_file_id": "file-x",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    assert httpx.post(f"{server}/v1/batches", data=batch).status_code == 415
    # The upload stays multipart.
    uploaded = _upload(server, "typed.jsonl", (json.dumps(_line("a")) + "\n").encode())
    assert uploaded.status_code == 200, uploaded.text


# ------------------------------------------------------------------------------ caps while reading
def test_too_many_items_are_refused_before_any_model_is_built(services: Any) -> None:
    with app_server(services, max_items_per_request=2) as url:
        assert httpx.post(f"{url}/v1/jobs", json={"job_id": "count-1"}).is_success
        # items[0] is malformed: building the models first would name it; the count comes first.
        three = [{**_item("a"), "colour": "red"}, _item("b"), _item("c")]
        reply = httpx.post(f"{url}/v1/jobs/count-1/items", json={"items": three})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert (error["param"], error["code"]) == ("items", "too_many_items"), error
        # Bodies that name custom_id themselves (a key, a value) are not miscounted.
        schema = {"type": "object", "properties": {"custom_id": {"type": "string"}}}
        keyed = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        two = [_item("a", response_format=keyed), _item("b", user="custom_id")]
        reply = httpx.post(f"{url}/v1/jobs/count-1/items", json={"items": two})
        assert reply.status_code == 200, reply.text


def test_an_oversized_item_is_413_naming_it_and_nothing_is_enqueued(
    services: Any, server: str, tmp_path: Path
) -> None:
    import ray

    config, queue, _ = services
    limit = config.queue.max_item_bytes
    assert httpx.post(f"{server}/v1/jobs", json={"job_id": "big-item"}).is_success
    huge = {"messages": [{"role": "user", "content": "x" * (limit + 10)}]}
    reply = httpx.post(
        f"{server}/v1/jobs/big-item/items", json={"items": [_item("small"), _item("huge", **huge)]}
    )
    assert reply.status_code == 413, reply.text
    error = reply.json()["error"]
    assert error["param"] == "items[1]" and "huge" in error["message"], error
    assert error["code"] == "item_too_large"
    assert ray.get(queue.stats.remote("big-item"))["total"] == 0
    # The same line in a batch file fails the batch's validation, naming the line.
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    path = _jsonl(
        tmp_path / "big.jsonl",
        [_line("ok"), {**_line("huge"), "body": {**_line("h")["body"], **huge}}],
    )
    f = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait_batch(client, batch.id, timeout_s=60)
    assert batch.status == "failed"
    assert [(e.line, e.code) for e in batch.errors.data] == [(2, "request_too_large")]


def test_an_upload_is_streamed_to_disk_not_held_in_memory(server: str, tmp_path: Path) -> None:
    line = json.dumps(_line("u", max_tokens=4)) + "\n"
    path = tmp_path / "upload.jsonl"
    with path.open("w") as f:
        for i in range(40_000_000 // len(line)):
            f.write(line.replace('"u"', f'"u-{i}"', 1))
    size = path.stat().st_size
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    tracemalloc.start()
    try:
        with path.open("rb") as stream:
            reply = httpx.post(
                f"{server}/v1/files",
                files={"file": ("upload.jsonl", stream, "application/jsonl")},
                data={"purpose": "batch"},
                timeout=300,
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply.status_code == 200, reply.text
    doc = reply.json()
    assert doc["bytes"] == size
    assert peak < size / 2, (
        f"the upload peaked at {peak / 1e6:.1f} MB in this process for {size / 1e6:.1f} MB"
    )
    got = hashlib.sha256()
    with httpx.stream("GET", f"{server}/v1/files/{doc['id']}/content", timeout=300) as content:
        for chunk in content.iter_bytes():
            got.update(chunk)
    assert got.hexdigest() == digest
    assert httpx.delete(f"{server}/v1/files/{doc['id']}").is_success


def test_file_store_and_open_job_quotas_give_429(services: Any, server: str) -> None:
    import ray

    config, _, controller = services
    files = Path(config.api.state_dir or "") / "files"
    listed = httpx.get(f"{server}/v1/files").json()["data"]
    count, stored = len(listed), sum(f["bytes"] for f in listed)
    data = (json.dumps(_line("q")) + "\n").encode()
    with app_server(services, max_files=count + 1) as url:
        first = _upload(url, "q1.jsonl", data)
        assert first.status_code == 200, first.text
        reply = _upload(url, "q2.jsonl", data)
        assert reply.status_code == 429, reply.text
        assert reply.json()["error"]["code"] == "quota_exceeded" and "max_files" in reply.text
        assert httpx.delete(f"{url}/v1/files/{first.json()['id']}").is_success
    with app_server(services, max_file_store_bytes=stored + len(data) // 2) as url:
        reply = _upload(url, "q3.jsonl", data)
        assert reply.status_code == 429 and "max_file_store_bytes" in reply.text, reply.text
    assert len(httpx.get(f"{server}/v1/files").json()["data"]) == count
    assert not list(files.glob("*.tmp")), "a refused upload left its bytes behind"

    uploaded = _upload(server, "quota.jsonl", data).json()
    statuses = ray.get(controller.snapshot.remote())["jobs"]
    active = ("validating", "queued", "running", "finalizing", "cancelling", "expiring")
    open_jobs = sum(n for key, n in statuses.items() if key.partition(":")[2] in active)
    with app_server(services, max_open_jobs=open_jobs + 1) as url:
        # A job of another test may finish meanwhile and free a place: create until refused.
        created = []
        for n in range(4):
            reply = httpx.post(f"{url}/v1/jobs", json={"job_id": f"quota-{n}"})
            if reply.status_code != 200:
                break
            created.append(f"quota-{n}")
        assert 1 <= len(created) <= 3, created
        assert reply.status_code == 429 and reply.json()["error"]["code"] == "quota_exceeded"
        batch = {
            "input_file_id": uploaded["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        reply = httpx.post(f"{url}/v1/batches", json=batch)
        assert reply.status_code == 429 and "max_open_jobs" in reply.text, reply.text
    assert httpx.get(f"{server}/v1/jobs/quota-{len(created)}").status_code == 404
    for job in created:
        assert httpx.post(f"{server}/v1/jobs/{job}/cancel").is_success


# ------------------------------------------------------------------------------ ids, backlog
def test_job_ids_the_output_layout_refuses_are_400_and_leave_no_job(
    services: Any, server: str
) -> None:
    import ray

    _, queue, _ = services
    bad = [".", "..", "a/b", "../up", "", "a\x00b", "a\nb", "a\n", "x" * 129, "has space", "é"]
    for job_id in bad:
        reply = httpx.post(f"{server}/v1/jobs", json={"job_id": job_id})
        assert reply.status_code == 400, (job_id, reply.text)
        assert reply.json()["error"]["param"] == "job_id", reply.text
    known = set(ray.get(queue.stats.remote())["jobs"])
    listed = {j["id"] for j in httpx.get(f"{server}/v1/jobs", params={"limit": 100}).json()["data"]}
    assert not (set(bad) & (known | listed))


def test_batch_creation_gets_429_over_the_backlog_cap_and_creates_nothing(
    services: Any, tmp_path: Path
) -> None:
    with app_server(services, max_backlog_items=100) as url:  # the module's backlog is far less
        data = "".join(json.dumps(_line(f"b-{i}")) + "\n" for i in range(101)).encode()
        uploaded = _upload(url, "backlog.jsonl", data).json()
        before = [
            b["id"] for b in httpx.get(f"{url}/v1/batches", params={"limit": 100}).json()["data"]
        ]
        batch = {
            "input_file_id": uploaded["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        reply = httpx.post(f"{url}/v1/batches", json=batch)
        assert reply.status_code == 429, reply.text
        assert int(reply.headers["retry-after"]) >= 1
        assert reply.json()["error"]["code"] == "backlog_full"
        after = [
            b["id"] for b in httpx.get(f"{url}/v1/batches", params={"limit": 100}).json()["data"]
        ]
        assert after == before
        small = _upload(url, "small.jsonl", data[: data.index(b"\n") + 1]).json()
        reply = httpx.post(f"{url}/v1/batches", json={**batch, "input_file_id": small["id"]})
        assert reply.status_code == 200, reply.text


# ------------------------------------------------------------------------------ inference serve
YAML_TOKEN = "yaml-token-0123456789abcdef"
ENV_TOKEN = "env-token-0123456789abcdef"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``inference serve`` with a token from its config and one from the environment, its own
    embedded Ray (temp folder kept until the module ends, so its logs can be read)."""
    base = tmp_path_factory.mktemp("served")
    config = base / "serve.yaml"
    config.write_text(
        "engine: {kind: transformers, model: tiny-llama, device: cpu}\n"
        "batching: {max_batch_size: 16}\n"
        f"output: {{path: {base / 'out'}, rows_per_shard: 20, max_shard_age_s: 0.5}}\n"
        f"api: {{tokens: [{YAML_TOKEN}]}}\n"
        "scaling: {max_workers: 1}\n"
    )
    port, log = _free_port(), base / "serve.log"
    ray_tmp = Path(tempfile.mkdtemp(prefix="irs-", dir="/tmp"))  # Ray's socket paths stay short
    with serve(config, port, log, token=ENV_TOKEN, ray_tmp=str(ray_tmp)) as proc:
        yield {
            "url": f"http://127.0.0.1:{port}",
            "proc": proc,
            "ray_tmp": ray_tmp,
            "base": base,
            "config": config,
            "log": log,
        }


def _tcp_listeners() -> dict[int, list[tuple[str, int]]]:
    """Listening TCP sockets by inode, from /proc/net/tcp and tcp6 (what ``ss -ltn`` reads)."""
    out: dict[int, list[tuple[str, int]]] = {}
    for name in ("tcp", "tcp6"):
        with suppress(OSError), open(f"/proc/net/{name}") as f:
            next(f)
            for row in f:
                fields = row.split()
                if fields[3] != "0A":  # LISTEN
                    continue
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    ip = str(ipaddress.IPv4Address(raw[::-1]))
                else:
                    ip = str(
                        ipaddress.IPv6Address(
                            b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                        )
                    )
                out.setdefault(int(fields[9]), []).append((ip, int(port, 16)))
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def test_the_embedded_ray_cluster_listens_on_loopback_only(served: dict[str, Any]) -> None:
    pids = _session_pids(served["proc"].pid)
    listeners = _tcp_listeners()
    found: dict[int, list[tuple[str, int]]] = {}
    for pid in pids:
        for inode in _socket_inodes(pid):
            if inode in listeners:
                found.setdefault(pid, []).extend(listeners[inode])
    names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in found}
    assert len(found) >= 3, f"too few listening Ray processes found: {found} {names}"
    exposed = {
        names[pid]: [a for a in addrs if not _is_loopback(a[0])] for pid, addrs in found.items()
    }
    assert not any(exposed.values()), exposed
    if shutil.which("ss"):  # the same seen by ss, where it is installed
        text = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
        for line in text.splitlines():
            owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
            if owners & set(pids):
                local = line.split()[3]
                host = local.rsplit(":", 1)[0].strip("[]").split("%")[0]
                assert host != "*" and _is_loopback(host), line


def test_tokens_are_never_stored(served: dict[str, Any], tmp_path: Path) -> None:
    from openai import OpenAI

    url = served["url"]
    for token in (ENV_TOKEN, YAML_TOKEN):  # both accepted
        assert httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {token}"}).is_success
    headers = {"Authorization": f"Bearer {ENV_TOKEN}"}
    assert httpx.post(f"{url}/v1/jobs", json={"job_id": "secret-job"}, headers=headers).is_success
    items = [_item(f"n-{i}") for i in range(5)]
    reply = httpx.post(f"{url}/v1/jobs/secret-job/items", json={"items": items}, headers=headers)
    assert reply.status_code == 200, reply.text
    client = OpenAI(base_url=f"{url}/v1", api_key=ENV_TOKEN, max_retries=0, timeout=60)
    path = _jsonl(tmp_path / "in.jsonl", [_line(f"b-{i}") for i in range(5)])
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert wait_batch(client, batch.id, timeout_s=180).status == "completed"
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/v1/jobs/secret-job", headers=headers).json()["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    time.sleep(3)  # let the loggers flush
    base, ray_tmp = served["base"], served["ray_tmp"]
    assert (base / "out" / "_queue" / "queue.sqlite").is_file()
    assert (base / "out" / "_queue" / "controller.sqlite").is_file()
    assert (base / "out" / "secret-job" / "job.json").is_file()
    assert list(ray_tmp.rglob("*.log")) or list(ray_tmp.rglob("*.out")), "no Ray logs to read"
    found = []
    for root in (base, ray_tmp):
        for file in root.rglob("*"):
            if file == served["config"] or not file.is_file() or file.is_symlink():
                continue
            with suppress(OSError):
                data = file.read_bytes()
                found += [f"{file}: {t}" for t in (ENV_TOKEN, YAML_TOKEN) if t.encode() in data]
    assert not found, found
