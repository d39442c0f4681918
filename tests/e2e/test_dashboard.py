"""The dashboard in a real headless Chromium (Debian's ``chromium``), driven over the DevTools
protocol, against a real server (uvicorn in a thread) over the shared local Ray cluster with a
live job: the page renders, shows the job, its progress moves, and every request it makes goes
to the server. A screenshot is saved under the test's temp folder."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from inference.config import Config, load_config
from tests.conftest import REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium: install Debian's chromium package (apt-get install -y chromium)",
)
ITEMS = 200
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--window-size=1400,1200",
]


def _config(base: Path, queue_db: Path) -> Config:
    config = load_config(REPO / "configs" / "tiny-cpu.yaml")
    return config.with_updates(
        output={"path": str(base / "out"), "rows_per_shard": 50, "max_shard_age_s": 0.5},
        queue={"db_path": str(queue_db), "lease_s": 20, "backoff_base_s": 0.1},
        batching={"max_batch_size": 8},
        scaling={"max_workers": 1, "cost_per_gpu_hour": 2.0},
        api={"state_dir": str(base / "state")},
    )


@contextmanager
def _server(config: Config) -> Iterator[str]:
    """The WorkQueue, a fresh Controller and the API on a free loopback port; all stopped after."""
    import ray
    import uvicorn

    from inference.api.app import create_app
    from inference.api.server import state_dir
    from inference.controller import get_or_create_controller
    from inference.queue.actor import get_or_create_queue
    from inference.runner import queue_db_path

    queue = get_or_create_queue(queue_db_path(config, config.output.path))
    controller = get_or_create_controller(state_dir(config))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(create_app(config, queue, controller), log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
        ray.get(controller.shutdown.remote(), timeout=120)
        ray.kill(controller, no_restart=True)


@contextmanager
def _chromium(profile: Path) -> Iterator[str]:
    """Headless Chromium with a fresh profile; yields its DevTools websocket URL."""
    assert CHROMIUM is not None
    log = (profile.parent / "chromium.log").open("wb")
    proc = subprocess.Popen(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            assert proc.poll() is None, (profile.parent / "chromium.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        yield f"ws://127.0.0.1:{port}{path}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class DevTools:
    """A minimal DevTools protocol client (flat sessions over the browser's websocket); keeps
    the events that arrive while it waits for replies."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.last_id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self.last_id += 1
        message: dict[str, Any] = {"id": self.last_id, "method": method, "params": params or {}}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        await self.ws.send_str(json.dumps(message))
        while True:
            reply = json.loads((await self.ws.receive(timeout=30)).data)
            if reply.get("id") == self.last_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return dict(reply["result"])
            self.events.append(reply)

    async def evaluate(self, expression: str) -> Any:
        reply = await self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}
        )
        assert "exceptionDetails" not in reply, reply["exceptionDetails"]
        return reply["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.25)


def _row(job: str) -> str:
    return f"""(() => {{
      const r = document.querySelector('tr.job[data-job="{job}"]');
      if (!r) return null;
      return {{done: +r.dataset.done, total: +r.dataset.total, status: r.dataset.status,
               fraction: +r.dataset.fraction, text: r.innerText,
               updates: +document.body.dataset.updates}};
    }})()"""


async def _drive(ws_url: str, base: str, job: str, shot: Path) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:
        tools = DevTools(ws)
        target = await tools.send("Target.createTarget", {"url": "about:blank"})
        attached = await tools.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        tools.session = attached["sessionId"]
        await tools.send("Network.enable")
        await tools.send("Page.enable")
        await tools.send("Page.navigate", {"url": f"{base}/dashboard"})
        first = await tools.wait_for(_row(job), 60, "the job on the page")
        # Let the job move on the server, then see the page follow on its own.
        moved = (
            f"(() => {{ const r = {_row(job)}; return r && r.done > {first['done']}"
            " && document.querySelectorAll('#workers tr.worker').length > 0 && r })()"
        )
        second = await tools.wait_for(moved, 90, "the job's progress to move, with its worker")
        await tools.wait_for(
            f"+document.body.dataset.updates >= {second['updates'] + 1}", 30, "more refreshes"
        )
        page = await tools.evaluate(
            """({
              chart: !!document.querySelector('#chart canvas'),
              error: document.querySelector('#error').hidden ? null
                     : document.querySelector('#error').textContent,
              workers: document.querySelectorAll('#workers tr.worker').length,
              pools: [...document.querySelectorAll('#pools li.pool')].map(e => e.textContent),
              depth: document.querySelector('#depth').innerText,
              cards: document.querySelector('#cards').innerText,
              webhooks: document.querySelector('#webhooks-summary').textContent,
              resources: [location.href,
                          ...performance.getEntriesByType('resource').map(e => e.name)],
            })"""
        )
        png = await tools.send("Page.captureScreenshot", {"format": "png"})
        shot.write_bytes(base64.b64decode(png["data"]))
        requested = [
            e["params"]["request"]["url"]
            for e in tools.events
            if e.get("method") == "Network.requestWillBeSent"
        ]
        return {"first": first, "second": second, "page": page, "requested": requested}


def test_dashboard_shows_a_live_job_in_a_real_browser(
    ray_cluster: Path, queue_db: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    job = f"dash-{int(time.time() * 1000) % 10**8}"
    with (
        _server(_config(tmp_path, queue_db)) as base,
        httpx.Client(base_url=base, timeout=60) as http,
    ):
        assert http.post("/v1/jobs", json={"job_id": job}).status_code == 200
        items = [
            {
                "custom_id": f"item-{i:04d}",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "tiny-llama",
                    "messages": [{"role": "user", "content": f"count to {i}"}],
                    "max_tokens": 24,
                },
            }
            for i in range(ITEMS)
        ]
        reply = http.post(f"/v1/jobs/{job}/items", json={"items": items})
        assert reply.status_code == 200, reply.text
        assert reply.json()["accepted"] == ITEMS
        shot = tmp_path / "dashboard.png"
        profile = tmp_path / "chromium-profile"
        profile.mkdir()
        try:
            with _chromium(profile) as ws_url:
                seen = asyncio.run(_drive(ws_url, base, job, shot))
            state = http.get("/v1/dashboard/state").json()
        finally:  # leave no pending items for the next Controller of this shared cluster
            http.post(f"/v1/jobs/{job}/cancel")
    print(f"\ndashboard screenshot: {shot} ({time.monotonic() - started:.1f}s)")

    first, second, page = seen["first"], seen["second"], seen["page"]
    assert first["total"] == ITEMS and job in first["text"]
    assert second["done"] > first["done"], "the page's progress did not move"
    assert second["updates"] > first["updates"]
    assert page["error"] is None
    assert page["chart"], "no throughput chart"
    assert page["workers"] >= 1
    assert any(p.startswith("pool tiny-llama: fixed, 1 worker") for p in page["pools"]), page
    assert "pending" in page["depth"] and "priority" in page["depth"]
    assert page["webhooks"] == "No endpoints configured (api.webhooks)."
    # Every request of the page went to this server, nowhere else.
    urls = seen["requested"] + page["resources"]
    assert any(u.endswith("/v1/dashboard/state") for u in urls)
    assert any(u.endswith("/dashboard/static/uPlot.iife.min.js") for u in urls)
    outside = [u for u in urls if not u.startswith(base + "/")]
    assert not outside, f"requests outside the server: {outside}"
    assert shot.stat().st_size > 10_000
    # The JSON the page drew from: the job with ETA inputs, cost and a throughput history.
    row = next(j for j in state["jobs"] if j["id"] == job)
    assert row["done"] >= second["done"] and row["busy_s"] > 0
    assert row["cost"] > 0 and row["cost_per_gpu_hour"] == 2.0
    assert len(state["throughput"]["t"]) >= 2
