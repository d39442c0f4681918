"""Whole jobs through vLLM's CPU build (``configs/vllm-cpu.yaml``) on the shared local Ray
cluster: continuous feeding across lease boundaries, every request field in the output and its
OpenAI export, and a kill -9 of ``VLLM::EngineCore`` mid-job (engine-fatal: the leases go back
with no attempt charged, a new worker takes over, the output is exactly once)."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow.dataset as pads
import pytest
from openai.types.chat import ChatCompletion

from inference.config import load_config
from inference.export import output_jsonl
from tests.conftest import REPO
from tests.faults.harness import assert_exactly_once, run_in_thread, worker_infos


def write_jsonl(path: Path, bodies: list[tuple[str, dict[str, Any]]]) -> Path:
    with path.open("w") as f:
        for custom_id, body in bodies:
            line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**line, "body": body}) + "\n")
    return path


def chat_body(text: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


def vllm_job_config(tmp: Path, db: Path, **batching: Any):
    config = load_config(REPO / "configs/vllm-cpu.yaml")
    return config.with_updates(
        engine={"options": {**config.engine.options, "kv_cache_memory_bytes": 256 << 20}},
        output={"path": str(tmp / "out"), "rows_per_shard": 200, "max_shard_age_s": 2},
        queue={"db_path": str(db), "max_attempts": 3, "backoff_base_s": 0.1},
        batching=batching,
    )


def rows(job_dir: Path) -> list[dict[str, Any]]:
    return pads.dataset(str(job_dir / "data"), format="parquet").to_table().to_pylist()


SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["spam", "ham"]}},
    "required": ["label"],
    "additionalProperties": False,
}


def test_a_job_through_vllm_streams_past_its_long_answers_and_keeps_every_field(
    ray_cluster: Path, queue_db: Path, tmp_path: Path
) -> None:
    # 64 in flight: the long answers are leased first and hold 6 of the 64 places; the rest
    # of the job streams through the other 58 while they run.
    config = vllm_job_config(tmp_path, queue_db, max_batch_size=64, max_batch_tokens=1 << 20)
    check_a_streaming_job(tmp_path, queue_db, config)


def check_a_streaming_job(tmp_path: Path, queue_db: Path, config: Any) -> None:
    """A job whose first items have long answers: the rest overtake them (no batch
    barrier), and n, logprobs and response_format reach the output and its export. Shared
    with tests/gpu."""
    rng = random.Random(3)
    bodies = [(f"long-{i}", chat_body(f"go on {i}", 1200)) for i in range(6)]
    bodies += [(f"short-{i:04d}", chat_body(f"item {i}", rng.randint(4, 16))) for i in range(400)]
    bodies += [
        ("n-three", chat_body("three ways", 6, n=3, temperature=1.0, seed=9)),
        ("with-logprobs", chat_body("hello", 5, logprobs=True, top_logprobs=2)),
        (
            "as-json",
            chat_body(
                "spam?",
                40,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "v", "schema": SCHEMA},
                },
            ),
        ),
    ]
    path = write_jsonl(tmp_path / "in.jsonl", bodies)
    thread, box = run_in_thread(path, config, "vllm-stream")
    thread.join(600)
    assert "error" not in box, box.get("error")
    summary = box["summary"]
    job_dir = Path(summary.output)
    assert summary.done == len(bodies) and summary.dead == 0
    assert_exactly_once(job_dir, queue_db, "vllm-stream", len(bodies))

    by_id = {r["custom_id"]: r for r in rows(job_dir)}
    first_long = min(by_id[f"long-{i}"]["completed_at"] for i in range(6))
    shorts = [r for cid, r in by_id.items() if cid.startswith("short-")]
    before = sum(r["completed_at"] < first_long for r in shorts)
    # A worker that waited for each leased batch's longest answer would finish almost none.
    assert before >= 0.9 * len(shorts), f"only {before} of {len(shorts)} short items overtook"
    for i in range(6):
        assert by_id[f"long-{i}"]["completion_tokens"] == 1200

    three = by_id["n-three"]
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert three["completion_tokens"] == 18
    logprobs = json.loads(by_id["with-logprobs"]["choices"][0]["logprobs"])
    assert len(logprobs) == 5 and all(len(t["top_logprobs"]) == 2 for t in logprobs)
    assert json.loads(by_id["as-json"]["output_text"])["label"] in ("spam", "ham")
    assert by_id["short-0001"]["choices"] is None

    lines = {
        line["custom_id"]: line
        for chunk in output_jsonl(str(job_dir), "/v1/chat/completions")
        for line in map(json.loads, chunk.decode().splitlines())
    }
    completion = ChatCompletion.model_validate(lines["n-three"]["response"]["body"])
    assert len(completion.choices) == 3
    with_logprobs = ChatCompletion.model_validate(lines["with-logprobs"]["response"]["body"])
    assert with_logprobs.choices[0].logprobs is not None
    assert len(with_logprobs.choices[0].logprobs.content or []) == 5


def engine_core_of_a_worker(timeout_s: float = 180) -> tuple[str, int]:
    """(worker id, engine core pid) of a live vLLM worker that holds leases."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, info in worker_infos():
            if info["items"] < 100 or info["state"] != "busy":
                continue  # let it work a while first, so it holds results and leases
            for child in psutil.Process(info["pid"]).children(recursive=True):
                if child.name().startswith("VLLM::EngineCore"):
                    return name, child.pid
        time.sleep(0.2)
    pytest.fail("no busy vLLM worker with an engine core")


