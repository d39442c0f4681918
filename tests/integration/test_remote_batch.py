"""``engine.kind: openai_batch``: a job of one cluster drains through another's OpenAI Batch
API. The provider is our own ``inference serve`` (its own embedded Ray, the bundled model on
transformers), reached over HTTP with a key; the client is ``inference run`` in a subprocess
with its own embedded Ray, killed -9 mid-job and started again, and crashed by fault injection
between recording a provider batch and creating it, and between creating it and recording its
id. Every time: the output is exactly once, and no item was ever in two provider batches."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import httpx
import pytest

from tests.checker import check
from tests.conftest import REPO
from tests.integration.test_api_serve import INFERENCE, TOKEN, _free_port, _session_pids, serve

N_ITEMS = 60
MAX_LINES = 20


def _provider(tmp_path: Path) -> Path:
    config = tmp_path / "provider.yaml"
    config.write_text(
        "engine: {kind: transformers, model: tiny-llama, device: cpu}\n"
        "batching: {max_batch_size: 32}\n"
        "queue: {lease_s: 30, backoff_base_s: 0.1}\n"
        f"output: {{path: {tmp_path / 'provider-out'}, rows_per_shard: 100, "
        "max_shard_age_s: 0.5}\n"
        "scaling: {max_workers: 1}\n"
    )
    return config


def _client(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "client.yaml"
    config.write_text(
        "engine:\n"
        "  kind: openai_batch\n"
        "  model: tiny-llama\n"
        f"  base_url: http://127.0.0.1:{port}/v1\n"
        "  api_key_env: PROVIDER_KEY\n"
        "  input_price_per_mtok: 1.0\n"
        "  output_price_per_mtok: 2.0\n"
        f"  batch: {{max_lines: {MAX_LINES}, window_s: 1, poll_s: 1}}\n"
        f"queue: {{lease_s: 8, backoff_base_s: 0.1, db_path: {tmp_path / 'client.sqlite'}}}\n"
        f"output: {{path: {tmp_path / 'out'}, rows_per_shard: 25, max_shard_age_s: 1}}\n"
        "scaling: {max_workers: 1, cpus_per_worker: 0.5}\n"
    )
    return config


def _input(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    with path.open("w") as f:
        for i in range(N_ITEMS):
            body = {
                "model": "tiny-llama",
                "messages": [{"role": "user", "content": f"item {i}: say something"}],
                "max_tokens": 6,
                "temperature": 0,
            }
            line = {"custom_id": f"b-{i}", "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**line, "body": body}) + "\n")
    return path


_RAY_TMPS: list[str] = []


@pytest.fixture(autouse=True)
def _remove_ray_temps() -> Iterator[None]:
    yield
    while _RAY_TMPS:
        shutil.rmtree(_RAY_TMPS.pop(), ignore_errors=True)


def _start_client(
    tmp_path: Path, config: Path, inp: Path, log: Path, **env: str
) -> subprocess.Popen[bytes]:
    ray_tmp = tempfile.mkdtemp(prefix="ic-", dir="/tmp")  # Ray's socket paths stay short
    _RAY_TMPS.append(ray_tmp)
    environ = {**os.environ, "INFERENCE_RAY_TEMP_DIR": ray_tmp, "PROVIDER_KEY": TOKEN, **env}
    environ.pop("RAY_ADDRESS", None)
    command = [INFERENCE, "run", str(inp), "--config", str(config), "--job-id", "via-batch"]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc


def _kill(proc: subprocess.Popen[bytes]) -> None:
    pids = _session_pids(proc.pid)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(30)


def _finish(proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 240) -> None:
    try:
        rc = proc.wait(timeout_s)
    finally:
        if proc.poll() is None:
            _kill(proc)
    assert rc == 0, log.read_text()[-4000:]


def _provider_batches(url: str) -> list[dict]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    out, after = [], None
    while True:
        params = {"limit": 100, **({"after": after} if after else {})}
        page = httpx.get(f"{url}/v1/batches", params=params, headers=headers, timeout=30).json()
        out.extend(page["data"])
        if not page["has_more"]:
            return out
        after = page["data"][-1]["id"]


def _submitted_ids(url: str, batches: list[dict]) -> list[str]:
    """The custom ids of every line of every provider batch's input file."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    ids = []
    for batch in batches:
        text = httpx.get(
            f"{url}/v1/files/{batch['input_file_id']}/content", headers=headers, timeout=30
        ).text
        ids += [json.loads(line)["custom_id"] for line in text.splitlines() if line.strip()]
    return ids


