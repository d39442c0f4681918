"""`inference run`'s engine room on a real local Ray cluster, the real store and the tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from inference.config import load_config
from inference.shards import read_results
from tests.conftest import EXAMPLES, REPO


def _config(tmp_path: Path, queue_db: Path, name: str = "tiny-cpu.yaml", **sections: dict):
    config = load_config(REPO / "configs" / name)
    return config.with_updates(
        output={"path": str(tmp_path / "out"), **sections.pop("output", {})},
        queue={"db_path": str(queue_db), **sections.pop("queue", {})},
        **sections,
    )


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def demo_run(ray_cluster: Path, queue_db: Path, tmp_path_factory: pytest.TempPathFactory):
    from inference.runner import run_job

    tmp = tmp_path_factory.mktemp("demo")
    config = _config(tmp, queue_db)
    summary = run_job(EXAMPLES / "chat.jsonl", config, job_id="demo-test")
    return config, summary, Path(summary.output)


def test_demo_job_output_holds_every_custom_id_exactly_once(demo_run) -> None:
    _, summary, job_dir = demo_run
    table = read_results(str(job_dir))
    ids = table.column("custom_id").to_pylist()
    expected = _ids(EXAMPLES / "chat.jsonl")
    assert len(expected) >= 2000
    assert sorted(ids) == sorted(expected)  # every one, none twice
    texts = table.column("output_text").to_pylist()
    assert all(isinstance(t, str) and len(t) > 0 for t in texts)
    assert (summary.done, summary.dead) == (len(expected), 0)
    assert set(table.column("finish_reason").to_pylist()) <= {"stop", "length"}
    assert min(table.column("completion_tokens").to_pylist()) >= 1


def test_no_partial_or_temporary_files_are_left(demo_run) -> None:
    _, _, job_dir = demo_run
    assert list((job_dir / "_tmp").iterdir()) == []
    for shard in (job_dir / "data").iterdir():
        assert shard.name.startswith("part-") and shard.suffix == ".parquet"
    manifest = json.loads((job_dir / "_manifest.json").read_text())
    files = sorted(s["file"] for s in manifest["shards"])
    assert files == sorted(f"data/{p.name}" for p in (job_dir / "data").iterdir())


def test_job_json_has_the_summary(demo_run) -> None:
    _, summary, job_dir = demo_run
    job = json.loads((job_dir / "job.json").read_text())
    assert job["done"] == summary.done
    assert job["completion_tokens"] > 0
    assert job["state"] == "completed"


def test_rerunning_a_finished_job_processes_nothing(demo_run) -> None:
    from inference.runner import run_job

    config, _, job_dir = demo_run
    before = {p.name: p.stat().st_mtime_ns for p in (job_dir / "data").iterdir()}
    again = run_job(EXAMPLES / "chat.jsonl", config, job_id="demo-test")
    assert again.processed == 0
    assert again.workers == 0
    after = {p.name: p.stat().st_mtime_ns for p in (job_dir / "data").iterdir()}
    assert after == before
    assert read_results(str(job_dir)).num_rows == again.total


def test_embeddings_match_sentence_transformers(
    ray_cluster: Path, queue_db: Path, tmp_path: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    from inference.models import resolve_model
    from inference.runner import run_job

    every = (EXAMPLES / "embeddings.jsonl").read_text().splitlines()
    longest = sorted(every, key=len)[-16:]  # over the tokenizer file's own 128-token truncation
    lines = every[:64] + [line for line in longest if line not in every[:64]]
    subset = tmp_path / "emb.jsonl"
    subset.write_text("\n".join(lines) + "\n")
    config = _config(tmp_path, queue_db, "embeddings-cpu.yaml")
    summary = run_job(subset, config, job_id="emb-test")
    table = read_results(summary.output)
    got = {
        cid: np.array(v, dtype=np.float32)
        for cid, v in zip(
            table.column("custom_id").to_pylist(),
            table.column("embedding").to_pylist(),
            strict=True,
        )
    }
    requests = [json.loads(line) for line in lines]
    model = SentenceTransformer(str(resolve_model("all-minilm-l6-v2")), device="cpu")
    want = model.encode([r["body"]["input"] for r in requests], batch_size=32)
    assert len(got) == len(requests)
    for request, vector in zip(requests, want, strict=True):
        mine = got[request["custom_id"]]
        assert mine.shape == (384,)
        np.testing.assert_allclose(mine, vector, atol=1e-4)


def test_bad_items_dead_letter_without_hurting_good_ones(
    ray_cluster: Path, queue_db: Path, tmp_path: Path
) -> None:
    from inference.runner import run_job

    def line(cid: str, **body: object) -> str:
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **body}
        return json.dumps(
            {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}
        )

    path = tmp_path / "mixed.jsonl"
    path.write_text(
        "\n".join(
            [
                line("good-1"),
                line("too-long", max_tokens=999_999),
                line("good-2"),
                line("tools", tools=[{"type": "function"}]),
                line("good-3", temperature=0),
            ]
        )
        + "\n"
    )
    summary = run_job(path, _config(tmp_path, queue_db), job_id="mixed-test")
    assert (summary.done, summary.dead) == (3, 2)
    done = read_results(summary.output).column("custom_id").to_pylist()
    assert sorted(done) == ["good-1", "good-2", "good-3"]
    errors = read_results(summary.output, errors=True).to_pylist()
    codes = {e["custom_id"]: e["error_code"] for e in errors}
    assert codes == {"too-long": "context_length_exceeded", "tools": "unsupported"}
    assert all(e["error_kind"] == "permanent" and e["message"] for e in errors)


def test_packed_job_completes_every_item_once(
    ray_cluster: Path, queue_db: Path, tmp_path: Path
) -> None:
    """pack_items on the tiny random model: its answers never parse, so every pack falls back
    to one item per prompt, and still every item ends in the output exactly once."""
    from inference.runner import run_job

    lines = (EXAMPLES / "chat.jsonl").read_text().splitlines()[:30]
    path = tmp_path / "pack.jsonl"
    path.write_text("\n".join(lines) + "\n")
    config = _config(tmp_path, queue_db, batching={"pack_items": 4})
    summary = run_job(path, config, job_id="packed-test")
    assert (summary.done, summary.dead) == (30, 0)
    ids = read_results(summary.output).column("custom_id").to_pylist()
    assert sorted(ids) == sorted(_ids(path))


def test_autoscaled_run_completes_and_gives_its_workers_back(
    ray_cluster: Path, queue_db: Path, tmp_path: Path
) -> None:
    """`scaling.mode: autoscale` in `inference run`: the backlog sizes the pool (Ray's resource
    request included), and the run ends with no worker left behind."""
    import ray

    from inference.runner import run_job

    lines = (EXAMPLES / "chat.jsonl").read_text().splitlines()[:40]
    path = tmp_path / "auto.jsonl"
    path.write_text("\n".join(lines) + "\n")
    scaling = {
        "mode": "autoscale",
        "min_workers": 0,
        "max_workers": 2,
        "interval_s": 0.5,
        "assumed_tokens_per_s": 500,
        "idle_timeout_s": 0,
        "target_drain_s": 5,
    }
    summary = run_job(path, _config(tmp_path, queue_db, scaling=scaling), job_id="auto-test")
    assert (summary.done, summary.dead) == (40, 0)
    assert 1 <= summary.workers <= 2
    assert sorted(read_results(summary.output).column("custom_id").to_pylist()) == sorted(
        _ids(path)
    )
    alive = [n for n in ray.util.list_named_actors() if n.startswith("tiny-llama-")]
    assert alive == []


def test_output_to_an_object_store_counts_only_manifest_shards(
    ray_cluster: Path, queue_db: Path, tmp_path: Path
) -> None:
    """An S3 output (a local moto server speaks the S3 protocol): no rename exists there, so
    shards are written once under their final name and the queue's manifest decides what
    counts; the reader honours it."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    from inference.runner import run_job
    from inference.shards import read_results as read

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        root = (
            f"s3://key:secret@bucket/out?endpoint_override={host}:{port}&scheme=http"
            f"&region=us-east-1"
        )
        fs, _ = pafs.FileSystem.from_uri(root + "&allow_bucket_creation=true")
        fs.create_dir("bucket")
        lines = (EXAMPLES / "chat.jsonl").read_text().splitlines()[:25]
        path = tmp_path / "s3.jsonl"
        path.write_text("\n".join(lines) + "\n")
        config = load_config(REPO / "configs/tiny-cpu.yaml").with_updates(
            output={"path": root, "rows_per_shard": 10}, queue={"db_path": str(queue_db)}
        )
        summary = run_job(path, config, job_id="s3-test")
        assert summary.output.startswith("s3://") and "/out/s3-test?" in summary.output
        # A stray file in data/ (a write whose commit never happened) must not count.
        stray = read(summary.output).slice(0, 1)
        import pyarrow.parquet as pq

        with fs.open_output_stream("bucket/out/s3-test/data/part-999999.parquet") as f:
            pq.write_table(stray, f)
        ids = read(summary.output).column("custom_id").to_pylist()
        assert sorted(ids) == sorted(_ids(path))
    finally:
        server.stop()


