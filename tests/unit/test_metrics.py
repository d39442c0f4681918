"""``/metrics`` text (the server's series plus issue 8's) parses with prometheus_client's parser
and carries the series; the dashboard's routes sit behind the bearer guard; its page loads only
files the package serves."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from inference import metrics
from inference.api.dashboard import STATIC
from inference.config import load_config
from tests.conftest import REPO

TOKEN = "unit-token-0123456789abcdef"


def _stats(**over: Any) -> dict[str, Any]:
    base = {
        "state": "active",
        "pool": "tiny-llama",
        "pending": 60,
        "waiting": 10,
        "leased": 8,
        "done": 30,
        "dead": 2,
        "total": 100,
        "pending_tokens": 1200,
        "pending_by_priority": {0: 50, 5: 10},
        "oldest_pending_s": 12.5,
        "lease_expiries": 3,
        "prompt_tokens": 600,
        "completion_tokens": 900,
        "busy_s": 72.0,
        "not_before": 0.0,
    }
    return {**base, **over}


PROGRESS = {
    "fraction": 0.32,
    "items_per_s": 1.5,
    "tokens_per_s": 75.0,
    "eta_s": 45.0,
    "busy_s": 72.0,
    "cost": 0.0,
    "cost_to_finish": None,
}
WORKER = {
    "worker": "tiny-llama-0a1b2c3d",
    "pool": "tiny-llama",
    "state": "busy",
    "node": "head",
    "gpus": [0],
    "batches": 4,
    "items": 30,
    "busy_s": 72.0,
    "last_batch_size": 8,
    "last_batch_tokens": 410,
}


def _text() -> str:
    from inference.api.coalesce import Coalescer
    from inference.api.ops import _families
    from inference.api.state import ServerState

    stats = {"job-a": _stats(), "job-b": _stats(pending=0, leased=0, done=100, dead=0)}
    snapshot = {
        "backlog": 60,
        "items_per_s": 1.5,
        "jobs": {"native:running": 1, "native:completed": 1},
        "pools": {"tiny-llama": {"workers": 1, "lost": 0}},
    }
    config = load_config(REPO / "configs" / "tiny-cpu.yaml")
    state = ServerState(config=config, queue=None, controller=None, coalescer=Coalescer(None))
    state.requests = Counter({("GET", "/metrics", 200): 2})
    families = _families(stats, snapshot, state.counters())
    families += metrics.families(stats, {"job-a": PROGRESS}, [WORKER], {"job-a": 2.0, "job-b": 2.0})
    return metrics.render(families)


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_metrics_text_parses_and_carries_every_series() -> None:
    samples = _samples(_text())
    requests = samples["inference_http_requests_total"]
    assert requests == [({"method": "GET", "route": "/metrics", "status": "200"}, 2.0)]
    for name in (
        "inference_queue_depth",
        "inference_queue_pending_by_priority",
        "inference_leases",
        "inference_lease_expiries_total",
        "inference_dead_letters",
        "inference_worker_batch_size",
        "inference_worker_batch_tokens",
        "inference_job_items_per_second",
        "inference_job_tokens_per_second",
        "inference_job_eta_seconds",
        "inference_gpu_seconds_total",
        "inference_cost",
        "inference_cost_to_finish",
        "inference_http_requests_total",
        "inference_workers_lost_total",
    ):
        assert name in samples, f"{name} missing from /metrics"
    depth = {lab["state"]: v for lab, v in samples["inference_queue_depth"]}
    assert depth["pending"] == 60 and depth["leased"] == 8 and depth["dead"] == 2
    assert {lab["priority"]: v for lab, v in samples["inference_queue_pending_by_priority"]} == {
        "0": 100,
        "5": 20,
    }
    assert samples["inference_leases"] == [({}, 8.0)]
    assert ({"job": "job-a"}, 3.0) in samples["inference_lease_expiries_total"]
    assert samples["inference_worker_batch_size"][0][1] == 8
    assert samples["inference_worker_batch_tokens"][0][1] == 410
    assert samples["inference_job_items_per_second"] == [({"job": "job-a"}, 1.5)]
    # 72 busy seconds at $2 per GPU-hour: $0.04; 68 items left at 2.4 s each: $0.0907.
    cost = dict((lab["job"], v) for lab, v in samples["inference_cost"])
    assert cost["job-a"] == pytest.approx(0.04)
    to_finish = dict((lab["job"], v) for lab, v in samples["inference_cost_to_finish"])
    assert to_finish["job-a"] == pytest.approx(72 / 30 * 68 / 3600 * 2)
    assert to_finish["job-b"] == 0.0  # nothing left


def test_a_job_without_progress_has_no_rate_and_no_eta() -> None:
    samples = _samples(metrics.render(metrics.families({"j": _stats()}, {}, [], {})))
    assert "inference_job_eta_seconds" not in samples
    assert samples["inference_job_progress_ratio"] == [({"job": "j"}, 0.32)]
    assert samples["inference_cost"] == [({"job": "j"}, 0.0)]


def test_cost_to_finish_is_unknown_before_the_first_item_completes() -> None:
    assert metrics.job_cost(_stats(done=0, busy_s=0.0), 3.0) == (0.0, None)
    cost, to_finish = metrics.job_cost(_stats(done=50, pending=50, leased=0, busy_s=360.0), 3.0)
    assert cost == pytest.approx(0.3) and to_finish == pytest.approx(0.3)


@pytest.fixture()
def guarded() -> TestClient:
    """The app with tokens, over no cluster: the guard answers before any route runs."""
    from inference.api.app import create_app

    config = load_config(REPO / "configs" / "tiny-cpu.yaml").with_updates(api={"tokens": [TOKEN]})
    return TestClient(create_app(config, queue=None, controller=None))


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/jobs/job-a/redrive"),
        ("POST", "/v1/jobs/job-a/pause"),
        ("POST", "/v1/jobs/job-a/resume"),
        ("GET", "/v1/dashboard/state"),
        ("GET", "/metrics"),
    ],
)
def test_dashboard_routes_need_the_bearer_token(guarded: TestClient, method: str, path: str):
    reply = guarded.request(method, path)
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"] == "Bearer"


def test_the_page_opens_without_a_token_but_holds_no_data(guarded: TestClient) -> None:
    """A browser's address bar sends no Authorization header: the page and its scripts are
    open, the state they then fetch is not."""
    assert guarded.get("/dashboard").status_code == 200
    assert guarded.get("/dashboard/static/dashboard.js").status_code == 200
    assert guarded.get("/v1/dashboard/state").status_code == 401


def test_static_files_are_served_and_nothing_else(guarded: TestClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    js = guarded.get("/dashboard/static/dashboard.js", headers=auth)
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "connect-src 'self'" in js.headers["content-security-policy"]
    for name in ("..%2Fapp.py", ".hidden", "missing.js"):
        assert guarded.get(f"/dashboard/static/{name}", headers=auth).status_code == 404
    page = guarded.get("/dashboard", headers=auth)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_the_page_loads_only_files_of_the_package() -> None:
    html = (STATIC / "dashboard.html").read_text()
    urls = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert urls
    for url in urls:
        if url == "data:,":
            continue
        assert url.startswith("/dashboard/static/"), url
        assert (STATIC / url.removeprefix("/dashboard/static/")).is_file(), url
    assert "http" not in (STATIC / "dashboard.js").read_text()


def test_the_grafana_dashboard_queries_only_series_the_server_exports() -> None:
    import json

    board = json.loads((REPO / "cluster" / "grafana-dashboard.json").read_text())
    exported = {name.removesuffix("_total") for name in _samples(_text())}
    exported |= set(_samples(_text()))
    queried = {
        name
        for panel in board["panels"]
        for target in panel["targets"]
        for name in re.findall(r"inference_[a-z_]+", target["expr"])
    }
    assert queried and queried <= exported, queried - exported
