"""HTTP enqueue benchmark: a real ``inference serve`` (subprocess, its own embedded Ray, the real
WorkQueue and SQLite store) driven over loopback by this process.

Measures, and prints as one JSON line at the end (progress goes to stderr):

- ``bulk_items_per_s``: ``POST /v1/jobs/{job}/items`` with 100 items per request from several
  concurrent clients (each request durable before its reply): the median of ``--bulk-rounds``
  rounds, each round's figure in ``bulk_rounds_items_per_s``;
- ``single_p50_ms`` / ``single_p99_ms``: one-item enqueues sent open-loop at 200 requests/s
  (a request's latency counts from its scheduled send time, so a stall is not hidden);
- where the time goes, measured in this process on the same items: ``validate_us_per_item``
  (the strict request model plus the project's parser, what the server does per item) and
  ``store_items_per_s`` (``QueueStore.enqueue`` of 100-item calls on a fresh database, no Ray,
  no HTTP: the ceiling the queue itself sets);
- ``host_loop_us``: the host's Python speed at the start and at the end (see ``hostspeed.py``).

The bench job's items are not leasable (``schedule.not_before`` far ahead), so no worker starts
and the figures are the API's and the queue's alone. Targets on a 2-core machine:
``bulk_items_per_s`` >= 20,000 and ``single_p99_ms`` <= 25.

``--workers N`` serves with N server processes (``inference serve --workers``).

    .venv/bin/python bench/http_bench.py                 # about a minute
    .venv/bin/python bench/http_bench.py --workers 2     # two server processes
    .venv/bin/python bench/http_bench.py --bulk-requests 100 --single-requests 400  # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from hostspeed import python_loop_us

REPO = Path(__file__).resolve().parents[1]
INFERENCE = str(Path(sys.executable).with_name("inference"))
TOKEN = "bench-token-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def item(cid: str) -> dict[str, Any]:
    return {
        "custom_id": cid,
        "url": "/v1/chat/completions",
        "body": {
            "model": "tiny-llama",
            "messages": [{"role": "user", "content": f"Classify the sentiment of review {cid}."}],
            "max_tokens": 16,
        },
    }


def body(prefix: str, n: int, size: int) -> bytes:
    return json.dumps({"items": [item(f"{prefix}-{n}-{i}") for i in range(size)]}).encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(workdir: Path, port: int, workers: int = 1) -> tuple[subprocess.Popen[bytes], str]:
    config = workdir / "bench.yaml"
    config.write_text(
        "engine: {kind: transformers, model: tiny-llama, device: cpu}\n"
        f"output: {{path: {workdir / 'out'}}}\n"
        "api: {max_backlog_items: 100000000}\n"
    )
    ray_tmp = tempfile.mkdtemp(prefix="ib-", dir="/tmp")
    env = {**os.environ, "INFERENCE_RAY_TEMP_DIR": ray_tmp, "INFERENCE_API_TOKENS": TOKEN}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [
            INFERENCE,
            "serve",
            "--config",
            str(config),
            "--workers",
            str(workers),
            "--port",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=(workdir / "serve.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise SystemExit((workdir / "serve.log").read_text()[-3000:])
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, ray_tmp
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.5)


def cpu_by_process(sid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of every process in the server's session, grouped:
    the server itself (with its worker processes), the WorkQueue actor, the Controller actor, and
    the rest of Ray."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            cmd = argv[0].decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) != sid:
            continue
        if int(entry.name) == sid or b"multiprocessing" in b" ".join(argv):
            name = "server"  # the server, or one of its processes (--workers)
        elif "WorkQueue" in cmd:
            name = "queue_actor"
        elif "Controller" in cmd:
            name = "controller_actor"
        else:
            name = "ray_other"
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float], per: int, prefix: str) -> dict:
    """CPU milliseconds per ``per`` unit (request or item), by process group."""
    return {
        f"{prefix}_{name}_cpu_ms": (after.get(name, 0.0) - before.get(name, 0.0)) * 1000 / per
        for name in ("server", "queue_actor", "controller_actor", "ray_other")
    }


def stop_server(proc: subprocess.Popen[bytes], ray_tmp: str) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(ray_tmp, ignore_errors=True)


async def bulk(
    url: str, job: str, requests: int, clients: int, size: int, round_no: int = 0
) -> dict[str, Any]:
    """``clients`` keep-alive connections, each sending its next request when the last one is
    answered (closed loop); the bare client of :class:`Connection`, so that the client's own
    CPU takes as little as it can from the two cores the server and the queue share."""
    bodies = [body(f"bulk{round_no}", n, size) for n in range(requests)]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    accepted = 0
    latencies: list[float] = []
    path = f"/v1/jobs/{job}/items"

    async def client(conn: Connection) -> None:
        nonlocal accepted
        while not queue.empty():
            payload = queue.get_nowait()
            start = time.perf_counter()
            status, reply = await conn.post(path, payload)
            latencies.append(time.perf_counter() - start)
            if status != 200:
                raise SystemExit(f"bulk enqueue failed: {status} {reply[:300]!r}")
            accepted += json.loads(reply)["accepted"]

    conns = [await Connection.open(url) for _ in range(clients)]
    status, reply = await conns[0].post(path, body(f"warm{round_no}", 0, size))
    if status != 200:
        raise SystemExit(f"warm-up enqueue failed: {status} {reply[:300]!r}")
    start = time.perf_counter()
    await asyncio.gather(*(client(conn) for conn in conns))
    wall = time.perf_counter() - start
    for conn in conns:
        conn.close()
    assert accepted == requests * size, accepted
    latencies.sort()
    return {
        "bulk_items_per_s": accepted / wall,
        "bulk_request_p50_ms": latencies[len(latencies) // 2] * 1000,
        "bulk_request_p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


class Connection:
    """A bare keep-alive HTTP/1.1 connection: the benchmark needs a client far cheaper than the
    server it measures (httpx costs about a millisecond of CPU a request here)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Connection:
        host, port = url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def post(self, path: str, payload: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        self.writer.write(head.encode() + payload)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        reply = await self.reader.readexactly(length)
        return int(status_line.split()[1]), reply

    def close(self) -> None:
        self.writer.close()


async def single(url: str, job: str, requests: int, rate: float) -> dict[str, Any]:
    bodies = [body("one", n, 1) for n in range(requests)]
    latencies: list[float] = []
    failures = 0
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(32):
        idle.put_nowait(await Connection.open(url))
    path = f"/v1/jobs/{job}/items"

    async def one(payload: bytes, due: float) -> None:
        nonlocal failures
        conn = await idle.get()
        status, _ = await conn.post(path, payload)
        idle.put_nowait(conn)
        latencies.append(time.perf_counter() - due)
        failures += status != 200

    for n in range(20):  # warm up
        await one(body("warm1", n, 1), time.perf_counter())
    latencies.clear()
    start = time.perf_counter()
    tasks = []
    for n, payload in enumerate(bodies):
        due = start + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(payload, due)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    while not idle.empty():
        idle.get_nowait().close()
    latencies.sort()
    return {
        "single_p50_ms": statistics.median(latencies) * 1000,
        "single_p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "single_max_ms": latencies[-1] * 1000,
        "single_sent_per_s": requests / wall,
        "single_failures": failures,
    }


async def capacity(url: str, job: str, requests: int, clients: int) -> dict[str, Any]:
    """One-item enqueues from a few closed-loop clients: the rate the server sustains, and the
    latency of a request that does not queue behind others (one client)."""
    bodies = [body("cap", n, 1) for n in range(requests)]
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=HEADERS, limits=limits, timeout=60) as http:
        alone = []
        for payload in bodies[: requests // 4]:
            start = time.perf_counter()
            await http.post(f"/v1/jobs/{job}/items", content=payload)
            alone.append(time.perf_counter() - start)
        rest = iter(bodies[requests // 4 :])

        async def client() -> int:
            sent = 0
            for payload in rest:
                await http.post(f"/v1/jobs/{job}/items", content=payload)
                sent += 1
            return sent

        start = time.perf_counter()
        sent = sum(await asyncio.gather(*(client() for _ in range(clients))))
        wall = time.perf_counter() - start
    return {
        "single_unloaded_p50_ms": statistics.median(alone) * 1000,
        "single_closed_loop_req_per_s": sent / wall,
    }


def breakdown(size: int, calls: int) -> dict[str, Any]:
    """Per-item validation cost and the store's own enqueue ceiling, in this process."""
    from inference.api.items import check_item
    from inference.api.models import EnqueueRequest
    from inference.config import ApiConfig
    from inference.queue import JobSpec, NewItem, QueueStore

    api = ApiConfig()
    raw = [body("v", n, size) for n in range(calls)]
    start = time.perf_counter()
    batches = []
    for payload in raw:
        parsed = EnqueueRequest.model_validate_json(payload)
        batches.append(
            [
                NewItem(it.custom_id, checked.payload, checked.tokens)
                for it in parsed.items
                for checked in [check_item(it.url, it.body, api)]
            ]
        )
    validate_s = time.perf_counter() - start
    folder = tempfile.mkdtemp(prefix="hb-")
    try:
        store = QueueStore(Path(folder) / "q.sqlite")
        store.create_job(JobSpec("bench"))
        start = time.perf_counter()
        for items in batches:
            store.enqueue("bench", items)
        store_s = time.perf_counter() - start
        store.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    n = size * calls
    return {"validate_us_per_item": validate_s / n * 1e6, "store_items_per_s": n / store_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items-per-request", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    parser.add_argument("--bulk-requests", type=int, default=400, help="per bulk round")
    parser.add_argument("--bulk-rounds", type=int, default=3)
    parser.add_argument("--single-rate", type=float, default=200.0)
    parser.add_argument("--single-requests", type=int, default=2000)
    args = parser.parse_args()

    host_before = python_loop_us()
    workdir = Path(tempfile.mkdtemp(prefix="http-bench-"))
    port = free_port()
    proc, ray_tmp = start_server(workdir, port, args.workers)
    url = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {}
    try:
        reply = httpx.post(
            f"{url}/v1/jobs",
            headers=HEADERS,
            json={"config": {"schedule": {"not_before": "2100-01-01T00:00:00Z"}}},
        )
        job = reply.json()["id"]
        log(f"job {job}: bulk, {args.bulk_requests} x {args.items_per_request} items")
        before = cpu_by_process(proc.pid)
        rounds = [
            asyncio.run(bulk(url, job, args.bulk_requests, args.clients, args.items_per_request, r))
            for r in range(args.bulk_rounds)
        ]
        rates = [r["bulk_items_per_s"] for r in rounds]
        result.update(rounds[rates.index(statistics.median_low(rates))])
        result["bulk_rounds_items_per_s"] = [round(r) for r in rates]
        n_items = args.bulk_rounds * args.bulk_requests * args.items_per_request
        result.update(cpu_delta(before, cpu_by_process(proc.pid), n_items // 1000, "bulk_per_1k"))
        log("capacity: one-item enqueues, closed loop")
        result.update(asyncio.run(capacity(url, job, 800, 8)))
        log(f"single: {args.single_requests} requests at {args.single_rate}/s")
        before = cpu_by_process(proc.pid)
        result.update(asyncio.run(single(url, job, args.single_requests, args.single_rate)))
        result.update(
            cpu_delta(before, cpu_by_process(proc.pid), args.single_requests, "single_per_req")
        )
        metrics = httpx.get(f"{url}/metrics", headers=HEADERS).text
        counters = dict(
            line.split(" ", 1) for line in metrics.splitlines() if line.startswith("inference_enq")
        )
        result["enqueue_requests_per_queue_call"] = float(
            counters["inference_enqueue_requests_total"]
        ) / max(1.0, float(counters["inference_enqueue_queue_calls_total"]))
    finally:
        stop_server(proc, ray_tmp)
        shutil.rmtree(workdir, ignore_errors=True)
    log("breakdown: validation and the store alone")
    result.update(breakdown(args.items_per_request, 100))
    result.update(
        {
            "items_per_request": args.items_per_request,
            "clients": args.clients,
            "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
            "host_loop_us": [host_before, python_loop_us()],
        }
    )
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
