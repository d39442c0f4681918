"""``/v1/responses`` end to end on a real uvicorn server over the shared local Ray cluster: the
official ``openai`` client uploads a Responses batch file, creates the batch with
``endpoint="/v1/responses"``, polls it and reads its output and error files, every answer parsed
by ``openai.types.responses.Response``; and a native job of mixed urls answers each item in the
shape of its own endpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from tests.support.api_server import (
    TOKEN,
    _jsonl,
    api_config,
    cluster_services,
    read_lines,
    wait_batch,
)

URL = "/v1/responses"


def _line(cid: str, **body: Any) -> dict[str, Any]:
    base = {"model": "tiny-llama", "input": f"say {cid}", "max_output_tokens": 6}
    return {"custom_id": cid, "method": "POST", "url": URL, "body": {**base, **body}}


def test_a_run_of_mixed_urls_records_each_rows_url_and_exports_it_in_its_shape(
    ray_cluster: Path, queue_db: Path, tmp_path: Path
) -> None:
    """``inference run`` and ``inference export`` (first in the module: no server's pool yet)."""
    from inference.admin import export_jsonl
    from inference.config import load_config
    from inference.runner import run_job
    from inference.shards import read_results
    from tests.conftest import REPO

    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    path = _jsonl(
        tmp_path / "mixed.jsonl",
        [
            _line("r-1"),
            {"custom_id": "c-1", "method": "POST", "url": "/v1/chat/completions", "body": chat},
            _line("r-2", reasoning={"effort": "high"}),
        ],
    )
    config = load_config(REPO / "configs" / "tiny-cpu.yaml").with_updates(
        output={"path": str(tmp_path / "out")}, queue={"db_path": str(queue_db)}
    )
    summary = run_job(path, config, job_id="responses-run")
    assert (summary.done, summary.dead) == (2, 1)
    rows = read_results(summary.output).to_pylist()
    assert {r["custom_id"]: r["url"] for r in rows} == {"r-1": URL, "c-1": "/v1/chat/completions"}

    out, err = export_jsonl(config, "responses-run", tmp_path / "export")  # no endpoint: rows'
    bodies = {
        line["custom_id"]: line["response"]["body"]
        for line in map(json.loads, out.read_text().splitlines())
    }
    Response.model_validate(bodies["r-1"])
    ChatCompletion.model_validate(bodies["c-1"])
    (error,) = map(json.loads, err.read_text().splitlines())
    assert error["custom_id"] == "r-2"
    assert error["response"]["body"]["error"]["message"].startswith(
        "body.reasoning is not supported on /v1/responses"
    )


@pytest.fixture(scope="module")
def services(ray_cluster: Path, queue_db: Path, tmp_path_factory: pytest.TempPathFactory):
    config = api_config(tmp_path_factory.mktemp("responses"), queue_db, tokens=[TOKEN])
    with cluster_services(config) as (queue, controller):
        yield config, queue, controller


def test_a_responses_batch_answers_each_line_as_a_response_and_refuses_tools(
    client: Any, tmp_path: Path
) -> None:
    path = _jsonl(
        tmp_path / "responses.jsonl",
        [
            _line("plain"),
            _line("instructed", instructions="Answer in one word."),
            _line(
                "items",
                input=[
                    {"type": "message", "role": "developer", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "input_text", "text": "Hello?"}]},
                ],
                temperature=0,
                metadata={"team": "search"},
                store=False,
            ),
            _line("tools", tools=[{"type": "function", "name": "f", "parameters": {}}]),
            _line("cut", max_output_tokens=1),
        ],
    )
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=URL, completion_window="24h")
    assert batch.endpoint == URL
    batch = wait_batch(client, batch.id)
    assert batch.status == "completed", batch.errors
    assert (batch.request_counts.total, batch.request_counts.completed) == (5, 4)
    assert batch.request_counts.failed == 1

    output = read_lines(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in output) == ["cut", "instructed", "items", "plain"]
    responses = {}
    for line in output:
        assert line["response"]["status_code"] == 200 and line["error"] is None
        response = Response.model_validate(line["response"]["body"])
        assert response.object == "response" and response.model == "tiny-llama"
        assert response.output[0].type == "message"
        assert response.usage is not None and response.usage.input_tokens > 0
        assert 1 <= response.usage.output_tokens <= 6
        responses[line["custom_id"]] = response
    cut = responses["cut"]
    assert cut.status == "incomplete" and cut.usage is not None and cut.usage.output_tokens == 1
    assert cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    assert len({r.id for r in responses.values()}) == 4

    errors = read_lines(client, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == ["tools"]
    error = errors[0]["response"]
    assert error["status_code"] == 400
    assert error["body"]["error"]["code"] == "unsupported"
    assert error["body"]["error"]["message"].startswith("body.tools is not supported on " + URL)


def test_a_malformed_responses_line_fails_the_batch_naming_its_line(
    client: Any, tmp_path: Path
) -> None:
    path = _jsonl(
        tmp_path / "bad.jsonl",
        [_line("fine"), _line("old-style", max_tokens=4), _line("empty", input=[])],
    )
    uploaded = client.files.create(file=path.open("rb"), purpose="batch")
    batch = wait_batch(
        client,
        client.batches.create(input_file_id=uploaded.id, endpoint=URL, completion_window="24h").id,
    )
    assert batch.status == "failed"
    assert batch.errors is not None
    assert [(e.line, e.param) for e in batch.errors.data] == [
        (2, "body.max_tokens"),
        (3, "body.input"),
    ]


def test_a_native_item_on_responses_is_answered_as_a_response(http: httpx.Client) -> None:
    assert http.post("/v1/jobs", json={"job_id": "responses-native"}).status_code == 200
    chat = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
    }
    items = [
        {"custom_id": "r", "url": URL, "body": _line("r")["body"], "urgent": True},
        {"custom_id": "c", "url": "/v1/chat/completions", "body": chat, "urgent": True},
        {"custom_id": "bad", "url": URL, "body": {"input": "x", "max_tokens": 3}},
    ]
    refused = http.post("/v1/jobs/responses-native/items", json={"items": items})
    assert refused.status_code == 400, refused.text
    assert "body.max_tokens is not a known field of /v1/responses" in refused.text
    accepted = http.post("/v1/jobs/responses-native/items", json={"items": items[:2]})
    assert accepted.status_code == 200, accepted.text
    got = {
        cid: http.get(f"/v1/jobs/responses-native/items/{cid}", params={"wait_s": 90}).json()
        for cid in ("r", "c")
    }
    assert {cid: g["status"] for cid, g in got.items()} == {"r": "completed", "c": "completed"}
    response = Response.model_validate(got["r"]["response"]["body"])
    assert response.object == "response" and response.output_text == (
        response.output[0].content[0].text  # type: ignore[union-attr]
    )
    ChatCompletion.model_validate(got["c"]["response"]["body"])