def test_resuming_a_job_with_another_model_is_refused_naming_the_fields(
    ray_cluster: Path, queue_db: Path, tmp_path: Path
) -> None:
    """The same bundled model named two ways is two pools: resumed into the second, the job's
    items would wait forever for a worker that serves the first. Refused before anything
    runs, naming the fields; a resume that only changes attempts goes on."""
    import ray

    from inference.errors import JobConflict
    from inference.queue.actor import get_or_create_queue
    from inference.runner import job_spec, run_job

    config = _config(tmp_path, queue_db)
    queue = get_or_create_queue(queue_db)
    ray.get(queue.create_job.remote(job_spec(config, "resume-conflict", config.output.path)))
    renamed = config.with_updates(engine={"model": str(REPO / "models" / "tiny-llama")})
    path = tmp_path / "in.jsonl"
    path.write_text((EXAMPLES / "chat.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(JobConflict) as caught:
        run_job(path, renamed, job_id="resume-conflict")
    assert "pool: 'tiny-llama' != " in str(caught.value)
    assert "settings.model" in str(caught.value)
    assert ray.get(queue.stats.remote("resume-conflict"))["total"] == 0  # nothing enqueued
    summary = run_job(
        path, config.with_updates(queue={"max_attempts": 5}), job_id="resume-conflict"
    )
    assert (summary.done, summary.dead) == (1, 0)
