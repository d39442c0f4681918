"""Estimates against what jobs really took, on the shared local Ray cluster with the bundled
model: ``inference run`` jobs (the estimate before, the actual after, in job.json) and
``POST /v1/jobs/estimate`` on a live server (uploaded file, inline items, bad input)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from inference.config import load_config
from inference.measurements import MeasurementStore, measurements_dir
from tests.conftest import EXAMPLES, REPO
from tests.support.api_server import (
    TOKEN,
    _jsonl,
    _line,
    api_config,
    cluster_services,
    live_server,
)


def _lines(start: int, count: int) -> list[str]:
    with (EXAMPLES / "chat.jsonl").open() as f:
        return [line for i, line in enumerate(f) if start <= i < start + count]


def _run_config(base: Path, queue_db: Path):
    config = load_config(REPO / "configs" / "tiny-cpu.yaml")
    return config.with_updates(
        output={"path": str(base / "out"), "rows_per_shard": 200},
        queue={"db_path": str(queue_db)},
        scaling={"max_workers": 2},
        api={"state_dir": str(base / "state")},  # measurements of this module only
    )


def _within(estimated: float, actual: float, share: float) -> bool:
    return abs(estimated - actual) <= share * actual


@pytest.fixture(scope="module")
def measured_runs(ray_cluster: Path, queue_db: Path, tmp_path_factory: pytest.TempPathFactory):
    """Job A runs on an unmeasured model (its estimate has no throughput), then job B, of
    other items and more of them, runs after an estimate from A's measurements."""
    from inference.estimate import estimate_input
    from inference.runner import run_job

    base = tmp_path_factory.mktemp("estimate")
    config = _run_config(base, queue_db)
    a = base / "a.jsonl"
    a.write_text("".join(_lines(0, 200)))
    b = base / "b.jsonl"
    b.write_text("".join(_lines(200, 300)))
    run_a = run_job(a, config, job_id="estimate-a")
    job_a = json.loads((Path(run_a.output) / "job.json").read_text())
    before_b = estimate_input(b, config)
    of_a = estimate_input(a, config)
    run_b = run_job(b, config, job_id="estimate-b")
    job_b = json.loads((Path(run_b.output) / "job.json").read_text())
    return config, job_a, job_b, before_b, of_a


def test_job_json_holds_the_estimate_beside_the_actual(measured_runs) -> None:
    _, job_a, job_b, _, _ = measured_runs
    for job in (job_a, job_b):
        actual = job["actual"]
        assert actual["duration_s"] == pytest.approx(job["wall_s"])
        assert (actual["prompt_tokens"], actual["completion_tokens"]) == (
            job["prompt_tokens"],
            job["completion_tokens"],
        )
        assert actual["cost"] == job["cost"] and actual["workers"] == 2
        assert job["estimate"]["items"] == job["total"]
    # A ran on an unmeasured model: no throughput, and the most every answer may take.
    assert job_a["estimate"]["throughput_source"] == "unknown"
    assert job_a["estimate"]["now"]["duration_s"] is None
    assert job_a["estimate"]["output_tokens"] == job_a["estimate"]["max_output_tokens"]
    # The tokenizer counts the prompts as the engine did (the engine counted them itself).
    assert job_a["estimate"]["prompt_tokens"] == job_a["prompt_tokens"]
    assert job_b["estimate"]["throughput_source"] == "measured"
    assert job_b["estimate"]["now"]["workers"] == 2


def test_a_finished_job_updates_its_models_measurements(measured_runs) -> None:
    config, job_a, job_b, _, _ = measured_runs
    store = MeasurementStore(measurements_dir(config))
    measured = store.read("tiny-llama")
    assert measured.jobs == 2
    tokens = sum(j["prompt_tokens"] + j["completion_tokens"] for j in (job_a, job_b))
    assert measured.tokens_per_s == pytest.approx(tokens / (job_a["busy_s"] + job_b["busy_s"]))
    budget = job_a["estimate"]["max_output_tokens"] + job_b["estimate"]["max_output_tokens"]
    completion = job_a["completion_tokens"] + job_b["completion_tokens"]
    assert measured.completion_ratio == pytest.approx(completion / budget)
    assert measured.startup_s is not None and measured.startup_s > 0


def test_the_estimate_of_a_new_input_is_within_a_quarter_of_its_measured_duration(
    measured_runs,
) -> None:
    _, _, job_b, before_b, _ = measured_runs
    assert before_b["throughput_source"] == "measured"
    # The output share measured on A predicts B's completion tokens.
    assert _within(before_b["output_tokens"], job_b["completion_tokens"], 0.25)
    assert before_b["prompt_tokens"] == job_b["prompt_tokens"]
    estimated, actual = before_b["now"]["duration_s"], job_b["actual"]["duration_s"]
    assert _within(estimated, actual, 0.25), (estimated, actual)
    # Cost is engine time alone, and a small job's workers spend a larger share of theirs
    # warming up: A's throughput runs some 20% under B's, so cost gets a wider margin.
    assert _within(before_b["now"]["cost"], job_b["cost"], 0.4)


def test_the_estimate_of_a_finished_jobs_input_is_within_a_quarter_of_its_duration(
    measured_runs,
) -> None:
    _, job_a, _, _, of_a = measured_runs
    estimated, actual = of_a["now"]["duration_s"], job_a["actual"]["duration_s"]
    assert _within(estimated, actual, 0.25), (estimated, actual)


