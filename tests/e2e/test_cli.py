"""The `inference` command in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import REPO

INFERENCE = str(Path(sys.executable).with_name("inference"))


def _run(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    # Ray's socket paths must stay under 108 bytes: a short temp folder, removed afterwards.
    ray_tmp = tempfile.mkdtemp(prefix="ir-", dir="/tmp")
    env = {**os.environ, "INFERENCE_RAY_TEMP_DIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        return subprocess.run(
            [INFERENCE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    finally:
        (cwd / "ray_was_started").write_text(str(any(Path(ray_tmp).iterdir())))
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _line(cid: str) -> str:
    return json.dumps(
        {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": f"say {cid}"}], "max_tokens": 6},
        }
    )


def test_malformed_line_fails_the_run_naming_the_line_and_enqueues_nothing(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(_line("a") + "\n" + _line("b") + "\n" + '{"custom_id": "c", "body": \n')
    result = _run(
        "run",
        str(path),
        "--config",
        str(REPO / "configs/tiny-cpu.yaml"),
        "--output",
        str(tmp_path / "out"),
        "--job-id",
        "bad",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "line 3" in result.stderr and "invalid JSON" in result.stderr
    assert "nothing was enqueued" in result.stderr
    assert not (tmp_path / "out" / "_queue").exists()  # no queue was even created
    assert (tmp_path / "ray_was_started").read_text() == "False"  # nor a Ray cluster


def test_bad_config_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("batching:\n  max_batch_size: -4\n")
    path = tmp_path / "in.jsonl"
    path.write_text(_line("a") + "\n")
    result = _run("run", str(path), "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "batching.max_batch_size" in result.stderr


def test_run_resume_then_inspect_from_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    bad = json.dumps(
        {
            "custom_id": "bad",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 99_999},
        }
    )
    path.write_text("".join(_line(f"item-{i}") + "\n" for i in range(40)) + bad + "\n")
    out = str(tmp_path / "out")
    config = str(REPO / "configs/tiny-cpu.yaml")
    args = ("run", str(path), "--config", config, "--output", out, "--job-id", "cli-job", "--quiet")
    first = _run(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout.strip().splitlines()[-1])["summary"]
    assert (summary["done"], summary["dead"], summary["processed"]) == (40, 1, 41)
    second = _run(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(second.stdout.strip().splitlines()[-1])["summary"]["processed"] == 0

    status = _run("status", "cli-job", "--output", out, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "cli-job" in status.stdout and "40" in status.stdout
    dead = _run("dlq", "list", "cli-job", "--output", out, cwd=tmp_path)
    [letter] = [json.loads(line) for line in dead.stdout.splitlines()]
    assert (letter["custom_id"], letter["error_code"]) == ("bad", "context_length_exceeded")
    exported = _run("export", "cli-job", "--output", out, "--to", str(tmp_path / "x"), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    lines = (tmp_path / "x" / "cli-job_output.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in lines) == sorted(
        f"item-{i}" for i in range(40)
    )
    assert json.loads(lines[0])["response"]["status_code"] == 200
    [error] = (tmp_path / "x" / "cli-job_errors.jsonl").read_text().splitlines()
    assert json.loads(error)["custom_id"] == "bad"