def _assert_once_and_never_twice_submitted(tmp_path: Path, url: str) -> list[dict]:
    verdict = check(tmp_path / "out" / "via-batch", tmp_path / "client.sqlite", "via-batch")
    assert verdict.accepted == N_ITEMS
    assert (verdict.lost, verdict.duplicated, verdict.unexpected, verdict.partial) == (0, 0, 0, 0)
    assert verdict.in_data == N_ITEMS  # every item answered by the provider
    batches = _provider_batches(url)
    submitted = _submitted_ids(url, batches)
    assert sorted(submitted) == sorted(f"b-{i}" for i in range(N_ITEMS))  # each exactly once
    assert len(batches) == N_ITEMS // MAX_LINES
    assert {b["metadata"]["inference_job"] for b in batches} == {"via-batch"}
    return batches


def _ledger(tmp_path: Path) -> list[tuple[str, str, str]]:
    db = sqlite3.connect(f"file:{tmp_path / 'client.sqlite'}?mode=ro", uri=True)
    return db.execute("SELECT key, provider_id, state FROM remote_batches").fetchall()


@pytest.mark.timeout(600)
def test_a_job_drains_through_a_batch_api_across_a_kill_with_no_second_submission(
    tmp_path: Path,
) -> None:
    port, log = _free_port(), tmp_path / "provider.log"
    url = f"http://127.0.0.1:{port}"
    inp = _input(tmp_path)
    with serve(_provider(tmp_path), port, log):
        config = _client(tmp_path, port)
        client_log = tmp_path / "client.log"
        proc = _start_client(tmp_path, config, inp, client_log)
        deadline = time.monotonic() + 180
        while not _provider_batches(url):  # the first provider batch is in: kill the client
            assert proc.poll() is None, client_log.read_text()[-4000:]
            assert time.monotonic() < deadline, client_log.read_text()[-4000:]
            time.sleep(0.2)
        _kill(proc)
        proc = _start_client(tmp_path, config, inp, client_log)
        _finish(proc, client_log)
        batches = _assert_once_and_never_twice_submitted(tmp_path, url)
        ledger = _ledger(tmp_path)
        assert sorted(p for _, p, _ in ledger) == sorted(b["id"] for b in batches)
        assert {state for _, _, state in ledger} == {"completed"}
        job = json.loads((tmp_path / "out" / "via-batch" / "job.json").read_text())
        assert job["cost"] == pytest.approx(
            (job["prompt_tokens"] * 1.0 + job["completion_tokens"] * 2.0) / 1e6 * 0.5
        )
        assert job["remote_batches"]["batches"] == {"completed": N_ITEMS // MAX_LINES}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("step", ["batch_recorded", "batch_created"])
def test_a_crash_between_the_ledger_and_the_provider_submits_nothing_twice(
    tmp_path: Path, step: str
) -> None:
    port, log = _free_port(), tmp_path / "provider.log"
    url = f"http://127.0.0.1:{port}"
    once = tmp_path / "once"
    once.mkdir()
    with serve(_provider(tmp_path), port, log):
        client_log = tmp_path / "client.log"
        proc = _start_client(
            tmp_path,
            _client(tmp_path, port),
            _input(tmp_path),
            client_log,
            INFERENCE_FAULT=step,
            INFERENCE_FAULT_ONCE=str(once),
        )
        _finish(proc, client_log)
        assert (once / step).exists()  # the worker did crash there, and a new one took over
        _assert_once_and_never_twice_submitted(tmp_path, url)