def test_the_deadline_asks_for_the_workers_that_meet_it(measured_runs) -> None:
    from inference.estimate import estimate_input

    config = measured_runs[0]
    plain = estimate_input(EXAMPLES / "chat.jsonl", config)
    deadline_s = math.ceil((plain["startup_s"] + plain["engine_s"] / 5) * 1000) / 1000
    est = estimate_input(EXAMPLES / "chat.jsonl", config, f"{deadline_s}s")
    assert est["items"] == 2000
    assert est["deadline"]["workers_needed"] == 5
    assert est["deadline"]["feasible"] is False  # max_workers is 2
    assert est["max"]["duration_s"] > deadline_s


# ------------------------------------------------------------------------------ HTTP
@pytest.fixture(scope="module")
def server(ray_cluster: Path, queue_db: Path, tmp_path_factory: pytest.TempPathFactory):
    from inference.api.app import create_app

    config = api_config(tmp_path_factory.mktemp("estimate-api"), queue_db, tokens=[TOKEN])
    with (
        cluster_services(config) as (queue, controller),
        live_server(create_app(config, queue, controller)) as url,
    ):
        yield config, url


@pytest.fixture()
def http(server) -> Any:
    with httpx.Client(
        base_url=server[1], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120
    ) as c:
        yield c


def _upload(http: httpx.Client, path: Path) -> str:
    with path.open("rb") as f:
        reply = http.post("/v1/files", files={"file": (path.name, f)}, data={"purpose": "batch"})
    assert reply.status_code == 200, reply.text
    return str(reply.json()["id"])


def test_an_uploaded_file_and_the_same_items_inline_get_the_same_estimate(
    http: httpx.Client, tmp_path: Path
) -> None:
    lines = [_line(f"q{i}", max_tokens=8) for i in range(12)]
    file_id = _upload(http, _jsonl(tmp_path / "in.jsonl", lines))
    by_file = http.post(
        "/v1/jobs/estimate",
        json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", "deadline": "1h"},
    )
    assert by_file.status_code == 200, by_file.text
    inline = http.post("/v1/jobs/estimate", json={"items": lines, "deadline": "1h"})
    assert inline.status_code == 200, inline.text
    a, b = by_file.json(), inline.json()
    assert a["object"] == "job.estimate" and a["items"] == 12
    assert a["max_output_tokens"] == 12 * 8
    assert a["prompt_tokens"] == b["prompt_tokens"] > 12 * 5
    assert a["counting"]["method"] == "tokenizer" and not a["counting"]["extrapolated"]
    assert a["now"]["workers"] >= 1 and a["max"]["workers"] == 1  # max_workers 1 here
    assert a["deadline"]["deadline_s"] == 3600


def test_a_responses_file_is_estimated_as_its_batch_would_run_it(
    http: httpx.Client, tmp_path: Path
) -> None:
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/responses",
            "body": {"model": "tiny-llama", "input": f"say r{i}", "max_output_tokens": 7},
        }
        for i in range(5)
    ]
    file_id = _upload(http, _jsonl(tmp_path / "responses.jsonl", lines))
    reply = http.post(
        "/v1/jobs/estimate", json={"input_file_id": file_id, "endpoint": "/v1/responses"}
    )
    assert reply.status_code == 200, reply.text
    est = reply.json()
    assert est["items"] == 5 and est["max_output_tokens"] == 5 * 7
    inline = http.post("/v1/jobs/estimate", json={"items": lines}).json()
    assert inline["prompt_tokens"] == est["prompt_tokens"] > 5 * 3


def test_bad_estimate_requests_are_refused_naming_what_and_where(
    http: httpx.Client, tmp_path: Path
) -> None:
    bad_item = _line("x1")
    bad_item["body"]["max_tokens"] = -3
    reply = http.post("/v1/jobs/estimate", json={"items": [_line("ok"), bad_item]})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"].startswith("items[1]") and "max_tokens" in error["message"]

    lines: list[Any] = [_line("a1"), "{not json", _line("a3")]
    file_id = _upload(http, _jsonl(tmp_path / "bad.jsonl", lines))
    reply = http.post(
        "/v1/jobs/estimate", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    )
    assert reply.status_code == 400
    assert "line 2" in reply.json()["error"]["message"]

    reply = http.post("/v1/jobs/estimate", json={"items": [_line("a")], "deadline": "soon"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "deadline"
    reply = http.post("/v1/jobs/estimate", json={})
    assert reply.status_code == 400 and "input_file_id" in reply.json()["error"]["message"]
    reply = http.post(
        "/v1/jobs/estimate", json={"input_file_id": "file-nope", "endpoint": "/v1/completions"}
    )
    assert reply.status_code == 404


def test_a_finished_batch_has_estimate_and_actual_and_measures_the_model(
    server, http: httpx.Client, tmp_path: Path
) -> None:
    config, _ = server
    lines = [_line(f"m{i}", max_tokens=16) for i in range(16)]
    file_id = _upload(http, _jsonl(tmp_path / "run.jsonl", lines))
    batch = http.post(
        "/v1/batches",
        json={
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    ).json()
    deadline = time.monotonic() + 180
    while batch["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, batch["status"]
        time.sleep(0.5)
        batch = http.get(f"/v1/batches/{batch['id']}").json()
    assert batch["status"] == "completed", batch
    job = json.loads((Path(config.output.path) / batch["id"] / "job.json").read_text())
    assert job["estimate"]["items"] == 16 and job["estimate"]["max_output_tokens"] == 16 * 16
    assert job["actual"]["completion_tokens"] == job["completion_tokens"] > 0
    assert job["actual"]["duration_s"] > 0
    after = http.post("/v1/jobs/estimate", json={"items": lines}).json()
    assert after["throughput_source"] == "measured"
    assert after["output_ratio"] == pytest.approx(job["completion_tokens"] / (16 * 16))
    assert after["now"]["duration_s"] > 0