def test_a_killed_engine_core_hands_its_items_back_uncharged_and_the_job_completes(
    ray_cluster: Path, queue_db: Path, tmp_path: Path
) -> None:
    rng = random.Random(11)
    count = 1500
    bodies = [(f"item-{i:05d}", chat_body(f"doc {i}", rng.randint(16, 48))) for i in range(count)]
    path = write_jsonl(tmp_path / "in.jsonl", bodies)
    config = vllm_job_config(tmp_path, queue_db, max_batch_size=128)
    thread, box = run_in_thread(path, config, "vllm-core-kill")
    victim, core_pid = engine_core_of_a_worker()
    os.kill(core_pid, signal.SIGKILL)
    thread.join(600)
    assert "error" not in box, box.get("error")
    summary = box["summary"]
    job_dir = Path(summary.output)
    assert summary.done == count and summary.dead == 0
    assert summary.workers_lost == 1
    assert_exactly_once(job_dir, queue_db, "vllm-core-kill", count)
    out = rows(job_dir)
    workers = {r["worker"] for r in out}
    assert victim in workers and len(workers) == 2  # the victim's committed work stays
    assert {r["attempts"] for r in out} == {1}  # the engine's death cost the items nothing
    assert not vllm_processes_after(15), "vLLM processes left behind"


def test_a_poison_item_kills_its_vllm_worker_alone(
    ray_cluster: Path, queue_db: Path, tmp_path: Path
) -> None:
    """The continuous path keeps every item in flight at once, so the poison item's crash (its
    worker's process exits) takes all of them down the first time. They come back as suspects
    and each runs alone in the next worker's engine; only the poison item reaches the dead
    letters, after its second crash (max_attempts 2), and each other item paid one crash."""
    import dataclasses
    import uuid

    import ray

    from inference.pool import WorkerPool
    from inference.queue.actor import get_or_create_queue
    from inference.queue.records import NewItem, Packed
    from inference.runner import job_spec

    config = vllm_job_config(tmp_path, queue_db).with_updates(queue={"max_attempts": 2})
    queue = get_or_create_queue(queue_db)
    job_id = f"vllm-poison-{uuid.uuid4().hex[:6]}"
    spec = dataclasses.replace(job_spec(config, job_id, config.output.path), pool=job_id)
    ray.get(queue.create_job.remote(spec))
    ids = [f"p-{i:02d}" for i in range(8)]
    lines = [{"custom_id": c, "url": "/v1/chat/completions", "body": chat_body(c, 8)} for c in ids]
    items = Packed(NewItem(r["custom_id"], json.dumps(r), 16) for r in lines)
    ray.get(queue.enqueue.remote(job_id, items))
    poison = ids[-1]  # run last of the suspects: no third worker is needed
    env = {"env_vars": {"INFERENCE_FAULT_ITEMS": json.dumps({poison: "exit"})}}
    pool = WorkerPool(config, job_id, queue, runtime_env=env)
    pool.start(1)
    try:
        deadline = time.monotonic() + 400
        while (stats := ray.get(queue.stats.remote(job_id)))["pending"] + stats["leased"]:
            assert time.monotonic() < deadline, stats
            pool.check(replace=True)
            time.sleep(0.5)
    finally:
        pool.drain(timeout_s=30)
    assert (stats["done"], stats["dead"]) == (len(ids) - 1, 1)
    dead = ray.get(queue.dead_letters.remote(job_id, 10, 0))
    assert [(d["custom_id"], d["attempts"]) for d in dead] == [(poison, 2)]
    out = rows(Path(config.output.path) / job_id)
    assert sorted(r["custom_id"] for r in out) == ids[:-1]
    assert {r["attempts"] for r in out} == {2}  # the first crash, then alone: done
    assert not vllm_processes_after(15), "vLLM processes left behind"


def vllm_processes_after(grace_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + grace_s
    while True:
        found = [
            p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("VLLM")
        ]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)
