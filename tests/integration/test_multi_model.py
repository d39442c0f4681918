"""Several base models in one job (``engines:``): each item runs on the model its body.model
names, each model's pool has its own workers, and progress and cost are kept per model. Real
Ray, the real store, the bundled chat and embedding models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference.config import load_config
from inference.errors import InputError
from inference.shards import read_results
from tests.checker import check
from tests.conftest import EXAMPLES, REPO

CHAT, EMBED = "tiny-llama", "all-minilm-l6-v2"


def _config(tmp_path: Path, queue_db: Path):
    return load_config(REPO / "configs/multi-model-cpu.yaml").with_updates(
        output={"path": str(tmp_path / "out")}, queue={"db_path": str(queue_db)}
    )


def _mixed(tmp_path: Path, chats: int, embeds: int, extra: list[str] | None = None) -> Path:
    chat = (EXAMPLES / "chat.jsonl").read_text().splitlines()[:chats]
    emb = (EXAMPLES / "embeddings.jsonl").read_text().splitlines()[:embeds]
    lines = [line for pair in zip(chat, emb, strict=False) for line in pair]
    lines += chat[len(emb) :] + emb[len(chat) :] + (extra or [])
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_each_item_runs_on_the_model_it_names(
    ray_cluster: Path, queue_db: Path, tmp_path: Path
) -> None:
    import ray

    from inference.queue.actor import get_queue
    from inference.runner import run_job

    path = _mixed(tmp_path, 40, 30)
    summary = run_job(path, _config(tmp_path, queue_db), job_id="two-models")
    assert (summary.done, summary.dead) == (70, 0)
    rows = read_results(summary.output).to_pylist()
    by_id = {r["custom_id"]: r for r in rows}
    assert len(by_id) == len(rows) == 70
    for cid, row in by_id.items():
        if cid.startswith("chat-"):  # the chat model's pool answered, no vector
            assert row["worker"].startswith(f"{CHAT}-")
            assert row["output_text"] and not row["embedding"]
        else:  # the embedding model's pool: its 384 dimensions, no text
            assert row["worker"].startswith(f"{EMBED}-")
            assert len(row["embedding"]) == 384 and not row["output_text"]
    stats = ray.get(get_queue().stats.remote("two-models"))
    assert {p: (s["done"], s["total"]) for p, s in stats["pools"].items()} == {
        CHAT: (40, 40),
        EMBED: (30, 30),
    }
    assert all(s["busy_s"] > 0 for s in stats["pools"].values())
    assert summary.workers == 2  # a worker per model on the 2-CPU cluster
    job = json.loads((Path(summary.output) / "job.json").read_text())
    shares = job["models"]
    assert set(shares) == {CHAT, EMBED}
    assert (shares[CHAT]["done"], shares[EMBED]["done"]) == (40, 30)
    per_hour = {CHAT: 0.05, EMBED: 0.02}  # configs/multi-model-cpu.yaml
    for name, share in shares.items():
        assert share["cost"] == pytest.approx(share["busy_s"] / 3600 * per_hour[name])
    assert job["cost"] == pytest.approx(shares[CHAT]["cost"] + shares[EMBED]["cost"])
    # `inference status`: a row per model under the job's, each at its price.
    from inference.admin import QueueAccess, status_rows

    rows = status_rows(QueueAccess(_config(tmp_path, queue_db)), "two-models")
    assert [r["job"] for r in rows] == [
        "two-models",
        f"  two-models · {CHAT}",
        f"  two-models · {EMBED}",
    ]
    assert [r["done"] for r in rows] == [70, 40, 30]
    # Each printed to 4 decimals: the parts' sum and the rounded total differ by < 1.5e-4.
    parts = float(rows[1]["cost"]) + float(rows[2]["cost"])
    assert float(rows[0]["cost"]) == pytest.approx(parts, abs=1.5e-4)
    assert float(rows[0]["cost"]) == pytest.approx(job["cost"], abs=5e-5)
    verdict = check(Path(summary.output), queue_db, "two-models")
    assert (verdict.lost, verdict.duplicated, verdict.unexpected, verdict.partial) == (0, 0, 0, 0)
    alive = [n for n in ray.util.list_named_actors() if n.startswith((CHAT, EMBED))]
    assert alive == []


def test_an_item_naming_a_model_no_engine_serves_is_refused_before_anything_is_enqueued(
    ray_cluster: Path, queue_db: Path, tmp_path: Path
) -> None:
    import ray

    from inference.queue.actor import get_queue
    from inference.runner import run_job

    stray = json.dumps(
        {
            "custom_id": "stray-1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        }
    )
    path = _mixed(tmp_path, 3, 3, [stray])
    with pytest.raises(InputError) as err:
        run_job(path, _config(tmp_path, queue_db), job_id="stray-model")
    message = str(err.value)
    assert "line 7" in message and "stray-1" in message and "'gpt-4o'" in message
    assert f"{CHAT}, {EMBED}" in message  # the served names
    assert "stray-model" not in ray.get(get_queue().stats.remote())["jobs"]


# ------------------------------------------------------------------------------ over HTTP
def _server_config(base: Path, queue_db: Path):
    return load_config(REPO / "configs/multi-model-cpu.yaml").with_updates(
        output={"path": str(base / "out"), "rows_per_shard": 50, "max_shard_age_s": 0.5},
        queue={"db_path": str(queue_db), "lease_s": 20, "backoff_base_s": 0.1},
        api={"state_dir": str(base / "state")},
    )


@pytest.fixture(scope="module")
def server(ray_cluster: Path, queue_db: Path, tmp_path_factory: pytest.TempPathFactory):
    from inference.api.app import create_app
    from tests.support.api_server import cluster_services, live_server

    config = _server_config(tmp_path_factory.mktemp("multi-api"), queue_db)
    with (
        cluster_services(config) as (queue, controller),
        live_server(create_app(config, queue, controller)) as url,
    ):
        yield url


def _line(cid: str, model: str) -> dict:
    if model == EMBED:
        body: dict = {"model": model, "input": f"text {cid}"}
        return {"custom_id": cid, "method": "POST", "url": "/v1/embeddings", "body": body}
    body = {"model": model, "messages": [{"role": "user", "content": cid}], "max_tokens": 4}
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}


def test_a_native_job_routes_each_item_and_refuses_an_unserved_model(server: str) -> None:
    import httpx

    with httpx.Client(base_url=server, timeout=60) as http:
        job = http.post("/v1/jobs", json={"job_id": "mm-native"}).json()
        assert job["id"] == "mm-native"
        bad = [_line("c1", CHAT), _line("x1", "gpt-4o")]
        reply = http.post("/v1/jobs/mm-native/items", json={"items": bad})
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == "items[1].body.model"
        assert CHAT in error["message"] and EMBED in error["message"]
        good = [_line(f"c{i}", CHAT) for i in range(6)] + [_line(f"e{i}", EMBED) for i in range(6)]
        reply = http.post("/v1/jobs/mm-native/items", json={"items": good})
        assert reply.status_code == 200 and reply.json()["accepted"] == 12
        for item in good:
            got = http.get(f"/v1/jobs/mm-native/items/{item['custom_id']}?wait_s=120").json()
            assert got["status"] == "completed", got
            body = got["response"]["body"]
            if item["url"] == "/v1/embeddings":
                assert len(body["data"][0]["embedding"]) == 384
            else:
                assert body["choices"][0]["message"]["content"]
        # The dashboard shows each model's share of the job, at each model's price.
        rows = http.get("/v1/dashboard/state").json()["jobs"]
        [row] = [r for r in rows if r["id"] == "mm-native"]
        models = row["models"]
        assert {n: (m["done"], m["total"]) for n, m in models.items()} == {
            CHAT: (6, 6),
            EMBED: (6, 6),
        }
        assert row["cost"] == pytest.approx(sum(m["cost"] for m in models.values()))
        assert models[EMBED]["cost"] == pytest.approx(models[EMBED]["busy_s"] / 3600 * 0.02)


def test_a_batch_runs_on_its_model_and_one_of_an_unserved_model_fails_validation(
    server: str, tmp_path: Path
) -> None:
    from openai import OpenAI

    from tests.support.api_server import _jsonl, wait_batch

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    lines = [_line(f"e{i}", EMBED) for i in range(8)]
    upload = client.files.create(
        file=_jsonl(tmp_path / "e.jsonl", lines).open("rb"), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    done = wait_batch(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 8
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == sorted(x["custom_id"] for x in lines)
    assert all(len(o["response"]["body"]["data"][0]["embedding"]) == 384 for o in out)

    stray = [_line(f"s{i}", "gpt-4o") for i in range(2)]
    upload = client.files.create(
        file=_jsonl(tmp_path / "s.jsonl", stray).open("rb"), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    failed = wait_batch(client, batch.id)
    assert failed.status == "failed"
    errors = failed.errors.data
    assert [(e.code, e.line, e.param) for e in errors] == [
        ("model_not_found", 1, "body.model"),
        ("model_not_found", 2, "body.model"),
    ]
